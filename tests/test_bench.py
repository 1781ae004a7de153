"""`nmm bench`: the nmm -> HF conversion is exact, and each benchmark runs and writes its JSON.

No timing assertions: the numbers depend on the machine. `--quick` runs every code path on the
shapes-tiny preset (random weights) in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # noqa: F401  (a declared dev dependency: a missing one fails, never skips)

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
        assert list(r["pairs"]) == ["eager"]  # without --compile: the eager pair only
        p = r["pairs"]["eager"]
        assert positive(p["nmm_tokens_per_s"], p["hf_tokens_per_s"], p["speedup"], p["speedup_best"],
                        p["speedup_paired"], p["speedup_cpu_time"])
        assert len(p["nmm_s"]) == len(p["hf_s"]) == 1
        assert p["tokens_match"] == 1.0  # greedy decoding of the same weights gives the same tokens
    # the goal is on the compiled pair, which was not run: said so, not faked
    assert d["goal"]["target"] == 2.0 and d["goal"]["value"] is None and d["goal"]["met"] is False
    assert "--compile" in d["goal"]["note"]


def test_bench_speech_quick_writes_json(speech_run, tmp_path):
    out = tmp_path / "speech.json"
    text = bench_cli("speech", "--quick", "--run", str(speech_run), "--out", out)
    assert "RTF" in text and str(out.name) in text
    d = json.loads(out.read_text())["speech"]
    assert d["parity"]["max_abs_diff"] < 1e-4 and d["encode_rtf"] > 0
    assert [(r["task"], r["batch"]) for r in d["rows"]] == [("recognition", 1), ("synthesis", 1),
                                                           ("recognition", 2), ("synthesis", 2)]
    for r in d["rows"]:
        assert positive(r["nmm_rtf"], r["hf_rtf"], r["speedup"], r["audio_seconds"])
        assert r["tokens_match"] == 1.0  # greedy decoding of the same weights gives the same tokens
    assert all(r["vocoder_rtf"] > 0 for r in d["rows"] if r["task"] == "synthesis")


def test_bench_speech_refuses_a_model_without_audio(tmp_path):
    with pytest.raises(Exception, match="no audio modality"):
        from nmm.bench.common import load_target
        from nmm.bench.speech import run_speech

        run_speech(load_target("shapes-tiny")[0])


def test_bench_image_quick_writes_json(tmp_path):
    out = tmp_path / "image.json"
    bench_cli("image", "--quick", "--run", "shapes-tiny", "--out", out)
    d = json.loads(out.read_text())["image"]
    assert d["parity"]["max_abs_diff"] < 1e-4
    (r,) = d["rows"]
    assert r["batch"] == 1 and r["cfg_scale"] == 2.0 and list(r["pairs"]) == ["eager"]
    p = r["pairs"]["eager"]
    assert positive(p["nmm_s_per_image"], p["hf_s_per_image"], p["speedup"], p["hf_batched_s_per_image"],
                    p["vs_hf_batched"]["speedup"])
    # HF's stock CFG, HF with the unconditional prompts batched, and nmm: the same images
    assert p["images_match"] == 1.0 and p["hf_batched_images_match"] == 1.0
    assert d["goal"]["target"] == 2.0 and d["goal"]["value"] is None


@pytest.mark.slow
def test_bench_all_quick_compile_reports_both_pairs(tmp_path):
    """--compile: the compiled pair (nmm Engine(compile=True) vs HF generate with a static cache and a compiled
    decode step) next to the eager pair, in one run; the compiled HF decodes exactly nmm's tokens and images."""
    out = tmp_path / "all.json"
    text = bench_cli("all", "--quick", "--compile", "--run", "shapes-tiny", "--out", out)
    assert "compiled" in text and "static cache" in text
    data = json.loads(out.read_text())
    for name, match in (("decode", "tokens_match"), ("image", "images_match")):
        d = data[name]
        assert d["config"]["compile"] is True and set(d["config"]["pairs"]) == {"eager", "compiled"}
        for r in d["rows"]:
            assert list(r["pairs"]) == ["eager", "compiled"]
            for p in r["pairs"].values():
                assert p[match] == 1.0 and p["nmm_matches_eager"] == 1.0
                assert positive(p["speedup"], p["speedup_paired"], p["speedup_cpu_time"])
                assert positive(p["nmm_first_call_s"], p["hf_first_call_s"])
        first = next(r for r in d["rows"] if r["batch"] == 1)
        g = d["goal"]
        assert g["target"] == 2.0 and g["value"] == first["pairs"]["compiled"]["speedup"]
        assert g["met"] == (g["value"] >= 2.0)
    _check_server(data["server"], stream=False)


