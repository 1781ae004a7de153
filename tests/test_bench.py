"""`nmm bench`: the nmm -> HF conversion is exact, and each benchmark runs and writes its JSON.

No timing assertions: the numbers depend on the machine. `--quick` runs every code path on the
shapes-tiny preset (random weights) in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

import transformers  # noqa: E402,F401

from nmm.bench.hf import ParityError, hf_arch, logits_parity, nmm_to_hf
from nmm.config import ModelConfig
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel

VOCAB = Vocabulary(50, (image_spec(24, (6, 4), 4),))


@pytest.fixture(autouse=True)
def keep_threads():
    """The benchmarks set torch's thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_model(qk_norm: bool, factorised: bool = True) -> NativeMultimodalModel:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                      qk_norm=qk_norm, factorised_image_head=factorised)
    model = NativeMultimodalModel(cfg, VOCAB).eval()
    with torch.no_grad():  # large, varied weights and norm gains != 1: a wrong mapping shows as an O(1) difference
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("factorised", [False, True])
def test_logits_parity_and_its_failure(qk_norm, factorised):
    model = tiny_model(qk_norm, factorised)
    hf = nmm_to_hf(model)
    assert type(hf).__name__ == hf_arch(model) == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    ids = torch.randint(0, VOCAB.size, (2, 24), generator=torch.Generator().manual_seed(1))
    result = logits_parity(model, hf, ids)
    assert result["max_abs_diff"] < 1e-4 and result["logit_scale"] > 0.5  # real logits, and they agree
    with torch.no_grad():  # v_proj: not normalised away by QK-norm, so a wrong weight must be caught
        hf.model.layers[0].self_attn.v_proj.weight.mul_(1.05)
    with pytest.raises(ParityError, match="max \\|logit diff\\|"):
        logits_parity(model, hf, ids)


def test_greedy_decode_is_token_identical_to_hf():
    """The decode benchmark's premise: the same weights decode to the same tokens (left padding too)."""
    from transformers import GenerationConfig

    from nmm.bench.hf import allowed_ids_processor, left_pad
    from nmm.infer.engine import Engine
    from nmm.infer.sampling import SamplingConfig

    model = tiny_model(qk_norm=True)
    hf = nmm_to_hf(model)
    prompts = [[VOCAB.bos, 3, 4, 5, 6], [VOCAB.bos, 7], [VOCAB.bos, 9, 9, 1]]
    ours = Engine(model).generate(prompts, 10, SamplingConfig(temperature=0), allow_images=False,
                                  ignore_eos=True).tokens
    allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
    allowed[: VOCAB.n_text] = True
    ids, mask = left_pad(prompts, VOCAB.pad)
    cfg = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=VOCAB.pad, eos_token_id=None)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                         logits_processor=[allowed_ids_processor(allowed)])[:, ids.shape[1]:].tolist()
    assert all(len(t) == 10 for t in ours)
    assert ours == theirs


def bench_cli(*args):
    from typer.testing import CliRunner

    from nmm.cli import app

    result = CliRunner().invoke(app, ["bench", *map(str, args)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def positive(*xs):
    return all(isinstance(x, (int, float)) and x > 0 for x in xs)


def test_bench_decode_quick_writes_json(tmp_path):
    out = tmp_path / "decode.json"
    text = bench_cli("decode", "--quick", "--run", "shapes-tiny", "--out", out)
    assert "nmm/HF" in text and str(out.name) in text
    data = json.loads(out.read_text())
    assert data["target"] == "shapes-tiny" and data["quick"] is True
    d = data["decode"]
    assert d["parity"]["max_abs_diff"] < 1e-4 and d["parity"]["hf_arch"] == "Qwen3ForCausalLM"
    assert [r["batch"] for r in d["rows"]] == [1, 2]
    for r in d["rows"]:
        assert positive(r["nmm_tokens_per_s"], r["hf_tokens_per_s"], r["speedup"], r["speedup_best"],
                        r["speedup_paired"], r["speedup_cpu_time"])
        assert r["tokens_match"] == 1.0  # greedy decoding of the same weights gives the same tokens
    assert set(d["goal"]) == {"metric", "target", "value", "met"} and d["goal"]["target"] == 3.0


def test_bench_image_quick_writes_json(tmp_path):
    out = tmp_path / "image.json"
    bench_cli("image", "--quick", "--run", "shapes-tiny", "--out", out)
    d = json.loads(out.read_text())["image"]
    assert d["parity"]["max_abs_diff"] < 1e-4
    (r,) = d["rows"]
    assert r["batch"] == 1 and r["cfg_scale"] == 2.0
    assert positive(r["nmm_s_per_image"], r["hf_s_per_image"], r["speedup"])
    assert r["images_match"] == 1.0
    assert d["goal"]["target"] == 5.0


def test_bench_server_quick_against_a_live_server(tmp_path):  # about 10 s: a real server subprocess
    _server_quick(tmp_path)


def _server_quick(tmp_path):
    out = tmp_path / "server.json"
    bench_cli("server", "--quick", "--run", "shapes-tiny", "--out", out)
    d = json.loads(out.read_text())["server"]
    assert [lvl["clients"] for lvl in d["levels"]] == [1, 2]
    for lvl in d["levels"]:
        assert lvl["ok"] == lvl["requests"] == 4 and lvl["errors"] == 0
        assert positive(lvl["requests_per_s"], lvl["latency_p50_s"], lvl["latency_p99_s"], lvl["completion_tokens_mean"])
        assert lvl["latency_p50_s"] <= lvl["latency_p99_s"]
    assert positive(d["scaling"]) and d["goal"]["target"] == 10.0


def test_server_process_reports_a_failed_start():
    from nmm.bench.server import ServerProcess
    from nmm.errors import NmmError

    with pytest.raises(NmmError, match="exited with code"), ServerProcess("no-such-preset", startup_timeout=120):
        pass


@pytest.mark.parametrize("cmd", ["decode", "image", "server", "all"])
def test_bench_help_says_what_is_measured(cmd):
    text = bench_cli(cmd, "--help")
    assert "--run" in text and "--out" in text and "--quick" in text
    if cmd != "all":
        assert "Goal" in text
