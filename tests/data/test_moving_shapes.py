"""Tests for the moving shapes world: sampling, invariants, rendering, captions, splits and QA."""

import re
from collections import Counter

import numpy as np
import pytest

from nmm.data.moving_shapes import (ACTIONS, DEFAULT_HELDOUT_MOTIONS, Clip, ClipDescription, Event,
                                    MovingShapesWorld)
from nmm.data.shapes import DEFAULT_HELDOUT, MOVES, Scene, Shape, ShapesWorld

WORLD = MovingShapesWorld()
NUMBERS = ("zero", "one", "two", "three")


def _words(text: str) -> list[str]:
    return text.replace(",", " , ").replace("?", " ? ").split()


def _offsets(clips) -> list:
    return [(s.dx, s.dy) for c in clips for sc in c.scenes for s in sc.shapes]


def test_clips_are_deterministic_by_seed():
    a, b = WORLD.clips(50, seed=1, split="any"), WORLD.clips(50, seed=1, split="any")
    assert a == b and _offsets(a) == _offsets(b)
    assert [[e.frames for e in c.events] for c in a] == [[e.frames for e in c.events] for c in b]
    assert a != WORLD.clips(50, seed=2, split="any")


@pytest.mark.parametrize("split", ["train", "heldout_combo", "any"])
def test_every_frame_is_a_valid_scene_and_shapes_never_collide(split):
    actions, cells, n_events = Counter(), Counter(), Counter()
    for clip in WORLD.clips(300, seed=3, split=split):
        assert WORLD.is_valid(clip) and len(clip.scenes) == 8
        for scene in clip.scenes:
            assert WORLD.world.is_valid(scene)
            assert len({s.cell for s in scene.shapes}) == len({s.colour for s in scene.shapes}) == len(scene.shapes)
        for before, after in zip(clip.scenes, clip.scenes[1:]):
            # A shape only ever enters a cell that nothing occupied the frame before.
            entered = {s.cell for s in after.shapes} - {s.cell for s in before.shapes}
            assert not entered & {s.cell for s in before.shapes}
        first, last = clip.scenes[0], clip.scenes[-1]
        for e in clip.events:
            assert e.action in ACTIONS and 1 <= min(e.frames) and max(e.frames) <= 7  # first frame is "before"
            assert (e.shape in first.shapes) == (e.action != "appears")
            final = e.state(7)  # every event has finished by the last frame
            assert final is None or final in last.shapes
            if e.action == "moves":
                assert 1 <= e.cells == len(e.frames) <= 2 and e.colour is None
                gaps = set(np.diff(e.frames))
                assert len(gaps) <= 1 and gaps <= {1, 2, 3}  # one cell every k frames
                row, col = divmod(e.shape.cell, 3)
                dr, dc = MOVES[e.direction]
                assert e.state(7).cell == (row + e.cells * dr) * 3 + col + e.cells * dc
                cells[e.cells] += 1
            else:
                assert len(e.frames) == 1 and e.direction is None
            if e.action == "changes colour":
                assert e.colour != e.shape.colour and e.state(7).colour == e.colour
            if e.action == "disappears":
                assert e.state(7) is None and e.shape not in last.shapes
            actions[e.action] += 1
        n_events[len(clip.events)] += 1
        # Shapes without an event stay put, unchanged, in every frame.
        still = [s for s in first.shapes if s not in {e.shape for e in clip.events}]
        assert all(s in scene.shapes for s in still for scene in clip.scenes)
    assert set(actions) == set(ACTIONS) and set(n_events) == {1, 2} and set(cells) == {1, 2}


def test_render_stacks_the_frames():
    for clip in WORLD.clips(20, seed=4, split="any"):
        video = WORLD.render(clip)
        assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
        assert all((frame == WORLD.world.render(scene)).all() for frame, scene in zip(video, clip.scenes))
        assert not (video[0] == video[-1]).all()  # something visibly happens


