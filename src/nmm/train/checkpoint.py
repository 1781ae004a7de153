"""Checkpoints: atomic, resumable to the exact step, weights and optimizer state as safetensors.

A checkpoint is a folder `checkpoints/step_0000100/` holding `model.safetensors`,
`optimizer.safetensors` and `state.json` (step, data position, RNG, schedule). It is written in a
temporary folder and renamed into place, then `checkpoints/latest.json` is replaced atomically,
so a crash mid-write leaves the previous checkpoint intact and never a half-written one.
Nothing here unpickles: safe to load files from anyone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nmm.errors import CheckpointError
from nmm.utils import atomic_write_json


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        atomic_write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_meta})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    try:
        path = pointer.parent / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{pointer}: corrupt checkpoint pointer") from None
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points to {path.name}, which does not exist")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_state_dict_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    if hasattr(model, "upgrade_state_dict"):  # names from an older nmm
        tensors = model.upgrade_state_dict(tensors)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    load_state_dict_into(model, load_weights(path / "model.safetensors"), path / "model.safetensors")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path / 'state.json'}: missing or corrupt") from None
    if optimizer is not None:
        _load_optimizer(optimizer, load_weights(path / "optimizer.safetensors"), state.pop("optimizer"))
    torch.set_rng_state(load_weights(path / "rng.safetensors")["torch_rng"])
    return state
