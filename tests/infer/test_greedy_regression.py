"""Greedy decoding does not move: the exact token ids `Engine.generate` and the `Scheduler` gave on a seeded random
shapes-tiny model before the two shared one state machine, one sampler and one KV cache, kept as literals.

Recorded from the previous implementation (engine.py with its own masks and `_KV` cache, scheduler.py with
`_RowCache` and its own plan): text answers (left-padded batch, repetition penalty, `min_new_tokens`,
`ignore_eos`), image generation with classifier-free guidance, free generation that opens images (rows in
different states), and a text answer about an image in the prompt. The scheduler gave the same ids as the
engine for every case (alone and all in one busy batch), so one literal serves both."""

import copy

import pytest
import torch

from nmm.config import load_config
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig
from nmm.infer.scheduler import Request, Scheduler
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel

VOCAB = Vocabulary(300, (image_spec(3200, (200, 16), 64, ((8, 5, 5), (4, 4))),))  # shapes-tiny's layout
BOS, BOI = VOCAB.bos, VOCAB.boi
GREEDY = SamplingConfig(temperature=0)
IMAGE = [BOI, *[VOCAB.start("image") + (i * 37) % 3200 for i in range(64)], VOCAB.eoi]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = NativeMultimodalModel(load_config("shapes-tiny").model, VOCAB).eval()
    opens = copy.deepcopy(plain)  # favours <boi>, so free generation opens images
    with torch.no_grad():
        opens.text_head.proj.weight[BOI] += 3 * opens.text_head.proj.weight.std()
    return {"plain": plain, "opens": opens}


CASES = {  # name: (model, Engine.generate keywords)
    "text": ("plain", dict(prompts=[[BOS, 5, 17, 42], [BOS, 9]], max_new_tokens=16, sampling=GREEDY)),
    "penalty": ("plain", dict(prompts=[[BOS, *IMAGE, 5, 6], [BOS, 5, 17, 42]], max_new_tokens=16,
                              sampling=SamplingConfig(temperature=0, repetition_penalty=3.0), allow_images=False)),
    "min_new": ("plain", dict(prompts=[[BOS, 3], [BOS, 9, 9, 4]], max_new_tokens=12, sampling=GREEDY, min_new_tokens=7)),
    "ignore_eos": ("plain", dict(prompts=[[BOS, 3]], max_new_tokens=20, sampling=GREEDY, ignore_eos=True)),
    "image_cfg": ("plain", dict(prompts=[[BOS, 7, 8, BOI], [BOS, 11, BOI]], max_new_tokens=65,
                                sampling=SamplingConfig(temperature=0, cfg_scale=3.0), uncond_prompts=[[BOS, BOI]] * 2,
                                stop_after_image=True)),
    "mixed": ("opens", dict(prompts=[[BOS, 2], [BOS, 4, BOI]], max_new_tokens=90, sampling=GREEDY)),
    "answer": ("plain", dict(prompts=[[BOS, *IMAGE, 5, 6]], max_new_tokens=12, sampling=GREEDY, allow_images=False)),
}

