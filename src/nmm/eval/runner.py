"""`nmm eval RUN_DIR`: run every first-generation task and write `eval/results.json`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

from nmm.config import RunConfig
from nmm.eval.judge import ShapesJudge
from nmm.eval.shapes_eval import SPLITS, eval_scenes, m2g_generation, m2t_captioning, m2t_qa
from nmm.modalities.text import english_corpus
from nmm.train.prepare import make_world
from nmm.utils import atomic_write_json


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate(pipe, cfg: RunConfig, out_dir: Path, log=print) -> tuple[dict, dict]:
    """Returns (flat metrics, artefacts for the report: sample rows and images)."""
    ec = cfg.eval
    world = make_world(cfg)
    judge = ShapesJudge(world)
    metrics: dict = {}
    artefacts: dict = {}
    t0 = time.time()
    for split in SPLITS:
        prefix = "" if split == "heldout" else f"{split}_"
        scenes = eval_scenes(world, ec.n_samples, ec.seed, split)
        m2t, cap_rows = m2t_captioning(pipe, world, scenes, batch_size=ec.batch_size * 2)
        qa = m2t_qa(pipe, world, scenes, ec.seed, batch_size=ec.batch_size * 2)
        m2g, gen_rows, images = m2g_generation(pipe, world, judge, scenes, ec.cfg_scale, ec.temperature, ec.seed,
                                               ec.batch_size, ec.top_k, ec.top_p)
        metrics.update({f"{prefix}m2t_{k}": v for k, v in m2t.items()})
        metrics.update({f"{prefix}qa_{k}": v for k, v in qa.items()})
        metrics.update({f"{prefix}m2g_{k}": v for k, v in m2g.items()})
        artefacts[split] = {"scenes": scenes[:24], "captions": cap_rows[:24], "generations": gen_rows[:24],
                            "images": images[:24], "real": np.stack([world.render(s) for s in scenes[:24]])}
        log(f"  {split:14s} M2T exact {m2t['exact_match']:.3f} attr {m2t['attribute_accuracy']:.3f} | "
            f"QA {qa['accuracy']:.3f} | M2G judged {m2g['judged_accuracy']:.3f} attr {m2g['attribute_accuracy']:.3f}")
    heldout_text = english_corpus("heldout")[:100]
    metrics["text_perplexity"] = pipe.perplexity([t.lower() for t in heldout_text])
    metrics["eval_samples_per_split"] = ec.n_samples
    metrics["eval_minutes"] = round((time.time() - t0) / 60, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {"metrics": metrics, "eval_config": vars(ec), "git": git_revision()})
    return metrics, artefacts
