"""Peak memory of importing a sharded Chameleon checkpoint: build a synthetic one, convert it in a fresh
process, report that process's peak RSS against its baseline (after imports) and the checkpoint's size.

    python tests/interop/measure_import_memory.py --mb 400 --shards 8          # a table on stdout
    python tests/interop/measure_import_memory.py --mb 64 --shards 8 --json    # one JSON line (the test)

The checkpoint has Chameleon's layout (names, shapes, a vocabulary with IMGIMG image tokens, a VQ
encoder), random fp32 weights, dimensions chosen to reach --mb, tensors dealt into --shards files in
transformers' order. Not a test itself (tests/interop/test_chameleon.py runs it small); no transformers
needed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path


def build(directory: Path, target_mb: float, n_shards: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nmm.interop.chameleon import ChameleonVQCodec, ChameleonVQConfig, image_token_name

    d, ffn, vocab_size, n_codes = (512, 1408, 4096, 1024) if target_mb < 200 else (1024, 2816, 8192, 2048)
    per_layer = 4 * d * d + 3 * d * ffn
    layers = max(1, round((target_mb * 2**20 / 4 - 2 * vocab_size * d) / per_layer))
    heads = d // 64
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({image_token_name(c): 4 + c for c in range(n_codes)})
    vocab.update({"<eoss>": 4 + n_codes, "<racm3:break>": 5 + n_codes})
    for ch in pre_tokenizers.ByteLevel.alphabet():  # a byte-level BPE with no merges; ids above it stay unnamed
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(specials)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tok.to_str())
    vq = ChameleonVQConfig(resolution=64, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
                           latent_channels=16, embed_dim=16, num_embeddings=n_codes)
    config = {"architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon", "vocab_size": vocab_size,
              "hidden_size": d, "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 0, "eos_token_id": 2,
              "pad_token_id": 1, "vocabulary_map": vocab,
              "vq_config": {k: getattr(vq, k) for k in ("resolution", "base_channels", "channel_multiplier", "num_res_blocks",
                                                        "latent_channels", "embed_dim", "num_embeddings")}}
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab_size, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "self_attn.q_norm.weight": (heads, 64), p + "self_attn.q_norm.bias": (heads, 64),
                       p + "self_attn.k_norm.weight": (heads, 64), p + "self_attn.k_norm.bias": (heads, 64),
                       p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                       p + "mlp.down_proj.weight": (d, ffn)})
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (vocab_size, d)})
    vq_tensors = {"model.vqmodel." + k: v for k, v in ChameleonVQCodec(vq).state_dict().items()}
    total = sum(4 * math.prod(s) for s in shapes.values())
    per_shard, shards, current, size = total / n_shards, [], [], 0
    for name, shape in shapes.items():  # deal tensors into shards in order, ~equal bytes each
        current.append(name)
        size += 4 * math.prod(shape)
        if size >= per_shard and len(shards) < n_shards - 1:
            shards.append(current)
            current, size = [], 0
    shards.append(current)
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(shapes[n], generator=gen) * 0.02 for n in names}
        if k == len(shards) - 1:
            tensors.update(vq_tensors)
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sizes = [(directory / f).stat().st_size for f in sorted(set(weight_map.values()))]
    return {"checkpoint_mb": round(sum(sizes) / 2**20, 1), "largest_shard_mb": round(max(sizes) / 2**20, 1),
            "largest_tensor_mb": round(4 * max(math.prod(s) for s in shapes.values()) / 2**20, 1),
            "shards": len(sizes), "layers": layers, "params": sum(math.prod(s) for s in shapes.values())}


def measure(src: Path, dst: Path, dtype: str | None) -> dict:
    """In this (fresh) process: baseline RSS after the imports, then convert; the peak from the kernel."""
    import nmm.interop.chameleon  # noqa: F401  (its imports - torch, the model, the codecs - are the baseline)
    from nmm.interop import import_hf
    from nmm.interop.common import peak_rss_mb

    from nmm.config import ModelConfig
    from nmm.interop.chameleon import ChameleonVQConfig, nmm_layout, vq_spec
    from nmm.modalities.vocab import Vocabulary

    rss = lambda: int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
    cold = rss()
    # The first model built on the meta device (the converter checks its plan against one) loads ~80 MB
    # of torch machinery, once, whatever the model's size: measured apart from the conversion.
    nmm_layout(ModelConfig(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2), Vocabulary(10, (vq_spec(ChameleonVQConfig()),)))
    warm = rss()
    summary = import_hf(src, dst, dtype=dtype)
    peak = peak_rss_mb()
    return {"baseline_mb": round(cold, 1), "meta_machinery_mb": round(warm - cold, 1), "peak_mb": round(peak, 1),
            "peak_above_baseline_mb": round(peak - cold, 1), "conversion_mb": round(peak - warm, 1),
            "seconds": summary["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=400)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--dtype", default=None, help="bf16 / fp32 / none (keep)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", nargs=2, type=Path, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.dtype)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "src"
        info = build(src, args.mb, args.shards)
        cmd = [sys.executable, __file__, "--measure", str(src), str(Path(tmp) / "run")]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(res.stderr)
        info.update(json.loads(res.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
