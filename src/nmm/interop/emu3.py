"""Emu3 -> nmm: `Emu3ForConditionalGeneration` checkpoints in, nmm early-fusion runs out.

Emu3 (BAAI, 2024) is, like Chameleon, one decoder-only transformer over one vocabulary in which images
are discrete VQ codes, so it is nmm's default variant (early fusion, discrete codes, dense). Its
backbone is Llama's (RMSNorm, rotate-half RoPE, GQA, SwiGLU, no QK-norm); what this adapter maps is
bookkeeping, and the image layout:

- **An image in Emu3's token stream** (transformers' `Emu3Processor` and `Emu3ImageVocabularyMapping`)
  is `<|image start|>`, the latent size as *text* ("64*64", BPE tokens), `<|image token|>`, then for
  each of the h rows its w visual tokens `<|visual token 000123|>` and an end-of-row token
  `<|extra_200|>`, then `<|extra_201|>` (end of frame) and `<|image end|>`. The size varies with the
  picture (`smart_resize` keeps its aspect ratio). nmm's modality contract is `begin`, a fixed number of
  codes, `end`; so an imported run has **one fixed resolution** (square, `image_size`, default the
  processor's `min_pixels` side: 512 px, a 64 x 64 grid, for the released checkpoints), and an nmm
  image item is everything between `<|image start|>` (nmm's `<boi>`) and `<|image end|>` (`<eoi>`):
  `len("64*64" tokens) + 1 + h * (w + 1) + 1` codes. The image modality's codes are the VQ codebook
  (codes 0..K-1 = visual tokens) followed by the *structure tokens* that appear inside an image (the
  size's text tokens, `<|image token|>`, end of row, end of frame). Size digits are also ordinary text,
  so their embedding and LM-head rows exist twice in nmm (a text id and a code id with the same
  Emu3 id): `Emu3Ids` maps nmm -> Emu3 exactly; Emu3 -> nmm picks the text id for those.
- **Generation.** nmm's state machine forces `<eoi>` after the item's codes but not the structure tokens
  inside it: the model writes the size, the row ends and the end of frame itself (a trained Emu3 puts
  them where its training put them; an untrained one anywhere). `Emu3VQCodec.decode` reads the visual
  codes at their fixed places and draws a structure token found where a visual code belongs as code 0.
  Forcing them needs a per-position forced code in the decoder's state machine (docs/checkpoints.md).
- **The image tokenizer** (`Emu3VQCodec`, codec kind `emu3_vq`): Emu3's VQ-VAE encoder, quantiser
  *and decoder*, ported to plain torch with transformers' module names, so its weights load by name and
  nmm.load never imports transformers. The same ops in the same order as transformers' `Emu3VQVAE`,
  with two shortcuts that change no value: a still image is encoded once and repeated over the
  temporal axis (transformers encodes the 4 identical frames), and only the first decoded frame (the one
  transformers returns for an image) goes through the 2D decoder. Pixels in are scaled as
  `Emu3ImageProcessor` scales them (bit-identical), pixels out as its `postprocess` rounds them.
- **The text tokenizer**: Emu3's byte-level BPE over nmm's text ids (`common.tokenizer_over_ids`); the
  visual and structure tokens and the five specials nmm has slots for (`<|endoftext|>` pad,
  `<|extra_203|>` bos, `<|extra_204|>` eos, `<|image start|>`, `<|image end|>`) leave it.

Conversion streams (`nmm.interop.common`), like Chameleon's.
"""

from __future__ import annotations

import io
import math
import os
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
from nmm.errors import CheckpointError, ConfigError
from nmm.interop.common import (
    Checkpoint,
    Piece,
    images_per_call,
    load_tokenizer_json,
    lut_pixels,
    pixel_lut,
    pixels_to_uint8,
    read_json,
    read_vq_weights,
    resolve_precision,
    row_runs,
    save_vq,
    take,
    tokenizer_over_ids,
    write_imported_run,
)
from nmm.interop.emu3_vqvae import Conv3d, Decoder, Encoder, Quantizer
from nmm.modalities.base import ModalitySpec, register_codec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel
from nmm.utils import atomic_write_json

ARCHITECTURES = ("Emu3ForConditionalGeneration",)
VISUAL_PREFIX = "<|visual token"  # "<|visual token 000123|>": code 123 (transformers reads token[-8:-2])
# Emu3's tokens for nmm's specials and an image's structure (tokenizer_config.json may rename them)
DEFAULT_TOKENS = {"boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                  "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>", "eol_token": "<|extra_200|>",
                  "bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>", "pad_token": "<|endoftext|>"}
IDS_FILE = "emu3_ids.json"  # the id map of an imported run
SOURCE_DIR = "emu3"  # the source's config, tokenizer and processor files, verbatim
VQ_CONFIG_FILE, VQ_WEIGHTS_FILE = "emu3_vq.json", "emu3_vq.safetensors"
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
                "chat_template.json", "chat_template.jinja")
