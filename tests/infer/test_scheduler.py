"""The continuous-batching scheduler: the same tokens as Engine.generate (alone or in a busy batch), per-row
state machines, caps that queue instead of dropping, cancellation, per-request seeds, batched sampling."""

import random
import threading
import time

import pytest
import torch

from nmm.config import ModelConfig
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig, sample_rows
from nmm.infer.scheduler import QueueFull, Request, Scheduler
from nmm.model.model import NativeMultimodalModel
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary

VOCAB = Vocabulary(40, (image_spec(12, (4, 3), 5),))
GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    m = NativeMultimodalModel(cfg, VOCAB).eval()
    with torch.no_grad():  # open images now and then, so free generation exercises the state machine
        m.text_head.proj.weight[VOCAB.boi] += 0.5 * m.text_head.proj.weight.std()
    return m


@pytest.fixture()
def scheduler(model):
    made = []

    def make(**kw) -> Scheduler:
        made.append(Scheduler(Engine(model), **kw))  # its own Engine: tests may wrap its decode step
        return made[-1]

    yield make
    for s in made:
        s.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = [[VOCAB.bos] + [rng.randrange(VOCAB.n_text) for _ in range(rng.randint(0, 12))] for _ in range(n)]
    out[1] = out[1] + [VOCAB.boi]  # one prompt starts inside an image
    return out


def on_step(s: Scheduler, fn) -> list[int]:
    """Call fn(step_index) on the scheduler's thread before each decode step; returns rows used per step."""
    inner, rows = s.engine.decode_step, []

    def step(*args):
        fn(len(rows))
        rows.append(s.rows_in_use)
        return inner(*args)

    s.engine.decode_step = step
    return rows


def test_greedy_alone_matches_engine(model, scheduler):
    engine, s = Engine(model), scheduler()
    for p in prompts(8):
        ref = engine.generate([p], 30, GREEDY)
        h = s.generate([Request(p, 30, GREEDY)])[0]
        assert h.tokens == ref.tokens[0] and h.finished == ref.finished[0]


def test_greedy_joining_a_busy_batch_matches_engine(model, scheduler):
    """Requests arrive while others are mid-way (and leave before them): still Engine's tokens, each."""
    engine, s = Engine(model), scheduler(max_batch=6)
    ps = prompts(14, seed=1)
    refs = [engine.generate([p], 24, GREEDY).tokens[0] for p in ps]
    late = []
    arrivals = {0: ps[4:8], 3: ps[8:10], 9: ps[10:14]}  # decode step -> prompts submitted during it
    rows = on_step(s, lambda k: late.extend(s.submit_many([Request(p, 24, GREEDY) for p in arrivals.get(k, [])])))
    first = s.submit_many([Request(p, 24, GREEDY) for p in ps[:4]])
    deadline = time.monotonic() + 60
    while len(late) < len(ps) - 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [h.result(timeout=60) for h in first + late] == refs
    assert max(rows) == 6 and min(rows) < 6  # the cap held, and the batch changed size as requests came and went
    assert len(rows) < sum(len(r) for r in refs) / 2  # steps were shared: far fewer steps than tokens


def test_cfg_images_match_engine_in_a_busy_batch(model, scheduler):
    engine, s = Engine(model), scheduler(max_batch=8)
    guided = SamplingConfig(temperature=0, cfg_scale=3.0)
    image_prompts = [[VOCAB.bos, 4, VOCAB.boi], [VOCAB.bos, 7, 9, 9, VOCAB.boi], [VOCAB.bos, 1, VOCAB.boi]]
    uncond = [VOCAB.bos, VOCAB.boi]
    n = VOCAB.tokens_per_image + 1
    refs = [engine.generate([p], n, guided, uncond_prompts=[uncond], stop_after_image=True).tokens[0]
            for p in image_prompts]
    text = prompts(4, seed=2)
    text_refs = [engine.generate([p], 20, GREEDY).tokens[0] for p in text]
    handles = s.generate([Request(p, 20, GREEDY) for p in text[:2]]
                         + [Request(p, n, guided, uncond, stop_after_image=True) for p in image_prompts]
                         + [Request(p, 20, GREEDY) for p in text[2:]])
    assert [h.tokens for h in handles[2:5]] == refs
    assert all(h.finished and len(h.tokens) == n and h.tokens[-1] == VOCAB.eoi for h in handles[2:5])
    assert [h.tokens for h in handles[:2] + handles[5:]] == text_refs
    # cfg_scale 1 needs no companion row and equals unguided decoding
    plain = s.generate([Request(image_prompts[0], n, GREEDY, uncond, stop_after_image=True)])[0]
    assert plain.request.rows == 1 and plain.tokens == engine.generate([image_prompts[0]], n, GREEDY).tokens[0]


