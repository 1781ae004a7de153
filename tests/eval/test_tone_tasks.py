"""The tones data source and its two evaluation tasks: ground truth scores perfectly and wrong outputs
badly, held-out combinations stay out of training, a tones-tiny run trains and both tasks run on it,
and `data.source=speech+tones` offers both sources' roles."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nmm.config import AudioCodecConfig, load_config
from nmm.data.sources import data_source
from nmm.data.tones import Note, PitchJudge, ToneScene
from nmm.eval.harness import make_context
from nmm.eval.task import get_task
from nmm.eval.tasks.tone_captioning import compare
from nmm.modalities.audio import AudioCodec
from nmm.modalities.codecs import Codecs
from nmm.modalities.text import TextTokenizer

METRICS = ("exact", "note", "pitch", "count", "timbre", "tempo")


class NoPipe:
    """Scoring needs no model: the tasks' build/oracle/score only read the config and the world.
    The context reads a pipeline's modalities off its codecs."""

    codecs = SimpleNamespace(modalities=("audio",))


def context(tmp_path, n: int = 12):
    cfg = load_config("tones-tiny", [f"eval.n_samples={n}"])
    return make_context(NoPipe(), cfg, tmp_path, log=lambda *a: None)


def values(result) -> dict[str, float]:
    return {k: v.value for k, v in result.metrics.items()}


@pytest.mark.parametrize("split", ["heldout", "heldout_combo"])
def test_captioning_scores_the_truth_perfectly_and_wrong_captions_badly(tmp_path, split):
    ctx, task = context(tmp_path), get_task("tone_captioning")
    items = task.build(ctx, split)
    assert len(items) == 12 and all(w.dtype == np.float32 and len(w) > 1000 for _, w in items)
    world = ctx.memo["tone_world"]
    assert all(world.has_heldout(s) for s, _ in items) == (split == "heldout_combo")
    perfect = values(task.score(ctx, split, items, task.oracle(ctx, items)))
    assert all(perfect[m] == 1.0 for m in (*METRICS, "parsed")), perfect
    # Upper case and spacing do not matter; the caption's content does.
    loose = [c.upper().replace(" : ", ":") for c in task.oracle(ctx, items)]
    assert values(task.score(ctx, split, items, loose))["exact"] == 1.0
    nonsense = values(task.score(ctx, split, items, ["zzz"] * len(items)))
    assert all(nonsense[m] == 0.0 for m in (*METRICS, "parsed")), nonsense
    # Right timbre and tempo, every pitch a step off: parsed, but no note right.
    shifted = [world.caption(ToneScene(tuple(Note("c5" if n.pitch != "c5" else "c4", n.duration) for n in s.notes),
                                       s.timbre, s.tempo)) for s, _ in items]
    wrong = values(task.score(ctx, split, items, shifted))
    assert wrong["parsed"] == wrong["timbre"] == wrong["tempo"] == wrong["count"] == 1.0
    assert wrong["pitch"] < 0.35 and wrong["exact"] < 0.35


def test_captioning_report_has_players_spectrograms_and_a_pitch_confusion(tmp_path):
    ctx, task = context(tmp_path, n=4), get_task("tone_captioning")
    items = task.build(ctx, "heldout")
    res = task.score(ctx, "heldout", items, task.oracle(ctx, items))
    assert len(res.samples) == 4 and all(s["ok"] and s["audio"].startswith("data:audio/wav;base64,") for s in res.samples)
    assert res.images.shape[0] == 4 and res.images.shape[-1] == 3 and res.images.dtype == np.uint8
    confusion = res.confusion["pitch"]
    matrix = np.array(confusion["matrix"])
    assert matrix.sum() == sum(len(s.notes) for s, _ in items) == np.trace(matrix)


@pytest.mark.parametrize("split", ["heldout", "heldout_combo"])
def test_synthesis_scores_clean_renders_perfectly_and_wrong_audio_badly(tmp_path, split):
    ctx, task = context(tmp_path), get_task("tone_synthesis")
    items = task.build(ctx, split)
    assert len(items) == 12 and all(isinstance(s, ToneScene) for s in items)
    oracle = task.oracle(ctx, items)
    perfect = values(task.score(ctx, split, items, oracle))
    assert all(perfect[m] == 1.0 for m in METRICS) and perfect["silent"] == 0.0, perfect
    rng = np.random.default_rng(0)
    noise = [(0.3 * rng.standard_normal(16_000)).astype(np.float32) for _ in items]
    heard = values(task.score(ctx, split, items, noise))
    assert heard["note"] == heard["exact"] == 0.0 and heard["silent"] == 1.0, heard
    silence = [np.zeros(0, np.float32) for _ in items]  # an empty generation is scored, not an error
    assert values(task.score(ctx, split, items, silence))["note"] == 0.0
    others = oracle[1:] + oracle[:1]  # every caption answered with another scene's melody
    assert values(task.score(ctx, split, items, others))["exact"] < 0.2
    res = task.score(ctx, split, items[:3], oracle[:3])
    assert len(res.samples) == 3 and all(s["audio"].startswith("data:audio/wav") for s in res.samples)
    assert res.images.shape[0] == 3


