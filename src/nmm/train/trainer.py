"""The training loop: one process or many (torchrun), resumable to the exact step.

    nmm train shapes-tiny --out runs/x train.max_steps=200
    torchrun --nproc-per-node 2 -m nmm.cli train shapes-tiny --out runs/x

Each step draws `grad_accum` packed micro-batches per rank; batch indices are a pure function of
(step, rank), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from nmm.config import RunConfig, save_config, to_dict
from nmm.data.mixture import PackedBatches
from nmm.errors import CheckpointError, ConfigError
from nmm.model.model import NativeMultimodalModel
from nmm.optim import lr_at, set_lr
from nmm.perf import count_flops, format_flops, gemm_peak
from nmm.progress import TrainProgress, progress_callback
from nmm.train import distributed as dist
from nmm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nmm.train.prepare import prepare_codecs, prepare_mixture
from nmm.utils import (
    atomic_write_json,
    atomic_write_text,
    save_safetensors,
    seed_everything,
)


def check_roles(cfg: RunConfig, model: NativeMultimodalModel) -> None:
    """A model that cannot write images must not be given documents that teach it to."""
    if all("M2G" in interface.capabilities for interface in model.modalities.values()):
        return
    bad = [r for r in ("generation", "edit") if cfg.data.roles.get(r, 0) > 0]
    if bad:
        raise ConfigError(f"model.fusion={cfg.model.fusion} reads images but cannot generate them: set "
                          + " ".join(f"data.roles.{r}=0" for r in bad))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on norms and other vectors; embeddings and matrices decay. Frozen parts
    # (a late-fusion encoder) are left out.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=False)


def param_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LossModule(torch.nn.Module):
    """Model + loss as one forward, so DDP and torch.compile wrap the whole training computation."""

    def __init__(self, model: NativeMultimodalModel, loss_weights: dict, z_loss: float):
        super().__init__()
        self.model, self.loss_weights, self.z_loss = model, loss_weights, z_loss

    def forward(self, ids, targets, positions, doc_ids, generated=None):
        return self.model.loss(ids, targets, positions, doc_ids, self.loss_weights, self.z_loss, generated)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; appended across resumes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Drop records past the checkpoint we resume from, so the log never shows a step twice.
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


@dataclass
class Run:
    """Everything the loop needs, built by `setup_run`."""

    model: NativeMultimodalModel
    net: torch.nn.Module  # the model + loss, wrapped by DDP and torch.compile as configured
    eager_net: torch.nn.Module  # the same without torch.compile: the fallback if compiling fails
    optimizer: torch.optim.Optimizer
    batches: PackedBatches
    autocast: contextlib.AbstractContextManager
    start_step: int
    max_steps: int
    resumed: bool
    tokenizer_stats: dict


def setup_run(cfg: RunConfig, run_dir: Path, resume: bool, show_progress: bool, info, say) -> Run:
    """Codecs (trained or loaded), data, model (pretrained parts, or the checkpoint's weights), optimizer."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"{run_dir}: --resume given but no checkpoint found in {run_dir / 'checkpoints'}")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        codecs, tok_stats = prepare_codecs(cfg, run_dir, log=say,
                                         progress=lambda name: progress_callback(f"{name} tokenizer", show_progress))
    dist.barrier(info)
    if not info.is_main:
        codecs, tok_stats = prepare_codecs(cfg, run_dir, log=say)

    t_data = time.time()
    mixture = prepare_mixture(cfg, codecs)
    batches = PackedBatches(mixture, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed, info.rank)
    roles = ", ".join(f"{r} {w:.2f}" for r, w in zip(mixture.roles, mixture.weights))
    say(f"data: roles {roles} ({time.time() - t_data:.1f}s)")

    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    model = NativeMultimodalModel(cfg.model, codecs.vocab).to(info.device)
    check_roles(cfg, model)
    if ckpt is None:
        for name, interface in model.modalities.items():  # one-off pretraining (a vision encoder)
            t_pre = time.time()
            pre = interface.pretrain(mixture.pool, mixture.world, cfg.train.seed)
            if pre:
                say(f"{name} encoder pretrained: held-out cell accuracy "
                    f"{pre.get('heldout_cell_accuracy', float('nan')):.3f} ({time.time() - t_pre:.1f}s)")
                if info.is_main:
                    atomic_write_json(run_dir / ("vision_encoder.json" if name == "image" else f"{name}_encoder.json"), pre)
    optimizer = make_optimizer(model, cfg.train)
    start_step, max_steps = 0, cfg.train.max_steps
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start_step, max_steps = state["step"], state["max_steps"]
        say(f"resumed from {ckpt} at step {start_step}")
    v = codecs.vocab
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, vocabulary {v.size} "
        f"({', '.join([f'{v.n_text} text'] + [f'{m.codes} {m.name} codes' for m in v.modalities])})")

    net = LossModule(model, cfg.train.loss_weights, cfg.train.z_loss)
    # Experts, modality-specific weights and frozen encoders may get no gradient in a given step.
    sparse = cfg.model.routing != "dense" or cfg.model.variant != "early-discrete"
    net = DistributedDataParallel(net, find_unused_parameters=sparse) if info.enabled else net
    compiled = torch.compile(net) if cfg.train.compile else net
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else contextlib.nullcontext()
    )
    return Run(model, compiled, net, optimizer, batches, autocast, start_step, max_steps, ckpt is not None, tok_stats)


