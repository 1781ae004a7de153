"""The text-backbone adapter (nmm.interop.llama, what `nmm bench` compares against): an nmm model and its
Llama / Qwen3 copy compute the same logits, in memory and through an exported checkpoint directory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import nmm
from nmm.config import ImageTokenizerConfig, ModelConfig, to_dict
from nmm.interop import export_hf
from nmm.interop.llama import hf_arch, nmm_to_hf
from nmm.modalities.codecs import Codecs
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.text import TextTokenizer
from nmm.model.model import NativeMultimodalModel
from nmm.utils import atomic_write_json, save_safetensors

ATOL = 1e-4


def build(tiny_ns, **kw):
    """A small random nmm model (factorised image head) with trained-from-scratch tokenizers."""
    codecs = Codecs(TextTokenizer.train(tiny_ns.corpus, vocab_size=300), ImageTokenizer(ImageTokenizerConfig()))
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=128, **kw)
    torch.manual_seed(0)
    model = NativeMultimodalModel(cfg, codecs.vocab).eval()
    tiny_ns.randomize(model, 1)
    return model, codecs


def sequence(codecs) -> torch.Tensor:
    v = codecs.vocab
    lo = v.start("image")
    return torch.tensor([codecs.prompt(["a small red circle"]) + [v.boi, *range(lo + 5, lo + 69), v.eoi]
                         + codecs.encode_text(" at the top")])


@pytest.mark.parametrize("qk_norm, arch", [(True, "Qwen3ForCausalLM"), (False, "LlamaForCausalLM")])
def test_hf_copy_computes_the_same_logits(tiny, qk_norm, arch):
    model, codecs = build(tiny, qk_norm=qk_norm)
    hf = nmm_to_hf(model)
    assert hf_arch(model) == arch == type(hf).__name__
    x = sequence(codecs)
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert (ours - theirs).abs().max() <= ATOL and ours.abs().max() > 1


def test_chameleon_options_are_not_copied_as_qwen3(tiny):
    model, _ = build(tiny, qk_norm_kind="layernorm-per-head")
    with pytest.raises(ValueError, match="export this model as Chameleon"):
        nmm_to_hf(model)


def test_export_writes_a_checkpoint_auto_classes_load(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, codecs = build(tiny)
    run = tmp_path / "run"
    codecs.save(run)
    save_safetensors(model.state_dict(), run / "model.safetensors")
    atomic_write_json(run / "model.json", to_dict(model.cfg))
    summary = export_hf(run, tmp_path / "hf")  # nmm's RMSNorm QK-norm: Qwen3
    assert summary["family"] == "Qwen3ForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = sequence(codecs)
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)).abs().max() <= ATOL
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("a small red circle").input_ids == [codecs.vocab.bos, *codecs.encode_text("a small red circle")]
    assert tok.convert_ids_to_tokens(codecs.vocab.start("image") + 7) == "<image:7>"
    assert nmm.load(run, device="cpu").vocab == Codecs.load(tmp_path / "hf" / "nmm_codecs").vocab