# Tensor names: transformers 4.x and 5.x `save_pretrained` write the first, 5.x holds the second in memory.
TEXT_PREFIXES = ("text_model.model.", "model.text_model.")
HEAD_NAMES = ("text_model.lm_head.weight", "lm_head.weight")
VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# =================================================================================================
# The source's config
# =================================================================================================
def read_config(src: Path) -> dict:
    """config.json of an Emu3 checkpoint, checked for what nmm represents exactly; every refusal names
    the file and the field."""
    path = src / "config.json"
    cfg = read_json(path, "a Hugging Face model directory's config")
    if cfg.get("model_type") != "emu3":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not Emu3's 'emu3'")
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(ARCHITECTURES):
        raise CheckpointError(f"{path}: architectures {archs} has none of {', '.join(ARCHITECTURES)} "
                              "(Emu3ForCausalLM checkpoints carry no image tokenizer)")
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{path}: no 'text_config' (the language model's settings)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if not isinstance(text.get(key), int) or text[key] < 1:
            raise CheckpointError(f"{path}: 'text_config.{key}' must be a positive integer, got {text.get(key)!r}")
    for key in ("attention_bias", "mlp_bias"):
        if text.get(key):
            raise CheckpointError(f"{path}: 'text_config.{key}' is true; nmm's projections have no bias")
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: 'text_config.hidden_act' is {text['hidden_act']!r}; nmm's SwiGLU uses silu")
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    if text["hidden_size"] % heads or heads % kv:
        raise CheckpointError(f"{path}: text_config: hidden_size {text['hidden_size']}, {heads} heads and {kv} "
                              "key/value heads do not divide")
    head_dim = text.get("head_dim")
    if head_dim is not None and head_dim * heads != text["hidden_size"]:
        raise CheckpointError(f"{path}: 'text_config.head_dim' {head_dim} x heads != hidden_size; nmm needs "
                              "head_dim = d_model / heads")
    _theta, kind = _rope(text, path)
    if kind != "default":
        raise CheckpointError(f"{path}: 'text_config.rope_parameters.rope_type' is {kind!r}; nmm implements plain "
                              "RoPE ('default')")
    if not isinstance(cfg.get("vocabulary_map"), dict) or not cfg["vocabulary_map"]:
        raise CheckpointError(f"{path}: no 'vocabulary_map' (token -> id); it is what says which ids are visual tokens")
    if not isinstance(cfg.get("vq_config"), dict):
        raise CheckpointError(f"{path}: no 'vq_config' (the image tokenizer's settings)")
    return cfg


def _rope(text: dict, path: Path) -> tuple[float, str]:
    """(theta, type) from transformers 5's `rope_parameters` or 4.x's `rope_theta` / `rope_scaling`;
    Emu3's default theta is 1e6."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 1000000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(theta, (int, float)):
        raise CheckpointError(f"{path}: 'text_config.rope_theta' must be a number, got {theta!r}")
    return float(theta), kind


def model_config(cfg: dict) -> ModelConfig:
    """Emu3's config.json -> the nmm ModelConfig of the same network (Llama's blocks, no QK-norm)."""
    t = cfg["text_config"]
    return ModelConfig(
        fusion="early", image_repr="discrete", routing="dense",
        d_model=t["hidden_size"], n_layers=t["num_hidden_layers"], n_heads=t["num_attention_heads"],
        n_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"], ffn_hidden=t["intermediate_size"],
        max_seq_len=t["max_position_embeddings"], rope_theta=_rope(t, Path("config.json"))[0], qk_norm=False,
        norm_order="pre", norm_eps=float(t.get("rms_norm_eps", 1e-5)), factorised_image_head=False,
        init_std=float(t.get("initializer_range", 0.02)),
    )


# =================================================================================================
# The image tokenizer's settings and Emu3's image layout
# =================================================================================================
@dataclass
class Emu3VQConfig:
    """transformers' `Emu3VQVAEConfig` fields, `Emu3ImageProcessor`'s pixel scaling, nmm's fixed image
    size, and the layout of one image in Emu3's token stream at that size (codes K + j are the
    structure tokens `structure[j]`)."""

    codebook_size: int = 32768
    embed_dim: int = 4
    latent_channels: int = 4
    double_latent: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    base_channels: int = 256
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [3])  # indices of levels, as transformers reads it
    hidden_size: int = 1024  # the VQ's attention width (= the channels where it attends)
    num_attention_heads: int = 1
    # the image processor: value = (uint8 * rescale - mean) / std; resample: PIL's filter number (3 = bicubic)
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    resample: int = 3
    # nmm's fixed image size (pixels per side) and the structure of an item at that size
    resolution: int = 512
    structure: list[str] = field(default_factory=list)  # token text of structure code j (for reading only)
    prefix: list[int] = field(default_factory=list)  # structure codes of the item's first tokens ("64*64" <|image token|>)
    eol: int = 0  # structure code of the end-of-row token
    eof: int = 0  # structure code of the end-of-frame token

    @property
    def image_size(self) -> int:  # what Pipeline and the server check images against
        return self.resolution

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def codes(self) -> int:
        """The image modality's code count: the codebook, then the structure tokens."""
        return self.codebook_size + len(self.structure)

    @property
    def tokens_per_image(self) -> int:
        return len(self.prefix) + self.grid * (self.grid + 1) + 1

    @classmethod
    def from_dict(cls, d: dict, where: str = "emu3_vq") -> Emu3VQConfig:
        cfg = _build(cls, d, where)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        """Refuse (ConfigError naming the field) what the port does not compute as transformers does."""
        c = self
        problems = []
        if c.double_latent:
            problems.append("double_latent is true (Emu3's VQ model cannot use it: quant_conv reads latent_channels)")
        if c.in_channels != 3 or c.out_channels != 3:
            problems.append(f"in_channels/out_channels {c.in_channels}/{c.out_channels}; nmm's images are RGB")
        if c.embed_dim != c.latent_channels:
            problems.append(f"embed_dim {c.embed_dim} != latent_channels {c.latent_channels} (the decoder "
                            "concatenates the two)")
        T = c.temporal_downsample_factor
        if T < 1 or T & (T - 1):
            problems.append(f"temporal_downsample_factor {T} is not a power of two")
        widths = [c.base_channels * m for m in c.channel_multiplier]
        if not widths or any(w % 32 for w in widths):
            problems.append(f"channel widths {widths} must be multiples of 32 (GroupNorm of 32 groups)")
        attended = [widths[-1]] + [widths[i] for i in c.attn_resolutions if 0 <= i < len(widths)]
        if widths and any(w != c.hidden_size for w in attended):
            problems.append(f"hidden_size {c.hidden_size} must equal the channels of every attention block {attended}")
        if c.num_attention_heads < 1 or c.hidden_size % c.num_attention_heads:
            problems.append(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}")
        if widths and (c.resolution < c.downsample or c.resolution % c.downsample):
            problems.append(f"image size {c.resolution} is not a positive multiple of the VQ's downsampling "
                            f"{c.downsample}")
        n = len(c.structure)
        if n and not all(0 <= j < n for j in [*c.prefix, c.eol, c.eof]):
            problems.append("the image layout names structure codes it does not have")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))


