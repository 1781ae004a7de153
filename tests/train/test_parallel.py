"""Scale-out on CPU with gloo, as a user runs it (torchrun + `nmm train`):

- DDP and HSDP (with activation checkpointing) on 2 processes, and FSDP2 x tensor parallel on a 2 x 2
  mesh (4 processes), log the losses of one process with the same global batch (grad_accum makes it up);
- a checkpoint saved by the 4 processes resumes on 2 and on 1, and the losses continue identically;
- a 2-"node" run (two torchrun agents, c10d rendezvous on 127.0.0.1) trains and resumes, extending
  max_steps;
- tensor-parallel logits equal one process's, and DDP trains through a batch with no image on one
  rank (tests/train/dist_worker.py).

The tolerance is 1e-4 on losses logged to 5 decimals: the processes add up the same numbers in
another order (all-reduce), nothing else differs.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nmm.config import load_config
from nmm.errors import CheckpointError
from nmm.train.checkpoint import RunLock
from nmm.train.trainer import train

pytestmark = pytest.mark.slow

# Constant learning rate after warmup: the schedule does not depend on max_steps, so a run extended
# on resume is the same as one planned that long.
COMMON = ["train.max_steps=8", "train.log_every=1", "train.threads=1", "train.min_lr_ratio=1.0",
          "train.warmup_steps=2"]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, nnodes: int = 1, rdzv: str | None = None, timeout: int = 400,
             background: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", "nmm-test"]
    else:
        cmd += ["--master-port", str(free_port())]
    cmd += list(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def nmm_train(run: Path, *overrides: str, resume: bool = False) -> list[str]:
    return ["-m", "nmm.cli", "train", "shapes-tiny", "--out", str(run), *(["--resume"] if resume else []),
            *COMMON, *overrides]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def assert_same_losses(a: dict, b: dict, steps) -> None:
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reference(with_codecs, tmp_path_factory):
    """One process, grad_accum 2: the global batch of two processes with one micro-batch each."""
    run = with_codecs(tmp_path_factory.mktemp("par") / "single")
    train(load_config("shapes-tiny", [*COMMON, "train.grad_accum=2"]), run, show_progress=False, log=lambda *a: None)
    return losses(run)


@pytest.fixture(scope="module")
def ddp_run(with_codecs, tmp_path_factory):
    run = with_codecs(tmp_path_factory.mktemp("par") / "ddp")
    torchrun(2, *nmm_train(run, "train.parallelism=ddp"))
    return run


def test_ddp_and_hsdp_with_activation_checkpointing_match_one_process(with_codecs, tmp_path, reference, ddp_run):
    """FSDP2 proper (sharding over ranks) and tensor parallelism: the 4-process test below. Here FSDP2's
    HSDP form (replicate over 2 groups of 1) with per-block activation checkpointing (exact recompute)."""
    hsdp = with_codecs(tmp_path / "hsdp")
    torchrun(2, *nmm_train(hsdp, "train.parallelism=fsdp2", "train.dp_shard=1", "train.activation_checkpointing=true"))
    for layout, run in (("ddp", ddp_run), ("fsdp2 (HSDP: shards of 1)", hsdp)):
        assert_same_losses(losses(run), reference, range(1, 9))
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["parallelism"] == layout
    ranks = [json.loads((ddp_run / f"rank{r}_checksum.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_a_killed_ddp_run_resumes_to_the_same_weights(with_codecs, tmp_path, ddp_run):
    """kill -9 of torchrun mid-run takes its workers with it (none goes on writing checkpoints), and
    the resumed run ends bit-identical to the uninterrupted one."""
    run = with_codecs(tmp_path / "killed")
    agent = torchrun(2, *nmm_train(run, "train.parallelism=ddp", "train.ckpt_every=1"), background=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_0000003").exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.01)
    assert agent.poll() is None, "the run ended before it could be killed"
    agent.kill()
    agent.wait()
    deadline = time.time() + 20  # the workers die with their agent: the run directory's lock comes free
    while True:
        try:
            with RunLock(run):
                break
        except CheckpointError:
            assert time.time() < deadline, "a worker outlived its killed torchrun"
            time.sleep(0.2)
    assert not (run / "train_summary.json").exists()
    torchrun(2, *nmm_train(run, "train.parallelism=ddp", "train.ckpt_every=1", resume=True))
    assert_same_losses(losses(run), losses(ddp_run), range(1, 9))
    a, b = load_file(run / "model.safetensors"), load_file(ddp_run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_with_tensor_parallel_on_4_processes_resumes_on_2_and_on_1(with_codecs, tmp_path, reference):
    run4 = with_codecs(tmp_path / "mesh2x2")
    torchrun(4, *nmm_train(run4, "train.parallelism=fsdp2", "train.tp=2", "train.ckpt_every=4",
                           "train.keep_checkpoints=3"))
    assert_same_losses(losses(run4), reference, range(1, 9))
    saved = run4 / "checkpoints" / "step_0000004"
    assert {p.name for p in saved.glob("rank*.json")} == {f"rank{r}.json" for r in range(4)}

    def from_step_4(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(run4, run)
        shutil.rmtree(run / "checkpoints" / "step_0000008")
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "path": "step_0000004"}))
        return run

    run2 = from_step_4("on2")
    torchrun(2, *nmm_train(run2, "train.parallelism=fsdp2", "train.tp=1", "train.ckpt_every=4", resume=True))
    assert_same_losses(losses(run2), losses(run4), range(5, 9))
    run1 = from_step_4("on1")
    said = []
    cfg = load_config(run1 / "config.yaml", ["train.parallelism=ddp", "train.tp=1"])
    train(cfg, run1, resume=True, show_progress=False, log=said.append)
    assert any("grad_accum 1 -> 2 keeps the global batch" in line for line in said), said
    assert_same_losses(losses(run1), losses(run4), range(5, 9))


def test_two_nodes_with_c10d_rendezvous_train_and_resume(with_codecs, tmp_path, reference):
    run = with_codecs(tmp_path / "nodes")
    endpoint = f"127.0.0.1:{free_port()}"

    def both_nodes(*args):
        agents = [torchrun(1, *args, nnodes=2, rdzv=endpoint, background=True) for _ in range(2)]
        for agent in agents:
            _, err = agent.communicate(timeout=400)
            assert agent.returncode == 0, err[-4000:]

    both_nodes(*nmm_train(run, "train.max_steps=4"))
    both_nodes(*nmm_train(run, "train.max_steps=8", resume=True))  # extends the run past its planned end
    assert sorted(losses(run)) == list(range(1, 9))
    assert_same_losses(losses(run), reference, range(1, 9))


def test_tensor_parallel_logits_and_a_rank_without_images(tiny_run, tmp_path):
    out = tmp_path / "worker"
    out.mkdir()
    torchrun(2, str(Path(__file__).parent / "dist_worker.py"), str(tiny_run), str(out))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["tp_sp0_logits_max_diff"] < 1e-5 and r["tp_sp1_logits_max_diff"] < 1e-5
        assert r["tp_sp1_norm_is_dtensor"] and not r["tp_sp0_norm_is_dtensor"]  # the norms run sequence-parallel
    for routing in ("dense", "moe"):  # trained through the imbalance, and the ranks agree
        assert results[0][f"ddp_{routing}_checksum"] == results[1][f"ddp_{routing}_checksum"]
    for variant in ("early", "decoupled"):
        assert all(math.isfinite(r[f"fsdp2_{variant}_loss"]) for r in results)