def test_interleaved_sampling_is_well_formed_per_row(model, scheduler):
    s = scheduler(max_batch=5)
    handles = s.generate([Request([VOCAB.bos, 2], 40, SamplingConfig(temperature=1.5, seed=i)) for i in range(12)])
    opened = 0
    for h in handles:
        toks, i = h.tokens, 0
        while i < len(toks):
            if toks[i] == VOCAB.boi:
                opened += 1
                block = toks[i + 1 : i + 1 + VOCAB.tokens_per_image]
                assert all(t >= VOCAB.start("image") for t in block)
                if i + 1 + VOCAB.tokens_per_image < len(toks):
                    assert toks[i + 1 + VOCAB.tokens_per_image] == VOCAB.eoi
                i += VOCAB.tokens_per_image + 2
            else:
                assert toks[i] < VOCAB.start("image") and toks[i] not in (VOCAB.eoi, VOCAB.pad, VOCAB.bos)
                i += 1
        assert len(toks) == 40 or h.finished
    assert opened > 0
    text_only = s.generate([Request([VOCAB.bos], 30, SamplingConfig(temperature=1.5, seed=i), allow_images=False)
                            for i in range(4)])
    assert all(t < VOCAB.n_text for h in text_only for t in h.tokens)


def test_seeded_sampling_is_independent_of_the_batch(scheduler):
    s = scheduler(max_batch=8)
    sampled = SamplingConfig(temperature=1.0, top_k=6, top_p=0.9, repetition_penalty=1.3, seed=7)
    alone = s.generate([Request([VOCAB.bos, 3], 30, sampled)])[0].tokens
    crowd = [Request(p, 30, SamplingConfig(temperature=0.8, seed=i)) for i, p in enumerate(prompts(6, seed=3))]
    together = s.generate(crowd[:3] + [Request([VOCAB.bos, 3], 30, sampled)] + crowd[3:])[3].tokens
    assert together == alone
    other = s.generate([Request([VOCAB.bos, 3], 30, SamplingConfig(**{**sampled.__dict__, "seed": 8}))])[0].tokens
    assert other != alone


def test_caps_queue_instead_of_dropping(model, scheduler):
    s = scheduler(max_batch=3)
    rows = on_step(s, lambda k: None)
    guided = SamplingConfig(temperature=0, cfg_scale=2.0)
    image = Request([VOCAB.bos, VOCAB.boi], 6, guided, [VOCAB.bos, VOCAB.boi])
    reqs = [Request(p, 12, GREEDY) for p in prompts(7)] + [image]
    handles = s.generate(reqs, timeout=60)
    assert all(h.done and h.error is None for h in handles) and max(rows) <= 3
    # memory cap: rows = bytes // bytes per row
    row_bytes = Scheduler(Engine(model)).row_bytes
    assert row_bytes == 2 * 2 * 2 * 64 * 8 * 4  # k+v, layers, kv heads, max_len, head_dim, fp32
    assert Scheduler(Engine(model), max_batch=32, max_cache_bytes=5 * row_bytes + 1).rows == 5
    with pytest.raises(ValueError, match="no room"):
        Scheduler(Engine(model), max_cache_bytes=row_bytes - 1)
    # a full queue refuses (all or none); what was queued still runs
    q = scheduler(max_batch=1, max_queue=2)
    q.pause()
    first = q.submit_many([Request([VOCAB.bos], 4, GREEDY)] * 3)  # one row, two waiting
    with pytest.raises(QueueFull):
        q.submit(Request([VOCAB.bos], 4, GREEDY))
    deadline = time.monotonic() + 10
    while q.running < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.running == 1 and q.waiting == 2
    q.resume()
    assert all(len(h.result(timeout=30)) >= 1 for h in first)


def test_cancel_frees_rows_and_bad_requests_are_refused(scheduler):
    s = scheduler(max_batch=2)
    gate = threading.Event()
    on_step(s, lambda k: gate.wait(10) if k == 2 else None)
    long = s.submit_many([Request([VOCAB.bos, 5], 50, SamplingConfig(temperature=1.0, seed=i)) for i in range(2)])
    waiting = s.submit(Request([VOCAB.bos], 3, GREEDY))
    deadline = time.monotonic() + 10
    while s.steps < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    long[0].cancel()
    gate.set()
    assert waiting.result(timeout=30) is not None and waiting.error is None  # took the freed row
    assert long[0].wait(10) and not long[0].finished and len(long[0].tokens) < 50
    long[1].result(timeout=30)
    for bad, match in [(Request([], 4), "empty"), (Request([VOCAB.bos], 0), "at least 1"),
                       (Request([VOCAB.bos] * 60, 10), "context"), (Request([VOCAB.size], 2), "vocabulary"),
                       (Request([VOCAB.bos], 2, SamplingConfig(top_p=0.0)), "sampling")]:
        with pytest.raises(ValueError, match=match):
            s.submit(bad)
    one_row = scheduler(max_batch=1)
    with pytest.raises(ValueError, match="rows"):
        one_row.submit(Request([VOCAB.bos, VOCAB.boi], 6, SamplingConfig(cfg_scale=2.0), [VOCAB.bos, VOCAB.boi]))