def vq_spec(cfg: Emu3VQConfig) -> ModalitySpec:
    """The image modality of an Emu3 vocabulary: codebook + structure codes, a fixed-length item. No
    (rows, cols) grid: the end-of-row tokens make it no plain grid (Emu3 uses 1D RoPE anyway)."""
    return ModalitySpec("image", "<boi>", "<eoi>", cfg.codes, (), (), cfg.tokens_per_image, "image/png")


def image_layout(cfg: Emu3VQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(template, visual): `template` (N,) the code at every place of an item (-1 where a visual code
    goes), `visual` (h*w,) the places of the visual codes, row-major."""
    K, g = cfg.codebook_size, cfg.grid
    template = [K + j for j in cfg.prefix]
    visual = []
    for _ in range(g):
        visual += range(len(template), len(template) + g)
        template += [-1] * g + [K + cfg.eol]
    template.append(K + cfg.eof)
    return torch.tensor(template, dtype=torch.long), torch.tensor(visual, dtype=torch.long)


# =================================================================================================
# Token ids: Emu3's vocabulary <-> nmm's layout
# =================================================================================================
def visual_code_of(name: str) -> int | None:
    """"<|visual token 000123|>" -> 123, as transformers' `Emu3ImageVocabularyMapping.img2bpe` reads it."""
    if not name.startswith(VISUAL_PREFIX):
        return None
    digits = name[-8:-2]
    return int(digits) if digits.isdigit() else None


@dataclass
class Emu3Ids:
    """nmm id -> Emu3 id (`nmm_to_hf[j]`): onto Emu3's ids, one to one except the size's text tokens,
    which are both an nmm text id and an image structure code. `to_nmm` maps those to the text id
    (an image's ids come from the codec, never from Emu3 ids)."""

    hf_vocab_size: int
    nmm_to_hf: list[int]

    def __post_init__(self):
        if set(self.nmm_to_hf) != set(range(self.hf_vocab_size)):
            raise CheckpointError(f"{IDS_FILE}: the id map does not cover Emu3's {self.hf_vocab_size} ids exactly")
        self._to_hf = torch.tensor(self.nmm_to_hf, dtype=torch.long)
        hf, first = np.unique(np.asarray(self.nmm_to_hf, dtype=np.int64), return_index=True)  # text before codes
        self._to_nmm = torch.empty(self.hf_vocab_size, dtype=torch.long)
        self._to_nmm[torch.from_numpy(hf)] = torch.from_numpy(first)

    def to_hf(self, ids):
        """nmm ids (tensor, array, list or int) -> Emu3 ids, same type of container."""
        return take(self._to_hf, ids)

    def to_nmm(self, ids):
        return take(self._to_nmm, ids)

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"format": 1, "hf_vocab_size": self.hf_vocab_size, "nmm_to_hf": self.nmm_to_hf})

    @classmethod
    def load(cls, path: Path) -> Emu3Ids:
        d = read_json(path, "the id map of an imported Emu3 run")
        try:
            return cls(int(d["hf_vocab_size"]), [int(i) for i in d["nmm_to_hf"]])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt id map ({e.__class__.__name__}: {e})") from None


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """Emu3's names of the tokens nmm needs (DEFAULT_TOKENS' keys), from tokenizer_config.json: top-level
    fields as transformers 5 writes them, or `extra_special_tokens` / `model_specific_special_tokens`."""
    names = dict(DEFAULT_TOKENS)
    for table in (tokenizer_config.get("model_specific_special_tokens"), tokenizer_config.get("extra_special_tokens"),
                  tokenizer_config):
        if isinstance(table, dict):
            for key in names:
                value = table.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    names[key] = value
    names["eol_token"] = DEFAULT_TOKENS["eol_token"]  # transformers' Emu3ImageVocabularyMapping reads it by name
    return names


