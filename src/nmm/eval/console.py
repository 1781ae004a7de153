"""Terminal tables for `nmm eval`: the task list, and a run's headline results with intervals."""

from __future__ import annotations

from rich import box
from rich.table import Table

from nmm.eval.harness import headline_records
from nmm.eval.task import all_tasks


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}" if abs(x) >= 100 else f"{x:.{digits}f}"


def tasks_table() -> Table:
    table = Table(title="nmm eval tasks", box=box.SIMPLE_HEAD)
    for col in ("task", "kind", "needs", "what it measures"):
        table.add_column(col, no_wrap=col != "what it measures")
    for t in all_tasks():
        table.add_row(t.name, t.kind, "+".join(t.modalities), t.title)
    return table


def results_table(data: dict, title: str) -> Table:
    """One row per task and headline metric, one column per split: value [95% CI] (n)."""
    records = headline_records(data)
    splits = list(dict.fromkeys(r["split"] for r in records))
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for split in splits:  # these wrap in a narrow terminal: "value [interval]" then "n=..."
        table.add_column(split)
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        rows.setdefault((r["task"], r["metric"]), {})[r["split"]] = r
    for (task, metric), by_split in rows.items():
        lower = any(r.get("better") == "lower" for r in by_split.values())
        cells = []
        for split in splits:
            r = by_split.get(split)
            cells.append("" if r is None else
                         f"{fmt(r['value'])} [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}] n={r['n']}")
        table.add_row(task, metric + (" ↓" if lower else ""), *cells)
    for name, info in data["tasks"].items():
        if info["status"] != "done":
            table.add_row(name, info["status"], info.get("reason") or info.get("error", ""), *[""] * (len(splits) - 1))
    return table
