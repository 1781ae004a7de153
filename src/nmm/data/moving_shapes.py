"""The moving shapes world: short video clips of the shapes world, with exact ground truth.

A clip is a few frames (default 8) of one `ShapesWorld` scene in which one or two things happen:
a shape moves one or two grid cells, appears, disappears or changes colour. Every frame is an
ordinary shapes-world scene, so the clip judge (`nmm.eval.clip_judge`) can read a rendered clip
back frame by frame and recover exactly what happened; captioning, video question answering and
text-to-video can then be scored exactly, as for still images.

Compositional generalisation: on top of ShapesWorld's held-out (colour, kind) combinations, a few
(kind, direction) motions never occur in the "train" split ("a triangle moves up") although
triangles and upward motion each do. Every "heldout_combo" clip contains one such motion.

To keep the ground truth unambiguous, every shape keeps cells and a colour of its own for the
whole clip: a moving shape's path, an appearing shape's cell and a new colour are used by no other
shape at any time. So shapes never collide, colours stay distinct in every frame, and following
shapes by colour and kind from frame to frame (as the judge does) is never confused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from nmm.data.shapes import (COLOURS, KINDS, MOVES, NUMBERS, SIZES, SPLITS, Scene, Shape,
                             ShapesWorld)

ACTIONS = ("moves", "appears", "disappears", "changes colour")
# (kind, direction) motions that never appear in the "train" split: one per kind and direction.
DEFAULT_HELDOUT_MOTIONS = (("triangle", "up"), ("circle", "left"), ("square", "down"), ("cross", "right"))
MAX_CELLS = 2  # the farthest a shape moves in one clip
_DISTANCES = {1: "one cell", 2: "two cells"}
_MAX_EVERY = 3  # a moving shape steps at most every 3 frames, so two steps fit in 8 frames

# One caption clause: a ShapesWorld phrase, optionally followed by what happens to that shape.
_CLAUSE_RE = re.compile(
    r"(?P<phrase>.+?)(?: (?:moves (?P<distance>one cell|two cells) (?P<direction>"
    + "|".join(MOVES) + r")|(?P<verb>appears|disappears)|becomes (?P<colour>"
    + "|".join(COLOURS) + ")))?"
)


@dataclass(frozen=True)
class Event:
    """One thing that happens in a clip to one shape.

    `shape` is the shape just before the event (for "appears": the shape that appears). The frames
    at which the event shows vary the video but not its meaning, like a shape's pixel offset, so
    they are not compared: a video showing the captioned events at other moments still matches.
    """

    action: str  # one of ACTIONS
    shape: Shape
    direction: str | None = None  # "moves": a key of MOVES
    cells: int = 0  # "moves": how many cells it travels
    colour: str | None = None  # "changes colour": the new colour
    # The first frame that shows each step of the event (a move of two cells has two steps).
    frames: tuple[int, ...] = field(default=(), compare=False)

    def state(self, frame: int) -> Shape | None:
        """The event's shape as frame `frame` shows it; None while it is not there."""
        done = sum(f <= frame for f in self.frames)  # steps already shown
        s = self.shape
        if self.action == "moves":
            row, col = divmod(s.cell, 3)
            dr, dc = MOVES[self.direction]
            return replace(s, cell=(row + done * dr) * 3 + col + done * dc)
        if self.action == "appears":
            return s if done else None
        if self.action == "disappears":
            return None if done else s
        return replace(s, colour=self.colour) if done else s


def _canonical(events) -> tuple[Event, ...]:
    # Like Scene's shape order: equal descriptions compare equal and captions are deterministic.
    return tuple(sorted(events, key=lambda e: (e.shape.cell, e.shape.colour, e.shape.kind,
                                               e.shape.size, e.action, e.direction or "",
                                               e.cells, e.colour or "")))


@dataclass(frozen=True)
class ClipDescription:
    """What a caption says about a clip: its first frame and its events, without their timing."""

    first: Scene
    events: tuple[Event, ...]

    def __post_init__(self):
        object.__setattr__(self, "events", _canonical(self.events))


