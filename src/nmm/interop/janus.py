"""Janus -> nmm: `JanusForConditionalGeneration` checkpoints in, nmm runs with Janus's own image modules out.

Janus (DeepSeek: Janus, Janus-Pro) is one Llama language model with two image paths: pictures it *reads*
go through a SigLIP ViT and an MLP aligner into the LM's embedding space, at the 576 positions of
`<image_placeholder>` tokens between `<begin_of_image>` and `<end_of_image>`; pictures it *writes* are the
codes of a separate VQ model (LlamaGen's VQ-16), embedded by a code table and an MLP aligner and predicted
by an MLP head (`generation_head`) instead of the LM head. That is nmm's decoupled shape (encoder in,
codes out), with modules nmm's decoupled variant does not have: an imported run is `model.image_repr=janus`
(`nmm.model.fusion.janus.JanusImages`, ported to plain torch with transformers' module names, so the weights
load by name):

- **Token ids.** nmm's text ids are every Janus id but the five nmm has specials for (`<｜▁pad▁｜>` pad,
  `<｜begin▁of▁sentence｜>` bos, `<｜end▁of▁sentence｜>` eos, `<begin_of_image>` nmm's `<boi>`,
  `<end_of_image>` nmm's `<eoi>`), in Janus's order; the LM's embedding and head rows are permuted with
  them. The image modality's codes are the VQ codebook: Janus has no text ids for them (its generation head
  scores them, its generation embedding reads them). An nmm image item is `<boi>` + one code per patch +
  `<eoi>`, Janus's own layout (`JanusIds.to_hf` writes `<image_placeholder>` at the codes' places).
- **Images in** (the understanding path): the codec (`JanusVQCodec`) encodes a picture to its VQ codes,
  the item's ids, and remembers the picture (`nmm.model.fusion.janus.PICTURES`); the model reads the
  picture through SigLIP, exactly as Janus does. Codes no codec of this process has seen read as the
  picture they decode to.
- **Images out**: nmm's engine samples the codes from `generation_head` (CFG, batching, the static KV
  cache), each fed back through the generation embedding and aligner, and the codec's VQ decoder draws
  them. Janus's classifier-free guidance conditions against the *same* prompt with every token but
  `<bos>` and `<boi>` replaced by `<pad>` (attended, same length): `uncond_prompt` builds it. The
  engine's mixing is Janus's (`uncond + scale * (cond - uncond)` on the logits).
- **The VQ model** (`JanusVQCodec`, codec kind `janus_vq`): encoder, quantiser and decoder in plain torch,
  fp32. DeepSeek's VQ quantises l2-normalised latents against the l2-normalised codebook
  (`codebook_l2_norm`); transformers' `JanusVQVAE.encode` skips the normalisation (its `decode` keeps
  it), which picks other codes unless the stored codebook rows have unit norm. `l2_norm=True` (the
  default) follows DeepSeek; `l2_norm=False` gives transformers' codes (both tested). Decoding is
  transformers' `decode_image_tokens`, pixels out rounded as `JanusImageProcessor.postprocess` rounds them.

Conversion streams (`nmm.interop.common`), like Chameleon's and Emu3's.
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
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nmm.config import (
    JanusConfig,
    ModelConfig,
    _build,
)
from nmm.errors import CheckpointError, ConfigError
from nmm.interop.common import (
    AttnBlock,
    Checkpoint,
    Downsample,
    Piece,
    ResnetBlock,
    Upsample,
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
    swish,
    take,
    tokenizer_over_ids,
    uint8_images,
    write_imported_run,
)
from nmm.interop.emu3 import (
    _layer_names,
    _preprocessor,
    _rope,
    _three,
    nmm_layout,
)
from nmm.modalities.base import ModalitySpec, register_codec
from nmm.modalities.vocab import Vocabulary
from nmm.model.fusion.janus import ACTIVATIONS, PICTURES
from nmm.utils import atomic_write_json

ARCHITECTURES = ("JanusForConditionalGeneration",)
# Janus's tokens for nmm's specials and the image placeholder (tokenizer_config.json may rename them)
DEFAULT_TOKENS = {"pad_token": "<｜▁pad▁｜>", "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                  "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_placeholder>"}
NMM_SPECIAL_KEYS = {"<pad>": "pad_token", "<bos>": "bos_token", "<eos>": "eos_token", "<boi>": "boi_token",
                    "<eoi>": "eoi_token"}
IDS_FILE = "janus_ids.json"
SOURCE_DIR = "janus"  # the source's config, tokenizer and processor files, verbatim
VQ_CONFIG_FILE, VQ_WEIGHTS_FILE = "janus_vq.json", "janus_vq.safetensors"
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
                "chat_template.json", "chat_template.jinja")
MODEL_PREFIXES = ("model.", "")  # JanusForConditionalGeneration's names, or a bare JanusModel's
INTERFACE_MODULES = ("vision_model.", "aligner.", "generation_embeddings.", "generation_aligner.", "generation_head.")
# transformers' defaults (JanusVisionConfig, JanusVQVAEConfig), for fields a config.json leaves out
VISION_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "num_channels": 3,
                   "image_size": 384, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "mlp_ratio": 4.0,
                   "attention_bias": True, "projection_dim": 2048, "use_qk_norm": False, "depth": 2,
                   "num_image_tokens": 576}
VQ_DEFAULTS = {"embed_dim": 8, "num_embeddings": 16384, "double_latent": False, "latent_channels": 256,
               "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2,
               "out_channels": 3, "projection_dim": 2048, "num_hidden_layers": 2, "hidden_act": "gelu",
               "image_token_embed_dim": 2048}
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# =================================================================================================
# The source's config
# =================================================================================================
def read_config(src: Path) -> dict:
    """config.json of a Janus checkpoint, checked for what nmm computes exactly, with transformers'
    defaults filled into vision_config and vq_config; every refusal names the file and the field."""
    path = src / "config.json"
    cfg = read_json(path, "a Hugging Face model directory's config")
    if cfg.get("model_type") != "janus":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not Janus's 'janus'")
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(ARCHITECTURES):
        raise CheckpointError(f"{path}: architectures {archs} has none of {', '.join(ARCHITECTURES)}")
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{path}: no 'text_config' (the language model's settings)")
    if text.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: 'text_config.model_type' is {text['model_type']!r}; nmm reads Janus's Llama")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if not isinstance(text.get(key), int) or text[key] < 1:
            raise CheckpointError(f"{path}: 'text_config.{key}' must be a positive integer, got {text.get(key)!r}")
    for key in ("attention_bias", "mlp_bias"):
        if text.get(key):
            raise CheckpointError(f"{path}: 'text_config.{key}' is true; nmm's projections have no bias")
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: 'text_config.hidden_act' is {text['hidden_act']!r}; nmm's SwiGLU uses silu")
    D, heads = text["hidden_size"], text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    if D % heads or heads % kv:
        raise CheckpointError(f"{path}: text_config: hidden_size {D}, {heads} heads and {kv} key/value heads do not divide")
    if text.get("head_dim") is not None and text["head_dim"] * heads != D:
        raise CheckpointError(f"{path}: 'text_config.head_dim' {text['head_dim']} x heads != hidden_size; nmm needs "
                              "head_dim = d_model / heads")
    _theta, kind = _rope(text, path)
    if kind != "default":
        raise CheckpointError(f"{path}: 'text_config.rope_parameters.rope_type' is {kind!r}; nmm implements plain "
                              "RoPE ('default')")
    vision = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    vq = {**VQ_DEFAULTS, **(cfg.get("vq_config") or {})}
    problems = []
    if vision["use_qk_norm"]:
        problems.append("vision_config.use_qk_norm is true (transformers' JanusVisionAttention cannot run it either)")
    if vision["num_channels"] != 3:
        problems.append(f"vision_config.num_channels is {vision['num_channels']}; nmm's images are RGB")
    for key, table in (("vision_config.hidden_act", vision["hidden_act"]), ("vq_config.hidden_act", vq["hidden_act"])):
        if table not in ACTIVATIONS:
            problems.append(f"{key} is {table!r}, not one of {', '.join(ACTIVATIONS)}")
    size, patch = vision["image_size"], vision["patch_size"]
    if not isinstance(size, int) or not isinstance(patch, int):
        problems.append(f"vision_config.image_size / patch_size {size!r} / {patch!r}: nmm reads square images (one int each)")
    elif size % patch:
        problems.append(f"vision_config.image_size {size} is not a multiple of patch_size {patch}")
    else:
        grid = size // patch
        if vision["num_image_tokens"] != grid * grid:
            problems.append(f"vision_config.num_image_tokens {vision['num_image_tokens']} != (image_size / patch_size)^2 "
                            f"= {grid * grid}")
        downsample = 2 ** (len(vq["channel_multiplier"]) - 1)
        if grid * downsample != size:
            problems.append(f"the VQ draws {grid} x {grid} codes at {grid * downsample} px (downsampling {downsample}), "
                            f"SigLIP reads {size} px: one picture cannot serve both")
    if vision["hidden_size"] % vision["num_attention_heads"]:
        problems.append(f"vision_config.hidden_size {vision['hidden_size']} is not divisible by num_attention_heads")
    for key, value in (("vision_config.projection_dim", vision["projection_dim"]), ("vq_config.projection_dim", vq["projection_dim"]),
                       ("vq_config.image_token_embed_dim", vq["image_token_embed_dim"])):
        if value != D:
            problems.append(f"{key} is {value}, not the language model's hidden_size {D} (Janus feeds it to the LM)")
    if vq["double_latent"]:
        problems.append("vq_config.double_latent is true (quant_conv reads latent_channels)")
    if vq["in_channels"] != 3 or vq["out_channels"] != 3:
        problems.append(f"vq_config.in_channels/out_channels {vq['in_channels']}/{vq['out_channels']}; nmm's images are RGB")
    widths = [vq["base_channels"] * m for m in vq["channel_multiplier"]]
    if not widths or any(w % 32 for w in widths):
        problems.append(f"vq_config channel widths {widths} must be multiples of 32 (GroupNorm of 32 groups)")
    if not isinstance(cfg.get("image_token_id"), int):
        problems.append(f"'image_token_id' is {cfg.get('image_token_id')!r}, not an id")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return {**cfg, "vision_config": vision, "vq_config": vq}


def model_config(cfg: dict, processor: dict) -> ModelConfig:
    """Janus's config.json (read_config's) and the image processor's settings -> the nmm ModelConfig
    of the same network."""
    t, v, q = cfg["text_config"], cfg["vision_config"], cfg["vq_config"]
    rescale, mean, std = _scaling(processor)
    janus = JanusConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_ratio=float(v["mlp_ratio"]),
                        norm_eps=float(v["layer_norm_eps"]), act=v["hidden_act"], qkv_bias=bool(v["attention_bias"]),
                        aligner_depth=int(v["depth"]), rescale=rescale, image_mean=mean, image_std=std,
                        code_dim=q["embed_dim"], gen_aligner_depth=int(q["num_hidden_layers"]), gen_act=q["hidden_act"])
    return ModelConfig(
        fusion="early", image_repr="janus", routing="dense",
        d_model=t["hidden_size"], n_layers=t["num_hidden_layers"], n_heads=t["num_attention_heads"],
        n_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"], ffn_hidden=t["intermediate_size"],
        max_seq_len=t["max_position_embeddings"], rope_theta=_rope(t, Path("config.json"))[0], qk_norm=False,
        norm_order="pre", norm_eps=float(t.get("rms_norm_eps", 1e-6)), factorised_image_head=False,
        init_std=float(t.get("initializer_range", 0.02)), janus=janus,
    )


def _scaling(processor: dict) -> tuple[float, list[float], list[float]]:
    """(rescale, mean, std) of Janus's image processor: value = (uint8 * rescale - mean) / std."""
    p = processor or {}
    rescale = float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0
    if not p.get("do_normalize", True):
        return rescale, [0.0] * 3, [1.0] * 3
    return rescale, _mean(p), [float(x) for x in _three(p.get("image_std", OPENAI_CLIP_STD))]


