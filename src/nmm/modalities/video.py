"""Video: clips through the image tokenizer frame by frame, plus temporal compression.

A clip is F frames (F, H, W, 3) uint8. Each frame goes through the run's frame tokenizer (an
`ImageTokenizer`, N codes per frame); `video.layout` chooses how the frames' codes become one item
of the token stream, between `<bov>` and `<eov>`:

  full    every frame's N codes, frame-major: F * N tokens (lossless w.r.t. the frame tokenizer)
  stride  every k-th frame's codes (`video.stride`): F / k * N tokens; decoding holds each kept
          frame for k frames (temporal pooling in its simplest form: fast motion is lost)
  delta   the first frame's N codes (the key frame), then for every later frame a frame mark and,
          for each run of changed patches (raster order), the run's first position and its new
          codes (MPEG's key frames and changed blocks): lossless, and as short as the clip is
          still; variable length, ended by a sampled `<eov>` (capped at `video.max_tokens`)

Delta codes share one range: [0, C) frame codes, [C, C + N) patch positions, C + N the frame mark.
`stride` and `full` keep the frame tokenizer's factorised codes (the model's factorised head
applies); `delta` mixes three kinds of token, so its codes are not factorised.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from nmm.config import VideoCodecConfig
from nmm.errors import CheckpointError, ConfigError
from nmm.modalities.base import ModalitySpec, register_modality
from nmm.modalities.image import ImageTokenizer, train_image_tokenizer
from nmm.utils import atomic_write_text

CONFIG_FILE = "video_codec.json"
FRAMES_DIR = "video_frames"  # the frame tokenizer, saved as an image tokenizer


class VideoCodec:
    """(B, F, H, W, 3) uint8 clips <-> codes, by a frame tokenizer and a temporal layout."""

    def __init__(self, frames: ImageTokenizer, config: VideoCodecConfig | None = None):
        self.frame_codec, self.config = frames, config or VideoCodecConfig()
        c = self.config
        if c.layout == "stride" and c.frames % c.stride:
            raise ConfigError(f"video.frames={c.frames} is not a multiple of video.stride={c.stride}")
        self.N, self.C = frames.tokens_per_image, frames.codebook_size
        self.size = frames.config.image_size
        self.mark = self.C + self.N  # delta: the frame mark
        self._background = None  # delta: the code of an empty patch, for a stream cut short

    def eval(self) -> VideoCodec:  # like the other codecs (nn.Modules): inference mode for the frame tokenizer
        self.frame_codec.eval()
        return self

    # ---- the vocabulary's view ----------------------------------------------------------------
    @property
    def spec(self) -> ModalitySpec:
        c, f = self.config, self.frame_codec
        g = f.grid
        if c.layout == "delta":  # the key frame has a grid; the changes after it keep 1D positions
            return ModalitySpec("video", "<bov>", "<eov>", self.C + self.N + 1, (), (), None, "image/gif", (1, g, g))
        kept = c.frames // (c.stride if c.layout == "stride" else 1)
        return ModalitySpec("video", "<bov>", "<eov>", self.C, f.code_factors, f.code_levels, kept * self.N,
                            "image/gif", (kept, g, g))

    @property
    def max_tokens(self) -> int:
        """The longest item: a delta stream where every patch of every frame changes, capped by config."""
        full = self.N + (self.config.frames - 1) * (1 + 2 * self.N)
        return min(full, self.config.max_tokens) if self.config.layout == "delta" else self.spec.tokens_per_item

    # ---- encode / decode ----------------------------------------------------------------------
    def _check(self, clips) -> np.ndarray:
        F, S = self.config.frames, self.size
        clips = np.asarray(clips)
        if clips.ndim != 5 or clips.shape[1:] != (F, S, S, 3) or clips.dtype != np.uint8:
            raise ValueError(f"expected clips of shape (B, {F}, {S}, {S}, 3) uint8 (video.frames={F}), "
                             f"got {clips.dtype} {clips.shape}")
        return clips

    def frame_codes(self, clips) -> torch.Tensor:
        """(B, F, H, W, 3) uint8 -> (B, F, N) frame codes."""
        clips = self._check(clips)
        B, F = clips.shape[:2]
        return self.frame_codec.encode(clips.reshape(B * F, *clips.shape[2:])).view(B, F, self.N)

    def encode(self, clips) -> torch.Tensor | list[torch.Tensor]:
        """Clips -> (B, tokens) codes (full, stride), or B 1-D code tensors (delta)."""
        codes = self.frame_codes(clips)  # (B, F, N)
        layout = self.config.layout
        if layout == "full":
            return codes.flatten(1)
        if layout == "stride":
            return codes[:, :: self.config.stride].flatten(1)
        return [self._delta(clip) for clip in codes]

    def _delta(self, codes: torch.Tensor) -> torch.Tensor:
        """(F, N) -> key frame, then per later frame: mark, and for each run of changed patches (raster
        order) its first position and the run's new codes."""
        out = [codes[0]]
        for prev, cur in zip(codes[:-1], codes[1:]):
            out.append(torch.tensor([self.mark]))
            changed = (cur != prev).nonzero().squeeze(1).tolist()
            for i, p in enumerate(changed):
                if i == 0 or p != changed[i - 1] + 1:  # a run starts: say where
                    out.append(torch.tensor([self.C + p]))
                out.append(cur[p : p + 1])
        return torch.cat(out)  # may exceed video.max_tokens (an input may be long; training data is capped)

    def decode(self, codes) -> np.ndarray:
        """Codes ((B, tokens), or a list of 1-D delta streams) -> (B, F, H, W, 3) uint8 clips. A
        delta stream is read forgivingly (a model writes it): a short key frame is completed with
        empty patches, a position without a code is dropped, missing frames repeat the last one."""
        F, N = self.config.frames, self.N
        if self.config.layout == "delta":
            frames = torch.stack([self._undelta(torch.as_tensor(np.asarray(c)).long().flatten()) for c in codes])
        else:
            codes = torch.as_tensor(np.asarray(codes)).long()
            if codes.ndim != 2 or codes.shape[1] != self.spec.tokens_per_item:
                raise ValueError(f"expected video codes of shape (B, {self.spec.tokens_per_item}), got {tuple(codes.shape)}")
            frames = codes.view(len(codes), -1, N)
            if self.config.layout == "stride":
                frames = frames.repeat_interleave(self.config.stride, dim=1)
        B = frames.shape[0]
        pixels = self.frame_codec.decode(frames.reshape(B * F, N).clamp(0, self.C - 1))
        return pixels.reshape(B, F, *pixels.shape[1:])

    def _undelta(self, stream: torch.Tensor) -> torch.Tensor:
        """One delta stream -> (F, N) frame codes, one pass: key-frame codes until the first mark
        (at most N, completed with empty patches), then per mark a copy of the last frame that runs
        (a position, then codes for it and the patches after it) edit. Tokens out of place are skipped."""
        N, C = self.N, self.C
        key, frames, pos = [], [], None
        for tok in stream.tolist():
            if tok == self.mark:
                if not frames:
                    frames.append(torch.tensor((key + [self.background] * N)[:N]))
                frames.append(frames[-1].clone())
                pos = None
            elif not frames:
                if tok < C and len(key) < N:
                    key.append(tok)
            elif C <= tok < C + N:
                pos = tok - C
            elif tok < C and pos is not None and pos < N and len(frames) > 1:
                frames[-1][pos] = tok  # a run's codes fill consecutive patches
                pos += 1
        if not frames:  # no mark at all: a key frame only
            frames.append(torch.tensor((key + [self.background] * N)[:N]))
        frames = frames[: self.config.frames]
        frames += [frames[-1]] * (self.config.frames - len(frames))
        return torch.stack(frames)

    @property
    def background(self) -> int:
        if self._background is None:  # the most common code of an empty frame
            empty = np.zeros((1, self.size, self.size, 3), dtype=np.uint8)
            self._background = int(self.frame_codec.encode(empty).flatten().mode().values)
        return self._background

    # ---- files --------------------------------------------------------------------------------
    def to_bytes(self, clip: np.ndarray) -> bytes:
        """One (F, H, W, 3) uint8 clip -> an animated GIF, looping, at `video.fps`."""
        return write_gif(clip, self.config.fps)

    def from_bytes(self, data: bytes) -> np.ndarray:
        """An animated GIF (PIL) or MP4 / WebM (PyAV) -> (F, S, S, 3) uint8: frames resized to the
        frame tokenizer's size and resampled to `video.frames` evenly over the clip."""
        frames = read_frames(data)
        if not frames:
            raise ValueError("the video has no frames")
        S, F = self.size, self.config.frames
        pick = np.linspace(0, len(frames) - 1, F).round().astype(int)
        out = [np.asarray(frames[i].convert("RGB").resize((S, S), Image.BILINEAR), dtype=np.uint8) for i in pick]
        return np.stack(out)

    # ---- persistence --------------------------------------------------------------------------
    def save(self, run_dir: str | os.PathLike) -> None:
        path = Path(run_dir)
        self.frame_codec.save(path / FRAMES_DIR)
        atomic_write_text(path / CONFIG_FILE, json.dumps({"config": self.config.__dict__}, indent=2))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> VideoCodec:
        path = Path(run_dir)
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"video codec file missing: {path / CONFIG_FILE}")
        try:
            config = VideoCodecConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())["config"])
        except (ValueError, TypeError, KeyError, ConfigError) as e:
            raise CheckpointError(f"corrupt video codec config {path / CONFIG_FILE}: {e}") from e
        return cls(ImageTokenizer.load(path / FRAMES_DIR), config)


