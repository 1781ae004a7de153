"""Training throughput: nmm's model vs a Hugging Face `LlamaForCausalLM` of identical dimensions.

    nmm bench train --compile                                   # the same, from the CLI
    python benchmarks/train_throughput.py                       # the nmm demo model (shapes-demo)
    python benchmarks/train_throughput.py --steps 20 --json-out bench.json
    python benchmarks/train_throughput.py --d-model 32 --layers 2 --heads 4 --kv-heads 2 --ffn 64 --batch 2 --seq 32
    python benchmarks/train_throughput.py --compile             # + the compiled pair, in the same rounds

Both models get the same dimensions (d_model, layers, heads, kv heads, SwiGLU hidden =
intermediate_size, vocabulary, RoPE theta, RMSNorm eps, no bias, untied embeddings; nmm's QK-norm
is off so the architectures match exactly), the same batch, the same optimizer (AdamW,
fused=False as in `nmm.train.trainer`) and the same process settings (2 torch threads, flush
denormals). A training step is forward + loss + backward + AdamW step. Rows:

  nmm loss()          `NativeMultimodalModel.loss`: nmm's real training path (packed-document mask,
                      per-modality heads, factorised image head: what `nmm train` runs)
  nmm forward+CE      plain `forward` (causal, full-vocabulary logits) + cross-entropy, same model
  nmm forward+CE, unfactorised head
                      as above with `factorised_image_head=False`: exactly HF Llama's computation
  HF Llama forward+CE `LlamaForCausalLM(input_ids).logits` (sdpa) + cross-entropy

With `--compile` two more rows, the compiled pair: `nmm loss() compiled` and `HF Llama forward+CE
compiled`, each the module above through `torch.compile` (default options, the same for both),
fresh models from the same seed. Eager rows are compared with the eager HF row, compiled rows with
the compiled HF row (`baseline` in the JSON). Compilation happens in the warm-up steps.

MFU per row (`nmm.perf`): the step's FLOPs, counted once on the eager module (forward and
backward), over the median step time, over this machine's measured GEMM peak in the same dtype
and threads.

Variants are stepped in turn (A, B, C, D, D, C, B, A, ...) so machine noise is shared fairly.
tokens/s and the nmm/HF ratio come from the median step time; the JSON also has the mean, the
best (fastest) step, a per-round paired ratio and every step time: on a shared CPU the spread is
large, so look at all of them (docs/performance.md). Before timing, `parity_check` copies an nmm
model into HF Llama with `nmm_to_hf_llama` (from `nmm.bench.hf`) and asserts the logits agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The nmm -> HF conversion lives in the package (one copy, shared with `nmm bench`).
from nmm.bench.hf import hf_llama_config, make_hf_llama, nmm_to_hf_llama  # noqa: F401  (re-exported)
from nmm.config import ModelConfig
from nmm.modalities.image import image_spec
from nmm.modalities.vocab import Vocabulary
from nmm.model.model import NativeMultimodalModel
from nmm.perf import count_flops, gemm_peak

# The nmm demo model's vocabulary: 768 text ids + 5 specials + 3200 image codes (200 shapes x 16 colours).
DEMO_VOCAB = Vocabulary(768, (image_spec(3200, (200, 16), 64),))


# ---- parity ---------------------------------------------------------------------------------------
def model_config(d_model=192, layers=4, heads=6, kv_heads=2, ffn=512, seq=256, factorised=True) -> ModelConfig:
    return ModelConfig(
        d_model=d_model, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_hidden=ffn,
        max_seq_len=seq, qk_norm=False, factorised_image_head=factorised,
    )


@torch.no_grad()
def parity_check(model_cfg: ModelConfig, vocab: Vocabulary = DEMO_VOCAB, batch: int = 2, seq: int | None = None,
                 seed: int = 0, atol: float = 1e-4, weight_std: float = 0.1) -> dict:
    """nmm (unfactorised image head, and factorised) vs its `nmm_to_hf_llama` copy: max |logit diff|
    on random ids, asserted < atol."""
    seq = seq or min(model_cfg.max_seq_len, 64)
    out = {}
    for factorised in (False, True):
        cfg = ModelConfig(**{**model_cfg.__dict__, "factorised_image_head": factorised, "qk_norm": False})
        torch.manual_seed(seed)
        nmm_model = NativeMultimodalModel(cfg, vocab).eval()
        for p in nmm_model.parameters():  # larger, non-trivial weights (norm gains != 1): a wrong
            if p.dim() >= 2:              # mapping then shows as an O(1) logit difference
                p.normal_(0.0, weight_std)
            else:
                p.uniform_(0.5, 1.5)
        hf = nmm_to_hf_llama(nmm_model).eval()
        ids = torch.randint(0, vocab.size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))
        a = nmm_model(ids)
        b = hf(input_ids=ids, use_cache=False).logits
        diff = (a - b).abs().max().item()
        out["unfactorised" if not factorised else "factorised"] = diff
        if not diff < atol:
            raise AssertionError(f"parity ({'factorised' if factorised else 'unfactorised'} head): "
                                 f"max |nmm - HF| logit diff {diff:.3g} >= {atol}")
    out["max_abs_diff"] = max(out.values())
    out["atol"] = atol
    out["logit_scale"] = a.abs().max().item()
    return out


# ---- benchmark data -------------------------------------------------------------------------------
def make_batch(vocab: Vocabulary, batch: int, seq: int, seed: int = 0):
    """Random documents shaped like nmm's training data: text spans and <boi> image codes <eoi>
    blocks, one document per row (doc_ids all 0, positions 0..T-1); targets are the next ids, so
    they mix text and image ids (every position has a loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row = [vocab.bos]
        while len(row) < seq + 1:
            n_text = int(torch.randint(8, 41, (1,), generator=g))
            row += torch.randint(0, vocab.n_text, (n_text,), generator=g).tolist()
            row += [vocab.boi, *(vocab.start("image") + torch.randint(0, vocab.image_codes, (vocab.tokens_per_image,),
                                                                   generator=g)).tolist(), vocab.eoi]
        rows.append(row[: seq + 1])
    full = torch.tensor(rows, dtype=torch.long)
    ids, targets = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    positions = torch.arange(seq).expand(batch, -1).contiguous()
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    return ids, targets, positions, doc_ids


# ---- steps ----------------------------------------------------------------------------------------
class NmmLoss(torch.nn.Module):
    """nmm's training computation, as `nmm.train.trainer.LossModule` (z_loss = 0)."""

    def __init__(self, model: NativeMultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, ids, targets, positions, doc_ids):
        loss, _ = self.model.loss(ids, targets, positions, doc_ids, {"text": 1.0, "image": 1.0}, 0.0)
        return loss


class ForwardCE(torch.nn.Module):
    """Plain forward over the full vocabulary + mean cross-entropy (nmm or HF model)."""

    def __init__(self, model, hf: bool):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, ids, targets, positions, doc_ids):
        if self.hf:
            logits = self.model(input_ids=ids, use_cache=False).logits
        else:
            logits = self.model(ids)  # causal, positions 0..T-1
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Variant:
    def __init__(self, name: str, net: torch.nn.Module, params, compile: bool, autocast):
        self.name, self.params, self.compiled = name, list(params), compile
        self.eager_net = net
        self.net = torch.compile(net) if compile else net
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
        self.autocast, self.times, self.losses, self.warmup_first = autocast, [], [], None

    def step(self, batch) -> float:
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.net(*batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        return dt

    def flops(self, batch) -> int:
        """FLOPs of one forward + backward, counted on the eager module (compiling changes how, not what)."""
        def once():
            with self.autocast():
                loss = self.eager_net(*batch)
            loss.backward()
        flops = count_flops(once)
        self.opt.zero_grad(set_to_none=True)
        return flops


def build_variants(args, vocab: Vocabulary) -> list[Variant]:
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    cfg = model_config(args.d_model, args.layers, args.heads, args.kv_heads, args.ffn, args.seq, factorised=True)
    cfg_unf = model_config(args.d_model, args.layers, args.heads, args.kv_heads, args.ffn, args.seq, factorised=False)
    def nmm_loss(compile: bool) -> Variant:
        torch.manual_seed(args.seed)
        m = NativeMultimodalModel(cfg, vocab).train()
        return Variant("nmm loss()" + (" compiled" if compile else ""), NmmLoss(m), m.parameters(), compile, autocast)

    def hf_llama(compile: bool) -> Variant:
        torch.manual_seed(args.seed)
        m = NativeMultimodalModel(cfg_unf, vocab)
        hf = nmm_to_hf_llama(m).train()  # same initial weights as the unfactorised nmm model
        return Variant("HF Llama forward+CE" + (" compiled" if compile else ""), ForwardCE(hf, hf=True),
                       hf.parameters(), compile, autocast)

    variants = [nmm_loss(False)]
    torch.manual_seed(args.seed)
    m = NativeMultimodalModel(cfg, vocab).train()
    variants.append(Variant("nmm forward+CE", ForwardCE(m, hf=False), m.parameters(), False, autocast))
    if not args.skip_unfactorised:
        torch.manual_seed(args.seed)
        m = NativeMultimodalModel(cfg_unf, vocab).train()
        variants.append(Variant("nmm forward+CE (unfactorised head)", ForwardCE(m, hf=False), m.parameters(),
                                False, autocast))
    variants.append(hf_llama(False))
    if args.compile:  # the compiled pair
        variants += [nmm_loss(True), hf_llama(True)]
    return variants


# ---- main -----------------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    vocab = DEMO_VOCAB if args.vocab is None else Vocabulary(
        args.vocab[0], (image_spec(args.vocab[1] * args.vocab[2], (args.vocab[1], args.vocab[2]), args.vocab[3]),))
    cfg = model_config(args.d_model, args.layers, args.heads, args.kv_heads, args.ffn, args.seq)

    t0 = time.perf_counter()
    parity = parity_check(cfg, vocab, batch=2, seq=min(args.seq, 64), seed=args.seed)
    parity_s = time.perf_counter() - t0

    batch = make_batch(vocab, args.batch, args.seq, seed=args.seed)
    image_frac = float((batch[1] >= vocab.start("image")).float().mean())
    variants = build_variants(args, vocab)
    flops = {v.name: v.flops(batch) for v in variants}
    peak = gemm_peak("cpu", torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    for i in range(args.warmup):
        for v in variants:
            dt = v.step(batch)
            if i == 0:
                v.warmup_first = dt  # compiled variants: includes the compilation
    for v in variants:
        v.times.clear()
        v.losses.clear()
    for i in range(args.steps):
        order = variants if i % 2 == 0 else variants[::-1]  # alternate, and alternate who goes first
        for v in order:
            v.times.append(v.step(batch))

    tokens = args.batch * args.seq
    # eager rows against the eager HF row, compiled rows against the compiled one
    baselines = {v.compiled: v for v in variants if v.name.startswith("HF")}
    rows = []
    for v in variants:
        hf = baselines[v.compiled]
        hf_med, hf_mean = statistics.median(hf.times), sum(hf.times) / len(hf.times)
        med, mean = statistics.median(v.times), sum(v.times) / len(v.times)
        rows.append({
            "name": v.name,
            "compiled": v.compiled,
            "baseline": hf.name,
            "tokens_per_s": round(tokens / med, 1),  # from the median step: robust to a busy machine
            "tokens_per_s_mean": round(tokens / mean, 1),
            "tokens_per_s_best": round(tokens / min(v.times), 1),
            "ratio_vs_hf": round(hf_med / med, 3),
            "ratio_vs_hf_mean": round(hf_mean / mean, 3),
            "ratio_vs_hf_best": round(min(hf.times) / min(v.times), 3),
            # per round (all variants stepped within seconds of each other), then the median round
            "ratio_vs_hf_paired": round(statistics.median(h / t for h, t in zip(hf.times, v.times)), 3),
            "step_gflop": round(flops[v.name] / 1e9, 3),
            "mfu": round(flops[v.name] / med / peak, 4),
            "step_s_median": round(med, 4),
            "step_s_mean": round(mean, 4),
            "step_s": [round(t, 4) for t in v.times],
            "final_loss": round(v.losses[-1], 4),
            "params": sum(p.numel() for p in v.params),
        })
    import transformers

    by_name = {r["name"]: r for r in rows}
    compiled = {}
    if args.compile:
        nmm_c, hf_c = by_name["nmm loss() compiled"], by_name["HF Llama forward+CE compiled"]
        compiled = {
            "nmm_compiled_tokens_per_s": nmm_c["tokens_per_s"], "hf_compiled_tokens_per_s": hf_c["tokens_per_s"],
            "ratio_nmm_over_hf_compiled": nmm_c["ratio_vs_hf"],
            "ratio_nmm_over_hf_compiled_best": nmm_c["ratio_vs_hf_best"],
            "ratio_nmm_over_hf_compiled_paired": nmm_c["ratio_vs_hf_paired"],
            "first_warmup_step_s": {v.name: round(v.warmup_first, 2) for v in variants if v.warmup_first is not None},
        }
    hf_row = by_name["HF Llama forward+CE"]
    return {
        "config": {
            "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "ffn": args.ffn, "vocab_size": vocab.size, "image_factors": list(vocab.image_factors),
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "dtype": args.dtype, "compile": args.compile, "threads": args.threads,
            "target_image_fraction": round(image_frac, 3),
        },
        "gemm_peak_gflop_per_s": round(peak / 1e9, 1),
        "parity": {**parity, "seconds": round(parity_s, 2)},
        "rows": rows,
        "nmm_tokens_per_s": rows[0]["tokens_per_s"],
        "nmm_forward_ce_tokens_per_s": rows[1]["tokens_per_s"],
        "hf_tokens_per_s": hf_row["tokens_per_s"],
        "ratio_nmm_over_hf": rows[0]["ratio_vs_hf"],
        "ratio_nmm_forward_ce_over_hf": rows[1]["ratio_vs_hf"],
        "ratio_nmm_over_hf_best": rows[0]["ratio_vs_hf_best"],
        "ratio_nmm_over_hf_paired": rows[0]["ratio_vs_hf_paired"],
        **compiled,
        "env": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }


def format_table(result: dict) -> str:
    head = (f"{'variant':<36} {'tokens/s':>9} {'best':>7} {'mean':>7}  {'nmm/HF':>6} {'best':>6} {'mean':>6} "
            f"{'paired':>6} {'GFLOP':>6} {'MFU':>5}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['name']:<36} {r['tokens_per_s']:>9.0f} {r['tokens_per_s_best']:>7.0f} {r['tokens_per_s_mean']:>7.0f}  "
            f"{r['ratio_vs_hf']:>5.2f}x {r['ratio_vs_hf_best']:>5.2f}x {r['ratio_vs_hf_mean']:>5.2f}x "
            f"{r['ratio_vs_hf_paired']:>5.2f}x {r['step_gflop']:>6.2f} {r['mfu']:>5.0%}"
        )
    lines.append("tokens/s and nmm/HF from the median step time; best = fastest step, mean = mean step time, paired = "
                 "median of per-round ratios; compiled rows are compared with the compiled HF row; GFLOP per step "
                 f"(counted) and MFU against the measured GEMM peak of {result['gemm_peak_gflop_per_s']:.0f} GFLOP/s")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true",
                   help="add the compiled pair: nmm loss() and HF Llama forward+CE through torch.compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, nargs=4, metavar=("N_TEXT", "F0", "F1", "TOKENS_PER_IMAGE"), default=None,
                   help="vocabulary (default: the demo's 768 text ids, 200x16 image codes, 64 per image)")
    p.add_argument("--skip-unfactorised", action="store_true", help="drop the unfactorised-head nmm row")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    par = result["parity"]
    print(f"parity nmm -> HF Llama: max |logit diff| {par['max_abs_diff']:.2e} (< {par['atol']:g}) OK")
    c = result["config"]
    print(f"d_model {c['d_model']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} kv, ffn {c['ffn']}, "
          f"vocab {c['vocab_size']}; batch {c['batch']}x{c['seq']}, {c['dtype']}, compile={c['compile']}, "
          f"threads {c['threads']}; {c['steps']} timed steps each after {c['warmup']} warm-up")
    print(format_table(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
