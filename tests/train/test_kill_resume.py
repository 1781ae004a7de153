"""Fault tolerance: a run killed with SIGKILL at 20 moments (half of them while a checkpoint is being
written) and resumed each time ends with the loss curve and weights of an uninterrupted run, bit for
bit; no half-written checkpoint is ever picked up (a resume from one would fail or diverge).
The same under DDP: tests/train/test_parallel.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_twenty_kills_and_resumes_end_bit_identical(with_codecs, tmp_path):
    run, reference = with_codecs(tmp_path / "killed"), with_codecs(tmp_path / "straight")
    overrides = ["train.max_steps=60", "train.ckpt_every=1", "train.log_every=1", "train.threads=1",
                 "train.keep_checkpoints=2"]
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_driver.py"), str(run), str(reference),
                           "20", "0", *overrides], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["kills"] == 20 and report["mid_checkpoint_kills"] >= 5, report

    def curve(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert curve(run) == curve(reference) and len(curve(run)) == 60
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".tmp-*"))