def test_sample_rows_follows_each_rows_settings():
    """Four rows with their own settings, each drawn with N evenly spaced uniforms (one batched call):
    the counts are then the quantiles of each row's distribution."""
    N = 2000
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, float("-inf")]]).repeat(4 * N, 1)
    per_row = lambda values: torch.tensor(values).repeat_interleave(N)  # noqa: E731
    uniform = ((torch.arange(N) + 0.5) / N).repeat(4)
    picked = sample_rows(logits, per_row([0.0, 1.0, 1.0, 1.0]), per_row([0, 0, 2, 0]), per_row([1.0, 1.0, 1.0, 0.5]),
                         uniform).view(4, N)
    counts = torch.stack([torch.bincount(row, minlength=5) for row in picked]).float()
    assert counts[0].tolist() == [N, 0, 0, 0, 0]  # greedy
    assert torch.allclose(counts[1], logits[0].softmax(-1) * N, atol=1.5)  # temperature 1: softmax frequencies
    assert counts[2, 2:].sum() == 0 and torch.allclose(counts[2, :2], logits[0, :2].softmax(-1) * N, atol=1.5)
    assert counts[3].tolist() == [N, 0, 0, 0, 0]  # top-p 0.5: the top token alone holds 66%
    assert counts[:, 4].sum() == 0  # a disallowed id is never drawn


def test_mid_fusion_rows_keep_their_images(scheduler):
    """Mid fusion reads the prompt's images through cross-attention to features computed at prefill: every row
    keeps its own between decode steps, so a busy batch (rows with 0, 1 or 2 images, joining and leaving)
    decodes what Engine.generate does alone, and the images do change the answer."""
    from nmm.config import VisionEncoderConfig

    vocab = Vocabulary(40, (image_spec(12, (4, 3), 4, ((4,), (3,))),))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, fusion="mid",
                      image_repr="continuous", cross_attn_every=1, encoder=VisionEncoderConfig(width=16, layers=1))
    model = NativeMultimodalModel(cfg, vocab).eval()
    with torch.no_grad():  # open the gates (0 at init: the layers start as the identity), and make images matter
        for layer in model.backbone.cross_attn:
            layer.attn_gate.fill_(1.0)
            layer.ffn_gate.fill_(1.0)
        for p in [*model.images.features.parameters(), *model.backbone.cross_attn.parameters()]:
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    rng = random.Random(0)

    def image():
        return [vocab.boi, *(vocab.start("image") + rng.randrange(12) for _ in range(4)), vocab.eoi]

    question = [5, 9, 2]
    ps = [[vocab.bos, *image(), *question] for _ in range(5)]
    ps += [[vocab.bos, *image(), 7, *image(), *question], [vocab.bos, *question], [vocab.bos, *image()]]
    engine = Engine(model)
    refs = [engine.generate([p], 12, GREEDY, allow_images=False).tokens[0] for p in ps]
    assert len({tuple(r) for r in refs[:5]}) > 1  # same question, other images: other answers
    s = Scheduler(engine, max_batch=4)
    try:
        lengths = [12, 3, 12, 5, 12, 7, 12, 12]  # some leave early, so rows move and others join
        handles = s.generate([Request(p, n, GREEDY, allow_images=False) for p, n in zip(ps, lengths)])
        assert [h.tokens for h in handles] == [r[:n] for r, n in zip(refs, lengths)]
    finally:
        s.close()


def test_mid_fusion_audio_rows_keep_their_utterances():
    """The same for audio read through cross-attention (nmm.model.fusion.audio): utterances of other
    lengths per row, whose memories the scheduler pads into one batch."""
    from nmm.config import AudioEncoderConfig
    from nmm.modalities.base import ModalitySpec

    speech = ModalitySpec("audio", "<boa>", "<eoa>", codes=20, factors=(5, 4), levels=((5,), (4,)), tokens_per_item=None)
    vocab = Vocabulary(40, (speech,))
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      audio_fusion="mid", audio_repr="continuous", cross_attn_every=1,
                      audio_encoder=AudioEncoderConfig(width=16, layers=2))
    model = NativeMultimodalModel(cfg, vocab).eval()
    with torch.no_grad():
        for layer in model.backbone.cross_attn:
            layer.attn_gate.fill_(1.0)
            layer.ffn_gate.fill_(1.0)
        for p in [*model.modalities["audio"].parameters(), *model.backbone.cross_attn.parameters()]:
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    rng = random.Random(1)

    def utterance():
        n = rng.randint(2, 9)
        return [vocab.begin("audio"), *(vocab.start("audio") + rng.randrange(20) for _ in range(n)), vocab.end("audio")]

    ps = [[vocab.bos, *utterance(), 5, 9] for _ in range(5)] + [[vocab.bos, 3, 3], [vocab.bos, *utterance()]]
    engine = Engine(model)
    refs = [engine.generate([p], 10, GREEDY, allow_images=False).tokens[0] for p in ps]
    assert len({tuple(r) for r in refs[:5]}) > 1
    s = Scheduler(engine, max_batch=3)
    try:
        lengths = [10, 2, 10, 6, 10, 10, 4]
        handles = s.generate([Request(p, n, GREEDY, allow_images=False) for p, n in zip(ps, lengths)])
        assert [h.tokens for h in handles] == [r[:n] for r, n in zip(refs, lengths)]
    finally:
        s.close()


