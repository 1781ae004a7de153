"""Emu3 in: a tiny random Emu3ForConditionalGeneration, built and saved by transformers (no hub), imported
with nmm.interop, must compute transformers' logits on the sequence Emu3's own processor builds (text, an
image in Emu3's layout, text), decode the same greedy tokens, tokenize text to the same ids, and its VQ-VAE
port must give the same codes from the same pixels and the same pixels from the same codes; images
generated with CFG through nmm's engine decode to pictures.

The checkpoint is laid out like the released ones: a byte-level BPE (GPT-2 pre-tokenizer) whose specials
`<|endoftext|>`, `<|extra_N|>`, `<|image start|>`, `<|image end|>`, `<|image token|>`, `<image>` and the
visual tokens `<|visual token NNNNNN|>` (here shuffled over their ids, so nothing relies on code c at a
fixed offset) are in the model vocabulary and the added tokens; weights saved by transformers 5 in shards
under their legacy names (`text_model.model.*`, `vqmodel.*`); a VQ-VAE with 4 levels (downsample 8, as
Emu3's processor assumes), channel changes (nin shortcuts), attention at the deepest level, temporal
down/upsampling and BatchNorm3d statistics away from 0 and 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import nmm
from nmm.errors import CheckpointError
from nmm.infer.sampling import SamplingConfig
from nmm.interop import import_hf
from nmm.interop.emu3 import Emu3Ids
from nmm.modalities.document import ItemSegment


def _interop_conftest():
    """tests/interop/conftest.py as a module, for its shared builders (a conftest is not importable by
    name under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("_nmm_interop_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = _interop_conftest()

ATOL = 1e-4
N_CODES = 48  # VQ codebook
RESOLUTION = 64  # min_pixels 64*64: the run's fixed size; downsample 8 -> an 8x8 grid
GRID = RESOLUTION // 8
CORPUS = ["a small red circle at the top left of the picture", "a large blue square in the middle",
          "two green triangles and one yellow star", "the quick brown fox jumps over the lazy dog",
          "what colour is the circle? it is red.", "Emu3 reads and writes images and text, 64*64 and 8*8."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_200|>", "<|extra_201|>",
            "<|extra_202|>", "<|extra_203|>", "<|extra_204|>", "<|image start|>", "<|image end|>", "<|image token|>",
            "<image>"]
EXTRA_TOKENS = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}


def emu3_tokenizer(n_codes: int, seed: int = 0) -> tuple[dict, dict[str, int]]:
    """(tokenizer.json as a dict, token -> id): text BPE ids first, then the specials and the visual tokens
    (shuffled), all in the model vocabulary and as special added tokens, as transformers' converter writes."""
    data = kit.trained_bpe(CORPUS)
    vocab = dict(data["model"]["vocab"])
    order = np.random.default_rng(seed).permutation(n_codes)
    specials = SPECIALS[:9] + [f"<|visual token {int(c):06d}|>" for c in order[: n_codes // 2]] + SPECIALS[9:] \
        + [f"<|visual token {int(c):06d}|>" for c in order[n_codes // 2:]]
    for token in specials:
        vocab[token] = len(vocab)
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t in specials]
    return data, vocab


randomize = partial(kit.randomize, batchnorm=True)  # BatchNorm statistics too


def build_emu3(directory: Path, seed: int = 0, shard: str = "300KB"):
    """Save a tiny random Emu3ForConditionalGeneration, its tokenizer and its processor in `directory`;
    returns the model (fp32, eval)."""
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        PreTrainedTokenizerFast,
    )

    tokenizer, vocab = emu3_tokenizer(N_CODES, seed)
    cfg = Emu3Config(
        vocabulary_map=vocab,
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                         pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|extra_203|>"],
                         eos_token_id=vocab["<|extra_204|>"]),
        vq_config=dict(codebook_size=N_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[3], hidden_size=64,
                       num_attention_heads=2, temporal_downsample_factor=4))
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(cfg)
    randomize(model, seed)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=shard)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<|extra_203|>",
                                  eos_token="<|extra_204|>", pad_token="<|endoftext|>", extra_special_tokens=EXTRA_TOKENS)
    images = Emu3ImageProcessor(min_pixels=RESOLUTION**2, max_pixels=4 * RESOLUTION**2, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)
    Emu3Processor(images, tok).save_pretrained(directory)
    images.save_pretrained(directory)
    return model


picture = partial(kit.ramp_picture, size=RESOLUTION)  # (64, 64, 3) uint8


