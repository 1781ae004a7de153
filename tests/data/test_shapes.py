"""Tests for the shapes world: sampling, rendering, captions, QA and edits."""

import re
import time

import numpy as np
import pytest

from nmm.data.shapes import (COLOURS, DEFAULT_HELDOUT, KINDS, POSITIONS, SIZES, Scene, Shape,
                             ShapesWorld)

WORLD = ShapesWorld()
NUMBERS = ("zero", "one", "two", "three")
PLURAL_TO_KIND = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def _words(text: str) -> list[str]:
    return text.replace(",", " , ").replace("?", " ? ").split()


def test_scenes_are_deterministic_by_seed():
    a, b = WORLD.scenes(50, seed=1), WORLD.scenes(50, seed=1)
    assert a == b
    assert [(s.dx, s.dy) for sc in a for s in sc.shapes] == [(s.dx, s.dy) for sc in b for s in sc.shapes]
    assert a != WORLD.scenes(50, seed=2)


@pytest.mark.parametrize("split", ["train", "heldout_combo", "any"])
def test_scenes_are_valid(split):
    counts = set()
    for scene in WORLD.scenes(1000, seed=3, split=split):
        assert WORLD.is_valid(scene)
        assert [s.cell for s in scene.shapes] == sorted(s.cell for s in scene.shapes)
        counts.add(len(scene.shapes))
    assert counts == {1, 2, 3}


def test_splits_respect_heldout_combinations():
    heldout = set(DEFAULT_HELDOUT)
    train = WORLD.scenes(2000, seed=4, split="train")
    assert not any((s.colour, s.kind) in heldout for sc in train for s in sc.shapes)
    assert all(WORLD.is_train_scene(sc) for sc in train)
    combos = WORLD.scenes(1000, seed=4, split="heldout_combo")
    assert all(WORLD.has_heldout(sc) for sc in combos)
    seen = {(s.colour, s.kind) for sc in combos for s in sc.shapes}
    assert heldout <= seen  # every held-out combination actually gets tested
    with pytest.raises(ValueError):
        WORLD.sample_scene(np.random.default_rng(0), split="val")


def test_templates_fill_their_box_and_stay_distinguishable():
    small, large = WORLD.size_px["small"], WORLD.size_px["large"]
    assert 7 <= small < large
    for size in SIZES:
        masks = {k: WORLD.render_shape_mask(k, size) for k in KINDS}
        for kind, m in masks.items():
            assert m.shape == (WORLD.size_px[size],) * 2
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), kind
            assert (m == m[:, ::-1]).all(), f"{kind} should be left-right symmetric"
        for i, a in enumerate(KINDS):
            for b in KINDS[i + 1:]:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (size, a, b, iou)


def test_render_draws_every_shape_inside_its_cell_with_black_gaps():
    gaps = [WORLD.margin + i * (WORLD.cell_px + 1) - 1 for i in (1, 2)]
    for scene in WORLD.scenes(300, seed=5, split="any"):
        image = WORLD.render(scene)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert not image[gaps].any() and not image[:, gaps].any()
        for shape in scene.shapes:
            y, x = WORLD.cell_origin(shape.cell)
            cell = image[y:y + WORLD.cell_px, x:x + WORLD.cell_px]
            lit = (cell == COLOURS[shape.colour]).all(-1)
            assert lit.sum() == WORLD.render_shape_mask(shape.kind, shape.size).sum()
        # Nothing is drawn except the shapes themselves.
        total = sum(WORLD.render_shape_mask(s.kind, s.size).sum() for s in scene.shapes)
        assert image.any(-1).sum() == total


def test_other_image_sizes():
    big = ShapesWorld(image_size=64)
    scene = big.scenes(1, seed=0)[0]
    assert big.render(scene).shape == (64, 64, 3)
    with pytest.raises(ValueError):
        ShapesWorld(image_size=24)


def test_generation_is_fast():
    start = time.perf_counter()
    for scene in WORLD.scenes(2000, seed=6):
        WORLD.render(scene)
    assert time.perf_counter() - start < 5.0  # ~0.1 s on a laptop; generous for shared CI


def test_caption_round_trip():
    for scene in WORLD.scenes(500, seed=7, split="any"):
        text = WORLD.caption(scene)
        assert text == text.lower() and "  " not in text
        assert WORLD.parse_caption(text) == scene
        messy = "  " + text.upper().replace(" ", "   ") + ". "
        assert WORLD.parse_caption(messy) == scene


def test_caption_wording():
    scene = Scene((Shape("square", "blue", "large", 4), Shape("circle", "red", "small", 0)))
    assert WORLD.caption(scene) == "a small red circle at the top left and a large blue square at the center"
    scene = Scene(scene.shapes + (Shape("cross", "green", "small", 8),))
    assert WORLD.caption(scene) == ("a small red circle at the top left, a large blue square at the center "
                                    "and a small green cross at the bottom right")


