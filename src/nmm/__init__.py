"""nmm: native multimodal models. One transformer reads and writes interleaved text and image tokens."""

__version__ = "0.1.0"


def load(path, device=None, dtype=None, quantize=None):
    """Load a run directory: returns a `Pipeline` (model, codecs, generate/caption/answer/edit).
    `dtype`: "fp32" (default) | "bf16" | "int8"; `quantize`: None | "int8" (see `nmm.api.load`)."""
    from nmm.api import load as _load

    return _load(path, device, dtype=dtype, quantize=quantize)
