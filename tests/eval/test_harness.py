"""Tests for the evaluation harness: task scorers, intervals, resumability, results file, reports,
comparisons. Small n everywhere; the models are the session's tiny run (random quality) and a
freshly initialised one."""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from nmm.config import load_config
from nmm.errors import InputError, NmmError
from nmm.eval import (
    EvalResultsError,
    SplitResult,
    Task,
    compare_runs,
    evaluate_tasks,
    get_task,
    list_tasks,
)
from nmm.eval.features import FeatureNetConfig, load_or_train_feature_net
from nmm.eval.finetune import FinetuneConfig
from nmm.eval.harness import make_context
from nmm.eval.real_judge import JudgeConfig
from nmm.eval.runner import evaluate
from nmm.eval.stats import bootstrap_mean, frechet_distance

# A feature network trained briefly: enough for the tests (identical sets still give 0).
_QUICK_REAL = {"finetune": FinetuneConfig(steps=6, batch_size=4), "judge": JudgeConfig(steps=30, train_images=2000),
               "finetune_images": 200}
QUICK_FEATURES = {"shapes_fid": {"feature_net": FeatureNetConfig(steps=40, train_scenes=1024)},
                  "digits": _QUICK_REAL, "fashion_mnist": _QUICK_REAL}
IMAGE_TASKS = ("shapes_t2i", "shapes_edit", "shapes_interleaved")


@contextmanager
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation, and on a busy 2-core
    machine every parallel op then waits for a time slice (10x slower in practice). Training the
    session's tiny run sets 2 threads, so this is re-applied per test and per module fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # numpy's BLAS (Fréchet distances)

        limits = threadpool_limits(1)
    except ImportError:
        limits = None
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if limits is not None:
            limits.restore_original_limits()


@pytest.fixture(autouse=True)
def _single_threaded():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nmm_cache")


def tiny_cfg(n: int = 6):
    cfg = load_config("shapes-tiny")
    cfg.eval.n_samples = n
    return cfg


@pytest.fixture(scope="module")
def random_pipe(tiny_pipe):
    """The tiny run's codecs with a freshly initialised (untrained) transformer."""
    from nmm.api import Pipeline
    from nmm.model.model import NativeMultimodalModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = NativeMultimodalModel(tiny_pipe.model.cfg, tiny_pipe.vocab).eval()
    return Pipeline(model, tiny_pipe.codecs, "cpu")


@pytest.fixture(scope="module")
def full_eval(tiny_pipe, tmp_path_factory, cache_dir):
    """Every task on the tiny run, n=6: the results directory and the outcome."""
    out = tmp_path_factory.mktemp("full_eval") / "run" / "eval"
    with one_thread():
        outcome = evaluate_tasks(tiny_pipe, tiny_cfg(6), out, log=lambda *a: None, progress=False,
                                 cache_dir=cache_dir, options=QUICK_FEATURES)
    return out, outcome


# ---- the registry --------------------------------------------------------------------------------

def test_every_task_is_registered_with_its_splits():
    names = {t["name"]: t for t in list_tasks()}
    assert set(names) >= {"shapes_captioning", "shapes_qa", "shapes_t2i", "shapes_edit", "shapes_interleaved",
                          "shapes_fid", "text_perplexity"}
    for name in ("shapes_captioning", "shapes_qa", *IMAGE_TASKS, "shapes_fid"):
        assert names[name]["splits"] == ["heldout", "heldout_combo"]
        assert names[name]["modalities"] == ["text", "image"]
    assert names["text_perplexity"]["modalities"] == ["text"]


def test_unknown_task_names_the_available_ones():
    with pytest.raises(InputError, match="shapes_t2i"):
        get_task("shapes_t2j")


# ---- scorers agree with ground truth, and can fail -------------------------------------------------

@pytest.mark.parametrize("name", ["shapes_captioning", "shapes_qa", *IMAGE_TASKS])
def test_ground_truth_outputs_score_perfectly(name, tiny_pipe, cache_dir):
    """Rendering the target scenes (or writing the target text) and scoring them as if generated
    gives >= 99% on every metric of every split: the scorers agree with the world's ground truth."""
    ctx = make_context(tiny_pipe, tiny_cfg(60), cache_dir)
    task = get_task(name)
    for split in task.splits:
        items = task.build(ctx, split)
        result = task.score(ctx, split, items, task.oracle(ctx, items))
        for metric, est in result.metrics.items():
            if task.better(metric) == "higher":
                assert est.value >= 0.99, (name, split, metric, est)
            else:
                assert est.value <= 0.01, (name, split, metric, est)


