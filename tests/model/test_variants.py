"""The design space: every variant builds, trains, decodes consistently with and without a cache,
and generates where it can."""

import shutil

import numpy as np
import pytest
import torch

from nmm.config import ModelConfig, VisionEncoderConfig, load_config
from nmm.errors import ConfigError, InputError
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig
from nmm.model.masks import SpanLayout, causal_mask, cross_attention_mask, with_bidirectional_items
from nmm.model.model import NativeMultimodalModel
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary

VOCAB = Vocabulary(40, (image_spec(12, (4, 3), 16, ((4,), (3,))),))
SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96,
             encoder=VisionEncoderConfig(width=16, layers=1))
VARIANTS = {
    "early-discrete": {},
    "early-continuous": {"image_repr": "continuous"},
    "early-decoupled": {"image_repr": "decoupled"},
    "late": {"fusion": "late", "image_repr": "continuous"},
    "mid": {"fusion": "mid", "image_repr": "continuous", "cross_attn_every": 1},
    "moe": {"routing": "moe"},
    "moe-aware": {"routing": "moe-aware"},
    "mot": {"routing": "mot"},
    "mrope": {"rope": "mrope"},
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return NativeMultimodalModel(ModelConfig(**SMALL, **VARIANTS[name]), VOCAB).eval()


def image_prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randint(0, VOCAB.image_codes, (VOCAB.tokens_per_image,), generator=g) + VOCAB.start("image")).tolist()
    return [VOCAB.bos, VOCAB.boi, *codes, VOCAB.eoi, 3, 7]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_greedy_decode_matches_uncached_forward(name):
    """Every variant's KV-cached decoding (with mid fusion's cross-attention memory kept from the
    prefill, and continuous images' bidirectional prefix) equals re-running the whole sequence."""
    model = make(name)
    prompt = image_prompt()
    res = Engine(model).generate([prompt], 8, SamplingConfig(temperature=0), allow_images=False)
    seq = list(prompt)
    allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
    allowed[: VOCAB.n_text] = True
    allowed[VOCAB.eos] = True
    with torch.no_grad():
        for _ in range(len(res.tokens[0])):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
    assert len(res.tokens[0]) > 0
    assert res.tokens[0] == seq[len(prompt):][: len(res.tokens[0])]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_is_finite_and_trains(name):
    """A few optimiser steps on one packed batch lower the loss, and every trainable part gets a gradient."""
    model = make(name).train()
    torch.manual_seed(1)
    doc_cap = image_prompt(1)[:-2] + [5, 6, 7, VOCAB.eos]  # image -> caption
    doc_gen = [VOCAB.bos, 9, 8] + image_prompt(2)[1:-2] + [VOCAB.eos]  # caption -> image
    gen_doc = "M2G" in model.images.capabilities
    docs = [doc_cap, doc_gen] if gen_doc else [doc_cap, doc_cap]
    ids = torch.tensor([docs[0] + docs[1]])
    targets = torch.full_like(ids, -100)
    targets[0, :-1] = ids[0, 1:]
    targets[0, len(docs[0]) - 1] = -100  # no loss across documents
    positions = torch.tensor([list(range(len(docs[0]))) + list(range(len(docs[1])))])
    doc_ids = torch.tensor([[0] * len(docs[0]) + [1] * len(docs[1])])
    generated = torch.zeros_like(ids, dtype=torch.bool)
    if gen_doc:
        generated[0, len(docs[0]):] = ids[0, len(docs[0]):] >= VOCAB.start("image")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(7)  # the same noise each step (continuous), so the losses compare
        loss, stats = model.loss(ids, targets, positions, doc_ids, {}, 1e-4, generated)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert torch.isfinite(loss)
            if gen_doc:
                assert "loss_image" in stats or "loss_flow" in stats
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


def test_late_and_mid_fusion_freeze_the_encoder_by_default():
    for name in ("late", "mid"):
        model = make(name)
        enc = model.images.features.encoder
        assert not any(p.requires_grad for p in enc.parameters())
        assert all(p.requires_grad for p in model.images.features.projector.parameters())


def test_continuous_sampling_is_seeded_and_on_the_code_grid():
    model = make("early-continuous")
    prompts = [[VOCAB.bos, 4, 5, VOCAB.boi], [VOCAB.bos, 6, VOCAB.boi]]
    a = model.images.sample(model, prompts, cfg_scale=2.0, steps=3, seed=0, uncond_prompt=[VOCAB.bos, VOCAB.boi])
    b = model.images.sample(model, prompts, cfg_scale=2.0, steps=3, seed=0, uncond_prompt=[VOCAB.bos, VOCAB.boi])
    c = model.images.sample(model, prompts, cfg_scale=2.0, steps=3, seed=1, uncond_prompt=[VOCAB.bos, VOCAB.boi])
    assert a.shape == (2, VOCAB.tokens_per_image) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB.image_codes
    # snapping a code's own latent gives the code back
    codes = torch.arange(VOCAB.image_codes).view(1, -1)
    assert torch.equal(model.images.snap(model.images.latents[codes]), codes)


