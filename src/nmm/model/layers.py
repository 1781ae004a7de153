"""The backbone's layers: RMSNorm, RoPE, a static KV cache, grouped-query attention, SwiGLU and the
dense block. Every block variant (`transformer.BLOCKS`: dense, MoE, MoT) is built from these.
Chameleon's per-head LayerNorm QK-norm and its swin norm order are options (`ModelConfig.qk_norm_kind`,
`norm_order`), so imported checkpoints (nmm.interop) run on the same layers.

Every sequence position carries its own RoPE position and the caller supplies the attention mask,
so one code path serves packed training (positions restart at each document, block-diagonal
causal mask), left-padded batched generation, and decoding with a static `KVCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class PerHeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with its own weight and bias per head: Chameleon's QK-norm
    (`model.qk_norm_kind=layernorm-per-head`). Its statistics are per head, its affine parameters are
    not shared: Chameleon trained with tensor parallelism and never reduced them across shards. The
    parameters are stored flat, (heads * head_dim,), so `init_weights`, which initialises every 2-D
    parameter as a matrix, leaves them at 1 and 0. eps is Chameleon's, fixed at 1e-5 (its code does
    not read it from the config)."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, heads, T, hd) -> same
        x = F.layer_norm(x, (self.head_dim,), None, None, self.eps)
        return x * self.weight.view(-1, 1, self.head_dim) + self.bias.view(-1, 1, self.head_dim)


def qk_norm(cfg: ModelConfig, heads: int, head_dim: int) -> nn.Module:
    """The norm applied to q (or k) of `heads` heads before RoPE, as `cfg` asks (identity without QK-norm)."""
    if not cfg.qk_norm:
        return nn.Identity()
    if cfg.qk_norm_kind == "layernorm-per-head":
        return PerHeadLayerNorm(heads, head_dim)
    return RMSNorm(head_dim, cfg.norm_eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd/2). Rotate-half convention, as in Llama.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, n_kv_heads, max_len, head_dim).

    Static shapes keep decoding free of reallocations (and friendly to torch.compile); the
    attention mask, not the cache, decides which slots a query may see.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        # Separate q, k and v projections (not one fused matrix) so tensor parallelism can shard each
        # by heads (`nmm.train.parallel`); a fused [q|k|v] would split across ranks in the wrong places.
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = qk_norm(cfg, cfg.n_heads, self.head_dim)
        self.k_norm = qk_norm(cfg, cfg.n_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape  # (B, T, D)
        # Head counts come from the projections' widths (-1): under tensor parallelism a rank holds
        # H / tp query heads and Hkv / tp key/value heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, Hkv, start+T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Two matrices, not one fused [gate|up]: tensor parallelism shards each along the hidden width.
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, modality=None):  # modality: unused, the signature every FFN shares
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn if ffn is not None else SwiGLU(cfg.d_model, cfg.ffn_hidden)
        # Chameleon's swin_norm (model.norm_order=swin) normalises each sublayer's output instead of its input.
        self.swin = cfg.norm_order == "swin"

    def forward(self, x, cos, sin, mask, cache=None, start=0, modality=None):
        if self.swin:
            x = x + self.attn_norm(self.attn(x, cos, sin, mask, cache, start))
            return x + self.ffn_norm(self.ffn(x, modality))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start)
        return x + self.ffn(self.ffn_norm(x), modality)
