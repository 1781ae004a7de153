"""Image tokenizer: a small FSQ autoencoder mapping a 32x32 image to an 8x8 grid of discrete codes.

Codes come from finite scalar quantisation (`nmm.modalities.fsq`): no codebook to collapse, and
code ids are just mixed-radix numbers.

The default model is *factorised*: every position's code is a pair (shape_code, colour_code).
  - the shape branch sees only the "lit" mask (brightest channel above a threshold), so it is blind
    to colour, and decodes a per-pixel alpha map;
  - the colour branch sees only pooled colour statistics of its own 4x4 patch, so it is blind to
    shape, and decodes one colour per position.
A pixel's colour is its own position's colour, or a neighbour's where a patch straddles two shapes
(the shape branch picks which). Reconstruction = alpha * colour. Because neither code sees the other
attribute, a language model can compose a shape and a colour never seen together (a yellow triangle)
and the decoder still draws it. `factorised=False` gives a plain single-branch FSQ autoencoder over
RGB for comparison.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from nmm.config import ImageTokenizerConfig  # defined with the other run configs
from nmm.errors import CheckpointError, ConfigError
from nmm.modalities.base import ModalitySpec, join_codes, register_modality, split_codes
from nmm.modalities.fsq import FSQ
from nmm.optim import fit
from nmm.utils import atomic_write_text, save_safetensors

WEIGHTS_FILE = "image_tokenizer.safetensors"
CONFIG_FILE = "image_tokenizer.json"
CENTRE_PRIOR = 4.0  # logit bonus for a pixel picking its own position's colour
LIT_THRESHOLD = 0.25  # a pixel whose brightest channel exceeds this is part of a shape


class _Branch(nn.Module):
    """Patch encoder -> FSQ -> decoder. All convs run at code-grid resolution (h = H / patch):
    pixel-unshuffle in, pixel-shuffle out is far cheaper on CPU than strided convs at 32x32.
    `spatial` branches use 3x3 convs (context from neighbouring patches) and position embeddings;
    the others see one patch only. The decoder emits out_ch values per pixel of an out_patch block."""

    def __init__(self, in_ch: int, out_ch: int, levels: list[int], width: int, patch: int, grid: int,
                 spatial: bool, out_patch: int, noise: bool = False):
        super().__init__()
        k, d = (3 if spatial else 1), len(levels)
        conv = lambda i, o, k=k: nn.Conv2d(i, o, k, padding=k // 2)
        self.unshuffle = nn.PixelUnshuffle(patch)
        self.enc_in, self.dec_in = conv(in_ch * patch * patch, width), conv(d, width)
        self.encoder = nn.Sequential(nn.GELU(), conv(width, width), nn.GELU(), conv(width, d, 1))
        self.fsq = FSQ(levels, noise)
        self.decoder = nn.Sequential(
            nn.GELU(), conv(width, width), nn.GELU(),
            conv(width, out_ch * out_patch * out_patch, 1), nn.PixelShuffle(out_patch))
        # Shapes sit on a fixed grid, so where a patch is limits which edges it can hold: knowing the
        # position lets 200 codes cover the ~700 distinct 4x4 lit patterns of the shapes world.
        shape = (1, width, grid, grid) if spatial else (1, width, 1, 1)  # just a bias when not spatial
        self.enc_pos, self.dec_pos = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in_ch, H, W) -> FSQ values (B, D, h, w), codes (B, h, w)."""
        return self.fsq(self.encoder(self.enc_in(self.unshuffle(x)) + self.enc_pos))

    def decode(self, values: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, out_ch, h*out_patch, ...)
        return self.decoder(self.dec_in(values) + self.dec_pos)


