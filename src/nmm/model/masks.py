"""Every attention mask nmm builds, in one place.

Masks are boolean, True = may attend, shaped (B, 1, T_queries, T_keys) for
`F.scaled_dot_product_attention`. Queries are the T positions of the current chunk; keys are cache
slots [0, start + T) (training and uncached calls have start = 0 and keys = queries).

  packed_causal_mask        causal inside each packed document, nothing across documents
  causal_mask               plain causal (what `mask=None` means), made explicit so it can be edited
  with_bidirectional_items  code positions of one item (an image) see each other both ways (Transfusion)
  cross_attention_mask      which image features a text position may read (mid fusion, Flamingo)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def causal_mask(batch: int, T: int, start: int, device) -> torch.Tensor:
    """(B, 1, T, start+T): query t (cache slot start+t) sees slots <= start+t."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start).expand(batch, 1, T, start + T)


@dataclass
class Span:
    """Where one modality's items are in a chunk of ids. An item is `begin`, its code positions, `end`."""

    is_code: torch.Tensor  # (B, T) bool: a code position of this modality
    item: torch.Tensor  # (B, T) long: which item of the row (0, 1, ...) a code belongs to; -1 elsewhere
    slot: torch.Tensor  # (B, T) long: index of the code inside its item (0..N-1); -1 elsewhere

    @classmethod
    def of(cls, ids: torch.Tensor, is_code: torch.Tensor, is_begin: torch.Tensor) -> Span:
        T = ids.shape[1]
        ar = torch.arange(T, device=ids.device).expand_as(ids)
        last_begin = torch.where(is_begin, ar, -1).cummax(dim=1).values  # (B, T) slot of the latest begin
        item = torch.where(is_code, is_begin.long().cumsum(1) - 1, -1)
        slot = torch.where(is_code, ar - last_begin - 1, -1)
        # A code run with no begin token in this chunk (a decode step inside an item) has no layout here.
        item = torch.where(last_begin >= 0, item, -1)
        slot = torch.where(last_begin >= 0, slot, -1)
        return cls(is_code, item, slot)


@dataclass
class SpanLayout:
    """Every position's modality, and for each modality where its items are (a `Span`)."""

    modality: torch.Tensor  # (B, T) long: 0 = text or a special, k = the vocabulary's k-th modality
    spans: dict[str, Span]

    @classmethod
    def of(cls, ids: torch.Tensor, vocab: Vocabulary) -> SpanLayout:
        modality = vocab.modality_of(ids)
        spans = {m.name: Span.of(ids, modality == vocab.index(m.name), ids == vocab.begin(m.name))
                 for m in vocab.modalities}
        return cls(modality, spans)

    def __getitem__(self, name: str) -> Span:
        return self.spans[name]

    @property
    def is_code(self) -> torch.Tensor:
        """(B, T) bool: a code position of any modality."""
        return self.modality > 0


def with_bidirectional_items(mask: torch.Tensor, span: Span, start: int = 0) -> torch.Tensor:
    """Let the code positions of each item (an image) attend to each other in both directions.

    The rest stays as `mask` says (causal across the document), so text after an image sees the
    whole image and the image sees the text before it. Items must lie inside this chunk."""
    img = span.item
    same = (img.unsqueeze(2) == img.unsqueeze(1)) & (img >= 0).unsqueeze(2)  # (B, T, T)
    mask = mask.clone()
    T = img.shape[1]
    mask[:, :, :, start : start + T] |= same.unsqueeze(1)
    return mask


def cross_attention_mask(self_mask: torch.Tensor, key_slot: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Mask for cross-attention from the T queries to M image features (plus one always-visible
    null feature first, so a text position with no image before it still has a key to attend to).

    A query may read image feature m when self-attention would let it see the *last code* of m's
    image (`key_slot`, a cache slot): that one rule carries document boundaries, padding, causality
    and the KV cache over from the self-attention mask.
    self_mask (B, 1, T, K), key_slot (B, M) long, key_valid (B, M) bool -> (B, 1, T, 1 + M)."""
    B, _, T, K = self_mask.shape
    index = key_slot.clamp(0, K - 1).unsqueeze(1).unsqueeze(1).expand(B, 1, T, -1)  # (B, 1, T, M)
    visible = self_mask.gather(3, index) & (key_valid & (key_slot < K)).unsqueeze(1).unsqueeze(1)
    null = torch.ones(B, 1, T, 1, dtype=torch.bool, device=self_mask.device)
    return torch.cat([null, visible], dim=3)
