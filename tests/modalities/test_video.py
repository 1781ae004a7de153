"""The video codec's layouts: what each keeps, how long it is, and its files."""

import numpy as np
import pytest
import torch

from nmm.config import ImageTokenizerConfig, VideoCodecConfig
from nmm.errors import ConfigError
from nmm.data.shapes import ShapesWorld
from nmm.modalities.image import train_image_tokenizer
from nmm.modalities.video import VideoCodec, tokens_per_clip

COLOURS = np.array([[255, 50, 50], [40, 220, 40], [40, 80, 255], [255, 230, 40]], dtype=np.uint8)


def moving_square_clips(n: int, frames: int = 8, seed: int = 0) -> np.ndarray:
    """(n, F, 32, 32, 3): one 8 px square per clip, sliding right 2 px per frame (few colours, like
    the shapes world, so a GIF keeps them exactly)."""
    rng = np.random.default_rng(seed)
    clips = np.zeros((n, frames, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        y, x0 = rng.integers(0, 24), rng.integers(0, 8)
        colour = COLOURS[rng.integers(len(COLOURS))]
        for f in range(frames):
            x = x0 + 2 * f
            clips[i, f, y : y + 8, x : x + 8] = colour
    return clips


@pytest.fixture(scope="module")
def frames():
    """A briefly trained frame tokenizer: the layouts do not care what codes mean, only that they vary."""
    tok, _ = train_image_tokenizer(ShapesWorld(), ImageTokenizerConfig(steps=30, batch_size=16, channels=16,
                                                                       pool_size=256, eval_images=16), seed=0)
    return tok.eval()


def codec(frames, **kw):
    return VideoCodec(frames, VideoCodecConfig(**kw))


def test_delta_is_lossless_and_shorter_than_full(frames):
    clips = moving_square_clips(6)
    full, delta = codec(frames, layout="full"), codec(frames, layout="delta", max_tokens=2000)
    per_frame = full.frame_codes(clips)  # (B, F, N)
    assert (per_frame[:, 1:] != per_frame[:, :-1]).any()  # the clips move: there are changes to code
    streams = delta.encode(clips)
    assert all(s.ndim == 1 for s in streams) and delta.spec.tokens_per_item is None
    assert full.encode(clips).shape == (6, 8 * 64) and full.spec.tokens_per_item == 512
    # the delta stream rebuilds exactly the per-frame codes, in fewer tokens
    rebuilt = torch.stack([delta._undelta(s) for s in streams])
    assert torch.equal(rebuilt, per_frame)
    assert all(len(s) < 512 for s in streams)
    np.testing.assert_array_equal(delta.decode(streams), full.decode(full.encode(clips)))


def test_a_still_clip_is_a_key_frame_and_marks(frames):
    still = np.repeat(moving_square_clips(1)[:, :1], 8, axis=1)
    (stream,) = codec(frames).encode(still)
    c = codec(frames)
    assert len(stream) == 64 + 7 and (stream[64:] == c.mark).all()


def test_stride_keeps_every_kth_frame_and_holds_it(frames):
    clips = moving_square_clips(3)
    s = codec(frames, layout="stride", stride=4)
    codes = s.encode(clips)
    assert codes.shape == (3, 2 * 64) and s.spec.factors == frames.code_factors  # factorised head still applies
    out = s.decode(codes)
    ref = codec(frames, layout="full").decode(codec(frames, layout="full").encode(clips))
    np.testing.assert_array_equal(out[:, 1], out[:, 0])  # held
    np.testing.assert_array_equal(out[:, 0], ref[:, 0])
    np.testing.assert_array_equal(out[:, 4], ref[:, 4])
    counts = tokens_per_clip(s, clips)
    assert counts["full"] == 512 and counts["stride_4"] == 128 and counts["image"] == 64
    assert 64 + 7 <= counts["delta_mean"] <= counts["delta_max"] < 512


def test_a_malformed_delta_stream_still_decodes(frames):
    c = codec(frames)
    C, N = c.C, c.N
    weird = torch.tensor([3] * 10 + [c.mark, C + 5, c.mark, 7, C + 6, 9, 11, c.mark] + [c.mark] * 20)
    out = c.decode([weird])
    assert out.shape == (1, 8, 32, 32, 3) and out.dtype == np.uint8
    frames_codes = c._undelta(weird)
    assert frames_codes.shape == (8, N)
    assert (frames_codes[0, 10:] == c.background).all()  # a short key frame is completed with empty patches
    assert frames_codes[2, 6] == 9 and frames_codes[2, 7] == 11  # the one well-formed run landed
    assert (frames_codes[2, :6] == frames_codes[1, :6]).all()  # the code before any position was skipped


def test_bad_clips_and_configs_are_named(frames):
    with pytest.raises(ValueError, match=r"\(B, 8, 32, 32, 3\) uint8"):
        codec(frames).encode(np.zeros((2, 5, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="video.layout"):
        VideoCodecConfig(layout="pyramid")
    with pytest.raises(ConfigError, match="video.stride"):
        codec(frames, layout="stride", stride=3)


def test_gif_round_trip_and_resampling(frames):
    c = codec(frames)
    clip = moving_square_clips(1)[0]
    data = c.to_bytes(clip)
    assert data[:6] in (b"GIF87a", b"GIF89a")
    np.testing.assert_array_equal(c.from_bytes(data), clip)
    # a 16-frame GIF at another size is resized and resampled to 8 frames
    big = np.repeat(np.repeat(np.repeat(moving_square_clips(1, frames=16)[0], 2, axis=1), 2, axis=2), 1, axis=0)
    assert c.from_bytes(c.to_bytes(big)).shape == (8, 32, 32, 3)
    with pytest.raises(ValueError, match="video|GIF|PyAV"):
        c.from_bytes(b"not a video at all")


def test_save_and_load(frames, tmp_path):
    c = codec(frames, layout="stride", stride=2, fps=8.0)
    c.save(tmp_path)
    loaded = VideoCodec.load(tmp_path)
    assert loaded.config == c.config and loaded.spec == c.spec
    clips = moving_square_clips(2)
    assert torch.equal(loaded.encode(clips), c.encode(clips))


def test_delta_codes_keep_the_frame_tokenizers_factors(frames):
    c = codec(frames)
    f0, f1 = frames.code_factors
    assert c.spec.factors == (f0 + 5, f1) and c.spec.codes == (f0 + 5) * f1  # 64 positions + mark: 5 rows of 16
    # a frame code's factors are the frame tokenizer's (shape, colour); positions and the mark come after
    code = 7 * f1 + 3
    assert divmod(code, f1) == (7, 3)
    assert divmod(c.C + 17, f1) == (f0 + 1, 1) and divmod(c.mark, f1) == (f0 + 4, 0)
    unused = torch.tensor([*range(64)] + [c.mark, c.C + 5, c.spec.codes - 1, 9])  # an unused code is skipped
    assert c._undelta(unused)[1, 5] == 9
