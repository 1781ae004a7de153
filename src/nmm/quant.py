"""Weight precision at load time: fp32, bf16, and int8 weight-only quantisation of the linear layers.

    pipe = nmm.load("runs/demo", dtype="bf16")                    # every weight and activation in bf16
    pipe = nmm.load("runs/demo", dtype="int8")                    # int8 linear weights, the rest fp32
    pipe = nmm.load("runs/demo", dtype="bf16", quantize="int8")   # int8 linear weights, the rest bf16

**int8 weight-only** (`Int8Linear`): each `nn.Linear` weight W (out, in) is stored as int8 codes Q and
one floating scale per output channel, s = max|W_row| / 127, Q = round(W / s) clipped to [-127, 127]
(symmetric, no zero point): 1 byte per weight plus 4 (or 2) bytes per row, 0.25x fp32 + 1/in.
Activations stay in floating point: y = (x @ Q^T) * s (+ bias), the same function as a linear layer
with weight Q * s, within rounding. Quantised: every `nn.Linear` of the model (the backbone's q/k/v/o
and gate/up/down, the text head, code heads, projectors), except MoE routers (their discrete choice
of experts is what a small error would flip; they are tiny). Not quantised: embeddings (a lookup
reads one row per token; 8-bit tables would save memory but no compute, and are not measured here),
norms, MoE experts' stacked weights (3-D, not `nn.Linear`).

Kernels: on a CPU with bf16 / fp16 activations and `in_features % 16 == 0`, `torch._weight_int8pack_mm`
(PyTorch's fused int8-weight GEMM; it returns wrong values or crashes for other widths in torch 2.13,
hence the guard). Everywhere else (fp32 activations, CUDA) the int8 codes are converted to the
activation dtype inside the call and the output is scaled: memory at rest is int8, the matmul is the
floating-point one. (torchao's `Int8WeightOnlyConfig` does exactly this on CPU too, as a tensor
subclass that `Engine(dtype=...)` and the evaluation harness's weight fingerprint cannot handle;
docs/checkpoints.md, "Memory".)

**Loading** (`load_weights_at`): the model is built with its parameters on PyTorch's meta device (no
memory; buffers such as the RoPE tables are computed for real), then `model.safetensors` is read tensor
by tensor with plain reads (no mmap, whose touched pages would stay resident), each converted to its
precision (or quantised) and put in place. Peak memory is the model at its final precision plus one
tensor as stored; an fp32 copy of a bf16 or int8 model never exists.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nmm.errors import CheckpointError, InputError

__all__ = ["FLOAT_DTYPES", "QUANTIZE", "Int8Linear", "Precision", "load_weights_at", "quantize_int8",
           "quantize_linears", "resolve_precision", "weight_bytes"]

FLOAT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUANTIZE = ("int8",)
DTYPE_CHOICES = ("fp32", "bf16", "int8")  # what `nmm.load(dtype=...)` documents (aliases: float32, bfloat16)

# safetensors dtype names -> torch dtypes (those a checkpoint of this project can hold)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ---- precision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What a model is loaded as: `dtype` for every floating tensor that is not quantised (and so the
    activations and the KV cache), `quantize` None or "int8" (the linear layers' weights)."""

    dtype: torch.dtype = torch.float32
    quantize: str | None = None

    @property
    def name(self) -> str:
        base = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))
        if self.quantize is None:
            return base
        return self.quantize if self.dtype == torch.float32 else f"{self.quantize}+{base}"