@dataclass
class Emu3Vocabulary:
    """What an Emu3 checkpoint's vocabulary says, laid out as nmm's: the visual token of every code,
    nmm's five specials, the structure tokens, and the id map."""

    vocab: Vocabulary
    ids: Emu3Ids
    specials: dict[str, int]  # nmm special name -> Emu3 id
    visual_ids: list[int]  # code -> Emu3 id
    structure_ids: list[int]  # structure code j -> Emu3 id
    text_ids: list[int]  # nmm text id -> Emu3 id


def emu3_ids(cfg: dict, names: dict[str, str], path: Path) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """(visual ids by code, nmm special -> Emu3 id, structure token name -> Emu3 id for the image
    wrapper, end of row and end of frame) from config.json's `vocabulary_map`."""
    vocab_map: dict[str, int] = cfg["vocabulary_map"]
    V, K = cfg["text_config"]["vocab_size"], cfg["vq_config"].get("codebook_size", 32768)
    codes: dict[int, int] = {}
    for name, i in vocab_map.items():
        if name.startswith(VISUAL_PREFIX):
            code = visual_code_of(name)
            if code is None:
                raise CheckpointError(f"{path}: vocabulary_map token {name!r} looks like a visual token but does not "
                                      "end in a six-digit code")
            codes[code] = int(i)
    if sorted(codes) != list(range(K)):
        raise CheckpointError(f"{path}: vocabulary_map has {len(codes)} visual tokens ({VISUAL_PREFIX} NNNNNN|>), but "
                              f"vq_config.codebook_size is {K}: every code needs exactly one token")
    visual = [codes[c] for c in range(K)]

    def token_id(key: str) -> int:
        token = names[key]
        if token not in vocab_map:
            raise CheckpointError(f"{path}: vocabulary_map has no {token!r} (Emu3's {key})")
        return int(vocab_map[token])

    def config_id(key: str, name_key: str) -> int:
        value = cfg["text_config"].get(key, cfg.get(key))
        if isinstance(value, list):
            value = value[0] if value else None
        return token_id(name_key) if value is None else int(value)

    specials = {"<pad>": config_id("pad_token_id", "pad_token"), "<bos>": config_id("bos_token_id", "bos_token"),
                "<eos>": config_id("eos_token_id", "eos_token"), "<boi>": token_id("boi_token"),
                "<eoi>": token_id("eoi_token")}
    structure = {key: token_id(key) for key in ("image_wrapper_token", "eol_token", "eof_token")}
    taken = set(visual)
    for name, i in [*specials.items(), *structure.items()]:
        if not 0 <= i < V or i in taken:
            raise CheckpointError(f"{path}: the id of {name} ({i}) is out of range, a visual token or another "
                                  "special's")
        taken.add(i)
    if max(visual) >= V:
        raise CheckpointError(f"{path}: visual token ids reach {max(visual)}, past text_config.vocab_size {V}")
    return visual, specials, structure


def size_text(grid: int) -> str:
    """The size an Emu3 image carries as text, as `Emu3Processor` writes it: f"{height}*{width}" in latent cells."""
    return f"{grid}*{grid}"


