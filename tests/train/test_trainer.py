import json

import numpy as np
import pytest

from nmm.config import load_config
from nmm.errors import CheckpointError
from nmm.train.checkpoint import latest_checkpoint, load_weights
from nmm.train.trainer import train


def tiny_config(*overrides):
    return load_config("shapes-tiny", list(overrides))


QUIET = {"show_progress": False, "log": lambda *a: None}


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_everything(tiny_run):
    for name in ("config.yaml", "model.safetensors", "model.json", "vocab.json", "text_tokenizer.json",
                 "image_tokenizer.safetensors", "metrics.jsonl", "train_summary.json"):
        assert (tiny_run / name).exists(), name
    rec = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "loss_text", "loss_image", "tokens_per_s", "mfu"} <= set(rec)
    assert 0 < rec["mfu"] < 1
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["step_gflop"] > 0 and summary["gemm_peak_gflop_per_s"] > 0 and 0 < summary["mfu"] < 1
    assert latest_checkpoint(tiny_run) is not None


def test_a_step_that_fails_to_compile_falls_back_to_eager(tmp_path, monkeypatch):
    """inductor needs a C++ compiler on a CPU: without one, training goes on eagerly and says why."""
    import torch

    def broken_compile(module, *a, **k):
        def fail(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    said = []
    summary = train(tiny_config("train.max_steps=3", "train.compile=true"), tmp_path / "run", show_progress=False,
                    log=said.append)
    assert summary["steps"] == 3
    assert any("torch.compile failed" in line and "training eager" in line for line in said), said


def test_resume_reproduces_straight_run(tiny_run, tmp_path):
    """N steps, stop, resume, N more == 2N straight steps (same losses)."""
    import shutil

    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):  # reuse the trained codecs; only the LM trains here
        d.mkdir()
        for f in tiny_run.iterdir():
            if f.suffix in (".json", ".safetensors") and f.name not in ("model.json", "model.safetensors",
                                                                        "train_summary.json"):
                shutil.copy(f, d / f.name)
    train(tiny_config("train.max_steps=6"), straight, **QUIET)
    train(tiny_config("train.max_steps=6", "train.ckpt_every=3"), split, **QUIET)
    # Simulate a stop after step 3: drop the final checkpoint and the log past it, then resume.
    for ck in sorted((split / "checkpoints").glob("step_*")):
        if ck.name != "step_0000003":
            shutil.rmtree(ck)
    (split / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "path": "step_0000003"}))
    train(tiny_config("train.max_steps=6", "train.ckpt_every=3"), split, resume=True, **QUIET)
    assert len(losses(split)) == 6
    np.testing.assert_allclose(losses(split), losses(straight), rtol=1e-5)
    a, b = load_weights(straight / "model.safetensors"), load_weights(split / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(), tmp_path / "empty", resume=True, **QUIET)


def test_corrupt_weights_are_reported(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(bad)


def test_trains_on_an_image_folder(tmp_path):
    from nmm.data.folder import write_example_folder
    from nmm.data.shapes import ShapesWorld

    world = ShapesWorld()
    scenes = world.scenes(24, 5, "train")
    folder = write_example_folder(tmp_path / "pics", [world.render(s) for s in scenes],
                                  [world.caption(s) for s in scenes])
    run = tmp_path / "run"
    summary = train(tiny_config("data.source=folder", f"data.folder={folder}", "train.max_steps=3"), run, **QUIET)
    assert summary["steps"] == 3 and (run / "model.safetensors").exists()
    import nmm

    caps = nmm.load(run).caption(np.stack([world.render(scenes[0])]), max_new_tokens=8)
    assert isinstance(caps[0], str)
