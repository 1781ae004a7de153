"""`nmm data pack SRC OUT`: the shapes world or a folder of data into WebDataset shards, curated.

    nmm data pack shapes OUT --count 20000          scenes of the shapes world, rendered (PNG + caption)
    nmm data pack my_pictures OUT                   images + captions.jsonl  {"image": "a.png", "caption": "..."}
    nmm data pack my_speech OUT                     audio + transcripts.jsonl {"file": "a.wav", "text": "..."}
    nmm data pack my_videos OUT                     clips + captions.jsonl   {"file": "a.mp4", "caption": "..."}

The folders are the ones `data.source=folder`, `audio_folder` and `video_folder` read. Shards hold
the items raw, as files (`000123.png` + `000123.txt`, the layout `nmm.data.shards` reads, plus
`000123.json` naming the source file): the run's own codecs encode them while it trains, so one set
of shards serves any tokenizer. Files nmm's shard reader would not recognise are re-encoded (an
image as PNG, a recording as 16 kHz FLAC); the rest are copied byte for byte.

Every item passes the curation of `nmm.data.curation` (caption length, exact and near duplicates,
size, duration, unreadable files); OUT/report.json counts what was kept and what was dropped, by
reason with example keys, and lists the shards with their sample counts and the `data.shards`
pattern to train on. Problems with single items are drops in the report; problems with the input
as a whole (no such folder, no index file, nothing left to keep) are `InputError`s naming the file.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image

from nmm.config import RunConfig
from nmm.data.audio_folder import TRANSCRIPTS_FILE, normalise_transcript, read_index
from nmm.data.curation import CurationOptions, Curator
from nmm.data.folder import CAPTIONS_FILE
from nmm.data.shards import EXTENSIONS, TEXT
from nmm.data.sources import data_source
from nmm.errors import InputError
from nmm.modalities.audio import read_audio
from nmm.modalities.audio_features import SAMPLE_RATE
from nmm.modalities.video import pil_durations, probe, read_frames
from nmm.progress import TrainProgress
from nmm.utils import atomic_write_json

KINDS = ("image", "audio", "video")
REPORT = "report.json"
SHARD_NAME = "shard-%06d.tar"
# Pillow's format name -> the extension the shard reader knows; other formats are stored as PNG.
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
# Each kind of folder: its index file and the index's (file field, text field).
FOLDERS = {"image": (CAPTIONS_FILE, "image", "caption"), "audio": (TRANSCRIPTS_FILE, "file", "text"),
           "video": (CAPTIONS_FILE, "file", "caption")}


@dataclass
class Candidate:
    """One item on its way in: `key` is what the report calls it (the file as the index names it,
    "line N" for a bad line, scene_000123 for the world), `read()` gives its bytes."""

    key: str
    caption: str = ""
    read: Callable[[], bytes] | None = None
    suffix: str = ""  # the file's extension, lower case, no dot
    problem: tuple[str, str] | None = None  # (reason, detail) found while reading the index


# ---- what to pack ------------------------------------------------------------------------------
def detect_kind(root: Path) -> str:
    """image, audio or video, from the folder's index: transcripts.jsonl is audio; in captions.jsonl
    an "image" field is an image folder, a "file" field a video folder."""
    if (root / TRANSCRIPTS_FILE).is_file():
        return "audio"
    index = root / CAPTIONS_FILE
    if not index.is_file():
        raise InputError(f"nmm data pack: {root} has neither {CAPTIONS_FILE} (images or videos) nor "
                         f"{TRANSCRIPTS_FILE} (recordings)")
    for _, record in read_index(index, '{"image": "a.png", "caption": "..."}', "items", lambda *a: None):
        if record is not None and ("image" in record or "file" in record):
            return "image" if "image" in record else "video"
    raise InputError(f'{index}: no line has an "image" field (an image folder) or a "file" field (a video folder)')


def shapes_candidates(count: int, seed: int, image_size: int) -> tuple[int, Iterator[Candidate]]:
    """`count` rendered scenes of the shapes world's train split with their captions."""
    cfg = RunConfig()
    cfg.image.image_size = image_size
    try:
        world = data_source(cfg, "shapes").world  # found by name: the core does not import the world
    except ValueError as e:
        raise InputError(f"nmm data pack shapes: {e}") from None

    def items():
        for i, scene in enumerate(world.scenes(count, seed, "train")):
            image = world.render(scene)
            yield Candidate(f"scene_{i:06d}", world.caption(scene), lambda image=image: _png(image), "png")

    return count, items()


