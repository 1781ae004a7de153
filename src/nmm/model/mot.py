"""Mixture-of-Transformers block (Liang et al. 2024, "Mixture-of-Transformers: A Sparse and Scalable
Architecture for Multi-Modal Foundation Models").

Every non-embedding parameter is modality-specific: each modality has its own attention norm, qkv
projection, q/k norms, output projection, FFN norm and SwiGLU FFN (a "tower"). The only thing the
modalities share is the self-attention itself: one global causal attention over the whole interleaved
sequence, so a text token still attends to image tokens and vice versa. Routing is by the token's
known modality, not learned, so there is no router and no balance loss (`aux_loss` is a zero tensor,
kept for the same interface as `MoEFeedForward`).

Compute per token equals a dense block's: tokens are sorted by modality, each modality's contiguous
slice goes through its own tower, and the results are permuted back (gather -> project -> scatter),
never every tower on every token. Given a `modality` tensor, every tower runs on every forward, possibly
on zero tokens, so all parameters are in the graph and DDP needs no `find_unused_parameters`
(with `modality=None` only tower 0 runs).

Parameter count: total = M * tower, active per token = tower (one modality's weights), where
    tower = 2*D (norms) + D*(H + 2*Hkv)*hd (q, k, v) + H*hd*D (out) + 2*hd (q/k norms, if qk_norm) + 3*D*F (FFN).
Attribute names inside a tower mirror `transformer.Block` (attn_norm, attn.wq/wk/wv, attn.wo, attn.q_norm,
attn.k_norm, ffn_norm, ffn.w_gate/w_up, ffn.w_down), so a dense Block's state_dict loads into each tower
(`block.towers[m].load_state_dict(dense.state_dict())`), and `init_weights` finds the residual output
projections by their `wo.weight` / `w_down.weight` suffixes.

Limitation: the per-modality slice sizes are data, read on the host once per forward (one sync; a graph
break under torch.compile). `modality=None` means "all modality 0" and skips the sort entirely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.config import ModelConfig
from nmm.model.layers import KVCache, RMSNorm, SwiGLU, apply_rope


class _AttentionWeights(nn.Module):
    """One modality's attention parameters (no forward: the attention itself is shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()


class _Tower(nn.Module):
    """All parameters of one modality, named like transformer.Block's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _AttentionWeights(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)


class MoTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, n_modalities: int = 2):
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.n_modalities = n_modalities
        self.towers = nn.ModuleList(_Tower(cfg) for _ in range(n_modalities))
        self.aux_loss = torch.zeros(())

    def active_params(self) -> int:
        """Parameters one token uses: one tower (see the module docstring)."""
        return sum(p.numel() for p in self.towers[0].parameters())

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, 1, T, hd/2)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, T, T_keys) bool, True = may attend; None = causal
        cache: KVCache | None = None,
        start: int = 0,  # cache slot of the first of these T tokens
        modality: torch.Tensor | None = None,  # (B, T) long in [0, n_modalities); None = all modality 0
    ) -> torch.Tensor:
        B, T, D = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        route = _ModalityRoute(modality, self.n_modalities)
        self.aux_loss = x.new_zeros((), dtype=torch.float32)

        # ---- per modality: attention norm, qkv projection, q/k norms --------------------------
        def pre_attention(tower: _Tower, xm: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, (H+2Hkv)*hd)
            xn = tower.attn_norm(xm)
            q, k, v = tower.attn.wq(xn), tower.attn.wk(xn), tower.attn.wv(xn)
            q = tower.attn.q_norm(q.unflatten(-1, (H, hd))).flatten(-2)  # the norms are per head
            k = tower.attn.k_norm(k.unflatten(-1, (Hkv, hd))).flatten(-2)
            return torch.cat([q, k, v], dim=-1)

        qkv = route.apply(self.towers, pre_attention, x.reshape(B * T, D))  # (B*T, (H+2Hkv)*hd)
        q, k, v = qkv.view(B, T, -1).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)

        # ---- shared: one global attention over the whole mixed sequence (as in transformer.Attention)
        q = apply_rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rope(k.view(B, T, Hkv, hd).transpose(1, 2), cos, sin)  # (B, Hkv, T, hd)
        v = v.reshape(B, T, Hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, Hkv, start+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B * T, H * hd)

        # ---- per modality: output projection + residual, FFN + residual (all per token) -----------
        def post_attention(tower: _Tower, xm: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
            h = xm + tower.attn.wo(ym)
            return h + tower.ffn(tower.ffn_norm(h))

        return route.apply(self.towers, post_attention, x.reshape(B * T, D), y).view(B, T, D)


class _ModalityRoute:
    """Sorts the B*T tokens by modality once, then runs any per-token function modality by modality."""

    def __init__(self, modality: torch.Tensor | None, n_modalities: int):
        self.trivial = modality is None
        if self.trivial:
            return
        mod = modality.reshape(-1)
        self.order = mod.argsort(stable=True)  # tokens of modality 0 first, then 1, ...
        self.inverse = self.order.argsort()
        counts = torch.zeros(n_modalities, dtype=torch.long, device=mod.device)
        counts.scatter_add_(0, mod, torch.ones_like(mod))
        self.sizes = counts.tolist()  # host sync: slice sizes are data

    def apply(self, towers: nn.ModuleList, fn, *tensors: torch.Tensor) -> torch.Tensor:
        """fn(tower_m, *rows of modality m) for every m; tensors are (N, ...) in token order; so is the result."""
        if self.trivial:
            return fn(towers[0], *tensors)
        # Gather each modality's rows into one contiguous slice (a permutation: deterministic backward).
        slices = [t[self.order].split(self.sizes) for t in tensors]
        # Every tower runs, even on an empty slice, so all parameters get a (zero) gradient.
        out = torch.cat([fn(tower, *parts) for tower, *parts in zip(towers, *slices)])
        return out[self.inverse]  # scatter back to token order
