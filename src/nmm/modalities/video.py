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
Every layout keeps the frame tokenizer's factorised codes (shape x colour: the model's factorised
head applies); delta's positions and mark continue the first factor's range (`VideoCodec.factors`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from dataclasses import dataclass
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
            return ModalitySpec("video", "<bov>", "<eov>", self.codes, self.factors, (), None, "image/gif", (1, g, g))
        kept = c.frames // (c.stride if c.layout == "stride" else 1)
        return ModalitySpec("video", "<bov>", "<eov>", self.C, f.code_factors, f.code_levels, kept * self.N,
                            "image/gif", (kept, g, g))

    @property
    def factors(self) -> tuple[int, ...]:
        """Delta codes keep the frame tokenizer's factorisation (shape x colour): frame code c is
        (c // F1, c % F1), and positions and the mark continue the first factor's range (C + p =
        (F0 + p // F1, p % F1)), so the model's factorised head still predicts shape and colour apart.
        The code count is rounded up to whole rows of F1 (a few unused codes after the mark). Only
        when N is a multiple of F1 (else: one unfactorised range)."""
        f = self.frame_codec.code_factors
        if len(f) != 2 or self.N % f[1]:
            return ()
        return (f[0] + -(-(self.N + 1) // f[1]), f[1])

    @property
    def codes(self) -> int:
        """Delta: frame codes, N patch positions, the frame mark (and the unused rest of the last row)."""
        return math.prod(self.factors) if self.factors else self.C + self.N + 1

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
        for prev, cur in itertools.pairwise(codes):
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
        """An animated GIF (PIL) or MP4 / WebM (PyAV) -> (F, S, S, 3) uint8: `video.frames` frames at
        `video.fps` from the start, resized to the frame tokenizer's size: sampled as a video folder's
        training clips are (`read_clip`)."""
        return read_clip(data, self.config.frames, self.size, self.config.fps)[0]

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


# ---- sampling a video file's frames (the folder source and `from_bytes` alike) -------------------
_TOLERANCE = 1e-3  # seconds: timestamps closer than a millisecond to a sampling instant count as on it


@dataclass(frozen=True)
class Probe:
    """What a video file's container says without decoding it (PyAV): whether it holds a video
    stream, its length in seconds (None if unknown) and its frames' presentation times, sorted and
    starting at 0 (None if they are missing or not strictly increasing)."""

    has_video: bool
    seconds: float | None
    times: np.ndarray | None


def probe(source: str | os.PathLike | bytes) -> Probe | None:
    """The container's view of a file or its bytes (demuxed, not decoded: cheap even for a long file),
    or None where PyAV is missing or cannot open it (GIF, APNG, animated WebP: PIL reads those)."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                return Probe(False, None, None)
            stream = container.streams.video[0]
            seconds = container.duration / av.time_base if container.duration else None
            time_base = float(stream.time_base)
            try:
                # The last packet of some formats is a flush marker without a time.
                pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
            except (av.error.FFmpegError, ValueError):
                return Probe(True, seconds, None)  # the decoder will say what is wrong
    except (av.error.FFmpegError, ValueError, OSError):
        return None
    times = (np.array(pts, dtype=np.float64) - (pts[0] if pts else 0)) * time_base
    if len(times) > 1 and not (np.diff(times) > 0).all():
        times = None  # repeated or backward times (joined streams, broken muxers): not a time line
    return Probe(True, seconds, times)


def frame_times(frames: list[Image.Image], found: Probe | None) -> np.ndarray | None:
    """Each decoded frame's presentation time in seconds from the first, or None if unknown: the
    container's times where there is one per frame, else PIL's per-frame durations (GIF, APNG)."""
    if found is not None and found.times is not None and len(found.times) == len(frames):
        return found.times
    durations = pil_durations(frames)
    return None if durations is None else np.concatenate([[0.0], np.cumsum(durations[:-1])])


def pil_durations(frames: list[Image.Image]) -> np.ndarray | None:
    """Each frame's display time in seconds as PIL read it (GIF, APNG, WebP), or None unless every
    frame has a positive one."""
    durations = [f.info.get("duration") for f in frames]
    if durations and all(isinstance(d, (int, float)) and d > 0 for d in durations):
        return np.array(durations, dtype=np.float64) / 1000.0
    return None


def sample_indices(times: np.ndarray | None, n_source: int, frames: int, fps: float,
                   seconds: float | None = None) -> tuple[np.ndarray, str | None]:
    """Which of `n_source` decoded frames make the `frames`-frame clip, and a note on how it was
    fitted ("cut to the first 2 s", "padded to 2 s with its last frame"; None: it fills the window).

    Frame k is the source frame on screen at time k / fps (the last one starting at or before it);
    past the clip's end that is its last frame, i.e. a short clip is padded by repeating it ("padded"
    only then: a 1.9 s clip covers every instant of a 2 s window at 4 fps, the last being 1.75 s).
    `seconds` is the clip's length where known (else: its last frame's time plus a frame interval)."""
    if times is None:
        return np.linspace(0, n_source - 1, frames).round().astype(int), "sampled evenly (no usable timestamps)"
    targets = np.arange(frames) / fps
    picks = np.searchsorted(times, targets + _TOLERANCE, side="right") - 1
    picks = np.clip(picks, 0, n_source - 1)
    window = frames / fps
    if seconds is None:
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / fps
        seconds = float(times[-1]) + step
    if seconds > window + _TOLERANCE:
        return picks, f"cut to the first {window:g} s"
    if targets[-1] >= seconds - _TOLERANCE:  # an instant after the clip ended: its last frame again
        return picks, f"padded to {window:g} s with its last frame"
    return picks, None


def fit_clip(frames: list[Image.Image], picks: np.ndarray, size: int) -> np.ndarray:
    """The picked frames as (len(picks), size, size, 3) uint8, by `VideoCodec.from_bytes`'s resize."""
    return np.stack([np.asarray(frames[i].convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
                     for i in picks])


def read_clip(data: bytes, frames: int, size: int, fps: float) -> tuple[np.ndarray, str | None]:
    """A video file's bytes -> (frames, size, size, 3) uint8 sampled at `fps` from its start (cut or padded
    to the window, see `sample_indices`), and the note on how it was fitted."""
    decoded = read_frames(data)
    if not decoded:
        raise ValueError("the video has no frames")
    found = probe(data)
    seconds = found.seconds if found is not None else None
    if seconds is None and (durations := pil_durations(decoded)) is not None:
        seconds = float(durations.sum())
    picks, note = sample_indices(frame_times(decoded, found), len(decoded), frames, fps, seconds)
    return fit_clip(decoded, picks, size), note


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
