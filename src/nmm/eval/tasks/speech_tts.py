"""Speech synthesis (M2G): the model speaks a sentence; the independent recogniser (trained on
real eSpeak NG audio only) transcribes it; intelligibility = its CER against the sentence.

The ceiling is the audio codec's: real speech through the codec (`audio_codec`) is as intelligible
as generated speech can get; the recogniser's error on real speech is the ruler's own.
"""

from __future__ import annotations

import numpy as np

from nmm.eval.speech import (
    edit_counts,
    error_rate,
    recognizer,
    spectrograms,
    speech_world,
    wav_data_uri,
)
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.modalities.audio_features import SAMPLE_RATE

REPORT_AUDIO = 12


@register
class SpeechSynthesis(Task):
    name = "speech_tts"
    title = "text -> speech; intelligibility (CER of an independent recogniser)"
    kind = "M2G"
    modalities = ("text", "audio")
    world = "speech"
    flat_prefix = "tts"
    headline = ("cer",)
    lower_is_better = frozenset({"cer", "wer", "empty"})
    report_samples = REPORT_AUDIO

    def prepare(self, ctx: EvalContext) -> None:
        recognizer(ctx)

    def build(self, ctx: EvalContext, split: str) -> list[str]:
        world = speech_world(ctx)
        rng = np.random.default_rng(ctx.seed(self.name, split))
        return [world.sample_text(rng) for _ in range(ctx.ec.n_samples)]

    def predict(self, ctx: EvalContext, items: list[str]) -> list[np.ndarray]:
        ec, out = ctx.ec, []
        for i, chunk in enumerate(ctx.chunks(items)):
            out += ctx.pipe.speak(list(chunk), cfg_scale=ec.audio_cfg_scale, temperature=ec.temperature,
                                  seed=ec.seed + i, batch_size=len(chunk))
        return out

    def oracle(self, ctx: EvalContext, items: list[str]) -> list[np.ndarray]:
        world = speech_world(ctx)
        voice = world.voices("heldout")[0]
        return [world.render(t, voice) for t in items]

    def score(self, ctx: EvalContext, split: str, items: list[str], outputs: list[np.ndarray]) -> SplitResult:
        hyps = recognizer(ctx).transcribe(list(outputs))
        seconds = [len(w) / SAMPLE_RATE for w in outputs]
        metrics = {
            "cer": error_rate(ctx, items, hyps, "char", self.name, split, "cer"),
            "wer": error_rate(ctx, items, hyps, "word", self.name, split, "wer"),
            "exact": ctx.mean([float(r == h) for r, h in zip(items, hyps)], self.name, split, "exact"),
            "empty": ctx.mean([float(len(w) == 0) for w in outputs], self.name, split, "empty"),
            "seconds": ctx.mean(seconds, self.name, split, "seconds"),
        }
        edits, lengths = edit_counts(items, hyps)
        k = self.report_samples
        samples = [{"title": f"{r} → heard: {h or '(nothing)'}", "ok": r == h, "text": r, "heard": h,
                    "cer": float(e / max(n, 1)), "audio": wav_data_uri(w)}
                   for r, h, w, e, n in zip(items[:k], hyps, outputs, edits, lengths)]
        return SplitResult(metrics, samples, spectrograms(list(outputs[:k])))
