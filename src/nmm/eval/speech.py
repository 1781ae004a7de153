"""What the speech tasks share: the speech world, the independent recogniser (trained once and
cached), per-item edit counts with corpus-level rates, and report material (spectrograms, players).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

from nmm.data.speech import SpeechWorld
from nmm.eval.speech_judge import SpeechRecognizer, train_recognizer
from nmm.eval.stats import Estimate, bootstrap
from nmm.eval.task import EvalContext
from nmm.modalities.audio_features import SAMPLE_RATE, LogMel

RECOGNIZER_VERSION = 1  # bump when the recogniser's data or recipe changes: the cache is rebuilt
RECOGNIZER_UTTERANCES = 4000  # real eSpeak utterances of train voices it learns from
RECOGNIZER_SEED = 424_242  # its own utterances, not the language model's training pool


def speech_world(ctx: EvalContext) -> SpeechWorld:
    if "speech_world" not in ctx.memo:
        ctx.memo["speech_world"] = SpeechWorld()
    return ctx.memo["speech_world"]


def recognizer(ctx: EvalContext) -> SpeechRecognizer:
    """The ruler for generated speech: trained only on real audio of train voices, cached under
    `ctx.cache_dir` (shared by every run on this machine, like the image feature network)."""
    if "recognizer" in ctx.memo:
        return ctx.memo["recognizer"]
    opts = dict(ctx.options.get("speech_recognizer", {}))  # tests: {"utterances": 64, "steps": 10}
    utterances, steps = int(opts.get("utterances", RECOGNIZER_UTTERANCES)), opts.get("steps")
    tag = "" if not opts else f"_{utterances}x{steps}"
    folder = Path(ctx.cache_dir) / f"speech_recognizer_v{RECOGNIZER_VERSION}{tag}"
    if (folder / "recognizer.safetensors").exists():
        model = SpeechRecognizer.load(folder)
    else:
        world = speech_world(ctx)
        pairs = world.utterances(utterances, RECOGNIZER_SEED, "train")
        ctx.log(f"training the speech recogniser (the judge of generated speech) on {len(pairs)} real utterances")
        kw = {} if steps is None else {"steps": int(steps)}
        model, stats = train_recognizer([world.render(t, v) for t, v in pairs], [t for t, _ in pairs], seed=0, **kw)
        ctx.log(f"speech recogniser: {stats['steps']} steps in {stats['seconds']:.0f}s, loss {stats['last_loss']:.3f}")
        model.save(folder)
    ctx.memo["recognizer"] = model
    return model


def edit_counts(refs: list[str], hyps: list[str], unit: str = "char") -> tuple[np.ndarray, np.ndarray]:
    """Per item: (edits, reference length) in characters or words, so that corpus rates and their
    intervals come from the same counts (sum of edits / sum of lengths, as jiwer's corpus CER)."""
    import jiwer

    process = jiwer.process_characters if unit == "char" else jiwer.process_words
    edits, lengths = [], []
    for r, h in zip(refs, hyps):
        out = process(r, h if h.strip() else "")
        edits.append(out.substitutions + out.deletions + out.insertions)
        lengths.append(out.substitutions + out.deletions + out.hits)
    return np.array(edits, dtype=np.float64), np.array(lengths, dtype=np.float64)


def error_rate(ctx: EvalContext, refs: list[str], hyps: list[str], unit: str, *parts: str) -> Estimate:
    edits, lengths = edit_counts(refs, hyps, unit)
    return bootstrap(lambda e, n: float(e.sum() / max(n.sum(), 1.0)), [edits, lengths], ctx.seed(*parts),
                     ctx.resamples)


def spectrograms(waves: list[np.ndarray], height: int = 64, max_frames: int = 400) -> np.ndarray:
    """Log-mel pictures (K, height, W, 3) uint8, low frequencies at the bottom, one width for all
    (shorter clips padded dark), in matplotlib's viridis."""
    from matplotlib import colormaps

    mel = LogMel(n_mels=height)
    frames = min(max_frames, max(mel.frames(max(len(w), 1)) for w in waves))
    out = np.zeros((len(waves), height, frames, 3), dtype=np.uint8)
    cmap = colormaps["viridis"]
    for i, w in enumerate(waves):
        if len(w) == 0:
            continue
        m = mel(torch.as_tensor(np.asarray(w, dtype=np.float32))[None])[0].numpy()[::-1, :frames]
        m = np.clip((m + 11.5) / 14.0, 0, 1)  # log(1e-5) .. about log(12): silence dark, loud bright
        out[i, :, : m.shape[1]] = (cmap(m)[..., :3] * 255).astype(np.uint8)
    return out


def wav_data_uri(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
    """A WAV (16-bit) as a data: URI, for an <audio> player in the HTML report."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()