def test_caption_round_trip():
    for clip in WORLD.clips(500, seed=5, split="any"):
        text = WORLD.caption(clip)
        assert text == text.lower() and "  " not in text
        assert WORLD.parse_caption(text) == clip.description()
        messy = "  " + text.upper().replace(" ", "   ") + ". "
        assert WORLD.parse_caption(messy) == clip.description()
        assert WORLD.caption(clip.description()) == text


def _clip(first: Scene, events) -> Clip:
    """A clip built by hand from its first scene and timed events."""
    subjects = {e.shape: e for e in events if e.action != "appears"}
    scenes = []
    for f in range(8):
        shapes = [subjects[s].state(f) if s in subjects else s for s in first.shapes]
        shapes += [e.state(f) for e in events if e.action == "appears"]
        scenes.append(Scene(tuple(s for s in shapes if s is not None)))
    return Clip(tuple(scenes), tuple(events))


def test_caption_wording():
    square = Shape("square", "blue", "large", 3)
    circle = Shape("circle", "red", "small", 1)
    clip = _clip(Scene((square,)), [Event("moves", square, "right", 1, frames=(3,)),
                                    Event("appears", circle, frames=(5,))])
    assert WORLD.caption(clip) == ("a large blue square at the left moves one cell right "
                                   "and a small red circle at the top appears")
    cross = Shape("cross", "green", "small", 8)
    clip = _clip(Scene((square, cross)), [Event("changes colour", square, colour="yellow", frames=(2,)),
                                          Event("moves", cross, "up", 2, frames=(2, 5))])
    assert WORLD.caption(clip) == ("a large blue square at the left becomes yellow "
                                   "and a small green cross at the bottom right moves two cells up")
    assert clip.scenes[-1] == Scene((Shape("square", "yellow", "large", 3), Shape("cross", "green", "small", 2)))


@pytest.mark.parametrize("text", [
    "", "   ", ".", "appears", "a small red circle appears", "a small red circle at the top moves",
    "a small red circle at the top moves right", "a small red circle at the top moves one cells right",
    "a small red circle at the top moves three cells right", "a small red circle at the top becomes",
    "a small red circle at the top becomes purple", "a small red circle at the top appears disappears",
    "a small red circle at the top and", "and a small red circle at the top appears",
    None, 42, b"a small red circle at the top appears",
])
def test_parse_caption_rejects_garbage(text):
    assert WORLD.parse_caption(text) is None


def test_parse_caption_never_raises_on_random_word_soup():
    rng = np.random.default_rng(6)
    words = WORLD.all_words() + [".", "and", "at", "the", "moves", "one", "cell"]
    for _ in range(500):
        text = " ".join(rng.choice(words, size=rng.integers(1, 30)))
        assert isinstance(WORLD.parse_caption(text), (ClipDescription, type(None)))


def test_splits_respect_heldout_combinations():
    motions, combos = set(DEFAULT_HELDOUT_MOTIONS), set(DEFAULT_HELDOUT)
    for clip in WORLD.clips(1000, seed=7, split="train"):
        assert not any((e.shape.kind, e.direction) in motions for e in clip.events if e.action == "moves")
        assert not any((s.colour, s.kind) in combos for scene in clip.scenes for s in scene.shapes)
        assert WORLD.is_train_clip(clip)
    heldout = WORLD.clips(300, seed=7, split="heldout_combo")
    assert all(WORLD.has_heldout_motion(c) and not WORLD.is_train_clip(c) for c in heldout)
    seen = {(e.shape.kind, e.direction) for c in heldout for e in c.events if e.action == "moves"}
    assert motions <= seen  # every held-out motion actually gets tested
    anything = WORLD.clips(300, seed=7, split="any")
    assert any(WORLD.has_heldout_motion(c) for c in anything) and any(map(WORLD.is_train_clip, anything))
    with pytest.raises(ValueError):
        WORLD.sample_clip(np.random.default_rng(0), split="val")
    with pytest.raises(ValueError):
        MovingShapesWorld(heldout_motions=[("triangle", "sideways")])
    with pytest.raises(ValueError):
        MovingShapesWorld(heldout_motions=()).sample_clip(np.random.default_rng(0), "heldout_combo")


