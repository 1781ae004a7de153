"""Process groups for `torchrun`: gloo on CPU, NCCL on GPU. A single process needs none of this."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # Data parallelism: ranks that share a tensor-parallel group read the same data. With the
    # (dp, tp) mesh of nmm.train.parallel, rank = dp_rank * tp + tp_rank; set by `set_tensor_parallel`.
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self):
        self.dp_rank, self.dp_size = self.rank, self.world_size

    def set_tensor_parallel(self, tp: int) -> None:
        self.dp_rank, self.dp_size = self.rank // tp, self.world_size // tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def die_with_parent() -> None:
    """Make this process die when its parent does (Linux). A torchrun worker otherwise outlives a
    killed torchrun (kill -9 reaches only the agent) and goes on training and writing checkpoints
    while the user resumes the same run: two writers, and the resumed run reads a checkpoint the
    orphan is deleting."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def setup() -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, ...)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        die_with_parent()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_int(info: DistInfo, value: int) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, src=0)
    return int(t.item())


def mean_over_ranks(info: DistInfo, value: float) -> float:
    """The mean of a per-rank number over all ranks (every rank gets the same value)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
