"""`nmm bench tokenizer`: how well the general image tokenizer (`nmm.modalities.image_vq`) learns real
pictures in a fixed time on this machine.

    nmm bench tokenizer                          # 10 minutes per data set, both data sets
    nmm bench tokenizer --minutes 3 --datasets photos --photo-size 128 --set downsample=16

Data sets (nothing is downloaded):

  photos   scikit-learn's two sample photographs (`load_sample_images`: china.jpg, flower.jpg, 427x640).
           The middle third of each photo's rows is held out (it holds most of the temple and of the
           flower, not just sky and bokeh). Training draws fresh random square crops from the top and
           bottom thirds, of a side between S and 2S px (uniform, capped by the region), resized to
           S x S (Lanczos), so the tokenizer sees both fine texture and larger structure; evaluation uses
           crops drawn the same way (fixed seed) from the held-out middle thirds only.
  fashion  Fashion-MNIST (Debian's dataset-fashion-mnist, or $NMM_FASHION_MNIST_DIR): 28 px grey images
           padded by 2 black pixels to 32 px, resized to S (bilinear, S = --fashion-size) and repeated
           into RGB. Trained on the 60,000 training images, evaluated on the first test images.

Each data set trains for --minutes (the learning rate decays over that time, and the discriminator
joins at `adv_start` of it), then reports PSNR on the held-out images and on as many training images
(seen content: the gap is how much of the quality is memorised), codebook usage (fraction of codes used on
the eval images) and perplexity, a reference PSNR (the eval images shrunk to their code grid and enlarged back
with bicubic filtering: the same number of positions, 24 bits each instead of one code), and writes a
reconstruction grid PNG (originals over reconstructions) per data set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nmm.config import ImageVQConfig, parse_overrides
from nmm.modalities.image import psnr
from nmm.modalities.image_vq import evaluate_image_vq, save_recon_grid, train_image_vq

DATASETS = ("photos", "fashion")
HELDOUT_ROWS = (1 / 3, 2 / 3)  # the middle third of each photo's rows, never cropped for training
EVAL_SEED = 1_000_003

# --quick: enough to run every code path in seconds, not to measure anything.
QUICK = {"minutes": 0.05, "set": {"channels": 8, "max_channels": 16, "steps": 4, "batch_size": 4, "warmup_steps": 1,
                                   "eval_images": 8, "adv_start": 0.5, "disc_channels": 8, "disc_layers": 2}}


# ---- data ---------------------------------------------------------------------------------------
def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(p, np.uint8) for p in load_sample_images().images]


def photo_regions(photos: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training parts, held-out parts): each photo cut into thirds by rows, the middle one held out."""
    train, held = [], []
    for p in photos:
        a, b = (round(p.shape[0] * f) for f in HELDOUT_ROWS)
        train += [p[:a], p[b:]]
        held.append(p[a:b])
    return train, held


