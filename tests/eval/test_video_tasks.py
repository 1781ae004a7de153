"""The video tasks score what a clip shows: the truth perfectly, nonsense and wrong clips badly."""

from types import SimpleNamespace

import numpy as np
import pytest

from nmm.config import load_config
from nmm.eval.harness import make_context
from nmm.eval.task import get_task


class NoPipe:
    """Scoring needs no model: build/oracle/score read only the config and the world."""

    codecs = SimpleNamespace(modalities=("video",))


def context(tmp_path, n: int = 12):
    return make_context(NoPipe(), load_config("video-tiny", [f"eval.n_samples={n}"]), tmp_path, log=lambda *a: None)


def values(result) -> dict[str, float]:
    return {k: v.value for k, v in result.metrics.items()}


@pytest.mark.parametrize("split", ["heldout", "heldout_combo"])
def test_captioning_scores_the_truth_perfectly_and_nonsense_not_at_all(tmp_path, split):
    ctx, task = context(tmp_path), get_task("video_captioning")
    items = task.build(ctx, split)
    assert len(items) == 12 and all(f.shape == (8, 32, 32, 3) for _, f in items)
    world = ctx.memo["moving_world"]
    assert all(not world.is_train_clip(c) for c, _ in items) == (split == "heldout_combo")
    truth = task.oracle(ctx, items)
    perfect = values(task.score(ctx, split, items, truth))
    assert all(perfect[m] == 1.0 for m in ("exact", "attributes", "first_frame", "events", "parsed")), perfect
    nonsense = values(task.score(ctx, split, items, ["zzz"] * len(items)))
    assert all(v == 0.0 for v in nonsense.values()), nonsense
    # every caption one clip off: parsed, but (almost) never the clip's
    shifted = values(task.score(ctx, split, items, truth[1:] + truth[:1]))
    assert shifted["parsed"] == 1.0 and shifted["exact"] < 0.3 and shifted["attributes"] < 0.7


@pytest.mark.parametrize("split", ["heldout", "heldout_combo"])
def test_text_to_clip_scores_clean_renders_perfectly_and_wrong_clips_badly(tmp_path, split):
    ctx, task = context(tmp_path), get_task("text_to_clip")
    items = task.build(ctx, split)
    clean = task.oracle(ctx, items)
    result = task.score(ctx, split, items, clean)
    perfect = values(result)
    assert all(perfect[m] == 1.0 for m in ("exact", "first_frame", "frames", "events")), perfect
    assert all(s["ok"] and s["video"].startswith("data:image/gif;base64,") for s in result.samples)
    assert result.images.shape == (12, 32, 8 * 32 + 7, 3)  # filmstrips
    reversed_time = values(task.score(ctx, split, items, [f[::-1].copy() for f in clean]))
    assert reversed_time["exact"] < 0.3  # the same frames backwards show other events
    black = values(task.score(ctx, split, items, [np.zeros_like(f) for f in clean]))
    assert black["exact"] == black["first_frame"] == 0.0


def test_continuation_scores_the_true_clip_perfectly(tmp_path):
    ctx, task = context(tmp_path), get_task("clip_continuation")
    items = task.build(ctx, "heldout")
    perfect = values(task.score(ctx, "heldout", items, task.oracle(ctx, items)))
    assert all(perfect[m] == 1.0 for m in ("exact", "events", "frames", "timing")), perfect
    assert 0.0 < perfect["oracle_bound"] <= 1.0
    frozen = [np.repeat(f[:4], 2, axis=0)[[0, 2, 4, 6, 7, 7, 7, 7]] for _, f in items]  # nothing after frame 3
    assert values(task.score(ctx, "heldout", items, frozen))["exact"] < perfect["exact"]
