"""Training checkpoints: sharded, atomic, resumable to the exact step on any world size; safetensors only.

A checkpoint is a folder `checkpoints/step_0000100/`:

    model-*.safetensors ...   weights and AdamW moments, written by every rank (its own shards) with
                              `torch.distributed.checkpoint` (DCP) through Hugging Face's safetensors
                              storage: no pickle anywhere, so loading a stranger's checkpoint is safe
    state.json                step, max_steps, global batch, optimizer hyper-parameters, format
    rank{r}.json / rank{r}.safetensors
                              what is private to rank r: its data position and its CPU / CUDA RNG

DCP stores each tensor under its fully qualified name with its global shape, so a checkpoint saved by
4 FSDP2 ranks loads onto 2 ranks, onto tensor-parallel ranks, or into one plain process (`nmm export`).

Every rank writes into `checkpoints/.tmp-step_0000100/`; when all have finished, rank 0 renames it to
`step_0000100` and then replaces `checkpoints/latest.json` atomically. A crash at any moment leaves the
previous checkpoint intact and never a half-written one under a `step_*` name. `async_save` writes in
a background thread (DCP's async save, on a process group of its own) so training does not wait;
the rename happens when the write has finished, at most one save is in flight. One run directory has
one writer: `RunLock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nmm.errors import CheckpointError
from nmm.utils import atomic_write_json

FORMAT = 2  # 1: nmm <= 0.1's single model.safetensors + optimizer.safetensors (not resumable any more)


# ---- one writer per run directory ---------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held while training writes to it. The kernel releases it
    when the process dies (even by kill -9), so a stale lock never blocks a resume; a second trainer
    on the same directory (a resume started while the old run is still alive, an orphaned torchrun
    worker) is refused instead of overwriting the checkpoints the first is writing."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise CheckpointError(f"{self.path.parent}: another training process (pid {holder}) is writing to "
                                  "this run directory; wait for it or stop it before resuming") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


# ---- the state of training as named tensors -----------------------------------------------------
def train_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list[dict]]:
    """Model weights (`model.NAME`) and AdamW state (`optim.NAME.exp_avg`, ...) keyed by parameter
    name, as plain tensors or DTensor shards: the same keys on every world size and mesh.
    -> (tensors, optimizer param groups as JSON-able dicts, their `params` as parameter names)."""
    if optimizer is None:
        msd = model.state_dict()
        return {f"model.{k}": v for k, v in msd.items()}, []
    msd, osd = get_state_dict(model, optimizer)
    tensors = {f"model.{k}": v for k, v in msd.items()}
    for name, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, osd["param_groups"]


def _apply(model, optimizer, tensors: dict, groups: list[dict]) -> None:
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if optimizer is None:
        model.load_state_dict(msd)
        return
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, key = k[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[key] = v
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(strict=True))


# ---- saving -------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


class CheckpointWriter:
    """Saves one run's checkpoints from every rank (all ranks call `save`, it is collective)."""

    def __init__(self, run_dir: Path, info, keep: int = 2, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.info, self.keep, self.async_save = info, max(keep, 1), async_save
        self.pending: tuple | None = None  # (future, step) of the save in flight
        # Async saves run collectives from a background thread: they need a process group of their own,
        # or they would interleave with the training step's all-reduces.
        self.group = tdist.new_group(backend="gloo") if async_save and info.enabled else None
        if info.is_main and self.root.exists():  # leftovers of a run killed mid-save (RunLock: no live writer)
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def save(self, step: int, model, optimizer, state: dict, rank_state: dict | None = None) -> None:
        self.wait()
        info = self.info
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if info.enabled:
            tdist.barrier()
        tensors, groups = train_tensors(model, optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(info.device)
        save_file(rng, tmp / f"rank{info.rank}.safetensors")
        atomic_write_json(tmp / f"rank{info.rank}.json", rank_state or {})
        if info.is_main:
            atomic_write_json(tmp / "state.json", {**state, "step": step, "format": FORMAT,
                                                   "world_size": info.world_size,
                                                   "optimizer": {"param_groups": groups}})
        writer = HuggingFaceStorageWriter(str(tmp), save_distributed=info.enabled)
        if not info.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: as intended
        if self.async_save:
            self.pending = (dcp.async_save(tensors, storage_writer=writer, process_group=self.group,
                                           no_dist=not info.enabled), step)
        else:
            dcp.save(tensors, storage_writer=writer, no_dist=not info.enabled)
            self._publish(step)

    def poll(self) -> None:
        """Publish a finished async save (cheap; call once per step)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is not None:
            future, step = self.pending
            self.pending = None
            future.result()  # re-raises a failed write
            self._publish(step)

    def _publish(self, step: int) -> None:
        # DCP's save ends with rank 0 gathering every rank's write results, so once it returns on rank 0
        # every shard is on disk: the folder is complete.
        if not self.info.is_main:
            return
        tmp, final = self.root / f".tmp-{step_dir_name(step)}", self.root / step_dir_name(step)
        if final.exists():  # the same step saved again: move the old one aside first, never delete in place
            trash = self.root / f".tmp-old-{step_dir_name(step)}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_json(self.root / "latest.json", {"step": step, "path": final.name})
        for old in sorted(self.root.glob("step_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


# ---- loading ------------------------------------------------------------------------------------
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


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json, checked to be one this nmm can resume."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{Path(path) / 'state.json'}: missing or corrupt") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format', 1)}, written by an older nmm; this nmm "
                              f"resumes format {FORMAT}. The run's final model.safetensors still loads with nmm.load.")
    return state


def _read(path: Path, tensors: dict, no_dist: bool) -> None:
    if no_dist:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: as intended
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=no_dist)
    except (CheckpointException, AssertionError, RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors into this model ({first})") from None


def load_checkpoint(path: Path, model, optimizer, info) -> tuple[dict, dict]:
    """Weights, optimizer state and this rank's RNG from `path`, onto this run's world size and
    parallelism (all ranks call it). -> (state.json, this rank's private state, {} for a rank that
    did not exist when it was saved)."""
    path = Path(path)
    state = checkpoint_state(path)
    tensors, groups = train_tensors(model, optimizer)
    _read(path, tensors, no_dist=not info.enabled)
    saved_groups = state.get("optimizer", {}).get("param_groups", [])
    for group, saved in zip(groups, saved_groups):  # hyper-parameters as saved; parameters as this model names them
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
    _apply(model, optimizer, tensors, groups)
    rank_file = path / f"rank{info.rank}.safetensors"
    if rank_file.exists():
        rng = load_file(str(rank_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    rank_json = path / f"rank{info.rank}.json"
    return state, (json.loads(rank_json.read_text()) if rank_json.exists() else {})


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the weights of a checkpoint, into a plain (unsharded) model in this process: what
    `nmm export` and checkpoint-by-checkpoint evaluation read."""
    path = Path(path)
    checkpoint_state(path)
    tensors, _ = train_tensors(model, None)
    tensors = {k: v.clone() for k, v in tensors.items()}
    _read(path, tensors, no_dist=True)
    _apply(model, None, tensors, [])


# ---- final weights (safetensors, one file) --------------------------------------------------------
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


def consolidate(run_dir: Path, checkpoint: Path | None = None) -> tuple[Path, int]:
    """A training checkpoint (any world size, any parallelism) -> `run_dir/model.safetensors` and
    `model.json`, the files `nmm.load` reads, in this one process. Default: the latest checkpoint.
    -> (the weights file, the checkpoint's step)."""
    from nmm.config import load_config, to_dict
    from nmm.modalities.codecs import Codecs
    from nmm.model.model import NativeMultimodalModel
    from nmm.utils import save_safetensors

    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} to export")
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"{run_dir}: no config.yaml (is it a run directory?)")
    cfg = load_config(run_dir / "config.yaml")
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)  # as the trainer builds it
    model = NativeMultimodalModel(cfg.model, Codecs.load(run_dir).vocab)
    load_model_weights(ckpt, model)
    save_safetensors(model.state_dict(), run_dir / "model.safetensors")
    atomic_write_json(run_dir / "model.json", to_dict(model.cfg))
    return run_dir / "model.safetensors", checkpoint_state(ckpt)["step"]
