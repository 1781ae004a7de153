"""Audio codec: a 16 kHz mono waveform <-> a variable-length sequence of discrete codes.

    waveform -> log-mel (100 frames/s) -> normalise -> stack `stride` frames -> conv encoder
    -> one FSQ per group (25 code frames/s by default) -> conv decoder -> log-mel -> Griffin-Lim

The codec works on log-mel alone: the decoder predicts a log-mel spectrogram and the baseline
vocoder (`LogMel.invert`, Griffin-Lim) turns it into sound, so the codec is a small CPU-trainable
autoencoder with no adversarial losses. Frame stacking (like the image codec's pixel-unshuffle)
keeps every conv at code rate, which is far cheaper on CPU than strided convs at mel rate.

Token layouts (`AudioCodecConfig.layout`):
  - factored: one token per code frame; its code joins the groups' codes (most significant first,
    `join_codes`), and the model embeds and predicts each group as a factor;
  - flat: one token per group per code frame, frame-major (f0 g0, f0 g1, f1 g0, ...);
  - delay: MusicGen's delay pattern. One token per step like `factored`, but group g is delayed by
    g steps: token t joins group 0 of frame t, group 1 of frame t-1, ... So each group of a frame is
    predicted one step after the group before it, seeing it as input, at (frames + groups - 1) tokens.
    Cells before the first frame and after the last hold code 0 (`DELAY_PAD`): they are never decoded.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from nmm.config import AudioCodecConfig  # defined with the other run configs
from nmm.errors import CheckpointError, ConfigError
from nmm.modalities.audio_features import LOG_FLOOR, SAMPLE_RATE, LogMel, mel_distance
from nmm.modalities.base import ModalitySpec, join_codes, register_modality, split_codes
from nmm.modalities.fsq import FSQ
from nmm.optim import fit
from nmm.utils import atomic_write_text, save_safetensors

WEIGHTS_FILE = "audio_codec.safetensors"
CONFIG_FILE = "audio_codec.json"
SILENCE = math.log(LOG_FLOOR)  # log-mel of digital silence: what short crops and stride padding get
DELAY_PAD = 0  # the group code in the delay pattern's empty cells (any fixed code: they are dropped)


# ---- file I/O -----------------------------------------------------------------------------------
def read_audio(source: str | os.PathLike | bytes, name: str = "audio") -> tuple[np.ndarray, list[str]]:
    """An audio file (a path, or its bytes; any format libsndfile reads: WAV, FLAC, OGG, ...) ->
    (float32 mono waveform at 16 kHz, notes on what was changed to get there). `name` labels errors."""
    data = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        wave, rate = sf.read(data, dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as e:
        raise ValueError(f"{name}: not a readable audio file (truncated, or not WAV/FLAC/OGG): {e}") from None
    notes = []
    if wave.shape[0] == 0:
        raise ValueError(f"{name}: the audio file holds no samples")
    if not np.isfinite(wave).all():
        raise ValueError(f"{name}: the audio holds non-finite samples (NaN or inf)")
    if wave.shape[1] > 1:
        notes.append(f"mixed {wave.shape[1]} channels down to mono")
    wave = wave.mean(1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE)
        notes.append(f"resampled {rate} -> {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(wave, dtype=np.float32), notes


def write_wav(target: str | os.PathLike | io.IOBase, wave: np.ndarray) -> None:
    """A 1-D float waveform in [-1, 1] at 16 kHz -> a 16-bit PCM WAV file (a path or a writable buffer)."""
    sf.write(target, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), SAMPLE_RATE,
             subtype="PCM_16", format="WAV")


# ---- model --------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    """x + conv1x1(gelu(conv3(gelu(x)))), dilated so a few blocks see ~0.5 s of context."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, W, T) -> (B, W, T)
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))


