"""Shapes captioning (M2T): describe a held-out image; the caption is parsed back into a scene."""

from __future__ import annotations

import numpy as np

from nmm.data.shapes import COLOURS, KINDS, Scene
from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.scenes import SPLITS, confusion_by_cell, eval_scenes, render
from nmm.eval.task import EvalContext, SplitResult, Task, register


@register
class ShapesCaptioning(Task):
    name = "shapes_captioning"
    title = "image -> caption; exact match and per-attribute accuracy"
    kind = "M2T"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "m2t"
    headline = ("exact_match", "attribute_accuracy")

    def build(self, ctx: EvalContext, split: str) -> list[Scene]:
        return eval_scenes(ctx.world, ctx.ec.n_samples, ctx.ec.seed, split)

    def predict(self, ctx: EvalContext, items: list[Scene]) -> list[str]:
        images = render(ctx.world, items)  # (N, H, W, 3)
        captions: list[str] = []
        # Greedy decoding: a caption has one right answer, so sampling would only add noise.
        for chunk in ctx.chunks(images, ctx.ec.batch_size * 2):
            captions += ctx.pipe.caption(chunk, batch_size=len(chunk))
        return captions

    def oracle(self, ctx: EvalContext, items: list[Scene]) -> list[str]:
        return [ctx.world.caption(s) for s in items]

    def score(self, ctx: EvalContext, split: str, items: list[Scene], outputs: list[str]) -> SplitResult:
        world = ctx.world
        parsed = [world.parse_caption(text) for text in outputs]
        rows = []
        for scene, text, p in zip(items, outputs, parsed):
            s = compare_scenes(scene, p if p is not None else Scene(()))
            rows.append({"caption": text, "target": world.caption(scene), "parsed": p is not None, **s})

        def m(name, values):
            return ctx.mean(values, self.name, split, name)

        metrics = {
            "exact_match": m("exact_match", [r["exact"] for r in rows]),
            "attribute_accuracy": m("attribute_accuracy", [np.mean([r[a] for a in ATTRIBUTES]) for r in rows]),
            "parse_rate": m("parse_rate", [r["parsed"] for r in rows]),
            "count_accuracy": m("count_accuracy", [r["count"] for r in rows]),
            **{f"{a}_accuracy": m(f"{a}_accuracy", [r[a] for r in rows]) for a in ATTRIBUTES},
        }
        k = self.report_samples
        samples = [{"title": r["caption"] or "(empty)", "ok": bool(r["exact"]), "caption": r["caption"],
                    "target": r["target"], "exact": bool(r["exact"])} for r in rows[:k]]
        confusion = {"kind": confusion_by_cell(items, parsed, "kind", KINDS),
                     "colour": confusion_by_cell(items, parsed, "colour", tuple(COLOURS))}
        return SplitResult(metrics, samples, render(world, items[:k]), confusion,
                           extra={"scenes": items, "rows": rows})