def test_decoupled_reads_with_the_encoder_and_writes_codes():
    """Context images are embedded by the encoder, generated ones by the code table."""
    model = make("early-decoupled")
    ids = torch.tensor([image_prompt()])
    layout = SpanLayout.of(ids, VOCAB)["image"]
    x = torch.zeros(1, ids.shape[1], 32)
    read = model.images.embed(x, ids, layout, torch.zeros_like(layout.is_code), None)
    written = model.images.embed(x, ids, layout, layout.is_code.clone(), None)
    codes = ids - VOCAB.start("image")
    table = model.images.embed_codes(codes.clamp(min=0))
    assert torch.allclose(written[layout.is_code], table[layout.is_code])
    assert not torch.allclose(read[layout.is_code], table[layout.is_code])


def test_bidirectional_and_cross_attention_masks():
    ids = torch.tensor([[VOCAB.bos, 3, VOCAB.boi] + [VOCAB.start("image")] * 16 + [VOCAB.eoi, 4, 5]])
    layout = SpanLayout.of(ids, VOCAB)["image"]
    assert layout.slot[0, 3] == 0 and layout.slot[0, 18] == 15 and layout.item[0, 1] == -1
    mask = with_bidirectional_items(causal_mask(1, ids.shape[1], 0, ids.device), layout)[0, 0]
    assert mask[3, 18] and mask[18, 3]  # first and last code see each other
    assert not mask[2, 3]  # <boi> stays causal
    assert not mask[3, 20] and mask[20, 3]  # the image does not see the text after it; the text sees the image
    # cross-attention: features of the image (last code at 18) are visible from position 18 on
    key_slot, valid = torch.tensor([[18, 18]]), torch.tensor([[True, True]])
    xmask = cross_attention_mask(causal_mask(1, 22, 0, ids.device), key_slot, valid)[0, 0]
    assert xmask[:, 0].all()  # the null feature
    assert not xmask[17, 1:].any() and xmask[18, 1:].all() and xmask[21, 1:].all()


def test_a_model_that_cannot_generate_says_so(tmp_path):
    import nmm
    from nmm.api import Pipeline

    model = make("late")
    pipe = Pipeline.__new__(Pipeline)
    Pipeline.__init__(pipe, model, codecs=type("C", (), {"vocab": VOCAB})())
    with pytest.raises(InputError, match="cannot generate"):
        pipe.image_codes([[VOCAB.bos, VOCAB.boi]], SamplingConfig(), None)
    assert nmm  # imported for the side effect of registering everything


def test_understanding_only_variant_rejects_generation_roles(tiny_run, tmp_path):
    from nmm.train.trainer import train

    run = tmp_path / "late"
    run.mkdir()
    for f in ("text_tokenizer.json", "vocab.json", "image_tokenizer.json", "image_tokenizer.safetensors"):
        shutil.copy2(tiny_run / f, run / f)
    cfg = load_config("shapes-tiny-late", ["data.roles={captioning: 0.5, generation: 0.5}"])
    with pytest.raises(ConfigError, match="data.roles.generation=0"):
        train(cfg, run, show_progress=False, log=lambda *a: None)


@pytest.mark.parametrize("preset", ["shapes-tiny-continuous", "shapes-tiny-decoupled", "shapes-tiny-late",
                                    "shapes-tiny-mid", "shapes-tiny-moe", "shapes-tiny-moe-aware", "shapes-tiny-mot"])
def test_tiny_preset_trains_and_generates(preset, tiny_run, tmp_path):
    """The real `train` path (encoder pretraining included) for each variant's tiny preset, on the
    shared tiny run's tokenizers; then `nmm.load` and generation where the variant can."""
    import nmm
    from nmm.data.shapes import ShapesWorld
    from nmm.train.trainer import train

    run = tmp_path / preset
    run.mkdir()
    for f in ("text_tokenizer.json", "vocab.json", "image_tokenizer.json", "image_tokenizer.safetensors",
              "tokenizer_stats.json"):
        if (tiny_run / f).exists():
            shutil.copy2(tiny_run / f, run / f)
    summary = train(load_config(preset, ["train.max_steps=3"]), run, show_progress=False, log=lambda *a: None)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    pipe = nmm.load(run)
    world = ShapesWorld()
    images = np.stack([world.render(s) for s in world.scenes(2, 0, "train")])
    captions = pipe.caption(images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    if "M2G" in pipe.model.images.capabilities:
        out = pipe.generate_images(["a red circle", "a blue square"], cfg_scale=2.0)
        assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    else:
        with pytest.raises(InputError, match="cannot generate"):
            pipe.generate_images(["a red circle"])