def test_geneval_categories_have_their_prompts(tiny_pipe, cache_dir):
    ctx = make_context(tiny_pipe, tiny_cfg(30), cache_dir)
    task = get_task("shapes_t2i")
    items = task.build(ctx, "heldout_combo")
    assert sorted({len(s.shapes) for s in items}) == [1, 2, 3]  # shapes-tiny: 1..3 shapes, stratified
    metrics = task.score(ctx, "heldout_combo", items, task.oracle(ctx, items)).metrics
    assert metrics["geneval_single_object"].n == metrics["geneval_colours"].n == 10
    assert metrics["geneval_two_objects"].n == metrics["geneval_position"].n == 10
    assert metrics["geneval_counting"].n == 30 and metrics["geneval_overall"].value == 1.0
    # Every held-out-combo prompt names a colour/kind pair never seen in training.
    assert all(ctx.world.has_heldout(s) for s in items)


def test_mismatched_images_score_low(tiny_pipe, cache_dir):
    """Real images of *other* prompts: the scorers must notice."""
    ctx = make_context(tiny_pipe, tiny_cfg(30), cache_dir)
    for name in IMAGE_TASKS:
        task = get_task(name)
        items = task.build(ctx, "heldout")
        outputs = task.oracle(ctx, items)
        shuffled = outputs[1:] + outputs[:1] if isinstance(outputs, list) else np.roll(outputs, 1, axis=0)
        if name == "shapes_interleaved":  # keep the (right) text, pair it with another scene's picture
            shuffled = [type(o)(o.text, s.image) for o, s in zip(outputs, shuffled)]
        metrics = task.score(ctx, "heldout", items, shuffled).metrics
        strict = {"shapes_t2i": "judged_accuracy", "shapes_edit": "exact_match"}.get(name, "joint_accuracy")
        assert metrics[strict].value <= 0.1, (name, metrics[strict])
        if name == "shapes_t2i":  # GenEval's object categories forgive extra shapes, so some hits are luck
            assert metrics["geneval_overall"].value <= 0.4


def test_random_weights_score_near_chance(random_pipe, tmp_path, cache_dir):
    out = tmp_path / "eval"
    outcome = evaluate_tasks(random_pipe, tiny_cfg(8), out, tasks=["shapes_captioning", "shapes_qa", *IMAGE_TASKS],
                             log=lambda *a: None, progress=False, cache_dir=cache_dir, report=False)
    m = outcome.metrics
    assert not outcome.failed
    for key in ("m2t_exact_match", "m2g_judged_accuracy", "m2g_geneval_two_objects", "edit_exact_match",
                "interleaved_joint_accuracy", "heldout_combo_m2g_judged_accuracy"):
        assert m[key] <= 0.15, (key, m[key])
    # QA: guessing uniformly among a question type's answers would score ~0.25; noise scores less.
    assert m["qa_accuracy"] <= 0.4


def test_fid_is_zero_for_real_images_and_large_for_noise(tiny_pipe, cache_dir):
    ctx = make_context(tiny_pipe, tiny_cfg(24), cache_dir, options=QUICK_FEATURES)
    task = get_task("shapes_fid")
    task.prepare(ctx)
    items = task.build(ctx, "heldout")
    real = task.score(ctx, "heldout", items, task.oracle(ctx, items)).metrics
    assert real["fid"].value < 1e-6 and real["fid"].n == 24
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    bad = task.score(ctx, "heldout", items, noise).metrics
    assert bad["fid"].value > 10 * real["fid_real_floor"].value > 0


def test_feature_network_is_cached(tmp_path):
    from nmm.data.shapes import ShapesWorld

    cfg, logs = FeatureNetConfig(steps=2, train_scenes=64), []
    net, meta = load_or_train_feature_net(ShapesWorld(), tmp_path, cfg, log=logs.append)
    again, meta2 = load_or_train_feature_net(ShapesWorld(), tmp_path, cfg, log=logs.append)
    assert len(logs) == 1 and "training" in logs[0]  # the second call loads
    assert meta2["key"] == meta["key"]
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ---- statistics ----------------------------------------------------------------------------------

def test_bootstrap_interval_is_deterministic_and_sensible():
    x = np.r_[np.ones(30), np.zeros(70)]
    a, b = bootstrap_mean(x, seed=3), bootstrap_mean(x, seed=3)
    assert a == b and a.n == 100 and a.value == pytest.approx(0.3)
    assert 0.18 < a.ci_low < 0.3 < a.ci_high < 0.42  # ~ +-1.96 * sqrt(.3 * .7 / 100)
    assert bootstrap_mean([1, 1, 1]).ci_low == 1.0


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(a, a) < 1e-9
    assert frechet_distance(a, a + 2.0) == pytest.approx(5 * 4.0, rel=1e-6)  # only the means differ
    from scipy import linalg

    b = rng.normal(size=(300, 5)) * 1.5 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