def _answer(clip: Clip, question: str) -> str:
    """An independent answerer that looks only at the first and last frames."""
    first, last = clip.scenes[0].shapes, clip.scenes[-1].shapes
    q = question.rstrip("?")
    if m := re.fullmatch(r"how many shapes are there at the (start|end)", q):
        return NUMBERS[len(first if m.group(1) == "start" else last)]
    if m := re.fullmatch(r"what shape (appears|disappears)", q):
        before, after = (first, last) if m.group(1) == "disappears" else (last, first)
        # Appearing and disappearing shapes have a cell and colour no other shape ever uses.
        (shape,) = [s for s in before if s.cell not in {t.cell for t in after}
                    and s.colour not in {t.colour for t in after}]
        return shape.kind
    m = re.fullmatch(r"(which way|how many cells|what colour) does the (\w+) (\w+) (move|become)", q)
    assert m, question
    (old,) = [s for s in first if (s.colour, s.kind) == m.group(2, 3)]
    if m.group(1) == "what colour":
        (new,) = [s for s in last if (s.kind, s.cell) == (old.kind, old.cell)]
        return new.colour
    (new,) = [s for s in last if (s.colour, s.kind) == (old.colour, old.kind)]
    (r0, c0), (r1, c1) = divmod(old.cell, 3), divmod(new.cell, 3)
    if m.group(1) == "how many cells":
        return NUMBERS[abs(r1 - r0) + abs(c1 - c0)]
    (word,) = [w for w, (dr, dc) in MOVES.items() if (r1 - r0, c1 - c0) in {(dr, dc), (2 * dr, 2 * dc)}]
    return word


def test_questions_are_answered_by_the_clip():
    rng, qtypes = np.random.default_rng(8), Counter()
    clips = WORLD.clips(400, seed=8, split="any")
    for clip in clips:
        for _ in range(3):
            question, answer, qtype = WORLD.question_answer(clip, rng)
            assert question.endswith("?") and question == question.lower()
            assert _answer(clip, question) == answer, (WORLD.caption(clip), question, answer)
            qtypes[qtype] += 1
    assert set(qtypes) == {"direction", "distance", "new_colour", "appears", "disappears", "count"}
    again = [WORLD.question_answer(c, np.random.default_rng(9)) for c in clips[:50]]
    assert again == [WORLD.question_answer(c, np.random.default_rng(9)) for c in clips[:50]]


def test_all_words_cover_captions_and_questions():
    vocab, used = set(WORLD.all_words()), set()
    rng = np.random.default_rng(10)
    for clip in WORLD.clips(300, seed=10, split="any"):
        used.update(_words(WORLD.caption(clip)))
        for _ in range(3):
            question, answer, _ = WORLD.question_answer(clip, rng)
            used.update(_words(question) + [answer])
    assert used <= vocab, used - vocab
    assert {"moves", "appears", "disappears", "becomes", "cells"} <= used


def test_other_clip_lengths_and_worlds():
    short = MovingShapesWorld(frames=2)
    for clip in short.clips(100, seed=11, split="any"):
        assert short.is_valid(clip) and all(e.frames == (1,) for e in clip.events)
    big = MovingShapesWorld(ShapesWorld(image_size=64, max_shapes=2), frames=12)
    clip = big.clips(1, seed=12)[0]
    assert big.render(clip).shape == (12, 64, 64, 3)
    assert all(big.is_valid(c) and max(len(sc.shapes) for sc in c.scenes) <= 2
               for c in big.clips(100, seed=12, split="any"))
    with pytest.raises(ValueError):
        MovingShapesWorld(frames=1)
