"""The interface every modality variant implements: how a modality enters the backbone and leaves it.

`NativeMultimodalModel` owns the text embedding, the backbone and the text head; each other
modality of the vocabulary gets one `ModalityInterface` (held in `model.modalities`, keyed by the
modality's name). Everything that differs between late / mid / early fusion and discrete /
continuous / decoupled images lives in one subclass per variant (this package), picked for the
image modality by `ModelConfig.variant`; any other modality gets discrete early fusion
(`DiscreteCodes`) unless its plugin says otherwise.

Every variant sees the same token layout (`begin`, N code ids, `end`), so the data pipeline,
packing, the engine's prompts and the evaluation tasks are shared. What the code ids *mean* to
the model is the variant's business: embedded codes (discrete), the tokenizer's continuous
latents (continuous), features of a separately trained encoder (late, mid, decoupled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmm.config import ModelConfig
from nmm.errors import ConfigError
from nmm.modalities.vocab import Vocabulary
from nmm.model.masks import Span


@dataclass
class LossTerm:
    total: torch.Tensor  # summed over positions: what is optimised (regularisers included)
    report: torch.Tensor  # mean per position, for the logs (no regularisers)
    count: torch.Tensor  # positions

    @classmethod
    def masked(cls, per_position: torch.Tensor, mask: torch.Tensor, regulariser: torch.Tensor | None = None) -> LossTerm:
        """Per-position losses where `mask` (same shape) says they count -> a term (see `loss_rows`).
        `torch.where`, not a product: a masked-out position may hold inf. The report is NaN when no
        position counts (the trainer then leaves it out)."""
        zero = per_position.new_zeros(())
        total = torch.where(mask, per_position, zero).sum()
        count = mask.sum()
        report = torch.where(count > 0, total / count.clamp(min=1), float("nan")).detach()
        if regulariser is not None:
            total = total + torch.where(mask, regulariser, zero).sum()
        return cls(total, report, count)


class ModalityInterface(nn.Module):
    fusion: str = "early"
    representation: str = "discrete"
    capabilities: tuple[str, ...] = ("M2T", "M2G", "M2M")
    emits_codes: bool = False  # has a head over image codes: the engine can sample images token by token
    bidirectional: bool = False  # the code positions of one image attend to each other both ways

    def __init__(self, cfg: ModelConfig, vocab: Vocabulary, name: str = "image"):
        super().__init__()
        self.cfg, self.vocab, self.name = cfg, vocab, name
        self.spec = vocab.spec(name)

    # ---- input side -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, ids: torch.Tensor, layout: Span, generated: torch.Tensor | None,
              image_inputs: dict | None) -> torch.Tensor:
        """x (B, T, D) embeddings so far (this modality's positions hold garbage) -> embeddings with
        them filled in. `layout` is this modality's `Span`; `generated` (B, T) marks code positions of
        items the model is producing (teacher-forced in training); `image_inputs` carries
        variant-specific extras (noisy latents)."""
        raise NotImplementedError

    def memory(self, ids: torch.Tensor, layout: Span, start: int):
        """Mid fusion only: (features (B, M, D), last-code slot (B, M), valid (B, M)) or None."""
        return

    # ---- output side ------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """(…, D) -> (…, codes) logits over this modality's codes, or None when it has no code head."""
        return None

    def training_inputs(self, ids: torch.Tensor, layout: Span, generated: torch.Tensor) -> dict | None:
        """Per-batch extras for `embed` and `loss` (e.g. noise and timesteps for flow matching)."""
        return None

    def loss(self, h: torch.Tensor, targets: torch.Tensor, layout: Span, generated: torch.Tensor,
             image_inputs: dict | None, z_loss: float) -> dict[str, LossTerm]:
        """Loss terms by name (the modality's name, or e.g. "flow"). Empty when the modality is input only."""
        return {}

    def pretrain(self, pool, world, seed: int, progress=None) -> dict | None:
        """One-off training before the language model (a vision encoder). Default: nothing."""
        return None


def loss_rows(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The positions a loss is computed at: (which rows count (R,), each tensor's rows (R, ...)).

    Eager: only the positions in `mask` (B, T), gathered (least work; every row counts).
    Compiling: every position, with the mask. A gather's size depends on the data, which would
    break the graph or recompile it per batch; fixed shapes make the step one graph for every batch."""
    if torch.compiler.is_compiling():
        return mask.flatten(), [t.flatten(0, 1) for t in tensors]
    return mask.new_ones(int(mask.sum())), [t[mask] for t in tensors]


def item_capacity(layout: Span, tokens_per_item: int) -> int:
    """How many items one row of this chunk holds, as a size for per-item tensors.

    Eager: the actual maximum (least work). Compiling: a bound from the chunk length, since every
    item but a row's last is complete (`begin`, N codes, `end`): a static shape, one graph for
    every batch."""
    T = layout.item.shape[1]
    if torch.compiler.is_compiling():
        return T // (tokens_per_item + 2) + 1
    return max(int(layout.item.max()) + 1, 1)


def image_grids(ids: torch.Tensor, layout: Span, vocab: Vocabulary, select: torch.Tensor | None = None):
    """Gather each row's images into code grids, so an encoder can see a whole image at once.

    Returns codes (B, I, N) (missing codes of a cut-off image are 0), present (B, I) bool and
    last (B, I) long, the chunk index of each image's last code (-1 if absent). `select` (B, T)
    restricts which code positions count (e.g. only images that are inputs, not generated).
    Scatters with fixed shapes (no `nonzero`): positions that do not count go to a spare slot."""
    B, T = ids.shape
    N = vocab.tokens_per_image
    I = item_capacity(layout, N)
    use = layout.is_code & (layout.item >= 0) & (layout.item < I) & (layout.slot < N)
    if select is not None:
        use = use & select
    cell = torch.where(use, layout.item * N + layout.slot, I * N)  # (B, T) into (I*N + spare)
    codes = torch.zeros(B, I * N + 1, dtype=torch.long, device=ids.device)
    codes = codes.scatter(1, cell, torch.where(use, vocab.codes("image", ids), 0))[:, : I * N].view(B, I, N)
    item = torch.where(use, layout.item, I)  # (B, T) into (I + spare)
    t = torch.arange(T, device=ids.device).expand(B, T)
    last = torch.full((B, I + 1), -1, dtype=torch.long, device=ids.device)
    last = last.scatter_reduce(1, item, torch.where(use, t, -1), "amax")[:, :I]
    return codes, last >= 0, last


def at_positions(features: torch.Tensor, layout: Span) -> torch.Tensor:
    """Per-image features (B, I, N, D) -> (B, T, D), each code position's own feature (garbage
    elsewhere: callers select with `torch.where`)."""
    B, _, N, _ = features.shape
    rows = torch.arange(B, device=features.device).unsqueeze(1)
    return features[rows, layout.item.clamp(min=0), layout.slot.clamp(0, N - 1)]


class EncoderFeatures(nn.Module):
    """A separately trained vision encoder over the tokenizer's latent grid, plus a projector into
    the language model's width (LLaVA): shared by late fusion, mid fusion and the decoupled variant.
    The tokenizer's encoder (pixels -> latents) is the fixed first stage, so the model reads code
    ids and turns them back into latents with `Vocabulary.code_latents`."""

    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        from nmm.model.vision import ImageProjector, VisionEncoder

        self.vocab = vocab
        grid = round(vocab.tokens_per_image ** 0.5)
        self.register_buffer("latents", vocab.code_latents(), persistent=False)  # (codes, latent_dim)
        self.encoder = VisionEncoder(vocab.image_latent_dim, grid, cfg.encoder)
        self.projector = ImageProjector(cfg.encoder.width, cfg.d_model)
        self.encoder_cfg = cfg.encoder
        self.encoder.requires_grad_(cfg.encoder.trainable)

    def forward(self, ids: torch.Tensor, layout: Span, select: torch.Tensor | None = None):
        """-> features (B, I, N, D), present (B, I), last code index (B, I)."""
        codes, present, last = image_grids(ids, layout, self.vocab, select)
        B, I, N = codes.shape
        feats = self.encoder(self.latents[codes].view(B * I, N, -1))  # (B*I, N, width)
        return self.projector(feats).view(B, I, N, -1), present, last

    def pretrain(self, pool, world, seed: int, progress=None) -> dict:
        from nmm.model.vision import pretrain_vision_encoder

        cfg = self.encoder_cfg
        if cfg.pretrain_steps == 0:
            return None
        if pool.scenes is None or world is None:
            raise ConfigError("the vision encoder of late / mid fusion and the decoupled variant is pretrained on "
                              "the shapes world's scenes: use data.source=shapes, or model.encoder.pretrain_steps=0 "
                              "with model.encoder.trainable=true to learn it with the language model")
        self.encoder.requires_grad_(True)
        stats = pretrain_vision_encoder(self.encoder, self.latents, self.vocab.codes("image", pool.codes), pool.scenes,
                                        world, cfg.pretrain_steps, cfg.pretrain_batch, cfg.lr, seed, progress)
        self.encoder.requires_grad_(cfg.trainable)
        return stats

