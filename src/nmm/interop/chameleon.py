"""Chameleon <-> nmm: `ChameleonForConditionalGeneration` checkpoints in, nmm early-fusion runs out.

Chameleon (Meta, 2024) is exactly the model nmm's default variant describes: early fusion, images as
discrete VQ codes in the same token stream as text, one transformer and one softmax. What differs is
bookkeeping, and this adapter (one file per family, like torchtitan's `state_dict_adapter.py`) maps it:

- **Token ids.** Chameleon's 65536 ids are one BPE vocabulary in which the 8192 image codes are
  tokens named `IMGIMG<code in letters>Z` (ids 4..8195 in the release) and `<racm3:break>` /
  `<eoss>` open and close an image. nmm's layout is text ids, then `<pad> <bos> <eos> <boi> <eoi>`,
  then the codes in code order. `ChameleonIds` is the bijection: every Chameleon id that is not an
  image token or one of those five specials becomes an nmm text id (in Chameleon's order), the five
  specials go to nmm's special slots, image token of code c to nmm code c (decoded from its name as
  transformers' `ChameleonImageVocabularyMapping` does). Embedding and LM-head rows are permuted
  accordingly, so the logits are the same function with columns reordered; `export` inverts it.
- **The text tokenizer.** Chameleon's `tokenizer.json` is rewritten with the same bijection (image
  tokens and the five specials leave the text vocabulary, merges that would make them are dropped,
  no BOS post-processor: nmm adds `<bos>` itself), so nmm's `TextTokenizer` wraps Chameleon's own
  BPE and gives Chameleon's ids for any text (mapped).
- **Architecture.** Chameleon's QK-norm is a LayerNorm with per-head weight and bias, and its 30B
  recipe (`swin_norm`) normalises sublayer outputs: `ModelConfig.qk_norm_kind=layernorm-per-head` and
  `norm_order=swin`. Everything else is nmm's backbone as it is (RMSNorm, rotate-half RoPE, GQA, SwiGLU).
- **The image tokenizer.** `ChameleonVQCodec` is nmm's image codec over Chameleon's VQ-VAE encoder
  and quantiser, ported to plain torch (the same ops in the same order as transformers'
  `ChameleonVQVAE`, so the same pixels give the same codes). transformers' checkpoint has **no VQ
  decoder** (its converter drops it: "we dont do image generation yet"), so codes cannot be turned back
  into pixels: `decode` says so. nmm generates image codes (the engine lifts the image-token mask
  transformers applies); turning them into pixels needs Meta's original `vqgan.ckpt` decoder.

Conversion streams (`nmm.interop.common`): shard by shard with `safe_open`, straight into the output
file, so it needs about the largest shard of memory, not the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from nmm.config import (
    ModelConfig,
    _build,
)
from nmm.errors import CheckpointError, ConfigError, InputError
from nmm.interop.common import (
    AttnBlock,
    Checkpoint,
    Downsample,
    Piece,
    ResnetBlock,
    StreamingWriter,
    convert,
    images_per_call,
    load_tokenizer_json,
    lut_pixels,
    peak_rss_mb,
    read_json,
    read_vq_weights,
    resolve_precision,
    row_runs,
    save_vq,
    staged_dir,
    take,
    tokenizer_over_ids,
    tokenizer_tokens,
    unified_tokenizer_json,
    write_imported_run,
)
from nmm.modalities.base import ModalitySpec, register_codec
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel
from nmm.utils import atomic_write_json, atomic_write_text

ARCHITECTURES = ("ChameleonForConditionalGeneration", "ChameleonForCausalLM")  # the second: transformers < 4.44
IMAGE_TOKEN_PREFIX = "IMGIMG"
# nmm's specials -> the Chameleon tokens they are (`<boi>`/`<eoi>` as ChameleonProcessor names them).
BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"
IDS_FILE = "chameleon_ids.json"  # the id bijection of an imported run
SOURCE_DIR = "chameleon"  # an imported run keeps the source's config and tokenizer files here, for export
VQ_CONFIG_FILE, VQ_WEIGHTS_FILE = "chameleon_vq.json", "chameleon_vq.safetensors"
VQ_PREFIX = "model.vqmodel."
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
                "chat_template.json", "chat_template.jinja")


# =================================================================================================
# The source's config
# =================================================================================================
def read_config(src: Path) -> dict:
    """config.json of a Chameleon checkpoint, checked for what nmm can represent exactly; every
    refusal names the file and the field."""
    path = src / "config.json"
    cfg = read_json(path, "a Hugging Face model directory's config")
    if cfg.get("model_type") != "chameleon":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not Chameleon's 'chameleon' "
                              "(nmm imports ChameleonForConditionalGeneration checkpoints here)")
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(ARCHITECTURES):
        raise CheckpointError(f"{path}: architectures {archs} has none of {', '.join(ARCHITECTURES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise CheckpointError(f"{path}: '{key}' must be a positive integer, got {cfg.get(key)!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{path}: '{key}' is true; nmm's projections have no bias")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: 'hidden_act' is {cfg['hidden_act']!r}; nmm's SwiGLU uses silu")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise CheckpointError(f"{path}: 'head_dim' {head_dim} x heads != hidden_size; nmm needs head_dim = d_model / heads")
    rope_theta, rope_type = _rope(cfg, path)
    if rope_type != "default":
        raise CheckpointError(f"{path}: rope type {rope_type!r}; nmm implements plain RoPE ('default')")
    if not isinstance(cfg.get("vocabulary_map"), dict) or not cfg["vocabulary_map"]:
        raise CheckpointError(f"{path}: no 'vocabulary_map' (token -> id); it is what says which ids are image codes")
    if not isinstance(cfg.get("vq_config"), dict):
        raise CheckpointError(f"{path}: no 'vq_config' (the image tokenizer's settings)")
    return cfg


def _rope(cfg: dict, path: Path) -> tuple[float, str]:
    """(theta, type) from transformers 5's `rope_parameters` or 4.x's `rope_theta` / `rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(theta, (int, float)):
        raise CheckpointError(f"{path}: 'rope_theta' must be a number, got {theta!r}")
    return float(theta), kind


def model_config(cfg: dict) -> ModelConfig:
    """Chameleon's config.json -> the nmm ModelConfig of the same network."""
    return ModelConfig(
        fusion="early", image_repr="discrete", routing="dense",
        d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_hidden=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
        rope_theta=_rope(cfg, Path("config.json"))[0], qk_norm=True, qk_norm_kind="layernorm-per-head",
        norm_order="swin" if cfg.get("swin_norm") else "pre", norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        factorised_image_head=False, init_std=float(cfg.get("initializer_range", 0.02)),
    )


# =================================================================================================
# Token ids: Chameleon's vocabulary <-> nmm's layout
# =================================================================================================
def image_token_name(code: int) -> str:
    """Code 1234 -> "IMGIMGBCDEZ": the digits as letters A-J, then a closing letter (dropped by readers)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_of(name: str) -> int | None:
    """The inverse, as transformers' `ChameleonImageVocabularyMapping.bpe2img` reads it (None: not a code)."""
    digits = name[len(IMAGE_TOKEN_PREFIX):-1]
    if not digits or any(not "A" <= c <= "J" for c in digits):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in digits))


@dataclass
class ChameleonIds:
    """The bijection between an nmm vocabulary and a Chameleon vocabulary: `nmm_to_hf[j]` is the
    Chameleon id of nmm id j (text ids, then the specials, then image codes in code order)."""

    hf_vocab_size: int
    nmm_to_hf: list[int]

    def __post_init__(self):
        if sorted(self.nmm_to_hf) != list(range(self.hf_vocab_size)):
            raise CheckpointError(f"{IDS_FILE}: the id map is not a bijection onto Chameleon's {self.hf_vocab_size} ids")
        self._to_hf = torch.tensor(self.nmm_to_hf, dtype=torch.long)
        self._to_nmm = torch.empty_like(self._to_hf)
        self._to_nmm[self._to_hf] = torch.arange(len(self.nmm_to_hf))

    def to_hf(self, ids):
        """nmm ids (tensor, array, list or int) -> Chameleon ids, same type of container."""
        return take(self._to_hf, ids)

    def to_nmm(self, ids):
        return take(self._to_nmm, ids)

    @property
    def hf_to_nmm(self) -> list[int]:
        return self._to_nmm.tolist()

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"format": 1, "hf_vocab_size": self.hf_vocab_size, "nmm_to_hf": self.nmm_to_hf})

    @classmethod
    def load(cls, path: Path) -> ChameleonIds:
        d = read_json(path, "the id map of an imported Chameleon run")
        try:
            return cls(int(d["hf_vocab_size"]), [int(i) for i in d["nmm_to_hf"]])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt id map ({e.__class__.__name__}: {e})") from None

    @classmethod
    def identity(cls, size: int) -> ChameleonIds:
        return cls(size, list(range(size)))


@dataclass
class ChameleonVocabulary:
    """What a Chameleon checkpoint's vocabulary says: the image token of every code, the five ids nmm
    has specials for, and the resulting id map."""

    vocab: Vocabulary
    ids: ChameleonIds
    specials: dict[str, int]  # nmm special name -> Chameleon id
    image_ids: list[int]  # code -> Chameleon id


def chameleon_vocabulary(cfg: dict, tokenizer_config: dict, spec: ModalitySpec, path: Path) -> ChameleonVocabulary:
    """Read the image-token range and the specials from config.json's `vocabulary_map` (the tokenizer's
    token -> id table transformers stores there), and lay out nmm's vocabulary around them."""
    vocab_map: dict[str, int] = cfg["vocabulary_map"]
    V = cfg["vocab_size"]
    codes: dict[int, int] = {}
    for name, i in vocab_map.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            code = image_code_of(name)
            if code is None:
                raise CheckpointError(f"{path}: vocabulary_map token {name!r} looks like an image token but "
                                      "does not name a code (IMGIMG + digits as letters A-J + one letter)")
            codes[code] = int(i)
    if sorted(codes) != list(range(spec.codes)):
        raise CheckpointError(f"{path}: vocabulary_map has {len(codes)} image tokens (IMGIMG...), but "
                              f"vq_config.num_embeddings is {spec.codes}: every code needs exactly one token")
    image_ids = [codes[c] for c in range(spec.codes)]

    def token_id(field_name: str, default_token: str) -> int:
        token = tokenizer_config.get(field_name) or default_token
        token = token.get("content") if isinstance(token, dict) else token
        if token not in vocab_map:
            raise CheckpointError(f"{path}: vocabulary_map has no {token!r} (Chameleon's {field_name})")
        return int(vocab_map[token])

    def config_id(key: str, token: str) -> int:
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            if token not in vocab_map:
                raise CheckpointError(f"{path}: '{key}' is not set and vocabulary_map has no {token!r}")
            return int(vocab_map[token])
        return int(value)

    specials = {"<pad>": config_id("pad_token_id", "<pad>"), "<bos>": config_id("bos_token_id", "<s>"),
                "<eos>": config_id("eos_token_id", "</s>"), "<boi>": token_id("boi_token", BOI_TOKEN),
                "<eoi>": token_id("eoi_token", EOI_TOKEN)}
    taken = set(image_ids)
    for name, i in specials.items():
        if not 0 <= i < V or i in taken:
            raise CheckpointError(f"{path}: the id of {name} ({i}) is out of range or an image token or another special")
        taken.add(i)
    if max(image_ids) >= V:
        raise CheckpointError(f"{path}: image token ids reach {max(image_ids)}, past vocab_size {V}")
    text = [i for i in range(V) if i not in taken]
    vocab = Vocabulary(len(text), (spec,))
    by_name = [specials[s] for s in vocab.specials]  # nmm's special order (<pad> <bos> <eos> <boi> <eoi>)
    return ChameleonVocabulary(vocab, ChameleonIds(V, text + by_name + image_ids), specials, image_ids)


def text_tokenizer_json(tokenizer: dict, hf: ChameleonVocabulary, path: Path) -> dict:
    """Chameleon's tokenizer.json -> the same tokenizer over nmm's text ids only.

    Every kept token gets its nmm id in the model vocabulary (ids contiguous from 0, as `tokenizers`
    needs: an added token missing from the model vocabulary is given the next free id whatever its
    JSON says); an id Chameleon assigns no token gets a placeholder. Merges producing a removed token
    (an image token, one of the five specials) are dropped, so text never becomes an image code. No
    post-processor: nmm's prompts add `<bos>`."""
    id_to_token = tokenizer_tokens(tokenizer, path)
    for code, i in enumerate(hf.image_ids):  # config.json's vocabulary_map and the tokenizer must agree
        if id_to_token.get(i, image_token_name(code)) != image_token_name(code):
            raise CheckpointError(f"{path}: id {i} is {id_to_token[i]!r}, but config.json's vocabulary_map makes it "
                                  f"image code {code} ({image_token_name(code)!r})")
    return tokenizer_over_ids(tokenizer, hf.ids.nmm_to_hf[:hf.vocab.n_text], path, "<chameleon:unused:{}>")


load_text_tokenizer = load_tokenizer_json  # a rewritten tokenizer.json -> nmm's TextTokenizer, checked


# =================================================================================================
# The image codec: Chameleon's VQ-VAE encoder and quantiser
# =================================================================================================
@dataclass
class ChameleonVQConfig:
    """transformers' `ChameleonVQVAEConfig` fields, plus the image processor's pixel scaling
    (value = (uint8 * rescale - mean) / std; Chameleon's processor: 0.0078, mean 1, std 1)."""

    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    attn_type: str = "vanilla"
    double_latent: bool = False
    latent_channels: int = 256
    embed_dim: int = 256
    num_embeddings: int = 8192
    rescale: float = 0.0078
    mean: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    @property
    def image_size(self) -> int:  # what Pipeline checks images against
        return self.resolution

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @classmethod
    def from_hf(cls, vq: dict, preprocessor: dict) -> ChameleonVQConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in vq.items() if k in known}
        values["attn_resolutions"] = list(values.get("attn_resolutions") or [])
        values["channel_multiplier"] = list(values.get("channel_multiplier", cls().channel_multiplier))
        if preprocessor:
            if preprocessor.get("do_rescale", True):
                values["rescale"] = float(preprocessor.get("rescale_factor", 0.0078))
            else:
                values["rescale"] = 1.0
            if preprocessor.get("do_normalize", True):
                values["mean"] = [float(x) for x in _three(preprocessor.get("image_mean", [1.0] * 3))]
                values["std"] = [float(x) for x in _three(preprocessor.get("image_std", [1.0] * 3))]
            else:
                values["mean"], values["std"] = [0.0] * 3, [1.0] * 3
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, d: dict) -> ChameleonVQConfig:
        cfg = _build(cls, d, "chameleon_vq")
        if cfg.resolution % cfg.downsample:
            raise ConfigError(f"chameleon_vq: resolution {cfg.resolution} is not divisible by {cfg.downsample}")
        if cfg.in_channels != 3:
            raise ConfigError(f"chameleon_vq: in_channels {cfg.in_channels}; nmm's images are RGB")
        return cfg


def _three(x) -> list:
    return list(x) * 3 if len(x) == 1 else list(x)


def vq_spec(cfg: ChameleonVQConfig) -> ModalitySpec:
    """The image modality of a Chameleon vocabulary: num_embeddings codes, one per cell of the grid."""
    return image_spec(cfg.num_embeddings, (), cfg.grid * cfg.grid, ())


class _Encoder(nn.Module):
    """Module names match transformers' `ChameleonVQVAEEncoder`, so weights load by name."""

    def __init__(self, c: ChameleonVQConfig):
        super().__init__()
        mult_in = (1, *c.channel_multiplier)
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        res, ch = c.resolution, c.base_channels
        for level, mult in enumerate(c.channel_multiplier):
            stage = nn.Module()
            ch_in, ch = c.base_channels * mult_in[level], c.base_channels * mult
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(ch_in, ch))
                ch_in = ch
                if res in c.attn_resolutions and c.attn_type == "vanilla":
                    stage.attn.append(AttnBlock(ch))
            if level != len(c.channel_multiplier) - 1:
                stage.downsample = Downsample(ch)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(ch, ch)
        self.mid.attn_1 = AttnBlock(ch) if c.attn_type == "vanilla" else nn.Identity()
        self.mid.block_2 = ResnetBlock(ch, ch)
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels if c.double_latent else c.latent_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, R, R) -> (B, latent, R/f, R/f)
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


class _Quantizer(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)

    def forward(self, z):  # (B, D, h, w) -> codes (B, h*w), nearest codebook row (same distance formula)
        B = z.shape[0]
        flat = z.permute(0, 2, 3, 1).contiguous().view(-1, z.shape[1])
        e = self.embedding.weight
        d = (torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", flat, e.t()))  # (B*h*w, n): |z|^2 + |e|^2 - 2 z.e
        return torch.argmin(d, dim=1).view(B, -1)


class ChameleonVQCodec(nn.Module):
    """nmm's image codec over Chameleon's VQ-VAE: (B, R, R, 3) uint8 -> (B, grid*grid) codes, row-major.
    Encode only: the Hugging Face checkpoint carries no decoder (see the module docstring)."""

    codec_kind = "chameleon_vq"  # codecs.json names this class for the run's image modality
    can_decode = False  # no decoder in the checkpoint: the server refuses picture requests up front

    def __init__(self, config: ChameleonVQConfig | None = None):
        super().__init__()
        self.config = c = config or ChameleonVQConfig()
        self.encoder = _Encoder(c)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.embed_dim, 1)
        self.quantize = _Quantizer(c.num_embeddings, c.embed_dim)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.latent_channels, 1)  # the decoder's first layer: kept, unused
        self.extra: dict[str, torch.Tensor] = {}  # tensors of the source's VQ model no module here uses
        self.register_buffer("pixel_lut", _pixel_lut(c), persistent=False)  # (3, 256)

    @property
    def spec(self) -> ModalitySpec:
        return vq_spec(self.config)

    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, R, R, 3) uint8 -> (B, 3, R, R) float pixel values, as Chameleon's image processor gives them."""
        return lut_pixels(self.pixel_lut, images, self.config.resolution)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) float -> (B, N) codes: transformers' `vqmodel.encode(...).image_tokens`."""
        dtype = self.quant_conv.weight.dtype
        return self.quantize(self.quant_conv(self.encoder(pixel_values.to(self._device(), dtype))))

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, R, R, 3) -> LongTensor codes (B, grid*grid), a few images at a time (a 512 px
        image takes ~1 GB of activations)."""
        per = images_per_call(self.config.resolution)
        x = self.pixels(images)
        return torch.cat([self.encode_pixels(x[i : i + per]).cpu() for i in range(0, len(x), per)]) if len(x) \
            else torch.zeros(0, self.spec.tokens_per_item, dtype=torch.long)

    def decode(self, codes):
        raise InputError("Chameleon's image decoder is not part of its Hugging Face checkpoint (transformers "
                         "keeps only the VQ encoder), so nmm cannot turn image codes into pixels: use the "
                         "codes (Pipeline.item_codes) or Meta's original vqgan.ckpt decoder")

    def to_bytes(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Image file bytes -> (R, R, 3) uint8: shortest edge resized to R (Lanczos), centre crop, as
        Chameleon's image processor does."""
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"not a readable image ({e.__class__.__name__}: {e})") from None
        return resize_and_crop(image, self.config.resolution)

    def _device(self) -> torch.device:
        return self.quant_conv.weight.device

    # ---- persistence: chameleon_vq.json + chameleon_vq.safetensors (transformers' names, no prefix) ----
    def save(self, run_dir: str | os.PathLike) -> None:
        save_vq({**self.extra, **self.state_dict()}, self.config, run_dir, (VQ_CONFIG_FILE, VQ_WEIGHTS_FILE))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> ChameleonVQCodec:
        path = Path(run_dir)
        cfg = ChameleonVQConfig.from_dict(read_json(path / VQ_CONFIG_FILE, "the Chameleon image tokenizer's settings"))
        codec, tensors, own = read_vq_weights(cls, cfg, path / VQ_WEIGHTS_FILE, "the Chameleon image tokenizer")
        codec.load_state_dict({k: tensors[k].float() for k in own}, assign=True)
        codec.pixel_lut = _pixel_lut(cfg)  # a buffer, not saved: built on the meta device above
        codec.extra = {k: v for k, v in tensors.items() if k not in own}
        return codec.eval()


def _pixel_lut(c: ChameleonVQConfig) -> torch.Tensor:
    """(3, 256) model input of every uint8 value per channel, rounded as transformers' image processor
    rounds it (rescale in float64, cast, normalise in float32), so the VQ sees bit-identical pixels."""
    v = (torch.arange(256, dtype=torch.float64) * c.rescale).float()[None]
    return (v - torch.tensor(c.mean, dtype=torch.float32)[:, None]) / torch.tensor(c.std, dtype=torch.float32)[:, None]


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    w, h = image.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        image = image.resize(new, Image.LANCZOS)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).copy()


register_codec(ChameleonVQCodec.codec_kind, ChameleonVQCodec)


# =================================================================================================
# Weights: the name map (transformers <-> nmm), both directions
# =================================================================================================
def _layer_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(nmm name, transformers name) of every backbone tensor that maps one to one."""
    pairs = [("backbone.norm.weight", "model.norm.weight")]
    for i in range(cfg.n_layers):
        n, h = f"backbone.blocks.{i}.", f"model.layers.{i}."
        pairs += [
            (n + "attn_norm.weight", h + "input_layernorm.weight"),
            (n + "ffn_norm.weight", h + "post_attention_layernorm.weight"),
            (n + "attn.wq.weight", h + "self_attn.q_proj.weight"),
            (n + "attn.wk.weight", h + "self_attn.k_proj.weight"),
            (n + "attn.wv.weight", h + "self_attn.v_proj.weight"),
            (n + "attn.wo.weight", h + "self_attn.o_proj.weight"),
            (n + "attn.q_norm.weight", h + "self_attn.q_norm.weight"),  # (H * hd,) in nmm, (H, hd) in HF
            (n + "attn.q_norm.bias", h + "self_attn.q_norm.bias"),
            (n + "attn.k_norm.weight", h + "self_attn.k_norm.weight"),
            (n + "attn.k_norm.bias", h + "self_attn.k_norm.bias"),
            (n + "ffn.w_gate.weight", h + "mlp.gate_proj.weight"),
            (n + "ffn.w_up.weight", h + "mlp.up_proj.weight"),
            (n + "ffn.w_down.weight", h + "mlp.down_proj.weight"),
        ]
    return pairs


TEXT_EMBED, TEXT_HEAD = "text_embed.weight", "text_head.proj.weight"
CODE_EMBED, CODE_HEAD = "modalities.image.embed_codes.tables.0.weight", "modalities.image.head.proj.0.weight"
HF_EMBED, HF_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def nmm_layout(cfg: ModelConfig, vocab: Vocabulary) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the nmm model, from a model built on the meta device (no memory):
    the conversion is checked against the model itself, not against a copy of its names."""
    with torch.device("meta"):
        model = NativeMultimodalModel(cfg, vocab)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_plan(layout: dict, pieces: list[Piece]) -> None:
    planned = {p.dst for p in pieces}
    if planned != set(layout):
        missing, extra = sorted(set(layout) - planned), sorted(planned - set(layout))
        raise CheckpointError(f"nmm's model has tensors the Chameleon map does not fill ({missing[:3]}) or the "
                              f"map fills tensors it does not have ({extra[:3]}): nmm.interop.chameleon is out of date")


# =================================================================================================
# Import
# =================================================================================================
def import_chameleon(src_dir: str | Path, dst_run: str | Path, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False) -> dict:
    """A local `ChameleonForConditionalGeneration` directory (config.json, safetensors weights, one file
    or shards with model.safetensors.index.json, tokenizer.json) -> an nmm run directory that
    `nmm.load` reads. `dtype` ("bf16", "fp32", None = keep the checkpoint's) is what the weights are
    stored in. Streams: memory stays near the largest shard. Returns what it did (sizes, time, peak RSS)."""
    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_run)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    hf = read_config(src)
    precision = resolve_precision(dtype)
    tokenizer = read_json(src / "tokenizer.json", "Chameleon's text tokenizer")
    tok_cfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    pre = read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
    vq = ChameleonVQConfig.from_hf(hf["vq_config"], pre)
    cv = chameleon_vocabulary(hf, tok_cfg, vq_spec(vq), src / "config.json")
    text = load_text_tokenizer(text_tokenizer_json(tokenizer, cv, src / "tokenizer.json"), cv.vocab.n_text,
                               src / "tokenizer.json")
    cfg = model_config(hf)
    ck = Checkpoint(src)
    head = HF_HEAD if HF_HEAD in ck else HF_EMBED  # tied weights keep one table
    if head == HF_EMBED and not hf.get("tie_word_embeddings", False):
        raise CheckpointError(f"{src}: no tensor {HF_HEAD!r} and tie_word_embeddings is false")

    # ---- the plan: which rows of which tensor go where --------------------------------------------
    T = cv.vocab.text_size
    text_rows, code_rows = cv.ids.nmm_to_hf[:T], cv.ids.nmm_to_hf[T:]  # nmm row i <- Chameleon row rows[i]
    pieces = []
    for dst_name, src_name, rows in ((TEXT_EMBED, HF_EMBED, text_rows), (CODE_EMBED, HF_EMBED, code_rows),
                                     (TEXT_HEAD, head, text_rows), (CODE_HEAD, head, code_rows)):
        pieces += [Piece(dst_name, src_name, d, (s, s + n)) for d, s, n in row_runs(rows)]
    pieces += [Piece(n, h) for n, h in _layer_names(cfg)]
    shapes = nmm_layout(cfg, cv.vocab)
    _check_plan(shapes, pieces)
    for name in {p.src for p in pieces}:
        ck.info(name)  # a clear error for a tensor the checkpoint lacks
    if ck.info(HF_EMBED).shape != (hf["vocab_size"], cfg.d_model):
        raise CheckpointError(f"{src}: {HF_EMBED} has shape {ck.info(HF_EMBED).shape}, config.json says "
                              f"({hf['vocab_size']}, {cfg.d_model})")
    vq_names = ck.names(VQ_PREFIX)
    if not vq_names:
        raise CheckpointError(f"{src}: the checkpoint has no {VQ_PREFIX}* tensors (Chameleon's image tokenizer)")
    vq_layout = {n[len(VQ_PREFIX):]: (torch.float32, ck.info(n).shape) for n in vq_names}  # small: fp32 for parity
    return write_imported_run(
        src, dst, family="chameleon", overwrite=overwrite, t0=t0, ck=ck, pieces=pieces, shapes=shapes,
        precision=precision, vq_layout=vq_layout, vq_pieces=[Piece(n[len(VQ_PREFIX):], n) for n in vq_names],
        vq_config=vq, vq_files=(VQ_CONFIG_FILE, VQ_WEIGHTS_FILE), codec_kind=ChameleonVQCodec.codec_kind,
        text=text, vocab=cv.vocab, cfg=cfg, ids=cv.ids, ids_file=IDS_FILE, source_dir=SOURCE_DIR,
        source_files=SOURCE_FILES,
        vocab_summary={"hf_vocab_size": hf["vocab_size"], "n_text": cv.vocab.n_text,
                       "image_codes": vq.num_embeddings, "tokens_per_image": vq.grid**2})


# =================================================================================================
# Export
# =================================================================================================
def export_chameleon(run_dir: str | Path, dst_dir: str | Path, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False) -> dict:
    """An nmm early-fusion run with discrete image codes -> a directory that
    `ChameleonForConditionalGeneration.from_pretrained` loads (config.json, model.safetensors,
    tokenizer files), computing the same logits.

    An imported run goes back to Chameleon's own ids, tokenizer files and VQ weights (a round trip
    is exact). A run nmm trained keeps its ids (text, specials, image codes: Chameleon's layout has no
    fixed places) and gets a tokenizer.json built from its own; its image tokenizer is nmm's, not a
    Chameleon VQ-VAE, so the export carries no `model.vqmodel` weights (transformers initialises a
    placeholder VQ model and says so) and the run's codecs are saved beside, under `nmm_codecs/`, to
    turn pictures into the image-token ids the exported model reads. Streams like the import."""
    t0 = time.perf_counter()
    run, dst = Path(run_dir), Path(dst_dir)
    cfg = _build(ModelConfig, read_json(run / "model.json", "the run's model config"))
    _check_exportable_model(cfg, run / "model.json")
    try:
        vocab = Vocabulary.from_dict(read_json(run / "vocab.json", "the run's vocabulary"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run / 'vocab.json'}: corrupt ({e.__class__.__name__}: {e})") from None
    if vocab.names != ("text", "image") or not vocab.spec("image").fixed_length:
        raise CheckpointError(f"{run / 'vocab.json'}: modalities {list(vocab.names)}; a Chameleon checkpoint holds "
                              "text and fixed-length images only")
    precision = resolve_precision(dtype)
    imported = (run / IDS_FILE).is_file()
    ids = ChameleonIds.load(run / IDS_FILE) if imported else ChameleonIds.identity(vocab.size)
    if len(ids.nmm_to_hf) != vocab.size:
        raise CheckpointError(f"{run / IDS_FILE}: maps {len(ids.nmm_to_hf)} ids, vocab.json has {vocab.size}")
    weights = Checkpoint(run)
    D, hd, T = cfg.d_model, cfg.d_model // cfg.n_heads, vocab.text_size
    spec = vocab.spec("image")
    factors = spec.code_factors if cfg.factorised_image_head else (spec.codes,)
    # Chameleon row r holds nmm id hf_to_nmm[r]: a text/special row (< T) or a code row.
    order = ids.hf_to_nmm
    text_rows = [(r, j) for r, j in enumerate(order) if j < T]
    code_rows = [(r, j - T) for r, j in enumerate(order) if j >= T]
    pieces, computed = [], []
    for hf_name, text_name, code_prefix in ((HF_EMBED, TEXT_EMBED, "modalities.image.embed_codes.tables."),
                                            (HF_HEAD, TEXT_HEAD, "modalities.image.head.proj.")):
        pieces += _runs(hf_name, text_name, text_rows)
        if len(factors) == 1:
            pieces += _runs(hf_name, code_prefix + "0.weight", code_rows)
        else:  # factorised: the row of code c is the sum of its factors' rows (exact: logits are linear in h)
            computed.append((hf_name, _joint_table(weights, code_prefix, factors)))
    layers = _layer_names(cfg)
    pieces += [Piece(h, n) for n, h in layers]
    for piece in pieces:
        weights.info(piece.src)  # a clear error for a tensor the run lacks
    shapes = {HF_EMBED: (ids.hf_vocab_size, D), HF_HEAD: (ids.hf_vocab_size, D)}
    for n, h in layers:
        heads = cfg.n_heads if ".q_norm." in h else cfg.n_kv_heads if ".k_norm." in h else None
        shapes[h] = (heads, hd) if heads else weights.info(n).shape  # per-head norms are (heads, head_dim) there
    src_dtype = weights.info(TEXT_EMBED).dtype
    layout = {n: (precision or src_dtype, s) for n, s in shapes.items()}
    vq = Checkpoint(run, shards=[VQ_WEIGHTS_FILE]) if imported else None
    vq_pieces = []
    if vq is not None:
        for name in vq.names():
            layout[VQ_PREFIX + name] = (precision or src_dtype, vq.info(name).shape)
            vq_pieces.append(Piece(VQ_PREFIX + name, name))

    with staged_dir(dst, overwrite, "export") as tmp:
        with StreamingWriter(tmp / "model.safetensors", layout, {"format": "pt"}) as writer:
            convert(weights, pieces, writer)
            for hf_name, table in computed:
                for d, s, n in _pair_runs(code_rows):
                    writer.write(hf_name, table[s : s + n], d)
            if vq is not None:
                convert(vq, vq_pieces, writer)
        written = str(precision or src_dtype).replace("torch.", "")
        if imported:
            _write_imported_files(run, tmp, cfg, written)
        else:
            _write_native_files(run, tmp, cfg, vocab, written)
        summary = {"run": str(run.resolve()), "family": "chameleon", "imported": imported, "dtype": written,
                   "hf_vocab_size": ids.hf_vocab_size, "seconds": round(time.perf_counter() - t0, 3),
                   "peak_rss_mb": round(peak_rss_mb(), 1)}
        atomic_write_json(tmp / "nmm_export.json", summary)
    return summary


def _check_exportable_model(cfg: ModelConfig, where: Path) -> None:
    """Chameleon's architecture is fixed: refuse, naming the setting, what it cannot compute."""
    if cfg.variant != "early-discrete":
        raise CheckpointError(f"{where}: a Chameleon checkpoint is early fusion with discrete image codes; this run "
                              f"is {cfg.variant}")
    if cfg.routing != "dense":
        raise CheckpointError(f"{where}: routing {cfg.routing!r}; Chameleon's blocks are dense")
    if not cfg.qk_norm or cfg.qk_norm_kind != "layernorm-per-head":
        raise CheckpointError(f"{where}: Chameleon's attention has a per-head LayerNorm QK-norm, which no setting of it "
                              "turns into nmm's RMSNorm QK-norm (or none); train with model.qk_norm_kind="
                              "layernorm-per-head to export as Chameleon, or export the text backbone as Llama/Qwen3")
    if cfg.rope != "1d":
        raise CheckpointError(f"{where}: rope {cfg.rope!r}; Chameleon uses 1D RoPE")


def _pair_runs(pairs: list[tuple[int, int]]):
    """(dst row, src row) pairs sorted by dst row -> (first dst, first src, count) of consecutive runs."""
    i = 0
    while i < len(pairs):
        j = i + 1
        while j < len(pairs) and pairs[j][0] == pairs[j - 1][0] + 1 and pairs[j][1] == pairs[j - 1][1] + 1:
            j += 1
        yield pairs[i][0], pairs[i][1], j - i
        i = j


def _runs(dst: str, src: str, pairs: list[tuple[int, int]]) -> list[Piece]:
    return [Piece(dst, src, d, (s, s + n)) for d, s, n in _pair_runs(pairs)]


def _joint_table(weights: Checkpoint, prefix: str, factors: tuple[int, ...]) -> torch.Tensor:
    """(codes, D) rows of a factorised embedding or head: row c = sum_i table_i[c_i]. Only nmm-trained
    runs have factorised codes, and their tables are small, so this one is built in memory."""
    from safetensors import safe_open

    from nmm.modalities.base import split_codes

    with safe_open(str(weights.directory / weights.info(prefix + "0.weight").shard), framework="pt") as f:
        tables = [f.get_tensor(f"{prefix}{i}.weight") for i in range(len(factors))]
    codes = torch.arange(math.prod(factors))
    return sum(t[part] for t, part in zip(tables, split_codes(codes, factors)))


def _write_imported_files(run: Path, out: Path, cfg: ModelConfig, dtype: str) -> None:
    """The source's own config and tokenizer files, with the architecture fields from model.json (the
    same numbers unless the run was changed) and the dtype written."""
    source = run / SOURCE_DIR
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source / 'config.json'}: missing; an imported run keeps the source's files there")
    for f in SOURCE_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, out / f)
    config = read_json(source / "config.json")
    config.update(_architecture(cfg), dtype=dtype)
    config.pop("torch_dtype", None)
    atomic_write_json(out / "config.json", config)


def _architecture(cfg: ModelConfig) -> dict:
    return {"hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
            "swin_norm": cfg.norm_order == "swin", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False}


# nmm's specials as Chameleon's tokens
CHAMELEON_SPECIALS = {"<pad>": "<pad>", "<bos>": "<s>", "<eos>": "</s>", "<boi>": BOI_TOKEN, "<eoi>": EOI_TOKEN}


def _write_native_files(run: Path, out: Path, cfg: ModelConfig, vocab: Vocabulary, dtype: str) -> None:
    from nmm.modalities.codecs import Codecs

    tokenizer = chameleon_tokenizer_json(json.loads((run / "text_tokenizer.json").read_text()), vocab, run)
    atomic_write_text(out / "tokenizer.json", json.dumps(tokenizer, ensure_ascii=False))
    vocabulary_map = dict(tokenizer["model"]["vocab"])
    grid = math.isqrt(vocab.tokens_per_image)
    if grid * grid != vocab.tokens_per_image:
        raise CheckpointError(f"{run / 'vocab.json'}: {vocab.tokens_per_image} image tokens is not a square grid")
    config = {
        "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon", **_architecture(cfg),
        "vocab_size": vocab.size, "initializer_range": cfg.init_std, "attention_dropout": 0.0,
        "model_parallel_size": 1, "use_cache": True, "bos_token_id": vocab.bos, "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad, "vocabulary_map": vocabulary_map, "dtype": dtype,
        # A placeholder VQ model of the right code count and grid (transformers needs one to build the
        # model); its weights are not exported: nmm's image tokenizer is in nmm_codecs/.
        "vq_config": {"embed_dim": 8, "num_embeddings": vocab.image_codes, "double_latent": False,
                      "latent_channels": 8, "resolution": grid * 4, "in_channels": 3, "base_channels": 32,
                      "channel_multiplier": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                      "dropout": 0.0, "attn_type": "vanilla"},
    }
    atomic_write_json(out / "config.json", config)
    names = {k: CHAMELEON_SPECIALS[k] for k in ("<bos>", "<eos>", "<pad>")}
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["<bos>"], "eos_token": names["<eos>"],
        "pad_token": names["<pad>"], "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN,
        "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False})
    atomic_write_json(out / "special_tokens_map.json", {"bos_token": names["<bos>"], "eos_token": names["<eos>"],
                                                        "pad_token": names["<pad>"]})
    atomic_write_json(out / "generation_config.json", {"bos_token_id": vocab.bos, "eos_token_id": vocab.eos,
                                                       "pad_token_id": vocab.pad})
    Codecs.load(run).save(out / "nmm_codecs")


def chameleon_tokenizer_json(text_tokenizer: dict, vocab: Vocabulary, run: Path) -> dict:
    """nmm's text tokenizer -> a Chameleon-style tokenizer.json over the whole vocabulary: the specials
    as Chameleon's tokens at nmm's ids (`<s>`, `</s>`, `<pad>`, `<racm3:break>`, `<eoss>`), every image
    code as `IMGIMG...Z` at its id, a post-processor adding `<s>`, as Chameleon's tokenizer does."""
    return unified_tokenizer_json(text_tokenizer, vocab, CHAMELEON_SPECIALS, lambda name, c: image_token_name(c),
                                  bos=CHAMELEON_SPECIALS["<bos>"], source=run / "text_tokenizer.json")
