"""benchmarks/scaling_plan.py (docs/scaling.md): the 1,000-GPU plan's formulas, checked against values
worked out here by hand, and its text and JSON output."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_plan.py"
GIB = 2**30


@pytest.fixture(scope="module")
def sp():
    spec = importlib.util.spec_from_file_location("scaling_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(sp, *argv):
    return sp.plan(sp.parse_args(list(argv)))


def _row(plan, tp, ac):
    return next(r for r in plan["memory"] if r["tp"] == tp and r["ac"] == ac)


def _by_hand_tp1_no_ac(seq: int, micro_batch: int) -> float:
    """Peak GiB per GPU for the default 7B (d 4096, 32 layers, MHA, SwiGLU 11008, vocab 65536, QK-norm) at
    TP 1 without activation checkpointing on 1,000 GPUs, written out term by term."""
    d, f, layers, vocab, gpus = 4096, 11008, 32, 65536, 1000
    block = 4 * d * d + 3 * d * f + 2 * d
    n = 2 * vocab * d + layers * block + d
    states = 16 * n / gpus  # fp32 master + fp32 grad + Adam m + v, sharded over all 1,000 ranks
    root = 2 * vocab * d + d  # embedding, head, final norm: the root FSDP group
    gathered = 2 * 2 * block + 4 * block + 2 * root  # 2 blocks bf16 + 1 block's fp32 gradient + the root in bf16
    # per token per layer, bf16: norm in, qkv in, q, k, v, attn out (6 x 2d) + QK-norm inputs (2 x 2d)
    # + norm in, gate/up in (2 x 2d) + gate, up, silu, product (4 x 2f)
    per_token_layer = 12 * d + 4 * d + 4 * d + 8 * f
    tokens = seq * micro_batch
    acts = layers * tokens * per_token_layer
    logits = tokens * vocab * 8
    return (states + gathered + acts + logits) / GIB + 4.0  # + 4 GiB overhead


def test_memory_matches_hand_computation_and_fit(sp):
    plan = _plan(sp)
    row = _row(plan, 1, False)
    expected = _by_hand_tp1_no_ac(4096, 1)
    assert row["total_gib"] == pytest.approx(expected, rel=1e-9)
    assert 25 < expected < 35 and row["fits"]  # 7B, seq 4096, micro-batch 1, TP 1, no AC: fits in 80 GB
    big = _row(_plan(sp, "--seq", "16384", "--micro-batch", "2"), 1, False)
    assert big["total_gib"] == pytest.approx(_by_hand_tp1_no_ac(16384, 2), rel=1e-9)
    assert big["total_gib"] > 80 and not big["fits"]  # 8x the tokens: no longer fits


def test_parameter_count_is_llama_7b_like(sp):
    n = sp.params(sp.parse_args([]))
    assert 6.9e9 < n["total"] < 7.1e9
    assert n["non_embedding"] == n["total"] - 65536 * 4096


@pytest.mark.parametrize("ac", [False, True])
def test_memory_per_gpu_drops_as_tp_grows(sp, ac):
    plan = _plan(sp, "--seq", "8192", "--micro-batch", "2", "--global-batch-tokens", "1")  # no accumulation
    assert {r["grad_accum"] for r in plan["memory"]} == {1}
    totals = [_row(plan, tp, ac)["total_gib"] for tp in (1, 2, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(totals)), totals
    acts = [_row(plan, tp, ac)["activations_gib"] for tp in (1, 2, 4, 8)]
    assert acts[0] == pytest.approx(8 * acts[3])  # sequence parallel: activations divide by the TP degree


def test_activation_checkpointing_reduces_activation_memory(sp):
    plan = _plan(sp)
    for tp in (1, 2, 4, 8):
        off, full = _row(plan, tp, False), _row(plan, tp, True)
        assert full["activations_gib"] < off["activations_gib"] / 5
        assert full["step_s"] >= off["step_s"]  # the recompute is not free


def test_hsdp_trades_memory_for_inter_node_traffic(sp):
    fsdp, hsdp = _plan(sp, "--tp", "1"), _plan(sp, "--tp", "1", "--hsdp")
    # sharded over the 8 GPUs of a node instead of all 1,000: 125x the optimizer state per GPU
    assert _row(hsdp, 1, False)["states_gib"] == pytest.approx(125 * _row(fsdp, 1, False)["states_gib"])
    assert _row(hsdp, 1, False)["fsdp_comm_s"] < _row(fsdp, 1, False)["fsdp_comm_s"]


def test_step_time_from_flops_and_mfu(sp):
    plan = _plan(sp, "--tp", "4", "--net-gbps", "1e9", "--nvlink-gbps", "1e9")  # communication ~free
    n = sp.params(sp.parse_args([]))["non_embedding"]
    flops = 6 * n + 12 * 32 * 4096 * 4096
    assert plan["compute"]["gflop_per_token"] == pytest.approx(flops / 1e9)
    row = _row(plan, 4, False)
    assert row["step_s"] == pytest.approx(row["global_batch_tokens"] * flops / (1000 * 989e12 * 0.35), rel=1e-6)
    assert _row(_plan(sp, "--tp", "4", "--mfu", "0.7"), 4, False)["compute_s"] == pytest.approx(row["compute_s"] / 2)


def test_young_daly_interval_minimises_lost_time(sp):
    save, mtbf, restart = 2.0, 5000.0, 60.0
    tau = sp.young_daly(save, mtbf)
    assert tau == pytest.approx(math.sqrt(2 * save * mtbf))

    def lost(t):
        return save / t + (restart + t / 2) / mtbf

    assert lost(tau) < min(lost(tau * 0.8), lost(tau * 1.25))
    plan = _plan(sp)
    f, step = plan["failures"], plan["compute"]["step_s"]
    assert f["failures_per_day"] == pytest.approx(419 / (54 * 16384) * 1000)
    mtbf_s = f["mtbf_h"] * 3600
    sync = f["sync"]
    assert sync["young_daly_s"] == pytest.approx(math.sqrt(2 * sync["save_blocking_s"] * mtbf_s))
    assert abs(sync["interval_s"] - sync["young_daly_s"]) <= step / 2 + 1e-9  # rounded to whole steps
    assert f["async"]["save_blocking_s"] < sync["save_blocking_s"] and f["async"]["goodput"] >= sync["goodput"]
    assert 0.9 < sync["goodput"] < 1.0


def test_checkpoint_and_loader_numbers(sp):
    plan = _plan(sp)
    n = sp.params(sp.parse_args([]))["total"]
    assert plan["checkpoint"]["train_state_gb"] == pytest.approx(12 * n / 1e9)
    assert plan["checkpoint"]["weights_bf16_gb"] == pytest.approx(2 * n / 1e9)
    d, tok_s_gpu = plan["data"], plan["compute"]["tokens_per_s_per_gpu_at_mfu"]
    assert d["images_per_sequence"] == 2
    assert d["images_per_s_per_gpu"] == pytest.approx(tok_s_gpu * 0.5 / 1024)
    assert d["jpeg_mb_per_s_per_gpu"] == pytest.approx(d["images_per_s_per_gpu"] * 0.1)


def test_cli_text_and_json():
    text = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    assert "assumptions" in text and "goodput" in text and "fits" in text
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "--gpus", "512", "--tp", "2,8"],
                         capture_output=True, text=True, check=True).stdout
    plan = json.loads(out)
    assert plan["assumptions"]["gpus"] == 512
    assert {(r["tp"], r["ac"]) for r in plan["memory"]} == {(2, False), (2, True), (8, False), (8, True)}
    assert set(plan) == {"assumptions", "memory", "compute", "data", "checkpoint", "failures"}


def test_tp_without_sequence_parallel_keeps_norms_and_logits_whole(sp):
    sp_plan, plain = _plan(sp, "--global-batch-tokens", "1"), _plan(sp, "--global-batch-tokens", "1",
                                                                    "--no-sequence-parallel")
    for tp in (2, 8):
        assert _row(plain, tp, False)["activations_gib"] > _row(sp_plan, tp, False)["activations_gib"]
        assert _row(plain, tp, False)["logits_gib"] == pytest.approx(_row(plain, 1, False)["logits_gib"])
    assert _row(plain, 1, False)["total_gib"] == pytest.approx(_row(sp_plan, 1, False)["total_gib"])  # TP 1: same


def test_gradient_accumulation_keeps_unsharded_gradients(sp):
    a = sp.parse_args([])
    n = sp.params(a)
    one, eight = sp.memory(a, 8, False, 1), sp.memory(a, 8, False, 8)
    assert (eight["unsharded_gib"] - one["unsharded_gib"]) * GIB == pytest.approx(4 * n["total"] / 8)
