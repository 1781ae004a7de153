"""Checkpoints and run directories: what is saved reads back exactly, including runs saved by nmm
0.1 (before modalities were plugins), and a failed write never leaves a half-written file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nmm
from nmm.errors import CheckpointError
from nmm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nmm.utils import atomic_write_text


def as_saved_by_nmm_0_1(run):
    """Rewrite a run directory into the files nmm 0.1 wrote: vocab.json without a layout version,
    the image interface's weights under `images.`, MoE expert groups as a list."""
    vocab = json.loads((run / "vocab.json").read_text())
    image = vocab["modalities"][0]
    (run / "vocab.json").write_text(json.dumps({
        "n_text": vocab["n_text"], "image_codes": image["codes"], "image_factors": image["factors"],
        "tokens_per_image": image["tokens_per_item"], "image_levels": image["levels"]}))
    tensors = load_file(run / "model.safetensors")
    save_file({k.replace("modalities.image.", "images."): v for k, v in tensors.items()}, run / "model.safetensors")
    model = json.loads((run / "model.json").read_text())
    model["moe"]["modality_experts"] = []
    (run / "model.json").write_text(json.dumps(model))


def test_a_run_saved_by_nmm_0_1_loads_exactly(tiny_run, tiny_pipe, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    as_saved_by_nmm_0_1(old)
    assert "images.head.proj.0.weight" in load_file(old / "model.safetensors")
    pipe = nmm.load(old)
    assert pipe.vocab == tiny_pipe.vocab
    ids = torch.randint(0, pipe.vocab.size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pipe.model(ids), tiny_pipe.model(ids))


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tiny_pipe, tmp_path):
    model = type(tiny_pipe.model)(tiny_pipe.model.cfg, tiny_pipe.vocab)  # the fixture's model stays untouched
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(torch.randint(0, model.vocab.size, (1, 12))).float().pow(2).mean()
    loss.backward()
    opt.step()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 7, model, opt, {"max_steps": 9}, keep=2)
    expected_draw = torch.rand(3)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name.endswith("7")
    clone = type(model)(model.cfg, model.vocab)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    state = load_checkpoint(ckpt, clone, opt2)
    assert state["step"] == 7 and state["max_steps"] == 9
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the save point
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), k
    moments = [(opt.state[a], opt2.state[b]) for a, b in zip(model.parameters(), clone.parameters()) if a in opt.state]
    assert moments and all(torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"]) for s1, s2 in moments)


def test_a_truncated_checkpoint_is_a_clear_error(tiny_pipe, tmp_path):
    model = tiny_pipe.model
    save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {"max_steps": 1}, keep=1)
    ckpt = latest_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt, type(tiny_pipe.model)(tiny_pipe.model.cfg, tiny_pipe.vocab), None)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
