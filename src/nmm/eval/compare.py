"""`compare_runs(run_dirs)`: a markdown table of several runs' results, and a comparison plot.

    print(compare_runs(["runs/a", "runs/b"], plot="compare.png"))

Each cell is "value [ci_low, ci_high]". The best run per row is bold; a `*` marks a run whose
interval does not overlap the first run's (a difference the evaluation sample can see). Runs
evaluated with different eval configs or sample sizes are flagged, because their numbers are not
directly comparable (Fréchet distances in particular shrink with n).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nmm.errors import InputError  # noqa: E402
from nmm.eval.results import load_run_results  # noqa: E402
from nmm.eval.task import all_tasks  # noqa: E402


def _names(run_dirs: list[Path]) -> list[str]:
    """Short, unique column names: the directory name, with its parent where names collide."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _cell(r: dict | None) -> str:
    if r is None or r["value"] is None:
        return "–"
    fmt = (lambda x: f"{x:.4g}") if abs(r["value"]) >= 100 else (lambda x: f"{x:.3f}")
    ci = f" [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]" if r["ci_low"] is not None and r["ci_high"] is not None else ""
    return fmt(r["value"]) + ci


def _separated(a: dict, b: dict) -> bool:
    if None in (a["ci_low"], a["ci_high"], b["ci_low"], b["ci_high"]):
        return False
    return a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"]


def compare_runs(run_dirs, metrics: str = "headline", plot: str | Path | None = None) -> str:
    """Markdown comparison of runs' eval/results.json. metrics: "headline" (each task's main
    numbers) or "all". plot: also write a PNG of the headline metrics there."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise InputError("compare needs at least one run directory")
    if metrics not in ("headline", "all"):
        raise InputError(f"metrics must be 'headline' or 'all', got {metrics!r}")
    results = [load_run_results(p) for p in run_dirs]
    names = _names(run_dirs)
    headline = {t.name: set(t.headline) for t in all_tasks()}

    keys: list[tuple[str, str, str]] = []  # (task, split, metric), in first-seen order
    lookup: list[dict] = []
    for data in results:
        table = {(r["task"], r["split"], r["metric"]): r for r in data["records"]}
        lookup.append(table)
        for key in table:
            wanted = metrics == "all" or key[2] in headline.get(key[0], {key[2]})
            if wanted and key not in keys:
                keys.append(key)

    lines = [f"| task | split | metric | {' | '.join(names)} |", "|---|---|---|" + "---|" * len(names)]
    for key in keys:
        recs = [t.get(key) for t in lookup]
        present = [r for r in recs if r is not None and r["value"] is not None]
        best = None
        if len(present) > 1:
            pick = min if present[0].get("better") == "lower" else max
            best = pick(r["value"] for r in present)
            if sum(r["value"] == best for r in present) > 1:
                best = None  # a tie: no run is best
        cells = []
        for i, r in enumerate(recs):
            text = _cell(r)
            if r is not None and r["value"] is not None and r["value"] == best:
                text = f"**{text}**"
            if i and r is not None and recs[0] is not None and r["value"] is not None and _separated(r, recs[0]):
                text += " *"
            cells.append(text)
        arrow = " ↓" if present and present[0].get("better") == "lower" else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}{arrow} | {' | '.join(cells)} |")

    notes = ["", ("Values: estimate [95% bootstrap interval]. **bold**: the single best run. *: interval does not overlap "
                  f"the first run's ({names[0]}).")]
    hashes = {d.get("config_hash") for d in results}
    if len(hashes) > 1:
        which = ", ".join(f"{n}: {d.get('config_hash')}" for n, d in zip(names, results))
        notes.append(f"Warning: the runs were evaluated with different eval/data configs ({which}); "
                     "numbers may not be comparable.")
    for key in keys:
        ns = {t[key]["n"] for t in lookup if key in t}
        if len(ns) > 1:
            notes.append(f"Warning: {'/'.join(key)} has different n across runs ({sorted(ns)}).")
    for name, data in zip(names, results):
        missing = [t for t, info in data["tasks"].items() if info["status"] != "done"]
        if missing:
            notes.append(f"{name}: not evaluated: {', '.join(missing)}.")
    if plot is not None:
        plot_comparison(names, lookup, [k for k in keys if k[2] in headline.get(k[0], {k[2]})], Path(plot))
        notes.append(f"Plot: {plot}")
    return "\n".join(lines + notes) + "\n"


def plot_comparison(names: list[str], lookup: list[dict], keys: list[tuple[str, str, str]], out: Path) -> None:
    """One panel per (task, metric); bars per run, grouped by split, with 95% intervals."""
    panels = list(dict.fromkeys((k[0], k[2]) for k in keys))
    if not panels:
        raise InputError("nothing to plot: the runs share no evaluated metric")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    width = 0.8 / len(names)
    for ax, (task, metric) in zip(axes.ravel(), panels):
        splits = [k[1] for k in keys if (k[0], k[2]) == (task, metric)]
        for j, name in enumerate(names):
            recs = [lookup[j].get((task, split, metric)) for split in splits]
            xs = [i + j * width for i, r in enumerate(recs) if r is not None and r["value"] is not None]
            recs = [r for r in recs if r is not None and r["value"] is not None]
            if not recs:
                continue
            vals = np.array([r["value"] for r in recs])
            err = np.array([[v - (r["ci_low"] if r["ci_low"] is not None else v),
                             (r["ci_high"] if r["ci_high"] is not None else v) - v] for v, r in zip(vals, recs)]).T
            ax.bar(xs, vals, width, yerr=err.clip(0), capsize=2, label=name, color=f"C{j}")
        values = [r["value"] for t in lookup for s in splits for r in [t.get((task, s, metric))]
                  if r is not None and r["value"] is not None]
        if values and all(0 <= v <= 1 for v in values) and metric != "fid":
            ax.set_ylim(0, 1.02)  # fractions on their natural scale: zero bars stay visibly zero
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(splits))], splits, fontsize=7)
        better = next((t[(task, s, metric)].get("better") for t in lookup for s in splits if (task, s, metric) in t),
                      "higher")
        ax.set_title(f"{task}\n{metric} ({'lower' if better == 'lower' else 'higher'} is better)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
