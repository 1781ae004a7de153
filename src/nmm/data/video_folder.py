"""Training data from a user's own videos: MP4 / WebM / GIF files plus a ``captions.jsonl`` index.

Layout::

    my_videos/
        captions.jsonl        one JSON object per line: {"file": "dogs/001.mp4", "caption": "a dog runs"}
        dogs/001.mp4          video paths are relative to the folder (absolute paths work too)

The keys are the audio folder's "file" (a video is not an image) and the image folder's "caption"
(the text says what is seen). Other keys on a line (say "id") are allowed and ignored.

Decoding is `nmm.modalities.video.read_frames`, the decoder `VideoCodec.from_bytes` uses: GIF /
APNG / animated WebP through PIL, anything else FFmpeg reads (MP4, WebM, MKV, MOV, ...) through
PyAV. This module only decides which frames to keep.

Sampling: the model sees `video.frames` frames, `video.fps` per second, i.e. a window of
frames / fps seconds (8 frames at 4 fps: the first 2 s). Frame k shows the clip at time k / fps:
the source frame on screen at that moment, by the container's presentation timestamps (or, where
FFmpeg cannot read them, PIL's per-frame durations). The clip is therefore **cut** to the window
when it is longer, and **padded by repeating its last frame** when it is shorter; either is
counted as a note in the summary, so a folder of 10 s clips shows "cut to the first 2 s" on every
item and the user knows to raise video.fps or video.frames. A file with no usable timestamps (or
timestamps that go backwards, e.g. joined streams) is sampled evenly over its whole length, as
`VideoCodec.from_bytes` does, with a note. Frames are resized (a plain resize, not a crop: cropping
could cut away what the caption describes) to `image.image_size`, with the same bilinear filter as
`VideoCodec.from_bytes`, so a clip given to a trained model is prepared as its training clips were.

Like a folder of recordings (`nmm.data.audio_folder`, whose conventions this follows) a folder of
videos is rarely clean. No single bad item stops the load: each is skipped with a reason naming
its file (or its line of captions.jsonl), the rest loads, and `VideoFolder.summary` says what
happened, e.g.

    loaded 97 of 100 items; skipped 3: 1 missing file (b.mp4), 2 unreadable (c.mp4, d.webm);
    notes: 97 cut to the first 2 s

Only when nothing loads is it an error (`InputError`, naming the folder and every reason). A clip
longer than `max_seconds` is refused from its header, before it is decoded: `read_frames` holds
every frame of a file at full resolution until the sampled ones are resized (a 10 s 1080p clip at
30 fps is about 1.9 GB), so the limit bounds memory as well as the mismatch between a long clip's
caption and the window the model sees. The sampled clips are kept in memory at the model's size
(8 frames of 32x32 are 24 KB a clip) and are read once, when the source is built, not every epoch.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from nmm.config import DataConfig, RunConfig
from nmm.data.audio_folder import (
    AudioFolder,
    Skipped,
    normalise_transcript,
    read_index,
    summarise,
)
from nmm.data.folder import CAPTIONS_FILE
from nmm.data.mixture import RoleSampler, TranscriptPool, speech_roles
from nmm.data.sources import register_source
from nmm.errors import ConfigError, InputError
from nmm.modalities.codecs import Codecs
from nmm.modalities.video import (
    fit_clip,
    frame_times,
    pil_durations,
    probe,
    read_frames,
    sample_indices,
    write_gif,
)

# A clip longer than this is skipped, unread; until `video.max_seconds` exists in the config.
DEFAULT_MAX_SECONDS = 10.0
# Kinds of skipped item, in the order the summary lists them.
REASONS = ("bad JSON", "bad field", "empty caption", "missing file", "too long", "no frames", "unreadable")
# The roles `moving_shapes` offers over clips and captions (nmm.data.video_source.ROLE_NAMES, an app
# module the core may not import): the same names, so a run's role weights carry over.
ROLE_NAMES = ("video_captioning", "text_to_clip")

log = logging.getLogger(__name__)


# ---- the index file ---------------------------------------------------------------------------
# ---- the folder -------------------------------------------------------------------------------
class VideoFolder:
    """(clip, caption) pairs from a folder with a ``captions.jsonl`` file; clips are
    (frames, size, size, 3) uint8, sampled at `fps` (see the module docstring).

    `len(folder)` items loaded out of `folder.listed` lines; `folder.skipped` lists the rest, and
    `folder.notes` counts how clips were fitted to the window ("cut to the first 2 s": 3)."""

    def __init__(self, root: str | Path, frames: int = 8, size: int = 32, fps: float = 4.0,
                 max_seconds: float = DEFAULT_MAX_SECONDS):
        if frames < 1 or size < 1 or fps <= 0:
            raise ValueError(f"need frames >= 1, size >= 1 and fps > 0, got {frames}, {size}, {fps}")
        self.root = Path(root)
        self.frames, self.size, self.fps, self.max_seconds = frames, size, fps, max_seconds
        if not self.root.is_dir():
            raise InputError(f"video folder not found: {self.root}")
        self.paths: list[Path] = []
        self._captions: list[str] = []
        self._clips: list[np.ndarray] = []
        self.skipped: list[Skipped] = []
        self.notes: Counter[str] = Counter()
        self.listed = 0

        example = '{"file": "clip.mp4", "caption": "what happens"}'
        for line_number, record in read_index(self.root / CAPTIONS_FILE, example, "videos", self._skip):
            self.listed += 1
            if record is not None:
                self._load(line_number, record)

        self.summary = summarise(len(self), self.listed, self.skipped, self.notes, REASONS)
        if not self._clips:
            # Nothing to train on: the one case that is an error, with every reason in it.
            details = "\n  ".join(s.message for s in self.skipped)
            raise InputError(f"no usable videos in video folder {self.root}: {self.summary}\n  {details}")
        if self.skipped:
            log.warning("video folder %s: %s", self.root, self.summary)
            for s in self.skipped:
                log.warning("  skipped: %s", s.message)
        else:
            log.info("video folder %s: %s", self.root, self.summary)

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """The i-th clip as (frames, size, size, 3) uint8, and its caption."""
        # A copy, so a caller editing the clip in place cannot corrupt the stored one.
        return self._clips[i].copy(), self._captions[i]

    def captions(self) -> list[str]:
        """All captions in file order, e.g. to train the text tokenizer."""
        return list(self._captions)

    def clips(self, indices=None) -> np.ndarray:
        """The clips at `indices` (default: all) as one (n, frames, size, size, 3) uint8 array (a copy)."""
        indices = range(len(self)) if indices is None else indices
        return np.stack([self._clips[i] for i in indices])

    # The same deterministic (train, heldout) split as the audio and image folders (it needs only len()).
    split = AudioFolder.split

    # ---- loading --------------------------------------------------------------------------------
    def _skip(self, reason: str, name: str, message: str) -> None:
        self.skipped.append(Skipped(reason, name, message))

    def _load(self, line_number: int, record: dict) -> None:
        where = f"{CAPTIONS_FILE}:{line_number}"
        file, caption = record.get("file"), record.get("caption")
        if not isinstance(file, str) or not file.strip():
            self._skip("bad field", f"line {line_number}", f'{where}: missing or empty "file" field')
            return
        if not isinstance(caption, str):
            problem = "missing" if caption is None else f"not a string ({type(caption).__name__})"
            self._skip("bad field", f"line {line_number}", f'{where}: {file}: "caption" field is {problem}')
            return
        caption = normalise_transcript(caption)
        if not caption:
            self._skip("empty caption", f"line {line_number}", f'{where}: {file}: empty "caption"')
            return
        path = self.root / file
        if not path.is_file():
            self._skip("missing file", file, f"{where}: video file not found: {path}")
            return
        found = probe(path)
        if found is not None and not found.has_video:
            self._skip("no frames", file, f"{where}: {file}: no video stream in it (audio only, or no frames)")
            return
        # The container gives the length: an hour-long recording is turned down without decoding it.
        if found is not None and self._too_long(found.seconds, file, where):
            return
        try:
            frames = read_frames(path.read_bytes())
        except (OSError, ValueError) as e:  # read_frames' message says what, not which file
            self._skip("unreadable", file, f"{where}: {file}: {e}")
            return
        if not frames:
            self._skip("no frames", file, f"{where}: {file}: the video has no frames")
            return
        seconds = found.seconds if found is not None else None
        if seconds is None and (durations := pil_durations(frames)) is not None:
            seconds = float(durations.sum())
        if self._too_long(seconds, file, where):
            return
        picks, note = sample_indices(frame_times(frames, found), len(frames), self.frames, self.fps, seconds)
        if len({f.size for f in frames}) > 1:
            self.notes["had frames of mixed sizes (each resized)"] += 1
        if note:
            self.notes[note] += 1
        self.paths.append(path)
        self._captions.append(caption)
        self._clips.append(fit_clip(frames, picks, self.size))

    def _too_long(self, seconds: float | None, file: str, where: str) -> bool:
        if seconds is None or seconds <= self.max_seconds:
            return False
        self._skip("too long", file, f"{where}: {file}: {seconds:.2f} s is longer than "
                                     f"video.max_seconds={self.max_seconds:g} (cut it, or raise the limit)")
        return True


def read_video_folder(folder: str | Path, frames: int, size: int, fps: float,
                      max_seconds: float = DEFAULT_MAX_SECONDS) -> tuple[np.ndarray, list[str], list[str]]:
    """(clips (n, frames, size, size, 3) uint8, their captions, a message for each skipped item)
    of a video folder: `VideoFolder` as plain values. An `InputError` when nothing loads."""
    loaded = VideoFolder(folder, frames=frames, size=size, fps=fps, max_seconds=max_seconds)
    return loaded.clips(), loaded.captions(), [s.message for s in loaded.skipped]


def write_example_video_folder(root: str | Path, clips: list[np.ndarray], captions: list[str],
                               fps: float = 4.0) -> Path:
    """Write `clips` ((F, H, W, 3) uint8 each) as GIFs under ``root/clips/`` with a matching
    ``captions.jsonl``: a folder `VideoFolder` reads back frame for frame at the same fps."""
    if len(clips) != len(captions):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (clip, caption) in enumerate(zip(clips, captions)):
        relative = f"clips/{i:05d}.gif"
        (root / relative).write_bytes(write_gif(clip, fps))
        lines.append(json.dumps({"file": relative, "caption": caption}))
    (root / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ---- the data source --------------------------------------------------------------------------
def encode_clips(codecs: Codecs, clips: np.ndarray, chunk: int = 256) -> tuple[list[np.ndarray], list[int]]:
    """Video ids of each clip the model can write (at most the codec's `max_tokens`), and the
    indices of those clips: a delta stream of a busy clip can be longer, and is left out."""
    limit = codecs.codec("video").max_tokens
    codes, kept = [], []
    for start in range(0, len(clips), chunk):
        for i, ids in enumerate(codecs.encode_items("video", clips[start : start + chunk])):
            if len(ids) <= limit:
                codes.append(np.asarray(ids))
                kept.append(start + i)
    return codes, kept


class VideoFolderSource:
    """`data.source=video_folder`: the videos and captions of `data.video_folder`; no world, so no
    judge (the frame tokenizer reports PSNR on its training frames instead). A tenth of the clips
    (at least one, from two on) is held out: the language model never sees them."""

    modalities = ("video",)
    world = None
    judge = None
    image_pool = None

    def __init__(self, cfg: RunConfig):
        root = getattr(cfg.data, "video_folder", None)  # getattr: until DataConfig has the field
        if not root:
            raise ConfigError("data.source=video_folder needs data.video_folder=PATH (a folder with captions.jsonl)")
        self.folder = VideoFolder(root, frames=cfg.video.frames, size=cfg.image.image_size, fps=cfg.video.fps,
                                  max_seconds=getattr(cfg.video, "max_seconds", DEFAULT_MAX_SECONDS))
        self.train, self.heldout = self.folder.split(heldout_fraction=0.1, seed=cfg.data.seed)
        self.frame_images = cfg.image.pool_size
        self.pool: TranscriptPool | None = None

    @property
    def summary(self) -> str:
        """What was loaded, skipped (and why) and fitted: `VideoFolder.summary`."""
        return self.folder.summary

    def texts(self) -> list[str]:
        return self.folder.captions()

    def images(self) -> np.ndarray:
        """Frames of the training clips for the frame tokenizer, (n, H, W, 3) uint8: at most
        image.pool_size of them, spread evenly over all the clips."""
        frames = self.folder.clips(self.train).reshape(-1, self.folder.size, self.folder.size, 3)
        if len(frames) > self.frame_images:
            frames = frames[np.linspace(0, len(frames) - 1, self.frame_images).round().astype(int)]
        return frames

    def clips_frames(self, n: int) -> np.ndarray:
        """(n, F, H, W, 3) uint8 clips of any split (at most all of them), for the codec's statistics."""
        return self.folder.clips(range(min(n, len(self.folder))))

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        # Every training clip: a user's videos are all the data there is.
        codes, kept = encode_clips(codecs, self.folder.clips(self.train))
        limit = codecs.codec("video").max_tokens
        if not kept:
            raise InputError(f"video folder {self.folder.root}: none of the {len(self.train)} training clips fits "
                             f"in {limit} tokens (raise video.max_tokens, or use video.layout=stride)")
        if len(kept) < len(self.train):
            log.warning("video folder %s: %d of %d training clips are longer than %d tokens and are left out",
                        self.folder.root, len(self.train) - len(kept), len(self.train), limit)
        captions = self.folder.captions()
        self.pool = TranscriptPool([captions[self.train[i]] for i in kept], codes, modality="video")
        return speech_roles(self.pool, cfg.caption_dropout, names=ROLE_NAMES)


register_source("video_folder", VideoFolderSource)