GOLDEN = {
    'text': (
        [
            [47, 152, 246, 277, 21, 54, 115, 20, 9, 232, 104, 127, 218, 64, 2, 165],
            [232, 104, 87, 193, 238, 143, 289, 76, 172, 73, 3, 290, 184, 35, 58, 28],
        ],
        [False, False],
    ),
    'penalty': (
        [
            [98, 32, 20, 9, 232, 179, 115, 218, 64, 2, 165, 109, 130, 53, 22, 290],
            [47, 152, 246, 277, 21, 54, 115, 20, 9, 232, 104, 127, 218, 64, 2, 165],
        ],
        [False, False],
    ),
    'min_new': (
        [
            [92, 53, 22, 290, 184, 35, 143, 289, 76, 68, 96, 66],
            [152, 246, 277, 21, 54, 115, 20, 9, 232, 104, 127, 218],
        ],
        [False, False],
    ),
    'ignore_eos': (
        [
            [92, 53, 22, 290, 184, 35, 143, 289, 76, 68, 96, 66, 113, 58, 28, 50, 2, 165, 109, 102],
        ],
        [False],
    ),
    'image_cfg': (
        [
            [2576, 1824, 1824, 1376, 2278, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432,
             2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366,
             838, 2432, 2366, 662, 2084, 1150, 2544, 2366, 662, 2324, 1148, 496, 1838, 1830, 2627, 545, 2423, 1838, 838,
             2432, 2366, 662, 2084, 1150, 2544, 2355, 664, 304],
            [2575, 2224, 1830, 2627, 2177, 2179, 2179, 2179, 2188, 956, 508, 960, 1827, 2675, 705, 1071, 3242, 2327,
             1839, 710, 2592, 964, 1148, 2928, 963, 2168, 662, 2084, 1142, 3104, 1838, 838, 2432, 2366, 838, 2432, 2366,
             838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 2432, 2366, 838, 368, 2531, 2355,
             664, 2083, 2686, 845, 672, 974, 2542, 842, 304],
        ],
        [True, True],
    ),
    'mixed': (
        [
            [303, 2575, 576, 1812, 928, 1830, 2627, 545, 2423, 1838, 3222, 2323, 664, 2083, 2686, 845, 672, 974, 2542,
             842, 2327, 1839, 2630, 1027, 2172, 656, 2366, 838, 368, 2531, 2355, 664, 2083, 2680, 915, 2728, 2355, 664,
             2083, 2680, 915, 2728, 2355, 664, 2083, 2680, 915, 2728, 2355, 664, 2083, 2680, 915, 552, 1491, 1548, 2896,
             2531, 2355, 664, 2083, 2680, 915, 552, 1491, 304, 137, 139, 272, 303, 2575, 2816, 710, 2592, 964, 1148,
             2928, 963, 2168, 662, 2324, 1148, 2928, 963, 2168, 662, 2324, 1148, 2928, 963],
            [2575, 2816, 2534, 560, 974, 2542, 842, 2327, 1839, 718, 847, 1925, 524, 2920, 915, 2728, 2355, 664, 2083,
             2686, 845, 672, 974, 2542, 842, 2327, 1839, 710, 2592, 964, 1148, 2928, 963, 1544, 3123, 705, 1071, 3242,
             2327, 1839, 710, 2640, 3315, 2428, 3312, 3326, 2540, 2896, 2535, 1827, 2675, 705, 1071, 3242, 2327, 1839,
             2630, 1027, 2172, 656, 2366, 838, 368, 2531, 304, 137, 156, 303, 2575, 2816, 710, 2592, 964, 1148, 2928,
             963, 2168, 662, 2084, 1150, 2544, 2355, 664, 2083, 2686, 845, 672, 974, 2542, 842],
        ],
        [False, False],
    ),
    'answer': (
        [
            [98, 32, 20, 9, 232, 179, 115, 20, 9, 232, 179, 115],
        ],
        [False],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_greedy_ids_are_unchanged(models, name):
    model, kw = CASES[name]
    res = Engine(models[model]).generate(**kw)
    assert (res.tokens, res.finished) == GOLDEN[name]


@pytest.mark.parametrize("model", ["plain", "opens"])
def test_scheduler_greedy_ids_are_unchanged_in_one_busy_batch(models, model):
    requests, expected = [], []
    for name, (m, kw) in CASES.items():
        if m != model:
            continue
        uncond = kw.get("uncond_prompts")
        for i, prompt in enumerate(kw["prompts"]):
            requests.append(Request(prompt, kw["max_new_tokens"], kw["sampling"], uncond[i] if uncond else None,
                                    allow_images=kw.get("allow_images", True),
                                    stop_after_image=kw.get("stop_after_image", False),
                                    min_new_tokens=kw.get("min_new_tokens", 0), ignore_eos=kw.get("ignore_eos", False)))
            expected.append((GOLDEN[name][0][i], GOLDEN[name][1][i]))
    scheduler = Scheduler(Engine(models[model]), max_batch=16)
    try:
        handles = scheduler.generate(requests, timeout=120)
    finally:
        scheduler.close()
    assert [(h.tokens, h.finished) for h in handles] == expected
