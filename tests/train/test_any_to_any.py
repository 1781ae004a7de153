"""Text, images, speech and video in one tiny backbone: it trains, and the same weights read and write
every modality."""

import json

import numpy as np
import pytest

import nmm
from nmm.config import load_config
from nmm.data.shapes import ShapesWorld
from nmm.data.speech import SpeechWorld
from nmm.data.video_source import make_moving_world
from nmm.train.trainer import train


@pytest.fixture(scope="module")
def any_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("any") / "run"
    train(load_config("any-to-any-tiny", ["train.max_steps=4"]), run, show_progress=False, log=lambda *a: None)
    return run


def test_one_vocabulary_and_a_loss_per_modality(any_run):
    names = [m["name"] for m in json.loads((any_run / "vocab.json").read_text())["modalities"]]
    assert names == ["image", "audio", "video"]
    record = json.loads((any_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_text", "loss_image", "loss_audio", "loss_video"} <= set(record)


@pytest.mark.slow
def test_the_same_weights_read_and_write_every_modality(any_run):
    pipe = nmm.load(any_run)
    cfg = load_config("any-to-any-tiny")
    world = ShapesWorld()
    images = np.stack([world.render(s) for s in world.scenes(2, 3, "train")])
    speech = SpeechWorld()
    waves = [speech.render(t, v) for t, v in speech.utterances(2, 4, "heldout")]
    moving = make_moving_world(cfg)
    clips = np.stack([moving.render(c) for c in moving.clips(2, 5, "train")])
    # reading: text about every modality
    for name, items in (("image", images), ("audio", waves), ("video", clips)):
        texts = pipe.describe(name, items, max_new_tokens=6)
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts), name
    # writing: every modality from text
    made_images = pipe.generate_images(["a small red circle at the top"], temperature=1.0)
    assert made_images.shape == (1, 32, 32, 3) and made_images.dtype == np.uint8
    (wave,) = pipe.speak(["seven"], max_tokens=8, temperature=1.0)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
    made_clips = pipe.generate_items("video", ["a large blue square at the left moves one cell right"], max_tokens=20,
                                     temperature=1.0)
    assert np.asarray(made_clips).shape == (1, 8, 32, 32, 3)
