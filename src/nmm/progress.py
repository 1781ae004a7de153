"""Progress display for long work: a rich progress bar on a terminal, plain lines in a log file.

On a terminal (stderr) the bar redraws in place. When output goes to a file or a pipe
(`nmm demo > log.txt`, a batch job), a bar would leave nothing readable, so one plain line is
written every `interval` seconds (default 30; $NMM_PROGRESS_INTERVAL overrides it), and one when a
stage finishes, each flushed at once:

    [train] step 120/1509 (8%)  loss 2.345 (text 1.234, image 3.456)  6.4k tok/s  elapsed 1m52s  eta 21m40s
    [train] done: 1509/1509 steps in 14m48s  loss 1.121 (text 0.512, image 1.402)  6.4k tok/s (mean)

Losses and tokens/s on a line are means over the steps logged since the previous line: one step's
loss is one batch's, and swings widely.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _real(stream):
    # While a rich bar runs, sys.stdout is a proxy that writes to the bar's console (stderr).
    return getattr(stream, "rich_proxied_file", stream)


def plain_stream() -> IO[str] | None:
    """Where plain progress lines go: stdout when it is redirected (`nmm demo > log.txt`, which
    leaves the bar on the terminal), else stderr when that is; None when both are terminals."""
    for stream in (_real(sys.stdout), _real(sys.stderr)):
        if stream is not None and not _isatty(stream):
            return stream
    return None


def default_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("NMM_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float | None) -> str:
    """12s, 3m05s, 1h02m: short enough for a progress line."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_losses(record: dict) -> str:
    """'loss 2.345 (text 1.234, image 3.456)' from a metrics record (loss and loss_<modality> keys)."""
    parts = [f"{k[5:]} {v:.3f}" for k, v in record.items()
             if k.startswith("loss_") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    text = f"loss {record['loss']:.3f}" if isinstance(record.get("loss"), (int, float)) else ""
    if parts:
        text = f"{text} ({', '.join(parts)})" if text else ", ".join(parts)
    if record.get("loss_spike"):
        text += " [loss spike]"
    return text


def _tokens(tps: float) -> str:
    return f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s"


def _speed(record: dict) -> str:
    """'6.1k tok/s, MFU 38%' from a metrics record (either part may be missing)."""
    parts = []
    if isinstance(record.get("tokens_per_s"), (int, float)):
        parts.append(_tokens(record["tokens_per_s"]))
    if isinstance(record.get("mfu"), (int, float)):
        parts.append(f"MFU {record['mfu']:.0%}")
    return ", ".join(parts)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
        # With stdout redirected to a file, print() must reach that file, not the bar's terminal.
        redirect_stdout=_isatty(_real(sys.stdout)),
    )


class TrainProgress:
    """Progress of one stage ("train", "image tokenizer"): `update(step, record)` per step, `close()`.

    stream: write plain lines there instead of choosing by terminal (tests pass a StringIO).
    interval: seconds between plain lines (None: $NMM_PROGRESS_INTERVAL or 30; 0: every update).
    """

    def __init__(self, total: int, start: int, enabled: bool = True, description: str = "train",
                 stream: IO[str] | None = None, interval: float | None = None):
        self.description, self.total, self.start, self.step = description, total, start, start
        self.interval = default_interval() if interval is None else interval
        self.record: dict | None = None  # what the lines show: the mean of the records since the last line
        self.window: list[dict] = []
        self.tokens_per_s: list[float] = []
        self.mfu: list[float] = []
        self.t0 = self.last_line = time.monotonic()
        self.closed = False
        self.rich = enabled and stream is None and _isatty(_real(sys.stderr))
        if not enabled:
            self.plain = None
        elif stream is not None:
            self.plain = None if _isatty(stream) else stream
        else:
            self.plain = plain_stream()
        self.enabled = self.rich or self.plain is not None
        if self.rich:
            self.p = _progress()
            self.p.start()
            self.task = self.p.add_task(description, total=total, completed=start, info="")

    def set_total(self, total: int) -> None:
        self.total = total
        if self.rich:
            self.p.update(self.task, total=total)

    def update(self, step: int, record: dict | None) -> None:
        if not self.enabled:
            return
        self.step = step
        if record:
            self.window.append(record)
            if isinstance(record.get("tokens_per_s"), (int, float)):
                self.tokens_per_s.append(float(record["tokens_per_s"]))
            if isinstance(record.get("mfu"), (int, float)):
                self.mfu.append(float(record["mfu"]))
        if self.rich:
            info = None
            if record:
                info = "  ".join(p for p in (format_losses(record), _speed(record)) if p)
            self.p.update(self.task, completed=step, **({"info": info} if info else {}))
        now = time.monotonic()
        if self.plain is not None and now - self.last_line >= self.interval and step < self.total:
            self.last_line = now
            self._write(self.line())

    def _average(self) -> None:
        # One logged step's loss swings a lot (single batches): lines show the mean since the last line.
        if not self.window:
            if self.record:
                self.record.pop("loss_spike", None)  # shown once, on the line after it happened
            return
        keys = [k for k, v in self.window[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.record = {k: sum(r[k] for r in self.window if k in r) / sum(k in r for r in self.window) for k in keys}
        self.record["loss_spike"] = any(r.get("loss_spike") for r in self.window)
        self.window = []

    def line(self) -> str:
        """The plain progress line for where the stage is now."""
        self._average()
        elapsed = time.monotonic() - self.t0
        done = self.step - self.start
        eta = elapsed / done * (self.total - self.step) if done > 0 else None
        pct = f" ({100 * self.step / self.total:.0f}%)" if self.total else ""
        parts = [f"[{self.description}] step {self.step}/{self.total}{pct}"]
        if self.record:
            parts += [format_losses(self.record), _speed(self.record)]
        parts += [f"elapsed {format_duration(elapsed)}", f"eta {format_duration(eta)}"]
        return "  ".join(p for p in parts if p)

    def final_line(self) -> str:
        self._average()
        elapsed = time.monotonic() - self.t0
        parts = [f"[{self.description}] done: {self.step}/{self.total} steps in {format_duration(elapsed)}"]
        if self.record:
            parts.append(format_losses(self.record))
        if self.tokens_per_s:
            parts.append(f"{_tokens(sum(self.tokens_per_s) / len(self.tokens_per_s))} (mean)")
        if self.mfu:
            parts.append(f"MFU {sum(self.mfu) / len(self.mfu):.0%} (mean)")
        return "  ".join(p for p in parts if p)

    def _write(self, text: str) -> None:
        try:
            self.plain.write(text + "\n")
            self.plain.flush()  # a log file must show progress now, not when a buffer fills
        except (OSError, ValueError):  # a closed or broken stream must not stop training
            self.plain = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.rich:
            self.p.stop()
        if self.plain is not None:
            self._write(self.final_line())


def progress_callback(description: str, enabled: bool = True, stream: IO[str] | None = None,
                      interval: float | None = None):
    """A `progress(step, total, loss)` callable for library code that reports its own steps."""
    state: dict = {}

    def callback(step: int, total: int, loss: float | None = None) -> None:
        if "bar" not in state:
            state["bar"] = TrainProgress(total, 0, enabled, description, stream=stream, interval=interval)
        bar = state["bar"]
        if total != bar.total:
            bar.set_total(total)
        bar.update(step, None if loss is None else {"loss": float(loss)})
        if step >= total:
            bar.close()

    return callback