def resolve_precision(dtype: str | torch.dtype | None = None, quantize: str | None = None) -> Precision:
    """`nmm.load`'s `dtype` ("fp32" | "bf16" | "int8", or torch.float32 / torch.bfloat16; None: fp32) and
    `quantize` (None | "int8") -> a Precision. `dtype="int8"` is `quantize="int8"` with fp32 for the
    rest. A bad value is an InputError that names the argument and its choices."""
    if quantize is not None and quantize not in QUANTIZE:
        raise InputError(f"quantize={quantize!r} is not supported: one of {', '.join(map(repr, QUANTIZE))} or None")
    if dtype is None:
        return Precision(torch.float32, quantize)
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES.values():
            raise InputError(f"dtype={dtype} is not supported: one of {', '.join(DTYPE_CHOICES)} "
                             "(or torch.float32 / torch.bfloat16)")
        return Precision(dtype, quantize)
    if not isinstance(dtype, str):
        raise InputError(f"dtype={dtype!r} is not supported: one of {', '.join(DTYPE_CHOICES)}")
    key = dtype.lower()
    if key in QUANTIZE:
        return Precision(torch.float32, key)
    if key not in FLOAT_DTYPES:
        raise InputError(f"dtype={dtype!r} is not supported: one of {', '.join(DTYPE_CHOICES)} "
                         "(int8: int8 weights of the linear layers, the rest fp32; "
                         "dtype='bf16', quantize='int8' for the rest in bf16)")
    return Precision(FLOAT_DTYPES[key], quantize)


# ---- int8 weight-only linear layers --------------------------------------------------------------
def quantize_int8(weight: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) floating weight -> (int8 codes (out, in), fp32 scales (out,)): per output channel,
    symmetric, scale = max |row| / 127 (1 for an all-zero row, so its codes are 0). `inplace`: an fp32
    `weight` may be overwritten (the loader's own read buffer: no full-size temporary)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 takes a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach()
    w = w if inplace and w.dtype == torch.float32 else w.to(torch.float32, copy=True)
    amax = w.abs().amax(dim=1) if w.numel() else torch.zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _int8pack_ok(x: torch.Tensor, in_features: int) -> bool:
    """Whether torch's fused CPU kernel gives the right answer here (bf16/fp16 activations, widths that
    are multiples of 16: other widths return wrong values or crash in torch 2.13)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and in_features % 16 == 0
            and hasattr(torch, "_weight_int8pack_mm"))


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one floating scale per output channel (buffers `qweight`,
    `scale`; an optional floating `bias` parameter). Forward: y = (x @ qweight^T) * scale + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, inplace: bool = False) -> Int8Linear:
        """Quantise a floating (out, in) weight; scales (and the bias) are kept in `dtype`. `inplace`: the
        weight may be overwritten (`quantize_int8`)."""
        codes, scale = quantize_int8(weight, inplace)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
        layer.register_buffer("qweight", codes)
        layer.register_buffer("scale", scale.to(dtype))
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        dtype = dtype or linear.weight.dtype
        return cls.from_weight(linear.weight, linear.bias, dtype).to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer computes with, (out, in), in `dtype` (default: the scales')."""
        dtype = dtype or self.scale.dtype
        return (self.qweight.to(torch.float32) * self.scale.to(torch.float32)[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _int8pack_ok(x, self.in_features):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight,
                                          self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantizable(name: str, module: nn.Module) -> bool:
    """The linear layers int8 applies to: every `nn.Linear` except MoE routers."""
    return isinstance(module, nn.Linear) and not name.split(".")[-1].startswith("router")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_linears(model: nn.Module, dtype: torch.dtype | None = None,
                     select: Callable[[str, nn.Module], bool] = quantizable) -> list[str]:
    """Replace the model's linear layers by `Int8Linear` in place (from the weights they hold) -> their
    names. `dtype`: of the scales and biases (default: each layer's weight dtype)."""
    names = [n for n, m in model.named_modules() if select(n, m)]
    for name in names:
        _set_submodule(model, name, Int8Linear.from_linear(model.get_submodule(name), dtype))
    return names


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of a model's tensors: parameters + buffers (each storage once), and the part in
    linear layers (`Int8Linear` or `nn.Linear`: weights, scales, biases)."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    linear = sum(nbytes(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
                 for _, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear)))
    rest = nbytes(list(model.parameters()) + list(model.buffers()))
    return {"total": linear + rest, "linear": linear}


