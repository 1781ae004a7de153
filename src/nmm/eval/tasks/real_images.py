"""Real-image tasks: scikit-learn digits and Fashion-MNIST, after a short fine-tune of the run.

Each task measures both directions on the data set's held-out images:

- reading (M2T): image -> caption, greedy; the caption is right when it names the image's class
  (the class word, "seven" / "sneaker", as whole words; naming two classes counts as wrong);
- drawing (M2G): class caption -> image, sampled with the eval settings; an independent CNN
  trained only on real training images (`nmm.eval.real_judge`) says which class it shows.

`prepare` fine-tunes a copy of the model on the training split (`nmm.eval.finetune`, cached by
weights, data and settings) and trains or loads the judge. The judge's accuracy on the same real
held-out images is reported beside the generation accuracy as its ceiling, and again after the
run's own image tokenizer round trip (encode, decode): what a perfect model with this tokenizer
could score, and with how varied the pictures are (a prototype per class can score as well as
real images). Preprocessing and what survives the tokenizer are described in `nmm.eval.real_data`.

Knobs (tests, experiments): options={"digits": {"finetune": FinetuneConfig(...),
"judge": JudgeConfig(...), "finetune_images": 2000}}.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from nmm.eval.finetune import FinetuneConfig, load_or_finetune
from nmm.eval.real_data import (
    DIGIT_CAPTIONS,
    FASHION_CAPTIONS,
    FORMAT_VERSION,
    IMAGE_SIZE,
    RealDataset,
    balanced_indices,
    digits_unavailable,
    fashion_unavailable,
    lit_mask,
    load_digits_dataset,
    load_fashion_mnist,
)
from nmm.eval.real_judge import JudgeConfig, judge_predict, load_or_train_judge
from nmm.eval.stats import bootstrap
from nmm.eval.task import EvalContext, SplitResult, Task, register


@dataclass(frozen=True, eq=False)
class Item:
    image: np.ndarray  # (32, 32, 3) uint8, a real held-out image in the tokenizer's format
    label: int


@dataclass
class Outputs:
    captions: list[str]  # one per item: the model's caption of the item's image
    images: np.ndarray | None  # (N, 32, 32, 3) uint8: the model's picture for the item's class caption
    # (None for a model that reads images but cannot write them: late and mid fusion)


def can_draw(pipe) -> bool:
    """Whether the model can generate images (early fusion can; late and mid fusion only read them)."""
    return "M2G" in getattr(getattr(pipe.model, "images", None), "capabilities", ("M2G",))


def parse_class(caption: str, classes: tuple[str, ...]) -> int | None:
    """The one class a caption names (as whole words), or None when it names none or several.

    Words keep inner hyphens, so "t-shirt" is not read as "shirt"."""
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())
    found = set()
    for i, name in enumerate(classes):
        phrase = name.split()
        if any(words[j:j + len(phrase)] == phrase for j in range(len(words) - len(phrase) + 1)):
            found.add(i)
    return found.pop() if len(found) == 1 else None


def confusion(truth: np.ndarray, predicted: list[int | None], labels: tuple[str, ...]) -> dict:
    """Rows: true class; columns: predicted class, plus "none" when the output names no single class."""
    columns = list(labels) + (["none"] if any(p is None for p in predicted) else [])
    matrix = np.zeros((len(labels), len(columns)), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[int(t), len(labels) if p is None else int(p)] += 1
    return {"labels": list(labels), "predicted_labels": columns, "matrix": matrix.tolist()}


def within_class_spread(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: the mean fraction of pixels whose lit mask differs from the other images of its
    class (NaN when it is alone in its class). Low = the pictures of a class are all alike."""
    masks = lit_mask(images).reshape(len(images), -1).astype(bool)
    out = np.full(len(images), np.nan)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > 1:
            x = masks[idx]
            distance = (x[:, None, :] != x[None, :, :]).mean(-1)  # (k, k), zero diagonal
            out[idx] = distance.sum(1) / (len(idx) - 1)
    return out


def _spread_ratio(generated: np.ndarray, real: np.ndarray) -> float:
    if np.isnan(real).all():  # a bootstrap resample without two images of one class
        return float("nan")
    return float(np.nanmean(generated) / max(np.nanmean(real), 1e-12))


