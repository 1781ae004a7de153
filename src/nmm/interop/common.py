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
import math
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from nmm.config import ModelConfig, RunConfig, TextCodecConfig, save_config, to_dict
from nmm.errors import CheckpointError
from nmm.modalities.codecs import CODECS_FILE
from nmm.utils import atomic_write_json, atomic_write_text, save_safetensors

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
def tokenizer_tokens(tokenizer: dict, path: Path) -> dict[int, str]:
    """A BPE tokenizer.json's tokens by id: the model vocabulary's, then added tokens' for ids it lacks;
    a CheckpointError for a tokenizer that is not BPE."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model.type is {model.get('type')!r}; nmm reads BPE tokenizers here")
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    for i, a in {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}.items():
        id_to_token.setdefault(i, a["content"])
    return id_to_token


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
    id_to_token = tokenizer_tokens(tokenizer, path)
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}
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


def uint8_images(images, resolution: int) -> torch.Tensor:
    """`images` as a (B, R, R, 3) uint8 tensor, or a ValueError naming the shape expected."""
    images = images if torch.is_tensor(images) else torch.from_numpy(np.require(np.asarray(images), requirements="W"))
    R = resolution
    if images.ndim != 4 or tuple(images.shape[1:]) != (R, R, 3) or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (B, {R}, {R}, 3), got {images.dtype} {tuple(images.shape)}")
    return images


def lut_pixels(lut: torch.Tensor, images, resolution: int) -> torch.Tensor:
    """(B, R, R, 3) uint8 -> (B, 3, R, R) float pixel values through a `pixel_lut` table."""
    x = uint8_images(images, resolution).permute(0, 3, 1, 2).long().to(lut.device)  # (B, 3, R, R)
    return torch.stack([lut[c][x[:, c]] for c in range(3)], 1)


def pixels_to_uint8(pixel_values: torch.Tensor, rescale: float, mean, std) -> np.ndarray:
    """(B, 3, R, R) float -> (B, R, R, 3) uint8, rounded as transformers' `postprocess` rounds
    (unnormalise in float32, rescale in float64, clip, truncate)."""
    x = pixel_values.detach().float().cpu().numpy()
    m = np.array([-a / b for a, b in zip(mean, std)], dtype=np.float32)
    s = np.array([1 / b for b in std], dtype=np.float32)
    x = (x - m[None, :, None, None]) / s[None, :, None, None]
    x = (x.astype(np.float64) * (1.0 / rescale)).astype(np.float32)
    return np.ascontiguousarray(x.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def images_per_call(resolution: int) -> int:
    """How many images a VQ model takes at once: a 512 px image is about 1 GB of activations."""
    return max(1, (256 * 256 * 8) // (resolution**2))


@contextmanager
def staged_dir(dst: Path, overwrite: bool, kind: str) -> Iterator[Path]:
    """A temporary directory next to `dst` to write into, renamed into place (replacing `dst`) when the
    block ends, removed when it raises; first a CheckpointError for a non-empty `dst` without `overwrite`."""
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (overwrite=True, or --overwrite, replaces it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.{kind}-"))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the run directory an importer writes ---------------------------------------------------------
def write_imported_run(src: Path, dst: Path, *, family: str, overwrite: bool, t0: float,
                       ck: Checkpoint, pieces: list[Piece], shapes: dict[str, tuple[int, ...]],
                       precision: torch.dtype | None, vq_layout: dict, vq_pieces: list[Piece], vq_config,
                       vq_files: tuple[str, str], codec_kind: str, text, vocab, cfg: ModelConfig,
                       ids, ids_file: str, source_dir: str, source_files: tuple[str, ...],
                       vocab_summary: dict, extra_summary: dict | None = None) -> dict:
    """Write an imported run directory into a temporary directory next to `dst`, renamed into place at
    the end (`overwrite`: replace a non-empty `dst`): the model's weights (`pieces` of `ck`, laid out as
    `shapes`, in `precision` or each tensor's own dtype), the VQ model's weights (`vq_pieces`, laid out
    as `vq_layout`) and config (`vq_files`: config file, weights file), the text tokenizer, vocab.json,
    codecs.json, model.json, config.yaml, the family's id map (`ids_file`), the source's `source_files`
    copied into `source_dir`, and import.json, the summary returned: `extra_summary` after "params",
    `vocab_summary` under "vocab"."""
    source_dtype = {p.dst: ck.info(p.src).dtype for p in pieces}
    layout = {n: (precision or source_dtype[n], s) for n, s in shapes.items()}
    vq_config_file, vq_weights_file = vq_files
    with staged_dir(dst, overwrite, "import") as tmp:
        with StreamingWriter(tmp / "model.safetensors", layout, {"format": "pt"}) as writer:
            convert(ck, pieces, writer)
        with StreamingWriter(tmp / vq_weights_file, vq_layout, {"format": "pt"}) as writer:
            convert(ck, vq_pieces, writer)
        atomic_write_text(tmp / vq_config_file, json.dumps(asdict(vq_config), indent=2))
        text.save(tmp / "text_tokenizer.json")
        atomic_write_json(tmp / "vocab.json", vocab.to_dict())
        atomic_write_json(tmp / CODECS_FILE, {"image": codec_kind})
        atomic_write_json(tmp / "model.json", to_dict(cfg))
        save_config(RunConfig(name=dst.name, model=cfg, text=TextCodecConfig(vocab_size=vocab.n_text)), tmp / "config.yaml")
        ids.save(tmp / ids_file)
        (tmp / source_dir).mkdir()
        copied = [f for f in source_files if (src / f).is_file()]
        for f in copied:
            shutil.copy2(src / f, tmp / source_dir / f)
        summary = {"source": str(src.resolve()), "family": family,
                   "params": sum(math.prod(s) for s in shapes.values()), **(extra_summary or {}),
                   "shards": len(ck.shards), "source_bytes": sum(ck.shard_bytes().values()),
                   "largest_shard_bytes": max(ck.shard_bytes().values()),
                   "dtype": str(precision or next(iter(source_dtype.values()))).replace("torch.", ""),
                   "vocab": vocab_summary,
                   "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                   "source_files": copied}
        atomic_write_json(tmp / "import.json", summary)
    return summary


def take(table: torch.Tensor, ids):
    """`table[ids]` for an id map: a tensor (on `ids`' device), an array, a list or tuple (-> list) or one id (-> int)."""
    if torch.is_tensor(ids):
        return table.to(ids.device)[ids]
    if isinstance(ids, np.ndarray):
        return table.numpy()[ids]
    if isinstance(ids, (list, tuple)):
        return table[torch.as_tensor(ids, dtype=torch.long)].tolist()
    return int(table[int(ids)])


# ---- VQGAN building blocks, with transformers' module names (Chameleon's, Emu3's and Janus's VQ-VAEs) ----
def swish(x):
    return x * torch.sigmoid(x)  # written out, as transformers does (F.silu rounds differently)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W): attention over the H*W positions, in transformers' op order
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        w = torch.bmm(q.reshape(B, C, H * W).permute(0, 2, 1), k.reshape(B, C, H * W)) * (int(C) ** (-0.5))
        w = F.softmax(w, dim=2)
        out = torch.bmm(v.reshape(B, C, H * W), w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original VQGAN


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---- an image codec's files in a run directory -----------------------------------------------------
def save_vq(tensors: dict[str, torch.Tensor], config, run_dir: str | os.PathLike, files: tuple[str, str]) -> None:
    """Write a VQ codec's weights and its config (a dataclass) as `files` (config file, weights file)."""
    path = Path(run_dir)
    config_file, weights_file = files
    save_safetensors(tensors, path / weights_file)
    atomic_write_text(path / config_file, json.dumps(asdict(config), indent=2))


def read_vq_weights(cls, cfg, weights: Path, what: str) -> tuple[nn.Module, dict, dict]:
    """(`cls(cfg)` built on the meta device, the tensors of `weights`, the codec's own state dict), or a
    CheckpointError naming the file (`what`: whose weights, for the message) when it is missing or
    lacks one of the codec's tensors."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found ({what}'s weights)")
    with torch.device("meta"):
        codec = cls(cfg)
    tensors = load_file(str(weights))
    own = codec.state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    return codec, tensors, own
