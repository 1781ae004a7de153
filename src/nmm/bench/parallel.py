"""`nmm bench parallel`: one preset trained under each parallel layout, same global batch, same machine.

    nmm bench parallel --preset shapes-quick --steps 30 --procs 2

Runs, in one temporary directory, the same training (same seed, same global batch of micro-batches):
one process (grad_accum = procs, with `procs` threads), then `procs` processes of one thread each
under torchrun with DDP, FSDP2 and FSDP2 x tensor parallel (tp = procs). It reports seconds per step
(median over the logged steps after the first 5), tokens/s in all and per process, and the largest
difference of any logged loss from the one-process run: the numerical tolerance each layout keeps.
On a CPU the processes share one machine's cores and gloo's collectives run through memory, so the
times measure the overhead of each layout here, not its speed-up on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CODEC_FILES = ("vocab.json", "text_tokenizer.json", "image_tokenizer.json", "image_tokenizer.safetensors",
               "tokenizer_stats.json", "codecs.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(cmd: list[str], procs: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{proc.stderr[-3000:]}")


def _summary(name: str, run: Path, procs: int, reference: list[dict] | None) -> dict:
    recs = _records(run)
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(recs, recs[1:])][5:]
    per_step = statistics.median(times) if times else float("nan")
    tokens = statistics.median([r["tokens_per_s"] for r in recs[6:]]) if len(recs) > 6 else float("nan")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(recs, reference)) if reference else 0.0
    return {"layout": name, "processes": procs, "s_per_step": round(per_step, 4), "tokens_per_s": round(tokens, 1),
            "tokens_per_s_per_process": round(tokens / procs, 1), "max_loss_diff_vs_one_process": diff,
            "final_loss": recs[-1]["loss"]}


def run_parallel_bench(preset: str = "shapes-quick", steps: int = 30, procs: int = 2, out: Path | None = None,
                       log=print) -> list[dict]:
    """Train `preset` for `steps` steps under each layout; returns one row per layout."""
    root = Path(tempfile.mkdtemp(prefix="nmm-bench-parallel-"))
    common = [f"train.max_steps={steps}", "train.log_every=1", "train.ckpt_every=100000", "train.min_lr_ratio=1.0"]
    train = [sys.executable, "-m", "nmm.cli", "train", preset]
    try:
        single = root / "single"
        log(f"one process, {procs} threads, grad_accum {procs} ...")
        _run([*train, "--out", str(single), *common, f"train.grad_accum={procs}", f"train.threads={procs}"], 1, procs)
        rows = [_summary("one process", single, 1, None)]
        reference = _records(single)
        for name, extra in (("ddp", ["train.parallelism=ddp"]), ("fsdp2", ["train.parallelism=fsdp2"]),
                            (f"fsdp2 x tp {procs}", ["train.parallelism=fsdp2", f"train.tp={procs}",
                                                     f"train.grad_accum={procs}"])):
            run = root / name.replace(" ", "_")
            run.mkdir()
            for f in CODEC_FILES:  # the same tokenizers: only the transformer trains
                if (single / f).exists():
                    shutil.copy(single / f, run / f)
            log(f"{name}: {procs} processes x 1 thread ...")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
                   str(_free_port()), "-m", "nmm.cli", "train", preset, "--out", str(run), *common, "train.threads=1",
                   *extra]
            _run(cmd, procs, 1)
            rows.append(_summary(name, run, procs, reference))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"preset": preset, "steps": steps, "procs": procs, "rows": rows}, indent=2))
    return rows
