"""Small helpers shared across nmm: atomic writes, safetensors, seeding."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """`write(tmp_path)` into a temp file in the same folder, then rename it over `path`: readers
    (and a crash mid-write) never see a half-written file, and the old file survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
