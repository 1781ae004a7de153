"""The modality contract: what a modality must say about itself, and what its codec must do.

A modality (image, audio, video, ...) is a plugin. It declares a `ModalitySpec` (its name, the
special tokens that open and close one item, how many discrete codes it has and how they factor,
how many tokens one item takes) and provides a codec that turns items into codes and back. The
vocabulary (`nmm.modalities.vocab`) lays out one id range per spec; the model, the decoder and
the prompt builder work from the specs alone, so a new modality is one codec file plus one
registry line (`docs/adding-a-modality.md`).

This module imports nothing else of nmm: it is the bottom layer every other layer may use.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

TEXT = "text"  # the base modality: BPE ids and the special tokens, always first in the vocabulary


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's place in the token stream: `begin`, then codes, then `end`.

    `factors` splits a code into independent parts (code = f0 * n1 + f1 for two factors), which
    the model embeds and predicts separately; `levels` are the FSQ levels of each factor, enough
    to turn a code back into the tokenizer's latent vector. `tokens_per_item=None` means items
    have variable length and the model ends them by sampling `end`."""

    name: str
    begin: str  # special token that opens an item, e.g. "<boi>"
    end: str  # special token that closes it, e.g. "<eoi>"
    codes: int  # number of discrete codes
    factors: tuple[int, ...] = ()  # () = one factor of `codes`
    levels: tuple[tuple[int, ...], ...] = ()  # FSQ levels of each factor (optional)
    tokens_per_item: int | None = None  # None = variable length, ended by a sampled `end`
    mime: str = "application/octet-stream"  # what the codec's `to_bytes` gives the server
    # Where an item's first codes lie in space and time, for 2D/3D rotary positions: (rows, cols) for
    # an image, (frames, rows, cols) for a clip; codes past prod(grid) (a delta clip's changes) and
    # grid-less modalities (audio) keep 1D positions. Not part of the id layout: not compared.
    grid: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name == TEXT:
            raise ValueError(f"modality name {self.name!r} must be an identifier other than {TEXT!r}")
        if self.codes < 1:
            raise ValueError(f"modality {self.name!r}: codes must be >= 1, got {self.codes}")
        if math.prod(self.code_factors) != self.codes:
            raise ValueError(f"modality {self.name!r}: factors {self.factors} multiply to "
                             f"{math.prod(self.factors)}, not {self.codes}")
        for f, lv in zip(self.code_factors, self.levels):
            if math.prod(lv) != f:
                raise ValueError(f"modality {self.name!r}: FSQ levels {lv} do not give {f} codes")
        if self.tokens_per_item is not None and self.tokens_per_item < 1:
            raise ValueError(f"modality {self.name!r}: tokens_per_item must be >= 1 or None")
        if self.grid and (len(self.grid) not in (2, 3) or min(self.grid) < 1
                          or (self.tokens_per_item is not None and math.prod(self.grid) > self.tokens_per_item)):
            raise ValueError(f"modality {self.name!r}: grid {self.grid} must be (rows, cols) or (frames, rows, cols) "
                             f"covering at most tokens_per_item={self.tokens_per_item} codes")

    @property
    def code_factors(self) -> tuple[int, ...]:
        return self.factors or (self.codes,)

    @property
    def fixed_length(self) -> bool:
        return self.tokens_per_item is not None

    @property
    def latent_dim(self) -> int:
        return sum(len(lv) for lv in self.levels)

    def to_dict(self) -> dict:
        return {"name": self.name, "begin": self.begin, "end": self.end, "codes": self.codes,
                "factors": list(self.factors), "levels": [list(lv) for lv in self.levels],
                "tokens_per_item": self.tokens_per_item, "mime": self.mime, "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> ModalitySpec:
        return cls(name=str(d["name"]), begin=str(d["begin"]), end=str(d["end"]), codes=int(d["codes"]),
                   factors=tuple(int(x) for x in d.get("factors", ())),
                   levels=tuple(tuple(int(x) for x in lv) for lv in d.get("levels", ())),
                   tokens_per_item=None if d.get("tokens_per_item") is None else int(d["tokens_per_item"]),
                   mime=str(d.get("mime", "application/octet-stream")), grid=tuple(int(x) for x in d.get("grid", ())))


def split_codes(codes: torch.Tensor, factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Joint code -> factor codes, most significant first (code = (f0 * n1 + f1) * n2 + f2 ...).
    The one place this mixed-radix split is written; `join_codes` inverts it."""
    parts = []
    for f in reversed(factors):
        parts.append(codes % f)
        codes = codes // f
    return parts[::-1]


def join_codes(parts: list[torch.Tensor], factors: tuple[int, ...]) -> torch.Tensor:
    code = torch.zeros_like(parts[0])
    for part, f in zip(parts, factors):
        code = code * f + part
    return code


@runtime_checkable
class ModalityCodec(Protocol):
    """What a modality's tokenizer provides. Items are whatever is natural for the modality
    (uint8 image arrays, float waveforms); codes are LongTensors (B, tokens_per_item) in [0, codes)."""

    @property
    def spec(self) -> ModalitySpec: ...

    def encode(self, items: Any) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> Any: ...

    def to_bytes(self, item: Any) -> bytes: ...  # one item as a file of type `spec.mime` (PNG, WAV)

    def from_bytes(self, data: bytes) -> Any: ...

    def save(self, run_dir: str | Path) -> None: ...

    @classmethod
    def load(cls, run_dir: str | Path) -> ModalityCodec: ...


@dataclass(frozen=True)
class ModalityPlugin:
    """A registry entry: the codec class and how to train one for a run (`train(cfg, world, ...)`)."""

    name: str
    codec: type
    train: Callable[..., Any] | None = None


MODALITIES: dict[str, ModalityPlugin] = {}


def register_modality(name: str, codec: type, train: Callable[..., Any] | None = None) -> ModalityPlugin:
    """Add a modality plugin (the one registry line a new modality needs). Re-registering the same
    codec is a no-op, so a module may be imported twice; a different codec under a taken name is an error."""
    known = MODALITIES.get(name)
    if known is not None and known.codec is not codec:
        raise ValueError(f"modality {name!r} is already registered with {known.codec.__qualname__}")
    MODALITIES[name] = plugin = ModalityPlugin(name, codec, train)
    return plugin


def modality_plugin(name: str) -> ModalityPlugin:
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; registered: {', '.join(sorted(MODALITIES)) or 'none'}") from None


# ---- codecs that stand in for a modality plugin's own ---------------------------------------------
# A tokenizer imported from another model's checkpoint (nmm.interop: Chameleon's VQ-VAE) serves a
# built-in modality ("image") with a codec class of its own. A run names such codecs by kind in
# codecs.json ({"image": "chameleon_vq"}); `codec_class` imports the module that registers a kind the
# first time it is asked for, found by module name at run time as nmm.data.sources finds its sources.
CODEC_PLUGINS: dict[str, str] = {"chameleon_vq": "nmm.interop.chameleon", "emu3_vq": "nmm.interop.emu3",
                                 "image_vq": "nmm.modalities.image_vq",
                                 "janus_vq": "nmm.interop.janus"}
CODECS: dict[str, type] = {}


def register_codec(kind: str, codec: type) -> None:
    """Make `kind` in a run's codecs.json load with `codec.load(run_dir)`; a codec class says its kind
    in `codec_kind`, which `Codecs.save` writes. Re-registering the same class is a no-op."""
    known = CODECS.get(kind)
    if known is not None and known is not codec:
        raise ValueError(f"codec kind {kind!r} is already registered with {known.__qualname__}")
    CODECS[kind] = codec


def codec_class(kind: str) -> type:
    if kind not in CODECS and kind in CODEC_PLUGINS:
        importlib.import_module(CODEC_PLUGINS[kind])
    try:
        return CODECS[kind]
    except KeyError:
        known = ", ".join(sorted({*CODECS, *CODEC_PLUGINS})) or "none"
        raise KeyError(f"unknown codec kind {kind!r}; known: {known}") from None
