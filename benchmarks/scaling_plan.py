"""A plan with numbers for training a ~7B native multimodal model on many GPUs (issue 14, docs/scaling.md).

Nothing here is measured. Every number is an input (printed under "assumptions", each one a flag) or
follows from the inputs by a formula written out below. Use the plan to see which configurations
fit and what to measure first, then replace the assumptions with your cluster's measured values.

    python benchmarks/scaling_plan.py                          # 7B, 1,000 H100s, seq 4096, 4M-token batches
    python benchmarks/scaling_plan.py --gpus 256 --mfu 0.4 --seq 8192 --micro-batch 2
    python benchmarks/scaling_plan.py --json                   # the same plan as one JSON object
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap

GIB, GB = 2**30, 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # the model: a Llama-7B backbone (d 4096, 32 layers, 32 heads, SwiGLU 11008) with a text + image-code vocabulary
    a("--d-model", type=int, default=4096); a("--layers", type=int, default=32)
    a("--heads", type=int, default=32); a("--kv-heads", type=int, default=32)
    a("--ffn", type=int, default=11008, help="SwiGLU hidden width")
    a("--vocab", type=int, default=65536, help="text ids + specials + image codes, one output head")
    a("--qk-norm", action=argparse.BooleanOptionalAction, default=True, help="nmm's default; saves q, k twice")
    # the data
    a("--seq", type=int, default=4096); a("--micro-batch", type=int, default=1, help="sequences per TP group")
    a("--global-batch-tokens", type=int, default=4 * 2**20, help="target; rounded to whole micro-batches")
    a("--image-tokens", type=int, default=1024, help="tokens per image (32 x 32 codes)")
    a("--image-fraction", type=float, default=0.5, help="share of the sequence's tokens that are image codes")
    a("--image-kb", type=float, default=100.0, help="stored JPEG size per image")
    a("--image-px", type=int, default=512, help="decoded side (1024 codes at 16x downsampling = 512 px)")
    # the machines
    a("--gpus", type=int, default=1000); a("--gpus-per-node", type=int, default=8)
    a("--gpu-mem-gib", type=float, default=80.0, help="H100 SXM 80 GB")
    a("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16 (the figure torchtitan's MFU uses)")
    a("--mfu", type=float, default=0.35, help="torchtitan: 33-39%% for Llama-3.1-8B on H100s (FSDP, selective AC)")
    a("--tp", default="1,2,4,8", help="tensor-parallel degrees to tabulate")
    a("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
      help="TP as torchtitan: norms sequence-parallel, embedding/head/loss split over TP (no: Megatron TP of blocks)")
    a("--hsdp", action="store_true", help="FSDP2 shards within a node only and replicates across nodes (HSDP)")
    a("--net-gbps", type=float, default=50.0, help="inter-node GB/s per GPU (400 Gb/s NDR per GPU, line rate)")
    a("--nvlink-gbps", type=float, default=450.0, help="intra-node GB/s per GPU per direction (NVLink 4, line rate)")
    a("--logit-bytes", type=float, default=8.0, help="per logit: fp32 logits + their fp32 gradient (no chunked loss)")
    a("--overhead-gib", type=float, default=4.0, help="CUDA context, NCCL buffers, allocator fragmentation")
    # checkpoints: storage scaled from Llama 3's 2 TB/s sustained for 16,384 GPUs (Dubey et al. 2024, sec. 3.3.1)
    a("--storage-gbps", type=float, default=None, help="aggregate write GB/s (default: 2000 * gpus / 16384)")
    a("--read-gbps", type=float, default=None, help="aggregate read GB/s (default: as write)")
    a("--d2h-gbps", type=float, default=25.0, help="GPU -> pinned host copy per GPU (PCIe Gen5 x16 peak is 64)")
    # failures: Llama 3 had 419 unexpected interruptions in 54 days on 16,384 H100s (Dubey et al. 2024, sec. 3.3.4)
    a("--ref-interruptions", type=float, default=419, help="interruptions seen on the reference cluster ...")
    a("--ref-days", type=float, default=54, help="... in this many days ...")
    a("--ref-gpus", type=float, default=16384, help="... on this many GPUs")
    a("--detect-min", type=float, default=10.0, help="until a hang is noticed (torch's NCCL timeout is 10 min)")
    a("--restart-min", type=float, default=5.0, help="requeue, start processes, rendezvous, NCCL init, compile")
    a("--json", action="store_true", help="print one JSON object instead of tables")
    return p.parse_args(argv)


def params(a) -> dict:
    d, kv = a.d_model, a.d_model * a.kv_heads // a.heads
    block = 2 * d * d + 2 * d * kv + 3 * d * a.ffn + 2 * d  # q, o + k, v + SwiGLU gate/up/down + 2 RMSNorms
    embed = head = a.vocab * d  # untied
    total = embed + head + a.layers * block + d
    return {"block": block, "embed": embed, "head": head, "total": total,
            "non_embedding": total - embed}  # torchtitan's MFU convention: FLOPs count all but the embedding


def act_bytes_per_token_layer(a) -> tuple[float, float]:
    """Activations one block saves for backward, bytes per token, 16-bit: (kept whole on every TP rank,
    split over the TP ranks) without sequence parallel; with it (Korthikanti sec. 4.2.2), both split.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1)
    count s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT block (4h GeLU MLP, dropout); with TP alone
    s*b*h*(10 + 24/t + 5*a*s/(h*t)). For this block: attention: RMSNorm input 2h, QKV input 2h (whole),
    q 2h, k and v 2h*kv/heads each, attention output 2h (split); QK-norm adds q and k before the norm
    (2h + 2h*kv/heads, split); MLP: RMSNorm input 2h, gate/up input 2h (whole), gate, up, silu(gate) and
    their product 2f each (split). No dropout masks, and no 5*a*s/h term (the s x s softmax):
    flash / memory-efficient SDPA saves only a logsumexp per row.
    """
    h, r = a.d_model, a.kv_heads / a.heads
    whole = 2 * h + 2 * h + 2 * h + 2 * h
    split = 2 * h + 4 * h * r + 2 * h + ((2 * h + 2 * h * r) if a.qk_norm else 0) + 8 * a.ffn
    return whole, split


def shard_group(a, tp: int) -> int:
    """DP ranks one FSDP2 shard group spans: all of them, or (HSDP) those inside one node."""
    return max(1, a.gpus_per_node // tp) if a.hsdp else a.gpus // tp


def params_per_tp_rank(a, tp: int) -> tuple[float, float]:
    """(block parameters, root parameters) one TP rank holds: the blocks are split over TP; the embedding
    and head only with --sequence-parallel (torchtitan's plan also splits them; without, they are whole)."""
    n = params(a)
    return a.layers * n["block"] / tp, (n["total"] - a.layers * n["block"]) / (tp if a.sequence_parallel else 1)


def memory(a, tp: int, ac: bool, accum: int) -> dict:
    """Peak bytes per GPU under FSDP2 (ZeRO-3) x TP on a 2D (dp, tp) mesh."""
    n, (blocks, root) = params(a), params_per_tp_rank(a, tp)
    tsp = tp if a.sequence_parallel else 1
    # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameter is the fp32 master;
    # fp32 gradient shard + Adam exp_avg and exp_avg_sq: 4 + 4 + 4 + 4 bytes per parameter
    states = 16 * (blocks + root) / shard_group(a, tp)
    # all-gathered bf16 parameters of the running block and the prefetched next one, the running block's
    # fp32 gradient before its reduce-scatter, and the root module's parameters (embedding, head) in bf16
    unsharded = (2 * 2 + 4) * n["block"] / tp + 2 * root
    if accum > 1:  # gradient sync on the last micro-batch only: the others accumulate unsharded fp32 gradients
        unsharded += 4 * (blocks + root)
    tokens = a.micro_batch * a.seq  # per TP group
    whole, split = act_bytes_per_token_layer(a)
    layer = tokens * (whole / tsp + split / tp)
    if ac:  # full per-block checkpointing: keep each block's input, recompute one block at a time in backward
        acts = a.layers * 2 * a.d_model * tokens / tsp + layer
    else:
        acts = a.layers * layer
    logits = tokens * a.vocab * a.logit_bytes / tsp  # loss parallel splits the vocabulary over TP
    total = states + unsharded + acts + logits + a.overhead_gib * GIB
    return {"tp": tp, "dp": a.gpus // tp, "ac": ac, "states_gib": states / GIB, "unsharded_gib": unsharded / GIB,
            "activations_gib": acts / GIB, "logits_gib": logits / GIB, "total_gib": total / GIB,
            "fits": total <= a.gpu_mem_gib * GIB}


def comm_s(a, tp: int, accum: int) -> dict:
    """Seconds per step each GPU spends moving bytes, at the given bandwidths (ring collectives, (n-1)/n ~ 1).

    FSDP2: every micro-batch all-gathers the bf16 weights twice (forward, backward: 2 + 2 bytes per
    parameter over TP); the fp32 gradient is reduce-scattered once per step (4 bytes; gradient sync
    only on the last micro-batch). It overlaps with compute (prefetch). HSDP adds an all-reduce of the
    gradient shard across replicas (2 x 4 bytes). TP: per block 4 collectives of the block's activations
    forward and 4 backward (all-gather / reduce-scatter with SP, or 2 + 2 all-reduces without: the same
    bytes, tokens x d x 2),
    on the critical path (no async TP); full AC's recomputed forward repeats the forward 4.
    """
    n = sum(params_per_tp_rank(a, tp))
    shard = shard_group(a, tp)

    def bw(group: int) -> float:  # a group inside one node talks over NVLink
        return (a.nvlink_gbps if group <= a.gpus_per_node else a.net_gbps) * GB

    fsdp = (accum * 4 * n + 4 * n) / bw(shard * tp) if shard > 1 else 0.0
    hsdp = 0.0 if shard * tp >= a.gpus else 2 * 4 * n / shard / a.net_gbps / GB
    tp_s = accum * a.layers * 8 * a.micro_batch * a.seq * a.d_model * 2 * (tp - 1) / tp / bw(tp)
    return {"fsdp_s": fsdp + hsdp, "tp_s": tp_s}


def young_daly(save_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises expected lost time (Young 1974; Daly 2006, first order)."""
    return math.sqrt(2 * save_s * mtbf_s)


def plan(a) -> dict:
    n = params(a)
    tps = [int(t) for t in str(a.tp).split(",")]
    a.storage_gbps = a.storage_gbps if a.storage_gbps is not None else round(2000 * a.gpus / 16384, 1)
    a.read_gbps = a.read_gbps if a.read_gbps is not None else a.storage_gbps
    # compute: 6N + 12*L*d*s per token (PaLM, app. B; torchtitan's get_num_flop_per_token): causal sparsity
    # and the recomputation of activation checkpointing are not counted, by convention
    flops_tok = 6 * n["non_embedding"] + 12 * a.layers * a.d_model * a.seq
    tok_s_gpu = a.peak_tflops * 1e12 * a.mfu / flops_tok
    rows = []
    for tp in tps:
        dp = a.gpus // tp
        accum = max(1, round(a.global_batch_tokens / (dp * a.micro_batch * a.seq)))
        batch = dp * accum * a.micro_batch * a.seq
        c = comm_s(a, tp, accum)
        for ac in (False, True):
            m = memory(a, tp, ac, accum)
            # full AC re-runs each block's forward (~1/3 more executed FLOPs): at the same hardware
            # utilisation the MFU falls to 3/4, so the compute takes 4/3 as long
            compute = batch / (tok_s_gpu * a.gpus) * (4 / 3 if ac else 1)
            tp_s = c["tp_s"] * (12 / 8 if ac else 1)
            step = max(compute + tp_s, c["fsdp_s"])  # FSDP traffic hides behind compute, TP's does not
            m.update(grad_accum=accum, global_batch_tokens=batch, compute_s=compute, tp_comm_s=tp_s,
                     fsdp_comm_s=c["fsdp_s"], step_s=step, mfu=a.mfu * batch / (tok_s_gpu * a.gpus) / step)
            rows.append(m)
    # the fastest that fits: most tokens per second (the rows' batches can differ: whole micro-batches)
    best = min((r for r in rows if r["fits"]), key=lambda r: (-r["mfu"], r["tp"]), default=None)
    step_s = (best or rows[0])["step_s"]
    tok_s = (best or rows[0])["global_batch_tokens"] / step_s
    # data: images the loader must deliver per GPU, sized for the compute-bound rate (the fastest the GPUs go)
    img_s_gpu = tok_s_gpu * a.image_fraction / a.image_tokens
    data = {"images_per_sequence": a.seq * a.image_fraction / a.image_tokens, "images_per_s_per_gpu": img_s_gpu,
            "images_per_s_per_node": img_s_gpu * a.gpus_per_node, "images_per_s_total": img_s_gpu * a.gpus,
            "jpeg_mb_per_s_per_gpu": img_s_gpu * a.image_kb * 1e3 / 1e6,
            "decoded_mb_per_s_per_gpu": img_s_gpu * a.image_px ** 2 * 3 / 1e6,
            "jpeg_mb_per_s_total": img_s_gpu * a.gpus * a.image_kb * 1e3 / 1e6,
            "pretokenised_kb_per_image": a.image_tokens * 2 / 1e3}  # uint16 codes (`nmm data pack`, tokenised)
    # checkpoints: DCP writes each rank's shards; the training state is fp32 master weights + Adam m, v
    state = 12 * n["total"]
    sync_s = state / a.gpus / (a.d2h_gbps * GB) + state / (a.storage_gbps * GB)  # everyone waits for the write
    async_block_s = state / a.gpus / (a.d2h_gbps * GB)  # async_save: only the GPU -> host copy blocks
    ckpt = {"train_state_gb": state / GB, "weights_bf16_gb": 2 * n["total"] / GB, "per_gpu_mb": state / a.gpus / 1e6,
            "write_gbps": a.storage_gbps, "read_gbps": a.read_gbps, "save_sync_s": sync_s,
            "save_async_blocking_s": async_block_s, "save_async_background_s": state / (a.storage_gbps * GB),
            "load_s": state / (a.read_gbps * GB)}
    # failures: the reference cluster's interruption rate per GPU-day, scaled to this job
    per_day = a.ref_interruptions / (a.ref_days * a.ref_gpus) * a.gpus
    mtbf = 86400 / per_day
    restart = (a.detect_min + a.restart_min) * 60 + ckpt["load_s"]
    fail = {"failures_per_day": per_day, "mtbf_h": mtbf / 3600, "restart_s": restart}
    for mode, blocking in (("sync", sync_s), ("async", async_block_s)):
        interval = young_daly(blocking, mtbf)
        if mode == "async":  # the next async save cannot start before the previous one is on storage
            interval = max(interval, ckpt["save_async_background_s"])
        steps = max(1, round(interval / step_s))
        interval = steps * step_s
        # lost fraction of wall time: saving (blocking / interval) + per failure, restart + half an interval redone
        lost = blocking / interval + (restart + interval / 2) / mtbf
        fail[mode] = {"save_blocking_s": blocking, "young_daly_s": young_daly(blocking, mtbf),
                      "interval_steps": steps, "interval_s": interval,
                      "lost_h_per_day": 24 * lost, "goodput": 1 - lost}
    compute = {"params_b": n["total"] / 1e9, "non_embedding_params_b": n["non_embedding"] / 1e9,
               "gflop_per_token": flops_tok / 1e9, "tokens_per_s_per_gpu_at_mfu": tok_s_gpu,
               "chosen": None if best is None else {"tp": best["tp"], "ac": best["ac"]},
               "global_batch_tokens": (best or rows[0])["global_batch_tokens"], "step_s": step_s,
               "mfu": (best or rows[0])["mfu"], "tokens_per_s": tok_s,
               "days_per_1t_tokens": 1e12 / tok_s / 86400}
    return {"assumptions": {k: v for k, v in vars(a).items() if k != "json"}, "memory": rows,
            "compute": compute, "data": data, "checkpoint": ckpt, "failures": fail}


def report(p: dict) -> str:
    a, c, d, k, f = p["assumptions"], p["compute"], p["data"], p["checkpoint"], p["failures"]
    out = ["assumptions (each is a flag: --name-with-dashes; --help says where each default comes from)"]
    out += textwrap.wrap("  ".join(f"{key}={val}" for key, val in a.items()), 110,
                         initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    say = out.append
    say(f"\nmodel: {c['params_b']:.2f}B parameters ({c['non_embedding_params_b']:.2f}B without the embedding), "
        f"{c['gflop_per_token']:.1f} GFLOP per token trained (6N + 12*L*d*s)")
    say(f"\nmemory per GPU (GiB) under FSDP2 (shard group: {'one node, HSDP' if a['hsdp'] else 'all DP ranks'}) "
        f"x TP ({'with' if a['sequence_parallel'] else 'without'} sequence parallel), fits if <= {a['gpu_mem_gib']:g};")
    say(f"batch in tokens; seconds per step at MFU {a['mfu']:g} (full AC: compute x 4/3); MFU: the step's, "
        "communication included")
    say(f"  {'TP':>3} {'DP':>5} {'AC':>4} {'states':>7} {'unsharded':>9} {'activ.':>7} {'logits':>7} {'total':>7} "
        f"{'fits':>5} {'accum':>5} {'batch':>6} {'compute':>8} {'TP comm':>8} {'FSDP comm':>9} {'step':>6} {'MFU':>5}")
    for r in p["memory"]:
        say(f"  {r['tp']:>3} {r['dp']:>5} {'full' if r['ac'] else 'off':>4} {r['states_gib']:7.2f} "
            f"{r['unsharded_gib']:9.2f} {r['activations_gib']:7.2f} {r['logits_gib']:7.2f} {r['total_gib']:7.2f} "
            f"{'yes' if r['fits'] else 'NO':>5} {r['grad_accum']:>5} {r['global_batch_tokens'] / 1e6:5.2f}M {r['compute_s']:8.3f} {r['tp_comm_s']:8.3f} "
            f"{r['fsdp_comm_s']:9.3f} {r['step_s']:6.3f} {r['mfu']:5.2f}")
    ch = c["chosen"]
    say(f"\nthroughput: fastest config that fits: TP {ch['tp']}, AC {'full' if ch['ac'] else 'off'}" if ch
        else "\nthroughput: NO configuration fits: raise TP, lower --micro-batch or --seq")
    say(f"  {c['global_batch_tokens']:,} tokens per step in {c['step_s']:.3f} s (MFU {c['mfu']:.2f}); "
        f"{c['tokens_per_s'] / 1e6:.2f}M tokens/s; {c['days_per_1t_tokens']:.1f} days per 1T tokens")
    say(f"  compute alone: {c['tokens_per_s_per_gpu_at_mfu']:,.0f} tokens/s per GPU at MFU {a['mfu']:g}")
    say(f"\ndata loader: {d['images_per_sequence']:g} images per sequence; at the compute-bound rate:")
    say(f"  {d['images_per_s_per_gpu']:.2f} images/s per GPU, {d['images_per_s_per_node']:.1f} per node, "
        f"{d['images_per_s_total']:,.0f} in all")
    say(f"  JPEG read {d['jpeg_mb_per_s_per_gpu']:.2f} MB/s per GPU ({d['jpeg_mb_per_s_total']:,.0f} MB/s in all); "
        f"decoded RGB {d['decoded_mb_per_s_per_gpu']:.2f} MB/s per GPU; "
        f"pre-tokenised: {d['pretokenised_kb_per_image']:.1f} KB per image")
    say(f"\ncheckpoints: training state {k['train_state_gb']:.1f} GB (fp32 weights + Adam m, v), "
        f"{k['per_gpu_mb']:.1f} MB per GPU; bf16 export {k['weights_bf16_gb']:.1f} GB")
    say(f"  storage {k['write_gbps']:.0f} GB/s write, {k['read_gbps']:.0f} GB/s read: sync save "
        f"{k['save_sync_s']:.2f} s; async blocks {k['save_async_blocking_s'] * 1e3:.1f} ms, writes "
        f"{k['save_async_background_s']:.2f} s in the background; load {k['load_s']:.2f} s")
    say(f"\nfailures: {f['failures_per_day']:.2f} per day (job MTBF {f['mtbf_h']:.1f} h); restart "
        f"{f['restart_s'] / 60:.1f} min (detect + restart + load) + half an interval redone")
    for mode in ("sync", "async"):
        m = f[mode]
        say(f"  {mode:5s}: sqrt(2 * {m['save_blocking_s']:.3g} s * MTBF) = {m['young_daly_s']:.0f} s -> "
            f"every {m['interval_steps']} steps ({m['interval_s']:.0f} s); lost {m['lost_h_per_day'] * 60:.1f} "
            f"min/day; goodput {m['goodput'] * 100:.2f}%")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = plan(a := parse_args(argv))
    print(json.dumps(p, indent=1) if a.json else report(p))
    return p


if __name__ == "__main__":
    main()
