"""The unit of data in nmm: an interleaved document of text and image segments."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextSegment:
    text: str
    loss: bool = True  # False for prompt-like segments we condition on but do not learn to produce


@dataclass
class ImageSegment:
    image: np.ndarray | None = None  # (H, W, 3) uint8
    loss: bool = True
    codes: np.ndarray | None = None  # (N,) image-token ids, when already tokenised (saves re-encoding)


Segment = TextSegment | ImageSegment


@dataclass
class Document:
    segments: list[Segment]
    role: str = "interleaved"  # captioning | generation | interleaved | text | qa
    meta: dict = field(default_factory=dict)
