"""Shapes visual question answering (M2T): one question per held-out image, exact-match answers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmm.data.shapes import COLOURS, KINDS, Scene
from nmm.eval.scenes import SPLITS, eval_scenes, render
from nmm.eval.task import EvalContext, SplitResult, Task, register

QUESTION_TYPES = ("colour", "kind", "count", "position", "size")


@dataclass(frozen=True)
class Question:
    scene: Scene
    question: str
    answer: str
    qtype: str  # one of QUESTION_TYPES


@register
class ShapesQA(Task):
    name = "shapes_qa"
    title = "image + question -> answer; accuracy per question type"
    kind = "M2T"
    modalities = ("text", "image")
    world = "shapes"
    splits = tuple(SPLITS)
    flat_prefix = "qa"
    headline = ("accuracy",)

    def build(self, ctx: EvalContext, split: str) -> list[Question]:
        # The same scenes as captioning; the question rng depends only on eval.seed.
        rng = np.random.default_rng(ctx.ec.seed)
        scenes = eval_scenes(ctx.world, ctx.ec.n_samples, ctx.ec.seed, split)
        return [Question(s, *ctx.world.question_answer(s, rng)) for s in scenes]

    def predict(self, ctx: EvalContext, items: list[Question]) -> list[str]:
        answers: list[str] = []
        for chunk in ctx.chunks(items, ctx.ec.batch_size * 2):
            images = render(ctx.world, [q.scene for q in chunk])  # (B, H, W, 3)
            answers += ctx.pipe.answer(images, [q.question for q in chunk], batch_size=len(chunk),
                                       caption_first=ctx.cfg.data.qa_caption_first)
        return answers

    def oracle(self, ctx: EvalContext, items: list[Question]) -> list[str]:
        return [q.answer for q in items]

    def score(self, ctx: EvalContext, split: str, items: list[Question], outputs: list[str]) -> SplitResult:
        correct = [a.strip().lower() == q.answer for q, a in zip(items, outputs)]
        metrics = {"accuracy": ctx.mean(correct, self.name, split, "accuracy")}
        for qtype in QUESTION_TYPES:
            hits = [c for q, c in zip(items, correct) if q.qtype == qtype]
            if hits:  # a type can be absent from a very small sample
                metrics[f"{qtype}_accuracy"] = ctx.mean(hits, self.name, split, qtype)
        k = self.report_samples
        samples = [{"title": f"{q.question} {a or '(empty)'}", "ok": bool(c), "question": q.question,
                    "answer": a, "truth": q.answer, "qtype": q.qtype}
                   for q, a, c in zip(items[:k], outputs, correct)]
        confusion = {f"{qtype} answers": _answer_confusion(items, outputs, qtype, labels)
                     for qtype, labels in (("colour", tuple(COLOURS)), ("kind", KINDS))}
        return SplitResult(metrics, samples, render(ctx.world, [q.scene for q in items[:k]]),
                           {name: c for name, c in confusion.items() if c is not None})


def _answer_confusion(items: list[Question], outputs: list[str], qtype: str, labels: tuple[str, ...]) -> dict | None:
    pairs = [(q.answer, a.strip().lower()) for q, a in zip(items, outputs) if q.qtype == qtype]
    if not pairs:
        return None
    columns = list(labels) + ["other"]
    matrix = np.zeros((len(labels), len(columns)), dtype=int)
    for truth, answer in pairs:
        matrix[labels.index(truth), columns.index(answer) if answer in labels else -1] += 1
    return {"labels": list(labels), "predicted_labels": columns, "matrix": matrix.tolist()}