def step_flops(run: Run, step: int, cfg: RunConfig, info) -> int:
    """FLOPs of one optimisation step (forward and backward of its micro-batches), counted on the
    eager model and the step's real batch. Gradients and random state are left as they were, so
    the run trains exactly as it would without the count."""
    batch = run.batches.batch(step * cfg.train.grad_accum).to(info.device)
    devices = [info.device] if info.device.type == "cuda" else []

    def forward_backward_once():
        with run.autocast:
            loss, _ = run.model.loss(batch.ids, batch.targets, batch.positions, batch.doc_ids,
                                     cfg.train.loss_weights, cfg.train.z_loss, batch.generated)
        loss.backward()

    with torch.random.fork_rng(devices=devices):
        flops = count_flops(forward_backward_once)
    run.optimizer.zero_grad(set_to_none=True)
    return flops * cfg.train.grad_accum


def forward_backward(run: Run, step: int, cfg: RunConfig, info, say=print) -> tuple[dict[str, float], int, float]:
    """One optimisation step's gradients: `grad_accum` micro-batches, then clipping.
    -> (mean losses by name, tokens seen by all ranks, gradient norm before clipping).

    A modality's loss is averaged over its tokens in all micro-batches (a micro-batch without any
    reports NaN and counts for nothing); a modality absent from the whole step is left out."""
    loss_sum, sums, counts = 0.0, {}, {}
    tokens = 0
    for micro in range(cfg.train.grad_accum):
        batch = run.batches.batch(step * cfg.train.grad_accum + micro).to(info.device)
        sync = contextlib.nullcontext()
        if info.enabled and micro < cfg.train.grad_accum - 1:
            sync = run.net.no_sync()
        with sync, run.autocast:
            loss, stats = _call(run, step, batch, say)
            (loss / cfg.train.grad_accum).backward()
        loss_sum += loss.item() / cfg.train.grad_accum
        for k, v in stats.items():
            if k.startswith("loss_"):
                count = int(stats.get("tokens_" + k[len("loss_"):], 1))
                if count:
                    sums[k] = sums.get(k, 0.0) + float(v) * count
                    counts[k] = counts.get(k, 0) + count
        tokens += int((batch.doc_ids >= 0).sum()) * info.world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip).item()
    return {"loss": loss_sum, **{k: sums[k] / counts[k] for k in sums}}, tokens, grad_norm


