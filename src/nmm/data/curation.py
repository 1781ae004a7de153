"""Curation: what `nmm data pack` keeps on the way into shards, what it drops, and why.

Real training data goes wrong in a few common ways, and each is a reason here:

    bad_record          a line of the index that is not JSON, or lacks a field
    missing_file        the index names a file that is not there
    unreadable          the file does not decode (truncated, corrupt, not the format it claims)
    too_small           an image whose shorter side is under `min_size` pixels
    too_long/too_short  a recording or clip outside the duration limits
    caption_too_short   a caption / transcript under `min_caption_chars` characters
    caption_too_long    ... over `max_caption_chars` (it would be cut at the model's sequence length)
    exact_duplicate     the same file bytes as an item already kept (SHA-256)
    near_duplicate      an image within `near_dup_distance` bits of one already kept (perceptual hash)

`Ledger` counts kept and dropped items by reason with a few example keys each: `report.json`.

The perceptual hash is pHash (the DCT hash of `imagehash.phash`, in a dozen lines of numpy rather
than a dependency that brings SciPy and PyWavelets along): the image in grey at 32x32, its 2D DCT,
and one bit per coefficient of the 8x8 lowest frequencies, set where the coefficient is above their
median. Re-encoding, resizing and small brightness changes move few bits; different pictures
differ in about half. It sees luminance only, so two images that differ only in colour hash alike;
for the shapes world, where colour is what a caption says, `nmm data pack shapes` turns the near-
duplicate check off by default. Lookups use multi-index hashing: with the 64 bits cut into
`distance + 1` bands, two hashes within `distance` bits agree exactly on at least one band, so only
items sharing a band with the query are compared, not every item kept.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

REASONS = ("bad_record", "missing_file", "unreadable", "too_small", "too_long", "too_short",
           "caption_too_short", "caption_too_long", "exact_duplicate", "near_duplicate")
EXAMPLES = 10  # example keys kept per reason in the report
HASH_BITS = 64
_DCT_SIZE = 32
_DCT = np.cos(np.pi * (2 * np.arange(_DCT_SIZE)[None, :] + 1) * np.arange(_DCT_SIZE)[:, None] / (2 * _DCT_SIZE))


@dataclass
class CurationOptions:
    """The filters of `nmm data pack` (the CLI's options of the same names)."""

    min_size: int = 16  # pixels, the shorter side of an image file as stored
    min_caption_chars: int = 3
    max_caption_chars: int = 500
    near_dup_distance: int = 6  # Hamming distance of perceptual hashes (of 64 bits); -1: no near-duplicate check
    max_seconds: float | None = None  # longest recording or clip kept (None: no limit)
    min_seconds: float = 0.05  # shortest recording kept (the codec's log-mel needs at least that)

    def to_dict(self) -> dict:
        return asdict(self)


def content_hash(data: bytes) -> bytes:
    """SHA-256 of an item's bytes (the 32-byte digest): equal for exact copies of a file."""
    return hashlib.sha256(data).digest()


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash of an image (see the module docstring)."""
    grey = np.asarray(image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()  # (64,) lowest frequencies, the mean (DC) first
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearDuplicates:
    """Perceptual hashes of the images kept so far, searchable within `distance` bits."""

    def __init__(self, distance: int):
        self.distance = distance
        n_bands = min(distance + 1, HASH_BITS)
        edges = np.linspace(0, HASH_BITS, n_bands + 1).round().astype(int)
        self.bands = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def _parts(self, h: int) -> list[int]:
        return [(h >> (HASH_BITS - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def find(self, h: int) -> tuple[str, int] | None:
        """(key, distance) of the closest kept image within `distance` bits of `h`, or None."""
        candidates = {i for table, part in zip(self.tables, self._parts(h)) for i in table.get(part, ())}
        best = min(((hamming(h, self.hashes[i]), i) for i in candidates), default=None)
        if best is None or best[0] > self.distance:
            return None
        return self.keys[best[1]], best[0]

    def add(self, h: int, key: str) -> None:
        for table, part in zip(self.tables, self._parts(h)):
            table.setdefault(part, []).append(len(self.hashes))
        self.hashes.append(h)
        self.keys.append(key)


class Ledger:
    """Kept and dropped items, by reason, with example keys: the curation half of report.json."""

    def __init__(self):
        self.seen = 0
        self.kept = 0
        self.counts = {r: 0 for r in REASONS}
        self.examples: dict[str, list[dict]] = {r: [] for r in REASONS}

    def keep(self) -> None:
        self.seen += 1
        self.kept += 1

    def drop(self, reason: str, key: str, detail: str) -> None:
        if reason not in self.counts:
            raise ValueError(f"unknown drop reason {reason!r} (one of {', '.join(REASONS)})")
        self.seen += 1
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append({"key": key, "detail": detail})

    @property
    def dropped(self) -> int:
        return self.seen - self.kept

    def to_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "dropped": self.dropped,
                "dropped_by_reason": {r: {"count": self.counts[r], "examples": self.examples[r]}
                                      for r in REASONS if self.counts[r]}}


class Curator:
    """The checks of one pack run, in the order `nmm.data.pack` applies them: caption, exact
    duplicate (before decoding, which costs more), then, once decoded, the near-duplicate check of
    images. Hashes are remembered only for items kept, so a corrupt file's copy is reported as
    unreadable too, not as its duplicate."""

    def __init__(self, options: CurationOptions):
        self.options = options
        self.ledger = Ledger()
        self._hashes: dict[bytes, str] = {}  # content hash -> key of the item kept with it
        self._near = NearDuplicates(options.near_dup_distance) if options.near_dup_distance >= 0 else None

    def caption_problem(self, caption: str) -> tuple[str, str] | None:
        o = self.options
        if len(caption) < o.min_caption_chars:
            return "caption_too_short", f"{len(caption)} characters, under --min-caption-chars {o.min_caption_chars}"
        if len(caption) > o.max_caption_chars:
            return "caption_too_long", f"{len(caption)} characters, over --max-caption-chars {o.max_caption_chars}"
        return None

    def duplicate_of(self, data: bytes) -> str | None:
        """The key of a kept item with exactly these bytes, or None."""
        return self._hashes.get(content_hash(data))

    def size_problem(self, image: Image.Image) -> tuple[str, str] | None:
        w, h = image.size
        if min(w, h) < self.options.min_size:
            return "too_small", f"{w}x{h} pixels, under --min-size {self.options.min_size}"
        return None

    def duration_problem(self, seconds: float | None) -> tuple[str, str] | None:
        o = self.options
        if seconds is None:
            return None
        if o.max_seconds is not None and seconds > o.max_seconds:
            return "too_long", f"{seconds:.2f} s, over --max-seconds {o.max_seconds:g}"
        if seconds < o.min_seconds:
            return "too_short", f"{seconds * 1000:.0f} ms, under {o.min_seconds * 1000:.0f} ms"
        return None

    def near_duplicate_of(self, image: Image.Image) -> tuple[tuple[str, int] | None, int | None]:
        """((key, distance) of a kept image it nearly duplicates, or None; its hash, or None when the
        check is off)."""
        if self._near is None:
            return None, None
        h = perceptual_hash(image)
        return self._near.find(h), h

    def kept(self, key: str, data: bytes, image_hash: int | None = None) -> None:
        self.ledger.keep()
        self._hashes[content_hash(data)] = key
        if image_hash is not None and self._near is not None:
            self._near.add(image_hash, key)
