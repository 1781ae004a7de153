"""Tests for the audio codec (nmm.modalities.audio), on procedural signals (tones, chirps, noise
bursts with envelopes): fast, and no dependency on the speech data module."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from nmm.config import AudioCodecConfig
from nmm.errors import CheckpointError
from nmm.modalities.audio import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AudioCodec,
    read_audio,
    train_audio_codec,
    train_for_run,
    write_wav,
)
from nmm.modalities.audio_features import SAMPLE_RATE, mel_distance
from nmm.modalities.base import modality_plugin
from nmm.modalities.vocab import Vocabulary

SMALL = AudioCodecConfig(channels=64, depth=2, steps=60, batch_size=16, warmup_steps=5, lr=3e-3,
                         griffin_lim_iters=4, eval_items=4, max_seconds=2.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs: a second thread costs more in synchronisation than it gains (and far more on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _signal(rng: np.random.Generator) -> np.ndarray:
    """0.3-1.2 s of a harmonic chirp under a random attack/decay envelope."""
    n = int(rng.uniform(0.3, 1.2) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0, f1 = rng.uniform(100, 400), rng.uniform(100, 3000)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))  # linear chirp f0 -> f1
    wave = sum(np.sin(k * phase) / k for k in range(1, 4))
    env = np.minimum(1, np.minimum(t / 0.05, (t[-1] - t) / 0.1).clip(0))
    return (0.3 * env * wave).astype(np.float32)


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [_signal(rng) for _ in range(24)]


@pytest.fixture(scope="module")
def trained(waves):
    return train_audio_codec(waves[:20], SMALL, seed=0, heldout=waves[20:])


@pytest.fixture(scope="module", params=["factored", "flat", "delay"])
def codec(request):
    torch.manual_seed(0)
    return AudioCodec(replace(SMALL, layout=request.param)).eval()


def _wav_bytes(wave: np.ndarray, rate: int, **kw) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=kw.pop("format", "WAV"), **kw)
    return buf.getvalue()


# ---- spec and token counts ------------------------------------------------------------------
def test_spec_matches_layout(codec):
    spec = codec.spec
    assert (spec.name, spec.begin, spec.end, spec.mime) == ("audio", "<boa>", "<eoa>", "audio/wav")
    assert spec.tokens_per_item is None
    if codec.config.layout in ("factored", "delay"):
        assert spec.codes == 200 * 200 and spec.factors == (200, 200)
        assert spec.levels == ((8, 5, 5), (8, 5, 5))
    else:
        assert spec.codes == 200 and spec.factors == () and spec.levels == ((8, 5, 5),)
    vocab = Vocabulary(100, (spec,))
    assert vocab.range("audio") == (vocab.start("audio"), vocab.start("audio") + spec.codes)
    assert modality_plugin("audio").codec is AudioCodec
    assert modality_plugin("audio").train is train_for_run


def test_encode_lengths_ranges_and_rates(codec, waves):
    codes = codec.encode(waves[:5])
    k = 2 if codec.config.layout == "flat" else 1
    extra = 1 if codec.config.layout == "delay" else 0  # two groups: one step of delay
    for w, c in zip(waves[:5], codes):
        frames = len(w) // 160 + 1
        assert c.dtype == torch.long and c.ndim == 1
        assert len(c) == math.ceil(frames / 4) * k + extra == codec.n_tokens(len(w))
        assert 0 <= int(c.min()) and int(c.max()) < codec.spec.codes
    assert codec.tokens_per_second == 25 * k
    assert codec.max_tokens == math.ceil((2 * SAMPLE_RATE // 160 + 1) / 4) * k + extra


def test_flat_has_one_token_per_group_of_the_factored_code(waves):
    torch.manual_seed(0)
    factored = AudioCodec(SMALL).eval()
    flat = AudioCodec(replace(SMALL, layout="flat")).eval()
    flat.load_state_dict(factored.state_dict())
    joint, per_group = factored.encode([waves[0]])[0], flat.encode([waves[0]])[0]
    assert len(per_group) == 2 * len(joint)
    assert torch.equal(per_group[0::2] * 200 + per_group[1::2], joint)  # group 0 most significant


def test_delay_shifts_the_second_group_one_step(waves):
    """MusicGen's delay pattern: token t holds group 0 of frame t and group 1 of frame t-1; the
    empty cells (group 1 before frame 0, group 0 after the last frame) hold code 0. Decoding undoes
    the shift: the same log-mel as the factored layout of the same codec."""
    torch.manual_seed(0)
    factored = AudioCodec(SMALL).eval()
    delay = AudioCodec(replace(SMALL, layout="delay")).eval()
    delay.load_state_dict(factored.state_dict())
    joint, delayed = factored.encode([waves[1]])[0], delay.encode([waves[1]])[0]
    g0, g1 = joint // 200, joint % 200
    assert len(delayed) == len(joint) + 1
    assert torch.equal(delayed // 200, torch.cat([g0, torch.zeros(1, dtype=torch.long)]))
    assert torch.equal(delayed % 200, torch.cat([torch.zeros(1, dtype=torch.long), g1]))
    assert torch.equal(delay.decode_mel([delayed])[0], factored.decode_mel([joint])[0])
    assert delay.decode_mel([delayed[:1]])[0].shape == (64, 0)  # fewer tokens than groups: no frame


def test_encode_is_deterministic_and_batch_independent(codec, waves):
    alone = [codec.encode([w])[0] for w in waves[:4]]
    together = codec.encode(waves[:4] + [waves[0]])
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert torch.equal(together[0], together[4])
    same_length = np.stack([waves[0], waves[0][::-1].copy()])  # (2, samples): a 2-D batch
    assert torch.equal(codec.encode(same_length)[0], alone[0])


# ---- decode ---------------------------------------------------------------------------------
def test_decode_lengths_range_and_edge_cases(codec, waves):
    codes = codec.encode(waves[:3])
    out = codec.decode(codes)
    k, d = codec.tokens_per_frame, codec.delay
    for c, w in zip(codes, out):
        assert w.dtype == np.float32 and w.ndim == 1
        assert len(w) == ((len(c) - d) // k * 4 - 1) * 160
        assert np.abs(w).max() <= 1.0
    mels = codec.decode_mel(codes)
    assert [m.shape for m in mels] == [(64, (len(c) - d) // k * 4) for c in codes]
    assert len(codec.decode([torch.zeros(0, dtype=torch.long)])[0]) == 0  # empty item -> empty wave
    assert len(codec.decode(torch.zeros(2, 4 * k, dtype=torch.long))) == 2  # (B, N) tensor
    with pytest.raises(ValueError, match=r"codes must lie in \[0, "):
        codec.decode([torch.tensor([codec.spec.codes])])
    with pytest.raises(ValueError, match="1-D"):
        codec.decode([torch.zeros(2, 3, dtype=torch.long)])


def test_flat_drops_a_trailing_incomplete_frame():
    torch.manual_seed(0)
    flat = AudioCodec(replace(SMALL, layout="flat")).eval()
    mels = flat.decode_mel([torch.tensor([1, 2, 3, 4, 5])])  # 2 frames + 1 stray token
    assert mels[0].shape == (64, 2 * 4)


# ---- input checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("item, message", [
    (np.zeros((2, 1600), np.float32), r"1-D mono waveform .* shape \(2, 1600\)"),
    (np.zeros(0, np.float32), "empty waveform"),
    (np.full(1600, np.nan, np.float32), "non-finite"),
    (np.zeros(3 * SAMPLE_RATE, np.float32), "longer than the codec's max_seconds=2"),
    (np.zeros(1600, np.int16), "float samples"),
])
def test_encode_rejects_bad_items(codec, item, message):
    with pytest.raises(ValueError, match=message):
        codec.encode([np.zeros(800, np.float32), item])


def test_encode_rejects_a_3d_batch(codec):
    with pytest.raises(ValueError, match=r"\(B, samples\)"):
        codec.encode(np.zeros((1, 2, 800), np.float32))


# ---- file I/O ---------------------------------------------------------------------------------
def test_wav_round_trip(codec, waves):
    data = codec.to_bytes(waves[0])
    assert data[:4] == b"RIFF" and sf.info(io.BytesIO(data)).subtype == "PCM_16"
    back = codec.from_bytes(data)
    assert back.dtype == np.float32 and back.shape == waves[0].shape
    assert np.abs(back - waves[0]).max() < 1e-4  # 16-bit quantisation
    buf = io.BytesIO()
    write_wav(buf, np.array([2.0, -2.0], np.float32))  # clipped, not wrapped round
    assert np.allclose(read_audio(buf.getvalue(), "x")[0], [1.0, -1.0], atol=1e-4)


def test_read_audio_mixes_down_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    path = tmp_path / "stereo.flac"
    path.write_bytes(_wav_bytes(np.stack([left, right], 1).astype(np.float32), 44100, format="FLAC"))
    wave, notes = read_audio(path, "stereo.flac")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SAMPLE_RATE) <= 2
    assert "mixed 2 channels down to mono" in notes and "resampled 44100 -> 16000 Hz" in notes
    assert 0.4 < np.abs(wave[1000:-1000]).max() < 0.6  # the mean of a full and a silent channel
    assert read_audio(_wav_bytes(np.zeros(160, np.float32), SAMPLE_RATE), "x")[1] == []


def test_read_audio_errors_name_the_file():
    good = _wav_bytes(np.zeros(1600, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="clip.wav: not a readable audio file"):
        read_audio(good[:30], "clip.wav")  # truncated inside the header
    with pytest.raises(ValueError, match="notes.txt: not a readable audio file"):
        read_audio(b"hello, not audio", "notes.txt")
    with pytest.raises(ValueError, match="silent.wav: the audio file holds no samples"):
        read_audio(_wav_bytes(np.zeros(0, np.float32), SAMPLE_RATE), "silent.wav")
    with pytest.raises(ValueError, match="audio bytes: not a readable"):
        AudioCodec(SMALL).from_bytes(b"")


# ---- training and persistence -----------------------------------------------------------------
def test_training_lowers_the_mel_loss(trained, waves):
    model, stats = trained
    torch.manual_seed(0)
    untrained = AudioCodec(SMALL).eval()
    untrained.set_stats(model.mel_mean.clone(), model.mel_std.clone())
    heldout = waves[20:]

    def distance(m):
        return np.mean([mel_distance(a, b) for a, b in zip(m.decode_mel(m.encode(heldout)), m.log_mel(heldout))])

    assert distance(model) < 0.6 * distance(untrained)
    assert stats["final_loss"] < 0.6 * stats["initial_loss"]
    assert stats["steps"] == 60 and stats["tokens_per_second"] == 25
    for key in ("mel_distance", "mel_distance_griffin_lim", "mel_distance_vocoder_only", "train_seconds",
                "code_usage_g0", "code_usage_g1", "perplexity_g0", "perplexity_g1"):
        assert np.isfinite(stats[key]), key
    assert 0 < stats["code_usage_g0"] <= 1 and 1 <= stats["perplexity_g0"] <= 200


def test_progress_is_called_every_step(waves):
    seen = []
    train_audio_codec(waves[:4], replace(SMALL, steps=3), progress=lambda *a: seen.append(a))
    assert [(s, n) for s, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(loss, float) for *_, loss in seen)


def test_the_registry_trainer_reads_the_run_config_and_source(waves):
    cfg = SimpleNamespace(audio=replace(SMALL, steps=2), data=SimpleNamespace(seed=3))
    source = SimpleNamespace(waves=lambda: waves[:4], heldout_waves=lambda: waves[4:6])
    codec, stats = modality_plugin("audio").train(cfg, source, progress=None)
    assert isinstance(codec, AudioCodec) and not codec.training and stats["steps"] == 2


def test_save_load_gives_identical_codes(trained, waves, tmp_path):
    model, _ = trained
    model.save(tmp_path)
    loaded = AudioCodec.load(tmp_path)
    assert loaded.config == model.config and torch.equal(loaded.mel_mean, model.mel_mean)
    for a, b in zip(model.encode(waves[:3]), loaded.encode(waves[:3])):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["config"]["groups"] == [[8, 5, 5], [8, 5, 5]]


def test_load_errors_name_the_file(trained, tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        AudioCodec.load(tmp_path)
    trained[0].save(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes((tmp_path / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"corrupt audio codec weights .*{WEIGHTS_FILE}"):
        AudioCodec.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"config": {"layout": "sideways"}}')
    with pytest.raises(CheckpointError, match=f"corrupt audio codec config .*{CONFIG_FILE}"):
        AudioCodec.load(tmp_path)


def test_a_wave_too_short_for_the_stft_is_refused_by_name():
    with pytest.raises(ValueError, match=r"audio item 0: 100 samples is too short; at least 257"):
        AudioCodec(AudioCodecConfig(channels=16, depth=1)).encode([np.zeros(100, np.float32)])