# ---- the harness ----------------------------------------------------------------------------------

def test_results_file_has_a_record_with_interval_per_task_split_and_metric(full_eval):
    out, outcome = full_eval
    data = json.loads((out / "results.json").read_text())
    assert not outcome.failed, outcome.failed
    assert data["format"] == "nmm-eval/1" and data["config_hash"] and data["weights"] and "git" in data
    # Only an optional dataset's absence (Debian's dataset-fashion-mnist) may skip a task, and the
    # tasks of modalities this text + image model does not have (speech, tones: audio; clips: video).
    tasks = {t["name"]: t for t in list_tasks()}
    for name, info in data["tasks"].items():
        missing = [m for m in ("audio", "video") if m in tasks[name]["modalities"]]
        if missing:  # a modality this model lacks: skipped, saying which
            assert info["status"] == "skipped" and f"needs the {missing[0]}" in info["reason"], (name, info)
        else:
            assert info["status"] == "done" or (name == "fashion_mnist" and info["status"] == "skipped"), (name, info)
    seen = {(r["task"], r["split"]) for r in data["records"]}
    for task in list_tasks():
        if data["tasks"][task["name"]]["status"] == "skipped":
            continue
        for split in task["splits"]:
            assert (task["name"], split) in seen
    for r in data["records"]:
        assert r["n"] > 0 and r["ci_low"] <= r["value"] <= r["ci_high"], r
    # The flat view keeps the keys the demo reads.
    for key in ("m2t_exact_match", "qa_accuracy", "m2g_judged_accuracy", "heldout_combo_m2g_attribute_accuracy",
                "text_perplexity", "m2g_fid", "edit_exact_match", "interleaved_joint_accuracy"):
        assert key in data["metrics"], key


def test_report_has_grids_bars_and_confusions(full_eval):
    out, _ = full_eval
    page = (out / "report.html").read_text()
    sections = {s.split("'", 1)[0]: s for s in page.split("<h2 id='")[1:]}
    for name in ("shapes_t2i", "shapes_captioning", "shapes_edit", "shapes_interleaved", "shapes_qa"):
        assert "class='bars'" in sections[name], name
        assert sections[name].count("<figure class=") == 12, name  # 6 examples x 2 splits, with verdicts
        assert "data:image/png;base64," in sections[name]
    assert sections["shapes_captioning"].count("class='confusion'") == 4  # kind and colour, per split
    assert "perplexity" in sections["text_perplexity"]


def test_finished_tasks_are_kept_unless_forced_or_config_changes(full_eval, tiny_pipe, tmp_path, cache_dir):
    src, _ = full_eval
    out = tmp_path / "eval"
    shutil.copytree(src, out)
    before = (out / "results.json").read_text()
    kwargs = {"tasks": "shapes_qa,text_perplexity", "log": lambda *a: None, "progress": False,
              "cache_dir": cache_dir, "report": False}
    again = evaluate_tasks(tiny_pipe, tiny_cfg(6), out, **kwargs)
    assert again.fresh == {}
    assert json.loads(before)["records"] == again.records
    forced = evaluate_tasks(tiny_pipe, tiny_cfg(6), out, force=True, **kwargs)
    assert set(forced.fresh) == {"shapes_qa", "text_perplexity"}
    assert json.loads(before)["records"] == forced.records  # fixed seeds: the same numbers again
    changed = evaluate_tasks(tiny_pipe, tiny_cfg(4), out, **kwargs)
    assert set(changed.fresh) == {"shapes_qa", "text_perplexity"}
    assert {r["n"] for r in changed.records if r["task"] == "shapes_qa" and r["metric"] == "accuracy"} == {4}
    # Tasks not asked for keep their records.
    assert any(r["task"] == "shapes_t2i" for r in changed.records)


class AudioCaptioning(Task):
    name = "test_audio_captions"
    kind = "M2T"
    modalities = ("text", "audio")

    def build(self, ctx, split):
        raise AssertionError("a skipped task must not run")


class Broken(Task):
    name = "test_broken"
    kind = "T2T"

    def build(self, ctx, split):
        return [1, 2]

    def predict(self, ctx, items):
        raise RuntimeError("boom")


