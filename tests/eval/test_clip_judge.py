"""Tests for the clip judge: clean renders parse back exactly, corrupted videos do not score exact."""

import numpy as np
import pytest

from nmm.data.moving_shapes import Clip, Event, MovingShapesWorld
from nmm.data.shapes import Scene, Shape
from nmm.eval.clip_judge import ClipJudge, infer_events

WORLD = MovingShapesWorld()
JUDGE = ClipJudge(WORLD)
PERFECT = {"exact": True, "first_frame": True, "frames": 1.0, "events": 1.0, "timing": 1.0}
CLIPS = WORLD.clips(80, seed=20, split="train") + WORLD.clips(80, seed=21, split="heldout_combo") \
    + WORLD.clips(80, seed=22, split="any")


def _timing(clip: Clip) -> list[tuple[int, ...]]:
    return [e.frames for e in clip.events]


def test_clean_renders_parse_back_to_their_clip_exactly():
    for clip in CLIPS:
        parsed = JUDGE.parse(WORLD.render(clip))
        assert parsed == clip, WORLD.caption(clip)
        assert _timing(parsed) == _timing(clip)  # frames are not compared by ==, so check them too


def test_score_of_a_clean_render_is_perfect():
    for clip in CLIPS[::20]:
        assert JUDGE.score(WORLD.render(clip), clip) == PERFECT


def _shuffled(video: np.ndarray, rng) -> np.ndarray:
    """The frames in another order that shows something else (not merely equal frames swapped)."""
    while True:
        out = video[rng.permutation(len(video))]
        if not (out == video).all():
            return out


@pytest.mark.parametrize("corruption", ["reversed", "rolled", "shuffled", "blank_frame", "other_clip"])
def test_corrupted_clips_do_not_score_exact(corruption):
    rng = np.random.default_rng(23)
    for i, clip in enumerate(CLIPS[::4]):
        video = WORLD.render(clip)
        if corruption == "reversed":  # motion runs backwards, appearing shapes disappear
            video = video[::-1]
        elif corruption == "rolled":
            video = np.roll(video, len(video) // 2, axis=0)
        elif corruption == "shuffled":
            video = _shuffled(video, rng)
        elif corruption == "blank_frame":
            video = video.copy()
            video[rng.integers(len(video))] = 0
        else:
            video = WORLD.render(CLIPS[::4][i - 1])
        result = JUDGE.score(np.ascontiguousarray(video), clip)
        assert not result["exact"], (corruption, WORLD.caption(clip))
        assert not (result["first_frame"] and result["events"] == 1.0)


def test_part_scores_say_what_went_wrong():
    clip = CLIPS[0]
    video = WORLD.render(clip)
    video[-1] = 0  # everything vanishes at the end: the first frame is right, the events are not
    result = JUDGE.score(video, clip)
    assert result["first_frame"] and not result["exact"]
    assert result["events"] < 1.0 and 0.5 < result["frames"] < 1.0
    blank = JUDGE.score(np.zeros_like(video), clip)
    assert blank == {"exact": False, "first_frame": False, "frames": 0.0, "events": 0.0, "timing": 0.0}


def _clip(event: Event) -> Clip:
    """A one-shape clip built by hand."""
    return Clip(tuple(Scene((event.state(f),)) for f in range(8)), (event,))


def test_the_same_events_at_other_frames_are_exact_but_off_time():
    square = Shape("square", "blue", "large", 3)
    target = _clip(Event("moves", square, "right", 2, frames=(2, 4)))
    late = _clip(Event("moves", square, "right", 2, frames=(5, 6)))
    result = JUDGE.score(WORLD.render(late), target)
    assert result["exact"] and result["events"] == 1.0 and result["timing"] == 0.0 and result["frames"] < 1.0
    parsed = JUDGE.parse(WORLD.render(late))
    assert parsed == late and _timing(parsed) == [(5, 6)]
    # One step left then one right is two moves, not the target's motion.
    back = _clip(Event("moves", square, "right", 1, frames=(2,)))
    frames = WORLD.render(back)
    frames[5:] = frames[0]
    events = JUDGE.parse(frames).events
    assert [(e.direction, e.cells, e.frames) for e in events] == [("right", 1, (2,)), ("left", 1, (5,))]


def test_infer_events_reads_each_kind_of_change():
    a, b = Shape("circle", "red", "small", 0), Shape("cross", "green", "large", 8)
    scenes = [Scene((a, b)), Scene((a,)), Scene((Shape("circle", "cyan", "small", 0),)),
              Scene((Shape("circle", "cyan", "small", 0), Shape("square", "blue", "small", 4)))]
    events = infer_events(scenes)
    assert [(e.action, e.shape.kind, e.colour, e.frames) for e in events] == [
        ("disappears", "cross", None, (1,)), ("changes colour", "circle", "cyan", (2,)),
        ("appears", "square", None, (3,))]


@pytest.mark.parametrize("bad", [
    np.zeros((0, 32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8), np.zeros((7, 32, 32, 3), np.uint8),
    np.zeros((8, 32, 32, 4), np.uint8), np.zeros((8, 32, 32, 3), np.float32), [[0]], None,
])
def test_bad_input_names_the_expected_shape(bad):
    with pytest.raises(ValueError, match=r"\(8, 32, 32, 3\) uint8"):
        JUDGE.parse(bad)
    with pytest.raises(ValueError, match=r"\(8, 32, 32, 3\) uint8"):
        JUDGE.score(bad, CLIPS[0])


def test_noise_parses_without_raising_and_scores_low():
    rng = np.random.default_rng(24)
    for _ in range(3):
        noise = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        result = JUDGE.score(noise, CLIPS[0])
        assert not result["exact"] and result["events"] == 0.0 and result["frames"] < 0.5
