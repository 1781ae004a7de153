"""Audio end to end: a speech run trains one model for both directions, and the same weights
transcribe and speak; the speech evaluation tasks score ground truth as perfect and nonsense as bad."""

import json

import numpy as np
import pytest

from nmm.config import load_config
from nmm.data.speech import SpeechWorld
from nmm.eval.harness import make_context
from nmm.eval.task import get_task
from nmm.train.prepare import prepare_mixture

SMALL_RULER = {"speech_recognizer": {"utterances": 32, "steps": 3}}


def test_speech_run_has_an_audio_codec_and_an_audio_loss(speech_run):
    for name in ("audio_codec.safetensors", "audio_codec.json", "vocab.json", "model.safetensors"):
        assert (speech_run / name).exists(), name
    vocab = json.loads((speech_run / "vocab.json").read_text())
    assert [m["name"] for m in vocab["modalities"]] == ["audio"]
    assert vocab["modalities"][0]["tokens_per_item"] is None  # variable length: the model ends items
    record = json.loads((speech_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_text", "loss_audio"} <= set(record)
    stats = json.loads((speech_run / "tokenizer_stats.json").read_text())
    assert stats["audio"]["mel_distance"] > 0


def test_batches_teach_both_directions(speech_run, speech_pipe):
    cfg = load_config("speech-tiny")
    mixture = prepare_mixture(cfg, speech_pipe.codecs)
    assert set(mixture.roles) == {"transcription", "synthesis"}
    v, rng = speech_pipe.vocab, np.random.default_rng(0)
    docs = [mixture.sample(rng) for _ in range(40)]
    for doc in docs:
        ids, target = speech_pipe.codecs.encode_document(doc)
        ids, target = np.array(ids), np.array(target)
        audio = v.is_modality("audio", ids)
        if doc.role == "transcription":  # loss on the transcript only
            assert audio.any() and not (target & audio).any() and (target & (ids < v.n_text)).any()
        else:  # loss on the speech (and its end token), never on the prompt text
            assert (target & audio).any() and not (target & (ids < v.n_text)).any()
    assert {d.role for d in docs} == {"transcription", "synthesis"}


def test_the_same_weights_transcribe_and_speak(speech_pipe):
    world = SpeechWorld()
    pairs = world.utterances(3, 7, "heldout")
    texts = speech_pipe.transcribe([world.render(t, v) for t, v in pairs])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    waves = speech_pipe.speak(["seven three", "a red circle"], max_tokens=12, temperature=1.0, seed=3)
    codec = speech_pipe.codecs.codec("audio")
    assert len(waves) == 2
    for w in waves:
        assert w.dtype == np.float32 and w.ndim == 1 and np.isfinite(w).all()
        assert len(w) <= 12 / codec.tokens_per_second * 16_000 + 400  # at most max_tokens of speech


def test_speech_tasks_score_ground_truth_perfectly_and_nonsense_badly(speech_pipe, tmp_path):
    cfg = load_config("speech-tiny", ["eval.n_samples=6"])
    ctx = make_context(speech_pipe, cfg, tmp_path, log=lambda *a: None, options=SMALL_RULER)
    task = get_task("speech_asr")
    items = task.build(ctx, "heldout")
    assert len(items) == 6 and all(len(w) > 1000 for _, w in items)
    perfect = task.score(ctx, "heldout", items, task.oracle(ctx, items)).metrics
    assert perfect["cer"].value == 0.0 and perfect["wer"].value == 0.0 and perfect["exact"].value == 1.0
    wrong = task.score(ctx, "heldout", items, ["zzz"] * len(items)).metrics
    assert wrong["cer"].value > 0.8 and wrong["exact"].value == 0.0


@pytest.mark.slow
def test_speech_eval_tasks_run_on_the_trained_model(speech_pipe, tmp_path):
    from nmm.eval.harness import evaluate_tasks

    cfg = load_config("speech-tiny", ["eval.n_samples=4"])
    outcome = evaluate_tasks(speech_pipe, cfg, tmp_path / "eval", tasks="speech_asr,speech_tts,audio_codec",
                             log=lambda *a: None, progress=False, strict=True, cache_dir=tmp_path,
                             options=SMALL_RULER)
    for key in ("asr_cer", "tts_cer", "codec_cer", "codec_real_cer", "codec_mel_distance"):
        assert np.isfinite(outcome.metrics[key]) and outcome.metrics[key] >= 0, key
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("<audio controls") >= 3 and "speech_tts" in html


def test_the_delay_pattern_trains_and_speaks(tmp_path):
    """`audio.layout=delay` end to end: the vocabulary holds the joint code, the pool holds one
    token more per item than frames, and spoken answers decode to (tokens - 1) frames of speech."""
    import nmm
    from nmm.train.trainer import train

    cfg = load_config("speech-tiny", ["audio.layout=delay", "train.max_steps=2"])
    train(cfg, tmp_path, show_progress=False, log=lambda *a: None)
    pipe = nmm.load(tmp_path)
    codec = pipe.codecs.codec("audio")
    assert codec.config.layout == "delay" and codec.delay == 1
    assert pipe.vocab.spec("audio").factors == codec.group_sizes
    wave = SpeechWorld().render("seven", SpeechWorld().voices("train")[0])
    (codes,) = codec.encode([wave])
    assert len(codes) == codec.n_frames(len(wave)) + 1
    assert codec.decode_mel([codes])[0].shape[-1] == codec.n_frames(len(wave)) * codec.config.stride
    (spoken,) = pipe.speak(["seven"], max_tokens=9, temperature=1.0, seed=0)
    assert spoken.ndim == 1 and len(spoken) <= 8 / codec.tokens_per_second * 16_000 + 400  # <= 8 frames
    assert pipe.transcribe([wave])[0] is not None


@pytest.mark.parametrize("fusion", ["late", "mid"])
def test_continuous_audio_runs_transcribe_and_refuse_to_speak(tmp_path, fusion):
    """`model.audio_repr=continuous`: the codec's latents are read through an encoder (late) or
    cross-attention (mid); the run trains on transcription, loads, transcribes, and says it cannot speak."""
    import nmm
    from nmm.errors import InputError
    from nmm.train.trainer import train

    cfg = load_config("speech-tiny", [f"model.audio_fusion={fusion}", "model.audio_repr=continuous",
                                      "data.roles={transcription: 1.0}", "train.max_steps=3"])
    train(cfg, tmp_path, show_progress=False, log=lambda *a: None)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["loss_text"]) and "loss_audio" not in record
    pipe = nmm.load(tmp_path)
    assert pipe.model.cfg.audio_variant == fusion and pipe.model.modalities["audio"].fusion == fusion
    world = SpeechWorld()
    waves = [world.render(t, v) for t, v in world.utterances(2, 5, "heldout")]
    texts = pipe.transcribe(waves)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(InputError, match=f"{fusion} audio.*cannot generate them"):
        pipe.speak(["seven"])
