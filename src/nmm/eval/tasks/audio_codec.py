"""The audio codec's ceiling: held-out voices' real speech through the codec and back (codes ->
log-mel -> Griffin-Lim), judged by the independent recogniser, next to the recogniser's error on
the real speech itself (the ruler's own error) and the log-mel distance of the reconstruction.
"""

from __future__ import annotations

import numpy as np
import torch

from nmm.eval.speech import (
    error_rate,
    recognizer,
    spectrograms,
    speech_world,
    wav_data_uri,
)
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.modalities.audio_features import LogMel, mel_distance

REPORT_AUDIO = 8


@register
class AudioCodecQuality(Task):
    name = "audio_codec"
    title = "speech through the audio codec: intelligibility ceiling and mel distance"
    kind = "M2M"
    modalities = ("audio",)
    world = "speech"
    flat_prefix = "codec"
    headline = ("cer", "real_cer")
    lower_is_better = frozenset({"cer", "real_cer", "mel_distance"})
    report_samples = REPORT_AUDIO

    def prepare(self, ctx: EvalContext) -> None:
        recognizer(ctx)

    def build(self, ctx: EvalContext, split: str) -> list[tuple[str, np.ndarray]]:
        world = speech_world(ctx)
        pairs = world.utterances(ctx.ec.n_samples, ctx.seed(self.name, split), "heldout")
        return [(text, world.render(text, voice)) for text, voice in pairs]

    def predict(self, ctx: EvalContext, items) -> list[np.ndarray]:
        codecs, out = ctx.pipe.codecs, []
        for chunk in ctx.chunks(items):
            out += codecs.decode_items("audio", codecs.encode_items("audio", [w for _, w in chunk]))
        return out

    def oracle(self, ctx: EvalContext, items) -> list[np.ndarray]:
        return [w for _, w in items]

    def score(self, ctx: EvalContext, split: str, items, outputs: list[np.ndarray]) -> SplitResult:
        judge, refs = recognizer(ctx), [t for t, _ in items]
        heard = judge.transcribe(list(outputs))
        heard_real = judge.transcribe([w for _, w in items])
        mel = LogMel()
        dist = [mel_distance(mel(torch.as_tensor(np.asarray(o, np.float32))[None]),
                             mel(torch.as_tensor(np.asarray(w, np.float32))[None])) if len(o) else float("nan")
                for (_, w), o in zip(items, outputs)]
        metrics = {
            "cer": error_rate(ctx, refs, heard, "char", self.name, split, "cer"),
            "real_cer": error_rate(ctx, refs, heard_real, "char", self.name, split, "real_cer"),
            "mel_distance": ctx.mean(dist, self.name, split, "mel_distance"),
        }
        k = self.report_samples
        samples = [{"title": f"{r} → heard: {h or '(nothing)'}", "ok": r == h, "text": r, "heard": h,
                    "audio": wav_data_uri(o)} for r, h, o in zip(refs[:k], heard, outputs)]
        return SplitResult(metrics, samples, spectrograms(list(outputs[:k])))
