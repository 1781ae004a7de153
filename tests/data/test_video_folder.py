"""A user's own videos (data.source=video_folder): MP4 / WebM / GIF files come back as clips of
video.frames frames sampled at video.fps, paired with their captions; bad items are skipped with a
reason naming them, the rest loads, and the source trains like `moving_shapes`.

Every file is written here, programmatically (PyAV for MP4 / WebM / MPEG-TS, PIL for GIF): a white
square on black moving right 1 px a frame, at a row that tells the files apart."""

import io
import json
import logging
from dataclasses import fields

import av
import numpy as np
import pytest
import torch

from nmm.config import DataConfig, load_config
from nmm.data.folder import CAPTIONS_FILE
from nmm.data.sources import data_source
from nmm.data.video_folder import (
    VideoFolder,
    VideoFolderSource,
    read_video_folder,
    write_example_video_folder,
)
from nmm.errors import ConfigError, InputError, NmmError
from nmm.modalities.document import ItemSegment, TextSegment
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.video import VideoCodec, sample_indices, write_gif


# ---- fixtures: files written on the spot --------------------------------------------------------
def moving_square(n: int = 16, height: int = 32, width: int = 32, row: int = 4) -> np.ndarray:
    """(n, H, W, 3) uint8: an 8 px white square at rows row..row+7, its left edge at x = frame index."""
    clip = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        clip[i, row : row + 8, i : i + 8] = 255
    return clip


def encode(clip: np.ndarray, fps: int = 8, codec: str = "libx264", fmt: str = "mp4") -> bytes:
    """A clip through PyAV: MP4 (H.264), WebM (VP9), MPEG-TS, ... at `fps` frames per second."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = clip.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return buf.getvalue()


def no_frames_mp4(path) -> None:
    """An MP4 whose video stream never got a frame (FFmpeg then keeps no video stream at all)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()


