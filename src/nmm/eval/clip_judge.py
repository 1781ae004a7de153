"""A rule-based judge that reads a moving-shapes video back into a `Clip`.

Each frame is parsed by the still-image `ShapesJudge`; the events are then inferred by following
shapes from frame to frame. Between two frames a shape that kept its colour, kind and size but
sits one cell over has stepped; one that kept its kind, size and cell but not its colour has
changed colour; any other shape that vanished disappeared and any new one appeared. Consecutive
steps of one shape in one direction make one move. The moving shapes world gives every shape
cells and a colour of its own, so on its clips these rules are never ambiguous and a clean render
parses back to its own clip exactly, timing included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from nmm.data.moving_shapes import Clip, Event, MovingShapesWorld, move_path
from nmm.data.shapes import MOVES, Scene, Shape
from nmm.eval.judge import ATTRIBUTES, ShapesJudge, compare_scenes


class ClipJudge:
    """Parses rendered clips of a `MovingShapesWorld` and scores them against target clips."""

    def __init__(self, moving_world: MovingShapesWorld, **judge_options):
        self.moving_world = moving_world
        self.frame_judge = ShapesJudge(moving_world.world, **judge_options)

    def parse(self, frames: np.ndarray) -> Clip:
        """The clip a video shows: the scene of every frame and the events inferred between them."""
        self._check(frames)
        scenes = tuple(self.frame_judge.parse(frame) for frame in frames)
        return Clip(scenes, infer_events(scenes))

    def score(self, frames: np.ndarray, target: Clip) -> dict:
        """How well a video shows the target clip.

        exact: the first frame and every event (what, to which shape, where to) are right, and
        there are no extra events; this is what the target's caption says, so timing is free.
        first_frame: the first frame parses to the target's first scene.
        frames: per-frame attribute accuracy (ShapesJudge's kind/colour/size/position), averaged.
        events: target events shown, over the larger of the target's and the video's event count,
        so spurious events cost as much as missing ones.
        timing: fraction of target events shown at exactly the target's frames.
        """
        parsed = self.parse(frames)
        shown = sum((Counter(target.events) & Counter(parsed.events)).values())
        on_time = sum(any(p == t and p.frames == t.frames for p in parsed.events) for t in target.events)
        per_frame = [compare_scenes(t, p) for t, p in zip(target.scenes, parsed.scenes)]
        return {
            "exact": parsed.description() == target.description(),
            "first_frame": parsed.scenes[0] == target.scenes[0],
            "frames": float(np.mean([[r[a] for a in ATTRIBUTES] for r in per_frame])),
            "events": shown / max(len(target.events), len(parsed.events), 1),
            "timing": on_time / max(len(target.events), 1),
        }

    def _check(self, frames) -> None:
        n, size = self.moving_world.frames, self.moving_world.world.image_size
        expected = f"expected a ({n}, {size}, {size}, 3) uint8 clip (frames, height, width, RGB)"
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"{expected}, got a {type(frames).__name__}")
        if frames.shape != (n, size, size, 3) or frames.dtype != np.uint8:
            raise ValueError(f"{expected}, got {frames.dtype} {frames.shape}")


def infer_events(scenes) -> tuple[Event, ...]:
    """The events that turn each scene into the next, with the frames at which they show."""
    events: list[Event] = []
    moving: dict[Shape, int] = {}  # where a moving shape is now -> index of its move in `events`
    for frame in range(1, len(scenes)):
        for change in _changes(scenes[frame - 1], scenes[frame]):
            action, before, after, detail = change
            if action != "step":
                event = Event(action, before or after, colour=detail)
                events.append(replace(event, frames=(frame,)))
                continue
            i = moving.pop(before, None)
            if i is not None and events[i].direction == detail:  # the same move, one more cell
                move = events[i]
                events[i] = replace(move, cells=move.cells + 1, frames=move.frames + (frame,))
            else:
                i = len(events)
                events.append(Event("moves", before, detail, 1, frames=(frame,)))
            moving[after] = i
    return tuple(events)


def _changes(before: Scene, after: Scene) -> list[tuple[str, Shape | None, Shape | None, str | None]]:
    """(action, shape before, shape after, direction or new colour) for every shape that changed
    between two consecutive frames; action is "step", "changes colour", "disappears" or "appears"."""
    gone = [s for s in before.shapes if s not in after.shapes]
    new = [s for s in after.shapes if s not in before.shapes]
    changes = []
    for old in gone:
        step = next(((n, d) for n in new for d in MOVES if (n.kind, n.colour, n.size)
                     == (old.kind, old.colour, old.size) and move_path(old.cell, d, 1) == [n.cell]), None)
        if step:
            new.remove(step[0])
            changes.append(("step", old, step[0], step[1]))
            continue
        recoloured = next((n for n in new if (n.kind, n.size, n.cell) == (old.kind, old.size, old.cell)), None)
        if recoloured:
            new.remove(recoloured)
            changes.append(("changes colour", old, recoloured, recoloured.colour))
        else:
            changes.append(("disappears", old, None, None))
    changes += [("appears", None, n, None) for n in new]
    return changes
