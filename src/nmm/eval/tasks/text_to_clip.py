"""Text -> clip (M2G): the model makes a clip from a caption of the moving shapes world; the clip
judge (per-frame shapes judge, then tracking) reads what the clip shows and scores it against the
caption's clip.

Splits as in video_captioning ("heldout_combo" asks for a held-out kind/motion pair, and may hold
held-out colour/kind pairs too).

Metrics (means over clips, each as `ClipJudge.score`):
  exact        the first frame and every event are right, with no extra events (the headline:
               "every shape and its motion right")
  first_frame  the first frame shows exactly the caption's shapes
  frames       per-frame attribute accuracy against the target clip's frames
  events       events shown, over the larger of the asked-for and the shown event count
  tokens       video tokens the model wrote per clip

The oracle (clean renders) scores 1: the judge reads clean frames exactly, so a model's ceiling is
the video codec's reconstruction (`tokenizer_stats.json`: video.reconstruction).
"""

from __future__ import annotations

import numpy as np

from nmm.eval.clip_judge import ClipJudge
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.eval.tasks.video_captioning import (
    REPORT_CLIPS,
    SPLITS,
    eval_clips,
    filmstrip,
    gif_data_uri,
    moving_world,
)

METRICS = ("exact", "first_frame", "frames", "events")


@register
class TextToClip(Task):
    name = "text_to_clip"
    title = "caption -> clip; judged exact (every shape and its motion right), per-frame and event accuracy"
    kind = "M2G"
    modalities = ("text", "video")
    world = "moving_shapes"
    splits = SPLITS
    flat_prefix = "t2v"
    headline = ("exact", "events")
    report_samples = REPORT_CLIPS

    def build(self, ctx: EvalContext, split: str):
        return eval_clips(ctx, self.name, split)

    def predict(self, ctx: EvalContext, items) -> list[np.ndarray]:
        world, ec = moving_world(ctx), ctx.ec
        cap = ctx.pipe.codecs.codec("video").max_tokens
        out: list[np.ndarray] = []
        for i, chunk in enumerate(ctx.chunks(items)):
            out += list(ctx.pipe.generate_items("video", [world.caption(c) for c in chunk], cfg_scale=ec.cfg_scale,
                                                temperature=ec.temperature, seed=ec.seed + i, batch_size=len(chunk),
                                                max_tokens=cap))
        return out

    def oracle(self, ctx: EvalContext, items) -> list[np.ndarray]:
        world = moving_world(ctx)
        return [world.render(c) for c in items]

    def score(self, ctx: EvalContext, split: str, items, outputs) -> SplitResult:
        return judged_clips(self, ctx, split, items, outputs, METRICS)


def judged_clips(task: Task, ctx: EvalContext, split: str, clips, outputs, metrics: tuple[str, ...],
                 extra=lambda clip: {}) -> SplitResult:
    """Clips a model made, read by the clip judge against `clips`: the means of `metrics` (and of each
    `extra(clip)` field), filmstrips and GIFs of the first examples; `extra={"rows": ...}` keeps every row."""
    world = moving_world(ctx)
    if "clip_judge" not in ctx.memo:
        ctx.memo["clip_judge"] = ClipJudge(world)
    judge = ctx.memo["clip_judge"]
    rows = [{**judge.score(np.asarray(f), c), **extra(c), "caption": world.caption(c)} for c, f in zip(clips, outputs)]
    names = (*metrics, *(extra(clips[0]) if clips else ()))
    means = {m: ctx.mean([float(r[m]) for r in rows], task.name, split, m) for m in names}
    k = task.report_samples
    samples = [{"title": r["caption"], "ok": bool(r["exact"]), "caption": r["caption"],
                "video": gif_data_uri(ctx, np.asarray(f))} for r, f in zip(rows[:k], outputs[:k])]
    images = np.stack([filmstrip(np.asarray(f)) for f in outputs[:k]]) if len(outputs) else None
    return SplitResult(means, samples, images, extra={"rows": rows})
