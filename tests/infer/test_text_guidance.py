"""Text guidance (`SamplingConfig.text_cfg_scale`): each text token is chosen from
uncond + scale * (cond - uncond) of the text head, the unconditional row being the same text without
the image it reads; scale 1 is plain decoding."""

import numpy as np
import torch

from nmm.infer.decoding import TEXT
from nmm.infer.sampling import SamplingConfig
from nmm.modalities.document import ItemSegment


def _images(pipe, n=3):
    v = pipe.vocab
    rng = np.random.default_rng(0)
    return pipe.codecs.decode_images(v.ids("image", rng.integers(0, v.image_codes, size=(n, v.tokens_per_image))))


def test_scale_one_is_plain_captioning(tiny_pipe):
    images = _images(tiny_pipe)
    assert tiny_pipe.caption(images, text_cfg_scale=1.0) == tiny_pipe.caption(images)


@torch.no_grad()
def test_each_token_is_the_argmax_of_the_mixed_logits(tiny_pipe):
    pipe, scale = tiny_pipe, 3.0
    v, codecs, model = pipe.vocab, pipe.codecs, pipe.model
    ids = codecs.encode_images(_images(pipe, 2))
    prompts = [codecs.prompt([ItemSegment("image", codes=c)]) for c in ids]
    uncond = [codecs.prompt([])] * len(prompts)
    res = pipe.engine.generate(prompts, 6, SamplingConfig(temperature=0, text_cfg_scale=scale), uncond_prompts=uncond,
                               allow_images=False, ignore_eos=True)
    dec = pipe.engine.decoder
    bias = dec.table(dec.allow_set(False), False)[TEXT, : v.text_size]
    differs = False
    for prompt, tokens in zip(prompts, res.tokens):
        for t in range(len(tokens)):
            cond = model.text_head(model.hidden(torch.tensor([prompt + tokens[:t]])))[0, -1].float()
            free = model.text_head(model.hidden(torch.tensor([uncond[0] + tokens[:t]])))[0, -1].float()
            mixed = free + scale * (cond - free) + bias
            assert tokens[t] == int(mixed.argmax())
            differs |= int((cond + bias).argmax()) != tokens[t]
    assert differs  # guidance changed at least one choice: the test would see a decoder that ignored it
