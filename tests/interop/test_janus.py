"""Janus in: a tiny random JanusForConditionalGeneration, built and saved by transformers (no hub), imported
with nmm.interop, must compute transformers' logits for image understanding (a picture through SigLIP and
the aligner, then a question) and for image generation (the generation head, with Janus's CFG), decode the
same greedy tokens and image codes, tokenize text to the same ids, and its VQ port must give the same codes
from the same pixels and the same pixels from the same codes; nmm's engine draws pictures with CFG.

The checkpoint is laid out like the released ones: a byte-level BPE with Janus's specials after the text
ids (`<｜begin▁of▁sentence｜>`, `<｜▁pad▁｜>`, `<image_placeholder>`, `<begin_of_image>`, ...) and a BOS
post-processor, a config vocabulary larger than the tokenizer's (ids no token names), weights saved by
transformers 5 in shards (`model.language_model.*`, `model.vision_model.*`, `model.vqmodel.*`, ...), an
untied LM head, an image processor with per-channel mean and std, and a generation_config naming the
image-start token as Janus's does. The VQ has 3 levels (downsample 4: 32 px pictures, 8 x 8 = 64 codes per
image, as SigLIP's 4 px patches give 64 features), channel changes and attention at the deepest level.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import nmm
from nmm.errors import CheckpointError, InputError
from nmm.infer.sampling import SamplingConfig
from nmm.interop import export_hf, import_hf
from nmm.interop.janus import JanusIds, uncond_prompt
from nmm.model.fusion.janus import PICTURES


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
RESOLUTION = 32  # SigLIP: 4 px patches -> 8 x 8; the VQ: downsample 4 -> 8 x 8
TOKENS = 64
CORPUS = ["a small red circle at the top left of the picture", "a large blue square in the middle",
          "two green triangles and one yellow star", "the quick brown fox jumps over the lazy dog",
          "what colour is the circle? it is red.", "Janus reads pictures with SigLIP and draws them with a VQ."] * 20
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, "<image_placeholder>", "<patch_placeholder>", "<|ref|>", "<|User|>", "<|Assistant|>",
            "<begin_of_image>", "<end_of_image>"]
EXTRA_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
UNNAMED = 7  # config ids past the tokenizer's (Janus-Pro: 102,400 rows, ~100,015 tokens)


def janus_tokenizer() -> tuple[dict, dict[str, int]]:
    """(tokenizer.json as a dict, token -> id): text BPE ids, then Janus's specials, with a BOS post-processor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    learned = kit.trained_bpe(CORPUS)
    vocab = dict(learned["model"]["vocab"])
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["model"]["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    assert all(tok.token_to_id(t) == i for t, i in vocab.items())
    return json.loads(tok.to_str()), vocab


randomize = kit.randomize


def build_janus(directory: Path, seed: int = 0):
    """Save a tiny random JanusForConditionalGeneration, its tokenizer, processor and generation config in
    `directory`; returns the model (fp32, eval)."""
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer, vocab = janus_tokenizer()
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(vocab) + UNNAMED, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
                         tie_word_embeddings=False),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=RESOLUTION,
                           patch_size=4, mlp_ratio=2.0, projection_dim=64, depth=2, num_image_tokens=TOKENS),
        vq_config=dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=16, base_channels=32,
                       channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=64, num_hidden_layers=2,
                       image_token_embed_dim=64),
        image_token_id=vocab["<image_placeholder>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg)
    randomize(model, seed)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
                                               generation_kwargs={"boi_token_id": vocab["<begin_of_image>"]})
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="300KB")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token=BOS, eos_token=EOS,
                                  pad_token=PAD, extra_special_tokens=EXTRA_TOKENS)
    images = JanusImageProcessorPil(size={"height": RESOLUTION, "width": RESOLUTION}, image_mean=MEAN, image_std=STD)
    JanusProcessor(images, tok, num_image_tokens=TOKENS).save_pretrained(directory)
    images.save_pretrained(directory)
    return model