def _mean(p: dict) -> list[float]:  # JanusImageProcessor's default is CLIP's (Janus-Pro's files say 0.5)
    return [float(x) for x in _three(p.get("image_mean", OPENAI_CLIP_MEAN))]


# =================================================================================================
# The image tokenizer: Janus's VQ model (encoder, quantiser, decoder), ported to plain torch
# =================================================================================================
@dataclass
class JanusVQConfig:
    """transformers' `JanusVQVAEConfig` fields the VQ model uses, the image processor's pixel handling,
    and `l2_norm` (module docstring)."""

    embed_dim: int = 8
    num_embeddings: int = 16384
    latent_channels: int = 256
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    num_patches: int = 24  # the code grid's side (vision image_size / patch_size, as transformers sets it)
    l2_norm: bool = True  # DeepSeek's quantiser (True) or transformers' encode (False)
    # the image processor: value = (uint8 * rescale - mean) / std; resample: PIL's filter (3 = bicubic);
    # pictures of another shape: longest side to image_size (at least min_size), padded with background
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.5] * 3)
    std: list[float] = field(default_factory=lambda: [0.5] * 3)
    resample: int = 3
    min_size: int = 14
    background: list[int] = field(default_factory=lambda: [127, 127, 127])

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def image_size(self) -> int:  # what Pipeline and the server check images against
        return self.num_patches * self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches**2

    @classmethod
    def from_dict(cls, d: dict, where: str = "janus_vq") -> JanusVQConfig:
        cfg = _build(cls, d, where)
        widths = [cfg.base_channels * m for m in cfg.channel_multiplier]
        if not widths or any(w % 32 for w in widths) or cfg.num_patches < 1 or cfg.num_embeddings < 1:
            raise ConfigError(f"{where}: channel widths {widths} must be multiples of 32, num_patches and "
                              "num_embeddings positive")
        return cfg


