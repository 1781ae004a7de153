import copy

import pytest
import torch

from nmm.config import ModelConfig
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig, sample
from nmm.model.model import NativeMultimodalModel
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary

VOCAB = Vocabulary(40, (image_spec(12, (4, 3), 5),))


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
        assert all(t >= VOCAB.start("image") for t in toks[:-1])
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
                assert all(t >= VOCAB.start("image") for t in block)
                if i + 1 + VOCAB.tokens_per_image < len(toks):
                    assert toks[i + 1 + VOCAB.tokens_per_image] == VOCAB.eoi
                i += VOCAB.tokens_per_image + 2
            else:
                assert toks[i] < VOCAB.start("image") and toks[i] != VOCAB.eoi
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
            and all(t >= VOCAB.start("image") for t in tokens[:-1]))


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


# ---- heads only where needed, factor-by-factor image codes, fixed-length decoding ---------------------------
WIDE = Vocabulary(40, (image_spec(96, (12, 8), 6),))


def wide_model(seed: int) -> NativeMultimodalModel:
    """Larger factors than VOCAB's, and logits of size ~1, so that the joint grid has close calls."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    m = NativeMultimodalModel(cfg, WIDE).eval()
    with torch.no_grad():
        for p in m.image_head.proj:
            p.weight.normal_(0.0, 0.3)
    return m


def joint_engine(model) -> Engine:
    """An Engine that chooses image codes from the joint grid (its path for top-k / top-p)."""
    engine = Engine(model)
    engine.factors = None
    return engine


def test_factored_greedy_equals_the_joint_argmax():
    """Greedy image codes chosen factor by factor are the joint grid's argmax: on 20,000 random hidden states
    (with and without CFG), and through whole generations."""
    model = wide_model(0)
    engine = Engine(model)
    assert engine.factors == (12, 8)
    h = torch.randn(20000, 32) * 3
    with torch.no_grad():
        joint = model.images.logits(h).float()
        assert torch.equal(engine.picker.image_greedy(h, len(h), None), joint.argmax(-1) + WIDE.start("image"))
        n, scale = len(h) // 2, 2.5
        mixed = joint[n:] + scale * (joint[:n] - joint[n:])
        assert torch.equal(engine.picker.image_greedy(h, n, torch.tensor(scale)),
                           mixed.argmax(-1) + WIDE.start("image"))
    prompts = [[WIDE.bos, i, WIDE.boi] for i in range(8)]
    uncond = [[WIDE.bos, WIDE.boi]] * 8
    for sampling, kw in [(SamplingConfig(temperature=0), {}),
                         (SamplingConfig(temperature=0, cfg_scale=3.0), {"uncond_prompts": uncond})]:
        ours = engine.generate(prompts, WIDE.tokens_per_image + 1, sampling, stop_after_image=True, **kw)
        theirs = joint_engine(model).generate(prompts, WIDE.tokens_per_image + 1, sampling, stop_after_image=True, **kw)
        assert ours.tokens == theirs.tokens and all(_well_formed_wide(t) for t in ours.tokens)


def _well_formed_wide(tokens):
    return (len(tokens) == WIDE.tokens_per_image + 1 and tokens[-1] == WIDE.eoi
            and all(t >= WIDE.start("image") for t in tokens[:-1]))


def test_factored_sampling_has_the_joint_distribution():
    """With temperature (and CFG), sampling factor by factor draws codes from the joint softmax: exactly (the
    product of the factor softmaxes is the joint softmax), and empirically (60,000 draws through the picker)."""
    model = wide_model(1)
    engine = Engine(model)
    h = torch.randn(2, 32) * 3  # a conditional and an unconditional row
    T, scale = 0.7, 2.0
    with torch.no_grad():
        joint = model.images.logits(h).float()
        target = ((joint[1:] + scale * (joint[:1] - joint[1:])) / T).softmax(-1)[0]  # (96,)
        parts = engine.picker.factor_logits(h, 1, torch.tensor(scale))
        product = torch.einsum("a,b->ab", *[(p[0] / T).softmax(-1) for p in parts]).flatten()
        assert torch.allclose(product, target, atol=1e-6)
        # The shared picker, on 60,000 copies of the pair (conditional rows first, then unconditional).
        N = 60000
        from nmm.infer.decoding import codes_phase
        from nmm.infer.picker import Row
        from nmm.infer.sampling import SamplingRows, draw_uniforms

        sampling = SamplingConfig(temperature=T, cfg_scale=scale, seed=0)
        plan = engine.picker.plan([Row(i, codes_phase(1), sampling, companion=N + i) for i in range(N)], N)
        assert [g.factored for g in plan.codes] == [True]
        settings = SamplingRows(N, 1, WIDE.size, "cpu", penalty=False)
        settings.set(slice(0, N), sampling, draw_uniforms(sampling, N, 1))
        ids = engine.picker.pick(h.repeat_interleave(N, 0), plan, settings, settings.uniforms[:, 0])
    freq = torch.bincount(ids - WIDE.start("image"), minlength=96).float() / N
    assert (freq - target).abs().sum() / 2 < 0.02  # total variation: sampling noise here is about 0.01
    assert (freq[target < 1e-4] == 0).all() or freq[target < 1e-4].sum() < 1e-3


def test_top_k_images_use_the_joint_grid_and_match_the_previous_engine():
    """top-k / top-p need the joint ranking: the factored path is not taken, and seeded results do not move."""
    model = wide_model(2)
    s = SamplingConfig(temperature=1.0, top_k=7, top_p=0.9, cfg_scale=2.0, seed=5)
    prompts, uncond = [[WIDE.bos, 3, WIDE.boi]] * 3, [[WIDE.bos, WIDE.boi]] * 3
    a = Engine(model).generate(prompts, WIDE.tokens_per_image + 1, s, uncond_prompts=uncond, stop_after_image=True)
    b = joint_engine(model).generate(prompts, WIDE.tokens_per_image + 1, s, uncond_prompts=uncond,
                                     stop_after_image=True)
    assert a.tokens == b.tokens and all(_well_formed_wide(t) for t in a.tokens)


def test_min_new_tokens_and_ignore_eos():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    m = NativeMultimodalModel(cfg, VOCAB).eval()
    with torch.no_grad():  # <eos> is by far the likeliest token
        m.text_head.proj.weight[VOCAB.eos] += 5 * m.text_head.proj.weight.std()
    engine, greedy, prompts = Engine(m), SamplingConfig(temperature=0), [[VOCAB.bos, 3], [VOCAB.bos, 9, 9, 4]]
    free = engine.generate(prompts, 12, greedy)
    assert all(free.finished) and max(len(t) for t in free.tokens) < 7  # both end early at <eos>
    at_least = engine.generate(prompts, 12, greedy, min_new_tokens=7)
    for short, longer in zip(free.tokens, at_least.tokens):
        assert len(longer) >= 7 and longer[: len(short)] == short  # the same tokens, then on instead of <eos>
    fixed = engine.generate(prompts, 12, SamplingConfig(temperature=1.0, seed=0), ignore_eos=True)
    assert [len(t) for t in fixed.tokens] == [12, 12] and not any(fixed.finished)
    assert all(VOCAB.eos not in t for t in fixed.tokens)


@pytest.mark.parametrize("variant", [{"fusion": "late", "image_repr": "continuous"}, {"image_repr": "continuous"}])
def test_models_without_a_code_head_never_open_an_image(variant):
    """Late fusion and continuous images cannot write codes: <boi> is never offered (even when the text head
    favours it), and a prompt that ends in <boi> is refused."""
    from nmm.config import VisionEncoderConfig
    from nmm.infer.engine import CannotGenerate
    from nmm.infer.scheduler import Request, Scheduler

    vocab = Vocabulary(40, (image_spec(12, (4, 3), 4, ((4,), (3,))),))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      encoder=VisionEncoderConfig(width=16, layers=1), **variant)
    m = NativeMultimodalModel(cfg, vocab).eval()
    assert not m.images.emits_codes
    with torch.no_grad():
        m.text_head.proj.weight[vocab.boi] += 5 * m.text_head.proj.weight.std()
    engine = Engine(m)
    res = engine.generate([[vocab.bos, 2]] * 3, 20, SamplingConfig(temperature=1.5, seed=0))
    assert all(t < vocab.n_text for row in res.tokens for t in row if t != vocab.eos)
    assert all(len(row) > 0 for row in res.tokens)
    with pytest.raises(CannotGenerate, match="cannot generate image"):
        engine.generate([[vocab.bos, 2, vocab.boi]], 6)
    scheduler = Scheduler(engine)
    try:
        handles = scheduler.generate([Request([vocab.bos, 2], 20, SamplingConfig(temperature=1.5, seed=i))
                                      for i in range(3)])
        assert all(t < vocab.n_text for h in handles for t in h.tokens)
        with pytest.raises(ValueError, match="cannot generate image"):
            scheduler.submit(Request([vocab.bos, vocab.boi], 6))
    finally:
        scheduler.close()
