"""Tests for the real-image tasks (scikit-learn digits, Fashion-MNIST): preprocessing, the
independent judge, the short fine-tune and its cache, scoring, and skipping without the data.

Judges and fine-tunes are shrunk through `options` so every test stays in seconds; the default
sizes are measured in docs/evaluation.md."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nmm.config import load_config
from nmm.errors import InputError
from nmm.eval import evaluate_tasks, get_task
from nmm.eval.finetune import FinetuneConfig, finetune
from nmm.eval.harness import make_context
from nmm.eval.real_data import (
    FASHION_ENV,
    balanced_indices,
    digits_to_rgb,
    fashion_to_rgb,
    fashion_unavailable,
    lit_mask,
    read_idx,
)
from nmm.eval.real_judge import JudgeConfig
from nmm.eval.tasks.real_images import parse_class

QUICK_JUDGE = JudgeConfig(steps=120)
QUICK_FASHION_JUDGE = JudgeConfig(steps=150, train_images=6000)
NO_FINETUNE = FinetuneConfig(steps=0)  # the model as it is (for the random-weights baseline)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds waiting on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nmm_cache")


@pytest.fixture(scope="module")
def random_pipe(tiny_pipe):
    """The tiny run's codecs with a freshly initialised (untrained) transformer."""
    from nmm.api import Pipeline
    from nmm.model.model import NativeMultimodalModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = NativeMultimodalModel(tiny_pipe.model.cfg, tiny_pipe.vocab).eval()
    return Pipeline(model, tiny_pipe.codecs, "cpu")


def tiny_cfg(n: int):
    cfg = load_config("shapes-tiny")
    cfg.eval.n_samples = n
    cfg.eval.batch_size = 50  # the preset's 8 makes generation a dozen small batches
    return cfg


def needs_fashion():
    reason = fashion_unavailable()
    if reason:
        pytest.skip(reason)


# ---- captions, preprocessing, data files ----------------------------------------------------------

def test_parse_class_reads_whole_class_words():
    fashion = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
    assert parse_class("a photo of a t-shirt", fashion) == 0
    assert parse_class("a photo of a shirt", fashion) == 6  # not confused with t-shirt
    assert parse_class("a photo of an ankle boot.", fashion) == 9
    assert parse_class("a photo of an ankle", fashion) is None
    assert parse_class("a bag and a coat", fashion) is None  # two classes: no single answer
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert parse_class("a handwritten digit seven seven", digits) == 7
    assert parse_class("a handwritten digit someone", digits) is None
    assert parse_class("", digits) is None


def test_preprocessing_gives_the_tokenizers_format_and_keeps_the_ink():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 17, (5, 8, 8))
    rgb = digits_to_rgb(digits)
    assert rgb.shape == (5, 32, 32, 3) and rgb.dtype == np.uint8
    # Every digit pixel is one whole 4x4 block, lit exactly where the ink passes the threshold.
    np.testing.assert_array_equal(lit_mask(rgb)[:, ::4, ::4], digits >= 6)
    np.testing.assert_array_equal(lit_mask(rgb), (digits >= 6).repeat(4, 1).repeat(4, 2))
    clothes = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    rgb = fashion_to_rgb(clothes)
    assert rgb.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(lit_mask(rgb)[:, 2:30, 2:30], clothes >= 32)
    assert lit_mask(rgb)[:, :2].sum() == 0 and lit_mask(rgb)[:, :, 30:].sum() == 0  # black padding
    with pytest.raises(InputError, match=r"\(N, 8, 8\)"):
        digits_to_rgb(np.zeros((2, 28, 28)))
    with pytest.raises(InputError, match=r"\(N, 28, 28\)"):
        fashion_to_rgb(np.zeros((2, 8, 8)))
    with pytest.raises(InputError, match="uint8"):
        lit_mask(np.zeros((2, 32, 32, 3), np.float32))


def test_balanced_indices_cycle_through_the_classes():
    labels = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 5, 5, 5, 5, 2])
    idx = balanced_indices(labels, 20, seed=0)
    assert list(labels[idx]) == list(range(10)) * 2 and len(set(idx)) == 20
    # Class 9 runs out after its 2 examples: stop there rather than unbalance the classes.
    assert len(balanced_indices(labels, 100, seed=0)) == 29
    np.testing.assert_array_equal(idx, balanced_indices(labels, 20, seed=0))
    assert not np.array_equal(idx, balanced_indices(labels, 20, seed=1))


def test_bad_idx_files_name_the_file(tmp_path):
    good = tmp_path / "ok.gz"
    with gzip.open(good, "wb") as f:
        f.write(b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
                + bytes(range(12)))
    assert read_idx(good).shape == (2, 2, 3) and read_idx(good)[1, 1, 2] == 11
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(b"\0\0\x08\x01" + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(InputError, match="short.gz.*truncated"):
        read_idx(truncated)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="plain.gz"):
        read_idx(plain)


# ---- the independent judge: oracle high, random model near chance --------------------------------