def vq_config_from_hf(cfg: dict, processor: dict) -> JanusVQConfig:
    """read_config's config and the image processor's settings -> JanusVQConfig."""
    q, v = cfg["vq_config"], cfg["vision_config"]
    rescale, mean, std = _scaling(processor)
    p = processor or {}
    return JanusVQConfig(embed_dim=q["embed_dim"], num_embeddings=q["num_embeddings"], latent_channels=q["latent_channels"],
                         base_channels=q["base_channels"], channel_multiplier=list(q["channel_multiplier"]),
                         num_res_blocks=q["num_res_blocks"], num_patches=v["image_size"] // v["patch_size"],
                         rescale=rescale, mean=mean, std=std, resample=int(p.get("resample", 3)),
                         min_size=int(p.get("min_size", 14)),
                         background=[int(x * 255) for x in _mean(p)])  # the processor's padding colour


def vq_spec(cfg: JanusVQConfig) -> ModalitySpec:
    """The image modality of a Janus run: the VQ codebook, one code per patch, a (rows, cols) grid."""
    g = cfg.num_patches
    return ModalitySpec("image", "<boi>", "<eoi>", cfg.num_embeddings, (), (), g * g, "image/png", grid=(g, g))


class _MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _level() -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(), nn.ModuleList()
    return level