def _stack(x: torch.Tensor, s: int) -> torch.Tensor:  # (B, M, T) -> (B, M*s, T/s)
    B, M, T = x.shape
    return x.view(B, M, T // s, s).permute(0, 1, 3, 2).reshape(B, M * s, T // s)


def _unstack(x: torch.Tensor, s: int) -> torch.Tensor:  # (B, M*s, T') -> (B, M, T'*s)
    B, C, T = x.shape
    return x.view(B, C // s, s, T).permute(0, 1, 3, 2).reshape(B, C // s, T * s)


class AudioCodec(nn.Module):
    """16 kHz mono waveform <-> codes, `tokens_per_second` of them. See the module docstring."""

    def __init__(self, config: AudioCodecConfig | None = None):
        super().__init__()
        self.config = c = config or AudioCodecConfig()
        if c.sample_rate != SAMPLE_RATE:
            raise ConfigError(f"config key 'audio.sample_rate': nmm's audio is {SAMPLE_RATE} Hz, got {c.sample_rate}")
        if c.stride < 1 or c.channels < 1:
            raise ConfigError(f"config keys 'audio.stride'/'audio.channels' must be >= 1, got {c.stride}/{c.channels}")
        self.mel = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels)
        # Per-mel-bin statistics of the training audio (set by `train_audio_codec`, saved in the json).
        self.register_buffer("mel_mean", torch.full((c.n_mels,), SILENCE / 2), persistent=False)
        self.register_buffer("mel_std", torch.full((c.n_mels,), 4.0), persistent=False)
        w, s, dims = c.channels, c.stride, [len(g) for g in c.groups]
        self.dims = dims
        dilations = [1, 2, 4, 1, 2, 4][: c.depth]
        self.enc_in = nn.Conv1d(c.n_mels * s, w, 3, padding=1)
        self.encoder = nn.Sequential(*(_ResBlock(w, d) for d in dilations), nn.GELU())
        self.to_latent = nn.Conv1d(w, sum(dims), 1)
        self.fsqs = nn.ModuleList(FSQ(list(g)) for g in c.groups)
        self.dec_in = nn.Conv1d(sum(dims), w, 3, padding=1)
        self.decoder = nn.Sequential(*(_ResBlock(w, d) for d in dilations), nn.GELU())
        self.dec_out = nn.Conv1d(w, c.n_mels * s, 1)
        # A residual conv at mel rate smooths the seams between the `stride` frames of one code frame.
        self.post = nn.Sequential(nn.Conv1d(c.n_mels, w // 2, 5, padding=2), nn.GELU(),
                                  nn.Conv1d(w // 2, c.n_mels, 5, padding=2))

    # ---- code bookkeeping -------------------------------------------------------------------
    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(f.n_codes for f in self.fsqs)

    @property
    def tokens_per_frame(self) -> int:
        return len(self.fsqs) if self.config.layout == "flat" else 1

    @property
    def delay(self) -> int:
        """Extra tokens of the delay pattern (groups - 1); 0 for the other layouts."""
        return len(self.fsqs) - 1 if self.config.layout == "delay" else 0

    @property
    def spec(self) -> ModalitySpec:
        levels = tuple(tuple(g) for g in self.config.groups)
        if self.config.layout != "flat":
            return ModalitySpec("audio", "<boa>", "<eoa>", math.prod(self.group_sizes), self.group_sizes,
                                levels, tokens_per_item=None, mime="audio/wav")
        return ModalitySpec("audio", "<boa>", "<eoa>", self.group_sizes[0], (), levels[:1],
                            tokens_per_item=None, mime="audio/wav")

    @property
    def tokens_per_second(self) -> float:
        return self.mel.frame_rate / self.config.stride * self.tokens_per_frame

    def n_tokens(self, n_samples: int) -> int:
        """Tokens for a waveform of `n_samples`: ceil(mel frames / stride) code frames (+ the delay)."""
        return self.n_frames(n_samples) * self.tokens_per_frame + self.delay

    def n_frames(self, n_samples: int) -> int:
        return -(-self.mel.frames(n_samples) // self.config.stride)

    @property
    def max_tokens(self) -> int:
        return self.n_tokens(int(self.config.max_seconds * SAMPLE_RATE))

    # ---- model --------------------------------------------------------------------------------
    def _normalise(self, log_mel: torch.Tensor) -> torch.Tensor:  # (B, M, T) -> (B, M, T)
        return (log_mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def _encode(self, log_mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log-mel (B, M, T) -> FSQ values (B, D, T') and group codes (B, G, T'), T' = ceil(T / stride).
        The tail is padded with silence, the same as training crops shorter than a segment."""
        s = self.config.stride
        x = self._normalise(F.pad(log_mel, (0, -log_mel.shape[-1] % s), value=SILENCE))
        z = self.to_latent(self.encoder(self.enc_in(_stack(x, s))))
        values, codes = zip(*(fsq(part) for fsq, part in zip(self.fsqs, z.split(self.dims, 1))))
        return torch.cat(values, 1), torch.stack(codes, 1)

    def _decode(self, values: torch.Tensor) -> torch.Tensor:
        """FSQ values (B, D, T') -> log-mel (B, M, T' * stride)."""
        x = _unstack(self.dec_out(self.decoder(self.dec_in(values))), self.config.stride)
        x = x + self.post(x)
        return x * self.mel_std[:, None] + self.mel_mean[:, None]

    def loss(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Training loss for log-mel crops (B, M, T), T a multiple of stride: L1 + L2 in log units
        (L1 is what `mel_distance` reports; the L2 term pulls hard on the loud, large-error frames)."""
        recon = self._decode(self._encode(log_mel)[0])
        err = recon - log_mel
        return err.abs().mean() + 0.1 * err.pow(2).mean()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- tokens ---------------------------------------------------------------------------------
    def _check_waves(self, items) -> list[torch.Tensor]:
        if isinstance(items, np.ndarray | torch.Tensor) and items.ndim == 2:
            items = list(items)  # (B, samples): a batch of equal lengths
        elif isinstance(items, np.ndarray | torch.Tensor):
            raise ValueError(f"expected a list of 1-D waveforms or a (B, samples) array, got shape {tuple(items.shape)}")
        waves, limit = [], int(self.config.max_seconds * SAMPLE_RATE)
        for i, w in enumerate(items):
            w = torch.as_tensor(np.asarray(w) if not torch.is_tensor(w) else w)
            if w.ndim != 1:
                raise ValueError(f"audio item {i}: expected a 1-D mono waveform (samples,) at {SAMPLE_RATE} Hz, "
                                 f"got shape {tuple(w.shape)} (mix stereo down first)")
            if not w.is_floating_point():
                raise ValueError(f"audio item {i}: expected float samples in [-1, 1], got {w.dtype}")
            if w.numel() == 0:
                raise ValueError(f"audio item {i}: empty waveform (0 samples)")
            if w.numel() <= self.config.n_fft // 2:  # the STFT's reflection padding needs more
                raise ValueError(f"audio item {i}: {w.numel()} samples is too short; at least "
                                 f"{self.config.n_fft // 2 + 1} ({(self.config.n_fft // 2 + 1) / SAMPLE_RATE * 1000:.0f} ms)")
            if not torch.isfinite(w).all():
                raise ValueError(f"audio item {i}: waveform holds non-finite samples (NaN or inf)")
            if w.numel() > limit:
                raise ValueError(f"audio item {i}: {w.numel() / SAMPLE_RATE:.2f} s is longer than the codec's "
                                 f"max_seconds={self.config.max_seconds:g} ({limit} samples)")
            waves.append(w.float())
        return waves

    def _by_length(self, items: Sequence[torch.Tensor], fn) -> list:
        """Run fn on batches of equal-length items (convs over padding would make one item's codes
        depend on its batch mates), returning per-item results in input order."""
        out: list = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(x.shape[-1], []).append(i)
        for idx in groups.values():
            for i, r in zip(idx, fn(torch.stack([items[i] for i in idx]).to(self._device()))):
                out[i] = r.cpu()
        return out

    @torch.inference_mode()
    def log_mel(self, items) -> list[torch.Tensor]:
        """Waveforms -> their log-mel spectrograms [(M, frames), ...], the codec's input."""
        return self._by_length(self._check_waves(items), self.mel)

    @torch.inference_mode()
    def encode(self, items) -> list[torch.Tensor]:
        """Waveforms (a list of 1-D float arrays at 16 kHz, or (B, samples)) -> a list of 1-D
        LongTensors of `n_tokens(len(wave))` codes each, in [0, spec.codes)."""
        def groups_of(wave: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, G, T') group codes per frame
            return self._encode(self.mel(wave))[1]
        # Each wave is padded with silence to a multiple of 8 code frames (0.32 s), so waves of similar
        # length share one batched forward (one conv per item was the pool's bottleneck); the padding
        # depends on the wave alone, so its codes still never depend on its batch mates.
        waves = self._check_waves(items)
        bucket = 8 * self.config.hop * self.config.stride
        padded = [F.pad(w, (0, -len(w) % bucket)) for w in waves]
        return [self.tokens(g[:, : self.n_frames(len(w))]) for g, w in zip(self._by_length(padded, groups_of), waves)]

    def tokens(self, groups: torch.Tensor) -> torch.Tensor:
        """Group codes (G, F) of one item -> its token codes (N,) in the configured layout."""
        layout = self.config.layout
        if layout == "flat":
            return groups.t().flatten()  # frame-major: (F * G,)
        if layout == "delay":  # group g moves g steps later; the empty cells get DELAY_PAD
            G, n = groups.shape
            out = groups.new_full((G, n + G - 1), DELAY_PAD)
            for g in range(G):
                out[g, g : g + n] = groups[g]
            groups = out
        return join_codes(list(groups), self.group_sizes)

    def groups(self, codes: torch.Tensor) -> torch.Tensor:
        """Token codes (B, N) in the configured layout -> group codes (B, G, F), `tokens`' inverse."""
        G, layout = len(self.fsqs), self.config.layout
        if layout == "flat":
            return codes.view(codes.shape[0], -1, G).transpose(1, 2)
        joined = torch.stack(split_codes(codes, self.group_sizes), 1)  # (B, G, N)
        if layout == "delay":
            n = joined.shape[-1] - self.delay
            joined = torch.stack([joined[:, g, g : g + n] for g in range(G)], 1)
        return joined

    def _check_codes(self, codes) -> list[torch.Tensor]:
        if isinstance(codes, np.ndarray | torch.Tensor) and codes.ndim != 2:
            raise ValueError(f"expected a list of 1-D code sequences or a (B, N) array, got shape {tuple(codes.shape)}")
        out, n = [], self.spec.codes
        for i, c in enumerate(codes):
            c = torch.as_tensor(np.asarray(c) if not torch.is_tensor(c) else c)
            if c.ndim != 1:
                raise ValueError(f"audio codes {i}: expected a 1-D sequence, got shape {tuple(c.shape)}")
            c = c.long()
            if c.numel() and (c.min() < 0 or c.max() >= n):
                raise ValueError(f"audio codes {i}: codes must lie in [0, {n}), got [{c.min()}, {c.max()}]")
            k = self.tokens_per_frame
            frames = max(0, (c.numel() - self.delay) // k)  # flat: a trailing incomplete frame is dropped;
            out.append(c[: frames * k + self.delay] if frames else c[:0])  # delay: too few tokens -> no frame
        return out

    def _values(self, codes: torch.Tensor) -> torch.Tensor:  # (B, N) -> FSQ values (B, D, T')
        groups = self.groups(codes).unbind(1)
        return torch.cat([fsq.values(g) for fsq, g in zip(self.fsqs, groups)], 1)

    @torch.inference_mode()
    def decode_mel(self, codes) -> list[torch.Tensor]:
        """Codes -> log-mel spectrograms [(M, code frames * stride), ...], without the vocoder."""
        checked = self._check_codes(codes)
        empty = torch.empty(self.config.n_mels, 0)
        full = [c for c in checked if c.numel()]
        mels = iter(self._by_length(full, lambda c: self._decode(self._values(c))))
        return [next(mels) if c.numel() else empty for c in checked]

    @torch.inference_mode()
    def vocode(self, log_mel: torch.Tensor) -> np.ndarray:
        """One log-mel (M, frames) -> float32 waveform in [-1, 1] by Griffin-Lim."""
        if log_mel.shape[-1] == 0:
            return np.zeros(0, np.float32)
        wave = self.mel.invert(log_mel[None].float().cpu(), self.config.griffin_lim_iters)[0].numpy()
        peak = float(np.abs(wave).max())
        # Only loud output is scaled: quiet speech keeps its level, so codes still say how loud it was.
        return (wave * (0.9 / peak) if peak > 1 else wave).astype(np.float32)

    def decode(self, codes) -> list[np.ndarray]:
        """Codes (a list of 1-D sequences, or (B, N)) -> float32 waveforms at 16 kHz in [-1, 1]."""
        return [self.vocode(m) for m in self.decode_mel(codes)]

    def to_bytes(self, wave: np.ndarray) -> bytes:
        """One waveform -> 16-bit PCM WAV file bytes."""
        buf = io.BytesIO()
        write_wav(buf, wave)
        return buf.getvalue()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Audio file bytes (WAV/FLAC/OGG, any rate and channel count) -> float32 mono waveform at 16 kHz."""
        return read_audio(data, "audio bytes")[0]

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path_dir: str | os.PathLike) -> None:
        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), path / WEIGHTS_FILE)
        meta = {"config": asdict(self.config), "mel_mean": self.mel_mean.tolist(), "mel_std": self.mel_std.tolist()}
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> AudioCodec:
        path = Path(path_dir)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"audio codec file missing: {path / name}")
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            model = cls(AudioCodecConfig.from_dict(meta["config"]))
            model.set_stats(torch.tensor(meta["mel_mean"]), torch.tensor(meta["mel_std"]))
        except (ValueError, TypeError, KeyError, RuntimeError, ConfigError) as e:
            raise CheckpointError(f"corrupt audio codec config {path / CONFIG_FILE}: {e}") from e
        try:
            model.load_state_dict(load_file(path / WEIGHTS_FILE))
        except Exception as e:  # safetensors raises its own error type for truncated/garbled files
            raise CheckpointError(f"corrupt audio codec weights {path / WEIGHTS_FILE}: {e}") from e
        return model.eval()

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the normalisation: per-mel-bin mean and std (M,) of the training log-mels."""
        if mean.shape != self.mel_mean.shape or std.shape != self.mel_std.shape:
            raise ValueError(f"normalisation stats must have shape ({self.config.n_mels},), "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std.clamp(min=0.1))  # a constant bin (e.g. above eSpeak's band) must not blow up


# ---- training -----------------------------------------------------------------------------------
def _crops(mels: list[torch.Tensor], n: int, frames: int, gen: torch.Generator) -> torch.Tensor:
    """n random crops of `frames` mel frames -> (n, M, frames); shorter items are padded with silence."""
    out = torch.full((n, mels[0].shape[0], frames), SILENCE)
    for b, i in enumerate(torch.randint(len(mels), (n,), generator=gen).tolist()):
        m = mels[i]
        start = int(torch.randint(max(1, m.shape[-1] - frames + 1), (1,), generator=gen))
        piece = m[:, start:start + frames]
        out[b, :, : piece.shape[-1]] = piece
    return out


def train_audio_codec(waves: list[np.ndarray], config: AudioCodecConfig | None = None, seed: int = 0,
                      progress: Callable[[int, int, float], None] | None = None,
                      heldout: list[np.ndarray] | None = None,
                      time_budget_s: float | None = None) -> tuple[AudioCodec, dict]:
    """Train a codec on 16 kHz waveforms (random `segment_seconds` crops of their log-mels); returns
    the model (eval mode) and its stats, measured on `heldout` (or the last `eval_items` of `waves`,
    which are then not trained on; with too few waves, on the training waves)."""
    config = config or AudioCodecConfig()
    torch.set_flush_denormal(True)  # denormals in the tiny late-training gradients slow CPU 1.4-2x
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = AudioCodec(config)
    if not waves:
        raise ValueError("train_audio_codec needs at least one waveform")
    if heldout is None and len(waves) >= 2 * config.eval_items:
        waves, heldout = waves[: -config.eval_items], waves[-config.eval_items:]
    mels = model.log_mel(waves)  # [(M, frames), ...], computed once; crops come from these
    frames = torch.cat(mels, 1)
    model.set_stats(frames.mean(1), frames.std(1))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    seg = max(1, round(config.segment_seconds * model.mel.frame_rate / config.stride)) * config.stride
    losses = fit(model, opt, lambda step: model.loss(_crops(mels, config.batch_size, seg, gen)),  # (B, M, seg)
                 config.steps, config.lr, config.warmup_steps, 0.05, progress, time_budget_s)
    train_seconds = time.perf_counter() - start
    model.eval()
    window = max(1, len(losses) // 10)
    stats = evaluate_audio_codec(model, heldout if heldout else waves[: config.eval_items])
    stats.update(train_seconds=train_seconds, steps=len(losses), initial_loss=float(np.mean(losses[:window])),
                 final_loss=float(np.mean(losses[-window:])) if losses else float("nan"))
    return model, stats


def evaluate_audio_codec(model: AudioCodec, waves: list[np.ndarray], vocoder_items: int | None = None) -> dict:
    """Reconstruction and code statistics on `waves`:
      - mel_distance: the decoder's log-mel vs the input's (mean abs, log units), codec alone;
      - mel_distance_griffin_lim: the log-mel re-analysed from the vocoded waveform vs the input's;
      - mel_distance_vocoder_only: the same for Griffin-Lim of the *input* mel (the vocoder's floor);
      - code_usage_g{i} / perplexity_g{i}: fraction of group i's codes used, exp(entropy) of their use;
      - tokens_per_second."""
    inputs = model.log_mel(waves)
    codes = model.encode(waves)
    recon = model.decode_mel(codes)
    stats = {"mel_distance": float(np.mean([mel_distance(a, b) for a, b in zip(recon, inputs)]))}
    n = len(waves) if vocoder_items is None else min(vocoder_items, len(waves))
    gl, floor = [], []
    for x, r in zip(inputs[:n], recon[:n]):
        gl.append(mel_distance(model.log_mel([model.vocode(r)])[0], x))
        floor.append(mel_distance(model.log_mel([model.vocode(x)])[0], x))
    stats.update(mel_distance_griffin_lim=float(np.mean(gl)), mel_distance_vocoder_only=float(np.mean(floor)))
    frames = [model.groups(c[None])[0] for c in codes if c.numel()]
    groups = torch.cat(frames, 1) if frames else torch.zeros(len(model.fsqs), 0, dtype=torch.long)  # (G, all frames)
    for i, (g, size) in enumerate(zip(groups, model.group_sizes)):
        p = torch.bincount(g, minlength=size).double() / max(1, g.numel())
        stats[f"code_usage_g{i}"] = float((p > 0).double().mean())
        stats[f"perplexity_g{i}"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    stats["tokens_per_second"] = model.tokens_per_second
    return stats


def train_for_run(cfg, source, progress=None) -> tuple[AudioCodec, dict]:
    """The registry's trainer: a run's audio codec (`cfg.audio`) from its data source's
    `source.waves()`, measured on `source.heldout_waves()` where the source has them."""
    heldout = source.heldout_waves() if hasattr(source, "heldout_waves") else None
    return train_audio_codec(source.waves(), cfg.audio, seed=cfg.data.seed, progress=progress, heldout=heldout)


register_modality("audio", AudioCodec, train=train_for_run)
