"""The decoding state machine (nmm.infer.decoding), built from the vocabulary's modality specs alone: the ids
each state allows, forced ends of fixed-length items, variable-length items ended by a sampled end token,
`<eos>` suppression; driven with fake logits (no model) over text + image + a made-up variable-length modality,
then through Engine and Scheduler on a random model over that vocabulary."""

import pytest
import torch

from nmm.config import ModelConfig
from nmm.infer.decoding import (
    CHANGED,
    CLOSED,
    EOS,
    TEXT,
    CannotGenerate,
    Decoder,
    codes_phase,
    end_phase,
)
from nmm.modalities.base import ModalitySpec
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary

TOY = ModalitySpec("toy", "<bot>", "<eot>", codes=7, tokens_per_item=None)  # variable length
VOCAB = Vocabulary(40, (image_spec(12, (4, 3), 5), TOY))
IMG, TOYK = VOCAB.index("image"), VOCAB.index("toy")  # 1, 2


def ids(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


def test_allowed_ids_per_state():
    v, dec = VOCAB, Decoder(VOCAB)
    allowed = dec.allowed()
    assert allowed.shape == (5, v.size) and dec.n_phases == 5
    text = set(range(v.n_text)) | {v.eos, v.boi, v.begin("toy")}
    assert ids(allowed[TEXT]) == text  # not <pad>, <bos>, nor any end token or code
    assert ids(allowed[codes_phase(IMG)]) == set(range(*v.range("image")))  # fixed length: codes only
    assert ids(allowed[end_phase(IMG)]) == {v.eoi}
    assert ids(allowed[codes_phase(TOYK)]) == set(range(*v.range("toy"))) | {v.end("toy")}  # codes or its end
    # the request's choices: which modalities it may open, whether it may end
    assert ids(dec.allowed(allow=False)[TEXT]) == set(range(v.n_text)) | {v.eos}
    assert ids(dec.allowed(allow=["toy"], eos=False)[TEXT]) == set(range(v.n_text)) | {v.begin("toy")}
    # what the model can write: a modality without a head is never opened, whatever the request says
    images_only = Decoder(VOCAB, emits=["image"])
    assert ids(images_only.allowed(allow=True)[TEXT]) == set(range(v.n_text)) | {v.eos, v.boi}
    assert images_only.emits == ("image",) and Decoder(VOCAB, emits=["toy", "image"]).emits == ("image", "toy")
    with pytest.raises(KeyError):
        Decoder(VOCAB, emits=["audio"])
    # the additive table: 0 where allowed, -inf elsewhere, built once per setting
    table = dec.table(True, False)
    assert table is dec.table(True, False) and torch.equal(table == 0, dec.allowed(True, False))
    assert torch.isinf(table[~dec.allowed(True, False)]).all()


def test_fixed_length_item_forces_its_end_then_text():
    v, dec = VOCAB, Decoder(VOCAB)
    s = dec.start([v.bos, 3])
    assert s.phase == TEXT and dec.forced(s.phase) is None
    assert dec.advance(s, 7) == 0
    assert dec.advance(s, v.boi) == CHANGED and s.phase == codes_phase(IMG) and s.remaining == 5
    code = v.start("image")
    for i in range(4):
        assert dec.advance(s, code + i) == 0 and s.phase == codes_phase(IMG)
    assert dec.advance(s, code + 4) == CHANGED  # the 5th code: only <eoi> may follow, no head needed
    assert s.phase == end_phase(IMG) and dec.forced(s.phase) == v.eoi
    assert dec.advance(s, v.eoi) == CHANGED | CLOSED and s.phase == TEXT
    assert dec.advance(s, v.eos) == EOS


def test_prompts_that_open_an_item():
    v, dec = VOCAB, Decoder(VOCAB)
    code = v.start("image")
    assert dec.start([v.bos, v.boi]).remaining == 5
    s = dec.start([v.bos, v.boi, code, code + 1])  # two codes given: three to come
    assert s.phase == codes_phase(IMG) and s.remaining == 3
    assert dec.start([v.bos, v.boi, *[code] * 5]).phase == end_phase(IMG)
    assert dec.start([v.bos, v.boi, *[code] * 5, v.eoi]).phase == TEXT
    assert dec.start([v.bos, code, code]).phase == TEXT  # codes without their begin token: not an open item
    assert dec.start([v.bos, v.begin("toy"), v.start("toy")]).phase == codes_phase(TOYK)
    assert dec.start([]).phase == TEXT
    with pytest.raises(CannotGenerate, match="cannot generate toy"):
        Decoder(VOCAB, emits=["image"]).check_prompt([v.bos, v.begin("toy")])


def run(dec: Decoder, prompt: list[int], steps: int, logits_fn, allow=True, eos_from: int = 0) -> tuple[list, list]:
    """Greedy decoding of fake logits through the state machine: (tokens, flags)."""
    state, tokens, flags = dec.start(prompt), [], []
    for t in range(steps):
        logits = logits_fn(t, state)
        if dec.forced(state.phase) is not None:
            tok = dec.forced(state.phase)
        else:
            tok = int(dec.mask(logits[None], [state], allow, eos=t >= eos_from)[0].argmax())
        f = dec.advance(state, tok)
        tokens.append(tok)
        flags.append(f)
        if f & EOS:
            break
    return tokens, flags


def test_variable_length_item_ends_on_a_sampled_end_token():
    v, dec = VOCAB, Decoder(VOCAB)
    lo, _ = v.range("toy")
    eot = v.end("toy")

    def logits(t, state):  # toy codes for 4 steps, then <eot> is the likeliest id; <eos> once back in text
        x = torch.zeros(v.size)
        x[lo + t % 7] = 5.0
        x[eot] = 10.0 if t >= 4 else -10.0
        x[v.eos] = 20.0 if state.phase == TEXT else 0.0
        return x

    tokens, flags = run(dec, [v.bos, v.begin("toy")], 20, logits)
    assert tokens == [lo, lo + 1, lo + 2, lo + 3, eot, v.eos]
    assert flags == [0, 0, 0, 0, CHANGED | CLOSED, EOS]
    # <eot> is never allowed in text, nor <eos> inside the item
    tokens, _ = run(dec, [v.bos], 3, lambda t, s: torch.zeros(v.size).index_fill_(0, torch.tensor([eot]), 9.0))
    assert eot not in tokens


def test_ignore_eos_and_min_new_tokens():
    v, dec = VOCAB, Decoder(VOCAB)

    def eos_first(t, state):
        x = torch.randn(v.size, generator=torch.Generator().manual_seed(t))
        x[v.eos] = 100.0
        return x

    assert run(dec, [v.bos], 10, eos_first)[0] == [v.eos]
    tokens, _ = run(dec, [v.bos], 10, eos_first, eos_from=4)  # min_new_tokens=4
    assert len(tokens) == 5 and tokens[-1] == v.eos and v.eos not in tokens[:4]
    tokens, _ = run(dec, [v.bos], 10, eos_first, eos_from=10)  # ignore_eos: never
    assert len(tokens) == 10 and v.eos not in tokens


def well_formed(tokens: list[int], v: Vocabulary) -> int:
    """Every <boi> is followed by exactly N image codes and <eoi>, every <bot> by toy codes and <eot>; no codes
    or end tokens elsewhere. Returns the number of items."""
    i, items = 0, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in (v.boi, v.begin("toy")):
            name = "image" if tok == v.boi else "toy"
            items += 1
            j = i + 1
            while j < len(tokens) and bool(v.is_modality(name, torch.tensor(tokens[j]))):
                j += 1
            if name == "image":
                assert j - i - 1 == v.tokens_per_image or j == len(tokens)
            assert j == len(tokens) or tokens[j] == v.end(name)
            i = j + 1
        else:
            assert tok < v.n_text or tok == v.eos, tok
            i += 1
    return items


def test_random_logits_stay_well_formed_over_three_modalities():
    v, dec = VOCAB, Decoder(VOCAB)
    gen = torch.Generator().manual_seed(0)
    opened = 0
    for seed in range(20):
        def logits(t, state):
            x = torch.randn(v.size, generator=gen)
            x[[v.boi, v.begin("toy")]] += 2.0  # open items often
            x[v.end("toy")] += 1.0
            return x
        tokens, _ = run(dec, [v.bos], 60, logits, eos_from=60)
        opened += well_formed(tokens, v)
    assert opened > 20


@pytest.fixture(scope="module")
def toy_model():
    from nmm.model.model import NativeMultimodalModel

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    m = NativeMultimodalModel(cfg, VOCAB).eval()
    with torch.no_grad():  # open toy items now and then, and have the (random) end head close them
        m.text_head.proj.weight[VOCAB.begin("toy")] += m.text_head.proj.weight.std()
        m.modalities["toy"].end_head.weight.copy_(3 * m.text_head.proj.weight[VOCAB.end("toy")])
    return m


def test_engine_and_scheduler_write_a_variable_length_modality(toy_model):
    """A model over text + image + toy (the model gives toy discrete codes): toy items end when the model samples
    <eot>, images after exactly N codes; greedy Scheduler == Engine."""
    from nmm.infer.engine import Engine
    from nmm.infer.sampling import SamplingConfig
    from nmm.infer.scheduler import Request, Scheduler

    v, engine = VOCAB, Engine(toy_model)
    assert engine.decoder.emits == ("image", "toy")
    bot = v.begin("toy")
    prompts = [[v.bos, 3, bot], [v.bos, 5], [v.bos, 1, v.boi]]
    greedy = engine.generate(prompts, 30, SamplingConfig(temperature=0))
    assert v.end("toy") in greedy.tokens[0]  # the toy item ended itself
    sampled = engine.generate(prompts * 4, 30, SamplingConfig(temperature=1.0, seed=0))
    items = sum(well_formed([p[-1]] + t if p[-1] in (bot, v.boi) else t, v) for p, t in zip(prompts * 4, sampled.tokens))
    assert items > 4
    scheduler = Scheduler(engine)
    try:
        handles = scheduler.generate([Request(p, 30, SamplingConfig(temperature=0)) for p in prompts])
        assert [h.tokens for h in handles] == greedy.tokens
        text_only = scheduler.generate([Request([v.bos, 2], 30, SamplingConfig(temperature=1.5, seed=i),
                                                allow_images=["image"]) for i in range(4)])
        assert all(bot not in h.tokens for h in text_only)
    finally:
        scheduler.close()
