import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmm.model.moe import MoEFeedForward, count_active_params, moe_param_counts
from nmm.model.layers import SwiGLU

D, H = 16, 32


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


def make(n_experts=4, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return MoEFeedForward(D, H, n_experts, top_k, **kw)


def batch(B=3, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randint(0, 2, (B, T), generator=g)


def reference(moe: MoEFeedForward, x, modality):
    """Brute force: every expert on every token, combined with the renormalised top-k gates."""
    xf = x.reshape(-1, D)
    logits = xf @ moe.router.weight.t()
    logits = logits.masked_fill(~moe.allowed[modality.reshape(-1)], float("-inf"))
    top_p, top_e = logits.softmax(-1).topk(moe.top_k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in range(moe.n_experts):
        gate, up = (xf @ moe.w_gate_up.weight[e]).chunk(2, -1)
        y = (F.silu(gate) * up) @ moe.w_down.weight[e]
        weight = (gates * (top_e == e)).sum(-1, keepdim=True)  # 0 where e was not chosen
        out = out + weight * y
    return out.view_as(x)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("experts", [None, [[0, 1], [2, 3]]])
def test_matches_brute_force_reference(impl, experts):
    moe = make(impl=impl, modality_experts=experts)
    x, mod = batch()
    out = moe(x, mod)
    assert out.shape == x.shape
    assert moe.aux_loss.shape == () and moe.expert_counts.shape == (2, 4)
    assert moe.expert_counts.dtype == torch.long and int(moe.expert_counts.sum()) == 2 * x.shape[0] * x.shape[1]
    torch.testing.assert_close(out, reference(moe, x, mod), atol=1e-5, rtol=1e-5)


def test_grouped_and_loop_agree_including_gradients():
    x, mod = batch()
    results = []
    for impl in ("grouped", "loop"):
        moe = make(impl=impl)
        xg = x.clone().requires_grad_()
        (moe(xg, mod).pow(2).mean() + moe.aux_loss).backward()
        results.append((xg.grad, moe.router.weight.grad, moe.w_gate_up.weight.grad, moe.w_down.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_aware_routing_never_leaves_the_modality_group():
    moe = make(modality_experts=[[0, 1], [2, 3]])
    with torch.no_grad():  # a router that would send every token to expert 3 if it could
        moe.router.weight.zero_()
        moe.router.weight[3] = 5.0
    x, mod = batch(B=4, T=32)
    moe(x.abs(), mod)
    counts = moe.expert_counts
    assert counts[0, 2:].sum() == 0 and counts[1, :2].sum() == 0
    assert counts[0].sum() == 2 * (mod == 0).sum() and counts[1].sum() == 2 * (mod == 1).sum()


def test_agnostic_routing_uses_several_experts_across_modalities():
    moe = make(n_experts=4, top_k=1)
    x, mod = batch(B=4, T=32)
    moe(x, mod)
    per_expert = moe.expert_counts.sum(0)
    assert (per_expert > 0).sum() >= 3
    assert moe.expert_counts[0].sum() == (mod == 0).sum()  # top-1: one assignment per token


@pytest.mark.parametrize("experts", [None, [[0, 1], [2, 3]]])
def test_balance_loss_is_one_for_uniform_router_and_larger_when_collapsed(experts):
    w = 0.01
    moe = make(top_k=1, modality_experts=experts, balance_weight=w, router_z_weight=0.0)
    x, mod = batch(B=4, T=32)
    with torch.no_grad():
        moe.router.weight.zero_()  # every allowed expert equally likely
    moe(x, mod)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(w))

    with torch.no_grad():  # one expert per routing group wins every token by far
        for e in [0] if experts is None else [0, 2]:
            moe.router.weight[e, 0] = 50.0
    x[..., 0] = 1.0
    moe(x, mod)
    group = 4 if experts is None else 2
    assert moe.aux_loss.item() > 0.9 * group * w  # collapsed: E_group * f * P with f = P = 1


def test_router_z_loss_term():
    moe = make(balance_weight=0.0, router_z_weight=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
    x, mod = batch()
    moe(x, mod)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(4.0).log().pow(2))  # logsumexp of 4 zeros = log 4


def test_padding_is_excluded_from_stats_and_aux_loss():
    moe = make(modality_experts=[[0, 1], [2, 3]])
    x, mod = batch(B=1, T=12)
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[:, :7] = True
    out = moe(x, mod, valid)
    aux, counts = moe.aux_loss, moe.expert_counts
    out_ref = moe(x[:, :7], mod[:, :7])
    torch.testing.assert_close(out[:, :7], out_ref)  # padding never changes other tokens' outputs
    torch.testing.assert_close(aux, moe.aux_loss)
    assert torch.equal(counts, moe.expert_counts) and int(counts.sum()) == 2 * 7


def test_gradients_reach_router_and_experts():
    moe = make(n_experts=4, top_k=2)
    x, mod = batch(B=4, T=16)
    out = moe(x, mod)
    (out.pow(2).mean() + moe.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    used = moe.expert_counts.sum(0) > 0
    assert used.sum() >= 2
    assert (moe.w_gate_up.weight.grad.flatten(1).abs().sum(1)[used] > 0).all()
    assert (moe.w_down.weight.grad.flatten(1).abs().sum(1)[used] > 0).all()

    moe.zero_grad()
    moe(x, mod).sum().backward()  # an expanded (zero-stride) output gradient must work too
    assert moe.w_gate_up.weight.grad.abs().sum() > 0

    moe.zero_grad()
    moe(x, mod)
    moe.aux_loss.backward()  # the aux loss alone trains the router (through P and the z-loss)
    assert moe.router.weight.grad.abs().sum() > 0


def test_single_expert_top1_equals_plain_swiglu():
    torch.manual_seed(0)
    dense = SwiGLU(D, H)
    moe = MoEFeedForward(D, H, n_experts=1, top_k=1)
    with torch.no_grad():
        moe.w_gate_up.weight[0] = torch.cat([dense.w_gate.weight, dense.w_up.weight]).t()  # nn.Linear stores (out, in)
        moe.w_down.weight[0] = dense.w_down.weight.t()
    x, mod = batch()
    torch.testing.assert_close(moe(x, mod), dense(x), atol=1e-6, rtol=1e-5)


def test_deterministic():
    x, mod = batch(B=4, T=16)
    grads = []
    for _ in range(2):
        moe = make()
        out = moe(x, mod)
        (out.pow(2).mean() + moe.aux_loss).backward()
        grads.append((out, moe.router.weight.grad, moe.w_gate_up.weight.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bf16_autocast():
    moe = make(modality_experts=[[0, 1], [2, 3]])
    x, mod = batch(B=4, T=16)
    ref = moe(x, mod)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, mod)
        (out.float().pow(2).mean() + moe.aux_loss).backward()
    assert out.dtype == torch.bfloat16 and moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    assert int(moe.expert_counts.sum()) == 2 * 4 * 16  # exact integer counts under autocast
    assert moe.w_down.weight.grad.dtype == torch.float32


def test_param_counts():
    moe = make(n_experts=4, top_k=2)
    total, active = moe_param_counts(D, H, 4, 2)
    assert total == sum(p.numel() for p in moe.parameters())
    assert active == moe.active_params() == D * 4 + 2 * 3 * D * H
    model = nn.ModuleDict({"embed": nn.Embedding(10, D), "ffn": moe})
    assert count_active_params(model) == 10 * D + active


def test_bad_configs():
    with pytest.raises(ValueError):
        MoEFeedForward(D, H, 4, top_k=3, modality_experts=[[0, 1], [2, 3]])  # group smaller than top_k
    with pytest.raises(ValueError):
        MoEFeedForward(D, H, 4, top_k=1, modality_experts=[[0, 1]])  # one list per modality
    with pytest.raises(ValueError):
        MoEFeedForward(D, H, 4, top_k=1, modality_experts=[[0, 4], [1]])  # expert out of range


def test_training_lowers_loss_on_modality_dependent_target():
    torch.manual_seed(0)
    moe = MoEFeedForward(D, H, n_experts=4, top_k=1, modality_experts=[[0, 1], [2, 3]])
    maps = torch.randn(2, D, D) / D**0.5  # the target map depends on the modality
    step_fn = adam(moe.parameters(), lr=1e-2)
    losses = []
    for step in range(100):
        x, mod = batch(B=8, T=16, seed=step)
        target = torch.einsum("btd,btde->bte", x, maps[mod])
        loss = F.mse_loss(moe(x, mod), target)
        (loss + moe.aux_loss).backward()
        step_fn(step + 1)
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # A predictor blind to modality can do no better than the average map: this much error remains.
    blind_floor = ((maps[0] - maps[1]) / 2).pow(2).sum() / D
    assert last < 0.5 * first and last < 0.9 * blind_floor
