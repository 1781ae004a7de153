"""Early fusion with discrete image codes (Chameleon): codes are tokens of the shared vocabulary,
embedded by a table and predicted by a head, exactly like text."""

from __future__ import annotations

import torch

from nmm.model.fusion.base import ImageInterface, LossTerm
from nmm.model.heads import FactorisedEmbedding, ImageHead


class DiscreteImages(ImageInterface):
    fusion, representation = "early", "discrete"
    capabilities = ("M2T", "M2G", "M2M")
    emits_codes = True

    def __init__(self, cfg, vocab):
        super().__init__(cfg, vocab)
        factors = vocab.image_factors if cfg.factorised_image_head else (vocab.image_codes,)
        self.embed_codes = FactorisedEmbedding(factors, cfg.d_model)
        self.head = ImageHead(factors, cfg.d_model)

    def embed(self, x, ids, layout, generated, image_inputs):
        codes = torch.where(layout.is_code, self.vocab.codes("image", ids), 0)
        return torch.where(layout.is_code.unsqueeze(-1), self.embed_codes(codes), x)

    def logits(self, h):
        return self.head(h)

    def loss(self, h, targets, layout, generated, image_inputs, z_loss):
        sel = self.vocab.is_modality("image", targets)  # positions whose next token is an image code
        if not bool(sel.any()):
            return {}
        ce, zl = self.head.loss(h[sel], self.vocab.codes("image", targets[sel]), z_loss)
        return {"image": LossTerm(ce.sum() + zl.sum(), ce.mean().detach(), sel.sum())}
