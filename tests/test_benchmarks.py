"""benchmarks/train_throughput.py: nmm -> HF Llama conversion parity, and a 2-step smoke run (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "64",
        "--vocab", "50", "6", "4", "4", "--threads", "1"]  # small vocabulary, one thread: quick on a busy CPU


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nmm_to_hf_llama_parity(bench):
    cfg = bench.model_config(d_model=32, layers=2, heads=4, kv_heads=2, ffn=64, seq=64)
    result = bench.parity_check(cfg, bench.DEMO_VOCAB, batch=2, seq=24)
    assert result["unfactorised"] < 1e-4 and result["factorised"] < 1e-4
    assert result["logit_scale"] > 0.1  # the check compares non-trivial logits


def test_nmm_to_hf_llama_rejects_qk_norm(bench):
    import torch

    from nmm.config import ModelConfig
    from nmm.model.model import NativeMultimodalModel

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        bench.nmm_to_hf_llama(NativeMultimodalModel(cfg, bench.DEMO_VOCAB))


def test_benchmark_two_steps_writes_json(bench, tmp_path):
    import torch

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench.main([*TINY, "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--json-out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["nmm_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0
    assert result["nmm_forward_ce_tokens_per_s"] > 0
    assert result["ratio_nmm_over_hf"] > 0 and result["ratio_nmm_forward_ce_over_hf"] > 0
    assert result["parity"]["max_abs_diff"] < 1e-4
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "nmm loss()" and names[-1] == "HF Llama forward+CE"
    assert all(len(r["step_s"]) == 2 for r in result["rows"])
    # the unfactorised nmm model and HF Llama start from the same weights and compute the same function
    unf = next(r for r in result["rows"] if "unfactorised" in r["name"])
    assert unf["final_loss"] == pytest.approx(result["rows"][-1]["final_loss"], abs=1e-3)
