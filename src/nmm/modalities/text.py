"""Text side of the unified vocabulary: a small byte-level BPE tokenizer and an offline English corpus.

nmm trains models from scratch, so the tokenizer is trained from scratch too, on the run's own text.
The unified vocabulary lays out ids as ``[text ids | special tokens | image codes]``, which is why
this tokenizer holds no special tokens of its own: its ids are exactly ``0 .. vocab_size - 1`` and
everything above belongs to someone else.

Byte-level BPE (the GPT-2 scheme) is used because it can encode any string without an unknown
token, and its decoder restores spacing exactly; the only lossy step is lowercasing, which keeps
the vocabulary small enough for tiny models.

``english_corpus`` supplies general English for tokenizer training and language-model pretraining
without any download: the docstrings of a fixed list of standard-library modules.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nmm.errors import CheckpointError

# A byte-level BPE always contains the 256 single-byte tokens, so smaller vocabularies cannot exist.
_BYTE_ALPHABET_SIZE = 256


class TextTokenizer:
    """A lowercasing byte-level BPE tokenizer with no special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
    ) -> TextTokenizer:
        """Learn a BPE vocabulary of at most `vocab_size` tokens from `texts`.

        The vocabulary can come out smaller when the text has too few pairs that occur
        `min_frequency` times; read `vocab_size` afterwards rather than assuming the request.
        """
        if vocab_size < _BYTE_ALPHABET_SIZE:
            raise ValueError(
                f"vocab_size must be at least {_BYTE_ALPHABET_SIZE} (one token per byte), got {vocab_size}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Lowercase()
        # add_prefix_space=False: otherwise the first word gains a space that decode cannot remove.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # Seed all 256 bytes, not just those seen in training, so any text stays encodable.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        """Turn text ids back into (lowercased) text.

        Ids outside the text range are an error rather than silently skipped: in a unified
        sequence they are special tokens or image codes, and the caller must split those out.
        """
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"ids {bad[:5]} are outside the text vocabulary 0..{self.vocab_size - 1}"
            )
        return self._tokenizer.decode(list(ids))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file, atomically so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tokenizer.to_str())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise CheckpointError(f"tokenizer file is corrupt: {path} ({e})") from e
        return cls(tokenizer)


# ---------------------------------------------------------------------------------------------
# Offline English corpus

# Pure-Python modules that import in well under a second and document themselves in prose.
# Platform-specific modules (os, socket, subprocess) are left out so the corpus is the same on
# every machine running the same Python version. Keep the list sorted and append-only in spirit:
# changing it changes every tokenizer trained on the corpus.
_CORPUS_MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "gzip", "heapq", "html.parser", "http.client",
    "inspect", "ipaddress", "itertools", "json", "logging", "operator", "pathlib", "pprint",
    "queue", "random", "shutil", "statistics", "string", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip

_MIN_PARAGRAPH_CHARS = 40
_MIN_PROSE_FRACTION = 0.85  # share of letters and spaces; code and tables fall well below this
_HELDOUT_PERCENT = 10


def english_corpus(split: str = "train") -> list[str]:
    """General English prose paragraphs, split ~90/10 into "train" and "heldout".

    The split is decided by a hash of each paragraph's text, so it does not depend on the order
    or number of paragraphs, and the two splits never share a paragraph.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f'split must be "train" or "heldout", got {split!r}')
    want_heldout = split == "heldout"
    return [p for p in _all_paragraphs() if _is_heldout(p) == want_heldout]


def _is_heldout(paragraph: str) -> bool:
    # hashlib rather than hash(): str hashes are salted per process.
    digest = hashlib.sha256(paragraph.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < _HELDOUT_PERCENT


@functools.cache
def _all_paragraphs() -> tuple[str, ...]:
    paragraphs: dict[str, None] = {}  # an ordered set: the same text is documented in many places
    with warnings.catch_warnings():
        # Merely touching some deprecated members (typing.io, typing.re) warns.
        warnings.simplefilter("ignore", DeprecationWarning)
        for docstring in _stdlib_docstrings():
            for raw in re.split(r"\n\s*\n", docstring):
                if _looks_like_prose(raw):
                    paragraphs.setdefault(" ".join(raw.split()), None)
    return tuple(paragraphs)


def _stdlib_docstrings() -> Iterable[str]:
    """Docstrings of each corpus module and of the classes, functions and methods it defines."""
    for module_name in _CORPUS_MODULES:
        module = importlib.import_module(module_name)
        yield _docstring(module)
        for _, obj in sorted(vars(module).items()):
            # Skip names the module merely imports, so each docstring comes from its home module.
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", None) != module_name:
                continue
            yield _docstring(obj)
            if inspect.isclass(obj):
                for _, member in sorted(vars(obj).items()):
                    # vars(cls) also holds plain strings such as __module__, whose __doc__
                    # would be str's own docstring, so only look at callables and properties.
                    if inspect.isroutine(member) or isinstance(
                        member, (property, classmethod, staticmethod)
                    ):
                        yield _docstring(member)


def _docstring(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    # A few classes declare __doc__ in __slots__, which makes it a descriptor rather than a str.
    return doc if isinstance(doc, str) else ""


def _looks_like_prose(paragraph: str) -> bool:
    lines = paragraph.strip().splitlines()
    if not lines or any(line.lstrip().startswith((">>>", "...")) for line in lines):
        return False
    text = " ".join(paragraph.split())
    if len(text) < _MIN_PARAGRAPH_CHARS:
        return False
    prose_chars = sum(c.isalpha() or c == " " for c in text)
    return prose_chars / len(text) >= _MIN_PROSE_FRACTION
