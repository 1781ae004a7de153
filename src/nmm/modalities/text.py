"""Text modality: a small byte-level BPE tokenizer and an offline English corpus.

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
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nmm.errors import CheckpointError
from nmm.utils import atomic_write_text

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
        vocab_size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the text vocabulary 0..{vocab_size - 1}")
        return self._tokenizer.decode(list(ids))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file, atomically so a crash never leaves half a file."""
        atomic_write_text(path, self._tokenizer.to_str())

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

# Standard-library modules that import quickly and document themselves in prose. Platform-specific
# modules (os, socket, subprocess) are left out so the corpus is the same on every machine with
# the same Python version. Editing this list changes every tokenizer trained on the corpus.
_CORPUS_MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "gzip", "heapq", "html.parser", "http.client",
    "inspect", "ipaddress", "itertools", "json", "logging", "operator", "pathlib", "pprint",
    "queue", "random", "shutil", "statistics", "string", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest.case", "urllib.parse", "zipfile",
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
    """Docstrings of each corpus module and of the public classes, functions and methods it defines.

    Private names are skipped because third-party libraries do patch them at runtime (for example
    typing_extensions replaces typing._check_generic), which would make the corpus depend on what
    else happens to be imported.
    """
    for module_name in _CORPUS_MODULES:
        module = importlib.import_module(module_name)
        yield _docstring(module)
        for obj in _public_members(module):
            # Skip names the module merely imports, so each docstring comes from its home module.
            is_definition = inspect.isclass(obj) or inspect.isroutine(obj)
            if not is_definition or getattr(obj, "__module__", None) != module_name:
                continue
            yield _docstring(obj)
            if inspect.isclass(obj):
                for member in _public_members(obj):
                    # Plain class attributes would yield the docstring of their type (str, int...).
                    if inspect.isroutine(member) or isinstance(
                        member, (property, classmethod, staticmethod)
                    ):
                        # Libraries patch methods onto stdlib classes (transformers adds
                        # Logger.warning_once); keep only methods defined by the module itself.
                        func = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                        home = getattr(func, "__module__", None)
                        if home is None or home == module_name:
                            yield _docstring(member)


def _public_members(namespace) -> list:
    return [value for name, value in sorted(vars(namespace).items()) if not name.startswith("_")]


def _docstring(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    # A few classes declare __doc__ in __slots__, which makes it a descriptor rather than a str.
    return doc if isinstance(doc, str) else ""


def _looks_like_prose(paragraph: str) -> bool:
    if any(line.lstrip().startswith((">>>", "...")) for line in paragraph.splitlines()):
        return False  # a doctest example
    text = " ".join(paragraph.split())
    if len(text) < _MIN_PARAGRAPH_CHARS:
        return False
    prose_chars = sum(c.isalpha() or c == " " for c in text)
    return prose_chars / len(text) >= _MIN_PROSE_FRACTION
