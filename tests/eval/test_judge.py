"""Tests for the rule-based shapes judge."""

import numpy as np
import pytest

from nmm.data.shapes import COLOURS, Scene, Shape, ShapesWorld
from nmm.eval.judge import ShapesJudge

WORLD = ShapesWorld()
JUDGE = ShapesJudge(WORLD)
ATTRIBUTES = ("kind", "colour", "size", "position")


def test_clean_renders_parse_exactly():
    scenes = WORLD.scenes(500, seed=20, split="any") + WORLD.scenes(500, seed=21, split="train")
    exact = np.mean([JUDGE.parse(WORLD.render(scene)) == scene for scene in scenes])
    assert exact >= 0.995, exact


def test_score_of_a_clean_render_is_perfect():
    scene = WORLD.scenes(1, seed=22)[0]
    result = JUDGE.score(WORLD.render(scene), scene)
    assert result == {"exact": True, "count": True, "kind": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0}


def test_blank_image_scores_zero():
    scene = WORLD.scenes(1, seed=23)[0]
    result = JUDGE.score(np.zeros((32, 32, 3), np.uint8), scene)
    assert result["exact"] is False and result["count"] is False
    assert all(result[a] == 0.0 for a in ATTRIBUTES)


def test_wrong_colour_is_caught():
    scene = Scene((Shape("circle", "red", "small", 0), Shape("square", "blue", "large", 4)))
    wrong = Scene((Shape("circle", "green", "small", 0), Shape("square", "blue", "large", 4)))
    result = JUDGE.score(WORLD.render(wrong), scene)
    assert result["exact"] is False and result["count"] is True
    assert result["colour"] == 0.5
    assert result["kind"] == result["size"] == result["position"] == 1.0


def test_extra_shape_breaks_count_but_not_attributes():
    scene = Scene((Shape("triangle", "yellow", "small", 2),))
    extra = Scene(scene.shapes + (Shape("cross", "cyan", "large", 6),))
    result = JUDGE.score(WORLD.render(extra), scene)
    assert result["exact"] is False and result["count"] is False
    assert all(result[a] == 1.0 for a in ATTRIBUTES)


def test_unrecognisable_blob_is_unknown_and_specks_are_ignored():
    image = np.zeros((32, 32, 3), np.uint8)
    image[5, 1:11] = COLOURS["red"]  # a thin line: lit, but no template fits
    image[20:22, 20:22] = COLOURS["blue"]  # 4 px: below the blob threshold
    (shape,) = JUDGE.parse(image).shapes
    assert shape.kind == "unknown" and shape.colour == "red" and shape.cell == 0


def test_robust_to_mild_noise():
    rng = np.random.default_rng(24)
    scenes = WORLD.scenes(200, seed=24, split="any")
    noisy = [np.clip(WORLD.render(s) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8) for s in scenes]
    assert np.mean([JUDGE.parse(x) == s for x, s in zip(noisy, scenes)]) >= 0.95


def test_random_images_do_not_crash():
    rng = np.random.default_rng(25)
    for _ in range(20):
        assert isinstance(JUDGE.parse(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), Scene)


@pytest.mark.parametrize("image", [
    np.zeros((64, 64, 3), np.uint8),
    np.zeros((32, 32), np.uint8),
    np.zeros((32, 32, 4), np.uint8),
    np.zeros((32, 32, 3), np.float32),
    [[0] * 3] * 32,
])
def test_rejects_images_of_the_wrong_shape_or_dtype(image):
    with pytest.raises(ValueError, match=r"\(32, 32, 3\) uint8"):
        JUDGE.parse(image)
