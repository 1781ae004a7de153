"""Text, images and speech in one model: joined sources, the M2M role spoken caption -> image,
and its evaluation task."""

import json

import numpy as np
import pytest

from nmm.config import load_config
from nmm.eval.harness import make_context
from nmm.eval.task import get_task
from nmm.train.prepare import prepare_mixture


@pytest.fixture(scope="module")
def three_run(tmp_path_factory):
    from nmm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("three_run")
    train(load_config("shapes-speech-tiny"), run_dir, show_progress=False, log=lambda *a: None)
    return run_dir


@pytest.mark.slow
def test_joined_sources_train_one_model_over_three_modalities(three_run):
    import nmm

    vocab = json.loads((three_run / "vocab.json").read_text())
    assert [m["name"] for m in vocab["modalities"]] == ["image", "audio"]
    record = json.loads((three_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_text", "loss_image", "loss_audio"} <= set(record)
    pipe = nmm.load(three_run)
    mixture = prepare_mixture(load_config("shapes-speech-tiny"), pipe.codecs)
    assert set(mixture.roles) == {"captioning", "generation", "transcription", "synthesis", "spoken_generation",
                                 "spoken_qa"}
    rng = np.random.default_rng(0)
    spoken = next(d for d in iter(lambda: mixture.sample(rng), None) if d.role == "spoken_generation")
    assert [s.modality for s in spoken.segments] == ["audio", "image"] and not spoken.segments[0].loss

    ctx = make_context(pipe, load_config("shapes-speech-tiny", ["eval.n_samples=4"]), three_run / "cache",
                       log=lambda *a: None)
    task = get_task("spoken_t2i")
    assert task.unavailable(ctx) is None
    items = task.build(ctx, "heldout")
    perfect = task.score(ctx, "heldout", items, task.oracle(ctx, items)).metrics
    assert perfect["judged_accuracy"].value == 1.0
    drawn = task.predict(ctx, items)
    assert drawn.shape == (4, 32, 32, 3) and drawn.dtype == np.uint8
    assert 0.0 <= task.score(ctx, "heldout", items, drawn).metrics["attribute_accuracy"].value <= 1.0