def write_gif(clip: np.ndarray, fps: float = 4.0) -> bytes:
    """(F, H, W, 3) uint8 frames -> an animated GIF, looping, at `fps` frames per second."""
    frames = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in clip]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 / fps), disposal=1)
    return buf.getvalue()


def read_frames(data: bytes) -> list[Image.Image]:
    """A video file's frames: GIF / APNG / WebP through PIL, anything else through PyAV."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return [frame.copy() for frame in ImageSequence.Iterator(im)]
    except (OSError, ValueError):
        pass
    try:
        import av
    except ImportError:
        raise ValueError("not a GIF; reading MP4 / WebM needs PyAV: pip install av") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise ValueError(f"not a readable video ({e.__class__.__name__}: {e})") from None


def tokens_per_clip(codec: VideoCodec, clips: np.ndarray) -> dict:
    """Tokens per clip of every layout for these clips (the codes are computed once)."""
    codes = codec.frame_codes(clips)  # (B, F, N)
    F, N = codes.shape[1:]
    delta = torch.tensor([float(len(codec._delta(clip))) for clip in codes])
    return {"full": F * N, f"stride_{codec.config.stride}": F // codec.config.stride * N,
            "delta_mean": float(delta.mean()), "delta_max": int(delta.max()), "image": N}


def train_for_run(cfg, source, progress=None) -> tuple[VideoCodec, dict]:
    """The registry's trainer: the frame tokenizer on the source's frames (`source.images()`), judged
    by its frame judge, then the layout's token counts on the source's clips (`source.clips_frames()`)."""
    frames, stats = train_image_tokenizer(source.world, cfg.image, seed=cfg.data.seed, progress=progress,
                                          images=source.images(), judge=source.judge)
    codec = VideoCodec(frames, cfg.video)
    sample = source.clips_frames(cfg.video.eval_clips)
    stats["tokens_per_clip"] = tokens_per_clip(codec, sample)
    if getattr(source, "score_reconstructions", None) is not None:
        stats["reconstruction"] = source.score_reconstructions(codec)
    return codec, stats


register_modality("video", VideoCodec, train=train_for_run)
