"""Video end to end: a moving-shapes run trains one model that captions clips and makes them."""

import json

import numpy as np
import pytest

import nmm
from nmm.config import load_config
from nmm.data.video_source import make_moving_world
from nmm.train.prepare import prepare_mixture
from nmm.train.trainer import train


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("video") / "run"
    train(load_config("video-tiny", ["train.max_steps=6"]), run, show_progress=False, log=lambda *a: None)
    return run


def test_video_run_has_a_video_codec_and_a_video_loss(video_run):
    for name in ("video_codec.json", "video_frames/image_tokenizer.json", "vocab.json", "model.safetensors"):
        assert (video_run / name).exists(), name
    (spec,) = json.loads((video_run / "vocab.json").read_text())["modalities"]
    assert spec["name"] == "video" and spec["tokens_per_item"] is None  # delta: the model ends clips
    assert {"loss_text", "loss_video"} <= set(json.loads((video_run / "metrics.jsonl").read_text().splitlines()[-1]))
    tokens = json.loads((video_run / "tokenizer_stats.json").read_text())["video"]["tokens_per_clip"]
    assert tokens["full"] == 8 * tokens["image"] and tokens["delta_mean"] < tokens["full"]


def test_batches_teach_every_video_role(video_run):
    pipe = nmm.load(video_run)
    mixture = prepare_mixture(load_config("video-tiny"), pipe.codecs)
    v, rng = pipe.vocab, np.random.default_rng(0)
    docs = [mixture.sample(rng) for _ in range(60)]
    assert {d.role for d in docs} == {"video_captioning", "text_to_clip", "video_qa", "clip_continuation"}
    for doc in docs:
        ids, target = (np.array(x) for x in pipe.codecs.encode_document(doc))
        video = v.is_modality("video", ids)
        assert video.any()
        if doc.role == "text_to_clip":  # loss on the clip, never on its caption
            assert (target & video).any() and not (target & (ids < v.n_text)).any()
        elif doc.role == "clip_continuation":  # the first half is given, the rest and the end are learned
            codes = np.flatnonzero(video)
            assert not target[codes[:64]].any() and target[codes[-1]] and target[codes[-1] + 1]
            assert not (target & (ids < v.n_text)).any()
        else:  # loss on the words only
            assert not (target & video).any() and (target & (ids < v.n_text)).any()


def test_the_same_weights_caption_and_make_clips(video_run):
    pipe = nmm.load(video_run)
    world = make_moving_world(load_config("video-tiny"))
    clips = np.stack([world.render(c) for c in world.clips(2, 5, "train")])
    captions = pipe.describe("video", clips, max_new_tokens=8)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    made = pipe.generate_items("video", ["a small red circle at the top moves one cell down"], max_tokens=40,
                               temperature=1.0, seed=1)
    assert np.asarray(made).shape == (1, 8, 32, 32, 3) and np.asarray(made).dtype == np.uint8
    gif = pipe.codecs.codec("video").to_bytes(made[0])
    assert pipe.codecs.codec("video").from_bytes(gif).shape == (8, 32, 32, 3)


def test_nmm_generate_writes_a_gif_and_captions_one(video_run, tmp_path):
    from typer.testing import CliRunner

    from nmm.cli import app

    out = tmp_path / "clip.gif"
    made = CliRunner().invoke(app, ["generate", str(video_run), "--prompt", "a small red circle at the top appears",
                                    "--out", str(out), "--temperature", "1"])
    assert made.exit_code == 0, made.output
    assert "wrote" in made.output and "8 frames" in made.output and out.read_bytes()[:3] == b"GIF"
    read = CliRunner().invoke(app, ["generate", str(video_run), "--video", str(out)])
    assert read.exit_code == 0, read.output
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00 not a video")
    failed = CliRunner().invoke(app, ["generate", str(video_run), "--video", str(bad)])
    assert failed.exit_code != 0 and "bad.mp4" in str(failed.exception or failed.output)
    nope = CliRunner().invoke(app, ["generate", str(video_run), "--answer", "speech"])
    assert nope.exit_code != 0 and "cannot write speech" in str(nope.exception or nope.output)
