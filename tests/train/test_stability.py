"""train.spike_policy: a spike injected at one step is logged, skipped, or rolled back past."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nmm.config import load_config
from nmm.train import trainer
from nmm.train.stability import SpikeGuard
from nmm.train.trainer import train

SPIKE_AT = 12  # the step index whose loss is reported 50x too high


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def inject_spike(monkeypatch, calls):
    real = trainer.forward_backward

    def spiking(run, step, data_step, cfg, info, say=print):
        stats, tokens, grad_norm = real(run, step, data_step, cfg, info, say)
        calls.append((step, data_step))
        if len([c for c in calls if c[0] == SPIKE_AT]) == 1 and step == SPIKE_AT:
            stats = {**stats, "loss": stats["loss"] * 50}
        return stats, tokens, grad_norm

    monkeypatch.setattr(trainer, "forward_backward", spiking)


@pytest.mark.parametrize("policy", ["log", "skip", "rollback"])
def test_a_loss_spike_is_handled_by_the_policy(with_codecs, tmp_path, monkeypatch, policy):
    calls = []
    inject_spike(monkeypatch, calls)
    run = with_codecs(tmp_path / policy)
    cfg = load_config("shapes-tiny", ["train.max_steps=16", "train.ckpt_every=5", "train.log_every=100",
                                      f"train.spike_policy={policy}", "train.spike_warmup=5",
                                      "train.spike_skip_window=1", "train.keep_checkpoints=3"])
    said = []
    summary = train(cfg, run, show_progress=False, log=said.append)
    assert summary["steps"] == 16
    events = [r for r in records(run) if "event" in r]
    assert [(e["step"], e["event"]) for e in events] == [(SPIKE_AT + 1, "loss_spike")]
    action = {"log": "logged", "skip": "skipped", "rollback": "rolled_back"}[policy]
    assert events[0]["action"] == action and events[0]["loss"] > 10 * events[0]["loss_ema"]
    if policy == "rollback":
        # back to the step-10 checkpoint; data of steps 10..13 (through the spike, plus a window of 1) is skipped
        assert calls[SPIKE_AT + 1] == (10, 10 + SPIKE_AT + 1 + 1 - 10)
        assert any("rolled back to step 10" in line for line in said), said
        assert json.loads((run / "checkpoints" / "step_0000015" / "state.json").read_text())["data_offset"] == 4
    else:
        assert [c[0] for c in calls] == list(range(16))  # no step trained twice
    steps = [r["step"] for r in records(run) if "event" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # each step logged once, rollback or not


def test_a_skipped_spike_leaves_the_weights_untouched(with_codecs, tmp_path, monkeypatch):
    """The update of the spiking step is not applied: its weights equal the step before's."""
    inject_spike(monkeypatch, [])
    run = with_codecs(tmp_path / "run")
    cfg = load_config("shapes-tiny", [f"train.max_steps={SPIKE_AT + 1}", "train.ckpt_every=1", "train.spike_policy=skip",
                                      "train.spike_warmup=5", "train.keep_checkpoints=3", "train.log_every=100"])
    train(cfg, run, show_progress=False, log=lambda *a: None)
    before = load_file(next((run / "checkpoints" / f"step_{SPIKE_AT:07d}").glob("model-*.safetensors")))
    after = load_file(run / "model.safetensors")
    assert all(torch.equal(before[f"model.{k}"], v) for k, v in after.items())


def test_non_finite_numbers_are_always_skipped():
    guard = SpikeGuard("log", 2.0, warmup=0, ema=1.0)
    assert guard.check(5, float("nan"), 1.0).action == "skipped"
    assert guard.check(5, 1.0, float("inf")).kind == "nonfinite_grad"
    assert guard.check(5, 1.5, 1.0) is None and guard.check(5, 2.5, 1.0).action == "logged"