@pytest.fixture(scope="session")
def emu3(tmp_path_factory):
    """(source directory, transformers model): a sharded tiny Emu3."""
    src = tmp_path_factory.mktemp("emu3") / "hf"
    return src, build_emu3(src)


@pytest.fixture(scope="session")
def emu3_imported(emu3, tmp_path_factory):
    """(run directory, import summary) of the tiny Emu3 imported in fp32."""
    run = tmp_path_factory.mktemp("runs") / "emu3"
    return run, import_hf(emu3[0], run, dtype="fp32")


@pytest.fixture(scope="module")
def pipe(emu3_imported):
    return nmm.load(emu3_imported[0], device="cpu")


@pytest.fixture(scope="module")
def ids(emu3_imported):
    return Emu3Ids.load(emu3_imported[0] / "emu3_ids.json")


@pytest.fixture(scope="module")
def processor(emu3):
    from transformers import Emu3Processor

    return Emu3Processor.from_pretrained(emu3[0])


def columns(ids: Emu3Ids, pipe) -> torch.Tensor:
    """Emu3's id of every nmm id: transformers' logits in nmm's column order."""
    return ids.to_hf(torch.arange(pipe.vocab.size))


# ---- import ------------------------------------------------------------------------------------
def test_import_writes_a_run_that_nmm_loads(emu3, emu3_imported, pipe, ids):
    src, hf = emu3
    run, summary = emu3_imported
    assert summary["shards"] >= 3 and (src / "model.safetensors.index.json").is_file()  # really sharded
    for name in ("model.safetensors", "model.json", "vocab.json", "text_tokenizer.json", "codecs.json", "emu3_vq.json",
                 "emu3_vq.safetensors", "config.yaml", "emu3_ids.json", "import.json", "emu3/tokenizer_config.json"):
        assert (run / name).is_file(), name
    v, vm = pipe.vocab, hf.config.vocabulary_map
    codec = pipe.codecs.image
    # the image item: "8*8" as text tokens, <|image token|>, 8 rows of 8 codes and an end of row, end of frame
    assert codec.config.structure == ["8", "*", "<|image token|>", "<|extra_200|>", "<|extra_201|>"]
    assert v.tokens_per_image == 3 + 1 + GRID * (GRID + 1) + 1 == summary["vocab"]["tokens_per_image"]
    assert v.image_codes == N_CODES + 5 and v.n_text == len(vm) - N_CODES - 5 - 3
    assert ids.to_hf([v.pad, v.bos, v.eos, v.boi, v.eoi]) == [vm[t] for t in ("<|endoftext|>", "<|extra_203|>",
                                                                            "<|extra_204|>", "<|image start|>",
                                                                            "<|image end|>")]
    for code in (0, 7, N_CODES - 1):
        assert ids.to_hf(v.ids("image", code)) == vm[f"<|visual token {code:06d}|>"]
    # the size digits are text and structure codes: the same Emu3 id twice, text first back
    eight = v.ids("image", N_CODES)
    assert ids.to_hf(eight) == vm["8"] and ids.to_nmm(vm["8"]) < v.n_text
    assert pipe.model.cfg.variant == "early-discrete" and not pipe.model.cfg.qk_norm
    assert pipe.model.num_params() == summary["params"]
    assert codec.config.image_size == RESOLUTION


