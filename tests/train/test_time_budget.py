"""train.time_budget_min: the run length is fixed from the speed measured over steps 10-40, then once more over 41-240."""

import shutil

import pytest

from nmm.config import load_config
from nmm.train import trainer
from nmm.train.trainer import train


def copy_codecs(tiny_run, run_dir):
    """Reuse the session's trained tokenizers: only the language model trains here."""
    run_dir.mkdir()
    for f in tiny_run.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name not in ("model.json", "model.safetensors",
                                                                    "train_summary.json"):
            shutil.copy(f, run_dir / f.name)


@pytest.mark.parametrize("bad_steps", [(10,), (10, 40)], ids=["step10", "steps10+40"])
def test_a_skipped_update_at_a_timing_step_keeps_the_budget(tiny_run, tmp_path, monkeypatch, bad_steps):
    """Regression: a non-finite gradient exactly at step 10 skipped starting the clock, and step 40
    then failed with UnboundLocalError; one at step 40 skipped the budget altogether."""
    real_clip = trainer.clip_grad_norm
    calls = []

    def clip_with_bad_steps(parameters, max_norm):
        norm = real_clip(parameters, max_norm)
        calls.append(len(calls))
        return float("inf") if calls[-1] in bad_steps else norm

    monkeypatch.setattr(trainer, "clip_grad_norm", clip_with_bad_steps)
    run = tmp_path / "run"
    copy_codecs(tiny_run, run)
    # A budget far too small for 200 steps: the run is cut to the minimum, step 40 + 2.
    cfg = load_config("shapes-tiny", ["train.max_steps=200", "train.time_budget_min=0.0001", "train.log_every=100"])
    lines = []
    summary = train(cfg, run, show_progress=False, log=lines.append)
    assert [line.split(" (")[0] for line in lines if "non-finite" in line] == [
        f"step {step + 1}: non-finite gradient norm, update skipped" for step in bad_steps]
    assert any(line.startswith("time budget 0.0001 min") and line.endswith("-> 42 steps") for line in lines), lines
    assert summary["steps"] == 42


class FakeClock:
    """time.time() for the trainer: advances only when a training step runs, by a chosen cost."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_the_budget_is_measured_again_after_a_slow_start(tiny_run, tmp_path, monkeypatch):
    """Steps 11-40 run at 1 s, the rest at 0.5 s: the first estimate plans 300 steps for a 5-minute
    budget, the second (steps 41-240) sees the real speed and extends the run to the cap."""
    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    real_forward_backward = trainer.forward_backward

    def timed(run, step, *a, **k):
        clock.now += 1.0 if step < 41 else 0.5
        return real_forward_backward(run, step, *a, **k)

    monkeypatch.setattr(trainer, "forward_backward", timed)
    run = tmp_path / "run"
    copy_codecs(tiny_run, run)
    cfg = load_config("shapes-tiny", ["train.max_steps=400", "train.time_budget_min=5", "train.log_every=1000",
                                      "train.ckpt_every=1000"])
    lines = []
    summary = train(cfg, run, show_progress=False, log=lines.append)
    budget = [line for line in lines if line.startswith("time budget")]
    assert budget[0] == "time budget 5.0 min at 1.000 s/step -> 300 steps", lines
    assert budget[1] == "time budget 5.0 min at 0.500 s/step (steps 41-240) -> 400 steps", lines
    assert summary["steps"] == 400