@dataclass(frozen=True)
class Clip:
    """A video with its ground truth: the scene each frame shows and the events between them."""

    scenes: tuple[Scene, ...]
    events: tuple[Event, ...]

    def __post_init__(self):
        object.__setattr__(self, "events", _canonical(self.events))

    def description(self) -> ClipDescription:
        return ClipDescription(self.scenes[0], self.events)


def move_path(cell: int, direction: str, cells: int) -> list[int] | None:
    """The cells a shape steps through moving `cells` cells from `cell`; None if it leaves the grid."""
    row, col = divmod(cell, 3)
    dr, dc = MOVES[direction]
    steps = [(row + i * dr, col + i * dc) for i in range(1, cells + 1)]
    if not all(0 <= r < 3 and 0 <= c < 3 for r, c in steps):
        return None
    return [r * 3 + c for r, c in steps]


def _taken(first: Scene, events) -> tuple[set[int], set[str]]:
    """The cells and colours some shape of the clip uses at some time: no other shape may."""
    shapes = list(first.shapes)
    for e in events:
        shapes += [e.shape] + [e.state(f) for f in e.frames]
    shapes = [s for s in shapes if s is not None]
    return {s.cell for s in shapes}, {s.colour for s in shapes}


class MovingShapesWorld:
    """Samples, renders and describes clips. Everything is deterministic given an rng."""

    def __init__(self, world: ShapesWorld | None = None, frames: int = 8,
                 heldout_motions=DEFAULT_HELDOUT_MOTIONS):
        if frames < 2:
            raise ValueError(f"a clip needs at least 2 frames (a before and an after), got {frames}")
        for kind, direction in heldout_motions:
            if kind not in KINDS or direction not in MOVES:
                raise ValueError(f"unknown held-out motion ({kind!r}, {direction!r})")
        self.world = world if world is not None else ShapesWorld()
        self.frames = frames
        self.heldout_motions = frozenset(tuple(m) for m in heldout_motions)
        self.max_cells = min(MAX_CELLS, frames - 1)  # every step needs a frame of its own

    # ----- sampling -----

    def sample_clip(self, rng: np.random.Generator, split: str = "train") -> Clip:
        """One random clip. "train" avoids every held-out combination, "heldout_combo" always has
        a held-out motion (and may have held-out colour/kind combos), "any" has no constraint."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "heldout_combo" and not self.heldout_motions:
            raise ValueError("split 'heldout_combo' needs at least one held-out motion")
        for _ in range(1000):  # rejection sampling: a scene may leave no room for the events
            clip = self._try_clip(rng, split)
            if clip is not None:
                return clip
        raise RuntimeError(f"could not sample a {split!r} clip; are the held-out sets too large?")

    def clips(self, n: int, seed: int, split: str = "train") -> list[Clip]:
        rng = np.random.default_rng(seed)
        return [self.sample_clip(rng, split) for _ in range(n)]

    def _try_clip(self, rng: np.random.Generator, split: str) -> Clip | None:
        first = self.world.sample_scene(rng, "train" if split == "train" else "any")
        events: list[Event] = []
        for i in range(int(rng.integers(1, 3))):
            forced = split == "heldout_combo" and i == 0
            actions = ["moves"] if forced else [ACTIONS[j] for j in rng.permutation(len(ACTIONS))]
            event = next((e for a in actions
                          if (e := self._propose(a, first, events, rng, split, forced))), None)
            if event is None:
                break
            events.append(self._timed(event, rng))
        if not events:  # also when a forced held-out motion did not fit
            return None
        scenes = tuple(self._frame(first, events, f) for f in range(self.frames))
        return Clip(scenes, tuple(events))

    def _propose(self, action, first, events, rng, split, forced) -> Event | None:
        """A random untimed `action` event that fits the clip so far, or None if none fits."""
        cells, colours = _taken(first, events)
        busy = {e.shape for e in events}
        idle = [s for s in first.shapes if s not in busy]  # one event per shape
        free_colours = [c for c in COLOURS if c not in colours]
        n_appear = sum(e.action == "appears" for e in events)
        n_vanish = sum(e.action == "disappears" for e in events)
        train = split == "train"
        options: list[Event] = []
        if action == "moves":
            for s in idle:
                for direction in MOVES:
                    heldout = (s.kind, direction) in self.heldout_motions
                    if (train and heldout) or (forced and not heldout):
                        continue
                    for n in range(1, self.max_cells + 1):
                        route = move_path(s.cell, direction, n)
                        if route is None or cells & set(route):
                            break
                        options.append(Event("moves", s, direction, n))
        elif action == "disappears":
            if len(first.shapes) - n_vanish > self.world.min_shapes:
                options = [Event("disappears", s) for s in idle]
        elif action == "changes colour":
            options = [Event("changes colour", s, colour=c) for s in idle for c in free_colours
                       if not (train and (c, s.kind) in self.world.heldout)]
        elif action == "appears" and len(first.shapes) + n_appear < self.world.max_shapes:
            free_cells = [c for c in range(9) if c not in cells]
            if free_cells and free_colours:
                colour = free_colours[rng.integers(len(free_colours))]
                kinds = [k for k in KINDS if not (train and (colour, k) in self.world.heldout)]
                if kinds:
                    return Event("appears", self._new_shape(rng, kinds, colour, free_cells))
        return options[rng.integers(len(options))] if options else None

    def _new_shape(self, rng, kinds, colour, free_cells) -> Shape:
        kind = kinds[rng.integers(len(kinds))]
        size = SIZES[rng.integers(len(SIZES))]
        cell = free_cells[rng.integers(len(free_cells))]
        slack = self.world.cell_px - self.world.size_px[size]  # pixel offsets that fit the cell
        dx, dy = (int(v) for v in rng.integers(0, slack + 1, size=2))
        return Shape(kind, colour, size, cell, dx, dy)

    def _timed(self, event: Event, rng) -> Event:
        """The event with random frames: a move steps one cell every k frames. Nothing happens in
        the first frame, so it always shows the scene the caption starts from."""
        steps = event.cells if event.action == "moves" else 1
        every = 1 if steps == 1 else int(rng.integers(1, min(_MAX_EVERY, (self.frames - 2) // (steps - 1)) + 1))
        start = int(rng.integers(1, self.frames - (steps - 1) * every))
        return replace(event, frames=tuple(start + i * every for i in range(steps)))

    @staticmethod
    def _frame(first: Scene, events, frame: int) -> Scene:
        subjects = {e.shape: e for e in events if e.action != "appears"}
        shapes = [subjects[s].state(frame) if s in subjects else s for s in first.shapes]
        shapes += [e.state(frame) for e in events if e.action == "appears"]
        return Scene(tuple(s for s in shapes if s is not None))

    # ----- checks -----

    def has_heldout_motion(self, clip_or_events) -> bool:
        events = clip_or_events.events if isinstance(clip_or_events, (Clip, ClipDescription)) else clip_or_events
        return any(e.action == "moves" and (e.shape.kind, e.direction) in self.heldout_motions
                   for e in events)

    def is_train_clip(self, clip: Clip) -> bool:
        """No held-out motion, and no held-out (colour, kind) in any frame."""
        return not self.has_heldout_motion(clip) and all(map(self.world.is_train_scene, clip.scenes))

    def is_valid(self, clip: Clip) -> bool:
        """The right number of frames, each a valid ShapesWorld scene, and 1-2 events."""
        return (len(clip.scenes) == self.frames and 1 <= len(clip.events) <= 2
                and all(map(self.world.is_valid, clip.scenes)))

    # ----- pixels -----

    def render(self, clip: Clip) -> np.ndarray:
        """(frames, H, W, 3) uint8: every frame rendered by the ShapesWorld."""
        return np.stack([self.world.render(scene) for scene in clip.scenes])

    # ----- text -----

    def caption(self, clip: Clip | ClipDescription) -> str:
        """The first frame's shapes, each with what happens to it, then the shapes that appear:
        "a large blue square at the left moves one cell right and a small red circle at the top
        appears". Timing is not described."""
        description = clip.description() if isinstance(clip, Clip) else clip
        by_shape = {e.shape: e for e in description.events if e.action != "appears"}
        clauses = [self._clause(s, by_shape.get(s)) for s in description.first.shapes]
        clauses += [self._clause(e.shape, e) for e in description.events if e.action == "appears"]
        if len(clauses) == 1:
            return clauses[0]
        return ", ".join(clauses[:-1]) + " and " + clauses[-1]

    def _clause(self, shape: Shape, event: Event | None) -> str:
        phrase = self.world.caption(Scene((shape,)))
        if event is None:
            return phrase
        if event.action == "moves":
            return f"{phrase} moves {_DISTANCES[event.cells]} {event.direction}"
        if event.action == "changes colour":
            return f"{phrase} becomes {event.colour}"
        return f"{phrase} {event.action}"

    def parse_caption(self, text: str) -> ClipDescription | None:
        """Inverse of `caption`. Returns None, never raises, on anything else."""
        if not isinstance(text, str):
            return None
        text = " ".join(text.lower().replace(",", " , ").split()).rstrip(" .")
        first, events = [], []
        # "and" and "," never occur inside a clause, so both can separate clauses.
        for part in re.split(r" , | and ", text):
            m = _CLAUSE_RE.fullmatch(part.strip())
            scene = self.world.parse_caption(m["phrase"]) if m else None
            if scene is None or len(scene.shapes) != 1:
                return None
            shape = scene.shapes[0]
            if m["verb"] != "appears":
                first.append(shape)
            if m["distance"]:
                cells = next(n for n, words in _DISTANCES.items() if words == m["distance"])
                events.append(Event("moves", shape, m["direction"], cells))
            elif m["verb"]:
                events.append(Event(m["verb"], shape))
            elif m["colour"]:
                events.append(Event("changes colour", shape, colour=m["colour"]))
        return ClipDescription(Scene(tuple(first)), tuple(events))

    def question_answer(self, clip: Clip, rng: np.random.Generator) -> tuple[str, str, str]:
        """A random (question, answer, qtype) about what happens, answered uniquely by the clip."""
        by_action = {a: [e for e in clip.events if e.action == a] for a in ACTIONS}
        # Colours are unique within a frame, so "the red circle" names one shape of the first frame.
        name = {e: f"the {e.shape.colour} {e.shape.kind}" for e in clip.events}
        questions = {
            "direction": [(f"which way does {name[e]} move?", e.direction) for e in by_action["moves"]],
            "distance": [(f"how many cells does {name[e]} move?", NUMBERS[e.cells])
                         for e in by_action["moves"]],
            "new_colour": [(f"what colour does {name[e]} become?", e.colour)
                           for e in by_action["changes colour"]],
            "count": [("how many shapes are there at the start?", NUMBERS[len(clip.scenes[0].shapes)]),
                      ("how many shapes are there at the end?", NUMBERS[len(clip.scenes[-1].shapes)])],
        }
        for action in ("appears", "disappears"):  # only asked when a single shape does it
            if len(by_action[action]) == 1:
                questions[action] = [(f"what shape {action}?", by_action[action][0].shape.kind)]
        # Pick the question type first so that types with many variants don't dominate.
        qtypes = [q for q, options in questions.items() if options]
        qtype = qtypes[rng.integers(len(qtypes))]
        question, answer = questions[qtype][rng.integers(len(questions[qtype]))]
        return question, answer, qtype

    def all_words(self) -> list[str]:
        """Every word (and "," and "?") our captions and questions can use."""
        words = set(self.world.all_words())
        words.update({"moves", "move", "cell", "cells", "appears", "disappears", "becomes", "become",
                      "which", "way", "does", "how", "many", "start", "end", "what", "shape"})
        words.update(NUMBERS[:max(self.max_cells, self.world.max_shapes) + 1])
        return sorted(words)