@pytest.mark.parametrize("text", [
    "", "   ", ".", "a", "hello world", "a small red circle", "a small red circle at the middle",
    "a tiny red circle at the top", "a small red circle at the top and", "and a small red circle at the top",
    "a small red circle at the top,, a large blue square at the left", "a small purple circle at the top",
    None, 42, b"a small red circle at the top",
])
def test_parse_caption_rejects_garbage(text):
    assert WORLD.parse_caption(text) is None


def test_parse_caption_never_raises_on_random_word_soup():
    rng = np.random.default_rng(8)
    words = WORLD.all_words() + [".", "and", "at", "the"]
    for _ in range(500):
        text = " ".join(rng.choice(words, size=rng.integers(1, 30)))
        result = WORLD.parse_caption(text)
        assert result is None or isinstance(result, Scene)


def _resolve(scene: Scene, ref: str) -> list[Shape]:
    """Shapes a referring phrase like "the red circle" or "the shape at the top" can mean."""
    m = re.fullmatch(r"the shape at the (.+)", ref)
    if m:
        return [s for s in scene.shapes if s.position == m.group(1)]
    words = ref.split()[1:]
    return [s for s in scene.shapes if all(w in (s.colour, s.kind, s.size) for w in words)]


def _answer(scene: Scene, question: str) -> str:
    """An independent answerer; asserts that the question picks out exactly one shape."""
    q = question.rstrip("?")
    if m := re.fullmatch(r"how many (\w+) are there", q):
        if m.group(1) == "shapes":
            return NUMBERS[len(scene.shapes)]
        kind = PLURAL_TO_KIND[m.group(1)]
        return NUMBERS[sum(s.kind == kind for s in scene.shapes)]
    if m := re.fullmatch(r"what shape is at the (.+)", q):
        (shape,) = [s for s in scene.shapes if s.position == m.group(1)]
        return shape.kind
    if m := re.fullmatch(r"what shape is (\w+)", q):
        (shape,) = [s for s in scene.shapes if s.colour == m.group(1)]
        return shape.kind
    m = re.fullmatch(r"(what colour is|where is|what size is) (.+)", q)
    assert m, question
    (shape,) = _resolve(scene, m.group(2))
    return {"what colour is": shape.colour, "where is": shape.position, "what size is": shape.size}[m.group(1)]


def test_questions_are_unambiguous_and_answers_correct():
    rng = np.random.default_rng(9)
    qtypes = set()
    for scene in WORLD.scenes(500, seed=9, split="any"):
        for _ in range(4):
            question, answer, qtype = WORLD.question_answer(scene, rng)
            assert question.endswith("?") and question == question.lower()
            assert _answer(scene, question) == answer, (WORLD.caption(scene), question, answer)
            qtypes.add(qtype)
    assert qtypes == {"colour", "kind", "count", "position", "size"}


def test_edits_are_valid_and_do_what_they_say():
    rng = np.random.default_rng(10)
    ops = set()
    for scene in WORLD.scenes(500, seed=10, split="any"):
        instruction, edited = WORLD.edit(scene, rng)
        assert WORLD.is_valid(edited)
        verb, ref, arg = re.fullmatch(r"(move|make|remove) (the \w+ \w+) ?(\w*)", instruction).groups()
        (old,) = _resolve(scene, ref)
        rest = [s for s in scene.shapes if s is not old]
        if verb == "remove":
            expected = rest
        elif verb == "move":
            row, col = divmod(old.cell, 3)
            dr, dc = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[arg]
            expected = rest + [Shape(old.kind, old.colour, old.size, (row + dr) * 3 + col + dc)]
        elif arg in SIZES:
            assert arg != old.size
            expected = rest + [Shape(old.kind, old.colour, arg, old.cell)]
            verb = "resize"
        else:
            assert arg in COLOURS and arg != old.colour
            expected = rest + [Shape(old.kind, arg, old.size, old.cell)]
            verb = "recolour"
        assert edited == Scene(tuple(expected)), (WORLD.caption(scene), instruction)
        WORLD.render(edited)  # offsets must still fit the cell
        ops.add(verb)
    assert ops == {"move", "remove", "resize", "recolour"}


def test_all_words_covers_every_text():
    vocab = set(WORLD.all_words())
    rng = np.random.default_rng(11)
    for scene in WORLD.scenes(300, seed=11, split="any"):
        texts = [WORLD.caption(scene), *WORLD.question_answer(scene, rng)[:2], WORLD.edit(scene, rng)[0]]
        for text in texts:
            assert set(_words(text)) <= vocab, text
    assert set(POSITIONS[0].split()) <= vocab
