"""Janus's image modules (DeepSeek's Janus / Janus-Pro), as one modality interface: `model.image_repr=janus`.

Janus decouples the two directions of images, like nmm's decoupled variant, but with its own modules
(transformers' `JanusModel`), which that variant cannot express:

- images the model **reads** go through a SigLIP ViT over their *pixels* (`vision_model`) and an MLP
  (`aligner`) into the language model's space, one feature per code position of the item (nmm's
  decoupled variant reads its own small encoder over the image tokenizer's *codes*);
- images it **writes** are VQ codes, each embedded by a table of `embed_dim` wide vectors
  (`generation_embeddings`) and an MLP (`generation_aligner`), and predicted by an MLP head
  (`generation_head`: Linear, activation, Linear) rather than a linear one.

Module names are transformers', so an imported checkpoint's weights load by name (`nmm.interop.janus`
maps `model.vision_model.*` to `modalities.image.vision_model.*`, and so on); the ops are the same in the
same order (SDPA attention, transformers' default), which the parity tests check.

**The pixels of a read image.** nmm's token stream holds ids, and a read image's item is its VQ codes
(the run's codec, `JanusVQCodec`, encodes a picture to them). Janus's SigLIP reads the picture itself,
which its codes do not determine (the VQ is lossy), so the codec remembers the picture behind the codes
it produces: `PICTURES`, a bounded memory (newest kept) that encoding a picture and decoding codes both
write to. At a read image this interface takes the picture its codes stand for from there; codes no codec
of this process has seen (ids from elsewhere) are drawn by a registered codec first, i.e. the image reads
as the picture those codes decode to, which is what Janus would see if shown that picture. Two different
pictures with the very same codes share one entry (the newest): practically only near-identical pictures.

Which positions are read and which written follows the decoupled variant: in training `generated` says;
at inference a prompt chunk holds read images and a one-token decode step is a code being generated.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nmm.errors import InputError
from nmm.model.fusion.base import (
    LossTerm,
    ModalityInterface,
    at_positions,
    image_grids,
    loss_rows,
)

ACTIVATIONS = {  # transformers' ACT2FN entries this port computes identically
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not one the Janus port computes ({', '.join(ACTIVATIONS)})") from None


def pixel_table(rescale: float, mean, std) -> torch.Tensor:
    """(3, 256) model input of every uint8 value per channel, rounded as transformers' image processors
    round it (`rescale` in float64, cast to float32, then `(v - mean) / std` in float32)."""
    v = (torch.arange(256, dtype=torch.float64) * rescale).float()[None]
    return (v - torch.tensor(mean, dtype=torch.float32)[:, None]) / torch.tensor(std, dtype=torch.float32)[:, None]


# =================================================================================================
# The pictures behind read images
# =================================================================================================
class PictureMemory:
    """uint8 pictures (R, R, 3) by the codes of their item, newest kept (at most `capacity`), and the
    codecs that can draw codes it has not seen. Thread-safe (the server encodes prompts in its request
    threads while the scheduler's thread reads them)."""

    def __init__(self, capacity: int = 128):
        self.capacity = capacity
        self._pictures: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._drawers: list[weakref.ref] = []
        self._lock = threading.Lock()

    @staticmethod
    def key(codes) -> bytes:
        return np.ascontiguousarray(np.asarray(codes.cpu() if torch.is_tensor(codes) else codes), dtype=np.int64).tobytes()

    def remember(self, codes, picture) -> None:
        """The picture (R, R, 3) uint8 behind one item's codes (N,)."""
        picture = torch.as_tensor(np.asarray(picture.cpu() if torch.is_tensor(picture) else picture), dtype=torch.uint8)
        key = self.key(codes)
        with self._lock:
            self._pictures[key] = picture.clone()
            self._pictures.move_to_end(key)
            while len(self._pictures) > self.capacity:
                self._pictures.popitem(last=False)

    def recall(self, codes) -> torch.Tensor | None:
        with self._lock:
            picture = self._pictures.get(self.key(codes))
            if picture is not None:
                self._pictures.move_to_end(self.key(codes))
            return picture

    def forget(self) -> None:
        with self._lock:
            self._pictures.clear()

    def __len__(self) -> int:
        return len(self._pictures)

    def add_drawer(self, codec) -> None:
        """`codec.draw(codes (n, N)) -> (n, R, R, 3) uint8` can draw codes nobody encoded; the newest one
        added whose `draws(n_codes, tokens, size)` says yes is asked. Held weakly."""
        with self._lock:
            self._drawers = [r for r in self._drawers if r() is not None and r() is not codec] + [weakref.ref(codec)]

    def pictures(self, codes: torch.Tensor, n_codes: int, size: int) -> torch.Tensor:
        """(n, N) item codes -> (n, size, size, 3) uint8: remembered, or drawn by a codec."""
        out: list[torch.Tensor | None] = [self.recall(c) for c in codes]
        missing = [i for i, p in enumerate(out) if p is None or tuple(p.shape) != (size, size, 3)]
        if missing:
            with self._lock:
                drawers = [r() for r in reversed(self._drawers)]
            drawer = next((d for d in drawers if d is not None and d.draws(n_codes, codes.shape[1], size)), None)
            if drawer is None:
                raise InputError(f"Janus reads an image through its pixels, and {len(missing)} image(s) of this prompt are "
                                 "codes no Janus image codec of this process has encoded or can draw: build prompts with "
                                 "the run's codecs (codecs.prompt / Pipeline), which remember the pictures")
            drawn = drawer.draw(codes[missing])
            for i, picture in zip(missing, drawn):
                out[i] = torch.as_tensor(np.asarray(picture), dtype=torch.uint8)
        return torch.stack(out) if out else torch.zeros(0, size, size, 3, dtype=torch.uint8)


PICTURES = PictureMemory()


# =================================================================================================
# SigLIP (transformers' JanusVisionModel) and the MLPs
# =================================================================================================
class _VisionEmbeddings(nn.Module):
    def __init__(self, width: int, image_size: int, patch: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) -> (B, N, width)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight.unsqueeze(0)


class _VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.projection_layer = nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale, is_causal=False)
        return self.projection_layer(out.transpose(1, 2).contiguous().reshape(B, L, D))


