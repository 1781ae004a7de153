import pytest
import torch
import torch.nn.functional as F

from nmm.config import ModelConfig
from nmm.model.model import packed_causal_mask
from nmm.model.moe import count_active_params
from nmm.model.mot import MoTBlock
from nmm.model.layers import Block, KVCache, rope_tables

D = 32


def adam(params, lr: float):
    """Plain Adam, hand-rolled: the first torch.optim optimizer imports torch._dynamo, which alone
    costs seconds on a small CPU. Returns step(t) for t = 1, 2, ... (also clears the gradients)."""
    params = list(params)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(t: int):
        for p, (m, v) in zip(params, moments):
            m.lerp_(p.grad, 0.1)
            v.lerp_(p.grad.square(), 0.001)
            p -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            p.grad = None

    return step


def config(**kw):
    base = {"d_model": D, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 64}
    return ModelConfig(**{**base, **kw})


def rope(cfg, positions):
    """cos/sin exactly as transformer.Transformer builds them: (B, 1, T, hd/2)."""
    cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def inputs(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randint(0, 2, (B, T), generator=g)


def mot_like(block: Block, cfg) -> MoTBlock:
    """A MoT block whose every tower carries the dense block's weights."""
    mot = MoTBlock(cfg)
    for tower in mot.towers:
        tower.load_state_dict(block.state_dict())
    return mot


def test_shapes_and_aux_loss():
    mot = MoTBlock(config())
    x, mod = inputs()
    cos, sin = rope(config(), torch.arange(12).expand(2, -1))
    out = mot(x, cos, sin, None, modality=mod)
    assert out.shape == x.shape
    assert mot.aux_loss.shape == () and mot.aux_loss.item() == 0.0


@pytest.mark.parametrize("kw", [{}, {"qk_norm": False}, {"n_kv_heads": 4}, {"n_kv_heads": 1}])
def test_identical_towers_equal_dense_block(kw):
    cfg = config(**kw)
    torch.manual_seed(0)
    block = Block(cfg)
    mot = mot_like(block, cfg)
    x, mod = inputs(T=14)
    # Packed documents with padding: exercises an explicit mask, restarting positions and mixed modalities.
    doc = torch.tensor([[0] * 6 + [1] * 8, [0] * 11 + [-1] * 3])
    pos = torch.tensor([list(range(6)) + list(range(8)), list(range(11)) + [0] * 3])
    cos, sin = rope(cfg, pos)
    mask = packed_causal_mask(doc)
    torch.testing.assert_close(mot(x, cos, sin, mask, modality=mod), block(x, cos, sin, mask))
    cos, sin = rope(cfg, torch.arange(14).expand(2, -1))
    torch.testing.assert_close(mot(x, cos, sin, None, modality=mod), block(x, cos, sin, None))


def test_modality_none_means_all_modality_zero():
    cfg = config()
    mot = MoTBlock(cfg)
    x, _ = inputs()
    cos, sin = rope(cfg, torch.arange(12).expand(2, -1))
    zeros = torch.zeros(2, 12, dtype=torch.long)
    torch.testing.assert_close(mot(x, cos, sin, None), mot(x, cos, sin, None, modality=zeros))


def test_tokens_use_their_own_modality_weights():
    cfg = config()
    torch.manual_seed(0)
    mot = MoTBlock(cfg)
    x, mod = inputs()
    cos, sin = rope(cfg, torch.arange(12).expand(2, -1))
    before = mot(x, cos, sin, None, modality=mod)
    with torch.no_grad():  # the FFN is per token: changing modality 0's FFN moves only modality-0 outputs
        mot.towers[0].ffn.w_down.weight.mul_(2.0)
    after = mot(x, cos, sin, None, modality=mod)
    changed = (after - before).abs().amax(-1) > 1e-6  # (B, T)
    assert torch.equal(changed, mod == 0)


def test_cached_decode_equals_full_forward():
    cfg = config()
    torch.manual_seed(0)
    mot = MoTBlock(cfg).eval()
    B, T, prefill = 2, 12, 5
    x, mod = inputs(B, T)
    pos = torch.arange(T).expand(B, -1)
    cos, sin = rope(cfg, pos)
    full = mot(x, cos, sin, None, modality=mod)

    cache = KVCache(B, cfg.n_kv_heads, T, cfg.d_model // cfg.n_heads, torch.float32, "cpu")
    causal = torch.ones(prefill, prefill, dtype=torch.bool).tril().expand(B, 1, -1, -1)
    outs = [mot(x[:, :prefill], cos[:, :, :prefill], sin[:, :, :prefill], causal, cache, 0, mod[:, :prefill])]
    for t in range(prefill, T):  # one token per step, attending to every cached slot (as infer.engine does)
        mask = torch.ones(B, 1, 1, t + 1, dtype=torch.bool)
        step = slice(t, t + 1)
        outs.append(mot(x[:, step], cos[:, :, step], sin[:, :, step], mask, cache, t, mod[:, step]))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_every_tower_gets_gradients_even_when_its_modality_is_absent():
    cfg = config()
    mot = MoTBlock(cfg)
    x, mod = inputs()
    cos, sin = rope(cfg, torch.arange(12).expand(2, -1))
    mot(x, cos, sin, None, modality=mod).pow(2).mean().backward()
    for tower in mot.towers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    mot.zero_grad(set_to_none=True)
    mot(x, cos, sin, None, modality=torch.zeros_like(mod)).pow(2).mean().backward()
    # Tower 1 saw no tokens: zero gradients, but present (DDP needs every parameter in the graph).
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in mot.towers[1].parameters())


def test_bf16_autocast():
    cfg = config()
    torch.manual_seed(0)
    mot = MoTBlock(cfg)
    x, mod = inputs()
    cos, sin = rope(cfg, torch.arange(12).expand(2, -1))
    ref = mot(x, cos, sin, None, modality=mod)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mot(x, cos, sin, None, modality=mod)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_param_counts():
    cfg = config()
    mot = MoTBlock(cfg)
    dense = sum(p.numel() for p in Block(cfg).parameters())
    assert sum(p.numel() for p in mot.parameters()) == 2 * dense
    assert mot.active_params() == dense and count_active_params(mot) == dense
    names = [n for n, _ in mot.named_parameters()]
    assert sum(n.endswith("wo.weight") for n in names) == 2 and sum(n.endswith("w_down.weight") for n in names) == 2


def test_training_lowers_loss_on_modality_dependent_target():
    cfg = config()
    torch.manual_seed(0)
    mot = MoTBlock(cfg)
    maps = torch.randn(2, D, D) / D**0.5  # the target map depends on the modality
    step_fn = adam(mot.parameters(), lr=1e-2)
    cos, sin = rope(cfg, torch.arange(16).expand(4, -1))
    losses = []
    for step in range(100):
        x, mod = inputs(B=4, T=16, seed=step)
        target = torch.einsum("btd,btde->bte", x, maps[mod])
        loss = F.mse_loss(mot(x, cos, sin, None, modality=mod), target)
        loss.backward()
        step_fn(step + 1)
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # A predictor blind to modality can do no better than the average map: this much error remains.
    blind_floor = ((maps[0] - maps[1]) / 2).pow(2).sum() / D
    assert last < 0.5 * first and last < 0.9 * blind_floor