def _call(run: Run, step: int, batch, say):
    """The model + loss on one micro-batch. A compiled step that fails to compile (on a CPU, inductor
    needs a C++ compiler) falls back to eager with a note, once, at the first step: a real error in
    the model then surfaces from the eager call."""
    args = (batch.ids, batch.targets, batch.positions, batch.doc_ids, batch.generated)
    if run.net is run.eager_net or step != run.start_step:
        return run.net(*args)
    try:
        return run.net(*args)
    except Exception as e:  # noqa: BLE001  (any compiler failure; the eager call re-raises real errors)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        say(f"train.compile: torch.compile failed ({type(e).__name__}: {first}); training eager instead")
        run.net = run.eager_net
        return run.net(*args)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True, log=print) -> dict:
    run_dir = Path(run_dir)
    info = dist.setup()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.set_flush_denormal(True)  # denormals made CPU training up to 2x slower
    seed_everything(cfg.train.seed)
    say = log if info.is_main else (lambda *a, **k: None)
    run = setup_run(cfg, run_dir, resume, show_progress, info, say)
    model, optimizer, start_step, max_steps = run.model, run.optimizer, run.start_step, run.max_steps
    metrics = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start_step)

    flops = step_flops(run, start_step, cfg, info)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    peak = gemm_peak(info.device, dtype)
    say(f"step: {flops / 1e9:.2f} GFLOP (counted: forward + backward); GEMM peak {format_flops(peak)} "
        f"(measured: {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads)"
        + ("; compiling the step (the first one is slow)" if cfg.train.compile else ""))

    bar = TrainProgress(max_steps, start_step, enabled=info.is_main and show_progress)
    t_start, tokens_window, steps_window, t_window = time.time(), 0, 0, time.time()
    step = start_step
    loss_ema = None
    for step in range(start_step, max_steps):
        # Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps.
        lr = set_lr(optimizer, lr_at(step, cfg.train.lr, cfg.train.warmup_steps, max_steps, cfg.train.min_lr_ratio))
        stats_sum, tokens, grad_norm = forward_backward(run, step, cfg, info, say)
        tokens_window += tokens
        steps_window += 1
        # Timing comes before the skip below: a skipped update must not skip the measurement.
        if step == start_step + 10:
            t_steady = time.time()  # the first steps are slow (allocation, caches): time from here
        if cfg.train.time_budget_min and step == start_step + 40 and not run.resumed:
            # Fix the schedule length from the measured speed: the run then fits the budget.
            per_step = (time.time() - t_steady) / 30
            # Steps so far (compilation included) used part of the budget; the rest run at per_step.
            left = cfg.train.time_budget_min * 60 - (time.time() - t_start)
            budget_steps = step + 1 + int(max(left, 0.0) / per_step)
            max_steps = dist.broadcast_int(info, max(step + 2, min(cfg.train.max_steps, budget_steps)))
            bar.set_total(max_steps)
            say(f"time budget {cfg.train.time_budget_min} min at {per_step:.3f} s/step -> {max_steps} steps")
        if not math.isfinite(grad_norm):
            # A non-finite gradient would poison AdamW's moments: skip the update, keep going.
            optimizer.zero_grad(set_to_none=True)
            say(f"step {step}: non-finite gradient norm, update skipped")
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_ema = stats_sum["loss"] if loss_ema is None else 0.95 * loss_ema + 0.05 * stats_sum["loss"]
        spike = stats_sum["loss"] > 2.0 * loss_ema and step > start_step + 20
        if (step + 1) % cfg.train.log_every == 0 or step == max_steps - 1 or spike:
            elapsed = time.time() - t_window
            record = {"step": step + 1, **{k: round(v, 5) for k, v in stats_sum.items()}, "lr": lr,
                      "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens_window / max(elapsed, 1e-9), 1),
                      "mfu": round(flops * steps_window / max(elapsed, 1e-9) / peak, 4),
                      "elapsed_s": round(time.time() - t_start, 2)}
            if spike:
                record["loss_spike"] = True
            metrics.write(record)
            bar.update(step + 1, record)
            tokens_window, steps_window, t_window = 0, 0, time.time()
        else:
            bar.update(step + 1, None)
        if info.is_main and (step + 1) % cfg.train.ckpt_every == 0 and step + 1 < max_steps:
            save_checkpoint(run_dir, step + 1, model, optimizer, {"max_steps": max_steps}, cfg.train.keep_checkpoints)
        if step + 1 >= max_steps:
            break
    bar.close()
    final_step = max(step + 1, start_step)
    if info.is_main:
        save_checkpoint(run_dir, final_step, model, optimizer, {"max_steps": max_steps}, cfg.train.keep_checkpoints)
        export_model(model, run_dir)
    if info.enabled:
        atomic_write_json(run_dir / f"rank{info.rank}_checksum.json", {"step": final_step, "checksum": param_checksum(model)})
    summary = {
        "steps": final_step,
        "train_minutes": round((time.time() - t_start) / 60, 3),
        "params": model.num_params(),
        "final_loss": loss_ema,
        "step_gflop": round(flops / 1e9, 3),
        "gemm_peak_gflop_per_s": round(peak / 1e9, 1),
        "mfu": round(flops * (final_step - start_step) / max(time.time() - t_start, 1e-9) / peak, 4),
        "tokenizer": run.tokenizer_stats,
        "world_size": info.world_size,
    }
    if info.is_main:
        atomic_write_json(run_dir / "train_summary.json", summary)
    dist.barrier(info)
    dist.teardown(info)
    return summary


def export_model(model: NativeMultimodalModel, run_dir: Path) -> None:
    """The final weights, beside the codecs: what `nmm.load(run_dir)` reads."""
    save_safetensors(model.state_dict(), run_dir / "model.safetensors")
    atomic_write_json(run_dir / "model.json", to_dict(model.cfg))
