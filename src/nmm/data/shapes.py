"""The built-in "shapes world": a tiny synthetic multimodal domain with exact ground truth.

Every scene is a handful of coloured shapes on a 3x3 grid. Because we know exactly what is in
each image, we can generate unlimited captioning, question-answering, text-to-image and
image-editing data, and score a model's outputs exactly: captions with `parse_caption`, images
with the rule-based judge in `nmm.eval.judge`. A few (colour, kind) combinations are held out of
training so we can measure compositional generalisation ("blue circle" when it has only ever
seen blue things and circles separately).

Geometry at the default 32x32: three 10 px cells per row separated by 1 px black gaps
(3 * 10 + 2 = 32), so shapes in different cells never touch. Large shapes fill their cell (10 px);
small ones are 8 px with a random offset of 0-2 px inside it. Shapes are rendered with hard pixels
(no anti-aliasing), so the judge can recover a scene exactly from a clean render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

KINDS = ("circle", "square", "triangle", "cross")
# Saturated and bright enough to stand out on black, and far apart in RGB (min distance ~150).
COLOURS = {
    "red": (255, 50, 50),
    "green": (40, 220, 40),
    "blue": (40, 80, 255),
    "yellow": (255, 230, 40),
    "magenta": (240, 50, 240),
    "cyan": (40, 230, 230),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# (colour, kind) combinations that never appear in the "train" split.
DEFAULT_HELDOUT = (("yellow", "triangle"), ("blue", "circle"), ("magenta", "cross"), ("cyan", "square"))

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (d_row, d_col)
SPLITS = ("train", "heldout_combo", "any")
# What a vision encoder learns to tell in every grid cell; class 0 of each attribute is "empty"
# (most cells of a 1-3 shape scene hold nothing).
CELL_CLASSES = {"kind": ("empty", *KINDS), "colour": ("empty", *COLOURS), "size": ("empty", *SIZES)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row-major index into POSITIONS
    # Pixel offset inside the cell: varies the picture but not the meaning, so not compared.
    dx: int = field(default=0, compare=False)
    dy: int = field(default=0, compare=False)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def attributes(self) -> tuple[str, str, str, int]:
        return (self.kind, self.colour, self.size, self.cell)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def __post_init__(self):
        # A canonical order makes equal scenes compare equal and captions deterministic.
        ordered = tuple(sorted(self.shapes, key=lambda s: (s.cell, s.colour, s.kind, s.size)))
        object.__setattr__(self, "shapes", ordered)

    def attributes(self) -> list[tuple[str, str, str, int]]:
        return [s.attributes() for s in self.shapes]


def _phrase(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} at the {shape.position}"


def _name(shape: Shape) -> str:
    # Colours are unique within a scene, so "the red circle" always names exactly one shape.
    return f"the {shape.colour} {shape.kind}"


_PHRASE_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) "
    rf"at the ({'|'.join(POSITIONS)})"
)


class ShapesWorld:
    """Samples, renders, describes and edits scenes. Everything is deterministic given an rng."""

    def __init__(self, image_size: int = 32, min_shapes: int = 1, max_shapes: int = 3,
                 heldout=DEFAULT_HELDOUT):
        if not 1 <= min_shapes <= max_shapes <= 6:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 6, got {min_shapes}, {max_shapes}")
        for colour, kind in heldout:
            if colour not in COLOURS or kind not in KINDS:
                raise ValueError(f"unknown held-out combination ({colour!r}, {kind!r})")
        self.image_size = image_size
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.heldout = frozenset(tuple(h) for h in heldout)
        # Three cells per row with a 1 px black gap between them; any leftover pixels become margin.
        self.cell_px = (image_size - 2) // 3
        self.margin = (image_size - (3 * self.cell_px + 2)) // 2
        self.size_px = {"small": round(0.8 * self.cell_px), "large": self.cell_px}
        if self.size_px["small"] < 7:
            raise ValueError(f"image_size={image_size} is too small: small shapes need >= 7 px "
                             "to survive a patch tokenizer (use image_size >= 29)")
        self._masks = {(k, s): _template(k, self.size_px[s]) for k in KINDS for s in SIZES}
        for mask in self._masks.values():
            mask.flags.writeable = False  # shared with callers, so guard the cache
        self._train_kinds = {c: [k for k in KINDS if (c, k) not in self.heldout] for c in COLOURS}

    # ----- sampling -----

    def sample_scene(self, rng: np.random.Generator, split: str = "train") -> Scene:
        """One random scene. "train" avoids held-out combos, "heldout_combo" has at least one."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        cells = rng.permutation(9)[:n]
        if split == "train":
            usable = [c for c in COLOURS if self._train_kinds[c]]
            colours = [usable[i] for i in rng.permutation(len(usable))[:n]]
            kinds = [self._train_kinds[c][rng.integers(len(self._train_kinds[c]))] for c in colours]
        else:
            names = list(COLOURS)
            colours = [names[i] for i in rng.permutation(len(names))[:n]]
            kinds = [KINDS[i] for i in rng.integers(len(KINDS), size=n)]
            if split == "heldout_combo":
                if not self.heldout:
                    raise ValueError("split 'heldout_combo' needs at least one held-out combination")
                combos = sorted(self.heldout)
                colour, kind = combos[rng.integers(len(combos))]
                if colour in colours:  # keep colours distinct: the held-out shape takes its slot
                    colours.remove(colour)
                else:
                    colours.pop()
                colours.insert(0, colour)
                kinds[0] = kind
        shapes = []
        for kind, colour, cell in zip(kinds, colours, cells):
            size = SIZES[rng.integers(2)]
            slack = self.cell_px - self.size_px[size]
            dx, dy = (int(v) for v in rng.integers(0, slack + 1, size=2))
            shapes.append(Shape(kind, colour, size, int(cell), dx, dy))
        return Scene(tuple(shapes))

    def scenes(self, n: int, seed: int, split: str = "train") -> list[Scene]:
        rng = np.random.default_rng(seed)
        return [self.sample_scene(rng, split) for _ in range(n)]

    def has_heldout(self, scene: Scene) -> bool:
        return any((s.colour, s.kind) in self.heldout for s in scene.shapes)

    def is_train_scene(self, scene: Scene) -> bool:
        return not self.has_heldout(scene)

    def is_valid(self, scene: Scene) -> bool:
        """Distinct cells and colours, known attributes, shape count within bounds."""
        s = scene.shapes
        return (self.min_shapes <= len(s) <= self.max_shapes
                and len({x.cell for x in s}) == len(s) and len({x.colour for x in s}) == len(s)
                and all(x.kind in KINDS and x.colour in COLOURS and x.size in SIZES
                        and 0 <= x.cell < 9 for x in s))

    # ----- pixels -----

    def render_shape_mask(self, kind: str, size: str) -> np.ndarray:
        """The (px, px) boolean template of one shape; shared with the judge."""
        return self._masks[(kind, size)]

    def cell_origin(self, cell: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of a grid cell."""
        row, col = divmod(cell, 3)
        pitch = self.cell_px + 1
        return self.margin + row * pitch, self.margin + col * pitch

    def render(self, scene: Scene) -> np.ndarray:
        image = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        for s in scene.shapes:
            px = self.size_px[s.size]
            y, x = self.cell_origin(s.cell)
            y, x = y + s.dy, x + s.dx
            image[y:y + px, x:x + px][self._masks[(s.kind, s.size)]] = COLOURS[s.colour]
        return image

    # ----- per-cell labels (supervision for a vision encoder) -----

    n_cells = len(POSITIONS)
    cell_classes = CELL_CLASSES

    def cell_labels(self, scenes) -> np.ndarray:
        """scenes -> (N, 9, 3) int64: the class of the shape's kind, colour and size in every grid
        cell, as indices into `cell_classes` (0 = empty)."""
        labels = np.zeros((len(scenes), self.n_cells, len(CELL_CLASSES)), dtype=np.int64)
        for i, scene in enumerate(scenes):
            for s in scene.shapes:
                labels[i, s.cell] = [CELL_CLASSES[name].index(getattr(s, name)) for name in CELL_CLASSES]
        return labels

    # ----- text -----

    def caption(self, scene: Scene) -> str:
        """e.g. "a small red circle at the top left, a large blue square at the center and ..."."""
        phrases = [_phrase(s) for s in scene.shapes]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def parse_caption(self, text: str) -> Scene | None:
        """Inverse of `caption` (attributes only). Returns None, never raises, on anything else."""
        if not isinstance(text, str):
            return None
        text = " ".join(text.lower().replace(",", " , ").split()).rstrip(" .")
        # "and" and "," never occur inside a phrase, so both can separate shapes.
        parts = [p.strip() for p in re.split(r" , | and ", text)]
        shapes = []
        for part in parts:
            m = _PHRASE_RE.fullmatch(part)
            if m is None:
                return None
            size, colour, kind, position = m.groups()
            shapes.append(Shape(kind, colour, size, POSITIONS.index(position)))
        return Scene(tuple(shapes))

    def question_answer(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
        """A random (question, answer, qtype) whose answer the scene determines uniquely."""
        qtype = ("colour", "kind", "count", "position", "size")[rng.integers(5)]
        shape = scene.shapes[rng.integers(len(scene.shapes))]
        if qtype == "colour":
            same_kind = sum(s.kind == shape.kind for s in scene.shapes)
            ref = f"the {shape.kind}" if same_kind == 1 else f"the shape at the {shape.position}"
            return f"what colour is {ref}?", shape.colour, qtype
        if qtype == "kind":
            if rng.integers(2):
                return f"what shape is at the {shape.position}?", shape.kind, qtype
            return f"what shape is {shape.colour}?", shape.kind, qtype
        if qtype == "count":
            if rng.integers(2):
                return "how many shapes are there?", NUMBERS[len(scene.shapes)], qtype
            kind = KINDS[rng.integers(len(KINDS))]
            n = sum(s.kind == kind for s in scene.shapes)
            return f"how many {PLURALS[kind]} are there?", NUMBERS[n], qtype
        if qtype == "position":
            return f"where is {_name(shape)}?", shape.position, qtype
        return f"what size is {_name(shape)}?", shape.size, qtype

    def edit(self, scene: Scene, rng: np.random.Generator) -> tuple[str, Scene] | None:
        """A random (instruction, edited scene): move, recolour, resize or remove one shape.

        Offsets are kept where possible so the untouched parts of the picture stay identical.
        The result may contain held-out combinations; filter with `is_train_scene` if needed.
        """
        used_cells = {s.cell for s in scene.shapes}
        used_colours = {s.colour for s in scene.shapes}
        options = {"move": [], "recolour": [], "resize": [], "remove": []}  # op -> [(text, old, new)]
        for s in scene.shapes:
            row, col = divmod(s.cell, 3)
            for word, (dr, dc) in MOVES.items():
                r, c = row + dr, col + dc
                if 0 <= r < 3 and 0 <= c < 3 and r * 3 + c not in used_cells:
                    new = Shape(s.kind, s.colour, s.size, r * 3 + c, s.dx, s.dy)
                    options["move"].append((f"move {_name(s)} {word}", s, new))
            for colour in COLOURS:
                if colour not in used_colours:
                    new = Shape(s.kind, colour, s.size, s.cell, s.dx, s.dy)
                    options["recolour"].append((f"make {_name(s)} {colour}", s, new))
            size = "large" if s.size == "small" else "small"
            centred = (self.cell_px - self.size_px[size]) // 2  # a resized shape sits mid-cell
            new = Shape(s.kind, s.colour, size, s.cell, centred, centred)
            options["resize"].append((f"make {_name(s)} {size}", s, new))
            if len(scene.shapes) > self.min_shapes:
                options["remove"].append((f"remove {_name(s)}", s, None))
        # Pick the operation first so that ops with many variants (recolour) don't dominate.
        ops = [op for op, choices in options.items() if choices]
        if not ops:
            return None
        choices = options[ops[rng.integers(len(ops))]]
        instruction, old, new = choices[rng.integers(len(choices))]
        shapes = [s for s in scene.shapes if s is not old] + ([new] if new is not None else [])
        return instruction, Scene(tuple(shapes))

    def all_words(self) -> list[str]:
        """Every word (and the punctuation "," and "?") our captions, QA and edits can use."""
        words = {"a", "at", "the", "and", "what", "colour", "is", "shape", "how", "many", "shapes",
                 "are", "there", "where", "size", "move", "make", "remove", ",", "?"}
        words.update(SIZES, COLOURS, KINDS, PLURALS.values(), MOVES, NUMBERS[:self.max_shapes + 1])
        for position in POSITIONS:
            words.update(position.split())
        return sorted(words)


def _template(kind: str, px: int) -> np.ndarray:
    """Hard-edged (px, px) mask of one kind, filling its bounding box exactly."""
    # Pixel-centre coordinates relative to the box centre, in pixels.
    c = np.arange(px) + 0.5 - px / 2
    v, u = np.meshgrid(c, c, indexing="ij")
    eps = 1e-6  # include pixels exactly on the boundary
    if kind == "circle":
        return u * u + v * v <= (px / 2) ** 2 + eps
    if kind == "square":
        return np.ones((px, px), dtype=bool)
    if kind == "triangle":  # apex at the top, widening by one pixel per side every two rows
        return np.abs(u) <= (np.arange(px)[:, None] + 1) / 2 + eps
    if kind == "cross":
        # Arms about a third of the size, with the size's parity so the plus is symmetric.
        same_parity = range(2 - px % 2, px, 2)
        thick = min(same_parity, key=lambda t: abs(t - px / 3))
        return (np.abs(u) <= thick / 2 + eps) | (np.abs(v) <= thick / 2 + eps)
    raise ValueError(f"unknown kind {kind!r}")
