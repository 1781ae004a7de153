import copy

import pytest
import torch

from nmm.config import ModelConfig
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig, sample
from nmm.model.model import NativeMultimodalModel
from nmm.modalities.vocab import Vocabulary

VOCAB = Vocabulary(n_text=40, image_codes=12, image_factors=(4, 3), tokens_per_image=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    return NativeMultimodalModel(cfg, VOCAB).eval()


def test_greedy_with_cache_matches_full_forward(model):
    """Token-for-token: KV-cached decoding == re-running the whole sequence without a cache."""
    prompt = [VOCAB.bos, 3, 7, 9]
    res = Engine(model).generate([prompt], 12, SamplingConfig(temperature=0), allow_images=False)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(res.tokens[0])):
            logits = model(torch.tensor([seq]))[0, -1]
            allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
            allowed[: VOCAB.n_text] = True
            allowed[VOCAB.eos] = True
            seq.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
    assert res.tokens[0] == seq[len(prompt):][: len(res.tokens[0])]
    assert len(res.tokens[0]) > 0


def test_image_segment_has_exactly_n_codes_then_eoi(model):
    prompt = [VOCAB.bos, 5, VOCAB.boi]
    res = Engine(model).generate([prompt] * 3, VOCAB.tokens_per_image + 1, SamplingConfig(temperature=1.0, seed=0),
                                 stop_after_image=True)
    for toks in res.tokens:
        assert len(toks) == VOCAB.tokens_per_image + 1
        assert all(t >= VOCAB.image_start for t in toks[:-1])
        assert toks[-1] == VOCAB.eoi


def test_interleaved_output_is_well_formed(model):
    """Free generation: every <boi> is followed by exactly N codes and <eoi>; no codes elsewhere."""
    # Bias the text head towards <boi> so images actually get opened.
    with torch.no_grad():
        model.text_head.proj.weight[VOCAB.boi] += 0.5 * model.text_head.proj.weight.std()
    res = Engine(model).generate([[VOCAB.bos, 2]] * 4, 40, SamplingConfig(temperature=1.5, seed=3))
    opened = 0
    for toks in res.tokens:
        i = 0
        while i < len(toks):
            if toks[i] == VOCAB.boi:
                opened += 1
                block = toks[i + 1 : i + 1 + VOCAB.tokens_per_image]
                assert all(t >= VOCAB.image_start for t in block)
                if i + 1 + VOCAB.tokens_per_image < len(toks):
                    assert toks[i + 1 + VOCAB.tokens_per_image] == VOCAB.eoi
                i += VOCAB.tokens_per_image + 2
            else:
                assert toks[i] < VOCAB.image_start and toks[i] != VOCAB.eoi
                i += 1
    assert opened > 0


def test_left_padded_batch_matches_single_prompts(model):
    prompts = [[VOCAB.bos, 1, 2, 3, 4, 5], [VOCAB.bos, 9], [VOCAB.bos, 7, 7, VOCAB.boi]]
    engine = Engine(model)
    batched = engine.generate(prompts, 8, SamplingConfig(temperature=0)).tokens
    single = [engine.generate([p], 8, SamplingConfig(temperature=0)).tokens[0] for p in prompts]
    assert batched == single


def test_cfg_scale_one_equals_unguided(model):
    prompt = [[VOCAB.bos, 4, VOCAB.boi]]
    engine = Engine(model)
    a = engine.generate(prompt, 6, SamplingConfig(temperature=0, cfg_scale=1.0), uncond_prompts=[[VOCAB.bos, VOCAB.boi]])
    b = engine.generate(prompt, 6, SamplingConfig(temperature=0))
    c = engine.generate(prompt, 6, SamplingConfig(temperature=0, cfg_scale=5.0), uncond_prompts=[[VOCAB.bos, VOCAB.boi]])
    assert a.tokens == b.tokens
    assert len(c.tokens[0]) == 6 and c.tokens[0][-1] == VOCAB.eoi


def test_seed_reproducible_and_context_limit(model):
    engine = Engine(model)
    s = SamplingConfig(temperature=1.0, top_k=5, top_p=0.9, seed=11)
    assert engine.generate([[VOCAB.bos]], 10, s).tokens == engine.generate([[VOCAB.bos]], 10, s).tokens
    with pytest.raises(ValueError, match="context"):
        engine.generate([[VOCAB.bos] * 60], 10, s)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws <= {0, 1}
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert draws == {0}


def _well_formed_image(tokens: list[int]) -> bool:
    return (len(tokens) == VOCAB.tokens_per_image + 1 and tokens[-1] == VOCAB.eoi
            and all(t >= VOCAB.image_start for t in tokens[:-1]))


def test_bf16_weights_run(model):
    from nmm.infer.scheduler import Request, Scheduler

    m = copy.deepcopy(model)  # Engine(dtype=...) casts the model in place
    engine = Engine(m, dtype="bf16")
    assert next(m.parameters()).dtype == torch.bfloat16 and engine.dtype == torch.bfloat16
    greedy = SamplingConfig(temperature=0)
    images = engine.generate([[VOCAB.bos, 4, VOCAB.boi]] * 2, VOCAB.tokens_per_image + 1,
                             SamplingConfig(temperature=1.0, cfg_scale=2.0, seed=0),
                             uncond_prompts=[[VOCAB.bos, VOCAB.boi]] * 2, stop_after_image=True)
    assert all(_well_formed_image(t) for t in images.tokens)
    text = engine.generate([[VOCAB.bos, 3, 7]], 10, greedy, allow_images=False).tokens[0]
    assert len(text) > 0 and all(t < VOCAB.n_text for t in text)
    scheduler = Scheduler(engine)  # the batch's KV cache takes the model's dtype too
    try:
        assert scheduler.generate([Request([VOCAB.bos, 3, 7], 10, greedy, allow_images=False)])[0].tokens == text
        assert scheduler.row_bytes == Scheduler(Engine(model)).row_bytes // 2
    finally:
        scheduler.close()
    with pytest.raises(ValueError, match="dtype"):
        Engine(m, dtype="int3")


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(model):
    """torch.compile of the decode step (Engine and Scheduler): the same greedy tokens as eager code."""
    from nmm.infer.scheduler import Request, Scheduler

    greedy = SamplingConfig(temperature=0)
    prompts = [[VOCAB.bos, 3, 7, 9], [VOCAB.bos, 5], [VOCAB.bos, 1, 2, VOCAB.boi]]
    eager = Engine(model).generate(prompts, 12, greedy).tokens
    compiled = Engine(model, compile=True)
    assert compiled.generate(prompts, 12, greedy).tokens == eager
    scheduler = Scheduler(compiled, max_batch=4)
    try:
        handles = scheduler.generate([Request(p, 12, greedy) for p in prompts])
        assert [h.tokens for h in handles] == eager
        assert scheduler.generate([Request(prompts[0], 12, greedy)])[0].tokens == eager[0]  # a batch of one
    finally:
        scheduler.close()