def emu3_vocabulary(visual: list[int], specials: dict[str, int], structure: dict[str, int], prefix_hf: list[int],
                    vq: Emu3VQConfig, V: int, token_text=str) -> tuple[Emu3Vocabulary, Emu3VQConfig]:
    """Lay out nmm's vocabulary: text ids (every Emu3 id that is no visual token, special or structure
    token, in Emu3's order), nmm's specials, then the codes: visual tokens in code order, then the
    structure tokens (the size's text tokens in order of appearance, `<|image token|>`, end of row, end of
    frame). Returns the vocabulary and the VQ config with the layout filled in (`token_text(id)`: the
    structure tokens' names it records)."""
    moved = set(visual) | set(specials.values()) | set(structure.values())
    text = [i for i in range(V) if i not in moved]
    structure_ids: list[int] = []
    for i in [*prefix_hf, structure["image_wrapper_token"], structure["eol_token"], structure["eof_token"]]:
        if i not in structure_ids:
            structure_ids.append(i)
    index = {i: j for j, i in enumerate(structure_ids)}
    vq.prefix = [index[i] for i in prefix_hf] + [index[structure["image_wrapper_token"]]]
    vq.eol, vq.eof = index[structure["eol_token"]], index[structure["eof_token"]]
    vq.structure = [token_text(i) for i in structure_ids]
    vocab = Vocabulary(len(text), (vq_spec(vq),))
    by_name = [specials[s] for s in vocab.specials]  # nmm's special order (<pad> <bos> <eos> <boi> <eoi>)
    ids = Emu3Ids(V, text + by_name + visual + structure_ids)
    return Emu3Vocabulary(vocab, ids, specials, visual, structure_ids, text), vq


