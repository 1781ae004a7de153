"""Resuming a run: extending it, a finished run, overrides that cannot apply, and `nmm export`."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import nmm
from nmm.config import load_config
from nmm.errors import ConfigError
from nmm.train.trainer import train

QUIET = {"show_progress": False, "log": lambda *a: None}


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_new_max_steps_on_resume_extends_the_run(with_codecs, tmp_path):
    run = with_codecs(tmp_path / "run")
    train(load_config("shapes-tiny", ["train.max_steps=4"]), run, **QUIET)
    said = []
    summary = train(load_config(run / "config.yaml", ["train.max_steps=7"]), run, resume=True, show_progress=False,
                    log=said.append)
    assert summary["steps"] == 7 and steps_logged(run) == list(range(1, 8))
    assert any("max_steps 4 -> 7" in line for line in said), said
    # Resuming the finished run trains nothing and writes no new checkpoint (it used to train one more step).
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    said = []
    summary = train(load_config(run / "config.yaml"), run, resume=True, show_progress=False, log=said.append)
    assert summary["steps"] == 7 and sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert any("nothing to do" in line for line in said), said


def test_an_override_that_cannot_apply_on_resume_is_refused_by_name(with_codecs, tmp_path):
    run = with_codecs(tmp_path / "run")
    train(load_config("shapes-tiny", ["train.max_steps=2"]), run, **QUIET)
    with pytest.raises(ConfigError, match=r"cannot change model\.d_model, train\.lr"):
        train(load_config(run / "config.yaml", ["model.d_model=48", "train.lr=0.1", "train.max_steps=3"]), run,
              resume=True, **QUIET)


def test_nmm_export_consolidates_the_latest_checkpoint(with_codecs, tmp_path):
    run = with_codecs(tmp_path / "run")
    train(load_config("shapes-tiny", ["train.max_steps=3"]), run, **QUIET)
    trained = load_file(run / "model.safetensors")
    (run / "model.safetensors").unlink()  # as if the run had been killed before its final export
    (run / "model.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "nmm.cli", "export", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0 and "exported step 3" in proc.stdout, proc.stderr
    exported = load_file(run / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    nmm.load(run)  # what the consolidated run is for
