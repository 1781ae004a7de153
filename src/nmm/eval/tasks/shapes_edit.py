"""Shapes image editing (M2M): image + instruction -> image, judged against the edited scene."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmm.data.shapes import COLOURS, SIZES, Scene
from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.scenes import SCENE_SEED, SPLITS, render, side_by_side
from nmm.eval.task import EvalContext, SplitResult, Task, register

OPERATIONS = ("move", "recolour", "resize", "remove")


@dataclass(frozen=True)
class Edit:
    source: Scene
    instruction: str
    target: Scene

    @property
    def operation(self) -> str:
        first, last = self.instruction.split()[0], self.instruction.split()[-1]
        if first in ("move", "remove"):
            return first
        return "recolour" if last in COLOURS else "resize" if last in SIZES else "other"


@register
class ShapesEdit(Task):
    name = "shapes_edit"
    title = "image + instruction -> image; judged against the edited scene"
    kind = "M2M"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "edit"
    headline = ("exact_match", "attribute_accuracy")
    lower_is_better = frozenset({"copied_input_rate"})

    def build(self, ctx: EvalContext, split: str) -> list[Edit]:
        # Its own seed offset: edit sources need not match the captioning scenes.
        rng = np.random.default_rng(SCENE_SEED + ctx.ec.seed + 7)
        edits: list[Edit] = []
        for _ in range(ctx.ec.n_samples * 20):  # a scene with no possible edit is rare; bounded anyway
            if len(edits) == ctx.ec.n_samples:
                break
            scene = ctx.world.sample_scene(rng, SPLITS[split])
            edit = ctx.world.edit(scene, rng)
            if edit is not None:
                edits.append(Edit(scene, *edit))
        return edits

    def predict(self, ctx: EvalContext, items: list[Edit]) -> np.ndarray:
        ec, out = ctx.ec, []
        for i, chunk in enumerate(ctx.chunks(items)):
            images = render(ctx.world, [e.source for e in chunk])  # (B, H, W, 3)
            out.append(ctx.pipe.edit(images, [e.instruction for e in chunk], temperature=ec.temperature,
                                     seed=ec.seed + i))
        return np.concatenate(out)  # (N, H, W, 3)

    def oracle(self, ctx: EvalContext, items: list[Edit]) -> np.ndarray:
        return render(ctx.world, [e.target for e in items])

    def score(self, ctx: EvalContext, split: str, items: list[Edit], outputs: np.ndarray) -> SplitResult:
        parsed = [ctx.judge.parse(img) for img in outputs]
        rows = [compare_scenes(e.target, p) for e, p in zip(items, parsed)]

        def m(name, values):
            return ctx.mean(values, self.name, split, name)

        metrics = {
            "exact_match": m("exact_match", [r["exact"] for r in rows]),
            "attribute_accuracy": m("attribute_accuracy", [np.mean([r[a] for a in ATTRIBUTES]) for r in rows]),
            "count_accuracy": m("count_accuracy", [r["count"] for r in rows]),
            **{f"{a}_accuracy": m(f"{a}_accuracy", [r[a] for r in rows]) for a in ATTRIBUTES},
            # The typical failure of a weak editor: returning the input unchanged.
            "copied_input_rate": m("copied_input_rate", [p == e.source for e, p in zip(items, parsed)]),
        }
        for op in OPERATIONS:
            hits = [r["exact"] for e, r in zip(items, rows) if e.operation == op]
            if hits:
                metrics[f"{op}_accuracy"] = m(f"{op}_accuracy", hits)
        k = self.report_samples
        samples = [{"title": e.instruction, "ok": bool(r["exact"]), "instruction": e.instruction,
                    "operation": e.operation, "target": ctx.world.caption(e.target)}
                   for e, r in zip(items[:k], rows)]
        pictures = side_by_side(render(ctx.world, [e.source for e in items[:k]]), np.asarray(outputs[:k]))
        return SplitResult(metrics, samples, pictures)
