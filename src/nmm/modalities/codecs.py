"""`Codecs`: the text tokenizer, one codec per modality, and the vocabulary that joins them.

This is the only place that turns a `Document` (training) or a prompt (generation: `prompt`) into
token ids and back, so training, generation and evaluation agree on the sequence format:

    <bos> text ids ... <boi> image ids (exactly tokens_per_image) <eoi> text ids ... <eos>

and the same for every other modality, with its own begin / end tokens. A prompt is the same layout
without the final `<eos>`, optionally ending in a begin token to have the model write that item.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmm.errors import CheckpointError
from nmm.modalities import audio as _audio_plugin  # noqa: F401  (registers the built-in audio modality)
from nmm.modalities import image as _image_plugin  # noqa: F401  (registers the built-in image modality)
from nmm.modalities import video as _video_plugin  # noqa: F401  (registers the built-in video modality)
from nmm.modalities.base import ModalityCodec, codec_class, modality_plugin
from nmm.modalities.document import Document, ItemSegment, TextSegment
from nmm.modalities.text import TextTokenizer
from nmm.modalities.vocab import Vocabulary, VocabularyError
from nmm.utils import atomic_write_json

CODECS_FILE = "codecs.json"  # modality -> codec kind, for codecs that are not their plugin's own
PromptSegment = str | TextSegment | ItemSegment | tuple[str, Any]  # see `Codecs.prompt`


def _batch(items: list):
    """Items of one modality -> one batch for its codec: stacked when they are arrays of one shape
    (images); a list otherwise (waveforms of different lengths)."""
    if len({getattr(x, "shape", None) for x in items}) != 1:
        return items
    if all(isinstance(x, np.ndarray) for x in items):
        return np.stack(items)
    if all(torch.is_tensor(x) for x in items):
        return torch.stack(items)
    return items


def untrained_codec(name: str, cfg) -> ModalityCodec:
    """A built-in modality's codec at a run config's settings, weights at their initialisation: what
    random-weight pipelines and `nmm inspect` need (the vocabulary it adds does not depend on training)."""
    from nmm.modalities.audio import AudioCodec
    from nmm.modalities.image import ImageTokenizer
    from nmm.modalities.video import VideoCodec

    build = {"image": lambda: ImageTokenizer(cfg.image), "audio": lambda: AudioCodec(cfg.audio),
             "video": lambda: VideoCodec(ImageTokenizer(cfg.image), cfg.video)}
    if name not in build:
        raise KeyError(f"no built-in codec for modality {name!r} (have {', '.join(build)})")
    return build[name]()


class Codecs:
    def __init__(self, text: TextTokenizer, *codecs: ModalityCodec):
        """`Codecs(text_tokenizer, image_tokenizer, ...)`: the vocabulary lays the modalities out in
        this order."""
        self.text = text
        self.modalities: dict[str, ModalityCodec] = {c.spec.name: c for c in codecs}
        if len(self.modalities) != len(codecs):
            raise ValueError(f"two codecs for one modality: {[c.spec.name for c in codecs]}")
        self.image = self.modalities.get("image")
        self.vocab = Vocabulary(text.vocab_size, tuple(c.spec for c in codecs))

    def codec(self, name: str) -> ModalityCodec:
        try:
            return self.modalities[name]
        except KeyError:
            raise KeyError(f"no codec for modality {name!r} (have {', '.join(self.modalities)})") from None

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

    # ---- items of any modality -------------------------------------------------------------------
    @torch.no_grad()
    def encode_items(self, name: str, items, batch: int = 256) -> np.ndarray | list[np.ndarray]:
        """A batch of items -> vocabulary ids (int64): (B, N) for a fixed-length modality (e.g. from
        (B, H, W, 3) uint8 images), a list of B 1-D arrays for a variable-length one (waveforms)."""
        codec = self.codec(name)
        chunks = [codec.encode(items[i : i + batch]) for i in range(0, len(items), batch)]
        if self.vocab.spec(name).fixed_length:
            return self.vocab.ids(name, np.concatenate([c.cpu().numpy() for c in chunks]))
        return [self.vocab.ids(name, np.asarray(c.cpu())) for chunk in chunks for c in chunk]

    @torch.no_grad()
    def decode_items(self, name: str, ids):
        """Vocabulary ids of modality `name` ((B, N), or a list of 1-D id arrays for a variable-length
        modality) -> items (out-of-range ids are clamped into the modality's range)."""
        n = self.vocab.spec(name).codes
        if isinstance(ids, (list, tuple)):
            codes = [self.vocab.codes(name, torch.as_tensor(np.asarray(x))).clamp(0, n - 1) for x in ids]
        else:
            codes = self.vocab.codes(name, torch.as_tensor(np.asarray(ids))).clamp(0, n - 1)
        return self.codec(name).decode(codes)

    def encode_images(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, tokens_per_image) vocabulary ids (int64)."""
        return self.encode_items("image", images, batch)

    def decode_images(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, tokens_per_image) vocabulary ids -> (B, H, W, 3) uint8."""
        return self.decode_items("image", ids)

    # ---- documents and prompts ------------------------------------------------------------------
    def block(self, name: str, ids) -> list[int]:
        """One item of modality `name` in the token stream: `begin`, its vocabulary ids, `end`. The one place
        this layout is written (documents and prompts both use it)."""
        return [self.vocab.begin(name), *map(int, ids), self.vocab.end(name)]

    def item_block(self, seg: ItemSegment) -> list[int]:
        """`begin`, the item's ids, `end`."""
        codes = seg.codes if seg.codes is not None else self.encode_items(seg.modality, [seg.item])[0]
        return self.block(seg.modality, codes)

    def encode_document(self, doc: Document) -> tuple[list[int], list[bool]]:
        """Document -> (ids, is_target). is_target[i] says whether ids[i] is predicted (gets loss)."""
        ids, target = [self.vocab.bos], [False]
        for seg in doc.segments:
            part = self.encode_text(seg.text) if isinstance(seg, TextSegment) else self.item_block(seg)
            ids += part
            given = 1 + seg.loss_from if isinstance(seg, ItemSegment) and seg.loss and seg.loss_from else 0
            target += [False] * given + [seg.loss] * (len(part) - given)
        ids.append(self.vocab.eos)
        target.append(bool(doc.segments) and doc.segments[-1].loss)
        return ids, target

    def prompt(self, segments: Iterable[PromptSegment], open_item: str | None = None) -> list[int]:
        """Prompt segments -> ids: `<bos>`, then each segment (text as its ids, an item as `begin` ids `end`),
        then, with `open_item="image"` (any modality's name), that modality's begin token, so that the model
        writes such an item next. No `<eos>`: the answer follows. A segment is

            "some text"                      text (encoded), as is ("text", "some text")
            ("text", [ids])                  text ids, as they are
            ("image", item)                  an item of that modality, encoded by its codec (e.g. an
                                             (H, W, 3) uint8 image); a prompt's items of one modality are
                                             encoded in one batch
            TextSegment / ItemSegment        as in documents (`ItemSegment(name, codes=ids)`: an item
                                             already encoded, its vocabulary ids)

        E.g. captioning `prompt([("image", img)])`, question answering `prompt([("image", img), question])`,
        text to image `prompt([caption], open_item="image")`, its unconditional prompt
        `prompt([], open_item="image")` (`<bos> <boi>`)."""
        v = self.vocab
        parts: list = []  # per segment: ids, or (name, index into that modality's items to encode)
        raw: dict[str, list] = {}
        for seg in segments:
            if isinstance(seg, str):
                parts.append(self.encode_text(seg))
            elif isinstance(seg, TextSegment):
                parts.append(self.encode_text(seg.text))
            elif isinstance(seg, ItemSegment):
                if seg.codes is not None:
                    parts.append(self.block(seg.modality, self._checked_ids(seg.modality, seg.codes)))
                else:
                    parts.append((seg.modality, self._queue_item(raw, seg.modality, seg.item)))
            elif isinstance(seg, tuple) and len(seg) == 2 and isinstance(seg[0], str):
                name, x = seg
                if name == "text":
                    parts.append(self.encode_text(x) if isinstance(x, str) else [int(i) for i in x])
                else:
                    parts.append((name, self._queue_item(raw, name, x)))
            else:
                raise TypeError(f"a prompt segment is text, (modality, item) or a Text/ItemSegment, not {seg!r}")
        encoded = {name: self.encode_items(name, _batch(items)) for name, items in raw.items()}
        ids = [v.bos]
        for part in parts:
            ids += self.block(part[0], encoded[part[0]][part[1]]) if isinstance(part, tuple) else part
        if open_item is not None:
            ids.append(v.begin(open_item))
        return ids

    def _queue_item(self, raw: dict[str, list], name: str, item) -> int:
        self.codec(name)  # KeyError for a modality without a codec
        raw.setdefault(name, []).append(item)
        return len(raw[name]) - 1

    def _checked_ids(self, name: str, ids) -> np.ndarray:
        """An encoded item's ids, refused (ValueError) unless they are ids of `name` of the right length."""
        ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids)
        spec, (lo, hi) = self.vocab.spec(name), self.vocab.range(name)
        if ids.ndim != 1 or (spec.tokens_per_item is not None and len(ids) != spec.tokens_per_item):
            raise ValueError(f"a {name} item is {spec.tokens_per_item} ids, got shape {ids.shape}")
        if len(ids) and (ids.min() < lo or ids.max() >= hi):
            raise ValueError(f"{name} ids must be in [{lo}, {hi}) (the vocabulary's {name} range)")
        return ids

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        self.text.save(run_dir / "text_tokenizer.json")
        for codec in self.modalities.values():
            codec.save(run_dir)
        # Codecs other than their modality's own (an imported tokenizer) are named by kind for `load`.
        kinds = {name: c.codec_kind for name, c in self.modalities.items() if getattr(c, "codec_kind", None)}
        if kinds:
            atomic_write_json(run_dir / CODECS_FILE, kinds)
        else:
            (run_dir / CODECS_FILE).unlink(missing_ok=True)
        atomic_write_json(run_dir / "vocab.json", self.vocab.to_dict())

    @classmethod
    def load(cls, run_dir: str | Path) -> "Codecs":
        """Read a run's codecs: vocab.json names the modalities, each registered plugin loads its own."""
        run_dir = Path(run_dir)
        try:
            saved = Vocabulary.from_dict(json.loads((run_dir / "vocab.json").read_text()))
        except VocabularyError as e:
            raise CheckpointError(f"{run_dir / 'vocab.json'}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{run_dir / 'vocab.json'}: missing or corrupt ({e.__class__.__name__}: {e})") from None
        try:
            kinds = json.loads((run_dir / CODECS_FILE).read_text()) if (run_dir / CODECS_FILE).is_file() else {}
        except ValueError as e:
            raise CheckpointError(f"{run_dir / CODECS_FILE}: corrupt ({e})") from None
        try:
            classes = [codec_class(kinds[m.name]) if m.name in kinds else modality_plugin(m.name).codec
                       for m in saved.modalities]
        except KeyError as e:
            where = CODECS_FILE if any(m.name in kinds for m in saved.modalities) else "vocab.json"
            raise CheckpointError(f"{run_dir / where}: {e.args[0]}") from None
        codecs = cls(TextTokenizer.load(run_dir / "text_tokenizer.json"), *(c.load(run_dir) for c in classes))
        if saved != codecs.vocab:
            raise CheckpointError(f"{run_dir}: the vocabulary layout in vocab.json does not match the saved tokenizers "
                                  f"({saved.describe_difference(codecs.vocab)}): token ids would be misread")
        return codecs
