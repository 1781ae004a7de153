"""`data.source=shards`: training data streamed from WebDataset tar shards, resumable at the exact sample.

A pool in memory (`data.source=folder`, the worlds) stops at what fits in RAM; real training data
is read as it is trained on. WebDataset's format is the common one for that: a shard is a plain
tar file, and a sample is the files in it that share a key,

    000123.png  000123.txt          an image and its caption             (roles captioning, generation)
    000124.flac 000124.txt          a recording and its transcript       (transcription, synthesis)
    000125.mp4  000125.txt          a clip and its caption               (video_captioning, text_to_clip)
    000126.txt                      text alone                           (text)

`nmm data pack` writes such shards (`nmm.data.pack`). A run names shard sets with their mixture
weights, `data.shards={"/data/photos/shard-{000000..000099}.tar": 0.7, "https://host/speech-{0..9}.tar": 0.3}`:
brace patterns, local paths and any URL the `webdataset` library opens (http(s), pipe:, ...).

**The stream.** Each rank reads `max(1, data.num_workers)` *lanes*, one per loader worker; lane
`l` of rank `r` is stream `r * lanes + l` of `world_size * lanes`. In epoch `e` a shard set's shards
are shuffled with the seed (train.seed, set, e) and stream `p` reads every `P`-th of them from
`p`, so the (rank, worker) pairs read disjoint shards; with fewer shards than `P` that is a
`ConfigError` naming the counts (a split by sample would have every worker read every shard).
Within a shard, chunks of `CHUNK` samples are decoded, encoded by the run's codecs in one batch,
and shuffled. A lane draws each document with an rng seeded by (seed, rank, lane, document
number): which shard set (by weight), then a role among the roles that apply to the sample (by
`data.roles`), then the role's document (`nmm.data.mixture`'s builders, so a shard sample
becomes exactly the document a pool would give). Documents are packed by `pack_rows`, the packer
`PackedBatches` uses; a document that does not fit the rest of a row is not dropped but held back
(at most `MAX_PENDING`) and placed in the first row it fits. Batch `k` of the rank comes from lane
`k % lanes`.

**Resume.** A lane's position is small: its document counter, per shard set (epoch, shard,
sample), and the token ids of the documents it holds back. `StreamingBatches.state_dict()` holds each lane's position after the last batch *returned*
(a worker sends its position with each batch, so batches prefetched but not yet taken do not
count); `load_state_dict` restarts every lane there, re-reading the shard up to the sample (chunks
are aligned to the shard's start, so they are decoded, encoded and shuffled as before). The batches
after a resume are the ones an uninterrupted run would have had, bit for bit, for the same
world size and `data.num_workers` (the state records both and refuses others).

**The background loader.** With `data.num_workers > 0` the lanes run in torch `DataLoader`
worker processes (an `IterableDataset`, `prefetch_factor=data.prefetch`), so the next batches are
decoded, encoded and packed while the model trains on this one.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps

from nmm.config import DataConfig, RunConfig
from nmm.data.audio_folder import normalise_transcript
from nmm.data.mixture import (
    KNOWN_ROLES,
    Batch,
    ImagePool,
    RoleSampler,
    TranscriptPool,
    image_roles,
    pack_rows,
    speech_roles,
    text_role,
)
from nmm.errors import ConfigError, InputError
from nmm.modalities.audio import read_audio
from nmm.modalities.codecs import Codecs
from nmm.modalities.document import Document
from nmm.modalities.video import read_clip

# The item of a sample, by file extension (the first found wins; a sample holds one item). The same
# formats the folder sources read: Pillow's images, libsndfile's audio, GIF and what FFmpeg decodes.
EXTENSIONS = {
    "image": ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"),
    "audio": ("flac", "wav", "ogg", "mp3"),
    "video": ("mp4", "webm", "gif", "mkv", "mov", "avi"),
}
TEXT = "txt"  # the caption, transcript or text of a sample (UTF-8)
# The roles a sample of each kind can become (`nmm.data.mixture`); data.roles weighs them.
KIND_ROLES = {"image": ("captioning", "generation"), "audio": ("transcription", "synthesis"),
              "video": ("video_captioning", "text_to_clip"), "text": ("text",)}
VIDEO_ROLE_NAMES = ("video_captioning", "text_to_clip")  # as nmm.data.video_folder.ROLE_NAMES
CHUNK = 128  # samples decoded, encoded and shuffled together (aligned to the shard's start)
TEXT_SAMPLES = 4000  # samples per shard set whose text trains the text tokenizer
PEEK = 32  # samples of a set's first shard searched for its kind
MAX_PENDING = 8  # documents a lane holds back for a row they fit (pack_rows' misses of one row)
STATE_VERSION = 1

log = logging.getLogger(__name__)


# ---- shards and samples ------------------------------------------------------------------------
def expand_shards(pattern: str) -> list[str]:
    """The shards a pattern names (`shard-{000000..000009}.tar` -> ten), each checked to exist when
    it is a local path."""
    urls = wds.shardlists.expand_urls(pattern)
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(_local_path(u)).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(f"data.shards: {len(missing)} of the {len(urls)} shards of {pattern!r} do not exist: "
                         f"{', '.join(missing[:3])}{more}")
    return urls


def _is_local(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # "C:\..." parses as scheme "c"


def _local_path(url: str) -> str:
    return urllib.parse.urlparse(url).path if url.startswith("file:") else url


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one shard in file order: {"__key__", "__url__", extension: bytes, ...}. The
    file (or pipe) is closed when the samples end or the iterator is dropped."""
    try:
        stream = wds.gopen(url, "rb")  # local paths, file:, http(s):, pipe:, ... (webdataset.gopen)
    except (OSError, ValueError) as e:
        raise InputError(f"shard {url}: cannot open it ({e})") from e
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)
    except (OSError, tarfile.TarError, ValueError, EOFError) as e:
        raise InputError(f"shard {url}: cannot read it as a tar file ({e})") from e
    finally:
        stream.close()


