"""An independent speech recogniser: the ruler that scores generated or reconstructed speech.

A small character CTC model on nmm's shared log-mel front end, trained only on real eSpeak NG
audio of the speech world's train voices, never on model outputs, so its errors on a generated
waveform measure the generator, not a recogniser that learned the generator's quirks. Scores are
corpus-level character and word error rates (`cer`, `wer`, via jiwer).

    model, stats = train_recognizer(waves, texts, steps=1000, seed=0)  # ~4000 utterances
    hyps = model.transcribe(generated_waves)
    cer(refs, hyps), wer(refs, hyps)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nmm.errors import CheckpointError
from nmm.modalities.audio_features import SAMPLE_RATE, LogMel
from nmm.optim import fit
from nmm.utils import atomic_write_text, save_safetensors

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # output classes 1..27; class 0 is the CTC blank
BLANK = 0
WEIGHTS_FILE, CONFIG_FILE = "recognizer.safetensors", "recognizer.json"


@dataclass
class RecognizerConfig:
    channels: int = 128
    blocks: int = 6
    kernel: int = 11  # depthwise kernel at 50 frames/s: 0.2 s per block, ~1.3 s over the stack
    gru: int = 0  # hidden size of an optional final BiGRU (0 = conv only: ~3x faster on CPU)
    dropout: float = 0.1
    alphabet: str = ALPHABET


class _ConvBlock(nn.Module):
    """Residual depthwise-separable conv: LayerNorm -> depthwise conv -> pointwise MLP."""

    def __init__(self, c: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.depthwise = nn.Conv1d(c, c, kernel, padding=kernel // 2, groups=c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (B, T, C), mask (B, T, 1)
        h = self.depthwise(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return (x + self.mlp(h)) * mask  # zero the padding so it never leaks into real frames


class SpeechRecognizer(nn.Module):
    """Waveforms -> per-frame character logits at 50 frames/s (LogMel's 100 Hz subsampled x2).

    x2 rather than x4: fast eSpeak speech reaches ~20 characters/s, and CTC needs a frame per
    character plus a blank between repeated letters ("three"), which 25 frames/s cannot spare.
    """

    def __init__(self, config: RecognizerConfig | None = None):
        super().__init__()
        self.config = cfg = config or RecognizerConfig()
        self.features = LogMel()
        n_mels, c = self.features.n_mels, cfg.channels
        self.subsample = nn.Conv1d(n_mels, c, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(_ConvBlock(c, cfg.kernel, cfg.dropout) for _ in range(cfg.blocks))
        self.gru = nn.GRU(c, cfg.gru, batch_first=True, bidirectional=True) if cfg.gru else None
        self.head = nn.Linear(2 * cfg.gru if cfg.gru else c, len(cfg.alphabet) + 1)

    # ----- features -----

    def featurize(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of 1-D waves -> normalised log-mel (B, n_mels, T) and frame lengths (B,)."""
        if not waves:
            raise ValueError("need at least one waveform")
        lengths = [len(w) for w in waves]
        if min(lengths) == 0:
            raise ValueError("cannot recognise an empty waveform")
        batch = torch.zeros(len(waves), max(lengths))
        for i, w in enumerate(waves):
            batch[i, :len(w)] = torch.as_tensor(np.asarray(w, dtype=np.float32))
        feats = self.features(batch.to(self.head.weight.device))  # (B, n_mels, T)
        frames = torch.tensor([self.features.frames(n) for n in lengths], device=feats.device)
        mask = (torch.arange(feats.shape[-1], device=feats.device)[None] < frames[:, None])[:, None]
        # Per-utterance mean/variance per mel bin over real frames: removes level and much of the
        # speaker's spectral tilt, which is what a held-out voice mostly changes.
        n = frames[:, None, None].float()
        mean = (feats * mask).sum(-1, keepdim=True) / n
        std = (((feats - mean) ** 2 * mask).sum(-1, keepdim=True) / n).sqrt().clamp(min=1e-3)
        return ((feats - mean) / std) * mask, frames

    def out_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames - 1) // 2 + 1  # the stride-2, kernel-5, padding-2 subsampling conv

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) features -> log-probs (B, T', classes) and output lengths (B,)."""
        x = F.gelu(self.subsample(feats)).transpose(1, 2)  # (B, T', C)
        lengths = self.out_lengths(frames)
        mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[..., None].float()
        x = x * mask
        for block in self.blocks:
            x = block(x, mask)
        if self.gru is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = self.gru(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=mask.shape[1])
        return self.head(x).log_softmax(-1), lengths

    # ----- text -----

    def encode(self, text: str) -> list[int]:
        bad = sorted({ch for ch in text if ch not in self.config.alphabet})
        if bad:
            raise ValueError(f"text {text!r} has characters {bad} outside the alphabet "
                             f"{self.config.alphabet!r}; normalise it with nmm.data.speech.normalize_text")
        return [self.config.alphabet.index(ch) + 1 for ch in text]

    def decode(self, ids) -> str:
        """Greedy CTC: collapse repeats, then drop blanks."""
        out, prev = [], BLANK
        for i in ids:
            i = int(i)
            if i != prev and i != BLANK:
                out.append(self.config.alphabet[i - 1])
            prev = i
        return " ".join("".join(out).split())

    @torch.no_grad()
    def transcribe(self, waves: list[np.ndarray], batch_size: int = 32) -> list[str]:
        """Greedy transcripts, batched by similar length (padding is masked, so order is free)."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        out: list[str] = [""] * len(waves)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                logp, lengths = self(*self.featurize([waves[i] for i in idx]))
                best = logp.argmax(-1).cpu()
                for row, i in enumerate(idx):
                    out[i] = self.decode(best[row, :int(lengths[row])])
        finally:
            self.train(was_training)
        return out

    # ----- checkpoints -----

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_safetensors(self.state_dict(), directory / WEIGHTS_FILE)
        meta = {"config": asdict(self.config), "sample_rate": SAMPLE_RATE}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> SpeechRecognizer:
        from safetensors.torch import load_file

        directory = Path(directory)
        weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for path in (weights, config):
            if not path.is_file():
                raise CheckpointError(f"speech recogniser checkpoint incomplete: {path} is missing")
        try:
            meta = json.loads(config.read_text())
            model = cls(RecognizerConfig(**meta["config"]))
            model.load_state_dict(load_file(str(weights)))
        except Exception as e:  # bad JSON, unknown keys, truncated tensors, shape mismatches
            raise CheckpointError(f"speech recogniser checkpoint in {directory} is corrupt: {e}") from e
        return model.eval()


def _spec_augment(feats: torch.Tensor, frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Two frequency masks (<= 8 bins) and a time mask per 0.5 s (<= 6 frames each), in place."""
    b, n_mels, _ = feats.shape
    for i in range(b):
        for _ in range(2):
            w = int(torch.randint(0, 9, (), generator=gen))
            f0 = int(torch.randint(0, n_mels - w + 1, (), generator=gen))
            feats[i, f0:f0 + w] = 0
        length = int(frames[i])
        for _ in range(max(1, length // 50)):
            w = int(torch.randint(0, 7, (), generator=gen))
            t0 = int(torch.randint(0, max(length - w, 1), (), generator=gen))
            feats[i, :, t0:t0 + w] = 0
    return feats


def _batches(lengths: list[int], batch_size: int, rng: np.random.Generator):
    """Endless batches of similar-length indices (less padding), in random order."""
    while True:
        # Jitter the sort key so batch membership changes between epochs.
        order = np.argsort(np.asarray(lengths) * rng.uniform(0.9, 1.1, len(lengths)))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for j in rng.permutation(len(chunks)):
            yield chunks[j].tolist()


def train_recognizer(waves: list[np.ndarray], texts: list[str], steps: int = 1000, seed: int = 0,
                     progress: Callable[[int, float], None] | None = None, batch_size: int = 32,
                     lr: float = 2e-3, config: RecognizerConfig | None = None,
                     augment: bool = True) -> tuple[SpeechRecognizer, dict]:
    """Train a recogniser on real speech (16 kHz waves and their normalised texts).

    Returns the model (in eval mode) and stats: steps, seconds, first/last loss (mean over the
    first/last 20 steps) and the loss curve. `progress(step, loss)` is called after every step.
    """
    if len(waves) != len(texts) or not waves:
        raise ValueError(f"need matching non-empty waves and texts, got {len(waves)} and {len(texts)}")
    torch.manual_seed(seed)
    model = SpeechRecognizer(config)
    targets = [torch.tensor(model.encode(t)) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    batches = _batches([len(w) for w in waves], batch_size, rng)
    start = time.perf_counter()

    def loss_at(step: int) -> torch.Tensor:
        idx = next(batches)
        with torch.no_grad():
            feats, frames = model.featurize([waves[i] for i in idx])
            if augment:
                feats = _spec_augment(feats, frames, gen)
        logp, lengths = model(feats, frames)  # (B, T', classes)
        tgt = [targets[i] for i in idx]
        return F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), lengths, torch.tensor([len(t) for t in tgt]),
                          blank=BLANK, zero_infinity=True)

    report = None if progress is None else (lambda step, total, loss: progress(step - 1, loss))
    # Linear warm-up over a tenth of the steps (at most 100), then cosine to 5% (nmm.optim's schedule).
    losses = fit(model, opt, loss_at, steps, lr, max(1, min(100, steps // 10)), 0.05, report, clip=1.0)
    seconds = time.perf_counter() - start
    model.eval()
    stats = {"steps": steps, "seconds": seconds, "first_loss": float(np.mean(losses[:20])),
             "last_loss": float(np.mean(losses[-20:])), "losses": losses}
    return model, stats


def transcribe(model: SpeechRecognizer, waves: list[np.ndarray]) -> list[str]:
    return model.transcribe(waves)


def cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus character error rate: total character edits / total reference characters."""
    import jiwer

    _check_pairs(refs, hyps)
    return float(jiwer.cer(list(refs), list(hyps)))


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    import jiwer

    _check_pairs(refs, hyps)
    return float(jiwer.wer(list(refs), list(hyps)))


def _check_pairs(refs, hyps) -> None:
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need matching non-empty references and hypotheses, got {len(refs)} and {len(hyps)}")
    if any(not r.strip() for r in refs):
        raise ValueError("references must be non-empty (an error rate divides by their length)")
