"""Chameleon in and out: a tiny random ChameleonForConditionalGeneration (tests/interop/conftest.py),
imported with nmm.interop, must compute transformers' logits, decode the same greedy tokens, tokenize
text and images to the same ids, and export back to a checkpoint transformers loads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nmm
from nmm.errors import CheckpointError, InputError
from nmm.infer.sampling import SamplingConfig
from nmm.interop import export_hf, import_hf
from nmm.interop.chameleon import ChameleonIds, image_code_of, image_token_name

ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe(imported):
    return nmm.load(imported[0], device="cpu")


@pytest.fixture(scope="module")
def ids(imported):
    return ChameleonIds.load(imported[0] / "chameleon_ids.json")


def interleaved(pipe, seed: int = 0) -> list[int]:
    """<bos> text <boi> 64 image codes <eoi> text: the sequence the parity checks run on."""
    v = pipe.vocab
    codes = torch.randint(0, v.image_codes, (v.tokens_per_image,), generator=torch.Generator().manual_seed(seed))
    return (pipe.codecs.prompt(["a small red circle at the top left"]) + [v.boi, *v.ids("image", codes).tolist(), v.eoi]
            + pipe.codecs.encode_text(" what colour is the circle?"))


@torch.no_grad()
def hf_raw_logits(hf, hf_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits before ChameleonForConditionalGeneration masks the image tokens off."""
    return hf.lm_head(hf.model(input_ids=hf_ids).last_hidden_state)


# ---- import ------------------------------------------------------------------------------------
def test_import_writes_a_run_that_nmm_loads(tiny, chameleon, imported, pipe, ids):
    src, hf = chameleon
    run, summary = imported
    assert summary["shards"] >= 5 and (src / "model.safetensors.index.json").is_file()  # really sharded
    for name in ("model.safetensors", "model.json", "vocab.json", "text_tokenizer.json", "codecs.json",
                 "chameleon_vq.json", "chameleon_vq.safetensors", "config.yaml", "chameleon_ids.json", "import.json"):
        assert (run / name).is_file(), name
    v, vm = pipe.vocab, hf.config.vocabulary_map
    assert v.names == ("text", "image") and v.image_codes == tiny.n_codes and v.tokens_per_image == 64
    assert v.size == hf.config.vocab_size and v.n_text == hf.config.vocab_size - tiny.n_codes - 5
    # nmm's specials are Chameleon's tokens; image code c is the token named for c
    assert ids.to_hf([v.bos, v.eos, v.pad, v.boi, v.eoi]) == [vm["<s>"], vm["</s>"], vm["<pad>"], vm["<racm3:break>"], vm["<eoss>"]]
    for code in (0, 7, tiny.n_codes - 1):
        assert ids.to_hf(v.ids("image", code)) == vm[image_token_name(code)]
        assert image_code_of(image_token_name(code)) == code
    assert pipe.model.cfg.qk_norm_kind == "layernorm-per-head" and pipe.model.cfg.variant == "early-discrete"
    assert pipe.model.num_params() == summary["params"]