# =================================================================================================
# The image codec: Emu3's VQ-VAE (nmm.interop.emu3_vqvae) as nmm's image codec
# =================================================================================================
class Emu3VQCodec(nn.Module):
    """nmm's image codec over Emu3's VQ-VAE at one fixed size: (B, R, R, 3) uint8 <-> (B, N) codes in
    Emu3's image layout (the size as tokens, `<|image token|>`, rows of visual codes each closed by an
    end of row, an end of frame); see the module docstring. Encode and decode."""

    codec_kind = "emu3_vq"  # codecs.json names this class for the run's image modality

    def __init__(self, config: Emu3VQConfig | None = None):
        super().__init__()
        self.config = c = config or Emu3VQConfig()
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = Quantizer(c)
        self.quant_conv = Conv3d(c.latent_channels, c.embed_dim, (3, 1, 1), (1, 1, 1))
        self.post_quant_conv = Conv3d(c.embed_dim, c.latent_channels, (3, 1, 1), (1, 1, 1))
        self._buffers_from_config()

    def _buffers_from_config(self) -> None:
        c = self.config
        template, visual = image_layout(c) if c.structure else (torch.zeros(0, dtype=torch.long),) * 2
        self.register_buffer("pixel_lut", pixel_lut(c.rescale, c.mean, c.std), persistent=False)  # (3, 256)
        self.register_buffer("template", template, persistent=False)
        self.register_buffer("visual", visual, persistent=False)

    @property
    def spec(self) -> ModalitySpec:
        return vq_spec(self.config)

    # ---- pixels ---------------------------------------------------------------------------------
    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, R, R, 3) uint8 -> (B, 3, R, R) float pixel values, as Emu3's image processor gives them."""
        return lut_pixels(self.pixel_lut, images, self.config.resolution)

    def to_uint8(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, R, R) float -> (B, R, R, 3) uint8, rounded as `Emu3ImageProcessor.postprocess` rounds."""
        c = self.config
        return pixels_to_uint8(pixel_values, c.rescale, c.mean, c.std)

    # ---- the VQ model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) float -> (B, h, w) codebook codes: transformers' `vqmodel.encode(...).image_tokens`."""
        x = pixel_values.to(self._device(), self.quant_conv.conv.weight.dtype)
        z = self.encoder.spatial(x)  # the still image, once: its T copies would give T equal frames
        z = z.unsqueeze(2).expand(-1, -1, self.config.temporal_downsample_factor, -1, -1)
        z = self.quant_conv(self.encoder.temporal(z))  # (B, embed, 1, h, w)
        return self.quantize(z.permute(0, 2, 1, 3, 4))[:, 0]

    @torch.inference_mode()
    def decode_pixels(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codebook codes -> (B, 3, R, R) float pixel values: transformers' `vqmodel.decode`."""
        grid = grid.to(self._device())
        B, h, w = grid.shape
        E = self.config.embed_dim
        quant = self.quantize.embedding(grid.flatten()).view(B, 1, h, w, E).permute(0, 4, 1, 2, 3).contiguous()
        return self.decoder(self.post_quant_conv(quant), quant)

    # ---- the image layout -----------------------------------------------------------------------
    def layout(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codebook codes -> (B, N) item codes: the structure codes around them."""
        out = self.template.to(grid.device).expand(grid.shape[0], -1).clone()
        out[:, self.visual.to(grid.device)] = grid.flatten(1).long()
        return out

    def grid_of(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) item codes -> (B, h, w) codebook codes, read at the visual places; a structure code
        where a visual code belongs (a model that broke the layout) reads as code 0."""
        g = codes[:, self.visual.to(codes.device)]
        g = torch.where(g < self.config.codebook_size, g, torch.zeros_like(g))
        return g.view(codes.shape[0], self.config.grid, self.config.grid)

    # ---- the codec contract ---------------------------------------------------------------------
    def _per_call(self) -> int:
        return images_per_call(self.config.resolution)

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, R, R, 3) -> LongTensor item codes (B, N), a few images at a time."""
        x, per = self.pixels(images), self._per_call()
        if not len(x):
            return torch.zeros(0, self.spec.tokens_per_item, dtype=torch.long)
        return torch.cat([self.layout(self.encode_pixels(x[i : i + per])).cpu() for i in range(0, len(x), per)])

    @torch.inference_mode()
    def decode(self, codes) -> np.ndarray:
        """(B, N) item codes -> (B, R, R, 3) uint8 images."""
        codes = torch.as_tensor(np.asarray(codes.cpu() if torch.is_tensor(codes) else codes), dtype=torch.long)
        N = self.spec.tokens_per_item
        if codes.ndim != 2 or codes.shape[1] != N:
            raise ValueError(f"expected item codes of shape (B, {N}), got {tuple(codes.shape)}")
        R, per = self.config.resolution, self._per_call()
        if not len(codes):
            return np.zeros((0, R, R, 3), dtype=np.uint8)
        grid = self.grid_of(codes)
        return np.concatenate([self.to_uint8(self.decode_pixels(grid[i : i + per])) for i in range(0, len(grid), per)])

    def to_bytes(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Image file bytes -> (R, R, 3) uint8: the centred square, resized to R with the processor's
        filter. (Emu3's processor keeps the aspect ratio and sizes between min_pixels and max_pixels;
        nmm's items have one size. A square picture of at most R pixels gets exactly the processor's pixels.)"""
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"not a readable image ({e.__class__.__name__}: {e})") from None
        return square(image, self.config.resolution, self.config.resample)

    def _device(self) -> torch.device:
        return self.quant_conv.conv.weight.device

    # ---- persistence: emu3_vq.json + emu3_vq.safetensors (transformers' names, no prefix) --------
    def save(self, run_dir: str | os.PathLike) -> None:
        save_vq(self.state_dict(), self.config, run_dir, (VQ_CONFIG_FILE, VQ_WEIGHTS_FILE))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Emu3VQCodec:
        path = Path(run_dir)
        cfg = Emu3VQConfig.from_dict(read_json(path / VQ_CONFIG_FILE, "the Emu3 image tokenizer's settings"),
                                     str(path / VQ_CONFIG_FILE))
        codec, tensors, own = read_vq_weights(cls, cfg, path / VQ_WEIGHTS_FILE, "the Emu3 image tokenizer")
        codec.load_state_dict({k: tensors[k].float() if own[k].is_floating_point() else tensors[k] for k in own},
                              assign=True)
        codec._buffers_from_config()  # buffers, not saved: built on the meta device above
        return codec.eval()


def square(image: Image.Image, size: int, resample: int = 3) -> np.ndarray:
    """The centred square of a PIL image, resized to size x size (no resize when it already is)."""
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling(resample))
    return np.asarray(image, dtype=np.uint8).copy()


register_codec(Emu3VQCodec.codec_kind, Emu3VQCodec)