picture = partial(kit.ramp_picture, size=RESOLUTION)  # (32, 32, 3) uint8


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    """(source directory, transformers model): a sharded tiny Janus."""
    src = tmp_path_factory.mktemp("janus") / "hf"
    return src, build_janus(src)


@pytest.fixture(scope="module")
def janus_imported(janus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "janus"
    return run, import_hf(janus[0], run, dtype="fp32")


@pytest.fixture(scope="module")
def pipe(janus_imported):
    return nmm.load(janus_imported[0], device="cpu")


@pytest.fixture(scope="module")
def ids(janus_imported):
    return JanusIds.load(janus_imported[0] / "janus_ids.json")


@pytest.fixture(scope="module")
def processor(janus):
    from transformers import JanusProcessor

    return JanusProcessor.from_pretrained(janus[0])


def columns(ids: JanusIds, pipe) -> torch.Tensor:
    """Janus's id of every nmm text id and special: transformers' LM logits in nmm's column order."""
    return ids.to_hf(torch.arange(pipe.vocab.text_size))


# ---- import ------------------------------------------------------------------------------------
def test_import_writes_a_run_that_nmm_loads(janus, janus_imported, pipe, ids):
    src, hf = janus
    run, summary = janus_imported
    assert summary["shards"] >= 3 and (src / "model.safetensors.index.json").is_file()  # really sharded
    for name in ("model.safetensors", "model.json", "vocab.json", "text_tokenizer.json", "codecs.json", "janus_vq.json",
                 "janus_vq.safetensors", "config.yaml", "janus_ids.json", "import.json", "janus/tokenizer_config.json"):
        assert (run / name).is_file(), name
    v = pipe.vocab
    _, vocab = janus_tokenizer()
    assert v.image_codes == N_CODES and v.tokens_per_image == TOKENS and v.n_text == len(vocab) + UNNAMED - 5
    assert ids.to_hf([v.pad, v.bos, v.eos, v.boi, v.eoi]) == [vocab[t] for t in (PAD, BOS, EOS, "<begin_of_image>",
                                                                            "<end_of_image>")]
    assert ids.to_hf(v.ids("image", 5)) == hf.config.image_token_id  # codes stand where Janus has its placeholder
    assert pipe.model.cfg.variant == "early-janus" and not pipe.model.cfg.qk_norm
    assert type(pipe.model.images).__name__ == "JanusImages" and pipe.model.images.emits_codes
    assert pipe.model.num_params() == summary["params"]
    hf_lm = sum(p.numel() for n, p in hf.named_parameters() if ".vqmodel." not in n)
    assert summary["params"] == hf_lm and summary["vq_params"] == sum(p.numel() for p in hf.model.vqmodel.parameters())
    assert pipe.codecs.image.config.image_size == RESOLUTION


def test_a_fresh_process_loads_it_without_transformers(janus_imported):
    code = ("import sys, nmm; p = nmm.load(sys.argv[1], device='cpu'); "
            "print(type(p.codecs.image).__name__, type(p.model.images).__name__, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code, str(janus_imported[0])], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.stdout.split() == ["JanusVQCodec", "JanusImages", "False"], res.stderr[-2000:]


# ---- understanding: a picture through SigLIP, then text ------------------------------------------
def test_understanding_logits_match_transformers_fp32(janus, pipe, ids, processor):
    """JanusProcessor builds `<bos> text <begin_of_image> <image_placeholder> x 64 <end_of_image> text` and the
    model puts SigLIP's features at the placeholders; nmm's prompt from the same picture is that sequence (its
    codes where the placeholders are), and its logits are transformers'."""
    hf = janus[1]
    images = [picture(0), picture(1)]
    text = "a small red circle<image_placeholder> what colour is the circle?"
    inputs = processor(images=images, text=[text, text], return_tensors="pt")
    ours = [pipe.codecs.prompt(["a small red circle", ("image", im), " what colour is the circle?"]) for im in images]
    assert ids.to_hf(ours[0]) == inputs["input_ids"][0].tolist() == ids.to_hf(ours[1])
    assert torch.equal(pipe.model.images.pixels(torch.from_numpy(np.stack(images))), inputs["pixel_values"])
    x = torch.tensor(ours)
    with torch.no_grad():
        mine = pipe.model(x)[..., : pipe.vocab.text_size]
        theirs = hf(**inputs).logits[..., columns(ids, pipe)]
    diff = (mine - theirs).abs().max().item()
    print(f"janus understanding fp32 logits: max abs diff {diff:.2e} (logit scale {mine.abs().max().item():.1f})")
    assert diff <= ATOL and mine.abs().max() > 1.0, diff
    # the two pictures are read apart (the features are SigLIP's, not the codes')
    assert (mine[0, -1] - mine[1, -1]).abs().max() > 1e-2

    # codes no codec of this process has seen read as the picture they decode to (what Janus would see if
    # shown that picture): transformers given the decoded picture computes the same logits
    PICTURES.forget()
    with torch.no_grad():
        fallback = pipe.model(x)[..., : pipe.vocab.text_size]
        drawn = pipe.codecs.decode_images(x[pipe.vocab.is_modality("image", x)].view(2, TOKENS).numpy())
        redrawn = hf(**processor(images=list(drawn), text=[text, text], return_tensors="pt")).logits[..., columns(ids, pipe)]
    diff_drawn = (fallback - redrawn).abs().max().item()
    lossy = (fallback - mine).abs().max().item()
    print(f"janus understanding from codes alone: max abs diff {diff_drawn:.2e} against transformers on the decoded "
          f"picture, {lossy:.2f} against the original picture (the VQ is lossy)")
    assert diff_drawn <= ATOL


def test_a_prompt_of_unknown_codes_without_a_codec_is_refused(pipe):
    from nmm.model.fusion.janus import PictureMemory

    memory = PictureMemory()
    with pytest.raises(InputError, match="codes no Janus image codec"):
        memory.pictures(torch.zeros(1, TOKENS, dtype=torch.long), N_CODES, RESOLUTION)


def test_text_tokenizer_gives_janus_ids(janus, pipe, ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(janus[0])
    for text in ["a small red circle at the top left", "Janus draws pictures", "héllo, wörld! 123"]:
        ours = pipe.codecs.encode_text(text)
        assert ids.to_hf(ours) == tok(text, add_special_tokens=False).input_ids, text
        assert pipe.codecs.decode_text(ours) == tok.decode(ids.to_hf(ours))
    text = "<|User|> what is it? <|Assistant|>"  # Janus's other specials stay whole tokens of nmm's text
    assert ids.to_hf(pipe.codecs.encode_text(text)) == tok(text, add_special_tokens=False).input_ids


def test_greedy_text_with_a_picture_matches_transformers_generate(janus, pipe, ids, processor):
    """32 greedy steps through nmm's engine (batched, left-padded, static KV cache) against transformers'
    generate (one prompt at a time, the picture through SigLIP), both choosing among the same ids."""
    from transformers import LogitsProcessor

    hf, v = janus[1], pipe.vocab
    pic = picture(2)
    prompts = [pipe.codecs.prompt(["a small red circle", ("image", pic), " it is"]),
               pipe.codecs.prompt(["the quick brown fox"])]
    ours = pipe.engine.generate(prompts, 32, SamplingConfig(temperature=0), allow_images=False, ignore_eos=True).tokens
    allowed = torch.zeros(hf.config.text_config.vocab_size, dtype=torch.bool)
    allowed[ids.to_hf(torch.arange(v.n_text))] = True

    class Allowed(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    hf_inputs = [processor(images=[pic], text=["a small red circle<image_placeholder> it is"], return_tensors="pt"),
                 processor(text=["the quick brown fox"], return_tensors="pt")]
    for prompt, got, inputs in zip(prompts, ours, hf_inputs):
        assert ids.to_hf(prompt) == inputs["input_ids"][0].tolist()
        out = hf.generate(**inputs, max_new_tokens=32, do_sample=False, logits_processor=[Allowed()], eos_token_id=None,
                          pad_token_id=hf.config.text_config.pad_token_id)
        assert ids.to_hf(got) == out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(got) == 32 and len(set(got)) > 3


# ---- generation: the generation head, Janus's CFG ------------------------------------------------
def test_image_code_logits_match_the_generation_head_with_cfg(janus, pipe, ids):
    """Text -> image-code logits: at `<boi>` and at teacher-forced codes (fed back through the generation
    embedding and aligner), conditional and unconditional (Janus's: the prompt with every token but `<bos>`
    and `<boi>` replaced by `<pad>`), and their CFG mix, against transformers' generation path."""
    hf, v = janus[1], pipe.vocab
    prompt = pipe.image_prompt("a small red circle at the top left")
    rows = [prompt, uncond_prompt(prompt, v)]
    assert ids.to_hf(rows[1]) == [ids.to_hf(v.bos)] + [ids.to_hf(v.pad)] * (len(prompt) - 2) + [ids.to_hf(v.boi)]
    codes = torch.randint(0, N_CODES, (12,), generator=torch.Generator().manual_seed(4))
    x = torch.tensor([r + v.ids("image", codes).tolist() for r in rows])
    generated = torch.zeros_like(x, dtype=torch.bool)
    generated[:, len(prompt):] = True
    with torch.no_grad():
        mine = pipe.model.images.logits(pipe.model.hidden(x, generated=generated))[:, len(prompt) - 1:]
        embeds = torch.cat([hf.get_input_embeddings()(ids.to_hf(torch.tensor(rows))),
                            hf.prepare_embeddings_for_image_generation(codes.expand(2, -1))], 1)
        h = hf.model.language_model(inputs_embeds=embeds).last_hidden_state
        theirs = hf.model.generation_head(h)[:, len(prompt) - 1:]
    diff = (mine - theirs).abs().max().item()
    scale = 3.0
    mixed = lambda l: l[1] + scale * (l[0] - l[1])
    diff_cfg = (mixed(mine) - mixed(theirs)).abs().max().item()
    print(f"janus image-code logits fp32: max abs diff {diff:.2e}, CFG-mixed {diff_cfg:.2e} (scale "
          f"{mine.abs().max().item():.1f})")
    assert diff <= ATOL and diff_cfg <= 4 * ATOL and mine.abs().max() > 1.0


def test_greedy_cfg_image_codes_match_transformers_generate(janus, pipe, ids):
    """Greedy text -> image with CFG: nmm's engine (two captions in one batch, each with Janus's unconditional
    prompt) writes the codes transformers' `generate(generation_mode="image")` writes."""
    hf, v = janus[1], pipe.vocab
    captions = ["a small red circle", "two green triangles and one yellow star"]
    prompts = [pipe.image_prompt(c) for c in captions]
    res = pipe.engine.generate(prompts, TOKENS + 1, SamplingConfig(temperature=0, cfg_scale=3.0),
                               uncond_prompts=[uncond_prompt(p, v) for p in prompts], stop_after_image=True,
                               allow_images=("image",))
    for prompt, got in zip(prompts, res.tokens):
        x = ids.to_hf(torch.tensor([prompt]))
        theirs = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_mode="image", do_sample=False,
                             guidance_scale=3.0)
        assert got[-1] == v.eoi and v.is_modality("image", torch.tensor(got[:-1])).all()
        assert (torch.tensor(got[:-1]) - v.start("image")).tolist() == theirs[0].tolist()
        assert len(set(got)) > 5


# ---- the image tokenizer -------------------------------------------------------------------------
def test_vq_encode_gives_transformers_and_deepseeks_codes(janus, pipe):
    """Pixels bit-identical to JanusImageProcessor's; codes: transformers' `vqmodel.encode` with l2_norm=False,
    DeepSeek's quantiser (l2-normalised latents against the l2-normalised codebook) by default."""
    from transformers import JanusImageProcessorPil

    hf, codec = janus[1], pipe.codecs.image
    processor = JanusImageProcessorPil.from_pretrained(janus[0])
    images = np.stack([picture(s) for s in range(3)] + [np.full((RESOLUTION, RESOLUTION, 3), 90, np.uint8)])
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    assert torch.equal(codec.pixels(images), pixels)
    with torch.no_grad():
        theirs = hf.model.vqmodel.encode(pixels).image_tokens.view(len(images), -1)
        z = hf.model.vqmodel.quant_conv(hf.model.vqmodel.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, 8)
        e = torch.nn.functional.normalize(hf.model.vqmodel.quantize.embedding.weight, dim=-1)
        deepseek = torch.cdist(torch.nn.functional.normalize(z, dim=-1), e).argmin(-1).view(len(images), -1)
    assert torch.equal(codec.encode_pixels(pixels, l2_norm=False), theirs) and len(torch.unique(theirs)) > 5
    ours = codec.encode_pixels(pixels)
    assert torch.equal(ours, deepseek) and not torch.equal(ours, theirs)
    assert np.array_equal(pipe.codecs.encode_images(images), pipe.vocab.ids("image", ours.numpy()))
    # a picture file of another shape: Janus's processor resizes its longest side and pads, bit for bit
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture(5)[4:24, ::2].copy()).save(buf, format="PNG")  # 16 x 20: resized to 26 x 32, padded
    expected = processor(images=[Image.open(io.BytesIO(buf.getvalue())).convert("RGB")], return_tensors="pt")
    assert torch.equal(codec.pixels(codec.from_bytes(buf.getvalue())[None]), expected["pixel_values"])


def test_vq_decode_gives_transformers_pixels(janus, pipe):
    from transformers import JanusImageProcessorPil

    hf, codec = janus[1], pipe.codecs.image
    processor = JanusImageProcessorPil.from_pretrained(janus[0])
    codes = torch.randint(0, N_CODES, (3, TOKENS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.model.vqmodel.decode(codes)
    ours = codec.decode_pixels(codes)
    diff = (ours - theirs).abs().max().item()
    print(f"janus VQ decode: max abs diff {diff:.2e} (pixel values within {theirs.min():.2f}..{theirs.max():.2f})")
    assert ours.shape == (3, 3, RESOLUTION, RESOLUTION) and diff <= 1e-5
    expected = processor.postprocess(list(theirs), return_tensors="np")["pixel_values"]
    expected = np.stack([np.asarray(p) for p in expected]).transpose(0, 2, 3, 1)
    got = pipe.codecs.decode_images(pipe.vocab.ids("image", codes).numpy())
    assert got.shape == expected.shape == (3, RESOLUTION, RESOLUTION, 3) and np.array_equal(got, expected)
    assert got.std() > 5


# ---- generation through nmm's engine -------------------------------------------------------------
def test_cfg_image_generation_through_nmms_engine(pipe):
    """Text -> image codes with CFG, sampled code by code (Pipeline: nmm's `<bos> <boi>` unconditional
    prompt), then pixels from Janus's VQ decoder; and an image as one answer of a text prompt."""
    v = pipe.vocab
    images = pipe.generate_images(["a small red circle", "a large blue square"], cfg_scale=3.0, temperature=1.0)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8 and images.std() > 0
    prompts = [pipe.image_prompt("a small red circle")]
    codes = pipe.item_codes("image", prompts, SamplingConfig(temperature=1.0, cfg_scale=3.0, seed=1),
                            uncond=uncond_prompt(prompts[0], v))
    assert codes.shape == (1, TOKENS) and v.is_modality("image", torch.as_tensor(codes)).all()
    assert pipe.codecs.decode_images(codes).shape == (1, RESOLUTION, RESOLUTION, 3)


def test_understanding_and_cfg_generation_share_the_schedulers_batch(pipe):
    """nmm's continuous batching (what `nmm serve` runs): a question about a picture and a CFG text -> image
    request in one batch give, greedily, what `Engine.generate` gives each alone."""
    from nmm.infer.scheduler import Request, Scheduler

    v = pipe.vocab
    ask = pipe.codecs.prompt(["a large blue square", ("image", picture(7)), " what is it?"])
    draw = pipe.image_prompt("two green triangles")
    greedy, guided = SamplingConfig(temperature=0), SamplingConfig(temperature=0, cfg_scale=2.0)
    scheduler = Scheduler(pipe.engine, max_batch=4)
    try:
        handles = [scheduler.submit(Request(ask, 12, greedy, allow_images=False, ignore_eos=True)),
                   scheduler.submit(Request(draw, TOKENS + 1, guided, uncond_prompt=uncond_prompt(draw, v),
                                            allow_images=("image",), stop_after_image=True))]
        served = [h.result(timeout=120) for h in handles]
    finally:
        scheduler.close()
    alone = [pipe.engine.generate([ask], 12, greedy, allow_images=False, ignore_eos=True).tokens[0],
             pipe.engine.generate([draw], TOKENS + 1, guided, uncond_prompts=[uncond_prompt(draw, v)],
                                  allow_images=("image",), stop_after_image=True).tokens[0]]
    assert served == alone and len(served[1]) == TOKENS + 1 and served[1][-1] == v.eoi


def test_training_loss_scores_image_codes_with_the_generation_head(pipe):
    """A text -> image document: the image codes' loss is the generation head's cross-entropy at the
    positions before them (teacher-forced through the generation embedding)."""
    v, model = pipe.vocab, pipe.model
    codes = torch.randint(0, N_CODES, (TOKENS,), generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([pipe.image_prompt("a small red circle") + v.ids("image", codes).tolist() + [v.eoi, v.eos]])
    x, y = ids[:, :-1], ids[:, 1:]
    generated = v.is_modality("image", x)
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        _, stats = model.loss(x, y, positions, torch.zeros_like(x), {}, generated=generated)
        logits = model.images.logits(model.hidden(x, generated=generated)).float()
    at = v.is_modality("image", y)
    expected = torch.nn.functional.cross_entropy(logits[at], v.codes("image", y[at]))
    assert torch.isclose(stats["loss_image"], expected, atol=1e-5) and stats["tokens_image"] == TOKENS


# ---- refusals ------------------------------------------------------------------------------------
def test_what_nmm_cannot_represent_is_refused_by_name(janus, janus_imported, tmp_path):
    src = janus[0]
    cfg = json.loads((src / "config.json").read_text())
    for name, change, message in (
            ("biased", {"text_config": {**cfg["text_config"], "attention_bias": True}}, "text_config.attention_bias"),
            ("qknorm", {"vision_config": {**cfg["vision_config"], "use_qk_norm": True}}, "use_qk_norm"),
            ("double", {"vq_config": {**cfg["vq_config"], "double_latent": True}}, "double_latent"),
            ("sizes", {"vision_config": {**cfg["vision_config"], "patch_size": 8, "num_image_tokens": 16}},
             "one picture cannot serve both")):
        bad = tmp_path / name
        bad.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (bad / f.name).symlink_to(f)
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=message):
            import_hf(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match="image_size applies to Emu3 only"):
        import_hf(src, tmp_path / "out", image_size=64)
    with pytest.raises(CheckpointError, match="does not export"):
        export_hf(janus_imported[0], tmp_path / "export")
