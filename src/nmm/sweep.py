"""`nmm sweep`: the design space at matched training compute.

A grid of (variant × size) runs on the shapes world. Every run gets the same training budget in
FLOPs, not steps: steps = budget / (3 × forward FLOPs per token × tokens per step), with FLOPs per
token *measured* by `nmm.inspect` on the run's own model (so a MoE pays for its top-k experts only,
mid fusion for its cross-attention, a frozen encoder for its forward). The tokenizers are trained
once and shared, so every run sees identical codes.

Each run is then scored: held-out text loss (captions and answers on unseen scenes, the one loss
every variant has) at four points of its budget (the loss-vs-compute curves), M2T captioning and
M2G judged accuracy from the eval harness (with bootstrap intervals), and for MoE runs the
per-modality expert-routing histogram on held-out data.

Outputs in OUT/: one run directory per point, sweep.csv, sweep.md (the table), sweep.json, and
plots (loss_vs_compute.png, accuracy.png, routing.png).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nmm.config import load_config, save_config
from nmm.utils import atomic_write_json, atomic_write_text

# variant name -> config overrides. A new design point is a line here.
VARIANTS: dict[str, list[str]] = {
    "early-discrete": [],
    "early-continuous": ["model.image_repr=continuous"],
    "early-decoupled": ["model.image_repr=decoupled"],
    "late": ["model.fusion=late", "model.image_repr=continuous"],
    "mid": ["model.fusion=mid", "model.image_repr=continuous"],
    "moe": ["model.routing=moe"],
    "moe-aware": ["model.routing=moe-aware"],
    "mot": ["model.routing=mot"],
}
UNDERSTANDING_ONLY_ROLES = "{captioning: 0.6, qa: 0.3, text: 0.1}"

SIZES: dict[str, list[str]] = {
    "xs": ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64"],
    "s": ["model.d_model=96", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=256"],
    "m": ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=384"],
}


@dataclass
class Grid:
    base: str  # preset the runs start from (data, tokenizer, training recipe)
    variants: list[str]
    sizes: list[str]
    budget_flops: float  # training FLOPs per run
    eval_samples: int
    overrides: list[str] = field(default_factory=list)


GRIDS = {
    # About an hour on 2 CPU cores: 8 variants x 2 sizes at ~2.5 min of training each, plus eval.
    "default": Grid("shapes-demo", list(VARIANTS), ["s", "m"], 8e12, 200,
                    ["model.encoder.pretrain_steps=300", "train.warmup_steps=50"]),
    # Every variant at the smallest size on the quick preset's data and tokenizer: ~20 min on 2 cores.
    "small": Grid("shapes-quick", list(VARIANTS), ["xs"], 2e10, 64,
                  ["train.warmup_steps=10", "model.encoder.pretrain_steps=150", "model.encoder.width=48",
                   "model.encoder.layers=2", "model.flow.sample_steps=12", "model.max_seq_len=192"]),
    # Minutes, for tests and a first look: tiny models, a few steps.
    "quick": Grid("shapes-tiny", ["early-discrete", "early-continuous", "late", "moe"], ["xs"], 2e9, 8,
                  ["train.warmup_steps=2", "model.encoder.pretrain_steps=20", "model.encoder.width=32",
                   "model.encoder.layers=1", "model.flow.sample_steps=4"]),
}


def point_config(grid: Grid, variant: str, size: str, extra: list[str] | None = None):
    overrides = list(grid.overrides) + SIZES[size] + VARIANTS[variant]
    if variant in ("late", "mid"):
        overrides.append(f"data.roles={UNDERSTANDING_ONLY_ROLES}")
    cfg = load_config(grid.base, overrides + list(extra or []))
    cfg.name = f"{variant}-{size}"
    cfg.eval.n_samples = grid.eval_samples
    cfg.train.time_budget_min = None  # compute, not time, is what is matched
    return cfg


def steps_for_budget(cfg, budget_flops: float) -> tuple[int, int]:
    """-> (steps, measured forward FLOPs per token)."""
    from nmm.inspect import build_model, measured_flops_per_token

    model, _ = build_model(cfg)
    fpt = measured_flops_per_token(model, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    return max(4, int(budget_flops / (3 * fpt * tokens_per_step))), fpt


# ---- scoring -----------------------------------------------------------------------------------

def heldout_batches(cfg, codecs, n_batches: int = 4):
    """Captioning and QA documents on scenes the run never saw (another seed): text loss only."""
    from nmm.data.mixture import DocumentMixture, PackedBatches, build_shapes_pool, image_roles
    from nmm.train.prepare import make_world

    world = make_world(cfg)
    pool = build_shapes_pool(world, codecs, 256, seed=cfg.data.seed + 10_007, split="train")
    data = type(cfg.data)(**{**cfg.data.__dict__, "roles": {"captioning": 0.5, "qa": 0.5}})
    mixture = DocumentMixture(data, codecs, image_roles(pool, world, data.caption_dropout, data.qa_per_image, data.input_loss,
                                                           data.qa_caption_first), pool=pool, world=world)
    batches = PackedBatches(mixture, cfg.train.batch_size, cfg.train.seq_len, seed=99_991)
    return [batches.batch(i) for i in range(n_batches)]


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    model.eval()
    losses = [float(model.loss(b.ids, b.targets, b.positions, b.doc_ids, {}, 0.0, b.generated)[1]["loss_text"])
              for b in batches]
    return float(np.mean(losses))


@torch.no_grad()
def routing_histogram(model, batches) -> list[list[list[int]]] | None:
    """Per MoE layer: (modality, expert) token counts over the held-out batches."""
    layers = [m for m in model.modules() if hasattr(m, "expert_counts") and hasattr(m, "router")]
    if not layers:
        return None
    totals = [torch.zeros_like(m.expert_counts) for m in layers]
    for b in batches:
        model.loss(b.ids, b.targets, b.positions, b.doc_ids, {}, 0.0, b.generated)
        for t, m in zip(totals, layers):
            t += m.expert_counts.cpu()
    return [t.tolist() for t in totals]


def score_run(cfg, run_dir: Path, fpt: int, tokens_per_step: int, log=print) -> dict:
    import nmm
    from nmm.eval.harness import evaluate_tasks
    from nmm.train.checkpoint import load_model_weights

    pipe = nmm.load(run_dir, device="cpu")
    batches = heldout_batches(cfg, pipe.codecs)
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        load_model_weights(ckpt, pipe.model)
        curve.append({"step": step, "train_flops": 3.0 * fpt * tokens_per_step * step,
                      "heldout_text_loss": heldout_loss(pipe.model, batches)})
    pipe = nmm.load(run_dir, device="cpu")  # the final weights again
    record = {"heldout_text_loss": heldout_loss(pipe.model, batches), "curve": curve,
              "routing_histogram": routing_histogram(pipe.model, batches)}
    tasks = ["shapes_captioning"] + (["shapes_t2i"] if "M2G" in pipe.model.images.capabilities else [])
    outcome = evaluate_tasks(pipe, cfg, run_dir / "eval", tasks=tasks, log=log, force=True, progress=False,
                             report=False, strict=True)
    for r in outcome.records:
        if r["split"] == "heldout" and r["metric"] in ("exact_match", "attribute_accuracy", "judged_accuracy"):
            key = {"shapes_captioning": "m2t", "shapes_t2i": "m2g"}[r["task"]] + "_" + r["metric"]
            record[key] = {"value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"]}
    return record


# ---- the sweep ---------------------------------------------------------------------------------

def run_sweep(out: Path, grid_name: str = "default", variants: list[str] | None = None, sizes: list[str] | None = None,
              budget_flops: float | None = None, overrides: list[str] | None = None, log=print) -> dict:
    from nmm.inspect import describe_model
    from nmm.train.prepare import prepare_codecs
    from nmm.train.trainer import train

    if grid_name not in GRIDS:
        from nmm.errors import ConfigError

        raise ConfigError(f"unknown grid '{grid_name}' (available: {', '.join(GRIDS)})")
    grid = GRIDS[grid_name]
    grid = Grid(grid.base, variants or grid.variants, sizes or grid.sizes, budget_flops or grid.budget_flops,
                grid.eval_samples, grid.overrides + list(overrides or []))
    _check_names(grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    shared = out / "_codecs"  # tokenizers trained once: every run reads identical codes
    base_cfg = point_config(grid, grid.variants[0], grid.sizes[0])
    if base_cfg.train.threads:
        torch.set_num_threads(base_cfg.train.threads)
    prepare_codecs(base_cfg, shared, log=log)

    results_path = out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"points": {}}
    results.update(grid=grid_name, base=grid.base, budget_flops=grid.budget_flops)
    points = [(v, s) for s in grid.sizes for v in grid.variants]
    for i, (variant, size) in enumerate(points):
        name = f"{variant}-{size}"
        if results["points"].get(name, {}).get("done"):
            log(f"[{i + 1}/{len(points)}] {name}: done before, kept")
            continue
        cfg = point_config(grid, variant, size)
        steps, fpt = steps_for_budget(cfg, grid.budget_flops)
        cfg.train.max_steps = steps
        cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 10))
        cfg.train.ckpt_every = max(1, steps // 4)
        cfg.train.keep_checkpoints = 4
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run restarts cleanly
        run_dir.mkdir(parents=True)
        for f in shared.iterdir():
            shutil.copy2(f, run_dir / f.name)
        save_config(cfg, run_dir / "config.yaml")
        log(f"[{i + 1}/{len(points)}] {name}: {steps} steps at {fpt / 1e6:.2f} MFLOP/token forward")
        t_run = time.time()
        summary = train(cfg, run_dir, show_progress=False, log=lambda *a, **k: None)
        train_s = time.time() - t_run
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
        record = score_run(cfg, run_dir, fpt, tokens_per_step, log=lambda *a, **k: None)
        info = describe_model(cfg)
        record.update(variant=variant, size=size, steps=steps, flops_per_token=fpt,
                      train_flops=3.0 * fpt * tokens_per_step * steps, train_seconds=round(train_s, 1),
                      params_total=info["params_total"], params_active=info["params_active"],
                      fusion=info["fusion"], representation=info["representation"], routing=info["routing"],
                      final_train_loss=summary["final_loss"], done=True)
        results["points"][name] = record
        atomic_write_json(results_path, results)
        log(f"    held-out text loss {record['heldout_text_loss']:.3f}; " + ", ".join(
            f"{k} {record[k]['value']:.3f}" for k in ("m2t_exact_match", "m2t_attribute_accuracy",
                                                      "m2g_judged_accuracy") if k in record)
            + f" ({train_s / 60:.1f} min training)")
    results["minutes"] = round((time.time() - t0) / 60, 2)
    atomic_write_json(results_path, results)
    write_tables(out, results)
    write_plots(out, results)
    return results


def _check_names(grid: Grid) -> None:
    from nmm.errors import ConfigError

    for v in grid.variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown variant '{v}' (available: {', '.join(VARIANTS)})")
    for s in grid.sizes:
        if s not in SIZES:
            raise ConfigError(f"unknown size '{s}' (available: {', '.join(SIZES)})")


# ---- tables and plots --------------------------------------------------------------------------

COLUMNS = ("variant", "size", "fusion", "representation", "routing", "params_total", "params_active",
           "flops_per_token", "steps", "train_flops", "heldout_text_loss", "m2t_exact_match",
           "m2t_attribute_accuracy", "m2g_judged_accuracy", "train_seconds")


def _cell(value) -> str:
    if isinstance(value, dict):
        return f"{value['value']:.3f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.3f}"
    return "–" if value is None else str(value)


def gap(a: dict | None, b: dict | None) -> dict | None:
    """Difference of two estimates with an approximate 95% interval (normal, from each bootstrap CI)."""
    if not a or not b:
        return None
    se = np.hypot((a["ci_high"] - a["ci_low"]) / 3.92, (b["ci_high"] - b["ci_low"]) / 3.92)
    d = a["value"] - b["value"]
    return {"value": d, "ci_low": d - 1.96 * se, "ci_high": d + 1.96 * se}


def write_tables(out: Path, results: dict) -> None:
    rows = [results["points"][k] for k in sorted(results["points"], key=lambda k: (results["points"][k]["size"], k))]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, {}).get("value") if isinstance(r.get(c), dict) else r.get(c) for c in COLUMNS])
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    header = (f"Budget: {results['budget_flops']:.2g} training FLOPs per run (grid `{results['grid']}`, base "
              f"`{results['base']}`). Intervals: bootstrap 95%.")
    lines = [header, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    gaps = []
    for size in sorted({r["size"] for r in rows}):
        dense = results["points"].get(f"early-discrete-{size}")
        for moe in ("moe", "moe-aware", "mot"):
            other = results["points"].get(f"{moe}-{size}")
            if dense and other:
                for metric in ("m2t_exact_match", "m2g_judged_accuracy"):
                    g = gap(other.get(metric), dense.get(metric))
                    if g:
                        gaps.append(f"| {moe} − dense | {size} | {metric} | {_cell(g)} |")
                gaps.append(f"| {moe} − dense | {size} | heldout_text_loss | "
                            f"{other['heldout_text_loss'] - dense['heldout_text_loss']:+.3f} |")
    if gaps:
        intro = ("Sparse vs dense at equal active parameters and equal compute (approximate 95% interval "
                 "of the difference):")
        lines += ["", intro, "", "| comparison | size | metric | gap |", "|---|---|---|---|", *gaps]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")


def write_plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in sorted(points.items()):
        if r.get("curve"):
            ax.plot([c["train_flops"] for c in r["curve"]], [c["heldout_text_loss"] for c in r["curve"]],
                    marker="o", label=name)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out text loss", title="Loss against compute")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_compute.png", dpi=120)
    plt.close(fig)

    names = sorted(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, title in ((axes[0], "m2t_exact_match", "M2T captioning exact match"),
                              (axes[1], "m2g_judged_accuracy", "M2G judged accuracy")):
        vals = [points[n].get(metric) for n in names]
        xs = np.arange(len(names))
        v = np.array([x["value"] if x else np.nan for x in vals])
        lo = np.array([x["value"] - x["ci_low"] if x else 0 for x in vals])
        hi = np.array([x["ci_high"] - x["value"] if x else 0 for x in vals])
        ax.bar(xs, np.nan_to_num(v), yerr=[lo, hi], capsize=3, color="#4c78a8")
        for x, val in zip(xs, vals):
            if val is None:
                ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
        ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=7)
        ax.set(ylim=(0, 1), title=f"{title} (equal compute)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    moe = {n: r["routing_histogram"] for n, r in sorted(points.items()) if r.get("routing_histogram")}
    if moe:
        n_layers = max(len(h) for h in moe.values())
        fig, axes = plt.subplots(len(moe), n_layers, figsize=(3 * n_layers, 2.6 * len(moe)), squeeze=False)
        for row, (name, hist) in enumerate(moe.items()):
            for col, layer in enumerate(hist):
                counts = np.array(layer, dtype=float)  # (modality, expert)
                share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
                xs = np.arange(counts.shape[1])
                ax = axes[row][col]
                ax.bar(xs - 0.2, share[0], 0.4, label="text")
                ax.bar(xs + 0.2, share[1], 0.4, label="image")
                ax.set(title=f"{name} layer {col}", xlabel="expert", ylim=(0, 1))
                ax.set_xticks(xs)
                if col == 0:
                    ax.set_ylabel("share of modality's tokens")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "routing.png", dpi=110)
        plt.close(fig)