class _VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _VisionLayer(nn.Module):
    def __init__(self, c, width: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=c.norm_eps)
        self.self_attn = _VisionAttention(width, c.heads, c.qkv_bias)
        self.layer_norm2 = nn.LayerNorm(width, eps=c.norm_eps)
        self.mlp = _VisionMLP(width, int(width * c.mlp_ratio), c.act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _VisionEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(_VisionLayer(c, c.width) for _ in range(c.layers))


class JanusVisionModel(nn.Module):
    """transformers' `JanusVisionModel` (SigLIP): pixel values (B, 3, R, R) -> (B, N, width), after the
    final LayerNorm (its `last_hidden_state`, what Janus's aligner reads)."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = _VisionEmbeddings(c.width, c.image_size, c.patch_size)
        self.encoder = _VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class JanusMLP(nn.Module):
    """transformers' `JanusVisionAlignerMLP` / `JanusVQVAEAlignerMLP`: fc1, then (activation, Linear) x (depth - 1)."""

    def __init__(self, d_in: int, d_out: int, depth: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(d_in, d_out)
        self.hidden_layers = nn.ModuleList(nn.Linear(d_out, d_out) for _ in range(1, depth))

    def forward(self, x):
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x


class JanusHead(nn.Module):
    """transformers' `JanusVQVAEHead`: image-code logits = vision_head(act(proj_out(h)))."""

    def __init__(self, d_model: int, hidden: int, codes: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.proj_out = nn.Linear(d_model, hidden)
        self.vision_head = nn.Linear(hidden, codes)

    def forward(self, h):
        return self.vision_head(self.act(self.proj_out(h)))


# =================================================================================================
# The interface
# =================================================================================================
class JanusImages(ModalityInterface):
    fusion, representation = "early", "decoupled"
    capabilities = ("M2T", "M2G", "M2M")
    emits_codes = True

    def __init__(self, cfg, vocab, name="image"):
        super().__init__(cfg, vocab, name)
        c, D = cfg.janus, cfg.d_model
        grid = c.image_size // c.patch_size
        if c.image_size % c.patch_size or grid * grid != self.spec.tokens_per_item:
            raise ValueError(f"model.janus: a {c.image_size} px image in {c.patch_size} px patches is {grid}x{grid} "
                             f"features, but an {name} item is {self.spec.tokens_per_item} codes")
        if c.width % c.heads:
            raise ValueError(f"model.janus: width {c.width} is not divisible by heads {c.heads}")
        self.vision_model = JanusVisionModel(c)
        self.aligner = JanusMLP(c.width, D, c.aligner_depth, c.act)
        self.generation_embeddings = nn.Embedding(self.spec.codes, c.code_dim)
        self.generation_aligner = JanusMLP(c.code_dim, D, c.gen_aligner_depth, c.gen_act)
        self.generation_head = JanusHead(D, D, self.spec.codes, c.gen_act)
        self.image_size = c.image_size
        self.register_buffer("pixel_lut", pixel_table(c.rescale, c.image_mean, c.image_std), persistent=False)

    # ---- input side -------------------------------------------------------------------------
    def pixels(self, pictures: torch.Tensor) -> torch.Tensor:
        """(n, R, R, 3) uint8 -> (n, 3, R, R) SigLIP input, bit for bit what Janus's image processor gives."""
        x = pictures.to(self.pixel_lut.device).permute(0, 3, 1, 2).long()
        return torch.stack([self.pixel_lut[ch][x[:, ch]] for ch in range(3)], 1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, R, R) pixel values -> (n, N, d_model): Janus's `get_image_features` (SigLIP, then the aligner)."""
        return self.aligner(self.vision_model(pixel_values))

    def code_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...) -> (..., d_model): Janus's `prepare_embeddings_for_image_generation`."""
        return self.generation_aligner(self.generation_embeddings(codes))

    def embed(self, x, ids, layout, generated, image_inputs):
        if generated is None:  # inference: a prompt chunk holds read images, a one-token step a generated code
            generated = torch.full_like(layout.is_code, ids.shape[1] == 1)
        write = layout.is_code & generated
        if torch.compiler.is_compiling() or bool(write.any()):
            codes = torch.where(write, self.vocab.codes(self.name, ids), 0)
            x = torch.where(write.unsqueeze(-1), self.code_embedding(codes).to(x.dtype), x)
        read = layout.is_code & ~generated & (layout.item >= 0)
        if not torch.compiler.is_compiling() and bool(read.any()):  # the picture memory is host-side
            grids, present, _ = image_grids(ids, layout, self.vocab, select=read)  # (B, I, N)
            B, I, N = grids.shape
            pictures = PICTURES.pictures(grids[present].cpu(), self.spec.codes, self.image_size)
            feats = self.features(self.pixels(pictures).to(x.device))  # (n, N, D)
            per_item = x.new_zeros(B, I, N, x.shape[-1])
            per_item[present] = feats.to(x.dtype)
            x = torch.where(read.unsqueeze(-1), at_positions(per_item, layout), x)
        return x

    # ---- output side ------------------------------------------------------------------------
    def logits(self, h):
        return self.generation_head(h)

    def loss(self, h, targets, layout, generated, image_inputs, z_loss):
        counts = self.vocab.is_modality(self.name, targets)  # positions whose next token is one of our codes
        keep, (h, targets) = loss_rows(counts, h, targets)
        logits = self.logits(h).float()
        codes = torch.where(self.vocab.is_modality(self.name, targets), self.vocab.codes(self.name, targets), 0)
        log_z = torch.logsumexp(logits, -1)
        picked = logits.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
        return {self.name: LossTerm.masked(log_z - picked, keep, z_loss * log_z.pow(2))}