def vq_config_from_hf(vq: dict, preprocessor: dict, where: str) -> Emu3VQConfig:
    """config.json's vq_config and the image processor's settings -> Emu3VQConfig (layout still empty),
    at the resolution `Emu3ImageProcessor` gives a square picture: the side of `min_pixels`."""
    known = set(Emu3VQConfig.__dataclass_fields__) - {"rescale", "mean", "std", "resample", "resolution",
                                                      "structure", "prefix", "eol", "eof"}
    values = {k: v for k, v in vq.items() if k in known}
    for key in ("channel_multiplier", "attn_resolutions"):
        if key in values:
            values[key] = list(values[key] or [])
    if preprocessor:
        values["rescale"] = float(preprocessor.get("rescale_factor", 1 / 255)) if preprocessor.get("do_rescale", True) else 1.0
        if preprocessor.get("do_normalize", True):
            values["mean"] = [float(x) for x in _three(preprocessor.get("image_mean", OPENAI_CLIP_MEAN))]
            values["std"] = [float(x) for x in _three(preprocessor.get("image_std", OPENAI_CLIP_STD))]
        else:
            values["mean"], values["std"] = [0.0] * 3, [1.0] * 3
        values["resample"] = int(preprocessor.get("resample", 3))
    cfg = _build(Emu3VQConfig, values, where)
    min_pixels = int((preprocessor or {}).get("min_pixels", 512 * 512))
    cfg.resolution = max(cfg.downsample, math.isqrt(min_pixels) // cfg.downsample * cfg.downsample)
    return cfg


def _three(x) -> list:
    x = list(x) if isinstance(x, (list, tuple)) else [x]
    return x * 3 if len(x) == 1 else x


def _preprocessor(src: Path) -> dict:
    """The image processor's settings: preprocessor_config.json, or the `image_processor` entry of
    processor_config.json (where transformers 5 saves a processor's); {} without either."""
    if (src / "preprocessor_config.json").is_file():
        return read_json(src / "preprocessor_config.json")
    if (src / "processor_config.json").is_file():
        entry = read_json(src / "processor_config.json").get("image_processor")
        return entry if isinstance(entry, dict) else {}
    return {}


# =================================================================================================
# Weights: transformers' names -> nmm's
# =================================================================================================
TEXT_EMBED, TEXT_HEAD = "text_embed.weight", "text_head.proj.weight"
CODE_EMBED, CODE_HEAD = "modalities.image.embed_codes.tables.0.weight", "modalities.image.head.proj.0.weight"


def _pick_prefix(ck: Checkpoint, prefixes: tuple[str, ...], what: str) -> str:
    """The first of `prefixes` some tensor of the checkpoint starts with."""
    for prefix in prefixes:
        if any(n.startswith(prefix) for n in ck.tensors):
            return prefix
    raise CheckpointError(f"{ck.directory}: no {what} (tensors named {' or '.join(p + '*' for p in prefixes)})")


def _layer_names(cfg: ModelConfig, prefix: str) -> list[tuple[str, str]]:
    """(nmm name, Emu3 name) of every backbone tensor that maps one to one."""
    pairs = [("backbone.norm.weight", prefix + "norm.weight")]
    for i in range(cfg.n_layers):
        n, h = f"backbone.blocks.{i}.", f"{prefix}layers.{i}."
        pairs += [
            (n + "attn_norm.weight", h + "input_layernorm.weight"),
            (n + "ffn_norm.weight", h + "post_attention_layernorm.weight"),
            (n + "attn.wq.weight", h + "self_attn.q_proj.weight"),
            (n + "attn.wk.weight", h + "self_attn.k_proj.weight"),
            (n + "attn.wv.weight", h + "self_attn.v_proj.weight"),
            (n + "attn.wo.weight", h + "self_attn.o_proj.weight"),
            (n + "ffn.w_gate.weight", h + "mlp.gate_proj.weight"),
            (n + "ffn.w_up.weight", h + "mlp.up_proj.weight"),
            (n + "ffn.w_down.weight", h + "mlp.down_proj.weight"),
        ]
    return pairs


def nmm_layout(cfg: ModelConfig, vocab: Vocabulary) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the nmm model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = NativeMultimodalModel(cfg, vocab)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# =================================================================================================
# Import
# =================================================================================================
def import_emu3(src_dir: str | Path, dst_run: str | Path, dtype: str | torch.dtype | None = None,
                overwrite: bool = False, image_size: int | None = None) -> dict:
    """A local `Emu3ForConditionalGeneration` directory (config.json, safetensors weights, tokenizer.json,
    tokenizer_config.json, the image processor's config) -> an nmm run directory that `nmm.load` reads.
    `dtype` ("bf16", "fp32", None = keep the checkpoint's) is what the backbone is stored in (the VQ model
    stays fp32); `image_size` the run's fixed image side in pixels (default: the processor's
    `min_pixels` side, 512 for the released checkpoints). Streams; returns what it did."""
    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_run)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    hf = read_config(src)
    precision = resolve_precision(dtype)
    tokenizer = read_json(src / "tokenizer.json", "Emu3's text tokenizer")
    tok_cfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    names = special_tokens(tok_cfg)
    try:
        vq = vq_config_from_hf(hf["vq_config"], _preprocessor(src), f"{src / 'config.json'}: vq_config")
        if image_size is not None:
            vq.resolution = int(image_size)
        vq.check(f"{src / 'config.json'}: vq_config (image size {vq.resolution})")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    V = hf["text_config"]["vocab_size"]
    visual, specials, structure = emu3_ids(hf, names, src / "config.json")

    # The text tokenizer first (the size's tokens come from it), then the layout around them.
    moved = set(visual) | set(specials.values()) | set(structure.values())
    keep = [i for i in range(V) if i not in moved]
    text = load_tokenizer_json(tokenizer_over_ids(tokenizer, keep, src / "tokenizer.json", "<emu3:unused:{}>"),
                               len(keep), src / "tokenizer.json")
    prefix_hf = [keep[i] for i in text.encode(size_text(vq.grid))]
    names_of = {i: t for t, i in (tokenizer.get("model") or {}).get("vocab", {}).items()}
    names_of.update({int(a["id"]): a["content"] for a in tokenizer.get("added_tokens", [])})
    ev, vq = emu3_vocabulary(visual, specials, structure, prefix_hf, vq, V, lambda i: names_of.get(i, f"<emu3:{i}>"))
    vq.check(f"{src / 'config.json'}: vq_config")
    cfg = model_config(hf)
    if vq.tokens_per_image + 3 > cfg.max_seq_len:
        raise CheckpointError(f"{src / 'config.json'}: an image of {vq.resolution} px is {vq.tokens_per_image} tokens, "
                              f"more than the context of {cfg.max_seq_len} (text_config.max_position_embeddings) "
                              "leaves room for: pass a smaller image_size")
    ck = Checkpoint(src)
    text_prefix = _pick_prefix(ck, TEXT_PREFIXES, "language model tensors")
    embed = text_prefix + "embed_tokens.weight"
    head = next((n for n in HEAD_NAMES if n in ck), None)
    if head is None:
        if not hf.get("tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", False)):
            raise CheckpointError(f"{src}: no LM head tensor ({' or '.join(HEAD_NAMES)}) and tie_word_embeddings is false")
        head = embed
    vq_prefix = _pick_prefix(ck, VQ_PREFIXES, "image tokenizer tensors (Emu3's VQ-VAE)")

    # ---- the plan: which rows of which tensor go where --------------------------------------------
    T = ev.vocab.text_size
    text_rows, code_rows = ev.ids.nmm_to_hf[:T], ev.ids.nmm_to_hf[T:]  # nmm row i <- Emu3 row rows[i]
    pieces = []
    for dst_name, src_name, rows in ((TEXT_EMBED, embed, text_rows), (CODE_EMBED, embed, code_rows),
                                     (TEXT_HEAD, head, text_rows), (CODE_HEAD, head, code_rows)):
        pieces += [Piece(dst_name, src_name, d, (s, s + n)) for d, s, n in row_runs(rows)]
    pieces += [Piece(n, h) for n, h in _layer_names(cfg, text_prefix)]
    shapes = nmm_layout(cfg, ev.vocab)
    planned = {p.dst for p in pieces}
    if planned != set(shapes):
        raise CheckpointError(f"nmm's model has tensors the Emu3 map does not fill ({sorted(set(shapes) - planned)[:3]}) "
                              f"or the map fills tensors it lacks ({sorted(planned - set(shapes))[:3]}): "
                              "nmm.interop.emu3 is out of date")
    for name in {p.src for p in pieces}:
        ck.info(name)  # a clear error for a tensor the checkpoint lacks
    for name in (embed, head):
        if ck.info(name).shape != (V, cfg.d_model):
            raise CheckpointError(f"{src}: {name} has shape {ck.info(name).shape}, config.json says ({V}, {cfg.d_model})")
    with torch.device("meta"):
        own = Emu3VQCodec(vq).state_dict()
    vq_names = {n: vq_prefix + n for n in own}
    for n, h in vq_names.items():
        if ck.info(h).shape != tuple(own[n].shape):
            raise CheckpointError(f"{src}: {h} has shape {ck.info(h).shape}; vq_config gives {tuple(own[n].shape)}")
    vq_layout = {n: (torch.float32 if own[n].is_floating_point() else ck.info(h).dtype, ck.info(h).shape)
                 for n, h in vq_names.items()}  # small: fp32, so codes and pixels match transformers' fp32 VQ

    return write_imported_run(
        src, dst, family="emu3", overwrite=overwrite, t0=t0, ck=ck, pieces=pieces, shapes=shapes,
        precision=precision, vq_layout=vq_layout, vq_pieces=[Piece(n, h) for n, h in vq_names.items()],
        vq_config=vq, vq_files=(VQ_CONFIG_FILE, VQ_WEIGHTS_FILE), codec_kind=Emu3VQCodec.codec_kind,
        text=text, vocab=ev.vocab, cfg=cfg, ids=ev.ids, ids_file=IDS_FILE, source_dir=SOURCE_DIR,
        source_files=SOURCE_FILES,
        vocab_summary={"hf_vocab_size": V, "n_text": ev.vocab.n_text, "visual_codes": vq.codebook_size,
                       "structure_tokens": vq.structure, "image_codes": vq.codes,
                       "image_size": vq.resolution, "grid": vq.grid, "tokens_per_image": vq.tokens_per_image})