def sample_kind(sample: dict) -> tuple[str, str] | None:
    """(kind, extension) of a sample's item: image / audio / video, or ("text", "txt") for text
    alone; None when it holds nothing nmm reads."""
    for kind, extensions in EXTENSIONS.items():
        for ext in extensions:
            if ext in sample:
                return kind, ext
    return ("text", TEXT) if TEXT in sample else None


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8, prepared as `nmm.data.folder.load_image` prepares
    files (EXIF rotation applied, a plain resize; an exact multiple by box filter, else Lanczos)."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        if image.size != (size, size):
            exact = image.size[0] % size == 0 and image.size[1] % size == 0
            image = image.resize((size, size), Image.Resampling.BOX if exact else Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8)


@dataclass
class Item:
    """One usable sample, decoded: `value` is an image (H, W, 3) uint8, a wave (S,) float32, a clip
    (F, H, W, 3) uint8, or None for text; `codes` its vocabulary ids once encoded."""

    kind: str
    text: str
    key: str
    value: Any = None
    codes: np.ndarray | None = None


class Decoder:
    """A sample's bytes -> an `Item` at the run's settings (image size, clip frames and fps, the
    longest audio the codec takes), or None with the reason it cannot be used."""

    def __init__(self, cfg: RunConfig):
        self.size, self.frames, self.fps = cfg.image.image_size, cfg.video.frames, cfg.video.fps
        self.max_samples = int(cfg.audio.max_seconds * cfg.audio.sample_rate)

    def __call__(self, sample: dict, decode: bool = True) -> tuple[Item | None, str]:
        found = sample_kind(sample)
        if found is None:
            return None, "no item"
        kind, ext = found
        try:
            text = normalise_transcript(sample[TEXT].decode("utf-8")) if TEXT in sample else ""
        except UnicodeDecodeError:
            return None, "text not UTF-8"
        if not text:
            return None, "no text"
        item = Item(kind, text, sample.get("__key__", "?"))
        if not decode or kind == "text":
            return item, ""
        try:
            if kind == "image":
                item.value = decode_image(sample[ext], self.size)
            elif kind == "audio":
                item.value, _ = read_audio(bytes(sample[ext]), item.key)
                if len(item.value) > self.max_samples:
                    return None, "audio too long"
            else:
                item.value, _ = read_clip(bytes(sample[ext]), self.frames, self.size, self.fps)
        except (OSError, ValueError, Image.DecompressionBombError, EOFError):
            return None, f"unreadable {kind}"
        return item, ""