def test_a_fresh_process_finds_the_codec_by_its_kind(imported):
    """codecs.json names the image codec's kind; nmm.load imports the module that registers it (nothing
    imports nmm.interop first in `nmm generate` or `nmm serve`)."""
    code = ("import sys, nmm; p = nmm.load(sys.argv[1], device='cpu'); "
            "print(type(p.codecs.image).__name__, 'nmm.interop.chameleon' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code, str(imported[0])], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.stdout.split() == ["ChameleonVQCodec", "True"], res.stderr[-2000:]


def test_logits_match_transformers_fp32(chameleon, pipe, ids):
    hf = chameleon[1]
    x = torch.tensor([interleaved(pipe, 0), interleaved(pipe, 1)])  # text, an image block, text
    with torch.no_grad():
        ours = pipe.model(x)  # (B, T, V) in nmm's id order
    raw = hf_raw_logits(hf, ids.to_hf(x))[..., ids.to_hf(torch.arange(pipe.vocab.size))]  # same column order
    diff = (ours - raw).abs().max().item()
    assert diff <= ATOL and ours.abs().max() > 1.0, (diff, ours.abs().max())
    # transformers' own output differs only where it masks the image tokens off
    with torch.no_grad():
        masked = hf(input_ids=ids.to_hf(x)).logits[..., ids.to_hf(torch.arange(pipe.vocab.text_size))]
    assert (ours[..., : pipe.vocab.text_size] - masked).abs().max() <= ATOL


def test_text_tokenizer_gives_chameleons_ids(chameleon, pipe, ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chameleon[0])
    for text in ["a small red circle at the top left", "Chameleon reads IMGIMGBZ as text", "héllo, wörld! 123  x"]:
        ours = pipe.codecs.encode_text(text)
        assert ids.to_hf(ours) == tok(text, add_special_tokens=False).input_ids, text
        assert pipe.codecs.decode_text(ours) == tok.decode(ids.to_hf(ours))
    # a literal special in text stays text in nmm (Chameleon would read it as the special token)
    assert pipe.vocab.bos not in pipe.codecs.encode_text("<s> hi")


def test_greedy_text_matches_transformers_generate(chameleon, pipe, ids):
    """32 greedy steps through nmm's engine (batched, left-padded, static KV cache) against transformers'
    generate (one prompt at a time, its cache), both choosing among the same ids."""
    from transformers import LogitsProcessor

    hf, v = chameleon[1], pipe.vocab
    prompts = [interleaved(pipe, 2), pipe.codecs.prompt(["the quick brown fox"])]
    ours = pipe.engine.generate(prompts, 32, SamplingConfig(temperature=0), allow_images=False, ignore_eos=True).tokens
    allowed = torch.zeros(hf.config.vocab_size, dtype=torch.bool)
    allowed[ids.to_hf(torch.arange(v.n_text))] = True  # nmm's text phase without <eos> or <boi>

    class Allowed(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    for prompt, got in zip(prompts, ours):
        x = ids.to_hf(torch.tensor([prompt]))
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                          logits_processor=[Allowed()], eos_token_id=None, pad_token_id=hf.config.pad_token_id)
        assert ids.to_hf(got) == out[0, x.shape[1]:].tolist()
        assert len(got) == 32 and len(set(got)) > 3


def test_nmm_generates_image_tokens_with_transformers_weights(chameleon, pipe, ids):
    """Chameleon's transformers head masks image tokens off; nmm's engine writes them. A greedy image
    (64 codes, the forced <eoi>) and text after it equal a reference loop on transformers' unmasked
    logits under nmm's decoding state machine."""
    hf, v = chameleon[1], pipe.vocab
    prompt = pipe.codecs.prompt(["a small red circle"], open_item="image")  # ends in <boi>
    steps = v.tokens_per_image + 1 + 8
    ours = pipe.engine.generate([prompt], steps, SamplingConfig(temperature=0), allow_images=True, ignore_eos=True).tokens[0]
    from transformers import DynamicCache

    dec, ref, feed = pipe.engine.decoder, [], torch.tensor([prompt])
    state, table = dec.start(prompt), dec.table(True, eos=False)
    order, cache = ids.to_hf(torch.arange(v.size)), DynamicCache(config=hf.config)
    with torch.no_grad():
        for _ in range(steps):
            h = hf.model(input_ids=ids.to_hf(feed), cache=cache, use_cache=True).last_hidden_state
            logits = hf.lm_head(h)[0, -1, order]  # unmasked, in nmm's column order
            tok = int((logits + table[state.phase]).argmax())
            ref.append(tok)
            dec.advance(state, tok)
            feed = torch.tensor([[tok]])
    assert ours == ref
    codes = ours[: v.tokens_per_image]
    assert all(pipe.vocab.is_modality("image", torch.tensor(codes))) and ours[v.tokens_per_image] == v.eoi
    assert len(set(codes)) > 3


def test_image_codes_match_transformers_vq(tiny, chameleon, pipe, ids):
    from transformers import ChameleonImageProcessorPil

    hf, R = chameleon[1], tiny.resolution
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, R, R, 3), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, R, dtype=np.uint8)[None, :, None], (R, R, 3))
    images = np.concatenate([noise, ramp[None]])
    processor = ChameleonImageProcessorPil.from_pretrained(chameleon[0])
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    codec = pipe.codecs.image
    assert torch.equal(codec.pixels(images), pixels)  # the same model input, bit for bit
    with torch.no_grad():
        theirs = hf.model.get_image_tokens(pixels)  # Chameleon ids of the image tokens
    ours = pipe.codecs.encode_images(images)  # nmm ids
    assert ids.to_hf(torch.as_tensor(ours)).tolist() == theirs.tolist()
    assert len(np.unique(ours)) > 5
    # an image file of another size: resized and cropped as the processor does
    from PIL import Image

    photo = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    assert torch.equal(codec.pixels(codec.from_bytes(buf.getvalue())[None]),
                       processor(images=[photo], return_tensors="pt")["pixel_values"])


def test_decode_is_refused_because_the_checkpoint_has_no_decoder(pipe):
    with pytest.raises(InputError, match="decoder"):
        pipe.codecs.decode_images(np.zeros((1, 64), dtype=np.int64) + pipe.vocab.start("image"))


def test_swin_norm_imports_with_parity(tiny, tmp_path):
    hf = tiny.build(tmp_path / "hf", seed=3, swin_norm=True, shard="10MB", layers=1)
    import_hf(tmp_path / "hf", tmp_path / "run")
    pipe = nmm.load(tmp_path / "run", device="cpu")
    ids = ChameleonIds.load(tmp_path / "run" / "chameleon_ids.json")
    assert pipe.model.cfg.norm_order == "swin"
    x = torch.tensor([interleaved(pipe, 4)])
    with torch.no_grad():
        diff = (pipe.model(x) - hf_raw_logits(hf, ids.to_hf(x))[..., ids.to_hf(torch.arange(pipe.vocab.size))]).abs().max()
    assert diff <= ATOL


