import torch
import torch.nn.functional as F

from nmm.config import ModelConfig
from nmm.modalities.base import split_codes
from nmm.model.model import NativeMultimodalModel, packed_causal_mask
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary

VOCAB = Vocabulary(50, (image_spec(24, (6, 4), 4),))


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, **kw)
    return NativeMultimodalModel(cfg, VOCAB).eval()


def test_forward_shapes_and_vocab_layout():
    m = small_model()
    ids = torch.randint(0, VOCAB.size, (3, 11))
    assert m(ids).shape == (3, 11, VOCAB.size)
    assert VOCAB.start("image") == 50 + 5 and VOCAB.size == 55 + 24


def test_factorised_loss_equals_joint_cross_entropy():
    m = small_model()
    h, codes = torch.randn(9, 32), torch.randint(0, 24, (9,))
    ce, _ = m.image_head.loss(h, codes, 0.0)
    joint = F.cross_entropy(m.image_head(h), codes, reduction="none")
    torch.testing.assert_close(ce, joint, atol=1e-5, rtol=1e-5)


def test_split_codes_inverts_join():
    codes = torch.arange(24)
    shape, colour = split_codes(codes, (6, 4))
    assert torch.equal(shape * 4 + colour, codes)


def test_packed_documents_do_not_see_each_other():
    m = small_model()
    a, b = torch.randint(0, VOCAB.size, (1, 5)), torch.randint(0, VOCAB.size, (1, 7))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    out = m(packed, positions, packed_causal_mask(doc_ids))
    torch.testing.assert_close(out[:, :5], m(a), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 5:], m(b), atol=1e-5, rtol=1e-4)


def test_loss_reports_each_modality_and_decreases():
    m = small_model().train()
    ids = torch.randint(0, VOCAB.size, (2, 16))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    pos, doc = torch.arange(16).expand(2, -1), torch.zeros(2, 16, dtype=torch.long)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, stats = m.loss(ids, targets, pos, doc, {"text": 1.0, "image": 1.0}, 1e-4)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"loss_text", "loss_image"} <= set(stats)
    assert loss.item() < 0.5 * first


def test_image_loss_weight_scales_only_image_tokens():
    m = small_model()
    ids = torch.full((1, 6), VOCAB.start("image") + 3)
    targets = torch.full((1, 6), VOCAB.start("image") + 1)
    pos, doc = torch.arange(6).unsqueeze(0), torch.zeros(1, 6, dtype=torch.long)
    l1, _ = m.loss(ids, targets, pos, doc, {"image": 1.0}, 0.0)
    l2, _ = m.loss(ids, targets, pos, doc, {"image": 2.0}, 0.0)
    torch.testing.assert_close(l2, 2 * l1)
