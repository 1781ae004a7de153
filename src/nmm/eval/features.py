"""Image features for the Fréchet distance: a small CNN that nmm trains on rendered shapes scenes.

The network learns to read a scene (per grid cell: colour, kind, size or empty) from clean
renders, so its cell vectors encode exactly what a shapes image is about. It is trained once per
world geometry (300 steps, about 17 s of one CPU core), cached on disk, and never sees the model
under test, so distances are comparable across runs that share a world. `cell_accuracy` in its
metadata is measured on 512 fresh renders, over all nine cells (empty ones included).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nmm.data.shapes import COLOURS, KINDS, SIZES, ShapesWorld
from nmm.optim import lr_at, set_lr
from nmm.utils import atomic_write_json

ARCH_VERSION = 2
CELLS = 9
# Per cell: colour (6 + empty), kind (4 + empty), size (2 + empty).
HEADS = {"colour": len(COLOURS) + 1, "kind": len(KINDS) + 1, "size": len(SIZES) + 1}


@dataclass(frozen=True)
class FeatureNetConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    train_scenes: int = 8192
    seed: int = 0
    cell_dim: int = 16


class ShapesFeatureNet(nn.Module):
    """A cell reader: a small CNN applied to each of the nine grid cells of an image.

    Every training scene teaches the same reader nine times, which is why a few hundred steps
    suffice. The image feature is the nine cell vectors side by side, (B, 9 * cell_dim), so it
    encodes what is where, and nothing else, like the judge, but continuously.
    """

    def __init__(self, world: ShapesWorld, cell_dim: int = 16):
        super().__init__()
        self.cell_dim, self.cell_px = cell_dim, world.cell_px
        self.origins = [world.cell_origin(c) for c in range(CELLS)]
        half = -(-world.cell_px // 2)
        self.reader = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),  # (B*9, 16, c, c), c = cell_px
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B*9, 32, c/2, c/2)
            nn.Flatten(), nn.Linear(32 * half * half, 64), nn.ReLU(), nn.Linear(64, cell_dim), nn.ReLU(),
        )
        self.heads = nn.Linear(cell_dim, sum(HEADS.values()))
        # Set after training: the spread of real images' features, so that distances are in units
        # of it (a real-vs-real distance is then O(1)-O(10), not O(1e5)).
        self.register_buffer("scale", torch.ones(()))

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 9, cell_dim)."""
        c = self.cell_px
        crops = torch.stack([images[:, y:y + c, x:x + c] for y, x in self.origins], 1)  # (B, 9, c, c, 3)
        x = crops.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0  # (B*9, 3, c, c)
        return self.reader(x).view(len(images), CELLS, self.cell_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 9 * cell_dim) float, in units of the real images' spread."""
        return self.cells(images).flatten(1) / self.scale

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> head name -> (B, 9, classes) logits."""
        logits = self.heads(self.cells(images))
        return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))


def _labels(world: ShapesWorld, scenes) -> dict[str, torch.Tensor]:
    """Per-cell class ids, (N, CELLS) each; the last class of every head means "empty"."""
    out = {name: np.full((len(scenes), CELLS), n - 1, dtype=np.int64) for name, n in HEADS.items()}
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            out["colour"][i, s.cell] = list(COLOURS).index(s.colour)
            out["kind"][i, s.cell] = KINDS.index(s.kind)
            out["size"][i, s.cell] = SIZES.index(s.size)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _key(world: ShapesWorld, cfg: FeatureNetConfig) -> str:
    spec = {"arch": ARCH_VERSION, "image_size": world.image_size, "min_shapes": world.min_shapes,
            "max_shapes": world.max_shapes, **asdict(cfg)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def train_feature_net(world: ShapesWorld, cfg: FeatureNetConfig = FeatureNetConfig()) -> tuple[ShapesFeatureNet, dict]:
    """Train on renders of the "any" split (held-out combinations included), report held-out accuracy."""
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG alone
        torch.manual_seed(cfg.seed)
        net = ShapesFeatureNet(world, cfg.cell_dim)
        scenes = world.scenes(cfg.train_scenes, 77_000 + cfg.seed, "any")
        images = torch.from_numpy(np.stack([world.render(s) for s in scenes]))  # (N, H, W, 3)
        labels = _labels(world, scenes)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        net.train()
        for step in range(cfg.steps):
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
            logits = net(images[idx])
            loss = sum(nn.functional.cross_entropy(logits[k].reshape(-1, HEADS[k]), labels[k][idx].reshape(-1))
                       for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Cosine decay to 0, no warmup, steps counted from 1: a short run still ends settled.
            set_lr(opt, lr_at(step + 1, cfg.lr, 0, cfg.steps))
            opt.step()
    net.eval()
    test = world.scenes(512, 78_000 + cfg.seed, "any")
    with torch.no_grad():
        test_images = torch.from_numpy(np.stack([world.render(s) for s in test]))
        pred = net(test_images)
        # RMS spread of real features around their mean: one number, so the geometry is unchanged.
        net.scale.copy_(net.cells(test_images).flatten(1).var(0).mean().sqrt().clamp(min=1e-6))
    truth = _labels(world, test)
    accuracy = {k: float((pred[k].argmax(-1) == truth[k]).float().mean()) for k in HEADS}
    return net, {"cell_accuracy": accuracy, "train_seconds": round(time.time() - t0, 2), **asdict(cfg),
                 "arch": ARCH_VERSION}


def load_or_train_feature_net(world: ShapesWorld, cache_dir: Path, cfg: FeatureNetConfig = FeatureNetConfig(),
                              log=print) -> tuple[ShapesFeatureNet, dict]:
    """The cached network for this world geometry, training (and caching) it on first use."""
    cache_dir = Path(cache_dir)
    key = _key(world, cfg)
    weights, meta_path = cache_dir / f"shapes_features_{key}.safetensors", cache_dir / f"shapes_features_{key}.json"
    if weights.exists() and meta_path.exists():
        try:
            net = ShapesFeatureNet(world, cfg.cell_dim)
            net.load_state_dict(load_file(str(weights)))
            return net.eval(), {**json.loads(meta_path.read_text()), "key": key}
        except (OSError, ValueError, RuntimeError):
            log(f"  feature network cache {weights} is unreadable; retraining it")
    log(f"  training the feature network for Fréchet distances (once; cached in {cache_dir})")
    net, meta = train_feature_net(world, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(f".tmp{time.time_ns()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(weights)  # atomic: a concurrent reader sees the old file or the new one
    atomic_write_json(meta_path, meta)
    return net, {**meta, "key": key}


@torch.no_grad()
def embed(net: ShapesFeatureNet, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, feature_dim) float64."""
    out = [net.embed(torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))).double().numpy()
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, CELLS * net.cell_dim))
