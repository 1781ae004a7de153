"""Spoken caption -> image (M2M, audio in, image out): a held-out voice speaks a shapes caption,
the model draws it, the shapes judge reads the picture. Needs a run on `data.source=shapes+speech`
(role `spoken_generation`); the same judge and scenes as `shapes_t2i`, so the two compare directly.
"""

from __future__ import annotations

import numpy as np

from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.scenes import SPLITS
from nmm.eval.speech import speech_world
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.eval.tasks.shapes_t2i import t2i_scenes
from nmm.infer.sampling import SamplingConfig
from nmm.modalities.document import ItemSegment


@register
class SpokenTextToImage(Task):
    name = "spoken_t2i"
    title = "spoken caption (held-out voice) -> image; judged"
    kind = "M2M"
    modalities = ("text", "image", "audio")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "spoken_m2g"
    headline = ("judged_accuracy", "attribute_accuracy")

    def build(self, ctx: EvalContext, split: str) -> list[tuple]:
        """(scene, its caption spoken by a held-out voice). A long caption in a slow voice can exceed
        what the codec takes (as in training, which leaves such utterances out): another voice is
        drawn, and a scene no voice fits is dropped."""
        world = speech_world(ctx)
        voices = world.voices("heldout")
        limit = ctx.pipe.codecs.codec("audio").config.max_seconds * 16_000
        rng = np.random.default_rng(ctx.seed(self.name, split))
        items = []
        for scene in t2i_scenes(ctx, split):
            for _ in range(8):
                wave = world.render(ctx.world.caption(scene), voices[rng.integers(len(voices))])
                if len(wave) <= limit:
                    items.append((scene, wave))
                    break
        return items

    def predict(self, ctx: EvalContext, items: list[tuple]) -> np.ndarray:
        pipe, ec, out = ctx.pipe, ctx.ec, []
        uncond = pipe.item_prompt("image", "")
        for i, chunk in enumerate(ctx.chunks(items)):
            ids = pipe.codecs.encode_items("audio", [w for _, w in chunk])
            prompts = [pipe.codecs.prompt([ItemSegment("audio", codes=c)], open_item="image") for c in ids]
            sampling = SamplingConfig(temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p,
                                      cfg_scale=ec.cfg_scale, seed=ec.seed + i)
            out.append(pipe.item_codes("image", prompts, sampling, uncond=uncond))
        return pipe.codecs.decode_images(np.concatenate(out))

    def oracle(self, ctx: EvalContext, items: list[tuple]) -> np.ndarray:
        return np.stack([ctx.world.render(s) for s, _ in items])

    def score(self, ctx: EvalContext, split: str, items: list[tuple], outputs: np.ndarray) -> SplitResult:
        scenes = [s for s, _ in items]
        rows = [compare_scenes(t, ctx.judge.parse(img)) for t, img in zip(scenes, outputs)]

        def m(name, values):
            return ctx.mean(values, self.name, split, name)

        metrics = {"judged_accuracy": m("judged_accuracy", [r["exact"] for r in rows]),
                   "attribute_accuracy": m("attribute_accuracy", [np.mean([r[a] for a in ATTRIBUTES]) for r in rows])}
        k = self.report_samples
        samples = [{"title": f"(spoken) {ctx.world.caption(s)}", "ok": bool(r["exact"])} for s, r in zip(scenes[:k], rows)]
        return SplitResult(metrics, samples, np.asarray(outputs[:k]))
