"""Emu3's VQ-VAE (encoder, quantiser, decoder), ported to plain torch with transformers' module names
(`Emu3VQVAE*`), so the weights of an imported Emu3 load by name; `nmm.interop.emu3.Emu3VQCodec` wraps it
as nmm's image codec. Only the network is here: configuration, token layout and the codec contract
are in `emu3.py`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nmm.interop.common import Downsample, Upsample, swish

if TYPE_CHECKING:
    from nmm.interop.emu3 import Emu3VQConfig


class Conv3d(nn.Module):
    """transformers' `Emu3VQVAEConv3d`: 'same' spatial padding, two frames of causal temporal padding."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        pads = [k - s for k, s in zip(kernel[1:], stride[1:])]
        self.padding: tuple[int, ...] = ()
        for p in pads[::-1]:
            self.padding += (p // 2 + p % 2, p // 2)
        self.padding += (2, 0)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.padding))


class _GroupNorm(nn.GroupNorm):
    """GroupNorm that takes (and ignores) the quantised latents a `_SpatialNorm` in its place would use."""

    def forward(self, x, quant=None):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _SpatialNorm(nn.Module):
    def __init__(self, quant_channels: int, channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv_y = nn.Conv2d(quant_channels, channels, 1)
        self.conv_b = nn.Conv2d(quant_channels, channels, 1)

    def forward(self, x, quant):
        quant = F.interpolate(quant, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(quant) + self.conv_b(quant)


def _norm(channels: int, quant_channels: int | None) -> nn.Module:
    return _GroupNorm(32, channels, eps=1e-6) if quant_channels is None else _SpatialNorm(quant_channels, channels)


class _ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, quant_channels: int | None = None):
        super().__init__()
        self.norm1 = _norm(c_in, quant_channels)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, quant_channels)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, quant=None):
        h = self.conv1(swish(self.norm1(x, quant)))
        h = self.conv2(swish(self.norm2(h, quant)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _TemporalResnetBlock(nn.Module):
    """BatchNorm3d (always its running statistics: the tokenizer is frozen) and causal 3D convolutions."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(c_in)
        self.conv1 = Conv3d(c_in, c_out, (3, 3, 3), (1, 1, 1))
        self.norm2 = nn.BatchNorm3d(c_out)
        self.conv2 = Conv3d(c_out, c_out, (3, 3, 3), (1, 1, 1))
        self.nin_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    @staticmethod
    def _bn(norm: nn.BatchNorm3d, x):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)

    def forward(self, x):
        h = self.conv1(swish(self._bn(self.norm1, x)))
        h = self.conv2(swish(self._bn(self.norm2, h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _TemporalDownsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = Conv3d(c_in, c_out, (4, 3, 3), (2, 1, 1))

    def forward(self, x):
        return self.conv(x)


class _TemporalUpsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = Conv3d(c_in, c_out, (3, 3, 3), (1, 1, 1))

    def forward(self, x):  # (B, C, T, H, W) -> (B, C, 2T, H, W): frames repeated, then a causal conv
        B, C, T, H, W = x.shape
        x = x.permute(0, 1, 3, 4, 2).contiguous().view(B, -1, T)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = x.view(B, C, H, W, -1).permute(0, 1, 4, 2, 3).contiguous()
        return self.conv(x)


class _Attention(nn.Module):
    """transformers' `Emu3VQVAEAttentionBlock` through SDPA (its default attention implementation)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):  # (B, L, C)
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale, is_causal=False)
        return self.out_proj(out.transpose(1, 2).contiguous().reshape(B, L, -1).contiguous())


def _attend(attn: _Attention, norm: nn.Module, x, quant=None):
    """Attention over the H*W positions of (B, C, H, W), with its residual."""
    B, C, H, W = x.shape
    h = norm(x, quant).view(B, C, H * W).transpose(1, 2)
    return x + attn(h).reshape(B, H, W, C).permute(0, 3, 1, 2)


class _MiddleBlock(nn.Module):
    def __init__(self, c: Emu3VQConfig, channels: int, quant_channels: int | None = None):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels, quant_channels)
        self.attn_1 = _Attention(c.hidden_size, c.num_attention_heads)
        self.attn_norm = _norm(channels, quant_channels)
        self.block_2 = _ResnetBlock(channels, channels, quant_channels)

    def forward(self, x, quant=None):
        x = _attend(self.attn_1, self.attn_norm, self.block_1(x, quant), quant)
        return self.block_2(x, quant)


def _stage() -> nn.Module:
    stage = nn.Module()
    stage.block, stage.attn, stage.attn_norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    return stage


