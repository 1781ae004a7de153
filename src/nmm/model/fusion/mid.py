"""Mid fusion (Flamingo): image features never enter the token stream. The image's positions in
the sequence hold one learned placeholder embedding; text positions read the features of earlier
images of their document through gated cross-attention layers inside the stack
(`transformer.GatedCrossAttention`, every `cross_attn_every` blocks). Understanding only."""

from __future__ import annotations

import torch
from torch import nn

from nmm.model.fusion.base import EncoderFeatures, ModalityInterface


class MidFusionImages(ModalityInterface):
    fusion, representation = "mid", "continuous"
    capabilities = ("M2T",)

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        self.features = EncoderFeatures(cfg, vocab)
        self.placeholder = nn.Parameter(torch.zeros(cfg.d_model))
        self.null_feature = nn.Parameter(torch.zeros(1, 1, cfg.d_model))  # the key every query may read

    def embed(self, x, ids, layout, generated, image_inputs):
        return torch.where(layout.is_code.unsqueeze(-1), self.placeholder.to(x.dtype), x)

    def memory(self, ids, layout, start):
        B = ids.shape[0]
        if torch.compiler.is_compiling() or bool((layout.item >= 0).any()):  # (eager: skip the encoder)
            feats, present, last = self.features(ids, layout)  # (B, I, N, D)
            N = feats.shape[2]
            feats = feats.flatten(1, 2)  # (B, I*N, D)
            slot = (last + start).repeat_interleave(N, dim=1)  # every feature of an image: its last code's slot
            valid = present.repeat_interleave(N, dim=1)
        else:
            feats = self.null_feature.new_zeros(B, 0, self.cfg.d_model)
            slot = torch.zeros(B, 0, dtype=torch.long, device=ids.device)
            valid = torch.zeros(B, 0, dtype=torch.bool, device=ids.device)
        null = self.null_feature.expand(B, 1, -1).to(feats.dtype)
        return torch.cat([null, feats], dim=1), slot, valid

    def pretrain(self, pool, world, seed, progress=None):
        return self.features.pretrain(pool, world, seed, progress)
