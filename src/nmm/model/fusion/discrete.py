"""Early fusion with discrete codes (Chameleon): codes are tokens of the shared vocabulary,
embedded by a table and predicted by a head, exactly like text. Works for any modality whose
tokenizer gives discrete codes (images, audio, ...): the default interface of a new modality."""

from __future__ import annotations

import torch
from torch import nn

from nmm.model.fusion.base import LossTerm, ModalityInterface, loss_rows
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
        # A variable-length item (speech) ends when the model prefers its end token to every code. The
        # end token's logit comes from this head and shares one softmax with the codes (in `loss` and in
        # `model.logits`), so stopping is learned against going on; the text head, which never sees the
        # codes compete, would give a logit on another scale. No bias: the head stays one row of a
        # plain LM head (the Hugging Face conversion puts it there).
        self.end_head = None if self.spec.fixed_length else nn.Linear(cfg.d_model, 1, bias=False)

    def embed(self, x, ids, layout, generated, image_inputs):
        codes = torch.where(layout.is_code, self.vocab.codes(self.name, ids), 0)
        return torch.where(layout.is_code.unsqueeze(-1), self.embed_codes(codes), x)

    def logits(self, h):
        return self.head(h)

    def end_logit(self, h):  # (..., D) -> (..., 1): the end token's logit inside an item
        return self.end_head(h)

    def loss(self, h, targets, layout, generated, image_inputs, z_loss):
        end_id = self.vocab.end(self.name)
        counts = self.vocab.is_modality(self.name, targets)  # positions whose next token is one of our codes
        if self.end_head is not None:
            counts = counts | (targets == end_id)  # ... or the end of our item
        keep, (h, targets) = loss_rows(counts, h, targets)  # (R, D), (R,)
        ours = self.vocab.is_modality(self.name, targets)
        picked, log_z = self.head.scores(h, torch.where(ours, self.vocab.codes(self.name, targets), 0))  # (R,)
        if self.end_head is not None:  # one softmax over {end} and every code
            end = self.end_head(h).float().squeeze(-1)
            log_z = torch.logaddexp(end, log_z)
            picked = torch.where(targets == end_id, end, picked)
        return {self.name: LossTerm.masked(log_z - picked, keep, z_loss * log_z.pow(2))}
