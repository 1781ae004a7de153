"""Tone synthesis (M2G): the model plays a caption ("slow square : c4 short e4 long"); the rule-based
`PitchJudge` (YIN pitch tracking, run lengths for durations and tempo, harmonic levels for timbre)
reads the melody back out of the waveform and scores it against the caption's scene.

Splits as in tone_captioning: "heldout" is fresh captions of the training distribution,
"heldout_combo" asks for (timbre, pitch) combinations never heard in training.

Metrics (means over scenes, each item scored as `PitchJudge.score(wave, scene)` does):
  note      the pitch-judge accuracy, the headline: of the positions of the longer of the asked-for and
            the heard note sequences, the share where the heard note has the asked-for pitch and
            duration (notes aligned by position; a missing or extra note costs its position)
  exact     the whole melody is right: every note, their number, timbre and tempo
  pitch     as `note`, pitch alone
  count     the number of notes heard is the number asked for
  timbre, tempo   the majority timbre / tempo heard is the one asked for
  silent    the judge heard no note at all (lower is better)
  seconds   length of the generated audio

The oracle (clean renders of the scenes) scores 1 on everything: the judge reads clean audio
exactly, so the ceiling a model can reach is the audio codec's (a render through the codec).
"""

from __future__ import annotations

import math

import numpy as np

from nmm.data.tones import DURATIONS, PAD_S, TEMPOS, PitchJudge, ToneScene
from nmm.eval.speech import spectrograms, wav_data_uri
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.eval.tasks.tone_captioning import (
    SPLITS,
    compare,
    pitch_confusion,
    tone_metrics,
    tone_scenes,
    tone_world,
)
from nmm.modalities.audio_features import SAMPLE_RATE

REPORT_AUDIO = 12
SLACK_S = 1.0  # generated audio may run this much past the longest melody before it is cut off


def judge(ctx: EvalContext) -> PitchJudge:
    if "pitch_judge" not in ctx.memo:
        ctx.memo["pitch_judge"] = PitchJudge()
    return ctx.memo["pitch_judge"]


@register
class ToneSynthesis(Task):
    name = "tone_synthesis"
    title = "caption -> melody; pitch-judge note accuracy and exact match (held-out combinations too)"
    kind = "M2G"
    modalities = ("text", "audio")
    world = "tones"
    splits = SPLITS
    flat_prefix = "tsyn"
    headline = ("note", "exact")
    lower_is_better = frozenset({"silent"})
    report_samples = REPORT_AUDIO

    def build(self, ctx: EvalContext, split: str) -> list[ToneScene]:
        return tone_scenes(ctx, self.name, split)

    def predict(self, ctx: EvalContext, items: list[ToneScene]) -> list[np.ndarray]:
        world, ec = tone_world(ctx), ctx.ec
        longest = world.max_notes * max(DURATIONS.values()) * max(TEMPOS.values()) + 2 * PAD_S
        cap = math.ceil(ctx.pipe.codecs.codec("audio").tokens_per_second * (longest + SLACK_S))
        out: list[np.ndarray] = []
        for i, chunk in enumerate(ctx.chunks(items)):
            out += ctx.pipe.speak([world.caption(s) for s in chunk], cfg_scale=ec.audio_cfg_scale,
                                  temperature=ec.temperature, seed=ec.seed + i, batch_size=len(chunk),
                                  max_tokens=cap)
        return out

    def oracle(self, ctx: EvalContext, items: list[ToneScene]) -> list[np.ndarray]:
        world = tone_world(ctx)
        return [world.render(s) for s in items]

    def score(self, ctx: EvalContext, split: str, items: list[ToneScene], outputs: list[np.ndarray]) -> SplitResult:
        world, pj = tone_world(ctx), judge(ctx)
        rows, heard = [], []
        for scene, wave in zip(items, outputs):
            read = pj.read_scene(wave)
            heard.append(read)
            # compare(scene, read) is PitchJudge.score(wave, scene), without reading the wave twice.
            rows.append({**compare(scene, read), "silent": read is None, "seconds": len(wave) / SAMPLE_RATE,
                         "caption": world.caption(scene), "heard": world.caption(read) if read is not None else ""})
        metrics = tone_metrics(ctx, self.name, split, rows, ("silent", "seconds"))
        k = self.report_samples
        samples = [{"title": f"{r['caption']} → heard: {r['heard'] or '(nothing)'}", "ok": bool(r["exact"]),
                    "caption": r["caption"], "heard": r["heard"], "note": float(r["note"]),
                    "audio": wav_data_uri(w)}
                   for r, w in zip(rows[:k], outputs[:k])]
        return SplitResult(metrics, samples, spectrograms(list(outputs[:k])),
                           {"pitch": pitch_confusion(list(items), heard)}, extra={"rows": rows})
