"""`NativeMultimodalModel`: text embedding + one transformer + text head + one interface per modality.

The default is early fusion with discrete codes: the codes of every modality are tokens in the same
sequence as text, embedded into the same space, processed by the same blocks. Each modality has its
own head and its own softmax (a text position is scored over text ids and specials, an image
position over image codes), which matches modality-constrained decoding at inference.

Every other point of the design space swaps one part: a modality's interface (how it enters and
leaves: `nmm.model.fusion`, in `model.modalities` keyed by name) and the blocks (`routing`: dense,
MoE, MoT; `nmm.model.transformer.BLOCKS`), which see every position's modality label.
"""

from __future__ import annotations

import torch
from torch import nn

from nmm.config import ModelConfig
from nmm.modalities.vocab import Vocabulary
from nmm.model.fusion import LossTerm, ModalityInterface, build_interfaces
from nmm.model.fusion.base import loss_rows
from nmm.model.heads import TextHead, init_weights
from nmm.model.masks import (
    SpanLayout,
    causal_mask,
    cross_attention_mask,
    packed_causal_mask,
    with_bidirectional_items,
)
from nmm.model.positions import mrope_positions
from nmm.model.transformer import KVCache, Transformer

__all__ = ["NativeMultimodalModel", "packed_causal_mask"]


class NativeMultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.text_embed = nn.Embedding(vocab.text_size, cfg.d_model)
        self.modalities = nn.ModuleDict(build_interfaces(cfg, vocab))  # vocabulary order
        self.backbone = Transformer(cfg, vocab.names)
        self.text_head = TextHead(vocab.text_size, cfg.d_model)
        init_weights(self, cfg.init_std, cfg.n_layers)

    @property
    def images(self) -> ModalityInterface | None:
        """The image modality's interface (None for a model without images)."""
        return self.modalities["image"] if "image" in self.modalities else None

    # Early fusion with discrete codes exposes its code embedding and head under the usual names.
    @property
    def image_embed(self):
        return getattr(self.images, "embed_codes", None)

    @property
    def image_head(self):
        return getattr(self.images, "head", None)

    # ---- embedding and logits -------------------------------------------------------------
    def embed(self, ids: torch.Tensor, layout: SpanLayout | None = None, generated=None, image_inputs=None):
        layout = layout if layout is not None else SpanLayout.of(ids, self.vocab)
        x = self.text_embed(torch.where(layout.is_code, 0, ids))  # (B, T, D)
        for name, interface in self.modalities.items():
            x = interface.embed(x, ids, layout[name], generated, image_inputs)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab.size): text+specials then each modality's codes, in vocabulary order.
        Modalities without a code head give -inf logits, so a sampler can never pick their codes."""
        parts = [self.text_head(h)]
        ends = []
        for name, interface in self.modalities.items():
            logits = interface.logits(h)
            if logits is None:
                logits = parts[0].new_full((*parts[0].shape[:-1], interface.spec.codes), float("-inf"))
            parts.append(logits)
            if getattr(interface, "end_head", None) is not None:  # a variable-length item's end competes
                ends.append((self.vocab.end(name), interface.end_logit(h)))  # with its codes (see DiscreteCodes)
        logits = torch.cat(parts, dim=-1)
        for column, end in ends:
            logits[..., column : column + 1] = end
        return logits

    def hidden(self, ids, positions=None, mask=None, caches: list[KVCache] | None = None, start: int = 0,
               generated: torch.Tensor | None = None, image_inputs: dict | None = None,
               layout: SpanLayout | None = None):
        """Token ids (B, T) -> final hidden states (B, T, D). `mask` (B, 1, T, start+T) bool, None = causal."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=ids.device).expand(B, -1)
        layout = layout if layout is not None else SpanLayout.of(ids, self.vocab)
        x = self.embed(ids, layout, generated, image_inputs)
        if self.cfg.rope == "mrope":  # (B, T) -> (time, row, column) per token
            positions = mrope_positions(ids, positions, self.vocab, caches, start)
        special = [(n, i) for n, i in self.modalities.items() if i.bidirectional or i.fusion == "mid"]
        if special and mask is None:
            mask = causal_mask(B, T, start, ids.device)
        memory = memory_mask = None
        for name, interface in special:
            if interface.bidirectional:
                mask = with_bidirectional_items(mask, layout[name], start)
        for name, interface in special:
            if interface.fusion == "mid":
                memory, slot, valid = self._memory(interface, ids, layout[name], caches, start)
                memory_mask = cross_attention_mask(mask, slot, valid)
        return self.backbone(x, positions, mask, caches, start, layout.modality, memory, memory_mask)

    def _memory(self, interface, ids, span, caches, start):
        """Mid fusion's cross-attention memory: from this chunk's items, or kept from the prefill."""
        if caches is not None and getattr(caches, "memory", None) is not None and not bool(span.is_code.any()):
            return caches.memory, caches.memory_slot, caches.memory_valid
        memory, slot, valid = interface.memory(ids, span, start)
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
        generated: torch.Tensor | None = None,  # (B, T) code positions of items being produced
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layout = SpanLayout.of(ids, self.vocab)
        if generated is None:
            generated = torch.zeros_like(layout.is_code)
        # Variant-specific extras (noise for flow matching); at most the image variant has them today.
        inputs = None
        for name, interface in self.modalities.items():
            inputs = interface.training_inputs(ids, layout[name], generated) or inputs
        h = self.hidden(ids, positions, packed_causal_mask(doc_ids), generated=generated, image_inputs=inputs,
                        layout=layout)
        valid = targets != -100
        n = valid.sum().clamp(min=1)
        # Text head: next tokens that are text or specials. Modalities without a code head do not
        # predict from inside an item (its length is fixed: the end token is forced).
        is_text = valid & ~self.vocab.is_code(targets)
        for name, interface in self.modalities.items():
            if not interface.emits_codes:
                is_text &= ~layout[name].is_code
            if getattr(interface, "end_head", None) is not None:  # its end token is the interface's loss
                is_text &= targets != self.vocab.end(name)
        # Every term picks its positions with `loss_rows` (a gather eager, a mask when compiling: one graph).
        keep, (hs, ts) = loss_rows(is_text, h, targets)
        ce, zl = self.text_head.loss(hs, torch.where(keep, ts, 0), z_loss)
        terms = {"text": LossTerm.masked(ce, keep, zl)}
        for name, interface in self.modalities.items():
            terms.update(interface.loss(h, targets, layout[name], generated, inputs, z_loss))
        total = torch.zeros((), device=ids.device)
        stats = {}
        for name, term in terms.items():
            total = total + loss_weights.get(name, 1.0) * term.total / n
            stats[f"loss_{name}"] = term.report
            stats[f"tokens_{name}"] = term.count
        aux = [m.aux_loss for m in self.backbone.modules() if getattr(m, "aux_loss", None) is not None]
        if aux:
            stats["loss_aux"] = torch.stack([a.float() for a in aux]).sum().detach()
            total = total + torch.stack([a.float() for a in aux]).sum()
        return total, stats

    def upgrade_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read weights saved by an older nmm: the image interface under `images.` (before modalities
        were plugins) becomes `modalities.image.`; a fused `wqkv` ([q | k | v] rows) and `w_gate_up`
        ([gate | up]) are split into the separate projections that tensor parallelism shards."""
        hd = self.cfg.d_model // self.cfg.n_heads
        sizes = [self.cfg.n_heads * hd, self.cfg.n_kv_heads * hd, self.cfg.n_kv_heads * hd]
        out = {}
        for k, v in tensors.items():
            k = "modalities.image." + k[len("images."):] if k.startswith("images.") else k
            if k.endswith("attn.wqkv.weight"):
                for name, part in zip(("wq", "wk", "wv"), v.split(sizes, 0)):
                    out[k.replace("wqkv", name)] = part.contiguous()
            elif k.endswith("ffn.w_gate_up.weight") and v.dim() == 2:  # MoE experts stay stacked (3-D)
                gate, up = v.chunk(2, 0)
                out[k.replace("w_gate_up", "w_gate")], out[k.replace("w_gate_up", "w_up")] = gate.contiguous(), up.contiguous()
            else:
                out[k] = v
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

