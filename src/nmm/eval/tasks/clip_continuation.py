"""Clip continuation (the world model's task): the model sees the first half of a clip of the moving
shapes world (4 of 8 frames) and writes the rest; the clip judge reads the whole clip back.

Splits as in video_captioning. A shape that starts moving keeps going (or stops) as the world's
physics says; one that appears or changes colour in the second half is not predictable from the
first, so `exact` is bounded below 1 by the world itself. Metrics (means over clips, the clip judge's):
  exact        the whole clip shows the clip's first frame and every event, nothing else
  events       events shown, over the larger of the true and the shown count
  frames       per-frame attribute accuracy over all frames
  timing       events at exactly the true frames
  oracle_bound the share of clips whose events all start in the given half (roughly what a perfect
               model could get exactly right: an event that starts later cannot be foreseen)
"""

from __future__ import annotations

import numpy as np

from nmm.data.video_source import continuation_split
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.eval.tasks.text_to_clip import judged_clips
from nmm.eval.tasks.video_captioning import (
    REPORT_CLIPS,
    SPLITS,
    eval_clips,
    moving_world,
)
from nmm.infer.sampling import SamplingConfig

METRICS = ("exact", "events", "frames", "timing")


@register
class ClipContinuation(Task):
    name = "clip_continuation"
    title = "first half of a clip -> the rest; clip-judge exact, events and frames"
    kind = "M2M"
    modalities = ("video",)
    world = "moving_shapes"
    splits = SPLITS
    flat_prefix = "vcont"
    headline = ("exact", "events")
    report_samples = REPORT_CLIPS

    def build(self, ctx: EvalContext, split: str):
        world = moving_world(ctx)
        return [(c, world.render(c)) for c in eval_clips(ctx, self.name, split)]

    def predict(self, ctx: EvalContext, items) -> list[np.ndarray]:
        codecs, v = ctx.pipe.codecs, ctx.pipe.vocab
        ids = codecs.encode_items("video", np.stack([f for _, f in items]))
        cap = codecs.codec("video").max_tokens
        out = []
        for i, chunk in enumerate(ctx.chunks(list(range(len(items))))):
            given = [np.asarray(ids[j])[: continuation_split(codecs, ids[j])] for j in chunk]
            prompts = [[v.bos, v.begin("video"), *map(int, g)] for g in given]
            sampling = SamplingConfig(temperature=ctx.ec.temperature, seed=ctx.ec.seed + i)
            rest = ctx.pipe.item_codes("video", prompts, sampling, uncond=None, max_tokens=max(1, cap - min(map(len, given))))
            out += list(codecs.decode_items("video", [np.concatenate([g, r]) for g, r in zip(given, rest)]))
        return out

    def oracle(self, ctx: EvalContext, items) -> list[np.ndarray]:
        return [f for _, f in items]

    def score(self, ctx: EvalContext, split: str, items, outputs) -> SplitResult:
        half = moving_world(ctx).frames // 2

        def oracle_bound(clip) -> dict:  # every event starts in the given half: it can be foreseen
            return {"oracle_bound": all(e.frames and e.frames[0] < half for e in clip.events)}

        return judged_clips(self, ctx, split, [c for c, _ in items], outputs, METRICS, oracle_bound)