def folder_candidates(root: Path, kind: str) -> tuple[int, Iterator[Candidate]]:
    """The items a folder's index lists, with the problems of bad lines as `problem`."""
    index_name, file_field, text_field = FOLDERS[kind]
    index = root / index_name
    example = json.dumps({file_field: "a." + EXTENSIONS[kind][0], text_field: "..."})
    bad: list[tuple[str, str]] = []
    records = list(read_index(index, example, "items", lambda reason, name, message: bad.append((name, message)),
                              what=index_name.split(".")[0]))

    def items():
        for line, record in records:
            where = f"{index_name}:{line}"
            if record is None:
                yield Candidate(f"line {line}", problem=("bad_record", next((m for n, m in bad if n == f"line {line}"),
                                                                            f"{where}: not a JSON object")))
                continue
            file, text = record.get(file_field), record.get(text_field)
            if not isinstance(file, str) or not file.strip():
                yield Candidate(f"line {line}", problem=("bad_record", f'{where}: missing or empty "{file_field}" field'))
            elif not isinstance(text, str):
                yield Candidate(file, problem=("bad_record", f'{where}: "{text_field}" field is missing or not a string'))
            else:
                path = root / file
                yield Candidate(file, normalise_transcript(text), path.read_bytes, path.suffix.lower().lstrip("."))

    return len(records), items()


