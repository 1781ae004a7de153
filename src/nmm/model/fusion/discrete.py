"""Early fusion with discrete codes (Chameleon): codes are tokens of the shared vocabulary,
embedded by a table and predicted by a head, exactly like text. Works for any modality whose
tokenizer gives discrete codes (images, audio, ...): the default interface of a new modality."""

from __future__ import annotations

import torch

from nmm.model.fusion.base import LossTerm, ModalityInterface
from nmm.model.heads import FactorisedEmbedding, ImageHead


class DiscreteCodes(ModalityInterface):
    fusion, representation = "early", "discrete"
    capabilities = ("M2T", "M2G", "M2M")
    emits_codes = True

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        # A factorised modality embeds and predicts each factor; `factorised_image_head=False` turns
        # that off for comparison (it names images, but applies to every modality's head).
        factors = self.spec.code_factors if cfg.factorised_image_head else (self.spec.codes,)
        self.embed_codes = FactorisedEmbedding(factors, cfg.d_model)
        self.head = ImageHead(factors, cfg.d_model)

    def embed(self, x, ids, layout, generated, image_inputs):
        codes = torch.where(layout.is_code, self.vocab.codes(self.name, ids), 0)
        return torch.where(layout.is_code.unsqueeze(-1), self.embed_codes(codes), x)

    def logits(self, h):
        return self.head(h)

    def loss(self, h, targets, layout, generated, image_inputs, z_loss):
        sel = self.vocab.is_modality(self.name, targets)  # positions whose next token is one of our codes
        if not bool(sel.any()):
            return {}
        ce, zl = self.head.loss(h[sel], self.vocab.codes(self.name, targets[sel]), z_loss)
        return {self.name: LossTerm(ce.sum() + zl.sum(), ce.mean().detach(), sel.sum())}

