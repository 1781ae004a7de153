"""Decoupled image representations (Janus): images the model *reads* go through a separately
trained vision encoder (semantic features suit understanding); images it *writes* are discrete
codes with their own embedding and head (codes suit autoregressive generation). One backbone."""

from __future__ import annotations

import torch

from nmm.model.fusion.base import EncoderFeatures, at_positions
from nmm.model.fusion.discrete import DiscreteCodes


class DecoupledImages(DiscreteCodes):
    fusion, representation = "early", "decoupled"

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        self.features = EncoderFeatures(cfg, vocab)

    def embed(self, x, ids, layout, generated, image_inputs):
        if generated is None:
            # Inference: a prompt chunk holds input images; a one-token decode step is a code the
            # model just sampled, part of an image it is generating.
            generated = torch.full_like(layout.is_code, ids.shape[1] == 1)
        x = super().embed(x, ids, layout, generated, image_inputs)  # codes everywhere
        read = layout.is_code & ~generated & (layout.item >= 0)
        if torch.compiler.is_compiling() or bool(read.any()):  # (eager: skip the encoder)
            feats, _, _ = self.features(ids, layout, select=read)
            x = torch.where(read.unsqueeze(-1), at_positions(feats, layout), x)
        return x

    def pretrain(self, pool, world, seed, progress=None):
        return self.features.pretrain(pool, world, seed, progress)