def _oracle_and_random(name, judge, random_pipe, cache_dir, n):
    options = {name: {"judge": judge, "finetune": NO_FINETUNE}}
    ctx = make_context(random_pipe, tiny_cfg(n), cache_dir, log=lambda *a: None, options=options)
    task = get_task(name)
    items = task.build(ctx, "heldout")
    assert len(items) == n and [it.label for it in items[:10]] == list(range(10))  # classes balanced
    oracle = task.score(ctx, "heldout", items, task.oracle(ctx, items)).metrics
    random = task.score(ctx, "heldout", items, task.predict(ctx, items)).metrics
    return oracle, random


def test_digits_judge_reads_real_images_and_a_random_model_scores_near_chance(random_pipe, cache_dir):
    oracle, random = _oracle_and_random("digits", QUICK_JUDGE, random_pipe, cache_dir, 100)
    # Real held-out images scored as if generated: the judge's ceiling, well above chance (0.1).
    assert oracle["generation_accuracy"].value >= 0.85, oracle["generation_accuracy"]
    assert oracle["generation_accuracy"].value == oracle["judge_accuracy_real"].value
    assert oracle["caption_accuracy"].value == oracle["caption_exact"].value == 1.0
    assert oracle["generation_accuracy"].n == 100
    assert oracle["generation_diversity"].value == 1.0  # the real images are as varied as themselves
    # An untrained transformer: captions name no class, pictures are noise to the judge.
    assert random["caption_accuracy"].value <= 0.2, random["caption_accuracy"]
    assert random["generation_accuracy"].value <= 0.3, random["generation_accuracy"]


def test_fashion_judge_reads_real_images_and_a_random_model_scores_near_chance(random_pipe, cache_dir):
    needs_fashion()
    oracle, random = _oracle_and_random("fashion_mnist", QUICK_FASHION_JUDGE, random_pipe, cache_dir, 60)
    assert oracle["generation_accuracy"].value >= 0.7, oracle["generation_accuracy"]
    assert oracle["caption_accuracy"].value == 1.0
    assert random["caption_accuracy"].value <= 0.2
    assert random["generation_accuracy"].value <= 0.35, random["generation_accuracy"]


def test_mismatched_outputs_score_low(tiny_pipe, cache_dir):
    ctx = make_context(tiny_pipe, tiny_cfg(50), cache_dir, log=lambda *a: None,
                       options={"digits": {"judge": QUICK_JUDGE}})
    task = get_task("digits")
    items = task.build(ctx, "heldout")
    right = task.oracle(ctx, items)
    # Every item gets the next item's caption and picture: always another class.
    shifted = type(right)(right.captions[1:] + right.captions[:1], np.roll(right.images, -1, axis=0))
    metrics = task.score(ctx, "heldout", items, shifted).metrics
    assert metrics["caption_accuracy"].value == 0.0
    assert metrics["generation_accuracy"].value <= 0.15
    # One picture repeated for every prompt of a class: no variety at all.
    same = np.stack([right.images[np.flatnonzero([it.label == t.label for it in items])[0]] for t in items])
    collapsed = task.score(ctx, "heldout", items, type(right)(right.captions, same)).metrics
    assert collapsed["generation_accuracy"].value >= 0.5 and collapsed["generation_diversity"].value == 0.0


# ---- the fine-tune --------------------------------------------------------------------------------

def _digit_pairs(n=40):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    images = digits_to_rgb(rng.integers(0, 17, (n, 8, 8)))
    return images, [f"a handwritten digit {w}" for w in np.array(["zero", "one", "two", "three", "four", "five",
                                                                   "six", "seven", "eight", "nine"])[labels]]


def test_finetune_is_deterministic_and_leaves_the_run_alone(tiny_pipe):
    images, captions = _digit_pairs()
    before = {k: v.clone() for k, v in tiny_pipe.model.state_dict().items()}
    cfg = load_config("shapes-tiny")
    a, info = finetune(tiny_pipe, cfg, images, captions, FinetuneConfig(steps=3, batch_size=4))
    b, _ = finetune(tiny_pipe, cfg, images, captions, FinetuneConfig(steps=3, batch_size=4))
    assert info["steps"] == 3 and info["final_loss"] is not None
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert any(not torch.equal(sa[k], before[k]) for k in sa)  # it did train
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.model.state_dict().items())  # on a copy
    c, _ = finetune(tiny_pipe, cfg, images, captions, FinetuneConfig(steps=3, batch_size=4, seed=1))
    assert any(not torch.equal(sa[k], c.model.state_dict()[k]) for k in sa)  # the seed matters


def test_finetune_rejects_bad_input(tiny_pipe):
    images, captions = _digit_pairs()
    cfg = load_config("shapes-tiny")
    with pytest.raises(InputError, match="40 images and 39 captions"):
        finetune(tiny_pipe, cfg, images, captions[:-1])
    with pytest.raises(InputError, match="steps must be >= 0"):
        finetune(tiny_pipe, cfg, images, captions, FinetuneConfig(steps=-1))
    with pytest.raises(InputError, match="longer than the fine-tune's sequence length"):
        finetune(tiny_pipe, cfg, images, captions, FinetuneConfig(steps=1, seq_len=32))