def crop_drawer(regions: list[np.ndarray], size: int) -> Callable[[np.random.Generator, int], np.ndarray]:
    """draw(rng, n) -> (n, size, size, 3) uint8: random square crops of side in [size, 2 size] (capped by the
    region), from a random region, resized to size x size."""
    for r in regions:
        if min(r.shape[:2]) < size:
            raise ValueError(f"a {r.shape[1]}x{r.shape[0]} photo region is too small for {size} px crops")

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty((n, size, size, 3), np.uint8)
        for i in range(n):
            region = regions[int(rng.integers(len(regions)))]
            h, w = region.shape[:2]
            side = int(rng.integers(size, min(2 * size, h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = region[y : y + side, x : x + side]
            out[i] = crop if side == size else np.asarray(
                Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))
        return out

    return draw


def fashion_unavailable() -> str | None:
    from nmm.eval.real_data import fashion_unavailable as why

    return why()


def fashion_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(train (60000, 28, 28), test (10000, 28, 28)) uint8 grey images."""
    from nmm.eval.real_data import FASHION_FILES, fashion_dir, read_idx

    root = fashion_dir()
    return read_idx(root / FASHION_FILES["train_images"]), read_idx(root / FASHION_FILES["test_images"])


def fashion_rgb(grey: np.ndarray, size: int) -> np.ndarray:
    """(N, 28, 28) grey -> (N, size, size, 3): padded to 32 px, bilinear to `size`, grey in all channels."""
    x = torch.from_numpy(np.pad(grey, ((0, 0), (2, 2), (2, 2)))).float().unsqueeze(1)  # (N, 1, 32, 32)
    if size != 32:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).byte().squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous().numpy()


def fashion_drawer(train: np.ndarray, size: int) -> Callable[[np.random.Generator, int], np.ndarray]:
    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return fashion_rgb(train[rng.integers(0, len(train), n)], size)

    return draw


def thumbnail_psnr(images: np.ndarray, grid: int) -> float:
    """PSNR of images shrunk to grid x grid (box filter) and enlarged back (bicubic): a reference with as
    many positions as the code grid, each a full RGB pixel."""
    s = images.shape[1]
    back = [np.asarray(Image.fromarray(im).resize((grid, grid), Image.Resampling.BOX)
                       .resize((s, s), Image.Resampling.BICUBIC)) for im in images]
    return psnr(np.stack(back), images)


# ---- the benchmark ------------------------------------------------------------------------------
def bench_config(size: int, overrides: dict) -> ImageVQConfig:
    """The benchmark's tokenizer: ImageVQConfig defaults with steps unbounded (the time budget stops it)."""
    base = dataclasses.asdict(ImageVQConfig(steps=1_000_000, eval_images=128))
    return ImageVQConfig.from_dict({**base, **overrides, "image_size": size, "enabled": False})


def run_dataset(name: str, size: int, minutes: float, overrides: dict, grid_dir: Path, seed: int = 0,
                log=print) -> dict:
    cfg = bench_config(size, overrides)
    if name == "photos":
        train_part, held = photo_regions(sample_photos())
        draw, eval_draw = crop_drawer(train_part, size), crop_drawer(held, size)
        eval_images = eval_draw(np.random.default_rng(EVAL_SEED), cfg.eval_images)
        seen = draw(np.random.default_rng(EVAL_SEED + 1), cfg.eval_images)
        data = (f"sklearn sample photos: random {size}-{2 * size} px crops resized to {size} px; "
                f"eval: {cfg.eval_images} crops of the held-out middle thirds")
    elif name == "fashion":
        train, test = fashion_arrays()
        draw = fashion_drawer(train, size)
        eval_images = fashion_rgb(test[: cfg.eval_images], size)
        seen = fashion_rgb(train[: cfg.eval_images], size)
        data = (f"Fashion-MNIST: 28 px padded to 32, bilinear to {size} px, grey as RGB; "
                f"eval: the first {cfg.eval_images} test images")
    else:
        raise ValueError(f"unknown data set {name!r} (have {', '.join(DATASETS)})")
    log(f"{name}: {data}; training {minutes:g} min ({cfg.quantizer}, downsample {cfg.downsample}, "
        f"{(size // cfg.downsample) ** 2} codes per image)")
    t0 = time.perf_counter()
    model, stats = train_image_vq(draw, cfg, seed=seed, time_budget_s=minutes * 60, eval_images=eval_images,
                                  log=lambda m: log(f"  {name} {m}"), log_every=100)
    grid_path = save_recon_grid(grid_dir / f"image-vq-{name}-{size}px.png", model, eval_images, n=16)
    stats.update(dataset=name, data=data, minutes=minutes, wall_seconds=time.perf_counter() - t0,
                 seen_psnr_db=evaluate_image_vq(model, seen)["psnr_db"],
                 steps_per_s=stats["steps"] / max(stats["train_seconds"], 1e-9),
                 reference_psnr_db_bicubic_thumbnail=thumbnail_psnr(eval_images, size // cfg.downsample),
                 grid_png=str(grid_path), parameters=sum(p.numel() for p in model.parameters()),
                 config=dataclasses.asdict(cfg))
    return stats


def run_tokenizer_bench(minutes: float = 10.0, datasets: tuple[str, ...] = DATASETS, photo_size: int = 64,
                        fashion_size: int = 64, overrides: list[str] | None = None, grid_dir: Path = Path("."),
                        threads: int = 2, seed: int = 0, log=print) -> dict:
    """Train and measure one tokenizer per data set; `overrides` are ImageVQConfig fields (`channels=64`)."""
    from nmm.bench.common import env_info

    if threads > 0:
        torch.set_num_threads(threads)
    parsed = parse_overrides(overrides or [])
    results, skipped = {}, {}
    for name in datasets:
        if name == "fashion" and fashion_unavailable():
            skipped[name] = fashion_unavailable()
            log(f"fashion: skipped ({skipped[name]})")
            continue
        size = photo_size if name == "photos" else fashion_size
        results[name] = run_dataset(name, size, minutes, parsed, Path(grid_dir), seed, log)
    return {"env": env_info(), "threads": threads, "datasets": results, "skipped": skipped}


def format_table(result: dict) -> str:
    head = ("data set", "px", "codes", "steps", "min", "PSNR dB", "seen dB", "thumb dB", "usage", "perplexity", "grid")
    rows = [head]
    for name, r in result["datasets"].items():
        rows.append((name, str(r["image_size"]), f"{r['tokens_per_image']}x{r['codebook_size']}", str(r["steps"]),
                     f"{r['train_seconds'] / 60:.1f}", f"{r['psnr_db']:.2f}", f"{r['seen_psnr_db']:.2f}",
                     f"{r['reference_psnr_db_bicubic_thumbnail']:.2f}", f"{r['codebook_usage']:.3f}",
                     f"{r['perplexity']:.1f}", r["grid_png"]))
    for name, why in result.get("skipped", {}).items():
        rows.append((name, *["-"] * (len(head) - 2), f"skipped: {why}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
