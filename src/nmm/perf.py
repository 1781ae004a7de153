"""Model FLOPs utilisation (MFU): the FLOPs a step really executes, per second, over the machine's peak.

Both halves are measured, not looked up. FLOPs are *counted*: `count_flops` runs a function (the
real model's forward and backward on a real batch) under `torch.utils.flop_counter`, so a MoE
counts only its routed experts, masked heads count every position they compute, and nothing is a
formula that can drift from the code. The peak is the best rate of a large square matmul in the
step's dtype on the same device with the same threads (`gemm_peak`): MFU then says how much of
what this machine's GEMM units can do the step uses, without a datasheet. Only matmul-like ops
count (the flop counter's convention, as in PaLM's MFU): norms, softmax and the optimizer are
overhead that MFU charges to the step's time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # (A, in) x (E, in, out) with row groups: each row meets one expert's matrix.
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


if hasattr(torch.ops.aten, "_grouped_mm"):  # the MoE's expert matmul; the flop counter has no formula for it
    try:
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)
    except RuntimeError:  # already registered (a newer torch, or a re-import)
        pass


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmul-like ops `fn()` runs, forward and backward alike."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


_PEAKS: dict[tuple, float] = {}


def gemm_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
              repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) matmuls on `device` with the
    current torch threads: this machine's measured peak (2048 on a CPU, 8192 on a GPU). Cached per
    (device, dtype, threads) for the process."""
    device = torch.device(device)
    key = (str(device), dtype, torch.get_num_threads(), size)
    if key not in _PEAKS:
        n = size or (2048 if device.type == "cpu" else 8192)
        gen = torch.Generator(device=device).manual_seed(0)  # its own: the global random state stays untouched
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        best = float("inf")
        for i in range(repeats + 1):  # the first is a warm-up (allocation, kernel selection)
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - t)
        _PEAKS[key] = 2 * n**3 / best
    return _PEAKS[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_flops(flops_per_s: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.1f} {unit}"
    return f"{flops_per_s / 1e6:.1f} MFLOP/s"
