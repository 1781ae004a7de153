"""Short fine-tunes of a trained run on labelled images, for the real-image evaluation tasks.

    adapted, info = load_or_finetune(pipe, cfg, "digits", images, captions, FinetuneConfig(), cache_dir)

A copy of the run's transformer (the tokenizers stay as they are) is trained for a fixed number
of steps on captioning and generation documents built from (image, caption) pairs, with the
training loop's own pieces: `ImagePool` / `DocumentMixture` / `PackedBatches` for the data,
`LossModule`, `make_optimizer` and the schedule `nmm.optim.lr_at` for the update. Everything is a
pure function of the seed (batches are drawn from (seed, step), the model starts from the run's weights), so the
adapted weights are cached under `cache_dir/finetune/`, keyed by the run's weights, the data and
the settings: a second evaluation loads them instead of training again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nmm.data.mixture import DocumentMixture, ImagePool, PackedBatches, image_roles
from nmm.errors import InputError
from nmm.optim import lr_at, set_lr
from nmm.train.trainer import LossModule, make_optimizer
from nmm.utils import atomic_write_json, save_safetensors

VERSION = 1  # bump when the procedure changes, so cached fine-tunes are not reused


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 120  # ~120 CPU s of one core for the demo model (d192x4): about a minute on 2 idle cores
    batch_size: int = 16
    seq_len: int = 256  # packed sequence length, capped at the model's context
    # The demo's peak lr. On digits with the demo model, 120 steps at 2e-3 beat 1e-3 in both
    # directions (captions 0.82 vs 0.77, drawings 0.88 vs 0.77 judged right).
    lr: float = 2e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    # Both directions the tasks measure; caption dropout keeps an unconditional for guidance.
    roles: dict = field(default_factory=lambda: {"captioning": 0.5, "generation": 0.5})
    caption_dropout: float = 0.1
    seed: int = 0


def finetune(pipe, cfg, images: np.ndarray, captions: list[str], ft: FinetuneConfig = FinetuneConfig()):
    """Train a copy of `pipe.model` on (images, captions); returns (Pipeline, info).

    images: (N, H, W, 3) uint8 in the tokenizer's format; cfg: the run's RunConfig (its loss
    weights, z-loss, betas, weight decay and gradient clipping are kept)."""
    from nmm.api import Pipeline

    if len(images) != len(captions) or len(images) == 0:
        raise InputError(f"finetune needs as many captions as images (at least one), got {len(images)} images "
                         f"and {len(captions)} captions")
    if ft.steps < 0 or ft.batch_size < 1:
        raise InputError(f"finetune steps must be >= 0 and batch_size >= 1, got {ft.steps} and {ft.batch_size}")
    t0, cpu0 = time.time(), time.process_time()
    codecs = pipe.codecs
    pool = ImagePool(codecs.encode_images(np.ascontiguousarray(images)), list(captions))
    data_cfg = dataclasses.replace(cfg.data, roles=dict(ft.roles), caption_dropout=ft.caption_dropout)
    # No world, no English: only the task's roles.
    mixture = DocumentMixture(data_cfg, codecs, image_roles(pool, None, data_cfg.caption_dropout), pool=pool)
    seq_len = min(ft.seq_len, pipe.model.cfg.max_seq_len)
    longest = max(len(codecs.encode_text(c)) for c in set(captions)) + codecs.vocab.tokens_per_image + 4
    if longest > seq_len:
        raise InputError(f"a caption + image document is {longest} tokens, longer than the fine-tune's "
                         f"sequence length {seq_len}")
    batches = PackedBatches(mixture, ft.batch_size, seq_len, ft.seed)
    train_cfg = dataclasses.replace(cfg.train, lr=ft.lr, warmup_steps=ft.warmup_steps, min_lr_ratio=ft.min_lr_ratio)

    device = pipe.engine.device
    model = copy.deepcopy(pipe.model).to(device).train()
    optimizer = make_optimizer(model, train_cfg)
    net = LossModule(model, train_cfg.loss_weights, train_cfg.z_loss)
    losses = []
    for step in range(ft.steps):
        set_lr(optimizer, lr_at(step, train_cfg.lr, train_cfg.warmup_steps, ft.steps, train_cfg.min_lr_ratio))
        batch = batches.batch(step).to(device)
        loss, _ = net(batch.ids, batch.targets, batch.positions, batch.doc_ids, batch.generated)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip).item()
        if math.isfinite(grad_norm):  # as in training: a non-finite step would poison AdamW's moments
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    window = max(1, len(losses) // 10)
    # CPU seconds beside wall seconds: on a shared machine the wall clock says little about the cost.
    info = {"steps": ft.steps, "seconds": round(time.time() - t0, 2),
            "cpu_seconds": round(time.process_time() - cpu0, 2), "pool_images": len(pool),
            "initial_loss": float(np.mean(losses[:window])) if losses else None,
            "final_loss": float(np.mean(losses[-window:])) if losses else None}
    return Pipeline(model, codecs, device), info


def finetune_key(pipe, data_key: str, ft: FinetuneConfig) -> str:
    from nmm.eval.harness import weights_fingerprint

    spec = {"version": VERSION, "weights": weights_fingerprint(pipe), "data": data_key, **asdict(ft)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_or_finetune(pipe, cfg, name: str, images: np.ndarray, captions: list[str], ft: FinetuneConfig,
                     cache_dir: Path, data_key: str | None = None, log=print):
    """The cached fine-tune of `pipe` for this data and config, training (and caching) it on first use.

    data_key names the training data (e.g. the data set and its preprocessing); by default it is
    a hash of the images and captions themselves."""
    from nmm.api import Pipeline

    if data_key is None:
        h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        h.update(json.dumps(list(captions)).encode())
        data_key = h.hexdigest()[:16]
    key = finetune_key(pipe, f"{name}:{data_key}", ft)
    weights = Path(cache_dir) / "finetune" / f"{name}_{key}.safetensors"
    meta_path = weights.with_suffix(".json")
    if weights.exists() and meta_path.exists():
        try:
            model = copy.deepcopy(pipe.model)
            model.load_state_dict(load_file(str(weights)))
            info = {**json.loads(meta_path.read_text()), "cached": True, "path": str(weights)}
            log(f"  {name}: fine-tuned weights loaded from {weights}")
            return Pipeline(model.to(pipe.engine.device).eval(), pipe.codecs, pipe.engine.device), info
        except (OSError, ValueError, RuntimeError):
            log(f"  {name}: cached fine-tune {weights} is unreadable; training again")
    log(f"  {name}: fine-tuning a copy of the model for {ft.steps} steps (cached in {weights.parent})")
    adapted, info = finetune(pipe, cfg, images, captions, ft)
    save_safetensors(adapted.model.state_dict(), weights)
    atomic_write_json(meta_path, {**info, "key": key, "config": asdict(ft)})
    loss = (f", loss {info['initial_loss']:.3f} -> {info['final_loss']:.3f}" if info["final_loss"] is not None
            else "")
    log(f"  {name}: fine-tuned in {info['seconds']} s ({info['cpu_seconds']} CPU s){loss}")
    return adapted, {**info, "cached": False, "path": str(weights)}
