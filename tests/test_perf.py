"""nmm.perf: counted FLOPs and the measured GEMM peak behind every MFU figure."""

import torch

from nmm.perf import count_flops, format_flops, gemm_peak


def test_count_flops_counts_forward_and_backward_matmuls():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    assert count_flops(lambda: x @ w) == 2 * 8 * 16 * 4
    # backward: one matmul for each input's gradient
    assert count_flops(lambda: (x @ w).sum().backward()) == 3 * 2 * 8 * 16 * 4


def test_gemm_peak_is_measured_cached_and_leaves_the_random_state_alone():
    state = torch.random.get_rng_state()
    peak = gemm_peak("cpu", torch.float32, size=256, repeats=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert 1e8 < peak < 1e14  # FLOP/s: more than a slow phone, less than a data centre
    assert gemm_peak("cpu", torch.float32, size=256, repeats=2) == peak  # cached for the process


def test_format_flops():
    assert format_flops(1.83e11) == "183.0 GFLOP/s"
    assert format_flops(9.9e14) == "990.0 TFLOP/s"