def encode_items(codecs: Codecs, items: list[Item | None], skipped: Counter) -> list[Item | None]:
    """Vocabulary ids for every item (one codec batch per modality); an item whose modality the run
    has no codec for, or a clip longer than the video codec writes, becomes None (counted in `skipped`)."""
    out = list(items)
    for kind in ("image", "audio", "video"):
        at = [i for i, item in enumerate(items) if item is not None and item.kind == kind]
        if not at:
            continue
        if kind not in codecs.modalities:
            skipped[f"no {kind} codec"] += len(at)
            for i in at:
                out[i] = None
            continue
        values = [items[i].value for i in at]
        codes = codecs.encode_items(kind, values if kind == "audio" else np.stack(values))
        limit = codecs.codec("video").max_tokens if kind == "video" else None
        for i, ids in zip(at, codes):
            if limit is not None and len(ids) > limit:
                skipped["clip too long"] += 1
                out[i] = None
            else:
                items[i].codes, items[i].value = np.asarray(ids), None  # the pixels are not needed any more
    return out


@dataclass
class ShardSet:
    """One entry of `data.shards`: its pattern, weight, shards, and the kind of its first sample."""

    pattern: str
    weight: float
    urls: list[str]
    kind: str

    @classmethod
    def open(cls, pattern: str, weight: float) -> ShardSet:
        if not weight > 0:
            raise ConfigError(f"data.shards: the weight of {pattern!r} must be > 0, got {weight}")
        urls = expand_shards(pattern)
        if not urls:
            raise ConfigError(f"data.shards: {pattern!r} names no shards")
        for sample in itertools.islice(read_shard(urls[0]), PEEK):
            found = sample_kind(sample)
            if found is not None:
                return cls(pattern, float(weight), urls, found[0])
        raise InputError(f"{urls[0]} (data.shards {pattern!r}): none of its first {PEEK} samples holds an item nmm "
                         f"reads ({', '.join(e for exts in EXTENSIONS.values() for e in exts)} or {TEXT})")


