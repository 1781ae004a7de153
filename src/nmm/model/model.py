"""`NativeMultimodalModel`: embeddings + one transformer + per-modality heads.

Early fusion: image codes are tokens in the same sequence as text, embedded into the same
space, processed by the same blocks. Each modality has its own head and its own softmax (a
text position is scored over text ids and specials, an image position over image codes), which
matches modality-constrained decoding at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from nmm.config import ModelConfig
from nmm.model.heads import FactorisedEmbedding, ImageHead, TextHead, init_weights
from nmm.model.transformer import KVCache, Transformer
from nmm.modalities.vocab import Vocabulary


def packed_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per position (-1 = padding) -> (B, 1, T, T) bool attention mask:
    causal within each packed document, nothing across documents."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)  # (B, T, T)
    mask = same & causal
    mask |= torch.eye(T, dtype=torch.bool, device=doc_ids.device)  # padding rows attend to themselves
    return mask.unsqueeze(1)


class NativeMultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        factors = vocab.image_factors if cfg.factorised_image_head else (vocab.image_codes,)
        self.text_embed = nn.Embedding(vocab.image_start, cfg.d_model)
        self.image_embed = FactorisedEmbedding(factors, cfg.d_model)
        self.backbone = Transformer(cfg)
        self.text_head = TextHead(vocab.image_start, cfg.d_model)
        self.image_head = ImageHead(factors, cfg.d_model)
        init_weights(self, cfg.init_std, cfg.n_layers)

    # ---- embedding and logits -------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        is_image = ids >= self.vocab.image_start  # (B, T)
        h_text = self.text_embed(torch.where(is_image, 0, ids))
        h_image = self.image_embed(torch.where(is_image, ids - self.vocab.image_start, 0))
        return torch.where(is_image.unsqueeze(-1), h_image, h_text)  # (B, T, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab.size): text+specials then image codes, in vocabulary order."""
        return torch.cat([self.text_head(h), self.image_head(h)], dim=-1)

    def hidden(self, ids, positions=None, mask=None, caches: list[KVCache] | None = None, start: int = 0):
        if positions is None:
            positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.backbone(self.embed(ids), positions, mask, caches, start)

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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.hidden(ids, positions, packed_causal_mask(doc_ids))
        valid = targets != -100
        is_image = valid & (targets >= self.vocab.image_start)
        is_text = valid & ~is_image
        total = torch.zeros((), device=ids.device)
        stats = {}
        n = valid.sum().clamp(min=1)
        for name, sel, head, offset in (
            ("text", is_text, self.text_head, 0),
            ("image", is_image, self.image_head, self.vocab.image_start),
        ):
            if not bool(sel.any()):
                continue
            ce, zl = head.loss(h[sel], targets[sel] - offset, z_loss)  # only positions of this modality
            total = total + loss_weights.get(name, 1.0) * (ce.sum() + zl.sum()) / n
            stats[f"loss_{name}"] = ce.mean().detach()
            stats[f"tokens_{name}"] = sel.sum()
        return total, stats

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
