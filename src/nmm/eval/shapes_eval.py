"""First evaluation tasks on the shapes world: M2T captioning and QA, M2G generation, text perplexity.

Every task runs on two splits: `heldout` (fresh scenes from the training distribution, never in
the training pool) and `heldout_combo` (scenes containing a colour/kind combination that never
appeared in training). Scores come from parsing (captions) or judging (images), never from the
model itself.
"""

from __future__ import annotations

import numpy as np

from nmm.data.shapes import Scene, ShapesWorld
from nmm.eval.judge import ATTRIBUTES, ShapesJudge, compare_scenes

SPLITS = {"heldout": "train", "heldout_combo": "heldout_combo"}  # our split name -> world split


def eval_scenes(world: ShapesWorld, n: int, seed: int, split: str) -> list[Scene]:
    # Seed offset keeps evaluation scenes disjoint in practice from the training pool's seed.
    return world.scenes(n, 10_000 + seed, SPLITS[split])


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([float(r[key]) for r in rows])) if rows else 0.0


def m2t_captioning(pipe, world: ShapesWorld, scenes: list[Scene], batch_size: int = 64) -> tuple[dict, list[dict]]:
    images = np.stack([world.render(s) for s in scenes])
    captions = pipe.caption(images, batch_size=batch_size)
    rows = []
    for scene, text in zip(scenes, captions):
        parsed = world.parse_caption(text)
        score = compare_scenes(scene, parsed if parsed is not None else Scene(()))
        rows.append({"caption": text, "target": world.caption(scene), "parsed": parsed is not None, **score})
    metrics = {
        "attribute_accuracy": float(np.mean([[r[a] for a in ATTRIBUTES] for r in rows])),
        "exact_match": _mean(rows, "exact"),
        "parse_rate": _mean(rows, "parsed"),
        **{f"{a}_accuracy": _mean(rows, a) for a in ATTRIBUTES},
    }
    return metrics, rows


def m2t_qa(pipe, world: ShapesWorld, scenes: list[Scene], seed: int, batch_size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    qas = [world.question_answer(s, rng) for s in scenes]
    images = np.stack([world.render(s) for s in scenes])
    answers = pipe.answer(images, [q for q, _, _ in qas], batch_size=batch_size)
    by_type: dict[str, list[bool]] = {}
    for (_, truth, qtype), ans in zip(qas, answers):
        by_type.setdefault(qtype, []).append(ans.strip() == truth)
    out = {f"{t}_accuracy": float(np.mean(v)) for t, v in sorted(by_type.items())}
    out["accuracy"] = float(np.mean([x for v in by_type.values() for x in v]))
    return out


def m2g_generation(pipe, world: ShapesWorld, judge: ShapesJudge, scenes: list[Scene], cfg_scale: float,
                   temperature: float, seed: int, batch_size: int = 32, top_k=None, top_p=None):
    prompts = [world.caption(s) for s in scenes]
    images = pipe.generate_images(prompts, cfg_scale=cfg_scale, temperature=temperature, seed=seed,
                                  batch_size=batch_size, top_k=top_k, top_p=top_p)
    rows = [{"prompt": p, **judge.score(img, s)} for p, img, s in zip(prompts, images, scenes)]
    metrics = {
        "judged_accuracy": _mean(rows, "exact"),
        "attribute_accuracy": float(np.mean([[r[a] for a in ATTRIBUTES] for r in rows])),
        "count_accuracy": _mean(rows, "count"),
        **{f"{a}_accuracy": _mean(rows, a) for a in ATTRIBUTES},
    }
    return metrics, rows, images