# ---- loading straight into a precision -------------------------------------------------------------
@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory; `torch.nn.init`'s
    initialisers are no-ops meanwhile) while buffers (RoPE tables, index maps) are computed for real, as accelerate's
    `init_empty_weights(include_buffers=False)`: a parameter is allocated with `torch.empty` (untouched
    pages) and moved to meta as it is registered."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip(tensor, *args, **kwargs):
        return tensor

    # The initialisers are skipped too: on a meta tensor they would do nothing, but the first one run
    # imports PyTorch's meta kernels (about 72 MB of resident memory, measured), once per process.
    inits = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    nn.Module.register_parameter = register
    for name in inits:
        setattr(nn.init, name, skip)
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_", "uniform", "normal", "constant", "xavier_uniform", "xavier_normal",
                   "kaiming_uniform", "kaiming_normal", "orthogonal", "sparse")


def safetensors_entries(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, {name: {"dtype", "shape", "data_offsets"}}), from the header alone."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:  # a garbage length would ask for exabytes
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None
    header.pop("__metadata__", None)
    for name, meta in header.items():
        if meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')}, which nmm does not read")
    return 8 + n, header


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors file, one at a time, in file order, by plain reads into fresh memory
    (no mapping of the file: the pages an mmap touches stay resident until it is closed)."""
    start, header = safetensors_entries(path)
    with open(path, "rb") as f:
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = meta["data_offsets"]
            dtype, shape = _ST_DTYPES[meta["dtype"]], tuple(meta["shape"])
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: truncated (tensor {name!r})")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, t.reshape(shape)


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:  # validated against the state dict's names before: cannot happen
        raise CheckpointError(f"no parameter or buffer {name!r} in the model")


_TRIM_BYTES = 1 << 20  # after reading a tensor at least this big


def _release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim): the read buffers freed while
    loading would otherwise stay resident, since glibc serves blocks of a few MB from a heap it seldom
    shrinks. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_weights_at(model: nn.Module, path: Path, precision: Precision) -> nn.Module:
    """Fill a model built under `params_on_meta()` from a safetensors file, at `precision` (see the
    module docstring). Names and shapes are checked first, as `nmm.train.checkpoint.load_state_dict_into`
    does (older names upgraded with `model.upgrade_state_dict`). Returns the model (quantised linear
    layers replaced in place)."""
    path = Path(path)
    _, header = safetensors_entries(path)
    upgrade = getattr(model, "upgrade_state_dict", None)
    shapes = {}
    for name, meta in header.items():  # names and shapes only: upgrade a meta tensor of each
        fake = torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]], device="meta")
        for k, v in (upgrade({name: fake}) if upgrade else {name: fake}).items():
            shapes[k] = tuple(v.shape)
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if shape != tuple(own[k].shape):
            raise CheckpointError(f"{path}: '{k}' has shape {shape}, model expects {tuple(own[k].shape)}")
    shared: dict[int, list[str]] = {}  # tied parameters: one tensor under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    tied = {n: names for names in shared.values() if len(names) > 1 for n in names}
    del own

    dtype = precision.dtype
    targets = {}  # "<layer>.weight" -> "<layer>" for the linear layers to quantise
    if precision.quantize == "int8":
        targets = {f"{n}.weight": n for n, m in model.named_modules() if quantizable(n, m) and n + ".weight" not in tied}
    done: set[str] = set()
    for name, stored in read_tensors(path):
        for k, t in (upgrade({name: stored}) if upgrade else {name: stored}).items():
            if k in done:  # a tied parameter, placed under all its names already
                continue
            if k in targets:  # its bias (meta until read, or read already) moves to the new layer
                layer = model.get_submodule(targets[k])
                owned = t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # our read buffer
                _set_submodule(model, targets[k], Int8Linear.from_weight(t, layer.bias, dtype, inplace=owned))
                done.add(k)
                continue
            value = t.to(dtype) if t.is_floating_point() else t
            for alias in tied.get(k, [k]):
                _place(model, alias, value)
                done.add(alias)
        if stored.untyped_storage().nbytes() >= _TRIM_BYTES:
            del stored, t
            _release_freed_memory()  # before the next read: freed buffers must not pile up in the heap
    # Buffers built at construction (RoPE tables, latents): floating ones in the model's dtype, as
    # `model.to(dtype)` would have made them.
    for module in model.modules():
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(dtype)
    _release_freed_memory()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: weights do not match the model (not loaded: {left[:3]})")
    return model