# ---- checking and preparing one item -----------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _image(data: bytes, curator: Curator) -> tuple[str, bytes, int | None]:
    """(extension, bytes to store, perceptual hash); raises ValueError (unreadable) or _Drop."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode every pixel: a truncated file fails here, not in training
            fmt = image.format
            problem = curator.size_problem(image)
            if problem:
                raise _Drop(*problem)
            near, h = curator.near_duplicate_of(image)
            if near:
                raise _Drop("near_duplicate", f"perceptual hash {near[1]} bits from {near[0]}")
            if fmt in IMAGE_FORMATS:
                return IMAGE_FORMATS[fmt], data, h
            return "png", _png(np.asarray(image.convert("RGB"))), h
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None


def _audio(data: bytes, suffix: str, key: str, curator: Curator) -> tuple[str, bytes, None]:
    wave, _ = read_audio(data, key)  # ValueError names the file
    problem = curator.duration_problem(len(wave) / SAMPLE_RATE)
    if problem:
        raise _Drop(*problem)
    if suffix in EXTENSIONS["audio"]:
        return suffix, data, None
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="FLAC")
    return "flac", buf.getvalue(), None


def _video(data: bytes, suffix: str, curator: Curator) -> tuple[str, bytes, None]:
    if suffix not in EXTENSIONS["video"]:
        raise ValueError(f"'.{suffix}' is not a video format the shard reader takes ({', '.join(EXTENSIONS['video'])})")
    frames = read_frames(data)  # ValueError if it does not decode
    if not frames:
        raise ValueError("the video has no frames")
    found = probe(data)
    seconds = found.seconds if found is not None else None
    if seconds is None and (durations := pil_durations(frames)) is not None:
        seconds = float(durations.sum())
    problem = curator.duration_problem(seconds)
    if problem and problem[0] == "too_long":  # a one-frame clip is short, and still a clip
        raise _Drop(*problem)
    return suffix, data, None


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _prepare(candidate: Candidate, kind: str, curator: Curator) -> tuple[str, bytes, int | None]:
    """Check one item; (extension, bytes, image hash) to write, or _Drop with the reason."""
    if candidate.problem:
        raise _Drop(*candidate.problem)
    problem = curator.caption_problem(candidate.caption)
    if problem:
        raise _Drop(*problem)
    try:
        data = candidate.read()
    except FileNotFoundError as e:
        raise _Drop("missing_file", f"no such file: {e.filename}") from None
    except OSError as e:
        raise _Drop("unreadable", f"cannot read the file ({e.strerror or e})") from None
    original = curator.duplicate_of(data)
    if original is not None:
        raise _Drop("exact_duplicate", f"the same bytes as {original}")
    try:
        if kind == "image":
            return _image(data, curator)
        if kind == "audio":
            return _audio(data, candidate.suffix, candidate.key, curator)
        return _video(data, candidate.suffix, curator)
    except (ValueError, OSError, EOFError) as e:
        raise _Drop("unreadable", str(e)) from None


# ---- the pack ----------------------------------------------------------------------------------
class _Shards:
    """webdataset's ShardWriter, opened at the first sample kept (so nothing kept writes no shard)."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.writer: wds.ShardWriter | None = None
        self.counts: dict[str, int] = {}

    def write(self, sample: dict) -> None:
        if self.writer is None:
            # mtime fixed: packing the same input twice gives the same bytes
            self.writer = wds.ShardWriter(str(self.out / SHARD_NAME), maxcount=self.shard_size, verbose=0, mtime=0.0)
        self.writer.write(sample)
        self.counts[Path(self.writer.fname).name] = self.writer.count

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pack(src: str | Path, out: str | Path, *, kind: str | None = None, shard_size: int = 1000, count: int = 1000,
         seed: int = 0, image_size: int = 32, options: CurationOptions | None = None,
         show_progress: bool = True) -> dict:
    """Pack SRC ("shapes", or a folder) into shards in OUT; returns the report (also OUT/report.json).
    `count`, `seed`, `image_size`: the shapes world's scenes. `options`: the curation's filters (by
    default, with the near-duplicate check off for the shapes world: see `nmm.data.curation`)."""
    t0 = time.time()
    out = Path(out)
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and (not out.is_dir() or any(out.glob("shard-*.tar")) or (out / REPORT).exists()):
        raise InputError(f"{out}: already holds shards or a {REPORT} (or is a file): pack into a new folder")
    if str(src) == "shapes":
        if count < 1:
            raise InputError(f"--count must be at least 1, got {count}")
        kind = "image"
        options = options or CurationOptions(near_dup_distance=-1)
        total, candidates = shapes_candidates(count, seed, image_size)
    else:
        root = Path(src)
        if not root.is_dir():
            raise InputError(f"nmm data pack: {root}: no such folder (SRC is 'shapes' or a folder with "
                             f"{CAPTIONS_FILE} or {TRANSCRIPTS_FILE})")
        kind = kind or detect_kind(root)
        if kind not in KINDS:
            raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
        options = options or CurationOptions()
        total, candidates = folder_candidates(root, kind)
    if not -1 <= options.near_dup_distance <= 32:
        raise InputError(f"--near-dup-distance must be -1 (off) or 0..32 bits, got {options.near_dup_distance}")

    out.mkdir(parents=True, exist_ok=True)
    curator, shards = Curator(options), _Shards(out, shard_size)
    bar = TrainProgress(total, 0, enabled=show_progress, description="pack")
    try:
        for i, candidate in enumerate(candidates):
            try:
                ext, data, image_hash = _prepare(candidate, kind, curator)
            except _Drop as drop:
                curator.ledger.drop(drop.reason, candidate.key, drop.detail)
            else:
                shards.write({"__key__": f"{curator.ledger.kept:08d}", ext: data, TEXT: candidate.caption,
                              "json": json.dumps({"source": candidate.key})})
                curator.kept(candidate.key, data, image_hash)
            bar.update(i + 1, None)
    finally:
        bar.close()
        shards.close()
    report = _report(src, kind, out, shard_size, count, seed, image_size, options, curator, shards, time.time() - t0)
    atomic_write_json(out / REPORT, report)
    if not curator.ledger.kept:
        reasons = ", ".join(f"{v['count']} {r}" for r, v in report["dropped_by_reason"].items())
        raise InputError(f"nmm data pack {src}: kept nothing of {curator.ledger.seen} items ({reasons}); "
                         f"see {out / REPORT}")
    return report


def _report(src, kind: str, out: Path, shard_size: int, count: int, seed: int, image_size: int,
            options: CurationOptions, curator: Curator, shards: _Shards, seconds: float) -> dict:
    n = len(shards.counts)
    pattern = str(out.resolve() / f"shard-{{{0:06d}..{n - 1:06d}}}.tar") if n else None
    settings = {"shard_size": shard_size, **options.to_dict()}
    if str(src) == "shapes":
        settings.update(count=count, seed=seed, image_size=image_size)
    return {
        "source": str(src), "kind": kind, "out": str(out.resolve()), "options": settings,
        **curator.ledger.to_dict(),
        "shards": [{"file": name, "samples": c} for name, c in shards.counts.items()],
        "pattern": pattern,
        "train_with": f"data.source=shards 'data.shards={{\"{pattern}\": 1.0}}'" if pattern else None,
        "seconds": round(seconds, 2),
    }