def test_other_checkpoints_are_refused_by_name(chameleon, tmp_path):
    src = chameleon[0]
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama'"):
        import_hf(bad, tmp_path / "out")
    biased = tmp_path / "biased"
    biased.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(CheckpointError, match="attention_bias"):
        import_hf(biased, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not empty"):
        import_hf(src, chameleon[0])  # never over a non-empty directory


# ---- export ------------------------------------------------------------------------------------
def test_export_of_an_imported_run_round_trips(chameleon, imported, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    src, hf = chameleon
    out = tmp_path / "exported"
    export_hf(imported[0], out)
    back = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, hf(input_ids=x).logits)
    for name, tensor in hf.state_dict().items():  # every weight, the VQ encoder's too, exactly
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


def test_export_of_an_nmm_trained_run(tiny, tmp_path):
    """A run nmm trained (its own tokenizers, factorised image head, Chameleon's QK-norm) exports to a
    checkpoint transformers loads with the same logits, and a tokenizer that gives nmm's ids."""
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    from nmm.config import ImageTokenizerConfig, ModelConfig, to_dict
    from nmm.modalities.codecs import Codecs
    from nmm.modalities.image import ImageTokenizer
    from nmm.modalities.text import TextTokenizer
    from nmm.model.model import NativeMultimodalModel
    from nmm.utils import atomic_write_json, save_safetensors

    codecs = Codecs(TextTokenizer.train(tiny.corpus, vocab_size=300), ImageTokenizer(ImageTokenizerConfig()))
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=160,
                      qk_norm_kind="layernorm-per-head")
    model = NativeMultimodalModel(cfg, codecs.vocab).eval()
    tiny.randomize(model, 7)
    run = tmp_path / "run"
    codecs.save(run)
    save_safetensors(model.state_dict(), run / "model.safetensors")
    atomic_write_json(run / "model.json", to_dict(cfg))

    out = tmp_path / "hf"
    export_hf(run, out)
    hf = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    v = codecs.vocab
    x = torch.tensor([codecs.prompt(["a small red circle"]) + [v.boi, *range(v.start("image"), v.start("image") + 64), v.eoi]])
    with torch.no_grad():
        diff = (model(x) - hf_raw_logits(hf, x)).abs().max().item()  # ids are nmm's own: no map
    assert diff <= ATOL, diff
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a small red circle").input_ids == [v.bos, *codecs.encode_text("a small red circle")]
    beside = Codecs.load(out / "nmm_codecs")  # the run's own codecs, to make image-token ids for the export
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    assert (beside.encode_images(image) == codecs.encode_images(image)).all()


def test_export_refuses_what_chameleon_cannot_compute(tmp_path):
    from nmm.config import ModelConfig, to_dict
    from nmm.utils import atomic_write_json

    run = tmp_path / "run"
    run.mkdir()
    atomic_write_json(run / "model.json", to_dict(ModelConfig()))  # nmm's RMSNorm QK-norm
    with pytest.raises(CheckpointError, match=r"model\.json: .*qk_norm_kind=layernorm-per-head"):
        export_hf(run, tmp_path / "out", family="chameleon")
    atomic_write_json(run / "model.json", to_dict(ModelConfig(fusion="late", image_repr="continuous")))
    with pytest.raises(CheckpointError, match="early fusion with discrete image codes"):
        export_hf(run, tmp_path / "out", family="chameleon")
    with pytest.raises(CheckpointError, match="export family 'gpt2'"):
        export_hf(run, tmp_path / "out", family="gpt2")


# ---- memory ------------------------------------------------------------------------------------
def test_conversion_in_small_blocks_writes_the_same_file(chameleon, imported, tmp_path, monkeypatch):
    """Tensors are copied in blocks of rows (a 64 MiB cap in real use); blocks of 16 rows give the same bytes."""
    import nmm.interop.common as common

    monkeypatch.setattr(common, "CHUNK_BYTES", 4096)
    import_hf(chameleon[0], tmp_path / "run", dtype="fp32")
    for name in ("model.safetensors", "chameleon_vq.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (imported[0] / name).read_bytes(), name


def test_conversion_streams_in_about_a_tensor_of_memory(tmp_path):
    """A synthetic 64 MB checkpoint in 8 shards converts in a fresh process whose peak RSS rises above
    its baseline by about one tensor (read in blocks through short-lived mappings), far below the shard
    and checkpoint sizes. The first model built on the meta device costs a one-off ~80 MB of torch
    machinery, whatever the model size; the script reports it apart."""
    script = Path(__file__).with_name("measure_import_memory.py")
    res = subprocess.run([sys.executable, str(script), "--mb", "64", "--shards", "8", "--dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["checkpoint_mb"] > 60 and m["shards"] == 8
    assert m["conversion_mb"] < m["largest_tensor_mb"] + 16 and m["conversion_mb"] < 0.3 * m["checkpoint_mb"], m