class _Encoder(nn.Module):
    """Module names as transformers' `JanusVQVAEEncoder`, so weights load by name."""

    def __init__(self, c: JanusVQConfig):
        super().__init__()
        mult, n = c.channel_multiplier, len(c.channel_multiplier)
        self.conv_in = nn.Conv2d(3, c.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in = c.base_channels
        for i in range(n):
            level, ch = _level(), c.base_channels * mult[i]
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(ch_in, ch))
                ch_in = ch
                if i == n - 1:
                    level.attn.append(AttnBlock(ch))
            if i != n - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = _MidBlock(ch_in)
        self.norm_out = nn.GroupNorm(32, ch_in, eps=1e-6)
        self.conv_out = nn.Conv2d(ch_in, c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                x = block(x)
                if len(level.attn) > 0:
                    x = level.attn[i](x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class _Decoder(nn.Module):
    """transformers' `JanusVQVAEDecoder`: `up[0]` is the deepest level."""

    def __init__(self, c: JanusVQConfig):
        super().__init__()
        mult, n = c.channel_multiplier, len(c.channel_multiplier)
        ch_in = c.base_channels * mult[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch_in, 3, padding=1)
        self.mid = _MidBlock(ch_in)
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            level, ch = _level(), c.base_channels * mult[i]
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch_in, ch))
                ch_in = ch
                if i == n - 1:
                    level.attn.append(AttnBlock(ch))
            if i != 0:
                level.upsample = Upsample(ch)
            self.up.append(level)
        self.norm_out = nn.GroupNorm(32, ch_in, eps=1e-6)
        self.conv_out = nn.Conv2d(ch_in, 3, 3, padding=1)

    def forward(self, x):
        x = self.mid(self.conv_in(x))
        for level in self.up:
            for i, block in enumerate(level.block):
                x = block(x)
                if len(level.attn) > 0:
                    x = level.attn[i](x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(swish(self.norm_out(x)))


class _Quantizer(nn.Module):
    def __init__(self, c: JanusVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.num_embeddings, c.embed_dim)

    def forward(self, z, l2_norm: bool):  # (B, D, h, w) -> codes (B, h * w): the nearest codebook row
        flat = z.permute(0, 2, 3, 1).contiguous().view(-1, z.shape[1])
        e = self.embedding.weight
        if l2_norm:  # DeepSeek's VectorQuantizer(l2_norm=True)
            flat, e = F.normalize(flat, p=2, dim=-1), F.normalize(e, p=2, dim=-1)
        d = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", flat, e.transpose(0, 1))
        return torch.argmin(d, dim=1).view(z.shape[0], -1)

    def entry(self, codes):  # (B, N) -> (B, D, g, g): transformers' get_codebook_entry (normalised rows)
        B, N = codes.shape
        g = math.isqrt(N)
        q = F.normalize(self.embedding(codes), p=2, dim=-1).view(B, g, g, -1)
        return q.permute(0, 3, 1, 2).contiguous()


class JanusVQCodec(nn.Module):
    """nmm's image codec over Janus's VQ model: (B, R, R, 3) uint8 pictures <-> (B, g*g) codes, row-major.
    Encoding remembers each picture behind its codes (`nmm.model.fusion.janus.PICTURES`), so the model
    reads it through SigLIP; decoding remembers the pictures it draws."""

    codec_kind = "janus_vq"  # codecs.json names this class for the run's image modality

    def __init__(self, config: JanusVQConfig | None = None):
        super().__init__()
        self.config = c = config or JanusVQConfig()
        self.encoder = _Encoder(c)
        self.quantize = _Quantizer(c)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.latent_channels, 1)
        self.decoder = _Decoder(c)
        self._buffers_from_config()

    def _buffers_from_config(self) -> None:
        c = self.config
        self.register_buffer("pixel_lut", pixel_lut(c.rescale, c.mean, c.std), persistent=False)  # (3, 256)

    @property
    def spec(self) -> ModalitySpec:
        return vq_spec(self.config)

    def _device(self) -> torch.device:
        return self.quant_conv.weight.device

    # ---- pixels ---------------------------------------------------------------------------------
    def _pictures(self, images) -> torch.Tensor:
        return uint8_images(images, self.config.image_size)

    def pixels(self, images) -> torch.Tensor:
        """(B, R, R, 3) uint8 -> (B, 3, R, R) float pixel values, as Janus's image processor gives them."""
        return lut_pixels(self.pixel_lut, images, self.config.image_size)

    def to_uint8(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, R, R) float -> (B, R, R, 3) uint8, rounded as `JanusImageProcessor.postprocess` rounds."""
        c = self.config
        return pixels_to_uint8(pixel_values, c.rescale, c.mean, c.std)

    # ---- the VQ model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, l2_norm: bool | None = None) -> torch.Tensor:
        """(B, 3, R, R) float -> (B, g*g) codes. `l2_norm` (default: the config's): DeepSeek's quantiser, or
        transformers' `vqmodel.encode(...).image_tokens` (False)."""
        x = pixel_values.to(self._device(), self.quant_conv.weight.dtype)
        z = self.quant_conv(self.encoder(x))
        return self.quantize(z, self.config.l2_norm if l2_norm is None else l2_norm)

    @torch.inference_mode()
    def decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g*g) codes -> (B, 3, R, R) float pixel values: transformers' `vqmodel.decode`."""
        return self.decoder(self.post_quant_conv(self.quantize.entry(codes.to(self._device()).long())))

    # ---- the codec contract ---------------------------------------------------------------------
    def _per_call(self) -> int:
        return images_per_call(self.config.image_size)

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """uint8 images (B, R, R, 3) -> LongTensor codes (B, g*g), a few images at a time; each picture is
        remembered behind its codes (what the model reads)."""
        pictures = self._pictures(images)
        if not len(pictures):
            return torch.zeros(0, self.config.tokens_per_image, dtype=torch.long)
        per = self._per_call()
        codes = torch.cat([self.encode_pixels(self.pixels(pictures[i : i + per])).cpu() for i in range(0, len(pictures), per)])
        for c, picture in zip(codes, pictures):
            PICTURES.remember(c, picture)
        return codes

    @torch.inference_mode()
    def draw(self, codes) -> np.ndarray:
        """(B, g*g) codes -> (B, R, R, 3) uint8 pictures, each remembered behind its codes."""
        codes = torch.as_tensor(np.asarray(codes.cpu() if torch.is_tensor(codes) else codes), dtype=torch.long)
        N, R = self.config.tokens_per_image, self.config.image_size
        if codes.ndim != 2 or codes.shape[1] != N:
            raise ValueError(f"expected codes of shape (B, {N}), got {tuple(codes.shape)}")
        if not len(codes):
            return np.zeros((0, R, R, 3), dtype=np.uint8)
        per = self._per_call()
        out = np.concatenate([self.to_uint8(self.decode_pixels(codes[i : i + per])) for i in range(0, len(codes), per)])
        for c, picture in zip(codes, out):
            PICTURES.remember(c, picture)
        return out

    def decode(self, codes) -> np.ndarray:
        """(B, g*g) codes -> (B, R, R, 3) uint8 images."""
        return self.draw(codes)

    def draws(self, n_codes: int, tokens: int, size: int) -> bool:
        """Whether this codec draws a model's read images (PictureMemory asks)."""
        c = self.config
        return c.num_embeddings == n_codes and c.tokens_per_image == tokens and c.image_size == size

    def to_bytes(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Image file bytes -> (R, R, 3) uint8 as Janus's image processor prepares a picture: the longest
        side resized to R (PIL, its filter), the other padded evenly with the background colour."""
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"not a readable image ({e.__class__.__name__}: {e})") from None
        return letterbox(image, self.config)

    # ---- persistence: janus_vq.json + janus_vq.safetensors (transformers' names, no prefix) ------
    def save(self, run_dir: str | os.PathLike) -> None:
        save_vq(self.state_dict(), self.config, run_dir, (VQ_CONFIG_FILE, VQ_WEIGHTS_FILE))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> JanusVQCodec:
        path = Path(run_dir)
        cfg = JanusVQConfig.from_dict(read_json(path / VQ_CONFIG_FILE, "the Janus image tokenizer's settings"),
                                      str(path / VQ_CONFIG_FILE))
        codec, tensors, own = read_vq_weights(cls, cfg, path / VQ_WEIGHTS_FILE, "the Janus image tokenizer")
        codec.load_state_dict({k: tensors[k].float() for k in own}, assign=True)
        codec._buffers_from_config()  # buffers, not saved: built on the meta device above
        PICTURES.add_drawer(codec)  # it draws codes no codec encoded, when the model reads them
        return codec.eval()


def letterbox(image: Image.Image, c: JanusVQConfig) -> np.ndarray:
    """`JanusImageProcessor`'s resize and pad: the longest side to R, the other scaled (at least
    `min_size`), then centred on an R x R square of the background colour."""
    R = c.image_size
    w, h = image.size
    scale = R / max(w, h)
    size = (max(round(w * scale), c.min_size), max(round(h * scale), c.min_size))
    if image.size != size:
        image = image.resize(size, Image.Resampling(c.resample))
    x = np.asarray(image, dtype=np.uint8)
    h, w = x.shape[:2]
    if h == w:
        return x.copy()
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(c.background, dtype=np.uint8)
    if w > h:
        out[(side - h) // 2 : (side - h) // 2 + h] = x
    else:
        out[:, (side - w) // 2 : (side - w) // 2 + w] = x
    return out


register_codec(JanusVQCodec.codec_kind, JanusVQCodec)


# =================================================================================================
# Token ids: Janus's vocabulary <-> nmm's layout
# =================================================================================================
@dataclass
class JanusIds:
    """nmm text ids and specials <-> Janus ids (`nmm_to_hf[j]`, a bijection onto Janus's vocabulary).
    Image codes have no Janus id (Janus's generation head and embedding index the codebook); `to_hf`
    writes `image_token_id` (`<image_placeholder>`) at their places, as Janus's sequences have it."""

    hf_vocab_size: int
    nmm_to_hf: list[int]
    image_token_id: int

    def __post_init__(self):
        if sorted(self.nmm_to_hf) != list(range(self.hf_vocab_size)):
            raise CheckpointError(f"{IDS_FILE}: the id map is not a bijection onto Janus's {self.hf_vocab_size} ids")
        self.text_size = len(self.nmm_to_hf)
        self._to_hf = torch.tensor(self.nmm_to_hf, dtype=torch.long)
        self._to_nmm = torch.empty_like(self._to_hf)
        self._to_nmm[self._to_hf] = torch.arange(len(self.nmm_to_hf))

    def to_hf(self, ids):
        """nmm ids (tensor, array, list or int) -> Janus ids, same type of container; image codes ->
        `<image_placeholder>`."""
        table = torch.cat([self._to_hf, torch.tensor([self.image_token_id])])
        if torch.is_tensor(ids):
            return table.to(ids.device)[ids.clamp(max=self.text_size)]
        if isinstance(ids, np.ndarray):
            return table.numpy()[np.minimum(ids, self.text_size)]
        if isinstance(ids, (list, tuple)):
            return table[torch.as_tensor(ids, dtype=torch.long).clamp(max=self.text_size)].tolist()
        return int(table[min(int(ids), self.text_size)])

    def to_nmm(self, ids):
        """Janus ids -> nmm ids (`<image_placeholder>` is a text id in nmm)."""
        return take(self._to_nmm, ids)

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"format": 1, "hf_vocab_size": self.hf_vocab_size, "nmm_to_hf": self.nmm_to_hf,
                                 "image_token_id": self.image_token_id})

    @classmethod
    def load(cls, path: Path) -> JanusIds:
        d = read_json(path, "the id map of an imported Janus run")
        try:
            return cls(int(d["hf_vocab_size"]), [int(i) for i in d["nmm_to_hf"]], int(d["image_token_id"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt id map ({e.__class__.__name__}: {e})") from None


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """Janus's names of the tokens nmm needs (DEFAULT_TOKENS' keys), from tokenizer_config.json: top-level
    fields, or `extra_special_tokens` / `model_specific_special_tokens`."""
    names = dict(DEFAULT_TOKENS)
    for table in (tokenizer_config.get("model_specific_special_tokens"), tokenizer_config.get("extra_special_tokens"),
                  tokenizer_config):
        if isinstance(table, dict):
            for key in names:
                value = table.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    names[key] = value
    return names


def janus_ids(cfg: dict, generation: dict, names: dict[str, str], tokenizer: dict, path: Path) -> dict[str, int]:
    """nmm special -> Janus id: config.json's / generation_config.json's ids where they give them (bos, eos,
    pad, and generation_kwargs.boi_token_id), else the named token's id in tokenizer.json."""
    table = dict((tokenizer.get("model") or {}).get("vocab", {}))
    table.update({a["content"]: int(a["id"]) for a in tokenizer.get("added_tokens", [])})
    V = cfg["text_config"]["vocab_size"]

    def by_name(key: str) -> int:
        if names[key] not in table:
            raise CheckpointError(f"{path}: the tokenizer has no {names[key]!r} (Janus's {key}); name it in "
                                  "tokenizer_config.json")
        return int(table[names[key]])

    def given(key: str, *where: dict) -> int | None:
        for d in where:
            value = d.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
        return None

    t, kwargs = cfg["text_config"], generation.get("generation_kwargs") or {}
    out = {}
    for special, key in NMM_SPECIAL_KEYS.items():
        where = [kwargs] if special == "<boi>" else [] if special == "<eoi>" else [generation, t, cfg]
        value = given("boi_token_id" if special == "<boi>" else f"{key[:-6]}_token_id", *where)
        out[special] = by_name(key) if value is None else value
    seen: set[int] = set()
    for special, i in out.items():
        if not 0 <= i < V or i in seen or i == cfg["image_token_id"]:
            raise CheckpointError(f"{path}: the id of {special} ({i}) is out of range, another special's or the "
                                  "image placeholder's")
        seen.add(i)
    if not 0 <= cfg["image_token_id"] < V:
        raise CheckpointError(f"{path}: image_token_id {cfg['image_token_id']} is past text_config.vocab_size {V}")
    return out


def janus_vocabulary(specials: dict[str, int], V: int, image_token_id: int,
                     vq: JanusVQConfig) -> tuple[Vocabulary, JanusIds, list[int]]:
    """nmm's vocabulary for a Janus checkpoint: text ids (every Janus id but the five specials, in Janus's
    order), nmm's specials, then the VQ codebook. Returns it, the id map and the kept Janus ids."""
    moved = set(specials.values())
    text = [i for i in range(V) if i not in moved]
    vocab = Vocabulary(len(text), (vq_spec(vq),))
    ids = JanusIds(V, text + [specials[s] for s in vocab.specials], image_token_id)
    return vocab, ids, text


def uncond_prompt(prompt: list[int], vocab: Vocabulary) -> list[int]:
    """Janus's unconditional prompt for classifier-free guidance: the same length, every id but `<bos>` and
    `<boi>` replaced by `<pad>` (which is attended: transformers' `JanusForConditionalGeneration.generate`)."""
    keep = {vocab.bos, vocab.begin("image")}
    return [i if i in keep else vocab.pad for i in prompt]


# =================================================================================================
# Weights: transformers' names -> nmm's
# =================================================================================================
TEXT_EMBED, TEXT_HEAD = "text_embed.weight", "text_head.proj.weight"
INTERFACE = "modalities.image."


def _model_prefix(ck: Checkpoint) -> str:
    for prefix in MODEL_PREFIXES:
        if prefix + "language_model.embed_tokens.weight" in ck:
            return prefix
    raise CheckpointError(f"{ck.directory}: no language model tensors (model.language_model.embed_tokens.weight)")


def import_janus(src_dir: str | Path, dst_run: str | Path, dtype: str | torch.dtype | None = None,
                 overwrite: bool = False) -> dict:
    """A local `JanusForConditionalGeneration` directory (config.json, safetensors weights, tokenizer.json,
    tokenizer_config.json, generation_config.json and the image processor's config, the last three optional)
    -> an nmm run directory that `nmm.load` reads. `dtype` ("bf16", "fp32", None = keep the checkpoint's) is
    what the model is stored in (the VQ model stays fp32). Streams; returns what it did."""
    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_run)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    hf = read_config(src)
    precision = resolve_precision(dtype)
    tokenizer = read_json(src / "tokenizer.json", "Janus's text tokenizer")
    tok_cfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    generation = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    processor = _preprocessor(src)
    size = processor.get("size") or {}
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if side is not None and side != hf["vision_config"]["image_size"]:
        raise CheckpointError(f"{src}: the image processor makes {side} px pictures, SigLIP reads "
                              f"{hf['vision_config']['image_size']} px (vision_config.image_size)")
    names = special_tokens(tok_cfg)
    V = hf["text_config"]["vocab_size"]
    specials = janus_ids(hf, generation, names, tokenizer, src / "config.json")
    vq = vq_config_from_hf(hf, processor)
    vocab, ids, keep = janus_vocabulary(specials, V, hf["image_token_id"], vq)
    text = load_tokenizer_json(tokenizer_over_ids(tokenizer, keep, src / "tokenizer.json", "<janus:unused:{}>"),
                               len(keep), src / "tokenizer.json")
    cfg = model_config(hf, processor)
    if vq.tokens_per_image + 3 > cfg.max_seq_len:
        raise CheckpointError(f"{src / 'config.json'}: an image is {vq.tokens_per_image} tokens, more than the context "
                              f"of {cfg.max_seq_len} (text_config.max_position_embeddings) leaves room for")
    ck = Checkpoint(src)
    prefix = _model_prefix(ck)
    embed = prefix + "language_model.embed_tokens.weight"
    head = "lm_head.weight" if "lm_head.weight" in ck else None
    if head is None:
        if not hf.get("tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", True)):
            raise CheckpointError(f"{src}: no lm_head.weight and tie_word_embeddings is false")
        head = embed

    # ---- the plan: which rows of which tensor go where --------------------------------------------
    rows = ids.nmm_to_hf  # nmm row i <- Janus row rows[i] (text ids and specials)
    pieces = []
    for dst_name, src_name in ((TEXT_EMBED, embed), (TEXT_HEAD, head)):
        pieces += [Piece(dst_name, src_name, d, (s, s + n)) for d, s, n in row_runs(rows)]
    pieces += [Piece(n, h) for n, h in _layer_names(cfg, prefix + "language_model.")]
    pieces += [Piece(INTERFACE + n[len(prefix):], n) for n in ck.names(prefix)
               if n[len(prefix):].startswith(INTERFACE_MODULES)]
    shapes = nmm_layout(cfg, vocab)
    planned = {p.dst for p in pieces}
    if planned != set(shapes):
        raise CheckpointError(f"nmm's model has tensors the Janus map does not fill ({sorted(set(shapes) - planned)[:3]}) "
                              f"or the map fills tensors it lacks ({sorted(planned - set(shapes))[:3]}): the checkpoint "
                              "does not match its config.json, or nmm.interop.janus is out of date")
    for p in pieces:
        info = ck.info(p.src)
        want = shapes[p.dst]
        if p.src_rows is None and info.shape != want:
            raise CheckpointError(f"{src}: {p.src} has shape {info.shape}; config.json gives {want}")
    for name in (embed, head):
        if ck.info(name).shape != (V, cfg.d_model):
            raise CheckpointError(f"{src}: {name} has shape {ck.info(name).shape}, config.json says ({V}, {cfg.d_model})")
    with torch.device("meta"):
        own = JanusVQCodec(vq).state_dict()
    vq_names = {n: prefix + "vqmodel." + n for n in own}
    for n, h in vq_names.items():
        if ck.info(h).shape != tuple(own[n].shape):
            raise CheckpointError(f"{src}: {h} has shape {ck.info(h).shape}; vq_config gives {tuple(own[n].shape)}")
    vq_layout = {n: (torch.float32, ck.info(h).shape) for n, h in vq_names.items()}  # fp32: codes and pixels as transformers' fp32

    return write_imported_run(
        src, dst, family="janus", overwrite=overwrite, t0=t0, ck=ck, pieces=pieces, shapes=shapes,
        precision=precision, vq_layout=vq_layout, vq_pieces=[Piece(n, h) for n, h in vq_names.items()],
        vq_config=vq, vq_files=(VQ_CONFIG_FILE, VQ_WEIGHTS_FILE), codec_kind=JanusVQCodec.codec_kind,
        text=text, vocab=vocab, cfg=cfg, ids=ids, ids_file=IDS_FILE, source_dir=SOURCE_DIR,
        source_files=SOURCE_FILES,
        extra_summary={"vq_params": sum(math.prod(s) for _, s in vq_layout.values())},
        vocab_summary={"hf_vocab_size": V, "n_text": vocab.n_text, "image_codes": vq.num_embeddings,
                       "image_size": vq.image_size, "grid": vq.num_patches, "tokens_per_image": vq.tokens_per_image,
                       "specials": specials, "image_token_id": hf["image_token_id"]})
