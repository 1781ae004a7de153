"""`RUN_DIR/eval/report.html`: every task's metrics with intervals, per-metric bars, example
grids with verdicts and confusion matrices. Built from results.json and eval/samples/ only, so
it is complete even when some tasks were kept from an earlier evaluation.

Everything is plain HTML and CSS with the example pictures inlined as tiny PNGs: the page opens
offline, the text in it is the model's real text (no font gaps), and writing it takes well under a
second, where a matplotlib figure per grid took seconds each.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from nmm.eval.task import all_tasks
from nmm.utils import atomic_write_text

SPLIT_COLOURS = {"heldout": "#3b6fb6", "heldout_combo": "#e08a2c"}


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}" if abs(x) >= 100 else f"{x:.3f}"


def _png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _clean(text: str, limit: int = 160) -> str:
    """Model text for a caption: an untrained model writes control bytes and endless runs."""
    text = "".join(c if c.isprintable() else "·" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _records_by_task(data: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in data["records"]:
        out.setdefault(r["task"], []).append(r)
    return out


def metric_bars(records: list[dict]) -> str:
    """Bars for the task's fractions (accuracies, rates, GenEval categories), one per split, with
    the 95% interval drawn as a whisker over the bar."""
    rows = [r for r in records if r["value"] is not None and 0 <= r["value"] <= 1
            and (r["metric"].endswith(("accuracy", "rate", "match", "agreement", "drawn", "emitted", "valid"))
                 or r["metric"].startswith("geneval_"))]
    if not rows:
        return ""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    by_key = {(r["metric"], r["split"]): r for r in rows}
    out = ["<table class='bars'><tr><th>metric</th>"
           + "".join(f"<th style='color:{SPLIT_COLOURS.get(s, '#555')}'>{s}</th>" for s in splits) + "</tr>"]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        cells = []
        for split in splits:
            r = by_key.get((metric, split))
            if r is None:
                cells.append("<td></td>")
                continue
            lo = r["ci_low"] if r["ci_low"] is not None else r["value"]
            hi = r["ci_high"] if r["ci_high"] is not None else r["value"]
            cells.append(
                f"<td><div class='bar'><div class='fill' style='width:{100 * r['value']:.1f}%;"
                f"background:{SPLIT_COLOURS.get(split, '#888')}'></div><div class='ci' style='left:{100 * lo:.1f}%;"
                f"width:{100 * (hi - lo):.1f}%'></div><span>{_fmt(r['value'])}</span></div></td>")
        lower = any(r.get("better") == "lower" for r in rows if r["metric"] == metric)
        arrow = " ↓" if lower else ""  # a rate where less is better, e.g. copying the input
        out.append(f"<tr><td>{html.escape(metric)}{arrow}</td>{''.join(cells)}</tr>")
    return "".join(out) + "</table>"


def confusion_table(name: str, c: dict) -> str:
    """Rows: true value; columns: predicted. Shade = share of the row."""
    m = np.array(c["matrix"], dtype=float)
    rate = m / np.maximum(m.sum(1, keepdims=True), 1)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in c["predicted_labels"])
    body = "".join(
        f"<tr><th>{html.escape(label)}</th>" + "".join(
            f"<td style='background:rgba(59,111,182,{rate[i, j]:.2f});color:{'#fff' if rate[i, j] > 0.6 else '#222'}'>"
            f"{int(m[i, j]) if m[i, j] else ''}</td>" for j in range(m.shape[1])) + "</tr>"
        for i, label in enumerate(c["labels"]))
    return (f"<table class='confusion'><caption>{html.escape(name)}: rows true, columns predicted</caption>"
            f"<tr><th></th>{head}</tr>{body}</table>")


def gallery(samples: list[dict], images: np.ndarray) -> str:
    cards = []
    for s, img in zip(samples, images):
        verdict = {True: ("ok", "✓ "), False: ("bad", "✗ ")}.get(s.get("ok"), ("", ""))
        width = max(110, round(96 * img.shape[1] / img.shape[0]))  # pictures are shown 96 px high
        player = (f"<audio controls preload='none' src='{s['audio']}'></audio>"
                  if str(s.get("audio", "")).startswith("data:audio/") else "")
        if str(s.get("video", "")).startswith("data:image/gif"):  # the clip, playing, under its filmstrip
            player += f"<img class='clip' src='{s['video']}'>"
        cards.append(f"<figure class='{verdict[0]}' style='width:{width}px'><img src='{_png(img)}'>{player}"
                     f"<figcaption>{verdict[1]}{html.escape(_clean(s['title']))}</figcaption></figure>")
    return f"<div class='gallery'>{''.join(cards)}</div>"


def _samples(out_dir: Path, task: str, split: str) -> tuple[dict | None, np.ndarray | None]:
    folder = out_dir / "samples"
    meta_path, img_path = folder / f"{task}.{split}.json", folder / f"{task}.{split}.npz"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        images = np.load(img_path)["images"] if img_path.exists() else None
    except (OSError, ValueError, KeyError):
        return None, None  # report material is a convenience: a damaged file only loses its section
    return meta, images


def _table(records: list[dict], headline: set[str]) -> str:
    rows = []
    for r in records:
        bold = r["metric"] in headline
        cells = [r["split"], r["metric"], _fmt(r["value"]), f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                 str(r["n"]), "↓" if r.get("better") == "lower" else "↑"]
        tds = "".join(f"<td>{'<b>' if bold and i < 3 else ''}{html.escape(c)}{'</b>' if bold and i < 3 else ''}</td>"
                      for i, c in enumerate(cells))
        rows.append(f"<tr>{tds}</tr>")
    return ("<table><tr><th>split</th><th>metric</th><th>value</th><th>95% CI</th><th>n</th><th></th></tr>"
            + "".join(rows) + "</table>")


def write_eval_report(out_dir: Path, data: dict, title: str | None = None) -> Path:
    out_dir = Path(out_dir)
    known = {t.name: t for t in all_tasks()}
    by_task = _records_by_task(data)
    title = title or f"nmm evaluation: {out_dir.resolve().parent.name}"
    sections = []
    for name, info in data["tasks"].items():
        task = known.get(name)
        heading = html.escape(info.get("title") or (task.title if task else name))
        if info["status"] != "done":
            why = info.get("reason") or info.get("error", "")
            sections.append(f"<h2 id='{name}'>{name}</h2><p class='note'>{info['status']}: {html.escape(why)}</p>")
            continue
        records = by_task.get(name, [])
        if any(info.get(k) != data.get(k) for k in ("config_hash", "weights")):
            heading += " · <span class='note'>computed for other weights or another config: re-run it</span>"
        headline = set(task.headline) if task else set()
        summary = " · ".join(f"{r['split']} {r['metric']} <b>{_fmt(r['value'])}</b> "
                             f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] (n={r['n']})"
                             for r in records if r["metric"] in headline)
        parts = [f"<h2 id='{name}'>{name}</h2><p>{heading} · {info.get('seconds', '?')} s</p><p>{summary}</p>",
                 metric_bars(records),
                 f"<details><summary>all {len(records)} numbers</summary>{_table(records, headline)}</details>"]
        for split in info.get("splits", []):
            meta, images = _samples(out_dir, name, split)
            if meta and images is not None and len(images):
                parts.append(f"<h3>Examples, {split} (green: judged right)</h3>"
                             + gallery(meta["samples"][:len(images)], images))
            confusions = (meta or {}).get("confusion") or {}
            if confusions:
                parts.append(f"<h3>Confusion, {split}</h3><div class='row'>"
                             + "".join(confusion_table(k, c) for k, c in confusions.items()) + "</div>")
        sections.append("\n".join(parts))
    toc = " · ".join(f"<a href='#{n}'>{n}</a>" for n in data["tasks"])
    ident = " · ".join(f"{k} <code>{html.escape(str(data.get(k)))}</code>"
                       for k in ("git", "config_hash", "weights", "updated"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border-bottom:1px solid #ddd;padding:2px 10px;text-align:left}}
.note{{color:#a33}}code{{font-size:90%}}
.bars td{{width:320px}}.bar{{position:relative;height:16px;background:#eee}}
.bar .fill{{position:absolute;height:100%;opacity:0.85}}
.bar .ci{{position:absolute;top:7px;height:2px;background:#111}}
.bar span{{position:absolute;right:4px;font-size:11px;line-height:16px}}
.gallery{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;font-size:11px}}figure img{{height:96px;image-rendering:pixelated;display:block}}figure audio{{width:100%;height:28px}}
figure.ok figcaption{{color:#17801f}}figure.bad figcaption{{color:#b3261e}}
.row{{display:flex;flex-wrap:wrap;gap:24px}}.confusion td{{text-align:center;min-width:2.2em;font-size:12px}}
.confusion th{{font-size:11px;font-weight:normal}}caption{{font-size:12px;text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>{ident}</p><p>Every value comes with a 95% percentile-bootstrap interval over the evaluation items, and n,
the number of items. ↑ higher is better, ↓ lower is better. Bars: value, with the interval as a black whisker.
Task definitions: docs/evaluation.md.</p>
<p>{toc}</p>
{''.join(sections)}
</body></html>"""
    out = out_dir / "report.html"
    atomic_write_text(out, page)
    return out
