"""train.activation_checkpointing recomputes each block in the backward: the same numbers, the same
weight names (checkpoints and model.safetensors read either way)."""

import json

from safetensors.torch import load_file

from nmm.config import load_config
from nmm.train.trainer import train


def test_activation_checkpointing_trains_the_same_numbers(with_codecs, tmp_path):
    runs = {}
    for ac in ("false", "true"):
        run = with_codecs(tmp_path / ac)
        train(load_config("shapes-tiny", ["train.max_steps=4", f"train.activation_checkpointing={ac}"]), run,
              show_progress=False, log=lambda *a: None)
        runs[ac] = run
    curves = {ac: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for ac, run in runs.items()}
    assert curves["true"] == curves["false"]
    plain, checkpointed = (load_file(runs[ac] / "model.safetensors") for ac in ("false", "true"))
    assert plain.keys() == checkpointed.keys()