def audio_only_mp4(path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16_000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16_000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def centre(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) of the bright pixels' centre of mass."""
    ys, xs = np.nonzero(frame.mean(axis=2) > 128)
    return float(xs.mean()), float(ys.mean())


def write_lines(root, lines: list[str]) -> None:
    (root / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def entry(file: str, caption, **extra) -> str:
    return json.dumps({"file": file, "caption": caption, **extra})


def folder_config(root, *overrides: str):
    """video-tiny on the folder `root`: `data.video_folder=` once DataConfig has the field, set on
    cfg.data until then (the source reads it with getattr)."""
    base = ["data.source=video_folder", *overrides]
    if "video_folder" in {f.name for f in fields(DataConfig)}:
        return load_config("video-tiny", [*base, f"data.video_folder={root}"])
    cfg = load_config("video-tiny", base)
    cfg.data.video_folder = str(root)
    return cfg


# ---- decoding and sampling ----------------------------------------------------------------------
def test_mp4_webm_and_gif_come_back_sampled_at_fps_and_paired_with_their_captions(tmp_path):
    """16 frames at 8 fps (2 s) sampled at 4 fps into 8 frames: every other source frame, so the
    square's left edge is at x = 0, 2, ..., 14; each file's square sits on its own row."""
    (tmp_path / "a.mp4").write_bytes(encode(moving_square(row=2)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.webm").write_bytes(encode(moving_square(height=48, width=64, row=24), codec="libvpx-vp9",
                                                     fmt="webm"))
    (tmp_path / "c.gif").write_bytes(write_gif(moving_square(row=20), fps=8))
    write_lines(tmp_path, [entry("a.mp4", "top"), entry("sub/b.webm", "  a wide\tone "), entry("c.gif", "low", id=3)])

    clips, captions, skipped = read_video_folder(tmp_path, frames=8, size=32, fps=4)
    assert clips.shape == (3, 8, 32, 32, 3) and clips.dtype == np.uint8 and skipped == []
    assert captions == ["top", "a wide one", "low"]  # whitespace collapsed, extra keys ignored
    rows = {"top": 2 + 3.5, "a wide one": (24 + 3.5) * 32 / 48, "low": 20 + 3.5}  # b.webm: 64x48 squashed to 32
    for clip, caption in zip(clips, captions):
        xs, ys = zip(*(centre(f) for f in clip))
        scale = 0.5 if caption == "a wide one" else 1.0
        np.testing.assert_allclose(xs, (np.arange(0, 16, 2) + 3.5) * scale, atol=0.75)
        np.testing.assert_allclose(ys, rows[caption], atol=0.75)  # the caption's own file
    folder = VideoFolder(tmp_path, frames=8, size=32, fps=4)
    assert folder.summary == "loaded 3 of 3 items" and not folder.notes
    assert [p.name for p in folder.paths] == ["a.mp4", "b.webm", "c.gif"]


def test_short_clips_are_padded_with_their_last_frame_long_ones_cut(tmp_path):
    (tmp_path / "short.mp4").write_bytes(encode(moving_square(8)))  # 1 s of the 2 s window
    (tmp_path / "long.gif").write_bytes(write_gif(moving_square(24), fps=4))  # 6 s at 4 fps
    write_lines(tmp_path, [entry("short.mp4", "short"), entry("long.gif", "long")])
    folder = VideoFolder(tmp_path, frames=8, size=32, fps=4)
    (short, _), (long, _) = folder[0], folder[1]
    xs = [centre(f)[0] for f in short]
    np.testing.assert_allclose(xs[:4], np.arange(0, 8, 2) + 3.5, atol=0.75)
    assert all((f == short[4]).all() for f in short[4:])  # from 1 s on: the last frame, repeated
    assert centre(short[4])[0] == pytest.approx(7 + 3.5, abs=0.75)
    np.testing.assert_allclose([centre(f)[0] for f in long], np.arange(8) + 3.5, atol=0.5)  # the first 2 s
    assert folder.notes == {"padded to 2 s with its last frame": 1, "cut to the first 2 s": 1}
    assert folder.summary.endswith("notes: 1 cut to the first 2 s, 1 padded to 2 s with its last frame")


def test_sampling_takes_the_frame_on_screen_at_each_instant():
    times = np.array([0.0, 0.1, 0.3, 1.0])  # variable frame rate
    picks, note = sample_indices(times, 4, frames=4, fps=4, seconds=1.5)
    assert picks.tolist() == [0, 1, 2, 2] and note == "cut to the first 1 s"
    picks, note = sample_indices(None, 10, frames=4, fps=4)
    assert picks.tolist() == [0, 3, 6, 9] and note == "sampled evenly (no usable timestamps)"


def test_a_gif_folder_round_trips_frame_for_frame(tmp_path):
    clips = [moving_square(8, row=r) for r in (0, 12, 24)]
    write_example_video_folder(tmp_path, clips, ["one", "two", "three"], fps=4)
    folder = VideoFolder(tmp_path, frames=8, size=32, fps=4)
    assert folder.summary == "loaded 3 of 3 items"
    np.testing.assert_array_equal(folder.clips(), np.stack(clips))
    folder[0][0][:] = 7
    assert not (folder[0][0] == 7).all()  # items are copies


# ---- what goes wrong ----------------------------------------------------------------------------
@pytest.fixture
def messy(tmp_path):
    """Two good clips and one of every kind of bad item, lines in this order: 1 good.mp4, 2 gone.mp4
    (missing), 3 garbage.mp4, 4 cut.mp4 (truncated), 5 empty.mp4 (no frames), 6 voice.mp4 (audio
    only), 7 long.mp4 (over max_seconds), 8 empty caption, 9 bad JSON, 10 no "caption", 11 a caption
    that is a number, 12 joined.ts (two streams of different sizes, their timestamps restarting)."""
    (tmp_path / "good.mp4").write_bytes(encode(moving_square()))
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video at all" * 10)
    (tmp_path / "cut.mp4").write_bytes(encode(moving_square())[:1000])
    no_frames_mp4(tmp_path / "empty.mp4")
    audio_only_mp4(tmp_path / "voice.mp4")
    (tmp_path / "long.mp4").write_bytes(encode(moving_square(12), fps=2))  # 6 s
    (tmp_path / "joined.ts").write_bytes(encode(moving_square(8), fmt="mpegts")
                                         + encode(moving_square(8, width=48), fmt="mpegts"))
    write_lines(tmp_path, [
        entry("good.mp4", "a square moves right"),
        entry("gone.mp4", "missing"),
        entry("garbage.mp4", "garbage"),
        entry("cut.mp4", "cut short"),
        entry("empty.mp4", "nothing"),
        entry("voice.mp4", "only sound"),
        entry("long.mp4", "far too long"),
        entry("good.mp4", " \n "),
        '{"file": "good.mp4", "caption": "oops"',
        "",  # blank lines are not items
        json.dumps({"file": "good.mp4"}),
        entry("good.mp4", 7),
        entry("joined.ts", "two parts"),
    ])
    return tmp_path


def test_a_messy_folder_loads_what_it_can_and_names_the_rest(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="nmm.data.video_folder"):
        folder = VideoFolder(messy, frames=8, size=32, fps=4, max_seconds=5)
    assert len(folder) == 2 and folder.listed == 12
    assert folder.captions() == ["a square moves right", "two parts"]
    assert folder.clips().shape == (2, 8, 32, 32, 3)

    skipped = {(s.reason, s.name) for s in folder.skipped}
    assert skipped == {("missing file", "gone.mp4"), ("unreadable", "garbage.mp4"), ("unreadable", "cut.mp4"),
                       ("no frames", "empty.mp4"), ("no frames", "voice.mp4"), ("too long", "long.mp4"),
                       ("empty caption", "line 8"), ("bad JSON", "line 9"), ("bad field", "line 11"),
                       ("bad field", "line 12")}
    messages = {s.name: s.message for s in folder.skipped}
    assert messages["gone.mp4"] == f"captions.jsonl:2: video file not found: {messy / 'gone.mp4'}"
    for line, name in ((3, "garbage.mp4"), (4, "cut.mp4")):
        assert messages[name].startswith(f"captions.jsonl:{line}: {name}: not a readable video")
    assert messages["empty.mp4"].startswith("captions.jsonl:5: empty.mp4: no video stream")
    assert messages["voice.mp4"].startswith("captions.jsonl:6: voice.mp4: no video stream")
    assert messages["long.mp4"] == ("captions.jsonl:7: long.mp4: 6.00 s is longer than video.max_seconds=5 "
                                    "(cut it, or raise the limit)")
    assert messages["line 8"] == 'captions.jsonl:8: good.mp4: empty "caption"'
    assert messages["line 9"].startswith("captions.jsonl:9: invalid JSON")
    assert messages["line 11"] == 'captions.jsonl:11: good.mp4: "caption" field is missing'
    assert messages["line 12"] == 'captions.jsonl:12: good.mp4: "caption" field is not a string (int)'

    assert folder.summary == (
        "loaded 2 of 12 items; skipped 10: 1 bad JSON (line 9), 2 bad field (line 11, line 12), "
        "1 empty caption (line 8), 1 missing file (gone.mp4), 1 too long (long.mp4), "
        "2 no frames (empty.mp4, voice.mp4), 2 unreadable (garbage.mp4, cut.mp4); "
        "notes: 1 had frames of mixed sizes (each resized), 1 sampled evenly (no usable timestamps)")
    assert folder.summary in caplog.text and "gone.mp4" in caplog.text  # the user sees it without asking

    # joined.ts: its 16 frames (8 of 32 px, 8 of 48 px) evenly, each squashed to 32x32.
    joined = folder[1][0]
    xs = [centre(f)[0] for f in joined]
    assert xs[0] == pytest.approx(3.5, abs=0.75) and xs[-1] == pytest.approx((7 + 3.5) * 32 / 48, abs=0.75)


def test_nothing_loading_is_an_error_naming_the_folder_and_every_reason(tmp_path):
    (tmp_path / "garbage.webm").write_bytes(b"\x1aE\xdf\xa3 nonsense")
    (tmp_path / "ok.gif").write_bytes(write_gif(moving_square(4)))
    write_lines(tmp_path, [entry("garbage.webm", "x"), entry("gone.mp4", "y"), entry("ok.gif", ""), "not json"])
    with pytest.raises(InputError) as err:
        read_video_folder(tmp_path, frames=8, size=32, fps=4)
    message = str(err.value)
    assert isinstance(err.value, NmmError)
    assert f"no usable videos in video folder {tmp_path}" in message
    assert "loaded 0 of 4 items; skipped 4" in message
    for name in ("captions.jsonl:1: garbage.webm", "gone.mp4", "captions.jsonl:3: ok.gif",
                 "captions.jsonl:4: invalid JSON"):
        assert name in message


@pytest.mark.parametrize("write, match", [
    (None, "video folder not found"),
    ("", r"captions\.jsonl lists no videos"),
    (False, r"captions file not found: .*captions\.jsonl \(one JSON object per line"),
])
def test_a_folder_that_cannot_be_used_at_all(tmp_path, write, match):
    root = tmp_path / "videos"
    if write is not None:
        root.mkdir()
        if write is not False:
            (root / CAPTIONS_FILE).write_text(write)
    with pytest.raises(InputError, match=match):
        VideoFolder(root)


# ---- the data source ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Ten GIF clips of 8 frames at 4 fps, one square row each."""
    root = tmp_path_factory.mktemp("videos")
    texts = [f"a square on row {r}" for r in range(0, 20, 2)]
    write_example_video_folder(root, [moving_square(8, row=r) for r in range(0, 20, 2)], texts, fps=4)
    return root, texts


def test_the_source_needs_a_folder():
    with pytest.raises(ConfigError, match="data.video_folder=PATH"):
        data_source(load_config("video-tiny", ["data.source=video_folder"]))


def test_the_source_gives_the_frame_tokenizer_frames_and_the_codec_clips(videos):
    root, texts = videos
    source = data_source(folder_config(root, "image.pool_size=20"))
    assert isinstance(source, VideoFolderSource) and source.summary == "loaded 10 of 10 items"
    assert source.modalities == ("video",) and source.world is None and source.judge is None
    assert source.texts() == texts
    assert len(source.train) == 9 and len(source.heldout) == 1
    frames = source.images()
    assert frames.shape == (20, 32, 32, 3) and frames.dtype == np.uint8  # image.pool_size of the 72
    rows = {round(centre(f)[1] - 3.5) for f in frames}
    assert rows == {2 * i for i in source.train}  # spread over every training clip, none held out
    assert source.clips_frames(4).shape == (4, 8, 32, 32, 3) and source.clips_frames(50).shape[0] == 10


def untrained_codecs(cfg, texts):
    """Text and video codecs good enough to make codes (an untrained frame tokenizer: roles only
    need ids), seeded so the delta streams' lengths do not vary between runs."""
    from nmm.modalities.codecs import Codecs
    from nmm.modalities.image import ImageTokenizer
    from nmm.modalities.text import TextTokenizer

    torch.manual_seed(0)
    return Codecs(TextTokenizer.train(texts * 5, vocab_size=300), VideoCodec(ImageTokenizer(cfg.image), cfg.video))


def test_roles_draw_both_directions_from_the_training_clips(videos):
    root, texts = videos
    cfg = folder_config(root, "video.layout=full")  # every clip the same length: none left out
    source = data_source(cfg)
    roles = source.roles(untrained_codecs(cfg, texts), cfg.data)
    assert set(roles) == {"video_captioning", "text_to_clip"}
    assert sorted(source.pool.texts) == sorted(texts[i] for i in source.train)
    rng = np.random.default_rng(0)
    read = roles["video_captioning"](rng)
    assert isinstance(read.segments[0], ItemSegment) and read.segments[0].modality == "video"
    assert isinstance(read.segments[1], TextSegment) and read.segments[1].text in source.pool.texts
    write = roles["text_to_clip"](rng)
    assert write.segments[-1].modality == "video" and write.segments[-1].loss


def test_clips_longer_than_the_model_may_write_are_left_out(videos):
    root, texts = videos
    cfg = folder_config(root, "video.max_tokens=10")  # less than one key frame: no delta stream fits
    source = data_source(cfg)
    with pytest.raises(InputError, match=r"none of the 9 training clips fits in 10 tokens \(raise video.max_tokens"):
        source.roles(untrained_codecs(cfg, texts), cfg.data)


def test_nmm_train_on_a_folder_of_videos(videos, tmp_path):
    """End to end: tokenizers, the frame tokenizer on the folder's frames (no world, no judge: PSNR),
    the video codec, and 2 language-model steps."""
    from nmm.train.trainer import train

    root, _ = videos
    out = tmp_path / "run"
    summary = train(folder_config(root, "train.max_steps=2", "image.steps=5"), out, show_progress=False,
                    log=lambda *a: None)
    assert summary["steps"] == 2
    for name in ("video_codec.json", "video_frames/image_tokenizer.json", "vocab.json", "config.yaml"):
        assert (out / name).exists(), name
    stats = json.loads((out / "tokenizer_stats.json").read_text())["video"]
    assert "psnr_db" in stats and stats["tokens_per_clip"]["full"] == 8 * stats["tokens_per_clip"]["image"]
    assert "loss_video" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_served_video_is_sampled_as_a_folders_training_clip(tmp_path):
    """`VideoCodec.from_bytes` (what the server and the pipeline read) and the folder source pick the
    same frames of the same file: a long MP4 is cut to the window, not spread over its length."""
    data = encode(moving_square(24), fps=8)  # 3 s at 8 fps; the window is 8 frames at 4 fps = 2 s
    (tmp_path / "long.mp4").write_bytes(data)
    write_lines(tmp_path, [entry("long.mp4", "a square moves right")])
    clips, _, _ = read_video_folder(tmp_path, frames=8, size=32, fps=4)
    cfg = load_config("video-tiny")
    served = VideoCodec(ImageTokenizer(cfg.image), cfg.video).from_bytes(data)
    np.testing.assert_array_equal(served, clips[0])
