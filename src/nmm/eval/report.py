"""The HTML report: loss curves, tokenizer reconstructions, generated images with verdicts, captions.

Pictures are PNG files beside `report.html`, so the report opens offline in any browser.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from nmm.utils import atomic_write_text  # noqa: E402

LOSS_LABELS = {"loss": "total", "loss_text": "text tokens", "loss_image": "image tokens"}


def smooth(values, window: int) -> np.ndarray:
    """Centred moving average over `window` points (fewer at the ends): unlike an EMA it does not lag
    behind a falling curve. The arithmetic mean, as a loss averages over tokens (not the median)."""
    x = np.asarray(values, dtype=np.float64)
    half = max(0, window // 2)
    sums = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(len(x))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(x))
    return (sums[hi] - sums[lo]) / (hi - lo)


def plot_losses(metrics_path: Path, out: Path, span: int | None = None) -> bool:
    """loss.png from metrics.jsonl: per modality, the logged single-batch losses as faint points and
    their centred moving average over `span` logged steps (default a tenth of them, 3 to 51) as a line."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return False
    found = {k for r in rows for k, v in r.items() if (k == "loss" or k.startswith("loss_")) and k != "loss_spike"
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in LOSS_LABELS if k in found] + sorted(found - set(LOSS_LABELS))
    span = span or int(np.clip(len(rows) // 10, 3, 50)) | 1  # odd: centred
    colours = {"loss": "#222222", "loss_text": "#3b6fb6", "loss_image": "#e08a2c"}
    cycle = iter(["#2a9d5c", "#b63b8f", "#7a5cc4", "#8c6d31"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if not pts:
            continue
        steps, values = map(np.asarray, zip(*pts))
        colour = colours.get(key) or next(cycle, "#888888")
        ax.plot(steps, values, "o", ms=3, color=colour, alpha=0.3, mec="none")
        ax.plot(steps, smooth(values, span), color=colour, lw=2,
                label=LOSS_LABELS.get(key, key[5:] + " tokens"))
    spikes = [r["step"] for r in rows if r.get("loss_spike") and isinstance(r.get("loss"), (int, float))]
    if spikes:
        ax.plot(spikes, [r["loss"] for r in rows if r.get("loss_spike") and isinstance(r.get("loss"), (int, float))],
                "x", color="#c0392b", ms=6, label="loss spike (> 2x its average)")
    ax.plot([], [], "o", ms=4, color="#888888", alpha=0.5, mec="none", label="single logged batches (raw)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats per token, log scale)")
    ax.set_yscale("log")
    # 0.5, 1, 2 rather than 5x10^-1; over more than a decade only the minor ticks at 2 and 5 are labelled.
    low, high = ax.get_ylim()
    digits = "23456789" if high / max(low, 1e-12) < 12 else "25"
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in digits else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Training loss per modality: lines are moving averages over {span} logged steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def image_grid(images: np.ndarray, titles: list[str], out: Path, cols: int = 6, colours: list[str] | None = None,
               suptitle: str | None = None) -> None:
    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.1, rows * 2.5))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(titles[i], fontsize=6.5, color=(colours[i] if colours else "black"), wrap=True)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


# ---- the demo's report page ------------------------------------------------------------------------

SPLIT_NAMES = {"heldout": "held-out scenes", "heldout_combo": "held-out colour/kind combinations"}

# The demo's headline metrics: (flat key in eval/results.json for the held-out split, name, what it
# means, the target docs/demo.md states (issue 18's); "" where no target is documented).
HEADLINE_METRICS = (
    ("m2t_exact_match", "Caption exact match (M2T)",
     "Share of images whose caption, read back, names every shape with the right kind, colour, size and place.",
     "≥ 0.90; combos: ≥ 0.45"),
    ("m2t_attribute_accuracy", "Caption attribute accuracy (M2T)",
     "Share of single attributes (kind, colour, size, place of each shape) the caption gets right.",
     "≥ 0.98"),
    ("m2g_judged_accuracy", "Image generation judged accuracy (M2G)",
     "Share of prompts whose generated image the judge reads as exactly the scene asked for, "
     "every attribute of every shape.",
     "≥ 0.60; combos: ≥ 0.40"),
    ("m2g_attribute_accuracy", "Image generation attribute accuracy (M2G)",
     "Share of the prompt's single attributes (kind, colour, size, place) that the generated image gets right.",
     "≥ 0.93"),
    ("m2g_geneval_overall", "GenEval overall (M2G)",
     "Mean over GenEval-style checks: single object, two objects, counting, colours, position, attribute binding.",
     "≥ 0.80"),
    ("qa_accuracy", "Question answering accuracy",
     "Share of questions about an image (colour, kind, count, position or size) answered exactly right.",
     "≥ 0.85"),
    ("edit_exact_match", "Image editing exact match (M2M)",
     "Share of edits (move, recolour, resize or remove one shape) whose result the judge reads as exactly the "
     "edited scene.",
     "≥ 0.50"),
    ("text_perplexity", "Text perplexity",
     "How surprised the model is by English paragraphs it never saw (about how many tokens it hesitates "
     "between); lower is better.",
     ""),
)
TOKENIZER_TARGET = "≥ 0.97"  # docs/demo.md: image tokenizer reconstructions judged exact


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion known only as a count (successes out of n)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def machine_info() -> dict:
    """CPU model, cores, torch threads and versions: what the demo's minutes were measured on."""
    import os
    import platform

    import torch

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _esc(x) -> str:
    return html.escape(str(x))


def _num(x, key: str = "") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return _esc(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.1f}" if abs(x) >= 20 or "perplexity" in key else f"{x:.3f}"


def _cell(value, low=None, high=None, n=None, key: str = "") -> str:
    """'0.822 [0.786, 0.855]' over a small 'n = 500', as table cell content."""
    if value is None:
        return "<span class='na'>not measured</span>"
    text = f"<b>{_num(value, key)}</b>"
    if low is not None and high is not None:
        text += f" <span class='ci'>[{_num(low, key)}, {_num(high, key)}]</span>"
    if n is not None:
        text += f"<br><span class='n'>n = {n:,}</span>"
    return text


def _records(run_dir: Path) -> tuple[dict, dict | None]:
    """results.json records by flat key, and the whole file (None when absent or unreadable)."""
    from nmm.eval.results import EvalResultsError, read_results

    try:
        data = read_results(run_dir / "eval" / "results.json")
    except EvalResultsError:
        data = None
    if not data:
        return {}, None
    return {r.get("key") or f"{r['task']}/{r['split']}/{r['metric']}": r for r in data["records"]}, data


def _estimate(records: dict, metrics: dict, key: str) -> tuple:
    r = records.get(key)
    if r is not None:
        return r["value"], r["ci_low"], r["ci_high"], r["n"]
    value = metrics.get(key)
    return (value if isinstance(value, (int, float)) and not isinstance(value, bool) else None), None, None, None


SPEECH_HEADLINE_METRICS = (
    ("asr_cer", "Speech recognition CER (M2T)",
     "Character error rate of the model's transcripts of held-out voices (never heard in training).", "≤ 0.10"),
    ("asr_wer", "Speech recognition WER (M2T)", "Word error rate of the same transcripts.", "-"),
    ("tts_cer", "Speech synthesis intelligibility (M2G)",
     "CER of an independent recogniser (trained on real speech only) on the model's speech.", "≤ 0.25"),
    ("codec_cer", "Codec reconstruction intelligibility",
     "The same recogniser on real held-out speech passed through the audio codec: the ceiling of synthesis.",
     "≤ 0.05"),
    ("codec_real_cer", "Recogniser on real speech", "The ruler's own error on the real held-out speech.", "-"),
    ("text_perplexity", "Text perplexity", "Per-token perplexity of held-out English paragraphs.", "-"),
)


VIDEO_HEADLINE_METRICS = (
    ("vcap_attributes", "Video captioning attribute accuracy (M2T)",
     "Per-attribute accuracy of the caption: the first frame's shapes and every event's action, direction, "
     "distance, new colour.", "≥ 0.90"),
    ("vcap_exact", "Video captioning exact (M2T)",
     "The caption of a held-out clip is entirely right: its shapes and every event.", "-"),
    ("vcap_events", "Video captioning events (M2T)", "Events named right, extra ones counted against.", "-"),
    ("t2v_exact", "Text -> clip judged exact (M2G)",
     "The clip judge reads every shape and its motion right in the model's clip.", "≥ 0.60"),
    ("t2v_frames", "Text -> clip per-frame attributes (M2G)", "Per-frame attribute accuracy of the made clips.", "-"),
    ("text_perplexity", "Text perplexity", "Per-token perplexity of held-out English paragraphs.", "-"),
)


def headline_rows(run_dir: Path, metrics: dict, headline=HEADLINE_METRICS) -> list[tuple[str, str, str, str]]:
    """The headline metrics as text for a terminal: (name, held-out [95% CI] n, combinations, target)."""
    records, _ = _records(Path(run_dir))

    def cell(key):
        value, low, high, n = _estimate(records, metrics, key)
        if value is None:
            return "-"
        if low is None:
            return _num(value, key)
        return f"{_num(value, key)} [{_num(low, key)}, {_num(high, key)}] n={n}"

    rows = []
    for key, name, _, target in headline:
        combo = f"heldout_combo_{key}"
        rows.append((name, cell(key), cell(combo) if combo in records or combo in metrics else "-", target))
    return rows


def _target(target: str) -> str:
    # "≥ 0.97; combos: ≥ ½ of held-out": the held-out target, then the combinations' on its own line.
    return "<br>".join(_esc(part.strip()) for part in target.split(";"))


def _headline_table(metrics: dict, records: dict, tokenizer_n: int | None) -> str:
    head = ("<table class='metrics'><tr><th>metric</th><th>what it means</th>"
            f"<th>{SPLIT_NAMES['heldout']}</th><th>{SPLIT_NAMES['heldout_combo']}</th><th>issue target</th></tr>")
    rows = []
    for key, name, meaning, target in HEADLINE_METRICS:
        held = _estimate(records, metrics, key)
        combo = _estimate(records, metrics, f"heldout_combo_{key}") if key != "text_perplexity" else None
        if held[0] is None and (combo is None or combo[0] is None):
            continue
        combo_cell = _cell(*combo, key=key) if combo is not None else "<span class='na'>(one English set)</span>"
        rows.append(f"<tr><td class='name'>{_esc(name)}</td><td class='meaning'>{_esc(meaning)}</td>"
                    f"<td class='value'>{_cell(*held, key=key)}</td><td class='value'>{combo_cell}</td>"
                    f"<td class='target'>{_target(target)}</td></tr>")
    cells, tok_keys = [], ("tokenizer_judge_exact", "tokenizer_judge_exact_heldout_combo")
    for key in tok_keys:
        p = metrics.get(key)
        if isinstance(p, (int, float)) and tokenizer_n:
            low, high = wilson_interval(round(p * tokenizer_n), tokenizer_n)
            cells.append(_cell(p, low, high, tokenizer_n))
        else:
            cells.append(_cell(p if isinstance(p, (int, float)) else None))
    if any(isinstance(metrics.get(k), (int, float)) for k in tok_keys):
        rows.append("<tr><td class='name'>Image tokenizer: reconstructions judged exact</td><td class='meaning'>"
                    "Share of images that, turned into image codes and decoded back, the judge still reads as "
                    f"exactly the same scene.</td><td class='value'>{cells[0]}</td><td class='value'>{cells[1]}</td>"
                    f"<td class='target'>{_target(TOKENIZER_TARGET)}</td></tr>")
    if isinstance(metrics.get("tokenizer_psnr_db"), (int, float)):
        rows.append("<tr><td class='name'>Image tokenizer PSNR</td><td class='meaning'>Pixel fidelity of those "
                    "reconstructions against the originals (peak signal-to-noise ratio); higher is better.</td>"
                    f"<td class='value'><b>{metrics['tokenizer_psnr_db']:.1f} dB</b>"
                    + (f"<br><span class='n'>n = {tokenizer_n:,}</span>" if tokenizer_n else "")
                    + "</td><td></td><td class='target'></td></tr>")
    return head + "".join(rows) + "</table>"


def _minutes(x) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    return f"{x:.1f} min" if x >= 1 else f"{x * 60:.0f} s"


def _run_table(metrics: dict, machine: dict, data: dict | None) -> str:
    rows = []

    def row(name, value):
        if value not in (None, "", "–"):
            rows.append(f"<tr><td class='name'>{_esc(name)}</td><td>{value}</td></tr>")

    steps = metrics.get("steps")
    row("training steps", _num(steps) if isinstance(steps, int) else None)
    params = metrics.get("params")
    row("model parameters", f"{params / 1e6:.2f} M" if isinstance(params, (int, float)) and params >= 1e5
        else _num(params) if isinstance(params, int) else None)
    row("time: image tokenizer", _minutes(metrics.get("tokenizer_minutes")))
    row("time: transformer training", _minutes(metrics.get("train_minutes")))
    row("time: evaluation", _minutes(metrics.get("eval_minutes")))
    row("time: whole demo", _minutes(metrics.get("demo_minutes")))
    if isinstance(metrics.get("eval_samples_per_split"), int):
        row("evaluation items per split", _num(metrics["eval_samples_per_split"]))
    cores = machine.get("cpu_count")
    row("machine", _esc(machine.get("cpu", "?")) + (f" ({cores} logical cores)" if cores else ""))
    if machine.get("gpu"):
        row("GPU", _esc(machine["gpu"]))
    row("torch threads", _esc(machine.get("torch_threads", "")))
    row("software", " · ".join(_esc(f"{k} {machine[k]}") for k in ("torch", "python") if machine.get(k))
        + (f" · {_esc(machine['platform'])}" if machine.get("platform") else ""))
    if data:
        row("evaluated", " · ".join(_esc(x) for x in (data.get("updated"), data.get("git") and f"git {data['git']}",
                                                      data.get("weights") and f"weights {data['weights']}") if x))
    return "<table class='run'>" + "".join(rows) + "</table>"


def _all_records_table(data: dict) -> str:
    rows = "".join(
        f"<tr><td>{_esc(r['task'])}</td><td>{_esc(SPLIT_NAMES.get(r['split'], r['split']))}</td>"
        f"<td>{_esc(r['metric'])}{' ↓' if r.get('better') == 'lower' else ''}</td>"
        f"<td>{_num(r['value'], r['metric'])}</td><td class='ci'>"
        + (f"[{_num(r['ci_low'], r['metric'])}, {_num(r['ci_high'], r['metric'])}]"
           if r["ci_low"] is not None and r["ci_high"] is not None else "–")
        + f"</td><td class='n'>{r['n']:,}</td></tr>" for r in data["records"])
    return ("<details><summary>Every evaluation number (from eval/results.json)</summary><table class='all'>"
            "<tr><th>task</th><th>split</th><th>metric</th><th>value</th><th>95% interval</th><th>n</th></tr>"
            f"{rows}</table></details>")


def write_report(run_dir: Path, metrics: dict, artefacts: dict, recon: tuple[np.ndarray, np.ndarray] | None,
                 title: str = "nmm run report", machine: dict | None = None, tokenizer_n: int | None = None) -> Path:
    """`run_dir/report.html`: headline metrics with 95% intervals, n, meaning and issue target; the run's
    steps, times and machine; loss curves and example pictures.

    Intervals and n come from run_dir/eval/results.json; the tokenizer's exact-reconstruction rate is
    only a fraction of `tokenizer_n` images, so its interval is a Wilson interval from that count.
    machine: from `machine_info()` (measured now when not given).
    """
    run_dir = Path(run_dir)
    records, data = _records(run_dir)
    machine = machine or machine_info()
    sections = []
    if plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png"):
        sections.append("<h2>Training loss</h2><p class='note'>Faint points: the loss of single logged batches; "
                        "lines: their moving average, per modality.</p><img src='loss.png' alt='training loss'>")
    if recon is not None:
        real, rec = recon
        both = np.concatenate([real, rec])
        titles = ["original"] * len(real) + ["reconstruction"] * len(rec)
        image_grid(both, titles, run_dir / "reconstructions.png", cols=len(real))
        sections.append("<h2>Image tokenizer: originals (top) and reconstructions from codes (bottom)</h2>"
                        "<img src='reconstructions.png' alt='reconstructions'>")
    order = list(SPLIT_NAMES)
    for split in sorted(artefacts, key=lambda s: order.index(s) if s in order else len(order)):
        art, name = artefacts[split], SPLIT_NAMES.get(split, split)
        gens = art["generations"]
        ok = [g["exact"] for g in gens]
        image_grid(art["images"], [_wrap(("✓ " if k else "✗ ") + g["prompt"]) for g, k in zip(gens, ok)],
                   run_dir / f"generations_{split}.png", colours=["green" if k else "red" for k in ok],
                   suptitle=f"text → image ({name}); green = judged exactly right")
        sections.append(f"<h2>Generated images: prompts of {_esc(name)}</h2>"
                        f"<img src='generations_{split}.png' alt='generated images'>")
        caps = art["captions"]
        image_grid(art["real"][:12], [_wrap(("✓ " if c["exact"] else "✗ ") + c["caption"]) for c in caps[:12]],
                   run_dir / f"captions_{split}.png", colours=["green" if c["exact"] else "red" for c in caps[:12]],
                   suptitle=f"image → text ({name}); green = every attribute right")
        sections.append(f"<h2>Captions: images of {_esc(name)}</h2><img src='captions_{split}.png' alt='captions'>")
    links = []
    if (run_dir / "eval" / "report.html").exists():
        links.append("<a href='eval/report.html'>the full evaluation report</a> (every task and metric, "
                     "confusion matrices, more examples)")
    if data:
        links.append("<a href='eval/results.json'>eval/results.json</a>")
    if (run_dir / "metrics.json").exists():
        links.append("<a href='metrics.json'>metrics.json</a>")
    link_html = f"<p class='links'>See also: {'; '.join(links)}.</p>" if links else ""
    note = ("Each value is measured on n evaluation items; brackets give its 95% interval "
            + ("(percentile bootstrap over the items; for the tokenizer, a Wilson interval from its count). "
               if data else "(none here: this run has no eval/results.json). ")
            + "“Held-out colour/kind combinations” are scenes with pairs such as a colour and a shape kind "
              "that never appeared together in training. Targets are the issue's, from docs/demo.md; "
              "blank where none is set.")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;
line-height:1.35}}
table{{border-collapse:collapse;margin:0.5em 0 1em}}th{{text-align:left;border-bottom:2px solid #999;padding:4px 10px;
font-size:0.9em}}td{{border-bottom:1px solid #ddd;padding:5px 10px;vertical-align:top}}
table.metrics{{width:100%}}td.name{{font-weight:600;width:15em}}td.meaning{{color:#444;font-size:0.9em}}
td.value{{white-space:nowrap}}td.target{{color:#555;width:9em}}table.run td.name{{width:14em}}
.ci{{color:#555}}.n{{color:#888;font-size:0.85em}}.na{{color:#999}}
.note{{color:#555;font-size:0.9em;max-width:900px}}table.all td{{padding:2px 10px;font-size:0.85em}}
img{{max-width:100%}}h2{{margin-top:1.6em}}</style>
</head><body><h1>{_esc(title)}</h1>
{link_html}
<h2>Results</h2>
{_headline_table(metrics, records, tokenizer_n)}
<p class='note'>{note}</p>
{_all_records_table(data) if data else ""}
<h2>The run</h2>{_run_table(metrics, machine, data)}
{''.join(sections)}
</body></html>"""
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
