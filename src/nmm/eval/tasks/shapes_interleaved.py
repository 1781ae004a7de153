"""Interleaved generation (M2M): from the start of a caption, write the rest of it, then draw it.

The prompt is `<bos>` + the first shape's phrase ("a small red circle at the top left"). The
engine runs with images allowed: the model continues the text, opens `<boi>` when it chooses, and
the state machine makes it emit exactly one image. The rest of the scene is the model's choice,
so the ground truth is the model's own text: the image is judged against the scene the text
describes, and the text must be a well-formed caption that keeps the prompted shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmm.data.shapes import Scene, Shape
from nmm.eval.judge import ATTRIBUTES, compare_scenes
from nmm.eval.scenes import SCENE_SEED, SPLITS
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.infer.sampling import SamplingConfig

TEXT_BUDGET = 48  # new text tokens before the image: two more shape phrases fit easily


@dataclass(frozen=True)
class Prefix:
    scene: Scene  # a scene the prompt could belong to (only its first shape is in the prompt)

    @property
    def shape(self) -> Shape:
        return self.scene.shapes[0]


@dataclass
class Interleaved:
    text: str  # prompt + continuation, up to <boi>
    image: np.ndarray | None  # (H, W, 3) uint8, None if the model never opened an image


@register
class ShapesInterleaved(Task):
    name = "shapes_interleaved"
    title = "caption start -> rest of the caption + an image; both judged"
    kind = "M2M"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "interleaved"
    headline = ("joint_accuracy", "text_image_agreement")

    def unavailable(self, ctx: EvalContext) -> str | None:
        reason = super().unavailable(ctx)
        if reason is None:
            need = 24 + ctx.pipe.vocab.tokens_per_image + 2  # a short prefix, <boi> codes <eoi>
            if ctx.pipe.model.cfg.max_seq_len < need:
                reason = f"needs a context of at least {need} tokens, the model has {ctx.pipe.model.cfg.max_seq_len}"
        return reason

    def build(self, ctx: EvalContext, split: str) -> list[Prefix]:
        world, n = ctx.world, ctx.ec.n_samples
        rng = np.random.default_rng(SCENE_SEED + ctx.ec.seed + 11)
        items: list[Prefix] = []
        for _ in range(n * 50):
            if len(items) == n:
                break
            scene = world.sample_scene(rng, SPLITS[split])
            # On heldout_combo the prompted (first) shape itself is the unseen combination.
            if split != "heldout_combo" or (scene.shapes[0].colour, scene.shapes[0].kind) in world.heldout:
                items.append(Prefix(scene))
        return items

    def prompt(self, ctx: EvalContext, item: Prefix) -> str:
        return ctx.world.caption(Scene((item.shape,)))

    def predict(self, ctx: EvalContext, items: list[Prefix]) -> list[Interleaved]:
        pipe, ec = ctx.pipe, ctx.ec
        v, n_img = pipe.vocab, pipe.vocab.tokens_per_image
        out: list[Interleaved] = []
        for i, chunk in enumerate(ctx.chunks(items)):
            prompts = [pipe.codecs.prompt([self.prompt(ctx, it)]) for it in chunk]
            new = min(TEXT_BUDGET + n_img + 1, pipe.model.cfg.max_seq_len - max(map(len, prompts)))
            sampling = SamplingConfig(temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p, seed=ec.seed + i)
            res = pipe.engine.generate(prompts, new, sampling, allow_images=True, stop_after_image=True)
            texts, codes = [], []
            for prompt, tokens in zip(prompts, res.tokens):
                cut = tokens.index(v.boi) if v.boi in tokens else len(tokens)
                texts.append(pipe.codecs.decode_text(prompt[1:] + tokens[:cut]).strip())
                image = tokens[cut + 1:cut + 1 + n_img]
                codes.append(image if len(image) == n_img else None)  # cut short by the context
            drawn = [c for c in codes if c is not None]
            decoded = iter(pipe.codecs.decode_images(np.array(drawn)) if drawn else [])  # (M, H, W, 3)
            out += [Interleaved(t, next(decoded) if c is not None else None) for t, c in zip(texts, codes)]
        return out

    def oracle(self, ctx: EvalContext, items: list[Prefix]) -> list[Interleaved]:
        return [Interleaved(ctx.world.caption(it.scene), ctx.world.render(it.scene)) for it in items]

    def score(self, ctx: EvalContext, split: str, items: list[Prefix], outputs: list[Interleaved]) -> SplitResult:
        world, rows = ctx.world, []
        for it, out in zip(items, outputs):
            said = world.parse_caption(out.text)  # the scene the text describes, or None
            drawn = ctx.judge.parse(out.image) if out.image is not None else None
            text_ok = said is not None and world.is_valid(said) and any(
                s.attributes() == it.shape.attributes() for s in said.shapes)
            agree = said is not None and drawn is not None and drawn == said
            soft = compare_scenes(said, drawn) if said is not None and drawn is not None else None
            rows.append({
                "text_valid": text_ok,
                "image_emitted": drawn is not None,
                "prompted_shape_drawn": drawn is not None and any(
                    s.attributes() == it.shape.attributes() for s in drawn.shapes),
                "text_image_agreement": agree,
                "agreement_attribute_accuracy": float(np.mean([soft[a] for a in ATTRIBUTES])) if soft else 0.0,
                "joint_accuracy": text_ok and agree,
            })
        metrics = {name: ctx.mean([r[name] for r in rows], self.name, split, name) for name in rows[0]} if rows else {}
        k = self.report_samples
        samples = [{"title": o.text or "(no text)", "ok": bool(r["joint_accuracy"]), "prompt": self.prompt(ctx, it),
                    "text": o.text, "image_emitted": r["image_emitted"]}
                   for it, o, r in zip(items[:k], outputs, rows)]
        blank = np.zeros((world.image_size, world.image_size, 3), np.uint8)  # no image: shown black
        pictures = np.stack([o.image if o.image is not None else blank for o in outputs[:k]]) if outputs else None
        return SplitResult(metrics, samples, pictures)