def test_a_fresh_process_loads_it_without_transformers(emu3_imported):
    """codecs.json names the codec kind; nmm.load imports nmm.interop.emu3 to read it, and nothing of
    transformers (the VQ-VAE is plain torch)."""
    code = ("import sys, nmm; p = nmm.load(sys.argv[1], device='cpu'); "
            "print(type(p.codecs.image).__name__, 'nmm.interop.emu3' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code, str(emu3_imported[0])], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.stdout.split() == ["Emu3VQCodec", "True", "False"], res.stderr[-2000:]


# ---- the language model --------------------------------------------------------------------------
def test_logits_match_transformers_fp32_on_emu3s_own_sequence(emu3, pipe, ids, processor):
    """Emu3's processor builds `<bos> text <|image start|> 8*8 <|image token|> <image>... <|extra_201|>
    <|image end|> text` and the model puts the image's visual tokens and row ends at the placeholders;
    nmm's prompt from the same picture is that sequence, and its logits are transformers'."""
    hf = emu3[1]
    image = picture(0)
    inputs = processor(images=[image], text=["a small red circle<image> what colour is the circle?"],
                       return_tensors="pt")
    ours = pipe.codecs.prompt(["a small red circle", ("image", image), " what colour is the circle?"])
    with torch.no_grad():
        placed = hf.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
    expected = inputs["input_ids"][0].clone()
    expected[expected == hf.config.image_token_id] = placed.to(expected.dtype)
    assert ids.to_hf(ours) == expected.tolist()
    # a second row: the same text around an image of random codes in the same layout
    grid = torch.randint(0, N_CODES, (1, GRID, GRID), generator=torch.Generator().manual_seed(1))
    other = pipe.codecs.prompt(["a small red circle", ItemSegment("image", codes=pipe.vocab.ids(
        "image", pipe.codecs.image.layout(grid)[0])), " what colour is the circle?"])
    x = torch.tensor([ours, other])
    with torch.no_grad():
        mine = pipe.model(x)
        theirs = hf(**inputs).logits[0]  # the processor's path: pixel values through transformers' VQ
        raw = hf(input_ids=ids.to_hf(x)).logits
    cols = columns(ids, pipe)
    diff = max((mine[0] - theirs[:, cols]).abs().max().item(), (mine - raw[..., cols]).abs().max().item())
    print(f"emu3 fp32 logits: max abs diff {diff:.2e} (logit scale {mine.abs().max().item():.1f})")
    assert diff <= ATOL and mine.abs().max() > 1.0, diff


def test_text_tokenizer_gives_emu3s_ids(emu3, pipe, ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(emu3[0])
    for text in ["a small red circle at the top left", "Emu3 draws 64*64 pictures", "héllo, wörld! 123"]:
        ours = pipe.codecs.encode_text(text)
        assert ids.to_hf(ours) == tok(text, add_special_tokens=False).input_ids, text
        assert pipe.codecs.decode_text(ours) == tok.decode(ids.to_hf(ours))
    # Emu3's other added specials stay whole tokens of nmm's text vocabulary
    text = "chat <|im_start|> here"
    assert ids.to_hf(pipe.codecs.encode_text(text)) == tok(text, add_special_tokens=False).input_ids
    # a literal special nmm has a slot for stays text in nmm (Emu3's tokenizer would make it the special)
    assert pipe.vocab.bos not in pipe.codecs.encode_text("<|extra_203|> hi")


def test_greedy_text_matches_transformers_generate(emu3, pipe, ids):
    """32 greedy steps through nmm's engine (batched, left-padded, static KV cache) against transformers'
    generate (one prompt at a time, its cache), both choosing among the same ids (nmm's text phase)."""
    from transformers import LogitsProcessor

    hf, v = emu3[1], pipe.vocab
    prompts = [pipe.codecs.prompt(["a small red circle", ("image", picture(2)), " it is"]),
               pipe.codecs.prompt(["the quick brown fox"])]
    ours = pipe.engine.generate(prompts, 32, SamplingConfig(temperature=0), allow_images=False, ignore_eos=True).tokens
    allowed = torch.zeros(hf.config.text_config.vocab_size, dtype=torch.bool)
    allowed[ids.to_hf(torch.arange(v.n_text))] = True

    class Allowed(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    for prompt, got in zip(prompts, ours):
        x = ids.to_hf(torch.tensor([prompt]))
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                          logits_processor=[Allowed()], eos_token_id=None, pad_token_id=hf.config.text_config.pad_token_id)
        assert ids.to_hf(got) == out[0, x.shape[1]:].tolist()
        assert len(got) == 32 and len(set(got)) > 3


# ---- the image tokenizer -------------------------------------------------------------------------
def test_vq_encode_gives_transformers_codes(emu3, pipe, ids):
    from PIL import Image
    from transformers import Emu3ImageProcessor

    hf = emu3[1]
    processor = Emu3ImageProcessor.from_pretrained(emu3[0])
    images = np.stack([picture(s) for s in range(3)] + [np.full((RESOLUTION, RESOLUTION, 3), 90, np.uint8)])
    inputs = processor(images=list(images), return_tensors="pt")
    codec = pipe.codecs.image
    assert torch.equal(codec.pixels(images), inputs["pixel_values"])  # the same model input, bit for bit
    with torch.no_grad():
        theirs = torch.stack(hf.model.vqmodel.encode(inputs["pixel_values"], inputs["image_sizes"]).image_tokens)
        placed = hf.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"]).view(len(images), -1)
    ours = codec.encode_pixels(codec.pixels(images))
    assert torch.equal(ours, theirs) and len(torch.unique(ours)) > 5
    # nmm ids of whole items: the size, <|image token|>, Emu3's rows (visual tokens, row ends), end of frame
    items = ids.to_hf(torch.as_tensor(pipe.codecs.encode_images(images)))
    assert torch.equal(items[:, 4:-1], placed.to(items.dtype))
    assert (items[:, -1] == hf.config.vocabulary_map["<|extra_201|>"]).all()
    # a picture file of another size: a 32 px square is resized to 64 px as the processor does, bit for bit
    small = Image.fromarray(picture(5)[::2, ::2].copy())
    buf = __import__("io").BytesIO()
    small.save(buf, format="PNG")
    assert torch.equal(codec.pixels(codec.from_bytes(buf.getvalue())[None]),
                       processor(images=[small], return_tensors="pt")["pixel_values"])


def test_vq_decode_gives_transformers_pixels(emu3, pipe):
    from transformers import Emu3ImageProcessor

    hf, codec = emu3[1], pipe.codecs.image
    processor = Emu3ImageProcessor.from_pretrained(emu3[0])
    grid = torch.randint(0, N_CODES, (3, GRID, GRID), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.model.vqmodel.decode(grid)
    ours = codec.decode_pixels(grid)
    diff = (ours - theirs).abs().max().item()
    print(f"emu3 VQ decode: max abs diff {diff:.2e} (pixel values within {theirs.min():.2f}..{theirs.max():.2f})")
    assert ours.shape == (3, 3, RESOLUTION, RESOLUTION) and diff <= 1e-5
    pictures = processor.postprocess(theirs, return_tensors="PIL.Image.Image")["pixel_values"]
    expected = np.stack([np.asarray(p) for p in pictures])
    got = pipe.codecs.decode_images(pipe.vocab.ids("image", codec.layout(grid)).numpy())
    assert got.shape == expected.shape and np.array_equal(got, expected)
    saturated = ((got == 0) | (got == 255)).mean()
    print(f"emu3 VQ decode: uint8 pictures equal; {saturated:.0%} of values clipped, std {got.std():.1f}")
    assert saturated < 0.9 and got.std() > 5


# ---- generation --------------------------------------------------------------------------------
def test_cfg_image_generation_through_nmms_engine(pipe):
    """Text -> image codes with classifier-free guidance, code by code through nmm's engine (the
    structure tokens are sampled, not forced: the module docstring), then pixels from Emu3's decoder."""
    v = pipe.vocab
    sampling = SamplingConfig(temperature=1.0, cfg_scale=3.0, seed=0)
    prompts = [pipe.image_prompt("a small red circle"), pipe.image_prompt("a large blue square")]
    codes = pipe.item_codes("image", prompts, sampling, uncond=pipe.uncond_image_prompt())
    assert codes.shape == (2, v.tokens_per_image) and pipe.vocab.is_modality("image", torch.as_tensor(codes)).all()
    images = pipe.codecs.decode_images(codes)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8 and images.std() > 0


# ---- refusals ----------------------------------------------------------------------------------
def test_what_nmm_cannot_represent_is_refused_by_name(emu3, tmp_path):
    src = emu3[0]
    cfg = json.loads((src / "config.json").read_text())
    for name, change, message in (
            ("biased", {"text_config": {**cfg["text_config"], "attention_bias": True}}, "text_config.attention_bias"),
            ("double", {"vq_config": {**cfg["vq_config"], "double_latent": True}}, "double_latent"),
            ("novis", {"vocabulary_map": {k: i for k, i in cfg["vocabulary_map"].items() if "visual" not in k}},
             "visual tokens")):
        bad = tmp_path / name
        bad.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (bad / f.name).symlink_to(f)
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=message):
            import_hf(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match="multiple of the VQ's downsampling 8"):
        import_hf(src, tmp_path / "out", image_size=60)
    with pytest.raises(CheckpointError, match="context"):
        import_hf(src, tmp_path / "out", image_size=256)  # 32x33 + 5 tokens > 320
    with pytest.raises(CheckpointError, match="not empty"):
        import_hf(src, src)


def test_another_image_size(emu3, tmp_path):
    """image_size picks the run's fixed size; the layout (the size's text tokens, the rows) follows."""
    summary = import_hf(emu3[0], tmp_path / "run", image_size=128)
    pipe = nmm.load(tmp_path / "run", device="cpu")
    codec = pipe.codecs.image
    assert codec.config.grid == 16 and pipe.vocab.tokens_per_image == len(codec.config.prefix) + 16 * 17 + 1
    assert summary["vocab"]["image_size"] == 128
    with torch.no_grad():
        theirs = emu3[1].model.vqmodel.decode(torch.zeros(1, 16, 16, dtype=torch.long))
    assert (codec.decode_pixels(torch.zeros(1, 16, 16, dtype=torch.long)) - theirs).abs().max() <= 1e-5


SHARED = SimpleNamespace(build=build_emu3, picture=picture, resolution=RESOLUTION, n_codes=N_CODES)
