"""`Codecs`: the text and image tokenizers plus the vocabulary that joins them.

This is the only place that turns a `Document` into token ids and back, so training, generation
and evaluation agree on the sequence format:

    <bos> text ids ... <boi> image ids (exactly tokens_per_image) <eoi> text ids ... <eos>
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from nmm.data.document import Document, ImageSegment, TextSegment
from nmm.errors import CheckpointError
from nmm.modalities.image import ImageTokenizer
from nmm.modalities.text import TextTokenizer
from nmm.modalities.vocab import Vocabulary, VocabularyError
from nmm.utils import atomic_write_json


class Codecs:
    def __init__(self, text: TextTokenizer, image: ImageTokenizer):
        self.text, self.image = text, image
        self.vocab = Vocabulary(text.vocab_size, (image.spec,))

    # ---- text -----------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self._encode_cached(text))

    @functools.lru_cache(maxsize=100_000)  # captions, questions and instructions recur across batches
    def _encode_cached(self, text: str) -> tuple[int, ...]:
        return tuple(self.text.encode(text))

    def decode_text(self, ids) -> str:
        """Decode the text ids in `ids`, dropping specials and image codes."""
        ids = [int(i) for i in ids if int(i) < self.vocab.n_text]  # text ids come first in the layout
        return self.text.decode(ids)

    # ---- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, tokens_per_image) vocabulary ids (int64)."""
        out = [self.image.encode(images[i : i + batch]).cpu().numpy() for i in range(0, len(images), batch)]
        return self.vocab.ids("image", np.concatenate(out))

    @torch.no_grad()
    def decode_images(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, tokens_per_image) vocabulary ids -> (B, H, W, 3) uint8."""
        codes = self.vocab.codes("image", torch.as_tensor(np.asarray(ids)))
        return self.image.decode(codes.clamp(0, self.vocab.image_codes - 1))

    # ---- documents ------------------------------------------------------------------------------
    def image_block(self, seg: ImageSegment) -> list[int]:
        codes = seg.codes if seg.codes is not None else self.encode_images(seg.image[None])[0]
        return [self.vocab.boi, *map(int, codes), self.vocab.eoi]

    def encode_document(self, doc: Document) -> tuple[list[int], list[bool]]:
        """Document -> (ids, is_target). is_target[i] says whether ids[i] is predicted (gets loss)."""
        ids, target = [self.vocab.bos], [False]
        for seg in doc.segments:
            part = self.encode_text(seg.text) if isinstance(seg, TextSegment) else self.image_block(seg)
            ids += part
            target += [seg.loss] * len(part)
        ids.append(self.vocab.eos)
        target.append(bool(doc.segments) and doc.segments[-1].loss)
        return ids, target

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        self.text.save(run_dir / "text_tokenizer.json")
        self.image.save(run_dir)
        atomic_write_json(run_dir / "vocab.json", self.vocab.to_dict())

    @classmethod
    def load(cls, run_dir: str | Path) -> "Codecs":
        run_dir = Path(run_dir)
        codecs = cls(TextTokenizer.load(run_dir / "text_tokenizer.json"), ImageTokenizer.load(run_dir))
        try:
            saved = Vocabulary.from_dict(json.loads((run_dir / "vocab.json").read_text()))
        except VocabularyError as e:
            raise CheckpointError(f"{run_dir / 'vocab.json'}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{run_dir / 'vocab.json'}: missing or corrupt ({e.__class__.__name__}: {e})") from None
        if saved != codecs.vocab:
            raise CheckpointError(f"{run_dir}: the vocabulary layout in vocab.json does not match the saved tokenizers "
                                  f"({saved.describe_difference(codecs.vocab)}): token ids would be misread")
        return codecs