class ImageTokenizer(nn.Module):
    """32x32 RGB image <-> 64 discrete codes (8x8, row-major). See the module docstring."""

    def __init__(self, config: ImageTokenizerConfig | None = None):
        super().__init__()
        self.config = c = config or ImageTokenizerConfig()
        if c.image_size % c.downsample:
            raise ConfigError(f"image_size {c.image_size} is not divisible by downsample {c.downsample}")
        p = c.downsample
        self.grid = c.image_size // p
        if c.factorised:
            # Shape: lit mask (B,1,H,W) -> per pixel 1 alpha logit + 9 logits choosing which of the 3x3
            # neighbouring positions' colour the pixel takes (a 4x4 patch can straddle two shapes).
            self.shape = _Branch(1, 1 + 9, c.shape_levels, c.channels, p, self.grid, True, p)
            # Colour: per-patch colour statistics (B,6,h,w) -> one colour per position (B,3,h,w). The
            # statistics are pooled over the patch, so the colour code cannot see the shape at all.
            self.colour = _Branch(6, 3, c.colour_levels, c.channels // 2, 1, self.grid, False, 1, noise=True)
        else:
            self.rgb = _Branch(3, 3, c.levels, c.channels, p, self.grid, True, p)

    # ---- code bookkeeping -------------------------------------------------------------------
    @property
    def spec(self) -> ModalitySpec:
        return image_spec(self.codebook_size, self.code_factors, self.tokens_per_image, self.code_levels)

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def code_factors(self) -> tuple[int, ...]:
        if self.config.factorised:
            return (self.shape.fsq.n_codes, self.colour.fsq.n_codes)
        return (self.rgb.fsq.n_codes,)

    @property
    def code_levels(self) -> tuple[tuple[int, ...], ...]:
        c = self.config
        levels = (c.shape_levels, c.colour_levels) if c.factorised else (c.levels,)
        return tuple(tuple(lv) for lv in levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.code_factors)

    def split_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(split_codes(codes, self.code_factors))

    def join_codes(self, *factors: torch.Tensor) -> torch.Tensor:
        if len(factors) != len(self.code_factors):
            raise ValueError(f"expected {len(self.code_factors)} code factors, got {len(factors)}")
        return join_codes(list(factors), self.code_factors)

    # ---- model --------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor | np.ndarray, layout: str) -> None:
        s = self.config.image_size
        want = (3, s, s) if layout == "chw" else (s, s, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            expected = f"(B, {', '.join(map(str, want))})"
            raise ValueError(f"expected images of shape {expected}, got {tuple(x.shape)}")

    def _lit(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,1,H,W) in {0, 1}
        # Thresholding the brightest channel makes the shape branch blind to colour *and* brightness.
        return (x.amax(1, keepdim=True) > LIT_THRESHOLD).float()

    def _patch_colour(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,6,h,w)
        """Brightest value per channel and mean colour of the lit pixels of each patch. Both equal the
        shape's colour for a one-shape patch whatever its outline, which is what lets colour codes
        carry over to (colour, kind) pairs never seen in training; the mean follows the majority
        where a patch straddles two shapes."""
        p, lit = self.config.downsample, self._lit(x)
        mean = F.avg_pool2d(x * lit, p) / F.avg_pool2d(lit, p).clamp(min=1 / (p * p))
        return torch.cat([F.max_pool2d(x, p), mean], 1)

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B,3,H,W) in [0,1] -> per-branch FSQ values [(B,D,h,w), ...] and joint codes (B, h, w)."""
        if not self.config.factorised:
            values, codes = self.rgb.encode(x)
            return [values], codes
        shape_values, shape_codes = self.shape.encode(self._lit(x))
        colour_values, colour_codes = self.colour.encode(self._patch_colour(x))
        return [shape_values, colour_values], self.join_codes(shape_codes, colour_codes)

    def _decode(self, values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """FSQ values -> (recon (B,3,H,W) in [0,1],) for the plain model; factorised adds the parts
        the loss needs: alpha logits (B,1,H,W), picked colour (B,3,H,W), colour logits (B,3,h,w)."""
        if not self.config.factorised:
            return (torch.sigmoid(self.rgb.decode(values[0])),)
        shape_out = self.shape.decode(values[0])  # (B, 1+9, H, W)
        # Most pixels take their own position's colour, so start the pick there (index 4 = centre).
        select = shape_out[:, 1:].clone()
        select[:, 4] += CENTRE_PRIOR
        alpha, select = shape_out[:, :1], select.softmax(1)  # (B,1,H,W), (B,9,H,W)
        colour_logits = self.colour.decode(values[1])  # (B, 3, h, w)
        B, _, h, w = colour_logits.shape
        p = self.config.downsample
        # Colours of the 3x3 neighbourhood of every position (zero padding = black); each pixel of a
        # 4x4 patch takes a (soft) pick among them, chosen by the shape branch.
        neighbours = F.unfold(torch.sigmoid(colour_logits), 3, padding=1).view(B, 3, 9, h, 1, w, 1)
        select = select.view(B, 1, 9, h, p, w, p)  # broadcasting beats upsampling 27 channels first
        colour = (neighbours * select).sum(2).reshape(B, 3, h * p, w * p)
        return torch.sigmoid(alpha) * colour, alpha, colour, colour_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) float in [0,1] -> (recon (B,3,H,W) in [0,1], codes (B, N))."""
        self._check_images(x, "chw")
        values, codes = self._encode(x)
        return self._decode(values)[0], codes.flatten(1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss for x (B,3,H,W) in [0,1]: BCE with lit pixels up-weighted, because shapes
        are sparse and plain MSE settles on an all-black image."""
        values, _ = self._encode(x)
        recon, *parts = self._decode(values)
        lit = self._lit(x)  # (B,1,H,W)
        weight = 1 + (self.config.lit_weight - 1) * lit
        if not self.config.factorised:
            return F.binary_cross_entropy(recon, x, weight=weight.expand_as(x))
        alpha, colour, colour_logits = parts
        shape_loss = F.binary_cross_entropy_with_logits(alpha, lit, weight=weight)
        # Colour only matters where something is lit (alpha handles the rest).
        colour_loss = (F.binary_cross_entropy(colour.clamp(0, 1), x, reduction="none") * lit).sum() \
            / (3 * lit.sum()).clamp(min=1)
        # Empty patches are pinned to black so blank space always gets the same colour code
        # (a deterministic target for the language model instead of an arbitrary one).
        empty = F.max_pool2d(lit, self.config.downsample) == 0  # (B,1,h,w)
        black = F.binary_cross_entropy_with_logits(colour_logits, torch.zeros_like(colour_logits),
                                                   reduction="none")
        black_loss = (black * empty).sum() / (3 * empty.sum()).clamp(min=1)
        return shape_loss + colour_loss + 0.1 * black_loss

    # ---- public uint8 API ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B,H,W,3) -> LongTensor codes (B, N), row-major over the code grid."""
        # np.require copies a read-only array (a decoded PNG), which torch would otherwise warn about.
        images = images if torch.is_tensor(images) else torch.from_numpy(np.require(images, requirements="W"))
        self._check_images(images, "hwc")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        x = images.permute(0, 3, 1, 2).float().div(255).to(self._device())
        return self._encode(x)[1].flatten(1).cpu()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """codes (B, N) -> uint8 images (B,H,W,3)."""
        codes = torch.as_tensor(codes).long().to(self._device())
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected codes of shape (B, {self.tokens_per_image}), "
                             f"got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got [{codes.min()}, {codes.max()}]")
        grid = codes.view(-1, self.grid, self.grid)
        branches = [self.shape, self.colour] if self.config.factorised else [self.rgb]
        values = [b.fsq.values(f) for b, f in zip(branches, self.split_codes(grid))]
        recon = self._decode(values)[0]
        return (recon * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def to_bytes(self, image: np.ndarray) -> bytes:
        """One (H, W, 3) uint8 image -> PNG file bytes."""
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Image file bytes (any format PIL reads) -> (S, S, 3) uint8 at the tokenizer's resolution."""
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"not a readable image ({e.__class__.__name__}: {e})") from None
        s = self.config.image_size
        if image.size != (s, s):
            image = image.resize((s, s), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8).copy()

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path_dir: str | os.PathLike) -> None:
        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), path / WEIGHTS_FILE)
        text = json.dumps(asdict(self.config), indent=2)
        atomic_write_text(path / CONFIG_FILE, text)

    @classmethod
    def load(cls, path_dir: str | os.PathLike) -> ImageTokenizer:
        path = Path(path_dir)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"image tokenizer file missing: {path / name}")
        try:
            config = ImageTokenizerConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
            model = cls(config)
        except (ValueError, TypeError, ConfigError) as e:
            raise CheckpointError(f"corrupt image tokenizer config {path / CONFIG_FILE}: {e}") from e
        try:
            model.load_state_dict(load_file(path / WEIGHTS_FILE))
        except Exception as e:  # safetensors raises its own error type for truncated/garbled files
            raise CheckpointError(f"corrupt image tokenizer weights {path / WEIGHTS_FILE}: {e}") from e
        return model.eval()


