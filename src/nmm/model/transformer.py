"""The backbone: a decoder-only transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU, QK-norm;
the layers are in `nmm.model.layers`).

Two design axes live here. `routing` picks the block (`BLOCKS`): dense SwiGLU, a mixture of
experts (modality-agnostic or modality-aware routing) or a mixture-of-transformers block with
per-modality weights; every block takes the per-position modality ids. Mid fusion adds a gated
cross-attention layer (Flamingo) after every `cross_attn_every` blocks, reading image features
that the model passes in as `memory`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.config import ModelConfig
from nmm.model.layers import Block, KVCache, RMSNorm, SwiGLU, rope_tables
from nmm.model.moe import MoEFeedForward
from nmm.model.mot import MoTBlock
from nmm.model.positions import rope_at


def modality_expert_groups(n_experts: int, modalities: tuple[str, ...], listed: dict[str, list[int]]) -> list[list[int]]:
    """Modality-aware routing: which experts each modality (in vocabulary order) may use. The
    config may list them by name; unlisted, the experts are split into equal contiguous groups."""
    if listed:
        missing = [m for m in modalities if m not in listed]
        if missing:
            raise ValueError(f"model.moe.modality_experts lists no experts for {', '.join(missing)}")
        return [list(listed[m]) for m in modalities]
    M = len(modalities)
    return [list(range(i * n_experts // M, (i + 1) * n_experts // M)) for i in range(M)]


def _moe_block(cfg: ModelConfig, modalities: tuple[str, ...], aware: bool) -> Block:
    m = cfg.moe
    groups = modality_expert_groups(m.n_experts, modalities, m.modality_experts) if aware else None
    ffn = MoEFeedForward(cfg.d_model, m.expert_hidden or cfg.ffn_hidden, m.n_experts, m.top_k,
                         n_modalities=len(modalities), modality_experts=groups, balance_weight=m.balance_weight,
                         router_z_weight=m.router_z_weight)
    return Block(cfg, ffn)


def _mot_block(cfg: ModelConfig, modalities: tuple[str, ...]) -> nn.Module:
    return MoTBlock(cfg, n_modalities=len(modalities))


# routing -> block factory (config, modality names in vocabulary order). A new routing scheme is a
# module, a line here and a preset.
BLOCKS = {
    "dense": lambda cfg, modalities: Block(cfg),
    "moe": lambda cfg, modalities: _moe_block(cfg, modalities, aware=False),
    "moe-aware": lambda cfg, modalities: _moe_block(cfg, modalities, aware=True),
    "mot": _mot_block,
}


class GatedCrossAttention(nn.Module):
    """Flamingo's gated xattn-dense layer: text positions read image features through cross-attention
    and an FFN, each behind a tanh gate initialised at 0, so the layer starts as the identity and the
    language model is undisturbed until the gates learn to open."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, T, D); memory (B, M, D) image features; mask (B, 1, T, M)
        B, T, D = x.shape
        q = self.wq(self.norm(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(memory).view(B, -1, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
        x = x + torch.tanh(self.attn_gate) * self.wo(y)
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


class LayerCaches(list):
    """One `KVCache` per block, plus what must be kept between decode steps: mid fusion's image
    features of the prompt (`memory`, `memory_slot`, `memory_valid`, set at prefill) and, with
    M-RoPE, where each row's open item started (`item_start`: modality -> (rows,), see
    nmm.model.positions)."""

    memory: torch.Tensor | None = None
    memory_slot: torch.Tensor | None = None
    memory_valid: torch.Tensor | None = None

    def __init__(self, *args):
        super().__init__(*args)
        self.item_start: dict[str, torch.Tensor] = {}


class Transformer(nn.Module):
    """Blocks + final norm over embeddings; embeddings and heads live in `NativeMultimodalModel`."""

    def __init__(self, cfg: ModelConfig, modalities: tuple[str, ...] = ("text", "image")):
        super().__init__()
        self.cfg, self.modalities = cfg, tuple(modalities)
        self.blocks = nn.ModuleList(BLOCKS[cfg.routing](cfg, self.modalities) for _ in range(cfg.n_layers))
        k = cfg.cross_attn_every
        n_xattn = cfg.n_layers // k if cfg.uses_cross_attention else 0
        self.cross_attn = nn.ModuleList(GatedCrossAttention(cfg) for _ in range(n_xattn))  # after blocks k-1, 2k-1, ...
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, D) input embeddings
        positions: torch.Tensor,  # (B, T) RoPE position of each token, or (B, T, 3) with model.rope=mrope
        mask: torch.Tensor | None = None,  # (B, 1, T, T_keys) bool, True = may attend; None = causal
        caches: list[KVCache] | None = None,
        start: int = 0,  # cache slot of the first of these T tokens
        modality: torch.Tensor | None = None,  # (B, T) long, index into self.modalities: read by MoE / MoT
        memory: torch.Tensor | None = None,  # (B, M, D) image features for the cross-attention layers
        memory_mask: torch.Tensor | None = None,  # (B, 1, T, M) bool
    ) -> torch.Tensor:
        # Positions must be < max_seq_len; callers check lengths (a check here would break torch.compile graphs).
        # (B, T) 1D positions, or (B, T, 3) M-RoPE positions (nmm.model.positions).
        sections = self.cfg.rope_sections
        cos = rope_at(self.rope_cos, positions, sections).unsqueeze(1).to(h.dtype)  # (B, 1, T, hd/2)
        sin = rope_at(self.rope_sin, positions, sections).unsqueeze(1).to(h.dtype)
        k = self.cfg.cross_attn_every
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, mask, caches[i] if caches is not None else None, start, modality)
            if memory is not None and (i + 1) % k == 0 and (i + 1) // k <= len(self.cross_attn):
                h = self.cross_attn[(i + 1) // k - 1](h, memory, memory_mask)
        return self.norm(h)  # (B, T, D)

    def make_caches(self, batch: int, max_len: int, dtype, device) -> LayerCaches:
        cfg = self.cfg
        return LayerCaches(
            KVCache(batch, cfg.n_kv_heads, max_len, cfg.d_model // cfg.n_heads, dtype, device)
            for _ in range(cfg.n_layers)
        )
