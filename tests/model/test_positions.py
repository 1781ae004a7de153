"""M-RoPE (`model.rope=mrope`): (time, row, column) positions for image and clip codes, 1D elsewhere."""

import pytest
import torch

from nmm.config import ModelConfig
from nmm.errors import ConfigError
from nmm.infer.engine import Engine
from nmm.infer.sampling import SamplingConfig
from nmm.modalities.base import ModalitySpec
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel
from nmm.model.positions import mrope_positions

IMAGE = image_spec(12, (4, 3), 16, ((4,), (3,)))  # a 4 x 4 code grid
CLIP = ModalitySpec("video", "<bov>", "<eov>", 12, (4, 3), ((4,), (3,)), 2 * 4, "image/gif", (2, 2, 2))  # 2 frames of 2 x 2
VOCAB = Vocabulary(40, (IMAGE, CLIP))
SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96)


def model(rope: str, seed: int = 0) -> NativeMultimodalModel:
    torch.manual_seed(seed)
    return NativeMultimodalModel(ModelConfig(**SMALL, rope=rope), VOCAB).eval()


def sequence():
    image = [VOCAB.boi, *(VOCAB.start("image") + torch.arange(16) % 12).tolist(), VOCAB.eoi]
    clip = [VOCAB.begin("video"), *(VOCAB.start("video") + torch.arange(8)).tolist(), VOCAB.end("video")]
    return [VOCAB.bos, 5, 6, *image, 7, *clip, 8, 9]


def test_codes_get_time_row_column_and_everything_else_1d():
    ids = torch.tensor([sequence()])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    p3 = mrope_positions(ids, pos, VOCAB)[0]
    # text and specials: (p, p, p)
    for t in (0, 1, 2, 3, 20, 21, 22, 31, 32, 33):
        assert p3[t].tolist() == [t] * 3, t
    s = 4  # the image's first code
    for k in range(16):
        assert p3[s + k].tolist() == [s, s + k // 4, s + k % 4]
    s = 23  # the clip's first code: frame k // 4, row (k % 4) // 2, column k % 2
    for k in range(8):
        assert p3[s + k].tolist() == [s + k // 4, s + (k % 4) // 2, s + k % 2]


def test_codes_past_the_grid_keep_1d_positions():
    delta = ModalitySpec("video", "<bov>", "<eov>", 20, (), (), None, "image/gif", (1, 2, 2))  # a key frame of 2 x 2
    vocab = Vocabulary(40, (delta,))
    ids = torch.tensor([[vocab.bos, vocab.begin("video"), *(vocab.start("video") + torch.arange(7)).tolist()]])
    p3 = mrope_positions(ids, torch.arange(9).unsqueeze(0), vocab)[0]
    assert [p3[2 + k].tolist() for k in range(4)] == [[2, 2, 2], [2, 2, 3], [2, 3, 2], [2, 3, 3]]
    assert all(p3[t].tolist() == [t] * 3 for t in range(6, 9))


def test_mrope_on_text_is_exactly_1d_rope_and_differs_on_items():
    one, three = model("1d"), model("mrope")
    text = torch.tensor([[VOCAB.bos, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(one(text), three(text))  # every frequency turned by p: bit-identical
        items = torch.tensor([sequence()])
        assert not torch.allclose(one(items), three(items))


def test_cached_decoding_matches_the_uncached_forward_under_mrope():
    """The engine's prefill + decode steps (item starts carried in the caches) give the tokens that
    re-running the whole sequence gives, inside an image and a clip being written."""
    m = model("mrope", seed=1)
    engine = Engine(m)
    for name in ("image", "video"):
        prompt = [VOCAB.bos, 5, 6, VOCAB.begin(name)]
        n = VOCAB.spec(name).tokens_per_item
        res = engine.generate([prompt], n + 1, SamplingConfig(temperature=0), allow_images=(name,), stop_after_image=True)
        seq = list(prompt)
        lo, hi = VOCAB.range(name)
        with torch.no_grad():
            for _ in range(n):
                logits = m(torch.tensor([seq]))[0, -1]
                allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
                allowed[lo:hi] = True
                seq.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
        assert res.tokens[0][:n] == seq[len(prompt):], name


def test_a_bad_rope_config_is_named():
    with pytest.raises(ConfigError, match="model.rope"):
        ModelConfig(rope="4d")
    with pytest.raises(ConfigError, match="mrope_sections"):
        ModelConfig(**SMALL, rope="mrope", mrope_sections=[2, 2, 2])  # head_dim 8: 4 frequencies
    assert ModelConfig(**SMALL, rope="mrope").rope_sections == (1, 1, 2)
