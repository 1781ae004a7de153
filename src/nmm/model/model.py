"""`NativeMultimodalModel`: text embedding + one transformer + text head + an image variant.

The default is early fusion with discrete codes: image codes are tokens in the same sequence as
text, embedded into the same space, processed by the same blocks. Each modality has its own head
and its own softmax (a text position is scored over text ids and specials, an image position over
image codes), which matches modality-constrained decoding at inference.

Every other point of the design space swaps one part: `model.images` (how images enter and leave:
`nmm.model.fusion`) and the blocks (`routing`: dense, MoE, MoT; `nmm.model.transformer.BLOCKS`).
"""

from __future__ import annotations

import torch
from torch import nn

from nmm.config import ModelConfig
from nmm.modalities.vocab import Vocabulary
from nmm.model.fusion import VARIANTS, ImageInterface, LossTerm
from nmm.model.heads import TextHead, init_weights
from nmm.model.masks import (
    ImageLayout,
    causal_mask,
    cross_attention_mask,
    packed_causal_mask,
    with_bidirectional_images,
)
from nmm.model.transformer import KVCache, Transformer

__all__ = ["NativeMultimodalModel", "packed_causal_mask"]


class NativeMultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.text_embed = nn.Embedding(vocab.text_size, cfg.d_model)
        self.images: ImageInterface = VARIANTS[cfg.variant](cfg, vocab)
        self.backbone = Transformer(cfg)
        self.text_head = TextHead(vocab.text_size, cfg.d_model)
        init_weights(self, cfg.init_std, cfg.n_layers)

    # Early fusion with discrete codes exposes its code embedding and head under the usual names.
    @property
    def image_embed(self):
        return getattr(self.images, "embed_codes", None)

    @property
    def image_head(self):
        return getattr(self.images, "head", None)

    # ---- embedding and logits -------------------------------------------------------------
    def embed(self, ids: torch.Tensor, layout: ImageLayout | None = None, generated=None, image_inputs=None):
        layout = layout if layout is not None else ImageLayout.of(ids, self.vocab)
        x = self.text_embed(torch.where(layout.is_code, 0, ids))  # (B, T, D)
        return self.images.embed(x, ids, layout, generated, image_inputs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab.size): text+specials then image codes, in vocabulary order. Variants
        without a code head give -inf image logits, so a sampler can never pick a code."""
        text = self.text_head(h)
        image = self.images.logits(h)
        if image is None:
            image = text.new_full((*text.shape[:-1], self.vocab.image_codes), float("-inf"))
        return torch.cat([text, image], dim=-1)

    def hidden(self, ids, positions=None, mask=None, caches: list[KVCache] | None = None, start: int = 0,
               generated: torch.Tensor | None = None, image_inputs: dict | None = None,
               layout: ImageLayout | None = None):
        """Token ids (B, T) -> final hidden states (B, T, D). `mask` (B, 1, T, start+T) bool, None = causal."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=ids.device).expand(B, -1)
        layout = layout if layout is not None else ImageLayout.of(ids, self.vocab)
        x = self.embed(ids, layout, generated, image_inputs)
        images = self.images
        if (images.bidirectional or images.fusion == "mid") and mask is None:
            mask = causal_mask(B, T, start, ids.device)
        if images.bidirectional:
            mask = with_bidirectional_images(mask, layout, start)
        memory = memory_mask = None
        if images.fusion == "mid":
            memory, slot, valid = self._memory(ids, layout, caches, start)
            memory_mask = cross_attention_mask(mask, slot, valid)
        return self.backbone(x, positions, mask, caches, start, layout.is_code.long(), memory, memory_mask)

    def _memory(self, ids, layout, caches, start):
        """Mid fusion's cross-attention memory: from this chunk's images, or kept from the prefill."""
        if caches is not None and getattr(caches, "memory", None) is not None and not bool(layout.is_code.any()):
            return caches.memory, caches.memory_slot, caches.memory_valid
        memory, slot, valid = self.images.memory(ids, layout, start)
        if caches is not None and hasattr(caches, "memory"):
            caches.memory, caches.memory_slot, caches.memory_valid = memory, slot, valid
        return memory, slot, valid

    def forward(self, ids: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V). Causal attention unless a mask is given."""
        return self.logits(self.hidden(ids, positions, mask))

    # ---- training loss ----------------------------------------------------------------------
    def loss(
        self,
        ids: torch.Tensor,  # (B, T) inputs
        targets: torch.Tensor,  # (B, T) next-token targets, -100 where no loss
        positions: torch.Tensor,  # (B, T)
        doc_ids: torch.Tensor,  # (B, T)
        loss_weights: dict[str, float],
        z_loss: float = 0.0,
        generated: torch.Tensor | None = None,  # (B, T) code positions of images being produced
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layout = ImageLayout.of(ids, self.vocab)
        if generated is None:
            generated = torch.zeros_like(layout.is_code)
        inputs = self.images.training_inputs(ids, layout, generated)
        h = self.hidden(ids, positions, packed_causal_mask(doc_ids), generated=generated, image_inputs=inputs,
                        layout=layout)
        valid = targets != -100
        n = valid.sum().clamp(min=1)
        # Text head: next tokens that are text or specials. Variants without a code head do not
        # predict from inside an image (its length is fixed: `<eoi>` is forced).
        is_text = valid & ~self.vocab.is_code(targets)
        if not self.images.emits_codes:
            is_text &= ~layout.is_code
        total = torch.zeros((), device=ids.device)
        stats = {}
        terms = {}
        if bool(is_text.any()):
            ce, zl = self.text_head.loss(h[is_text], targets[is_text], z_loss)
            terms["text"] = LossTerm(ce.sum() + zl.sum(), ce.mean().detach(), is_text.sum())
        terms.update(self.images.loss(h, targets, layout, generated, inputs, z_loss))
        for name, term in terms.items():
            total = total + loss_weights.get(name, 1.0) * term.total / n
            stats[f"loss_{name}"] = term.report
            stats[f"tokens_{name}"] = term.count
        aux = [m.aux_loss for m in self.backbone.modules() if getattr(m, "aux_loss", None) is not None]
        if aux:
            stats["loss_aux"] = torch.stack([a.float() for a in aux]).sum().detach()
            total = total + torch.stack([a.float() for a in aux]).sum()
        return total, stats

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
