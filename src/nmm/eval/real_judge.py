"""An independent judge for generated real-image classes: a small CNN trained on real images only.

It reads the lit mask of a 32x32 image (what the image tokenizer's shape branch sees, so the
colour a model draws in does not matter) and predicts one of ten classes. It is trained on the
data set's training images, never on anything the model under test produced, with small random
shifts so that a generated image a pixel or two off-centre is still read fairly. Its accuracy on
the real held-out images is stored with it: the ceiling a perfect generator could reach.
Cached under the eval cache folder, keyed by data set, architecture and training settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from nmm.eval.real_data import FORMAT_VERSION, RealDataset, lit_mask
from nmm.optim import lr_at, set_lr
from nmm.utils import atomic_write_json, save_safetensors

ARCH_VERSION = 1


@dataclass(frozen=True)
class JudgeConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    max_shift: int = 1  # pixels of random translation during training
    train_images: int | None = None  # None: the whole training split
    seed: int = 0


class JudgeNet(nn.Module):
    """(B, 32, 32) lit masks -> (B, classes) logits (~38k weights).

    The mask is first averaged over 2x2 blocks: digits' pixels are 4x4 blocks, so nothing is lost
    there, and a garment's outline keeps its sub-block position as a grey level. Two narrow conv
    layers at 16x16 and 8x8 then cost ~0.4M multiply-adds per image, a few CPU seconds to train;
    wider layers (32/64 channels) measured no better on held-out digits for 3x the time."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.AvgPool2d(2),  # (B, 1, 16, 16)
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks.unsqueeze(1))


def _shift(masks: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each mask by up to max_shift pixels (zero fill, no wrap-around)."""
    if max_shift <= 0:
        return masks
    B, H, W = masks.shape
    padded = nn.functional.pad(masks, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=gen)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], rows, cols]


@torch.no_grad()
def judge_predict(net: JudgeNet, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> (N,) predicted class ids."""
    masks = torch.from_numpy(lit_mask(images))
    out = [net(masks[i:i + batch]).argmax(-1) for i in range(0, len(masks), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def train_judge(data: RealDataset, cfg: JudgeConfig = JudgeConfig()) -> tuple[JudgeNet, dict]:
    """Train on the data set's training split; report accuracy on its whole held-out split."""
    t0 = time.time()
    images, labels = data.train_images, data.train_labels
    if cfg.train_images is not None:
        keep = np.random.default_rng(cfg.seed).permutation(len(images))[: cfg.train_images]
        images, labels = images[keep], labels[keep]
    masks, targets = torch.from_numpy(lit_mask(images)), torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG alone
        torch.manual_seed(cfg.seed)
        net = JudgeNet(len(data.classes))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(cfg.seed)
        net.train()
        for step in range(cfg.steps):
            idx = torch.randint(0, len(masks), (cfg.batch_size,), generator=gen)
            loss = nn.functional.cross_entropy(net(_shift(masks[idx], cfg.max_shift, gen)), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Cosine decay to 0, no warmup, steps counted from 1: a short run still ends settled.
            set_lr(opt, lr_at(step + 1, cfg.lr, 0, cfg.steps))
            opt.step()
    net.eval()
    accuracy = float((judge_predict(net, data.test_images) == data.test_labels).mean())
    return net, {"heldout_accuracy": accuracy, "heldout_images": len(data.test_labels),
                 "train_images": len(labels), "train_seconds": round(time.time() - t0, 2),
                 "arch": ARCH_VERSION, **asdict(cfg)}


def load_or_train_judge(data: RealDataset, cache_dir: Path, cfg: JudgeConfig = JudgeConfig(),
                        log=print) -> tuple[JudgeNet, dict]:
    """The cached judge for this data set and config, training (and caching) it on first use."""
    spec = {"data": data.name, "format": FORMAT_VERSION, "arch": ARCH_VERSION, "train": len(data.train_labels),
            "test": len(data.test_labels), **asdict(cfg)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    weights = Path(cache_dir) / f"{data.name}_judge_{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    if weights.exists() and meta_path.exists():
        try:
            net = JudgeNet(len(data.classes))
            net.load_state_dict(load_file(str(weights)))
            return net.eval(), {**json.loads(meta_path.read_text()), "key": key}
        except (OSError, ValueError, RuntimeError):
            log(f"  judge cache {weights} is unreadable; retraining it")
    log(f"  training the {data.name} judge (independent CNN on real images; cached in {cache_dir})")
    net, meta = train_judge(data, cfg)
    save_safetensors(net.state_dict(), weights)
    atomic_write_json(meta_path, meta)
    log(f"  {data.name} judge: {meta['heldout_accuracy']:.3f} on {meta['heldout_images']} real held-out "
        f"images ({meta['train_seconds']} s)")
    return net, {**meta, "key": key}
