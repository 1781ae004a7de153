"""A rule-based judge that reads a shapes-world image back into a `Scene`.

Generated images are scored by parsing them with fixed rules rather than a learned classifier,
so the score means the same thing for every model and every run, and a clean render always
parses back to its own scene. The rules mirror how the world draws: palette colours on black,
one connected blob per shape, sizes and kinds from the world's own templates.
"""

from __future__ import annotations

import numpy as np

from nmm.data.shapes import COLOURS, KINDS, SIZES, Scene, Shape, ShapesWorld

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (6, 3)
# Hue is compared at full brightness, so dim or anti-aliased edges keep their colour.
_HUES = _PALETTE / _PALETTE.max(1, keepdims=True)
_COLOUR_NAMES = list(COLOURS)
ATTRIBUTES = ("kind", "colour", "size", "position")


class ShapesJudge:
    """Parses images of a `ShapesWorld` and scores them against target scenes."""

    def __init__(self, world: ShapesWorld, min_pixels: int = 8, min_iou: float = 0.6,
                 brightness: int = 120):
        self.world = world
        self.min_pixels = min_pixels  # smaller blobs are noise, not shapes
        self.min_iou = min_iou  # below this best template match the kind is "unknown"
        # Pixels whose brightest channel is below this are background. About half the palette's
        # brightness, so a blurred edge is split where a human would draw it.
        self.brightness = brightness

    def parse(self, image: np.ndarray) -> Scene:
        """The scene an image shows. Blobs that match no template get kind "unknown"."""
        size = self.world.image_size
        if not isinstance(image, np.ndarray):
            raise ValueError(f"expected a ({size}, {size}, 3) uint8 image, got a {type(image).__name__}")
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected a ({size}, {size}, 3) uint8 image, got {image.dtype} {image.shape}")
        # Colour index per pixel: 0 is background, 1..6 the nearest palette colour.
        pixels = image.reshape(-1, 3).astype(np.float32)
        peak = pixels.max(1)
        hues = pixels / np.maximum(peak, 1)[:, None]
        nearest = ((hues[:, None, :] - _HUES[None]) ** 2).sum(-1).argmin(1)
        classes = np.where(peak >= self.brightness, nearest + 1, 0).reshape(size, size)
        labels = _components(classes)
        shapes = []
        for label in np.unique(labels[labels >= 0]):
            ys, xs = np.nonzero(labels == label)
            if len(ys) < self.min_pixels:
                continue
            colour = _COLOUR_NAMES[classes[ys[0], xs[0]] - 1]
            mask = labels[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == label
            size_name = self._size(mask.shape)
            kind = self._kind(mask, size_name)
            shapes.append(Shape(kind, colour, size_name, self._cell(ys.mean(), xs.mean())))
        return Scene(tuple(shapes))

    def score(self, image: np.ndarray, target: Scene) -> dict:
        """exact/count booleans and per-attribute fractions of the target's shapes got right."""
        return compare_scenes(target, self.parse(image))

    def _size(self, box: tuple[int, int]) -> str:
        small, large = (self.world.size_px[s] for s in SIZES)
        return "large" if sum(box) / 2 > (small + large) / 2 else "small"

    def _kind(self, mask: np.ndarray, size_name: str) -> str:
        best_kind, best_iou = "unknown", self.min_iou
        for kind in KINDS:
            iou = _centred_iou(mask, self.world.render_shape_mask(kind, size_name))
            if iou >= best_iou:
                best_kind, best_iou = kind, iou
        return best_kind

    def _cell(self, y: float, x: float) -> int:
        # The 1 px gap after each cell belongs to it, so every pixel maps to some cell.
        pitch = self.world.cell_px + 1
        row, col = (int(np.clip((v - self.world.margin) // pitch, 0, 2)) for v in (y, x))
        return row * 3 + col


def _components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of same-class non-background pixels; -1 for background.

    Label propagation: every lit pixel starts with its own index and repeatedly takes the
    smallest label among same-class neighbours. Shapes are ~10 px wide, so this converges in a
    few dozen cheap whole-array steps.
    """
    h, w = classes.shape
    lit = classes > 0
    big = h * w
    labels = np.where(lit, np.arange(big).reshape(h, w), big)
    # Which neighbour pairs may exchange labels (same class, both lit).
    down = lit[:-1] & (classes[:-1] == classes[1:])
    right = lit[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    while True:
        new = labels.copy()
        np.minimum(new[:-1], np.where(down, labels[1:], big), out=new[:-1])
        np.minimum(new[1:], np.where(down, labels[:-1], big), out=new[1:])
        np.minimum(new[:, :-1], np.where(right, labels[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(right, labels[:, :-1], big), out=new[:, 1:])
        if np.array_equal(new, labels):
            return np.where(lit, labels, -1)
        labels = new


def _centred_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks placed with their boxes centred on each other."""
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    canvases = []
    for m in (a, b):
        c = np.zeros((h, w), dtype=bool)
        y, x = (h - m.shape[0]) // 2, (w - m.shape[1]) // 2
        c[y:y + m.shape[0], x:x + m.shape[1]] = m
        canvases.append(c)
    union = (canvases[0] | canvases[1]).sum()
    return float((canvases[0] & canvases[1]).sum() / union) if union else 0.0


def compare_scenes(target: Scene, predicted: Scene) -> dict:
    """Score a predicted scene (parsed from an image or a caption) against the target scene."""
    result = {"exact": predicted == target, "count": len(predicted.shapes) == len(target.shapes)}
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for t, p in _match(target.shapes, predicted.shapes):
        for name, ok in zip(ATTRIBUTES, _agreement(t, p)):
            totals[name] += ok
    n = max(len(target.shapes), 1)
    result.update({name: totals[name] / n for name in ATTRIBUTES})
    return result


def _agreement(t: Shape, p: Shape) -> tuple[bool, bool, bool, bool]:
    return (t.kind == p.kind, t.colour == p.colour, t.size == p.size, t.cell == p.cell)


def _match(targets, parsed) -> list[tuple[Shape, Shape]]:
    """Greedy one-to-one matching, most agreeing attributes first."""
    pairs = sorted(((sum(_agreement(t, p)), i, j) for i, t in enumerate(targets)
                    for j, p in enumerate(parsed)), key=lambda x: -x[0])
    used_t, used_p, matches = set(), set(), []
    for _, i, j in pairs:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            matches.append((targets[i], parsed[j]))
    return matches
