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

from nmm.utils import atomic_write_text  # noqa: E402


def plot_losses(metrics_path: Path, out: Path) -> bool:
    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("loss_text", "text tokens"), ("loss_image", "image tokens")):
        pts = [(s, r[key]) for s, r in zip(steps, rows) if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss per modality")
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


def write_report(run_dir: Path, metrics: dict, artefacts: dict, recon: tuple[np.ndarray, np.ndarray] | None,
                 title: str = "nmm run report") -> Path:
    run_dir = Path(run_dir)
    sections = []
    if plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png"):
        sections.append("<h2>Training loss</h2><img src='loss.png'>")
    if recon is not None:
        real, rec = recon
        both = np.concatenate([real, rec])
        titles = ["original"] * len(real) + ["reconstruction"] * len(rec)
        image_grid(both, titles, run_dir / "reconstructions.png", cols=len(real))
        sections.append("<h2>Image tokenizer: originals (top) and reconstructions from codes (bottom)</h2>"
                        "<img src='reconstructions.png'>")
    for split, art in artefacts.items():
        gens = art["generations"]
        ok = [g["exact"] for g in gens]
        image_grid(art["images"], [_wrap(("✓ " if k else "✗ ") + g["prompt"]) for g, k in zip(gens, ok)],
                   run_dir / f"generations_{split}.png", colours=["green" if k else "red" for k in ok],
                   suptitle=f"text → image ({split}); green = judged exactly right")
        sections.append(f"<h2>Generated images, {split} prompts</h2><img src='generations_{split}.png'>")
        caps = art["captions"]
        image_grid(art["real"][:12], [_wrap(("✓ " if c["exact"] else "✗ ") + c["caption"]) for c in caps[:12]],
                   run_dir / f"captions_{split}.png", colours=["green" if c["exact"] else "red" for c in caps[:12]],
                   suptitle=f"image → text ({split}); green = every attribute right")
        sections.append(f"<h2>Captions of {split} images</h2><img src='captions_{split}.png'>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in metrics.items() if not isinstance(v, dict))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td{{border-bottom:1px solid #ddd;padding:2px 12px}}img{{max-width:100%}}</style>
</head><body><h1>{html.escape(title)}</h1>
<h2>Metrics</h2><table>{rows}</table>
{''.join(sections)}
</body></html>"""
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