def image_spec(codes: int, factors: tuple[int, ...] = (), tokens_per_image: int = 64,
               levels: tuple[tuple[int, ...], ...] = ()) -> ModalitySpec:
    """The image modality's place in the vocabulary: `<boi>`, a fixed number of codes, `<eoi>`."""
    side = math.isqrt(tokens_per_image)
    grid = (side, side) if side * side == tokens_per_image else ()  # a square code grid, row-major
    return ModalitySpec("image", "<boi>", "<eoi>", codes, tuple(factors), tuple(tuple(lv) for lv in levels),
                        tokens_per_image, "image/png", grid)


# ---- training -----------------------------------------------------------------------------------
def _render(world, scenes) -> np.ndarray:  # -> (n, H, W, 3) uint8
    return np.stack([world.render(s) for s in scenes])


def train_image_tokenizer(world, config: ImageTokenizerConfig | None = None, seed: int = 0,
                          progress: Callable[[int, int, float], None] | None = None,
                          time_budget_s: float | None = None,
                          images: np.ndarray | None = None, judge=None) -> tuple[ImageTokenizer, dict]:
    """Train on a pool of split="train" scenes of `world`, or on `images` ((N, H, W, 3) uint8, e.g.
    a user's folder); returns the model (eval mode) and its stats. With a `judge` for the world's
    images (the shapes world's `ShapesJudge`), the stats include how often reconstructions are
    judged exactly right (`evaluate_image_tokenizer`); without one, PSNR on the training pool."""
    config = config or ImageTokenizerConfig()
    torch.set_flush_denormal(True)  # denormals in the tiny late-training gradients slow CPU 1.4-2x
    torch.manual_seed(seed)
    start = time.perf_counter()
    if images is None:
        images = _render(world, world.scenes(config.pool_size, seed=seed, split="train"))
    pool = torch.from_numpy(np.ascontiguousarray(images))
    model = ImageTokenizer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    def epochs():  # the pool re-shuffled every epoch, in whole batches
        while True:
            order, bs = torch.randperm(len(pool), generator=gen), config.batch_size
            for i in range(0, len(pool) - bs + 1, bs):
                yield pool[order[i:i + bs]]

    batches = epochs()

    def loss_at(step: int) -> torch.Tensor:
        return model.loss(next(batches).permute(0, 3, 1, 2).float().div(255))  # (B, 3, H, W) in [0, 1]

    budget = None if time_budget_s is None else time_budget_s - (time.perf_counter() - start)
    losses = fit(model, opt, loss_at, config.steps, config.lr, config.warmup_steps, 0.05, progress, budget)
    train_seconds = time.perf_counter() - start
    model.eval()
    window = max(1, len(losses) // 10)
    if world is not None and judge is not None:
        stats = evaluate_image_tokenizer(model, world, judge, n=config.eval_images, seed=seed + 1_000_003)
    else:  # no judge (arbitrary images): report reconstruction quality on the training pool
        sample = images[: config.eval_images]
        codes = model.encode(sample)
        stats = {"psnr_db": psnr(model.decode(codes), sample),
                 "codebook_usage": len(codes.unique()) / model.codebook_size}
    stats.update(train_seconds=train_seconds, steps=len(losses),
                 initial_loss=float(np.mean(losses[:window])), final_loss=float(np.mean(losses[-window:])))
    return model, stats


def psnr(recon: np.ndarray, images: np.ndarray) -> float:
    mse = np.mean((recon.astype(np.float64) - images) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def evaluate_image_tokenizer(model: ImageTokenizer, world, judge, n: int = 1000, seed: int = 1_000_003) -> dict:
    """PSNR and code usage on split "any"; judge exact-match of reconstructions on "any" and
    "heldout_combo" (the seed should differ from the training seed). `judge.score(image, scene)`
    scores one image of `world` against the scene it should show (`{"exact": ...}`): the caller
    brings the judge, so this module needs no world of its own."""
    stats = {}
    for split, key in (("any", "judge_exact"), ("heldout_combo", "judge_exact_heldout_combo")):
        scenes = world.scenes(n, seed=seed, split=split)
        images = _render(world, scenes)
        codes = model.encode(images)
        recon = model.decode(codes)
        stats[key] = float(np.mean([judge.score(r, s)["exact"] for r, s in zip(recon, scenes)]))
        if split == "any":
            stats["psnr_db"] = psnr(recon, images)
            stats["codebook_usage"] = len(codes.unique()) / model.codebook_size
            names = ("shape", "colour") if model.config.factorised else ("rgb",)
            for name, factor, size in zip(names, model.split_codes(codes), model.code_factors):
                stats[f"codebook_usage_{name}"] = len(factor.unique()) / size
    return stats


def train_for_run(cfg, source, progress=None) -> tuple[ImageTokenizer, dict]:
    """The registry's trainer: a run's image tokenizer from its data source (`source.images()`, or
    the source's world rendered; the world's judge scores reconstructions). With `image_vq.enabled=true`
    the general tokenizer of `nmm.modalities.image_vq` instead (codec kind "image_vq")."""
    if cfg.image_vq.enabled:
        from nmm.modalities.image_vq import train_for_run as train_image_vq_for_run

        return train_image_vq_for_run(cfg, source, progress)
    return train_image_tokenizer(source.world, cfg.image, seed=cfg.data.seed, progress=progress,
                                 images=source.images(), judge=source.judge)


register_modality("image", ImageTokenizer, train=train_for_run)