# ---- one stream's cursor through one shard set -------------------------------------------------
class SetReader:
    """Stream `stream` of `n_streams` through one shard set, epoch after epoch, handing out usable
    items one at a time. Its position is [epoch, shard, sample]: the next sample to hand out is
    sample `sample` (in the shard's chunk-shuffled order) of shard `shard` of this stream's shards
    in epoch `epoch`."""

    def __init__(self, shard_set: ShardSet, set_index: int, stream: int, n_streams: int, seed: int,
                 prepare: Callable[[list[dict]], list[Item | None]], position: list[int] | None = None):
        self.set, self.set_index, self.stream, self.n_streams, self.seed = shard_set, set_index, stream, n_streams, seed
        self.prepare = prepare
        self.epoch, self.shard, self.offset = position or (0, 0, 0)
        self._shards = self._order(self.epoch)
        self._samples: Iterator[dict] | None = None  # the open shard, at the end of the buffered chunk
        self._buffer: deque[Item | None] = deque()
        self._handed_out = 0  # usable items since this epoch began (or the reader was resumed)
        self._empty_epochs = 0

    def position(self) -> list[int]:
        return [self.epoch, self.shard, self.offset]

    def _order(self, epoch: int) -> list[int]:
        """Indices into the set's shards that this stream reads in `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, self.set_index, epoch]).permutation(len(self.set.urls))
        return order[self.stream :: self.n_streams].tolist()

    def next(self) -> Item:
        while True:
            while not self._buffer:
                self._fill()
            item = self._buffer.popleft()
            self.offset += 1
            if item is not None:
                self._handed_out += 1
                return item

    def _fill(self) -> None:
        """Buffer the rest of the chunk holding sample `offset`; at a shard's end, go to the next."""
        start = self.offset - self.offset % CHUNK
        if self._samples is None:
            self._samples = read_shard(self.set.urls[self._shards[self.shard]])
            if start and len(list(itertools.islice(self._samples, start))) < start:
                raise InputError(f"shard {self.set.urls[self._shards[self.shard]]} holds fewer than {start} samples: "
                                 "it changed since the position being resumed was saved")
        raw = list(itertools.islice(self._samples, CHUNK))
        if not raw:
            self._next_shard()
            return
        items = self.prepare(raw)
        shard_id = self._shards[self.shard]
        order = np.random.default_rng([self.seed, self.set_index, self.epoch, shard_id, start // CHUNK]).permutation(len(raw))
        self._buffer = deque([items[i] for i in order][self.offset - start :])

    def _next_shard(self) -> None:
        self._samples, self.shard, self.offset = None, self.shard + 1, 0
        if self.shard < len(self._shards):
            return
        self._empty_epochs = self._empty_epochs + 1 if self._handed_out == 0 else 0
        if self._empty_epochs >= 2:
            raise InputError(f"data.shards {self.set.pattern!r}: no usable sample in the shards of stream "
                             f"{self.stream} ({len(self._shards)} shards; see the warnings for why samples were skipped)")
        self.epoch, self.shard, self._handed_out = self.epoch + 1, 0, 0
        self._shards = self._order(self.epoch)


# ---- one lane: a stream of packed batches ------------------------------------------------------
def check_split(sets: list[ShardSet], world_size: int, lanes: int) -> None:
    """Every (rank, loader worker) stream reads whole shards of every set: a set needs at least as
    many shards as there are streams."""
    streams = world_size * lanes
    for s in sets:
        if len(s.urls) < streams:
            raise ConfigError(
                f"data.shards {s.pattern!r}: {len(s.urls)} shards cannot be split among {world_size} ranks x "
                f"{lanes} loader workers = {streams} streams (each reads whole shards): write at least {streams} "
                f"shards (nmm data pack --shard-size), or lower data.num_workers")


@dataclass
class StreamPlan:
    """Everything a lane needs, picklable for loader workers (the codecs travel separately)."""

    sets: list[ShardSet]
    set_weights: np.ndarray  # (S,) summing to 1
    kind_roles: dict[str, tuple[list[str], np.ndarray]]  # kind -> (roles, their weights summing to 1)
    caption_dropout: float
    seed: int
    rank: int
    world_size: int
    lanes: int
    batch_size: int
    seq_len: int
    decoder: Decoder

    @classmethod
    def build(cls, sets: list[ShardSet], cfg: RunConfig, rank: int, world_size: int) -> StreamPlan:
        lanes = max(1, cfg.data.num_workers)
        check_split(sets, world_size, lanes)
        for role in cfg.data.roles:
            if role not in KNOWN_ROLES:
                raise ConfigError(f"data.roles: unknown role '{role}' (known: {', '.join(KNOWN_ROLES)})")
        kind_roles = {}
        for kind in dict.fromkeys(s.kind for s in sets):
            names = [r for r in KIND_ROLES[kind] if cfg.data.roles.get(r, 0) > 0]
            if not names:
                pattern = next(s.pattern for s in sets if s.kind == kind)
                raise ConfigError(f"data.roles gives no weight to {' or '.join(KIND_ROLES[kind])}, the roles of the "
                                  f"{kind} samples of data.shards {pattern!r}")
            weights = np.array([cfg.data.roles[r] for r in names], dtype=np.float64)
            kind_roles[kind] = (names, weights / weights.sum())
        set_weights = np.array([s.weight for s in sets], dtype=np.float64)
        return cls(sets, set_weights / set_weights.sum(), kind_roles, cfg.data.caption_dropout, cfg.train.seed, rank,
                   world_size, lanes, cfg.train.batch_size, cfg.train.seq_len, Decoder(cfg))

    def role_shares(self) -> tuple[list[str], np.ndarray]:
        """Each role's expected share of the documents (set weight x role weight within its kind's
        roles), to report like `DocumentMixture.roles` / `.weights`."""
        shares: dict[str, float] = {}
        for s, w in zip(self.sets, self.set_weights):
            names, p = self.kind_roles[s.kind]
            for r, q in zip(names, p):
                shares[r] = shares.get(r, 0.0) + float(w * q)
        return list(shares), np.array(list(shares.values()))

    def document(self, item: Item, rng: np.random.Generator) -> Document:
        """The item as a document of a role drawn for it, built by `nmm.data.mixture`'s role builders."""
        names, p = self.kind_roles[item.kind]
        role = names[int(rng.choice(len(names), p=p))]
        if item.kind == "image":
            return image_roles(ImagePool(item.codes[None], [item.text]), None, self.caption_dropout)[role](rng)
        if item.kind == "text":
            return text_role([item.text])[role](rng)
        pool = TranscriptPool([item.text], [item.codes], modality=item.kind)
        names = VIDEO_ROLE_NAMES if item.kind == "video" else ("transcription", "synthesis")
        return speech_roles(pool, self.caption_dropout, names=names)[role](rng)


class Lane:
    """One stream of packed batches: lane `lane` of the plan's rank. Its position (`state()`) is
    {"docs": documents drawn, "sets": [[epoch, shard, sample] per shard set], "pending": documents
    drawn that did not fit where they were drawn, as [ids, is_target], given first when they fit}."""

    def __init__(self, plan: StreamPlan, codecs: Codecs, lane: int, state: dict | None = None):
        self.plan, self.codecs, self.lane = plan, codecs, lane
        self.skipped: Counter[str] = Counter()
        stream = plan.rank * plan.lanes + lane
        positions = state["sets"] if state else [None] * len(plan.sets)
        self.readers = [SetReader(s, i, stream, plan.world_size * plan.lanes, plan.seed, self._prepare, pos)
                        for i, (s, pos) in enumerate(zip(plan.sets, positions))]
        self.docs = state["docs"] if state else 0
        self.pending: list[tuple[list[int], list[bool]]] = [(list(i), list(t)) for i, t in state["pending"]] if state else []

    def state(self) -> dict:
        return {"docs": self.docs, "sets": [r.position() for r in self.readers],
                "pending": [[ids, tgt] for ids, tgt in self.pending]}

    def _prepare(self, raw: list[dict]) -> list[Item | None]:
        items = []
        for sample in raw:
            item, reason = self.plan.decoder(sample)
            if item is not None and item.kind not in self.plan.kind_roles:
                item, reason = None, f"no role for {item.kind} samples"
            if item is None:
                self._skip(reason, sample)
            items.append(item)
        return encode_items(self.codecs, items, self.skipped)

    def _skip(self, reason: str, sample: dict) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:  # the first few of each reason, then only counted
            log.warning("data.shards: skipped sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), reason)

    def draw(self, room: int) -> tuple[list[int], list[bool]]:
        """The next document's (ids, is_target): the first pending one that fits in `room` tokens,
        else a new one (while fewer than MAX_PENDING wait; past that, the oldest, which closes the row)."""
        for i, (ids, _) in enumerate(self.pending):
            if len(ids) <= room:
                return self.pending.pop(i)
        if len(self.pending) >= MAX_PENDING:
            return self.pending.pop(0)
        rng = np.random.default_rng([self.plan.seed, self.plan.rank, self.lane, self.docs])
        self.docs += 1
        reader = self.readers[int(rng.choice(len(self.readers), p=self.plan.set_weights))]
        return self.codecs.encode_document(self.plan.document(reader.next(), rng))

    def put_back(self, ids: list[int], is_target: list[bool]) -> None:
        self.pending.append((ids, is_target))

    def next_batch(self) -> tuple[Batch, dict]:
        """The lane's next batch and its position after it."""
        batch = pack_rows(self.draw, self.plan.batch_size, self.plan.seq_len, self.codecs.vocab, put_back=self.put_back)
        return batch, self.state()


class _LaneDataset(torch.utils.data.IterableDataset):
    """The lanes of one rank as an IterableDataset: loader worker `w` runs lane `(start + w) % lanes`.
    The DataLoader takes batches from its workers in turn, so its j-th batch is the rank's batch
    `start + j`, from lane `(start + j) % lanes`, as without workers."""

    def __init__(self, plan: StreamPlan, codecs: Codecs, start: int, states: list[dict | None]):
        super().__init__()
        self.plan, self.codecs, self.start, self.states = plan, codecs, start, states

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        lane = (self.start + (info.id if info is not None else 0)) % self.plan.lanes
        stream = Lane(self.plan, self.codecs, lane, self.states[lane])
        while True:
            batch, state = stream.next_batch()
            # The position travels as JSON text, which the DataLoader passes through untouched.
            yield (batch.ids, batch.targets, batch.positions, batch.doc_ids, batch.generated, json.dumps(state))


class StreamingBatches:
    """The rank's batches from shards, with `PackedBatches`' interface: `batch(index)`,
    `state_dict()`, `load_state_dict(state)` (see the module docstring).

    `batch(index)` reads forwards: index is the rank's micro-batch counter, consecutive from 0 or
    from the resumed position; asking for the batch just returned gives it again (the trainer counts
    the first batch's FLOPs, then trains on it), and an index further on skips the batches between.
    `roles` / `weights`: each role's expected share."""

    def __init__(self, source: ShardSource, codecs: Codecs, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        self.plan = StreamPlan.build(source.sets, cfg, rank, world_size)
        self.codecs = codecs
        self.num_workers, self.prefetch = cfg.data.num_workers, cfg.data.prefetch
        self.roles, self.weights = self.plan.role_shares()
        self.pool = self.world = None  # as a DocumentMixture's: no pool in memory, no world
        self._next = 0
        self._states: list[dict | None] = [None] * self.plan.lanes
        self._stream: Iterator | None = None
        self._last: tuple[int, Batch] | None = None

    def batch(self, index: int) -> Batch:
        if self._last is not None and index == self._last[0]:
            return self._last[1]
        if index < self._next:
            raise ValueError(f"StreamingBatches reads forwards: the next batch is {self._next}, not {index} "
                             "(to go back, load_state_dict a state saved before it)")
        if self._stream is None:
            self._stream = self._open()
        while self._next <= index:  # an index past the next one skips the batches between (a skipped data window)
            *tensors, state = next(self._stream)
            self._states[self._next % self.plan.lanes] = json.loads(state)
            self._next += 1
        batch = Batch(*tensors)
        self._last = (index, batch)
        return batch

    def _open(self) -> Iterator:
        dataset = _LaneDataset(self.plan, self.codecs, self._next, list(self._states))
        if self.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch, pin_memory=torch.cuda.is_available())
        return iter(loader)

    def state_dict(self) -> dict:
        """JSON-serialisable: where each lane stands after the last batch returned."""
        p = self.plan
        return {"version": STATE_VERSION, "next_batch": self._next, "rank": p.rank, "world_size": p.world_size,
                "lanes": p.lanes, "seed": p.seed, "shards": [s.pattern for s in p.sets],
                "lane_states": list(self._states)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch `state` was saved at; the stream must be split the same way."""
        p = self.plan
        if not state:
            raise ConfigError("cannot resume the data stream: the checkpoint holds no position in the shards (it was "
                              "saved by a run that did not stream data.source=shards)")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data stream state: version {state.get('version')!r}, this nmm reads {STATE_VERSION}")
        for key, now, what in (("world_size", p.world_size, "the world size (ranks)"),
                               ("lanes", p.lanes, "data.num_workers (1 when 0)"), ("rank", p.rank, "the rank"),
                               ("seed", p.seed, "train.seed"), ("shards", [s.pattern for s in p.sets], "data.shards")):
            if state.get(key) != now:
                raise ConfigError(f"cannot resume the data stream: it was saved with {what} = {state.get(key)!r}, "
                                  f"this run has {now!r} (each split reads different shards)")
        self.close()
        self._next, self._states, self._last = int(state["next_batch"]), list(state["lane_states"]), None

    def close(self) -> None:
        """Stop the loader workers (a new stream starts at the next `batch`)."""
        self._stream = None  # the DataLoader iterator shuts its workers down when it is dropped


# ---- the data source ---------------------------------------------------------------------------
class ShardSource:
    """`data.source=shards`: the shard sets of `data.shards` (see the module docstring).

    For the codecs it reads a bounded head of the shards, in file order: the first `TEXT_SAMPLES`
    texts of each set for the text tokenizer, the first `image.pool_size` images, `audio.pool_size`
    recordings (then `audio.eval_items` more, held out) or clips. Training streams through
    `batches`; `roles` builds pools in memory from the head, for code that wants random access."""

    world = None
    judge = None

    def __init__(self, cfg: RunConfig):
        if not cfg.data.shards:
            raise ConfigError('data.source=shards needs data.shards={"PATH/shard-{000000..000009}.tar": 1.0} '
                              "(shard sets and their weights; `nmm data pack` writes shards)")
        self.cfg = cfg
        self.sets = [ShardSet.open(pattern, weight) for pattern, weight in cfg.data.shards.items()]
        # Checked again for the real world size in `batches`; torchrun's WORLD_SIZE catches it before the codecs train.
        check_split(self.sets, int(os.environ.get("WORLD_SIZE", "1")), max(1, cfg.data.num_workers))
        self.modalities = tuple(dict.fromkeys(s.kind for s in self.sets if s.kind != "text"))
        self.decoder = Decoder(cfg)
        self.image_pool: ImagePool | None = None

    # ---- the head, for the codecs ------------------------------------------------------------
    def head(self, kind: str, n: int, skip: int = 0, decode: bool = True) -> list[Item]:
        """The first usable items of `kind` after `skip` of them, `n` in all, split evenly among
        the sets of that kind, each read in file order (decoded, not encoded)."""
        sets = [s for s in self.sets if s.kind == kind]
        items: list[Item] = []
        share = lambda total, i: total // len(sets) + (i < total % len(sets))
        for i, s in enumerate(sets):
            want, passed = share(n, i), share(skip, i)
            for item in self._usable(s, kind, decode):
                if want == 0:
                    break
                if passed:
                    passed -= 1
                    continue
                items.append(item)
                want -= 1
        if n and not items and not skip:  # (past a skip, none is fine: held-out audio falls back to the rest)
            raise InputError(f"data.shards: no usable {kind} sample in {', '.join(repr(s.pattern) for s in sets)} "
                             "(undecodable, or without text)")
        return items

    def _usable(self, s: ShardSet, kind: str | None, decode: bool) -> Iterator[Item]:
        """The usable items of `kind` (None: any) of one set, in file order."""
        for url in s.urls:
            for sample in read_shard(url):
                item, _ = self.decoder(sample, decode=decode)
                if item is not None and (kind is None or item.kind == kind):
                    yield item

    def texts(self) -> list[str]:
        """Captions, transcripts and texts for the text tokenizer: the first TEXT_SAMPLES of each set."""
        return [item.text for s in self.sets for item in itertools.islice(self._usable(s, None, False), TEXT_SAMPLES)]

    def images(self) -> np.ndarray:
        """(N, H, W, 3) uint8: the image tokenizer's training images."""
        return np.stack([item.value for item in self.head("image", self.cfg.image.pool_size)])

    def waves(self) -> list[np.ndarray]:
        return [item.value for item in self.head("audio", self.cfg.audio.pool_size)]

    def heldout_waves(self) -> list[np.ndarray]:
        return [item.value for item in self.head("audio", self.cfg.audio.eval_items, skip=self.cfg.audio.pool_size)]

    def part(self, modality: str):
        """What trains the codec of `modality`: this source, or for video a view of its clips."""
        return _VideoPart(self) if modality == "video" else self

    # ---- training ----------------------------------------------------------------------------
    def batches(self, codecs: Codecs, cfg: RunConfig, rank: int = 0, world_size: int = 1) -> StreamingBatches:
        """The rank's stream of packed batches (what the trainer reads instead of `PackedBatches`)."""
        return StreamingBatches(self, codecs, cfg, rank, world_size)

    def roles(self, codecs: Codecs, cfg: DataConfig) -> dict[str, RoleSampler]:
        """Role samplers over pools in memory of the head of the shards (data.pool_size images,
        data.speech_pool_size recordings, data.video_pool_size clips)."""
        roles: dict[str, RoleSampler] = {}
        if "image" in self.modalities:
            items = self.head("image", cfg.pool_size)
            self.image_pool = ImagePool(codecs.encode_images(np.stack([i.value for i in items])), [i.text for i in items])
            roles.update(image_roles(self.image_pool, None, cfg.caption_dropout, input_loss=cfg.input_loss))
        for kind, n, names in (("audio", cfg.speech_pool_size, ("transcription", "synthesis")),
                               ("video", cfg.video_pool_size, VIDEO_ROLE_NAMES)):
            if kind in self.modalities:
                items = [i for i in encode_items(codecs, self.head(kind, n), Counter()) if i is not None]
                if items:
                    pool = TranscriptPool([i.text for i in items], [i.codes for i in items], modality=kind)
                    roles.update(speech_roles(pool, cfg.caption_dropout, names=names))
        texts = [i.text for s in self.sets if s.kind == "text"
                 for i in itertools.islice(self._usable(s, "text", False), cfg.pool_size)]
        roles.update(text_role(texts))
        return roles


class _VideoPart:
    """The clips of a shard source, as the video codec's trainer reads them: frames for the frame
    tokenizer (`images()`), clips for its statistics (`clips_frames(n)`)."""

    world = None
    judge = None

    def __init__(self, source: ShardSource):
        self.source = source

    def images(self) -> np.ndarray:
        cfg = self.source.cfg
        clips = self.clips_frames(max(1, -(-cfg.image.pool_size // cfg.video.frames)))
        frames = clips.reshape(-1, *clips.shape[2:])
        return frames[: cfg.image.pool_size]

    def clips_frames(self, n: int) -> np.ndarray:
        return np.stack([item.value for item in self.source.head("video", n)])
