"""`evaluate`: the first-generation entry point used by `nmm demo`, now a thin layer over the task
harness. It runs the four original tasks (captioning, QA, text-to-image, perplexity) afresh and
returns flat metrics plus in-memory examples for the demo report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nmm.eval.harness import evaluate_tasks, git_revision  # noqa: F401  (git_revision: old import path)

DEMO_TASKS = ("shapes_captioning", "shapes_qa", "shapes_t2i", "shapes_edit", "text_perplexity")
ARTEFACT_SAMPLES = 24


def evaluate(pipe, cfg, out_dir: Path, log=print) -> tuple[dict, dict]:
    """Returns (flat metrics, artefacts for the report: sample rows and images per split).

    Flat keys: m2t_* (captioning), qa_*, m2g_* (text-to-image), each with a `heldout_combo_`
    twin, and text_perplexity. results.json in out_dir gets the full records with intervals.
    """
    t0 = time.time()
    # No eval/report.html here: the demo writes its own report, and its time budget is tight.
    outcome = evaluate_tasks(pipe, cfg, out_dir, tasks=DEMO_TASKS, log=log, force=True, progress=False,
                             strict=True, report=False)
    metrics = dict(outcome.metrics)
    metrics["eval_samples_per_split"] = cfg.eval.n_samples
    metrics["eval_minutes"] = round((time.time() - t0) / 60, 3)
    artefacts = {}
    captioning, t2i = outcome.fresh.get("shapes_captioning", {}), outcome.fresh.get("shapes_t2i", {})
    for split in captioning.keys() & t2i.keys():
        cap, gen = captioning[split], t2i[split]
        k = ARTEFACT_SAMPLES
        artefacts[split] = {
            "scenes": cap.extra["scenes"][:k],
            "captions": cap.samples[:k],  # rows with "caption", "target", "exact"
            "generations": gen.samples[:k],  # rows with "prompt", "exact"
            "images": np.asarray(gen.images[:k]),  # generated, (k, H, W, 3)
            "real": np.asarray(cap.images[:k]),  # the captioned images, (k, H, W, 3)
        }
    return metrics, artefacts
