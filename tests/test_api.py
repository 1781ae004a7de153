"""The Python API (`nmm.api.Pipeline`) builds every prompt with `Codecs.prompt` (the layout the model was trained
on) and generates through the Engine; `image_codes` is public. A random-weight shapes-tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmm.api import Pipeline
from nmm.config import load_config
from nmm.infer.engine import GenerationResult
from nmm.infer.requests import Handle, Request
from nmm.infer.sampling import SamplingConfig
from nmm.modalities.codecs import Codecs
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.text import TextTokenizer
from nmm.model.model import NativeMultimodalModel

TEXTS = ["a small red circle at the top left", "what colour is the square?", "make it blue"] * 20


@pytest.fixture(scope="module")
def pipe():
    cfg = load_config("shapes-tiny")
    torch.manual_seed(0)
    codecs = Codecs(TextTokenizer.train(TEXTS, vocab_size=300), ImageTokenizer(cfg.image).eval())
    return Pipeline(NativeMultimodalModel(cfg.model, codecs.vocab).eval(), codecs)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture()
def calls(pipe, monkeypatch):
    """Record what the tasks hand the engine (and answer with a well-formed image or a short text)."""
    seen = []
    v = pipe.vocab

    def generate(prompts, max_new_tokens, sampling=None, uncond_prompts=None, **kw):
        seen.append({"prompts": prompts, "uncond": uncond_prompts, **kw})
        if kw.get("stop_after_image"):
            row = [v.start("image")] * v.tokens_per_image + [v.eoi]
        else:
            row = pipe.codecs.encode_text("blue")
        return GenerationResult([list(row) for _ in prompts], [True] * len(prompts))

    monkeypatch.setattr(pipe.engine, "generate", generate)
    return seen


def test_task_prompts_follow_the_training_layout(pipe, images, calls):
    v, c = pipe.vocab, pipe.codecs
    image_ids = [row.tolist() for row in c.encode_images(images)]
    pipe.generate_images([TEXTS[0]], cfg_scale=3.0)
    assert calls[-1]["prompts"] == [[v.bos, *c.encode_text(TEXTS[0]), v.boi]]
    assert calls[-1]["uncond"] == [[v.bos, v.boi]] == [pipe.uncond_image_prompt()]
    assert pipe.caption(images) == ["blue", "blue"]
    assert calls[-1]["prompts"] == [[v.bos, v.boi, *ids, v.eoi] for ids in image_ids]
    pipe.answer(images, [TEXTS[1]] * 2)
    assert calls[-1]["prompts"] == [[v.bos, v.boi, *ids, v.eoi, *c.encode_text(TEXTS[1])] for ids in image_ids]
    edited = pipe.edit(images, [TEXTS[2]] * 2)
    # Instruction first, as the edit role trains it (nmm.data.mixture).
    assert calls[-1]["prompts"] == [[v.bos, *c.encode_text(TEXTS[2]), v.boi, *ids, v.eoi, v.boi] for ids in image_ids]
    assert calls[-1]["uncond"] is None and edited.shape == images.shape


def test_caption_first_answers_after_the_models_own_caption(pipe, images, calls):
    v, c = pipe.vocab, pipe.codecs
    image_ids = [row.tolist() for row in c.encode_images(images)]
    assert pipe.answer(images, [TEXTS[1]] * 2, caption_first=True) == ["blue", "blue"]
    caption_call, answer_call = calls[-2:]
    assert caption_call["prompts"] == [[v.bos, v.boi, *ids, v.eoi] for ids in image_ids]
    # The caption the model wrote ("blue", from the stub) sits between the image and the question.
    assert answer_call["prompts"] == [[v.bos, v.boi, *ids, v.eoi, *c.encode_text("blue"), *c.encode_text(TEXTS[1])]
                                      for ids in image_ids]


def test_image_codes_is_public(pipe):
    v = pipe.vocab
    codes = pipe.image_codes([pipe.image_prompt(TEXTS[0])] * 2, SamplingConfig(temperature=0, cfg_scale=2.0),
                             uncond=pipe.uncond_image_prompt())
    assert codes.shape == (2, v.tokens_per_image) and bool(v.is_modality("image", torch.as_tensor(codes)).all())
    assert (codes[0] == codes[1]).all()  # greedy: the same prompt, the same image


def test_generate_images_and_perplexity_run(pipe):
    out = pipe.generate_images([TEXTS[0], TEXTS[2]], seed=0)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert np.isfinite(pipe.perplexity(TEXTS[:2]))


def test_a_handle_finished_outside_the_scheduler():
    """What the server hands back for images sampled by a flow: a Handle ended with its whole answer."""
    handle = Handle(Request([1, 2], 3))
    assert not handle.done
    handle.finish(True, tokens=[5, 6, 7])
    assert handle.done and handle.finished and handle.result(timeout=0) == [5, 6, 7]
    handle.cancel()  # harmless once done, with no scheduler to wake
