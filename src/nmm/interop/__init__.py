"""Checkpoints of other projects in and out of nmm: `import_hf` and `export_hf`.

One adapter module per model family (like torchtitan's `state_dict_adapter.py`), each mapping that
family's Hugging Face checkpoint to an nmm run directory and back; `nmm.interop.common` holds the
streaming reader and writer they share. The family of a source directory is its config.json's
`model_type`.

    from nmm.interop import import_hf, export_hf
    import_hf("~/models/chameleon-7b", "runs/chameleon-7b", dtype="bf16")
    import_hf("~/models/Emu3-Gen-hf", "runs/emu3-gen", dtype="bf16")      # fixed 512 px images (image_size=...)
    import_hf("~/models/Janus-Pro-7B", "runs/janus-pro-7b", dtype="bf16")  # SigLIP in, VQ codes out
    pipe = nmm.load("runs/chameleon-7b")
    export_hf("runs/chameleon-7b", "out/chameleon-7b-hf")

This package sits at the top of the core (beside nmm.serve): it may use everything below it.
"""

from __future__ import annotations

from pathlib import Path

from nmm.errors import CheckpointError
from nmm.interop.common import read_json

FAMILIES = ("chameleon", "emu3", "janus")  # model_type values import_hf reads
EXPORT_FAMILIES = ("chameleon", "llama")  # llama: Llama, or Qwen3 with QK-norm


def import_hf(src_dir: str | Path, dst_run: str | Path, dtype: str | None = None, overwrite: bool = False,
              image_size: int | None = None) -> dict:
    """A local Hugging Face checkpoint directory -> an nmm run directory (`nmm.load` reads it). The
    family comes from config.json's model_type. `dtype`: "bf16" / "fp32" / None (keep the checkpoint's).
    `image_size` (Emu3 only): the run's fixed image side in pixels (default: what Emu3's processor gives
    a square picture, 512 for the released checkpoints); Chameleon's and Janus's are fixed by their models.
    Returns a summary (parameters, shards, seconds, peak RSS), also saved as import.json in the run."""
    src = Path(src_dir).expanduser()
    kind = read_json(src / "config.json", "a Hugging Face model directory's config").get("model_type")
    if kind == "chameleon":
        if image_size is not None:
            raise CheckpointError(f"{src / 'config.json'}: a Chameleon checkpoint's image size is its VQ model's "
                                  f"resolution; image_size applies to Emu3 only")
        from nmm.interop.chameleon import import_chameleon

        return import_chameleon(src, Path(dst_run).expanduser(), dtype=dtype, overwrite=overwrite)
    if kind == "emu3":
        from nmm.interop.emu3 import import_emu3

        return import_emu3(src, Path(dst_run).expanduser(), dtype=dtype, overwrite=overwrite, image_size=image_size)
    if kind == "janus":
        if image_size is not None:
            raise CheckpointError(f"{src / 'config.json'}: a Janus checkpoint's image size is its vision model's "
                                  f"(vision_config.image_size); image_size applies to Emu3 only")
        from nmm.interop.janus import import_janus

        return import_janus(src, Path(dst_run).expanduser(), dtype=dtype, overwrite=overwrite)
    raise CheckpointError(f"{src / 'config.json'}: model_type {kind!r} is not one nmm imports ({', '.join(FAMILIES)})")


def export_hf(run_dir: str | Path, dst_dir: str | Path, family: str | None = None, dtype: str | None = None,
              overwrite: bool = False) -> dict:
    """An nmm run -> a Hugging Face checkpoint directory computing the same logits. `family`:

    - "chameleon": `ChameleonForConditionalGeneration` (early fusion, discrete images, Chameleon's
      per-head LayerNorm QK-norm: an imported Chameleon goes back exactly);
    - "llama": `LlamaForCausalLM` without QK-norm, `Qwen3ForCausalLM` with nmm's RMSNorm QK-norm, over
      the whole vocabulary (codes as ordinary ids);
    - None: "chameleon" for a run with Chameleon's QK-norm, else "llama"."""
    run, dst = Path(run_dir).expanduser(), Path(dst_dir).expanduser()
    if family is None:
        model = read_json(run / "model.json", "the run's model config")
        family = "chameleon" if model.get("qk_norm_kind") == "layernorm-per-head" else "llama"
    if (run / "model.json").is_file() and read_json(run / "model.json").get("image_repr") == "janus":
        raise CheckpointError(f"{run}: a Janus run (model.image_repr=janus: SigLIP, aligners and an MLP image head) "
                              "does not export; neither Chameleon's nor Llama's format has its image modules")
    if family not in EXPORT_FAMILIES:
        raise CheckpointError(f"export family {family!r}: one of {', '.join(EXPORT_FAMILIES)}")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: exists and is not empty (overwrite=True, or --overwrite, replaces it)")
    if family == "chameleon":
        from nmm.interop.chameleon import export_chameleon

        return export_chameleon(run, dst, dtype=dtype, overwrite=overwrite)
    from nmm.interop.llama import export_llama

    return export_llama(run, dst, dtype=dtype)


__all__ = ["EXPORT_FAMILIES", "FAMILIES", "export_hf", "import_hf"]
