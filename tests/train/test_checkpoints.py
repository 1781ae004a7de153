"""Checkpoints and run directories: what is saved reads back exactly, including runs saved by nmm
0.1 (before modalities were plugins), and a failed write never leaves a half-written file."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nmm
from nmm.errors import CheckpointError
from nmm.train.checkpoint import (
    CheckpointWriter,
    RunLock,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    load_state_dict_into,
)
from nmm.train.distributed import DistInfo
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


def _trained_copy(tiny_pipe):
    model = type(tiny_pipe.model)(tiny_pipe.model.cfg, tiny_pipe.vocab)  # the fixture's model stays untouched
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = model(torch.randint(0, model.vocab.size, (1, 12))).float().pow(2).mean()
    loss.backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tiny_pipe, tmp_path):
    model, opt = _trained_copy(tiny_pipe)
    torch.manual_seed(123)
    CheckpointWriter(tmp_path, DistInfo(), keep=2).save(7, model, opt, {"max_steps": 9}, {"data": {"shard": 3}})
    expected_draw = torch.rand(3)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name.endswith("7")
    assert all(p.suffix in (".safetensors", ".json") for p in ckpt.iterdir())  # nothing pickled
    clone = type(model)(model.cfg, model.vocab)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=5.0)
    state, rank_state = load_checkpoint(ckpt, clone, opt2, DistInfo())
    assert state["step"] == 7 and state["max_steps"] == 9 and rank_state == {"data": {"shard": 3}}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the save point
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), k
    moments = [(opt.state[a], opt2.state[b]) for a, b in zip(model.parameters(), clone.parameters()) if a in opt.state]
    assert moments and all(torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"]) for s1, s2 in moments)
    assert opt2.param_groups[0]["lr"] == 1e-3  # hyper-parameters as saved


def test_keep_last_k_and_the_latest_pointer(tiny_pipe, tmp_path):
    model, opt = _trained_copy(tiny_pipe)
    writer = CheckpointWriter(tmp_path, DistInfo(), keep=2)
    for step in (1, 2, 3):
        writer.save(step, model, opt, {"max_steps": 3})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_0000002", "step_0000003"]
    assert latest_checkpoint(tmp_path).name == "step_0000003"


def test_async_save_publishes_only_when_written(tiny_pipe, tmp_path):
    model, opt = _trained_copy(tiny_pipe)
    writer = CheckpointWriter(tmp_path, DistInfo(), keep=2, async_save=True)
    writer.save(4, model, opt, {"max_steps": 4})
    assert latest_checkpoint(tmp_path) is None or latest_checkpoint(tmp_path).name == "step_0000004"
    writer.wait()
    clone = type(model)(model.cfg, model.vocab)
    load_model_weights(latest_checkpoint(tmp_path), clone)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))


def test_a_truncated_checkpoint_is_a_clear_error(tiny_pipe, tmp_path):
    model, opt = _trained_copy(tiny_pipe)
    CheckpointWriter(tmp_path, DistInfo(), keep=1).save(1, model, opt, {"max_steps": 1})
    ckpt = latest_checkpoint(tmp_path)
    weights = next(ckpt.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="step_0000001"):
        load_checkpoint(ckpt, type(model)(model.cfg, model.vocab), None, DistInfo())


def test_a_checkpoint_of_another_model_is_a_clear_error(tiny_pipe, tmp_path):
    model, opt = _trained_copy(tiny_pipe)
    CheckpointWriter(tmp_path, DistInfo(), keep=1).save(1, model, opt, {"max_steps": 1})
    other = type(model)(replace(model.cfg, d_model=64, ffn_hidden=96), model.vocab)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_model_weights(latest_checkpoint(tmp_path), other)


def test_an_old_format_checkpoint_is_refused_by_name(tmp_path):
    old = tmp_path / "checkpoints" / "step_0000005"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 5, "max_steps": 9}))
    with pytest.raises(CheckpointError, match="format 1, written by an older nmm"):
        checkpoint_state(old)


def test_a_second_writer_on_one_run_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match="another training process"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_fused_projections_of_older_runs_load_split(tiny_pipe):
    """nmm <= session 5 stored [q|k|v] and [gate|up] fused; such weights load into today's model exactly."""
    model = tiny_pipe.model
    fused = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.wq.weight"):
            base = k[: -len("wq.weight")]
            fused[base + "wqkv.weight"] = torch.cat([v, model.state_dict()[base + "wk.weight"],
                                                     model.state_dict()[base + "wv.weight"]])
        elif k.endswith("ffn.w_gate.weight"):
            fused[k.replace("w_gate", "w_gate_up")] = torch.cat([v, model.state_dict()[k.replace("w_gate", "w_up")]])
        elif not k.endswith(("attn.wk.weight", "attn.wv.weight", "ffn.w_up.weight")):
            fused[k] = v
    clone = type(model)(model.cfg, model.vocab)
    load_state_dict_into(clone, fused, Path("old/model.safetensors"))
    ids = torch.randint(0, model.vocab.size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(clone(ids), model(ids))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
