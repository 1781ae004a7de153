"""Continuous audio: the early-continuous, late and mid variants for audio (`model.audio_repr=continuous`,
`model.audio_fusion`), the route of Qwen-Audio, Gemma and Nemotron: continuous features of the speech,
projected into the backbone, instead of codes looked up in a table.

What the model reads is the codec's latent at each code frame (25 frames/s by default): the audio
codec computes it from the log-mel by frame stacking and strided convolutions, and FSQ rounds it to a
grid whose every point is known in closed form (`Vocabulary.code_latents("audio")`). So the token
layout stays `<boa>` codes `<eoa>` for every variant, as for images, and the code ids only say which
latent sits at each frame. The three variants differ in what comes between those latents and the
backbone:

  early-continuous   latents -> projector (a two-layer MLP), one input embedding per frame
  late               latents -> `AudioEncoder` (same-item convolutions along time) -> projector
  mid                the same encoder's features are cross-attention memory (Flamingo); the frames'
                     positions in the sequence hold one learned placeholder

All three read audio and write text (M2T: transcription, spoken questions). Writing continuous audio
would need a sampler that also picks each item's length; speech synthesis uses discrete codes
(`model.audio_repr=discrete`, the default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmm.model.fusion.base import ModalityInterface
from nmm.model.masks import Span
from nmm.model.vision import ImageProjector


def _shifted(x: torch.Tensor, item: torch.Tensor, offset: int) -> torch.Tensor:
    """x (B, T, C) -> x at t + offset where that position is a frame of the same item, else 0."""
    T = x.shape[1]
    if abs(offset) >= T:
        return torch.zeros_like(x)
    if offset > 0:
        xs, its = F.pad(x[:, offset:], (0, 0, 0, offset)), F.pad(item[:, offset:], (0, offset), value=-1)
    else:
        xs, its = F.pad(x[:, :offset], (0, 0, -offset, 0)), F.pad(item[:, :offset], (-offset, 0), value=-1)
    same = (its == item) & (item >= 0)
    return torch.where(same.unsqueeze(-1), xs, 0)


class _TimeBlock(nn.Module):
    """x + Linear(SiLU(LN(depthwise 3-tap conv along time))), the conv never reading another item's
    frames (packed rows hold several utterances; a frame of one must not see its neighbour's)."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.taps = nn.Parameter(torch.zeros(3, width))
        self.bias = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.taps, std=0.3)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, item: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, T, W)
        d = self.dilation
        y = self.taps[0] * _shifted(x, item, -d) + self.taps[1] * x + self.taps[2] * _shifted(x, item, d) + self.bias
        return x + self.mix(F.silu(self.norm(y)))


class AudioEncoder(nn.Module):
    """latents (B, T, L) at the audio frames of packed rows -> features (B, T, width). A linear stem
    and `layers` residual blocks with dilations 1, 2, 4, ...: at 3 layers a frame sees 15 frames
    (0.6 s at 25 frames/s) of its own item. Like Whisper's encoder it reads the whole utterance at
    once, so the items must be inside the chunk (prompts are prefilled whole)."""

    def __init__(self, latent_dim: int, width: int, layers: int):
        super().__init__()
        self.stem = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(_TimeBlock(width, 2 ** i) for i in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, latents: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        x = self.stem(latents)
        for block in self.blocks:
            x = block(x, item)
        return self.norm(x)


class _AudioFeatures(ModalityInterface):
    """Shared by the three variants: the latent of every frame, from its code id."""

    representation = "continuous"
    capabilities = ("M2T",)

    def __init__(self, cfg, vocab, name="audio"):
        super().__init__(cfg, vocab, name)
        self.register_buffer("latents", vocab.code_latents(name), persistent=False)  # (codes, L)

    def frame_latents(self, ids: torch.Tensor, span: Span, dtype: torch.dtype) -> torch.Tensor:
        """(B, T) ids -> (B, T, L) the codec latent at each frame of this modality (0 elsewhere)."""
        codes = torch.where(span.is_code, self.vocab.codes(self.name, ids), 0)
        return torch.where(span.is_code.unsqueeze(-1), self.latents[codes], 0).to(dtype)


class ContinuousAudio(_AudioFeatures):
    """Early fusion of continuous audio: each frame's latent, projected, is the input embedding."""

    fusion = "early"

    def __init__(self, cfg, vocab, name="audio"):
        super().__init__(cfg, vocab, name)
        self.projector = ImageProjector(self.latents.shape[1], cfg.d_model)  # LLaVA-1.5's MLP

    def embed(self, x, ids, layout, generated, image_inputs):
        h = self.projector(self.frame_latents(ids, layout, x.dtype))
        return torch.where(layout.is_code.unsqueeze(-1), h, x)


class LateFusionAudio(_AudioFeatures):
    """Late fusion: an audio encoder over each utterance, then the projector (LLaVA's recipe for
    speech, as Qwen-Audio). The encoder trains with the language model."""

    fusion = "late"

    def __init__(self, cfg, vocab, name="audio"):
        super().__init__(cfg, vocab, name)
        e = cfg.audio_encoder
        self.encoder = AudioEncoder(self.latents.shape[1], e.width, e.layers)
        self.projector = ImageProjector(e.width, cfg.d_model)

    def features(self, ids, layout, dtype) -> torch.Tensor:  # (B, T) -> (B, T, d_model)
        return self.projector(self.encoder(self.frame_latents(ids, layout, dtype), layout.item))

    def embed(self, x, ids, layout, generated, image_inputs):
        return torch.where(layout.is_code.unsqueeze(-1), self.features(ids, layout, x.dtype), x)


class MidFusionAudio(LateFusionAudio):
    """Mid fusion (Flamingo) for audio: the frames' positions hold one placeholder embedding; text
    reads the encoder's features of earlier utterances through the gated cross-attention layers."""

    fusion = "mid"

    def __init__(self, cfg, vocab, name="audio"):
        super().__init__(cfg, vocab, name)
        self.placeholder = nn.Parameter(torch.zeros(cfg.d_model))
        self.null_feature = nn.Parameter(torch.zeros(1, 1, cfg.d_model))  # the key every query may read

    def embed(self, x, ids, layout, generated, image_inputs):
        return torch.where(layout.is_code.unsqueeze(-1), self.placeholder.to(x.dtype), x)

    def memory(self, ids, layout, start):
        """Every frame of the chunk is a memory entry, visible from its item's last frame on."""
        B, T = ids.shape
        null = self.null_feature.expand(B, 1, -1)
        use = layout.is_code & (layout.item >= 0)
        if not torch.compiler.is_compiling() and not bool(use.any()):  # eager: no audio, no encoder
            empty = torch.zeros(B, 0, dtype=torch.long, device=ids.device)
            return null, empty, empty.bool()
        feats = self.features(ids, layout, null.dtype)  # (B, T, D)
        t = torch.arange(T, device=ids.device).expand(B, T)
        item = torch.where(use, layout.item, T)  # (B, T) into (T items + spare)
        last = torch.full((B, T + 1), -1, dtype=torch.long, device=ids.device)
        last = last.scatter_reduce(1, item, torch.where(use, t, -1), "amax")
        slot = last.gather(1, item.clamp(max=T)) + start  # each frame: its item's last frame, as a cache slot
        return torch.cat([null.to(feats.dtype), feats], dim=1), slot, use
