"""Streaming checkpoint conversion, shared by every family's adapter.

A 7B checkpoint is 14 GB in bf16; holding it in memory twice (read, then rearranged) is what makes
converters run out of memory. Here nothing is held: `Checkpoint` reads a directory's safetensors
headers (one file, or the shards a `model.safetensors.index.json` lists), and `StreamingWriter` writes
one safetensors file whose header is laid out up front, so each tensor goes straight to its place in
the file as it is read. A conversion is a list of `Piece`s (which rows of which source tensor fill
which rows of which output tensor); `convert` runs it shard by shard, reading each piece with
`safe_open` in blocks of at most `CHUNK_BYTES` rows, each through its own short-lived mapping. Peak
memory is therefore about one block (64 MiB), not a shard or the model: measured by
tests/interop/measure_import_memory.py (docs/checkpoints.md).

Row runs are what an adapter needs beyond one-to-one renames: an embedding or LM head whose rows
are reordered between two vocabularies (Chameleon's ids -> nmm's layout) is a few runs of
contiguous rows, read with `get_slice`, so a 65536-row table is never materialised whole.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nmm.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names <-> torch dtypes (the ones checkpoints use)
DTYPE_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
NAMES_OF_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
CHUNK_BYTES = 64 * 2**20  # rows read (and held) at a time by `convert`
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16" / "fp32" / "fp16" / a torch dtype / None (keep each tensor's own) -> dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in PRECISIONS:
        raise CheckpointError(f"unknown precision {dtype!r}: one of {', '.join(PRECISIONS)} (or none to keep the source's)")
    return PRECISIONS[dtype]


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from `path`, or a CheckpointError that names the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found{' (' + what + ')' if what else ''}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header ({name: {"dtype", "shape", "data_offsets"}}), read without mapping
    the file: shapes and dtypes of every tensor for the cost of a few kilobytes."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class TensorInfo:
    shard: str  # file name inside the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """The weights of a Hugging Face checkpoint directory, by name: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json`. Only headers are read here; tensors are read by
    `convert`, one shard at a time."""

    def __init__(self, directory: str | Path, shards: list[str] | None = None):
        """`shards`: read these files of `directory` instead (one file that is not model.safetensors)."""
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if shards is not None:
            shards = list(shards)
        elif index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' (tensor name -> shard file)")
            shards = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            shards = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights); "
                                  "PyTorch .bin checkpoints are not read (they unpickle)")
        self.shards = shards
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self.directory / shard
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
            for name, meta in safetensors_header(path).items():
                if meta["dtype"] not in DTYPE_NAMES:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, which nmm does not read")
                self.tensors[name] = TensorInfo(shard, DTYPE_NAMES[meta["dtype"]], tuple(meta["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {name!r}") from None

    def shard_bytes(self) -> dict[str, int]:
        return {s: (self.directory / s).stat().st_size for s in self.shards}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.tensors if n.startswith(prefix))


@dataclass(frozen=True)
class Piece:
    """Rows `src_rows` (None: all) of source tensor `src` fill output tensor `dst` from row `dst_row`.
    Only the number of elements has to agree: a (heads, head_dim) source can fill a flat output."""

    dst: str
    src: str
    dst_row: int = 0
    src_rows: tuple[int, int] | None = None


def row_runs(sources: list[int]) -> Iterator[tuple[int, int, int]]:
    """Output row i comes from source row sources[i] -> (first output row, first source row, count)
    of each run of consecutive rows: what a reordered embedding is copied in."""
    i = 0
    while i < len(sources):
        j = i + 1
        while j < len(sources) and sources[j] == sources[j - 1] + 1:
            j += 1
        yield i, sources[i], j - i
        i = j


class StreamingWriter:
    """One safetensors file written piece by piece, in any order. The layout (every tensor's dtype
    and shape) is given up front, so the header is written first and each piece is written at its
    offset; `close` checks every byte was written once and renames the file into place atomically."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout = layout
        # Largest elements first (then by name), as safetensors itself orders them: every tensor then
        # starts at a multiple of its element size.
        order = sorted(layout, key=lambda n: (-layout[n][0].itemsize, n))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        at = 0
        for name in order:
            dtype, shape = layout[name]
            size = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": NAMES_OF_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
            self.offsets[name] = at
            at += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned
        self.data_start = 8 + len(blob)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.data_start + at)
        self.written: dict[str, int] = defaultdict(int)  # bytes per tensor

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write `tensor` (any shape, the output's dtype after a cast) into `name` from row `row`."""
        shape = self.layout[name][1]
        self.write_at(name, tensor, row * (_numel(shape[1:]) if len(shape) > 1 else 1))

    def write_at(self, name: str, tensor: torch.Tensor, element: int) -> None:
        """Write `tensor`'s elements into `name` from flat element index `element`."""
        dtype, shape = self.layout[name]
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        if element + tensor.numel() > _numel(shape):
            raise CheckpointError(f"{self.path.name}: {tuple(tensor.shape)} at element {element} overflows {name!r} {shape}")
        self.file.seek(self.data_start + self.offsets[name] + element * dtype.itemsize)
        self.file.write(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
        self.written[name] += tensor.numel() * dtype.itemsize

    def close(self) -> None:
        self.file.close()
        short = [n for n, (dtype, shape) in self.layout.items() if self.written[n] != dtype.itemsize * _numel(shape)]
        if short:
            Path(self.tmp).unlink(missing_ok=True)
            raise CheckpointError(f"{self.path}: conversion left {len(short)} tensors incomplete, e.g. {short[0]!r}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, kind, *_):
        self.close() if kind is None else self.abort()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def convert(source: Checkpoint, pieces: list[Piece], writer: StreamingWriter, chunk_bytes: int | None = None) -> None:
    """Run a conversion plan, shard by shard in order, each piece in blocks of rows of at most
    `chunk_bytes` (cast to the output's dtype on the way). Each block is read through its own
    `safe_open` mapping: the pages a read touches stay resident while a file is mapped, so holding a
    shard open for all its tensors would cost the whole shard; this way a conversion needs about one
    block of memory whatever the shard or tensor sizes."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    by_shard: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_shard[source.info(piece.src).shard].append(piece)
    for shard in source.shards:
        for piece in by_shard.get(shard, ()):
            info = source.info(piece.src)
            lo, hi = piece.src_rows if piece.src_rows is not None else (0, info.shape[0] if info.shape else 1)
            row_elems = _numel(info.shape[1:])
            dst_shape = writer.layout[piece.dst][1]
            start = piece.dst_row * (_numel(dst_shape[1:]) if len(dst_shape) > 1 else 1)
            step = max(1, chunk_bytes // max(1, row_elems * info.dtype.itemsize))
            for a in range(lo, hi, step):
                with safe_open(str(source.directory / shard), framework="pt") as f:
                    tensor = f.get_slice(piece.src)[a : min(hi, a + step)] if info.shape else f.get_tensor(piece.src)
                writer.write_at(piece.dst, tensor, start + (a - lo) * row_elems)
                del tensor


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB: Linux's VmHWM, which starts afresh at exec
    (ru_maxrss keeps the parent's peak across fork + exec, so a child started by a big process would
    report its parent's size); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def unified_tokenizer_json(text_tokenizer: dict, vocab, specials: dict[str, str], code_token, bos: str,
                           source: Path) -> dict:
    """nmm's text tokenizer.json (ids 0..n_text-1, no specials) -> a tokenizer.json over a whole nmm
    vocabulary, for exported checkpoints: each special as an added special token at its nmm id
    (`specials`: nmm name -> token text), every code of modality m as a model-vocabulary token
    `code_token(m, c)` at its id (no merge makes one, so text never turns into codes), and a
    post-processor that puts `bos` in front, as Hugging Face tokenizers of causal LMs do. Every token
    is in the model vocabulary with its id: `tokenizers` gives an added token missing from it the
    next free id, whatever the JSON says."""
    model = text_tokenizer.get("model") or {}
    if not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{source}: no model vocabulary")
    table = dict(model["vocab"])
    new = {specials[name]: vocab.special(name) for name in vocab.specials}
    for m in vocab.modalities:
        lo, _ = vocab.range(m.name)
        new.update({code_token(m.name, c): lo + c for c in range(m.codes)})
    clash = sorted(set(new) & set(table))
    if clash:
        raise CheckpointError(f"{source}: the text vocabulary already has {clash[0]!r}, a token the export needs "
                              "for a special or a code")
    table.update(new)
    added = list(text_tokenizer.get("added_tokens", []))
    for name in vocab.specials:
        added.append({"id": vocab.special(name), "content": specials[name], "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    post = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [new[bos]], "tokens": [bos]}}}
    return {**text_tokenizer, "added_tokens": added, "post_processor": post, "model": {**model, "vocab": table}}


# ---- shared by the adapters' tokenizer and image-processor ports -----------------------------------
def tokenizer_over_ids(tokenizer: dict, keep: list[int], path: Path, placeholder: str = "<unused:{}>") -> dict:
    """A source BPE tokenizer.json -> the same tokenizer over nmm's text ids only: `keep[j]` is the
    source id of nmm text id j (every other source id leaves the text vocabulary: image tokens, the
    specials nmm has slots for).

    Every kept token gets its nmm id in the model vocabulary (contiguous from 0, as `tokenizers` needs:
    an added token missing from the model vocabulary is given the next free id whatever its JSON says);
    a kept id the source names no token gets `placeholder.format(id)`. Merges that would produce a
    removed token are dropped, so text never becomes one. Added tokens that stay keep their flags at
    their new ids. No post-processor, truncation or padding: nmm's prompts add `<bos>` themselves."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model.type is {model.get('type')!r}; nmm reads BPE tokenizers here")
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}
    for i, a in added.items():
        id_to_token.setdefault(i, a["content"])
    vocab: dict[str, int] = {}
    for new, old in enumerate(keep):
        token = id_to_token.get(old, placeholder.format(old))
        if token in vocab:
            raise CheckpointError(f"{path}: token {token!r} has two ids")
        vocab[token] = new
    prefix = model.get("continuing_subword_prefix") or ""
    merges = []
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a in vocab and b in vocab and a + b[len(prefix):] in vocab:
            merges.append(merge)
    new_model = {**model, "vocab": vocab, "merges": merges}
    if new_model.get("unk_token") is not None and new_model["unk_token"] not in vocab:
        new_model["unk_token"] = None
    new_id = {old: new for new, old in enumerate(keep)}
    new_added = [{**a, "id": new_id[i]} for i, a in sorted(added.items()) if i in new_id]
    return {**tokenizer, "added_tokens": new_added, "model": new_model, "post_processor": None,
            "truncation": None, "padding": None}


def load_tokenizer_json(data: dict, n_text: int, path: Path):
    """A rewritten tokenizer.json (`tokenizer_over_ids`) -> nmm's `TextTokenizer`, checked to have `n_text` ids."""
    from tokenizers import Tokenizer

    from nmm.modalities.text import TextTokenizer

    try:
        tokenizer = TextTokenizer(Tokenizer.from_str(json.dumps(data)))
    except Exception as e:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{path}: the rewritten tokenizer does not load ({e})") from None
    if tokenizer.vocab_size != n_text:
        raise CheckpointError(f"{path}: the rewritten tokenizer has {tokenizer.vocab_size} ids, expected {n_text}")
    return tokenizer


def pixel_lut(rescale: float, mean, std) -> torch.Tensor:
    """(3, 256) model input of every uint8 value per channel, rounded as transformers' image processors
    round it (`rescale` in float64, cast to float32, then `(v - mean) / std` in float32): a lookup
    gives bit-identical pixel values to the processor's."""
    v = (torch.arange(256, dtype=torch.float64) * rescale).float()[None]
    return (v - torch.tensor(mean, dtype=torch.float32)[:, None]) / torch.tensor(std, dtype=torch.float32)[:, None]