class _DownBlock(nn.Module):
    def __init__(self, c: Emu3VQConfig):
        super().__init__()
        self.down = nn.ModuleList()
        mult_in = (1, *c.channel_multiplier)
        last = len(c.channel_multiplier) - 1
        for level, mult in enumerate(c.channel_multiplier):
            stage = _stage()
            ch_in, ch = c.base_channels * mult_in[level], c.base_channels * mult
            for _ in range(c.num_res_blocks):
                stage.block.append(_ResnetBlock(ch_in, ch))
                ch_in = ch
                if level in c.attn_resolutions:
                    stage.attn.append(_Attention(c.hidden_size, c.num_attention_heads))
                    stage.attn_norms.append(_GroupNorm(32, ch, eps=1e-6))
            if level != last:
                stage.downsample = Downsample(ch)
            self.down.append(stage)

    def forward(self, x):
        for stage in self.down:
            for i, block in enumerate(stage.block):
                x = block(x)
                if len(stage.attn) > 0:
                    x = _attend(stage.attn[i], stage.attn_norms[i], x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        return x


class _UpBlock(nn.Module):
    def __init__(self, c: Emu3VQConfig):
        super().__init__()
        self.up = nn.ModuleList()
        E, ch_in = c.embed_dim, c.base_channels * c.channel_multiplier[-1]
        for level in reversed(range(len(c.channel_multiplier))):
            stage = _stage()
            ch = c.base_channels * c.channel_multiplier[level]
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(_ResnetBlock(ch_in, ch, E))
                ch_in = ch
                if level in c.attn_resolutions:
                    stage.attn.append(_Attention(c.hidden_size, c.num_attention_heads))
                    stage.attn_norms.append(_SpatialNorm(E, ch))
            if level != 0:
                stage.upsample = Upsample(ch)
            self.up.insert(0, stage)

    def forward(self, x, quant):
        for stage in reversed(self.up):  # the deepest level first
            for i, block in enumerate(stage.block):
                x = block(x, quant)
                if len(stage.attn) > 0:
                    x = _attend(stage.attn[i], stage.attn_norms[i], x, quant)
            if hasattr(stage, "upsample"):
                x = stage.upsample(x)
        return x


class Encoder(nn.Module):
    """Module names as transformers' `Emu3VQVAEEncoder`, so weights load by name."""

    def __init__(self, c: Emu3VQConfig):
        super().__init__()
        ch = c.base_channels * c.channel_multiplier[-1]
        L = c.latent_channels
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.down_block = _DownBlock(c)
        self.middle_block = _MiddleBlock(c, ch)
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, L, 3, padding=1)
        self.time_conv = nn.ModuleList(_TemporalDownsample(L, L) for _ in range(int(math.log2(c.temporal_downsample_factor))))
        self.time_res_stack = nn.ModuleList(_TemporalResnetBlock(L, L) for _ in range(c.num_res_blocks))

    def spatial(self, x):  # (B, 3, R, R) -> (B, latent, R/f, R/f): one frame through the 2D encoder
        h = self.middle_block(self.down_block(self.conv_in(x)))
        return self.conv_out(swish(self.norm_out(h)))

    def temporal(self, z):  # (B, latent, T, h, w) -> (B, latent, T / factor, h, w)
        for conv in self.time_conv:
            z = swish(conv(z))
        for layer in self.time_res_stack:
            z = layer(z)
        return z


class Decoder(nn.Module):
    def __init__(self, c: Emu3VQConfig):
        super().__init__()
        L, E = c.latent_channels, c.embed_dim
        ch = c.base_channels * c.channel_multiplier[-1]
        self.time_res_stack = nn.ModuleList(_TemporalResnetBlock(L, L) for _ in range(c.num_res_blocks))
        self.time_conv = nn.ModuleList(_TemporalUpsample(L, L) for _ in range(int(math.log2(c.temporal_downsample_factor))))
        self.conv_in = nn.Conv2d(L, ch, 3, padding=1)
        self.middle_block = _MiddleBlock(c, ch, quant_channels=E)
        self.up_block = _UpBlock(c)
        out = c.base_channels * c.channel_multiplier[0]
        self.norm_out = _SpatialNorm(E, out)
        self.conv_out = nn.Conv2d(out, c.out_channels, 3, padding=1)

    def forward(self, post, quant):
        """post (B, latent, 1, h, w), quant (B, embed, 1, h, w) -> the first frame (B, 3, R, R): the one
        transformers' `Emu3VQVAE.decode` returns for an image."""
        B = post.shape[0]
        z = torch.cat((post, quant), dim=0)  # one temporal stack over both, as transformers runs it
        for layer in self.time_res_stack:
            z = layer(z)
        for conv in self.time_conv:
            z = swish(conv(z))
        h, q = z[:B, :, 0], z[B:, :, 0]  # frame 0 of each (the 2D decoder treats frames independently)
        h = self.up_block(self.middle_block(self.conv_in(h), q), q)
        return self.conv_out(swish(self.norm_out(h, q)))


class Quantizer(nn.Module):
    def __init__(self, c: Emu3VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.codebook_size, c.embed_dim)

    def forward(self, z):  # (B, T, D, h, w) -> codes (B, T, h, w): the nearest codebook row, same formula
        B, T, D, h, w = z.shape
        flat = z.permute(0, 1, 3, 4, 2).contiguous().view(-1, D)
        e = self.embedding.weight
        d = 2 * torch.matmul(flat, e.transpose(0, 1))
        d = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - d
        return torch.argmin(d, dim=1).view(B, T, h, w)
