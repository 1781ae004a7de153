"""benchmarks/train_throughput.py: nmm -> HF Llama conversion parity, and a 2-step smoke run (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import transformers  # noqa: F401  (a declared dev dependency: a missing one fails, never skips)

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


def _run(bench, tmp_path, *extra):
    import torch

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench.main([*TINY, "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", *extra,
                    "--json-out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_benchmark_two_steps_writes_json(bench, tmp_path):
    result = _run(bench, tmp_path)
    assert result["nmm_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0
    assert result["nmm_forward_ce_tokens_per_s"] > 0
    assert result["ratio_nmm_over_hf"] > 0 and result["ratio_nmm_forward_ce_over_hf"] > 0
    assert result["parity"]["max_abs_diff"] < 1e-4
    names = [r["name"] for r in result["rows"]]
    assert names == ["nmm loss()", "nmm forward+CE", "nmm forward+CE (unfactorised head)", "HF Llama forward+CE"]
    assert all(len(r["step_s"]) == 2 and not r["compiled"] and r["baseline"] == "HF Llama forward+CE"
               for r in result["rows"])
    assert "ratio_nmm_over_hf_compiled" not in result
    # the unfactorised nmm model and HF Llama start from the same weights and compute the same function
    unf = next(r for r in result["rows"] if "unfactorised" in r["name"])
    assert unf["final_loss"] == pytest.approx(result["rows"][-1]["final_loss"], abs=1e-3)


@pytest.mark.slow
def test_benchmark_compiled_pair(bench, tmp_path):
    """--compile adds nmm loss() and HF Llama forward+CE through torch.compile, each compared with its own kind."""
    result = _run(bench, tmp_path, "--compile", "--skip-unfactorised")
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["nmm loss()", "nmm forward+CE", "HF Llama forward+CE", "nmm loss() compiled",
                          "HF Llama forward+CE compiled"]
    nmm_c, hf_c = rows["nmm loss() compiled"], rows["HF Llama forward+CE compiled"]
    assert nmm_c["compiled"] and hf_c["compiled"] and not rows["nmm loss()"]["compiled"]
    assert nmm_c["baseline"] == hf_c["baseline"] == "HF Llama forward+CE compiled"
    assert rows["nmm loss()"]["baseline"] == "HF Llama forward+CE" and hf_c["ratio_vs_hf"] == 1.0
    assert result["ratio_nmm_over_hf_compiled"] == nmm_c["ratio_vs_hf"] > 0
    assert result["nmm_compiled_tokens_per_s"] > 0 and result["hf_compiled_tokens_per_s"] > 0
    # compiled, each trains the same function from the same weights on the same batch as its eager twin
    assert nmm_c["final_loss"] == pytest.approx(rows["nmm loss()"]["final_loss"], abs=1e-3)
    assert hf_c["final_loss"] == pytest.approx(rows["HF Llama forward+CE"]["final_loss"], abs=1e-3)
    assert set(result["first_warmup_step_s"]) == set(rows)