def test_factor_by_factor_inverse_cdf_is_the_joint_one():
    """The scheduler draws a sampled image code factor by factor with the row's one uniform: the same code as
    the joint grid's inverse CDF (codes are ordered factor by factor), for 4,000 evenly spaced uniforms."""
    from nmm.infer.sampling import inverse_cdf_residual as _inverse_cdf_residual

    torch.manual_seed(0)
    a, b = torch.randn(1, 12) * 2, torch.randn(1, 8) * 2
    a[0, 3] = float("-inf")  # a code factor that cannot be drawn
    N = 4000
    uniform = (torch.arange(N) + 0.5) / N
    joint = (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2).repeat(N, 1)
    ones = torch.ones(N)
    expected = sample_rows(joint, ones, torch.zeros(N, dtype=torch.long), ones, uniform)
    i, r = _inverse_cdf_residual(a.softmax(-1).repeat(N, 1), uniform)
    j, _ = _inverse_cdf_residual(b.softmax(-1).repeat(N, 1), r)
    picked = i * 8 + j
    assert (picked == expected).float().mean() > 0.999  # (a uniform on a boundary may round either way)
    assert not (i == 3).any()
    counts = torch.bincount(picked, minlength=96).float()
    assert torch.allclose(counts, joint[0].softmax(-1) * N, atol=1.5)


def test_a_seed_samples_the_same_in_engine_and_scheduler(model, scheduler):
    """One sampler: a seeded request draws what Engine.generate draws for that prompt alone with that seed (text,
    repetition penalty and top-k; CFG images factor by factor and, with top-p, from the joint grid)."""
    engine, s = Engine(model), scheduler(max_batch=8)
    cases = [([VOCAB.bos, 3, 8], 20, SamplingConfig(temperature=0.9, top_k=8, repetition_penalty=1.3, seed=4), None),
             ([VOCAB.bos, 7, VOCAB.boi], VOCAB.tokens_per_image + 1, SamplingConfig(temperature=1.0, cfg_scale=2.5, seed=1),
              [VOCAB.bos, VOCAB.boi]),
             ([VOCAB.bos, 7, VOCAB.boi], VOCAB.tokens_per_image + 1,
              SamplingConfig(temperature=1.0, top_p=0.8, cfg_scale=2.5, seed=2), [VOCAB.bos, VOCAB.boi])]
    refs = [engine.generate([p], n, cfg, uncond_prompts=None if u is None else [u],
                            stop_after_image=u is not None).tokens[0] for p, n, cfg, u in cases]
    crowd = [Request(p, 20, SamplingConfig(temperature=0.7, seed=10 + i)) for i, p in enumerate(prompts(4, seed=5))]
    handles = s.generate(crowd[:2] + [Request(p, n, cfg, u, stop_after_image=u is not None) for p, n, cfg, u in cases]
                         + crowd[2:])
    assert [h.tokens for h in handles[2:5]] == refs


def test_ignore_eos_runs_the_answer_to_its_length_in_both_loops(model):
    """Fixed-length decoding (the server benchmark's `ignore_eos`): the same tokens from Engine and Scheduler."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():  # <eos> is by far the likeliest token
        model.text_head.proj.weight[VOCAB.eos] += 5 * model.text_head.proj.weight.std()
    free = Engine(model).generate([[VOCAB.bos, 3]], 25, GREEDY, allow_images=False)
    text = Engine(model).generate([[VOCAB.bos, 3]], 25, GREEDY, allow_images=False, ignore_eos=True)
    assert free.finished[0] and len(free.tokens[0]) < 25  # left alone, it ends at <eos>
    assert len(text.tokens[0]) == 25 and not text.finished[0]
    s = Scheduler(Engine(model))
    try:
        h = s.generate([Request([VOCAB.bos, 3], 25, GREEDY, allow_images=False, ignore_eos=True)])[0]
    finally:
        s.close()
    assert h.tokens == text.tokens[0] and not h.finished