def test_scoring_a_read_scene_is_the_pitch_judge_score(tmp_path):
    ctx, task = context(tmp_path, n=6), get_task("tone_synthesis")
    items = task.build(ctx, "heldout")
    world, judge = ctx.memo["tone_world"], PitchJudge()
    for target, scene in zip(items, items[1:] + items[:1]):
        wave = world.render(scene)
        assert compare(target, judge.read_scene(wave)) == judge.score(wave, target)
    assert compare(items[0], None) == judge.score(np.zeros(100, np.float32), items[0])


def tiny_codecs(texts: list[str]) -> Codecs:
    torch.manual_seed(0)
    return Codecs(TextTokenizer.train(texts, vocab_size=300), AudioCodec(AudioCodecConfig(channels=16, depth=1)).eval())


def test_tone_source_keeps_heldout_combinations_out_of_training():
    cfg = load_config("tones-tiny", ["data.speech_pool_size=24", "audio.pool_size=16", "audio.eval_items=4"])
    source = data_source(cfg)
    assert source.modalities == ("audio",) and source.world is not None and source.judge is not None
    world = source.world
    texts = source.texts()
    assert set(world.all_words()) <= set(texts)
    trained = [world.parse_caption(t) for t in texts if ":" in t and t != ":"]
    assert trained and not any(world.has_heldout(s) for s in trained)
    assert len(source.waves()) == 16 and len(source.heldout_waves()) == 4
    roles = source.roles(tiny_codecs(texts), cfg.data)
    assert set(roles) == {"tone_captioning", "tone_synthesis"}
    assert len(source.tone_pool) == 24 and not any(world.has_heldout(s) for s in source.tone_pool.scenes)
    rng = np.random.default_rng(0)
    for _ in range(20):
        doc = roles["tone_captioning"](rng)
        audio, text = doc.segments
        assert doc.role == "tone_captioning" and audio.loss is False and world.parse_caption(text.text) is not None
        doc = roles["tone_synthesis"](rng)
        assert doc.role == "tone_synthesis" and doc.segments[-1].loss is not False
        if len(doc.segments) == 2:
            assert doc.segments[0].loss is False and world.parse_caption(doc.segments[0].text) is not None


def test_speech_and_tones_join():
    cfg = load_config("tones-tiny", ["data.source=speech+tones", "data.speech_pool_size=2"])
    source = data_source(cfg)
    assert source.modalities == ("audio",) and len(source.parts) == 2
    roles = source.roles(tiny_codecs(source.texts()), cfg.data)
    assert {"transcription", "synthesis", "tone_captioning", "tone_synthesis"} <= set(roles)
    ctx = make_context(NoPipe(), cfg, log=lambda *a: None)
    assert get_task("tone_captioning").unavailable(ctx) is None and get_task("speech_asr").unavailable(ctx) is None
    speech_only = make_context(NoPipe(), load_config("speech-tiny"), log=lambda *a: None)
    assert "tones world" in get_task("tone_synthesis").unavailable(speech_only)


@pytest.fixture(scope="module")
def tones_pipe(tmp_path_factory):
    import nmm
    from nmm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("tones_run")
    train(load_config("tones-tiny"), run_dir, show_progress=False, log=lambda *a: None)
    return nmm.load(run_dir)


def test_a_tones_run_trains_and_both_tasks_run_on_it(tones_pipe, tmp_path):
    from nmm.eval.harness import evaluate_tasks

    assert [m.name for m in tones_pipe.vocab.modalities] == ["audio"]
    cfg = load_config("tones-tiny", ["eval.n_samples=3", "eval.batch_size=3"])
    outcome = evaluate_tasks(tones_pipe, cfg, tmp_path / "eval", tasks="tone_captioning,tone_synthesis",
                             log=lambda *a: None, progress=False, strict=True, cache_dir=tmp_path)
    for prefix in ("", "heldout_combo_"):
        for task in ("tcap", "tsyn"):
            for metric in METRICS:
                value = outcome.metrics[f"{prefix}{task}_{metric}"]
                assert np.isfinite(value) and 0.0 <= value <= 1.0, (prefix, task, metric, value)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("<audio controls") >= 4 and "tone_synthesis" in html and "tone_captioning" in html