class RealImageTask(Task):
    kind = "M2T+M2G"
    modalities = ("text", "image")
    world = None  # any run with a 32x32 image tokenizer: the data come with the task
    splits = ("heldout",)
    headline = ("caption_accuracy", "generation_accuracy")
    finetune_config = FinetuneConfig()
    judge_config = JudgeConfig()
    finetune_images = 6000  # training images tokenised for the fine-tune (more than 120 steps can use)
    captions: tuple[str, ...] = ()  # one per class

    # ---- what subclasses provide ------------------------------------------------------------------
    def data_unavailable(self) -> str | None:
        raise NotImplementedError

    def load_data(self) -> RealDataset:
        raise NotImplementedError

    # ---- shared machinery -------------------------------------------------------------------------
    def _option(self, ctx: EvalContext, key: str, default):
        return ctx.options.get(self.name, {}).get(key, default)

    def unavailable(self, ctx: EvalContext) -> str | None:
        reason = super().unavailable(ctx)
        if reason:
            return reason
        codecs = ctx.pipe.codecs
        size = codecs.image.config.image_size
        if size != IMAGE_SIZE:
            return f"needs a {IMAGE_SIZE}x{IMAGE_SIZE} image tokenizer; this run's reads {size}x{size}"
        # <bos> caption <boi> image <eoi> <eos>: the longest document the fine-tune packs.
        need = max(len(codecs.encode_text(c)) for c in self.captions) + codecs.vocab.tokens_per_image + 4
        if need > ctx.pipe.model.cfg.max_seq_len:
            return f"needs a context of {need} tokens; this model's is {ctx.pipe.model.cfg.max_seq_len}"
        return self.data_unavailable()

    def data(self, ctx: EvalContext) -> RealDataset:
        key = (self.name, "data")
        if key not in ctx.memo:
            ctx.memo[key] = self.load_data()
        return ctx.memo[key]

    def judge(self, ctx: EvalContext):
        """(judge network, its metadata), trained once per machine and cached."""
        key = (self.name, "judge")
        if key not in ctx.memo:
            cfg = self._option(ctx, "judge", self.judge_config)
            ctx.memo[key] = load_or_train_judge(self.data(ctx), ctx.cache_dir, cfg, log=ctx.log)
        return ctx.memo[key]

    def adapted(self, ctx: EvalContext):
        """The fine-tuned copy of ctx.pipe (a Pipeline)."""
        key = (self.name, "adapted")
        if key not in ctx.memo:
            data = self.data(ctx)
            ft = self._option(ctx, "finetune", self.finetune_config)
            if not can_draw(ctx.pipe):  # teach only what the model can do (as the trainer's check_roles)
                ft = dataclasses.replace(ft, roles={"captioning": 1.0})
            n = self._option(ctx, "finetune_images", self.finetune_images)
            # A fixed, class-balanced subset: the same images for every run, so fine-tunes compare.
            idx = balanced_indices(data.train_labels, n, seed=1)
            captions = [data.caption(label) for label in data.train_labels[idx]]
            data_key = f"{data.name}/format{FORMAT_VERSION}/{len(data.train_labels)}/{n}"
            pipe, info = load_or_finetune(ctx.pipe, ctx.cfg, self.name, data.train_images[idx], captions, ft,
                                          ctx.cache_dir, data_key=data_key, log=ctx.log)
            ctx.memo[key] = pipe
            ctx.memo[(self.name, "finetune_info")] = info
        return ctx.memo[key]

    def prepare(self, ctx: EvalContext) -> None:
        self.adapted(ctx)
        if can_draw(ctx.pipe):  # the judge only reads generated pictures
            self.judge(ctx)

    def build(self, ctx: EvalContext, split: str) -> list[Item]:
        data = self.data(ctx)
        # Classes cycle 0..9, so every class is equally represented; n is capped by the held-out set.
        idx = balanced_indices(data.test_labels, ctx.ec.n_samples, ctx.seed(self.name, split, "items"))
        return [Item(data.test_images[i], int(data.test_labels[i])) for i in idx]

    def predict(self, ctx: EvalContext, items: list[Item]) -> Outputs:
        pipe, ec, data = self.adapted(ctx), ctx.ec, self.data(ctx)
        images = np.stack([it.image for it in items])
        captions: list[str] = []
        for i in range(0, len(images), ec.batch_size * 2):  # greedy: a caption has one right answer
            chunk = images[i:i + ec.batch_size * 2]
            captions += pipe.caption(chunk, batch_size=len(chunk), max_new_tokens=24)
        if not can_draw(pipe):
            ctx.advance(len(items))
            return Outputs(captions, None)
        prompts = [data.caption(it.label) for it in items]
        drawn = []
        for b, chunk in enumerate(ctx.chunks(prompts)):  # as EvalContext.generate_images, with the copy
            drawn.append(pipe.generate_images(list(chunk), cfg_scale=ec.cfg_scale, temperature=ec.temperature,
                                              top_k=ec.top_k, top_p=ec.top_p, seed=ec.seed + b,
                                              batch_size=len(chunk)))
        return Outputs(captions, np.concatenate(drawn))

    def oracle(self, ctx: EvalContext, items: list[Item]) -> Outputs:
        """The class captions, and the real held-out images as the "drawings"."""
        data = self.data(ctx)
        return Outputs([data.caption(it.label) for it in items], np.stack([it.image for it in items]))

    def score(self, ctx: EvalContext, split: str, items: list[Item], outputs: Outputs) -> SplitResult:
        data = self.data(ctx)
        n_images = len(items) if outputs.images is None else len(outputs.images)
        if len(outputs.captions) != len(items) or n_images != len(items):
            raise ValueError(f"{self.name}: {len(items)} items but {len(outputs.captions)} captions and "
                             f"{n_images} images")
        truth = np.array([it.label for it in items])
        real = np.stack([it.image for it in items])
        said = [parse_class(c, data.classes) for c in outputs.captions]

        def m(name, values):
            return ctx.mean(values, self.name, split, name)

        metrics = {
            "caption_accuracy": m("caption_accuracy", [s == t for s, t in zip(said, truth)]),
            "caption_exact": m("caption_exact", [c.strip() == data.caption(t)
                                                 for c, t in zip(outputs.captions, truth)]),
            "caption_parse_rate": m("caption_parse_rate", [s is not None for s in said]),
        }
        k = self.report_samples // 2
        samples = [{"title": f"{data.classes[t]}: {c or '(empty)'}", "ok": bool(s == t), "direction": "caption",
                    "label": data.classes[t], "caption": c}
                   for t, c, s in zip(truth[:k], outputs.captions[:k], said[:k])]
        pictures = [real[:k]]
        matrices = {"caption": confusion(truth, said, data.classes)}
        judge_meta = None
        if outputs.images is not None:
            net, judge_meta = self.judge(ctx)
            drawn = judge_predict(net, np.asarray(outputs.images))
            on_real = judge_predict(net, real)
            codecs = ctx.pipe.codecs  # the tokenizer is not fine-tuned: the run's own
            on_roundtrip = judge_predict(net, codecs.decode_images(codecs.encode_images(real)))
            metrics.update({
                "generation_accuracy": m("generation_accuracy", drawn == truth),
                # The judge's own accuracy on the real images of the same items: the ceiling.
                "judge_accuracy_real": m("judge_accuracy_real", on_real == truth),
                # ... and on them after the run's tokenizer round trip: a perfect model's ceiling.
                "judge_accuracy_roundtrip": m("judge_accuracy_roundtrip", on_roundtrip == truth),
            })
            # A generator that draws one perfect picture per class would score the judge's best,
            # so report how varied its pictures are next to the real ones: 1 = as varied, 0 = one
            # picture per class. Needs two items of a class (n >= 20).
            spread_gen, spread_real = within_class_spread(outputs.images, truth), within_class_spread(real, truth)
            if not np.isnan(spread_real).all():
                metrics["generation_diversity"] = bootstrap(_spread_ratio, [spread_gen, spread_real],
                                                            ctx.seed(self.name, split, "diversity"), ctx.resamples)
            samples += [{"title": f"drew {data.classes[t]}; judge: {data.classes[d]}", "ok": bool(d == t),
                         "direction": "generation", "label": data.classes[t], "judged": data.classes[d]}
                        for t, d in zip(truth[:k], drawn[:k])]
            pictures.append(np.asarray(outputs.images[:k]))
            matrices["generation (judge)"] = confusion(truth, list(drawn), data.classes)
            matrices["judge on real images"] = confusion(truth, list(on_real), data.classes)
        return SplitResult(metrics, samples, np.concatenate(pictures), matrices,
                           extra={"judge": judge_meta, "finetune": ctx.memo.get((self.name, "finetune_info"))})


@register
class Digits(RealImageTask):
    name = "digits"
    title = "scikit-learn digits, after a short fine-tune: image -> class caption, caption -> image"
    captions = DIGIT_CAPTIONS

    def data_unavailable(self) -> str | None:
        return digits_unavailable()

    def load_data(self) -> RealDataset:
        return load_digits_dataset()


@register
class FashionMNIST(RealImageTask):
    name = "fashion_mnist"
    title = "Fashion-MNIST, after a short fine-tune: image -> class caption, caption -> image"
    # 60k training images: more steps pay off (held-out 0.79 at 300, 0.85 at 1000, ~15 CPU s). No
    # shifts: the garments are centred, in the data and in what a fine-tuned model draws.
    judge_config = JudgeConfig(steps=1000, max_shift=0)
    captions = FASHION_CAPTIONS

    def data_unavailable(self) -> str | None:
        return fashion_unavailable()

    def load_data(self) -> RealDataset:
        return load_fashion_mnist()
