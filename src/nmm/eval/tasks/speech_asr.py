"""Speech recognition (M2T): held-out voices speak; the model transcribes; CER and WER (jiwer).

Voices are the axis held out: none of these eSpeak NG voices was heard in training. The texts come
from the same world (digits, numbers, words, sentences), drawn with the evaluation's own seed.
"""

from __future__ import annotations

import numpy as np

from nmm.eval.speech import (
    edit_counts,
    error_rate,
    spectrograms,
    speech_world,
    wav_data_uri,
)
from nmm.eval.task import EvalContext, SplitResult, Task, register

REPORT_AUDIO = 12  # examples with a player in the report (each is a few tens of kB)


@register
class SpeechRecognition(Task):
    name = "speech_asr"
    title = "speech -> text, held-out voices; character / word error rate"
    kind = "M2T"
    modalities = ("text", "audio")
    world = "speech"
    flat_prefix = "asr"
    headline = ("cer", "wer")
    lower_is_better = frozenset({"cer", "wer"})
    report_samples = REPORT_AUDIO

    def build(self, ctx: EvalContext, split: str) -> list[tuple[str, np.ndarray]]:
        world = speech_world(ctx)
        pairs = world.utterances(ctx.ec.n_samples, ctx.seed(self.name, split), "heldout")
        return [(text, world.render(text, voice)) for text, voice in pairs]

    def predict(self, ctx: EvalContext, items) -> list[str]:
        out = []
        for chunk in ctx.chunks(items):
            out += ctx.pipe.transcribe([w for _, w in chunk], batch_size=len(chunk))
        return out

    def oracle(self, ctx: EvalContext, items) -> list[str]:
        return [t for t, _ in items]

    def score(self, ctx: EvalContext, split: str, items, outputs: list[str]) -> SplitResult:
        refs = [t for t, _ in items]
        hyps = [h.strip().lower() for h in outputs]
        metrics = {
            "cer": error_rate(ctx, refs, hyps, "char", self.name, split, "cer"),
            "wer": error_rate(ctx, refs, hyps, "word", self.name, split, "wer"),
            "exact": ctx.mean([float(r == h) for r, h in zip(refs, hyps)], self.name, split, "exact"),
        }
        edits, lengths = edit_counts(refs, hyps)
        k = self.report_samples
        samples = [{"title": f"{r} → {h or '(nothing)'}", "ok": r == h, "reference": r, "transcript": h,
                    "cer": float(e / max(n, 1)), "audio": wav_data_uri(w)}
                   for (r, w), h, e, n in zip(items[:k], hyps, edits, lengths)]
        return SplitResult(metrics, samples, spectrograms([w for _, w in items[:k]]))
