"""Video captioning (M2T): a clip of the moving shapes world plays; the model writes its caption
("a large blue square at the left moves one cell right and a small red circle at the top appears"),
which is parsed back and compared with what the clip shows.

Splits: "heldout" is fresh clips of the training distribution; "heldout_combo" has at least one
kind/motion pair never seen in training (a triangle moving up, ...), and may hold held-out
colour/kind pairs too.

Metrics (means over clips; an unparseable caption scores 0):
  exact       the caption is entirely right: the first frame's shapes and every event
  attributes  per-attribute accuracy: the first frame's shapes' kind, colour, size and position
              (matched as in shapes captioning), and each true event's action, direction, distance
              and new colour where it has them (found by its shape), all averaged
  first_frame the first frame's shapes (kind, colour, size, position) are all right
  events      events named right, over the larger of the true and the written event count
  parsed      the output parses as a caption at all
Headline: exact.
"""

from __future__ import annotations

import base64
from collections import Counter

import numpy as np

from nmm.data.moving_shapes import Clip, ClipDescription, MovingShapesWorld
from nmm.data.video_source import make_moving_world
from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.modalities.video import write_gif

SPLITS = ("heldout", "heldout_combo")
WORLD_SPLIT = {"heldout": "train", "heldout_combo": "heldout_combo"}
REPORT_CLIPS = 12


def moving_world(ctx: EvalContext) -> MovingShapesWorld:
    if "moving_world" not in ctx.memo:
        ctx.memo["moving_world"] = make_moving_world(ctx.cfg)
    return ctx.memo["moving_world"]


def eval_clips(ctx: EvalContext, task: str, split: str) -> list[Clip]:
    if split not in WORLD_SPLIT:
        raise ValueError(f"unknown split {split!r} for {task}; expected one of {SPLITS}")
    return moving_world(ctx).clips(ctx.ec.n_samples, ctx.seed(task, split), WORLD_SPLIT[split])


def filmstrip(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) -> (H, F*W + F-1, 3): the frames side by side, 1 px grey between them."""
    F, H, W, _ = frames.shape
    strip = np.full((H, F * W + F - 1, 3), 90, dtype=np.uint8)
    for i, f in enumerate(frames):
        strip[:, i * (W + 1) : i * (W + 1) + W] = f
    return strip


def gif_data_uri(ctx: EvalContext, frames: np.ndarray) -> str:
    """The clip as an animated GIF for the report, at the run's `video.fps`."""
    return "data:image/gif;base64," + base64.b64encode(write_gif(frames, ctx.cfg.video.fps)).decode()


def attribute_accuracy(truth: ClipDescription, got: ClipDescription | None) -> float:
    """Mean over the first frame's shape attributes (compare_scenes) and the true events' attributes
    (action, direction, distance, new colour: those the event has), each event found by its shape."""
    if got is None:
        return 0.0
    scene = compare_scenes(truth.first, got.first)
    checks = [scene[a] for a in ATTRIBUTES]
    by_shape = {(e.shape.colour, e.shape.kind): e for e in got.events}
    for e in truth.events:
        mine = by_shape.get((e.shape.colour, e.shape.kind))
        checks.append(float(mine is not None and mine.action == e.action))
        if e.action == "moves":
            checks += [float(mine is not None and mine.direction == e.direction), float(mine is not None and mine.cells == e.cells)]
        elif e.action == "changes colour":
            checks.append(float(mine is not None and mine.colour == e.colour))
    return float(np.mean(checks))


@register
class VideoCaptioning(Task):
    name = "video_captioning"
    title = "clip -> caption; exact match, first frame and events (held-out combinations too)"
    kind = "M2T"
    modalities = ("text", "video")
    world = "moving_shapes"
    splits = SPLITS
    flat_prefix = "vcap"
    headline = ("attributes", "exact")
    report_samples = REPORT_CLIPS

    def build(self, ctx: EvalContext, split: str) -> list[tuple[Clip, np.ndarray]]:
        world = moving_world(ctx)
        return [(c, world.render(c)) for c in eval_clips(ctx, self.name, split)]

    def predict(self, ctx: EvalContext, items) -> list[str]:
        world = moving_world(ctx)
        room = max(48, max((len(ctx.pipe.codecs.encode_text(world.caption(c))) for c, _ in items), default=0) + 8)
        out: list[str] = []
        for chunk in ctx.chunks(items):  # greedy: a caption has one right answer
            out += ctx.pipe.describe("video", [f for _, f in chunk], batch_size=len(chunk), max_new_tokens=room)
        return out

    def oracle(self, ctx: EvalContext, items) -> list[str]:
        world = moving_world(ctx)
        return [world.caption(c) for c, _ in items]

    def score(self, ctx: EvalContext, split: str, items, outputs: list[str]) -> SplitResult:
        world = moving_world(ctx)
        rows = []
        for (clip, _), text in zip(items, outputs):
            got, truth = world.parse_caption(text), clip.description()
            shown = sum((Counter(truth.events) & Counter(got.events)).values()) if got else 0
            rows.append({"exact": got == truth, "attributes": attribute_accuracy(truth, got),
                         "first_frame": got is not None and got.first == truth.first,
                         "events": shown / max(len(truth.events), len(got.events) if got else 0, 1),
                         "parsed": got is not None, "caption": text, "target": world.caption(clip)})
        metrics = {m: ctx.mean([float(r[m]) for r in rows], self.name, split, m)
                   for m in ("exact", "attributes", "first_frame", "events", "parsed")}
        k = self.report_samples
        samples = [{"title": f"{r['target']} → {r['caption'] or '(nothing)'}", "ok": bool(r["exact"]),
                    "target": r["target"], "caption": r["caption"], "video": gif_data_uri(ctx, f)}
                   for r, (_, f) in zip(rows[:k], items[:k])]
        images = np.stack([filmstrip(f) for _, f in items[:k]]) if items else None
        return SplitResult(metrics, samples, images, extra={"rows": rows})
