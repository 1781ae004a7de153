"""Evaluation scenes of the shapes world, shared by the shapes tasks.

Two splits: `heldout` draws fresh scenes from the training distribution (a seed far from the
training pool's), `heldout_combo` draws scenes that contain at least one colour/kind combination
that never appeared in training. Scenes depend only on (eval.seed, split, n), never on the model.
"""

from __future__ import annotations

import numpy as np

from nmm.data.shapes import Scene, ShapesWorld

SPLITS = {"heldout": "train", "heldout_combo": "heldout_combo"}  # our split name -> world split
SCENE_SEED = 10_000  # training pools use data.seed (+1); evaluation seeds start here


def eval_scenes(world: ShapesWorld, n: int, seed: int, split: str) -> list[Scene]:
    return world.scenes(n, SCENE_SEED + seed, SPLITS[split])


def shape_counts(world: ShapesWorld) -> list[int]:
    return list(range(world.min_shapes, world.max_shapes + 1))


def with_count(world: ShapesWorld, k: int) -> ShapesWorld:
    """The same world restricted to scenes of exactly k shapes."""
    return ShapesWorld(world.image_size, k, k, heldout=sorted(world.heldout))


def stratified_scenes(world: ShapesWorld, n: int, seed: int, split: str) -> list[Scene]:
    """n scenes whose shape counts cycle through min..max shapes, so each count is equally common.

    Per-count categories (single object, two objects) then get a predictable share of the items
    instead of whatever a random draw gives.
    """
    counts = shape_counts(world)
    per = -(-n // len(counts))  # ceil
    pools = {k: with_count(world, k).scenes(per, SCENE_SEED + seed + 1_000 * k, SPLITS[split]) for k in counts}
    return [pools[counts[i % len(counts)]][i // len(counts)] for i in range(n)]


def render(world: ShapesWorld, scenes: list[Scene]) -> np.ndarray:
    """(N, H, W, 3) uint8."""
    size = world.image_size
    if not scenes:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([world.render(s) for s in scenes])


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N, H, W, 3) x2 -> (N, H, 2W + gap, 3) with a grey gap, for before/after pictures."""
    sep = np.full((*left.shape[:2], gap, 3), 128, np.uint8)
    return np.concatenate([left, sep, right], axis=2)


def confusion_by_cell(targets: list[Scene], predicted: list[Scene | None], attribute: str,
                      labels: tuple[str, ...]) -> dict:
    """Counts of (true value, predicted value) over true shapes, pairing shapes by grid cell.

    Pairing by cell (not by best match) keeps the matrix honest: naming the right kind at the
    wrong position counts as "none" here and shows up in position accuracy instead. Predicted
    values outside `labels` (the judge's "unknown" kind) get an "other" column.
    """
    pairs = []
    for target, pred in zip(targets, predicted):
        at_cell = {s.cell: s for s in (pred.shapes if pred is not None else ())}
        for shape in target.shapes:
            guess = at_cell.get(shape.cell)
            value = getattr(guess, attribute) if guess is not None else "none"
            pairs.append((getattr(shape, attribute), value if value in labels or value == "none" else "other"))
    columns = list(labels) + (["other"] if any(v == "other" for _, v in pairs) else []) + ["none"]
    matrix = np.zeros((len(labels), len(columns)), dtype=int)
    for truth, value in pairs:
        matrix[labels.index(truth), columns.index(value)] += 1
    return {"labels": list(labels), "predicted_labels": columns, "matrix": matrix.tolist()}