def test_bench_server_quick_against_a_live_server(tmp_path):  # about 10 s: a real server subprocess
    _server_quick(tmp_path)


def test_bench_server_quick_streamed(tmp_path):
    out = tmp_path / "server.json"
    bench_cli("server", "--quick", "--stream", "--run", "shapes-tiny", "--out", out)
    _check_server(json.loads(out.read_text())["server"], stream=True)


def _server_quick(tmp_path):
    out = tmp_path / "server.json"
    bench_cli("server", "--quick", "--run", "shapes-tiny", "--out", out)
    _check_server(json.loads(out.read_text())["server"], stream=False)


def _check_server(d, stream: bool):
    n = d["config"]["max_tokens"]
    assert n == 8 and d["config"]["stream"] is stream
    assert [lvl["clients"] for lvl in d["levels"]] == [1, 2]
    for lvl in d["levels"]:
        assert lvl["ok"] == lvl["requests"] == 4 and lvl["errors"] == 0
        # every answer has exactly the forced length: the levels load the decoder, not just the HTTP stack
        assert lvl["completion_tokens_min"] == lvl["completion_tokens_max"] == n and lvl["wrong_length"] == 0
        assert lvl["finish_reasons"] == {"length": 4}
        assert lvl["completion_tokens_per_s"] == pytest.approx(lvl["requests_per_s"] * n, rel=0.01)
        assert positive(lvl["requests_per_s"], lvl["latency_p50_s"], lvl["latency_p99_s"])
        assert lvl["latency_p50_s"] <= lvl["latency_p99_s"]
        if stream:
            assert 0 < lvl["ttft_p50_s"] <= lvl["ttft_p99_s"] and lvl["ttft_p50_s"] < lvl["latency_p99_s"]
            assert positive(lvl["tpot_p50_s"])
        else:
            assert "ttft_p50_s" not in lvl
    assert positive(d["scaling"], d["tokens_per_s_scaling"]) and d["goal"]["target"] == 10.0


def test_chat_body_asks_for_a_fixed_length():
    from nmm.bench.server import chat_body

    body = chat_body(32)
    assert body["max_tokens"] == body["min_tokens"] == 32 and body["ignore_eos"] is True and "stream" not in body
    assert chat_body(8, stream=True)["stream_options"] == {"include_usage": True}


def test_server_process_reports_a_failed_start():
    from nmm.bench.server import ServerProcess
    from nmm.errors import NmmError

    with pytest.raises(NmmError, match="exited with code"), ServerProcess("no-such-preset", startup_timeout=120):
        pass


def test_bench_video_quick_writes_json(tmp_path):
    out = tmp_path / "video.json"
    text = bench_cli("video", "--run", "video-tiny", "--quick", "--out", out)
    assert "s/clip" in text
    result = json.loads(out.read_text())["video"]
    assert result["parity"]["max_abs_diff"] < result["parity"]["atol"]
    assert {r["task"] for r in result["rows"]} == {"text_to_clip", "captioning"}
    for row in result["rows"]:
        assert positive(row["nmm_item_s"], row["hf_item_s"], row["speedup"])
        assert row["tokens_match"] == 1.0  # greedy, same weights: the same tokens on both sides


def test_bench_train_quick_reports_ratios_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    text = bench_cli("train", "--quick", "--size", "32,2,4,2,64,2,32", "--out", out)
    assert "MFU" in text and "HF Llama forward+CE" in text
    result = json.loads(out.read_text())["train"]
    assert result["parity"]["max_abs_diff"] < result["parity"]["atol"]
    for row in result["rows"]:
        assert positive(row["tokens_per_s"], row["step_gflop"]) and 0 < row["mfu"] < 1
    rows = {r["name"]: r for r in result["rows"]}
    # the unfactorised nmm head computes what HF computes: the same counted FLOPs
    assert rows["nmm forward+CE (unfactorised head)"]["step_gflop"] == rows["HF Llama forward+CE"]["step_gflop"]
    assert rows["nmm loss()"]["step_gflop"] < rows["HF Llama forward+CE"]["step_gflop"]  # factorised heads


@pytest.mark.parametrize("cmd", ["decode", "image", "server", "speech", "all"])
def test_bench_help_says_what_is_measured(cmd):
    text = bench_cli(cmd, "--help")
    assert "--run" in text and "--out" in text and "--quick" in text
    if cmd not in ("all", "speech"):
        assert "Goal" in text
