"""Progress display for long work (rich progress bars), quiet when not on a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True, description: str = "train"):
        self.enabled = enabled and sys.stderr.isatty()
        if self.enabled:
            self.p = _progress()
            self.p.start()
            self.task = self.p.add_task(description, total=total, completed=start, info="")

    def set_total(self, total: int) -> None:
        if self.enabled:
            self.p.update(self.task, total=total)

    def update(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        info = None
        if record:
            parts = [f"loss {record['loss']:.3f}"]
            parts += [f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_") and k != "loss_spike"]
            parts.append(f"{record['tokens_per_s'] / 1000:.1f}k tok/s")
            info = "  ".join(parts)
        self.p.update(self.task, completed=step, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


def progress_callback(description: str, enabled: bool = True):
    """A `progress(step, total, loss)` callable for library code that reports its own steps."""
    state: dict = {}

    def callback(step: int, total: int, loss: float | None = None) -> None:
        if "bar" not in state:
            state["bar"] = TrainProgress(total, 0, enabled, description)
        bar = state["bar"]
        bar.set_total(total)
        if bar.enabled:
            bar.p.update(bar.task, completed=step, info="" if loss is None else f"loss {loss:.4f}")
        if step >= total:
            bar.close()

    return callback
