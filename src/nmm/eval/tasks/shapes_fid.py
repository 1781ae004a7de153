"""Fréchet distance between generated and real shapes images, in the features of nmm's cell reader.

The generated images are the text-to-image task's (same prompts, so they are sampled once per
evaluation); the real images are clean renders of the prompts' scenes, the same number, so the
distance is "how far the model's pictures are from what the captions describe" in distribution.
Fréchet distances shrink as n grows, so they are only comparable at equal n: n is always
eval.n_samples and is stored with the value. `fid_real_floor` is the distance between two
independent real sets of that n: the best a perfect generator could expect to score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmm.data.shapes import Scene
from nmm.eval.features import FeatureNetConfig, embed, load_or_train_feature_net
from nmm.eval.scenes import SPLITS, render, stratified_scenes
from nmm.eval.stats import bootstrap, frechet_distance
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.eval.tasks.shapes_t2i import t2i_scenes

FID_RESAMPLES = 200  # each resample is an eigendecomposition: fewer than the default 1000


@dataclass(frozen=True)
class Prompt:
    scene: Scene
    reference: Scene  # an independent scene of the same kind, for the real-vs-real floor


@register
class ShapesFID(Task):
    name = "shapes_fid"
    title = "Fréchet distance of generated vs real images (nmm's cell-reader features)"
    kind = "M2G"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "m2g"
    headline = ("fid",)
    lower_is_better = frozenset({"fid", "fid_real_floor"})

    def prepare(self, ctx: EvalContext) -> None:
        cfg = ctx.options.get(self.name, {}).get("feature_net", FeatureNetConfig())
        net, meta = load_or_train_feature_net(ctx.world, ctx.cache_dir, cfg, log=ctx.log)
        ctx.memo["feature_net"] = (net, meta)

    def build(self, ctx: EvalContext, split: str) -> list[Prompt]:
        references = stratified_scenes(ctx.world, ctx.ec.n_samples, ctx.ec.seed + 1, split)
        return [Prompt(s, r) for s, r in zip(t2i_scenes(ctx, split), references)]

    def predict(self, ctx: EvalContext, items: list[Prompt]) -> np.ndarray:
        return ctx.generate_images([ctx.world.caption(p.scene) for p in items])  # (N, H, W, 3)

    def oracle(self, ctx: EvalContext, items: list[Prompt]) -> np.ndarray:
        return render(ctx.world, [p.scene for p in items])

    def score(self, ctx: EvalContext, split: str, items: list[Prompt], outputs: np.ndarray) -> SplitResult:
        if "feature_net" not in ctx.memo:
            self.prepare(ctx)
        net, meta = ctx.memo["feature_net"]
        generated = embed(net, np.asarray(outputs))  # (N, F)
        real = embed(net, render(ctx.world, [p.scene for p in items]))  # (N, F)
        reference = embed(net, render(ctx.world, [p.reference for p in items]))  # (N, F)
        # Paired resampling: the i-th generated and real images share a prompt.
        metrics = {
            "fid": bootstrap(frechet_distance, [generated, real], ctx.seed(self.name, split, "fid"), FID_RESAMPLES),
            "fid_real_floor": bootstrap(frechet_distance, [reference, real], ctx.seed(self.name, split, "floor"),
                                        FID_RESAMPLES),
        }
        # No gallery: the pictures are the text-to-image task's, shown there.
        return SplitResult(metrics, extra={"feature_net": {"key": meta.get("key"),
                                                           "cell_accuracy": meta.get("cell_accuracy")}})
