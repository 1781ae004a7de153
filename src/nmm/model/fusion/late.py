"""Late fusion (LLaVA): a vision encoder trained separately (`pretrain`), frozen by default, whose
per-patch features a projector maps into the language model's input space. Understanding only:
the model reads images and writes text."""

from __future__ import annotations

import torch

from nmm.model.fusion.base import EncoderFeatures, ModalityInterface, at_positions


class LateFusionImages(ModalityInterface):
    fusion, representation = "late", "continuous"
    capabilities = ("M2T",)

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        self.features = EncoderFeatures(cfg, vocab)

    def embed(self, x, ids, layout, generated, image_inputs):
        feats, _, _ = self.features(ids, layout)
        return torch.where(layout.is_code.unsqueeze(-1), at_positions(feats, layout), x)

    def pretrain(self, pool, world, seed, progress=None):
        return self.features.pretrain(pool, world, seed, progress)