def test_missing_modality_is_skipped_and_a_failing_task_recorded(tiny_pipe, tmp_path):
    outcome = evaluate_tasks(tiny_pipe, tiny_cfg(4), tmp_path, tasks=[AudioCaptioning(), Broken(), "shapes_qa"],
                             log=lambda *a: None, progress=True, report=False)  # the rich bars, too
    tasks = outcome.data["tasks"]
    assert tasks["test_audio_captions"]["status"] == "skipped" and "audio" in tasks["test_audio_captions"]["reason"]
    assert tasks["test_broken"]["status"] == "failed" and "boom" in tasks["test_broken"]["error"]
    assert tasks["shapes_qa"]["status"] == "done"
    assert {r["task"] for r in outcome.records} == {"shapes_qa"}


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"format": "nmm-eval/1", "tasks": {}, "records": [{}]}',
                                     b'{"format": "nmm-eval/9"}', b"\xff\xfe"])
def test_corrupt_results_file_is_an_nmm_error_and_left_untouched(content, tiny_pipe, tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(EvalResultsError, match="results.json") as err:
        evaluate_tasks(tiny_pipe, tiny_cfg(4), tmp_path, tasks="shapes_qa", log=lambda *a: None, progress=False)
    assert isinstance(err.value, NmmError)
    assert path.read_bytes() == content
    with pytest.raises(EvalResultsError):
        compare_runs([tmp_path])


def test_legacy_evaluate_keeps_the_demo_keys_and_artefacts(tiny_pipe, tmp_path):
    metrics, artefacts = evaluate(tiny_pipe, tiny_cfg(4), tmp_path / "eval", log=lambda *a: None)
    for base in ("m2t_attribute_accuracy", "m2t_exact_match", "qa_accuracy", "m2g_judged_accuracy",
                 "m2g_attribute_accuracy"):
        assert 0 <= metrics[base] <= 1 and 0 <= metrics[f"heldout_combo_{base}"] <= 1
    assert metrics["text_perplexity"] > 1
    for split in ("heldout", "heldout_combo"):
        art = artefacts[split]
        assert set(art) == {"scenes", "captions", "generations", "images", "real"}
        assert art["images"].shape == art["real"].shape == (4, 32, 32, 3)
        assert {"prompt", "exact"} <= set(art["generations"][0]) and {"caption", "exact"} <= set(art["captions"][0])
    # And the demo report still renders from them.
    from nmm.eval.report import write_report

    assert write_report(tmp_path, metrics, artefacts, None).exists()


# ---- comparisons ----------------------------------------------------------------------------------

def test_compare_runs_markdown_and_plot(full_eval, tmp_path):
    src, _ = full_eval
    a, b = tmp_path / "small", tmp_path / "big"
    for run in (a, b):
        (run / "eval").mkdir(parents=True)
    shutil.copy(src / "results.json", a / "eval" / "results.json")
    better = copy.deepcopy(json.loads((src / "results.json").read_text()))
    for r in better["records"]:
        if r["task"] == "shapes_t2i" and r["metric"] == "judged_accuracy":
            r.update(value=0.9, ci_low=0.85, ci_high=0.95)
    better["config_hash"] = "different"
    (b / "eval" / "results.json").write_text(json.dumps(better))
    md = compare_runs([a, b], plot=tmp_path / "compare.png")
    header = md.splitlines()[0]
    assert "small" in header and "big" in header
    row = next(line for line in md.splitlines() if "| shapes_t2i | heldout | judged_accuracy |" in line)
    assert "**0.900 [0.850, 0.950]** *" in row  # best, and clearly separated from the first run
    assert "text_perplexity" in md and "perplexity ↓" in md
    assert "different eval/data configs" in md
    assert (tmp_path / "compare.png").stat().st_size > 1000
    (tmp_path / "never_evaluated").mkdir()
    with pytest.raises(EvalResultsError, match="nmm eval"):
        compare_runs([a, tmp_path / "never_evaluated"])


def test_split_result_defaults():
    res = SplitResult({})
    assert res.samples == [] and res.images is None and res.confusion == {}


def test_the_documented_example_task_works(tiny_pipe, tmp_path):
    """docs/evaluation.md's "Writing a task" example, verbatim except for @register (which would
    add it to every other test's registry)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    code = re.search(r"```python\n(from nmm.data.shapes import NUMBERS.*?)```", doc, re.DOTALL).group(1)
    namespace: dict = {}
    exec(code.replace("@register\n", ""), namespace)  # noqa: S102 (our own docs)
    task = namespace["ShapesCounting"]()
    ctx = make_context(tiny_pipe, tiny_cfg(12), tmp_path)
    items = task.build(ctx, "heldout")
    assert task.score(ctx, "heldout", items, task.oracle(ctx, items)).metrics["accuracy"].value == 1.0
    outcome = evaluate_tasks(tiny_pipe, tiny_cfg(4), tmp_path / "eval", tasks=[task], log=lambda *a: None,
                             progress=False, report=False)
    assert outcome.data["tasks"]["shapes_counting"]["status"] == "done"
