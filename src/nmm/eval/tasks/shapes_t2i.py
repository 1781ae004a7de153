"""Shapes text-to-image (M2G), GenEval-style: generate from a caption, parse the image with the judge.

Prompts are ordinary captions (the only prompt form the model was trained on); the categories
differ in which prompts they use and what they check, as in GenEval. Exact definitions are in
docs/evaluation.md. Extra shapes are forgiven by the object categories (a detector-based
benchmark cannot see them either) but not by `counting` or `judged_accuracy`.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

from nmm.data.shapes import COLOURS, KINDS, Scene
from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.scenes import SPLITS, confusion_by_cell, render, stratified_scenes
from nmm.eval.stats import bootstrap
from nmm.eval.task import EvalContext, SplitResult, Task, register


def _contains(parsed: Scene, target: Scene, key) -> bool:
    """Every target shape has its own parsed shape with equal `key(shape)` (a multiset test)."""
    return not (Counter(map(key, target.shapes)) - Counter(map(key, parsed.shapes)))


# category -> (shape count of the prompts it uses, or None for all; per-item check)
CATEGORIES = {
    "single_object": (1, lambda p, t: _contains(p, t, lambda s: s.kind)),
    "two_objects": (2, lambda p, t: _contains(p, t, lambda s: s.kind)),
    "counting": (None, lambda p, t: len(p.shapes) == len(t.shapes)),
    "colours": (1, lambda p, t: _contains(p, t, lambda s: (s.kind, s.colour))),
    "position": (2, lambda p, t: _contains(p, t, lambda s: (s.kind, s.colour, s.cell))),
    "attribute_binding": (2, lambda p, t: _contains(p, t, lambda s: (s.kind, s.colour))),
}


def _overall(table: np.ndarray) -> float:
    """Mean over categories of each category's mean over the prompts it applies to."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a category entirely
        return float(np.nanmean(np.nanmean(table, axis=0)))


def t2i_scenes(ctx: EvalContext, split: str) -> list[Scene]:
    """The prompts' scenes, shared with the Fréchet-distance task (same prompts, one generation)."""
    return stratified_scenes(ctx.world, ctx.ec.n_samples, ctx.ec.seed, split)


@register
class ShapesTextToImage(Task):
    name = "shapes_t2i"
    title = "caption -> image; GenEval-style categories, judged"
    kind = "M2G"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "m2g"
    headline = ("geneval_overall", "judged_accuracy")

    def build(self, ctx: EvalContext, split: str) -> list[Scene]:
        return t2i_scenes(ctx, split)

    def predict(self, ctx: EvalContext, items: list[Scene]) -> np.ndarray:
        return ctx.generate_images([ctx.world.caption(s) for s in items])  # (N, H, W, 3)

    def oracle(self, ctx: EvalContext, items: list[Scene]) -> np.ndarray:
        return render(ctx.world, items)

    def score(self, ctx: EvalContext, split: str, items: list[Scene], outputs: np.ndarray) -> SplitResult:
        parsed = [ctx.judge.parse(img) for img in outputs]
        rows = [compare_scenes(t, p) for t, p in zip(items, parsed)]

        def m(name, values):
            return ctx.mean(values, self.name, split, name)

        metrics = {
            "judged_accuracy": m("judged_accuracy", [r["exact"] for r in rows]),
            "attribute_accuracy": m("attribute_accuracy", [np.mean([r[a] for a in ATTRIBUTES]) for r in rows]),
            "count_accuracy": m("count_accuracy", [r["count"] for r in rows]),
            **{f"{a}_accuracy": m(f"{a}_accuracy", [r[a] for r in rows]) for a in ATTRIBUTES},
        }
        # (N, categories): 1/0 where the category applies to the prompt, NaN where it does not.
        table = np.array([[float(check(p, t)) if count is None or len(t.shapes) == count else np.nan
                           for count, check in CATEGORIES.values()] for p, t in zip(parsed, items)])
        used = ~np.isnan(table).all(0)  # a category is absent when the world has no such prompts
        for j, category in enumerate(CATEGORIES):
            if used[j]:
                column = table[:, j]
                metrics[f"geneval_{category}"] = m(f"geneval_{category}", column[~np.isnan(column)])
        # GenEval's overall: the unweighted mean of the category scores. Its interval resamples
        # prompts (not categories), since one prompt counts in several categories.
        metrics["geneval_overall"] = bootstrap(_overall, [table[:, used]], ctx.seed(self.name, split, "overall"),
                                               ctx.resamples)
        k = self.report_samples
        prompts = [ctx.world.caption(s) for s in items]
        samples = [{"title": prompt, "ok": bool(r["exact"]), "prompt": prompt, "exact": bool(r["exact"]),
                    "judged": ctx.world.caption(p) if p.shapes else "(nothing)"}
                   for prompt, r, p in zip(prompts[:k], rows, parsed)]
        confusion = {"kind": confusion_by_cell(items, parsed, "kind", KINDS),
                     "colour": confusion_by_cell(items, parsed, "colour", tuple(COLOURS))}
        return SplitResult(metrics, samples, np.asarray(outputs[:k]), confusion,
                           extra={"scenes": items, "rows": rows})
