"""What the `nmm bench` benchmarks share: loading the model, timing two contenders fairly, reporting.

Timing on a busy CPU: the contenders (nmm and Hugging Face, eager and compiled) take turns, one run
each per round, and the order is reversed every other round, so that machine noise falls on all. Each run records wall
time and this process's CPU time. Ratios come from the median run; the JSON also keeps the fastest
run, a per-round paired ratio and every time. With one torch thread, CPU time is close to wall time
on an idle machine but is not inflated when another process takes the core away, so a CPU-time
ratio that agrees with the wall-time ratio says the noise did not decide the result.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Prompts for the text benchmarks: shapes-world captions and questions of different lengths, so a
# batch is left-padded as in real use. Any tokenizer encodes them (it falls back to smaller pieces).
TEXT_PROMPTS = (
    "a small red circle at the top left",
    "what colour is the square?",
    "a large green triangle at the center and a small blue circle at the bottom right",
    "how many shapes are there?",
    "make the circle yellow",
    "a large purple square at the bottom left",
    "is there a triangle?",
    "a small orange circle at the top right and a large red square at the center",
)


def load_target(target: str):
    """A run directory -> its trained pipeline; a preset name -> random weights at that config,
    exactly what `nmm serve TARGET` would serve. Returns (Pipeline, name)."""
    from nmm.serve import (
        load_pipeline,  # the same loader as `nmm serve`, so the benchmarks agree
    )

    return load_pipeline(target)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def env_info() -> dict:
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:  # the server benchmark does not need it
        hf_version = None
    return {
        "torch": torch.__version__, "transformers": hf_version,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)  # untimed runs' wall times (the first includes any compile)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def first_call(self) -> float | None:
        """Wall time of the first (warm-up) run: includes one-off costs such as compilation."""
        return round(self.warmup[0], 4) if self.warmup else None


def time_turns(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timings]:
    """Run every contender `warmup` untimed times, then `repeats` timed rounds: each round runs each
    contender once, and the order is reversed every other round."""
    names = list(contenders)
    times = {name: Timings() for name in names}
    for _ in range(warmup):
        for name in names:
            w0 = time.perf_counter()
            contenders[name]()
            times[name].warmup.append(time.perf_counter() - w0)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name].add(time.perf_counter() - w0, time.process_time() - c0)
    return times


def ratios(fast: Timings, slow: Timings) -> dict:
    """slow/fast time ratios: > 1 means `fast` is faster. Median, best-vs-best, per-round paired, CPU time."""
    return {
        "speedup": round(slow.median / fast.median, 3),
        "speedup_best": round(slow.best / fast.best, 3),
        "speedup_paired": round(statistics.median(s / f for s, f in zip(slow.wall, fast.wall)), 3),
        "speedup_cpu_time": round(slow.cpu_median / fast.cpu_median, 3),
    }


def pair(nmm: Timings, hf: Timings, value: Callable[[float], float], key: str) -> dict:
    """One nmm-vs-HF pair: `value(median seconds)` of each side as nmm_<key> / hf_<key>, the ratios,
    the first (compiling) call and every time."""
    return {
        f"nmm_{key}": value(nmm.median), f"hf_{key}": value(hf.median), **ratios(nmm, hf),
        "nmm_first_call_s": nmm.first_call, "hf_first_call_s": hf.first_call,
        "nmm_s": rounded(nmm.wall), "hf_s": rounded(hf.wall),
        "nmm_cpu_s": rounded(nmm.cpu), "hf_cpu_s": rounded(hf.cpu),
    }


def goal(metric: str, value: float, target: float) -> dict:
    return {"metric": metric, "target": target, "value": value, "met": bool(value >= target)}


def write_json(path: Path, result: dict) -> None:
    from nmm.utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def rounded(xs: list[float], digits: int = 4) -> list[float]:
    return [round(x, digits) for x in xs]
