"""The unit of data in nmm: an interleaved document of text segments and items of other modalities
(images today; any registered modality)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TextSegment:
    text: str
    loss: bool = True  # False for prompt-like segments we condition on but do not learn to produce


@dataclass
class ItemSegment:
    """One item of a non-text modality: raw (`item`, e.g. an (H, W, 3) uint8 image) or already
    tokenised (`codes`, the item's vocabulary ids, which saves re-encoding)."""

    modality: str
    item: Any = None
    loss: bool = True
    codes: np.ndarray | None = None  # (N,) vocabulary ids
    # With `loss`: the first `loss_from` codes (and the begin token) are given, not learned; the rest
    # and the end token are. Continuation: the first frames of a clip in, the rest out.
    loss_from: int = 0


def ImageSegment(image: np.ndarray | None = None, loss: bool = True, codes: np.ndarray | None = None) -> ItemSegment:
    """An image item: `image` (H, W, 3) uint8, or its `codes` (N,) image-token ids."""
    return ItemSegment("image", image, loss, codes)


Segment = TextSegment | ItemSegment


@dataclass
class Document:
    segments: list[Segment]
    role: str = "interleaved"  # captioning | generation | interleaved | text | qa
    meta: dict = field(default_factory=dict)