def test_task_finetunes_scores_with_intervals_and_reuses_the_cache(tiny_pipe, tmp_path, cache_dir):
    options = {"digits": {"finetune": FinetuneConfig(steps=4, batch_size=4), "judge": QUICK_JUDGE,
                          "finetune_images": 200}}
    logs: list[str] = []
    kwargs = {"tasks": "digits", "progress": False, "cache_dir": tmp_path / "cache", "options": options}
    # The judge is shared with the other tests (same config): copy it into this test's own cache.
    for f in cache_dir.glob("digits_judge_*"):
        (tmp_path / "cache").mkdir(exist_ok=True)
        (tmp_path / "cache" / f.name).write_bytes(f.read_bytes())
    first = evaluate_tasks(tiny_pipe, tiny_cfg(20), tmp_path / "a", log=logs.append, **kwargs)
    assert first.data["tasks"]["digits"]["status"] == "done", first.data["tasks"]["digits"]
    records = {r["metric"]: r for r in first.records}
    assert set(records) == {"caption_accuracy", "caption_exact", "caption_parse_rate", "generation_accuracy",
                            "judge_accuracy_real", "judge_accuracy_roundtrip", "generation_diversity"}
    for r in records.values():
        assert r["n"] == 20 and r["ci_low"] <= r["value"] <= r["ci_high"], r
    assert any("fine-tuning a copy" in line for line in logs)
    cached = list((tmp_path / "cache" / "finetune").glob("digits_*.safetensors"))
    assert len(cached) == 1
    tuned = load_file(str(cached[0]))
    assert any(not torch.equal(tuned[k], v) for k, v in tiny_pipe.model.state_dict().items())
    # Report material: examples of both directions and the confusion matrices.
    samples = json.loads((tmp_path / "a" / "samples" / "digits.heldout.json").read_text())
    assert {s["direction"] for s in samples["samples"]} == {"caption", "generation"}
    assert set(samples["confusion"]) == {"caption", "generation (judge)", "judge on real images"}
    assert sum(map(sum, samples["confusion"]["caption"]["matrix"])) == 20
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("class='confusion'") == 3

    logs.clear()
    again = evaluate_tasks(tiny_pipe, tiny_cfg(20), tmp_path / "b", log=logs.append, **kwargs)
    assert any("loaded from" in line for line in logs) and not any("fine-tuning" in line for line in logs)
    assert [r["value"] for r in again.records] == [r["value"] for r in first.records]


# ---- skipped, with a reason, when the data are missing --------------------------------------------

def test_missing_fashion_mnist_is_skipped_with_the_reason(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "nowhere"))
    outcome = evaluate_tasks(tiny_pipe, tiny_cfg(4), tmp_path / "eval", tasks="fashion_mnist", log=lambda *a: None,
                             progress=False, report=False)
    info = outcome.data["tasks"]["fashion_mnist"]
    assert info["status"] == "skipped" and not outcome.failed
    assert "nowhere" in info["reason"] and "dataset-fashion-mnist" in info["reason"]
    assert outcome.records == []


def test_missing_scikit_learn_skips_digits_with_the_reason(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    outcome = evaluate_tasks(tiny_pipe, tiny_cfg(4), tmp_path / "eval", tasks="digits", log=lambda *a: None,
                             progress=False, report=False)
    info = outcome.data["tasks"]["digits"]
    assert info["status"] == "skipped" and "scikit-learn" in info["reason"]


def test_too_short_a_context_is_skipped_with_the_reason(random_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(random_pipe.model.cfg, "max_seq_len", 40)
    outcome = evaluate_tasks(random_pipe, tiny_cfg(4), tmp_path / "eval", tasks="digits", log=lambda *a: None,
                             progress=False, report=False)
    info = outcome.data["tasks"]["digits"]
    assert info["status"] == "skipped" and "needs a context of" in info["reason"] and "40" in info["reason"]


def test_a_model_that_cannot_draw_is_scored_on_captions_only(random_pipe, tmp_path, cache_dir, monkeypatch):
    """Late and mid fusion read images but cannot write them: fine-tune and score the reading only."""
    monkeypatch.setattr(random_pipe.model.images, "capabilities", ("M2T",))
    options = {"digits": {"finetune": FinetuneConfig(steps=2, batch_size=4), "judge": QUICK_JUDGE,
                          "finetune_images": 100}}
    outcome = evaluate_tasks(random_pipe, tiny_cfg(20), tmp_path / "eval", tasks="digits", log=lambda *a: None,
                             progress=False, report=False, cache_dir=tmp_path / "cache", options=options)
    assert outcome.data["tasks"]["digits"]["status"] == "done", outcome.data["tasks"]["digits"]
    assert {r["metric"] for r in outcome.records} == {"caption_accuracy", "caption_exact", "caption_parse_rate"}
    meta = json.loads(next((tmp_path / "cache" / "finetune").glob("digits_*.json")).read_text())
    assert meta["config"]["roles"] == {"captioning": 1.0}
