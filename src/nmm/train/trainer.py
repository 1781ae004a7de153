"""The training loop: one process or many (torchrun), resumable to the exact step.

    nmm train shapes-tiny --out runs/x train.max_steps=200
    torchrun --nproc-per-node 2 -m nmm.cli train shapes-tiny --out runs/x

Each step draws `grad_accum` packed micro-batches per rank. For in-memory data a micro-batch is a pure
function of (step, its slot in the global batch), and so is its training-time randomness: a resumed
run sees exactly the data it would have seen, on the same or another number of processes. Streaming
sources (shards) save each rank's position in the checkpoint instead. How the model is spread over
the processes (DDP, FSDP2, tensor parallel) is `nmm.train.parallel`; checkpoints `nmm.train.checkpoint`;
loss-spike handling `nmm.train.stability`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from nmm.config import RunConfig, load_config, save_config, to_dict
from nmm.data.mixture import ROLE_WRITES, PackedBatches
from nmm.data.sources import data_source
from nmm.errors import CheckpointError, ConfigError
from nmm.model.model import NativeMultimodalModel
from nmm.optim import lr_at, set_lr
from nmm.perf import count_flops, format_flops, gemm_peak
from nmm.progress import TrainProgress, progress_callback
from nmm.train import distributed as dist
from nmm.train.checkpoint import (
    CheckpointWriter,
    RunLock,
    latest_checkpoint,
    load_checkpoint,
)
from nmm.train.parallel import (
    check_parallel_config,
    clip_grad_norm,
    full_state_dict,
    no_sync,
    parallelize,
)
from nmm.train.prepare import prepare_codecs, prepare_mixture
from nmm.train.stability import SpikeGuard
from nmm.utils import (
    atomic_write_json,
    atomic_write_text,
    save_safetensors,
    seed_everything,
)

BUDGET_RECHECK_AT = 241  # train.time_budget_min: the step at which the speed is measured a second time


def check_roles(cfg: RunConfig, model: NativeMultimodalModel) -> None:
    """A model that cannot write a modality must not be given documents that teach it to."""
    if "image" in cfg.data.input_loss and cfg.model.variant != "early-discrete":
        # Other variants embed the images they read differently from the ones they write (`generated`).
        raise ConfigError(f"config key 'data.input_loss': 'image' needs discrete early fusion "
                          f"(model.fusion=early model.image_repr=discrete), not {cfg.model.variant}")
    for name, interface in model.modalities.items():
        if "M2G" in interface.capabilities:
            continue
        bad = [r for r, w in cfg.data.roles.items() if w > 0 and ROLE_WRITES.get(r) == name]
        if bad:
            raise ConfigError(f"this model reads {name} through its {cfg.model.variant_of(name)} interface, which "
                              f"cannot generate {name}: set " + " ".join(f"data.roles.{r}=0" for r in bad))


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
    """Model + loss as one forward, so DDP, FSDP2 and torch.compile wrap the whole training computation.

    `touch_all_parameters` (set for FSDP2 by `nmm.train.parallel`): every trainable parameter of the
    root group joins the loss with weight zero. FSDP2 reduce-scatters the gradients a rank has, so a
    parameter one rank did not use (the understanding encoder's projector in a batch without input
    images) would make the ranks' collectives disagree; a zero gradient is the gradient of not using it."""

    def __init__(self, model: NativeMultimodalModel, loss_weights: dict, z_loss: float):
        super().__init__()
        self.model, self.loss_weights, self.z_loss = model, loss_weights, z_loss
        self.touch_all_parameters = False

    def forward(self, ids, targets, positions, doc_ids, generated=None):
        loss, stats = self.model.loss(ids, targets, positions, doc_ids, self.loss_weights, self.z_loss, generated)
        if self.touch_all_parameters:
            # Root-group parameters are gathered (plain tensors) during this forward; blocks' are not, and
            # every block runs on every token anyway.
            touched = [p.reshape(-1)[:1].sum() for p in self.model.parameters()
                       if p.requires_grad and not isinstance(p, DTensor)]
            if touched:
                loss = loss + 0.0 * torch.stack(touched).sum()
        return loss, stats


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; appended across resumes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # Drop records past the checkpoint we resume from, so the log never shows a step twice.
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def truncate(self, step: int, keep_events: bool = True) -> None:
        """After a rollback to `step`: drop the records past it (they are trained again), but keep
        the event records that explain why."""
        if self.enabled and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line]
            keep = [line for line in lines if json.loads(line)["step"] <= step
                    or (keep_events and "event" in json.loads(line))]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# Keys a resumed run may change; anything else would silently not apply (the data, the model, the
# tokenizers and the optimizer were fixed when the run started), so it is refused by name.
RESUMABLE = ("train.max_steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.threads",
             "train.compile", "train.parallelism", "train.tp", "train.sequence_parallel", "train.dp_shard", "train.activation_checkpointing",
             "train.mixed_precision", "train.cpu_offload", "train.async_checkpoint", "train.spike_policy",
             "train.spike_factor", "train.spike_warmup", "train.spike_skip_window", "train.grad_accum",
             "data.num_workers", "data.prefetch", "eval.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("roles", "loss_weights", "shards", "modality_experts"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume_overrides(cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run continues with the config it started with; only `RESUMABLE` keys may differ."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved, now = _flat(to_dict(load_config(saved_path))), _flat(to_dict(cfg))
    changed = [k for k in now if k in saved and now[k] != saved[k] and not k.startswith(RESUMABLE)]
    if changed:
        raise ConfigError(f"{run_dir}: --resume cannot change {', '.join(changed)} (fixed when the run started; "
                          f"on resume only {', '.join(k.rstrip('.') for k in RESUMABLE)} may change). "
                          "Start a new run directory instead.")


@dataclass
class Run:
    """Everything the loop needs, built by `setup_run`."""

    model: NativeMultimodalModel
    net: torch.nn.Module  # the model + loss, wrapped for the run's parallelism and torch.compile
    eager_net: torch.nn.Module  # the same without the whole-step torch.compile: the fallback if compiling fails
    optimizer: torch.optim.Optimizer
    batches: PackedBatches  # or a source's streaming batches (same interface)
    streaming: bool  # batches index this rank's own stream (shards), not the global batch
    autocast: contextlib.AbstractContextManager
    start_step: int
    max_steps: int
    resumed: bool
    tokenizer_stats: dict
    state: dict  # the resumed checkpoint's state.json ({} for a new run)


def setup_run(cfg: RunConfig, run_dir: Path, resume: bool, show_progress: bool, info, say) -> Run:
    """Codecs (trained or loaded), data, model (pretrained parts, or the checkpoint's weights), optimizer."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise CheckpointError(f"{run_dir}: --resume given but no checkpoint found in {run_dir / 'checkpoints'}")
    if ckpt is not None:
        check_resume_overrides(cfg, run_dir)
    check_parallel_config(cfg.train, cfg.model, info.world_size, info.device)
    info.set_tensor_parallel(cfg.train.tp)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        codecs, tok_stats = prepare_codecs(cfg, run_dir, log=say,
                                         progress=lambda name: progress_callback(f"{name} tokenizer", show_progress))
    dist.barrier(info)
    if not info.is_main:
        codecs, tok_stats = prepare_codecs(cfg, run_dir, log=say)

    t_data = time.time()
    source = data_source(cfg)
    if hasattr(source, "batches"):  # a streaming source (shards): each rank reads its own part
        batches, streaming = source.batches(codecs, cfg, info.dp_rank, info.dp_size), True
        mixture = None
        say(f"data: streaming {cfg.data.source} ({time.time() - t_data:.1f}s)")
    else:
        mixture = prepare_mixture(cfg, codecs, source)
        # Rank 0's stream for everyone: micro-batch k of the *global* batch is batches.batch(k), so the
        # data of a step does not depend on how many processes share it (see `micro_batch_index`).
        batches, streaming = PackedBatches(mixture, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed, 0), False
        roles = ", ".join(f"{r} {w:.2f}" for r, w in zip(mixture.roles, mixture.weights))
        say(f"data: roles {roles} ({time.time() - t_data:.1f}s)")

    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.train.seq_len)
    # Every rank draws the same initial weights, whatever it did before (rank 0 trained the codecs):
    # FSDP2 and tensor parallelism shard each rank's own copy, nothing broadcasts them.
    torch.manual_seed(cfg.train.seed)
    model = NativeMultimodalModel(cfg.model, codecs.vocab).to(info.device)
    check_roles(cfg, model)
    if ckpt is None and mixture is not None:
        for name, interface in model.modalities.items():  # one-off pretraining (a vision encoder)
            t_pre = time.time()
            pre = interface.pretrain(mixture.pool, mixture.world, cfg.train.seed)
            if pre:
                say(f"{name} encoder pretrained: held-out cell accuracy "
                    f"{pre.get('heldout_cell_accuracy', float('nan')):.3f} ({time.time() - t_pre:.1f}s)")
                if info.is_main:
                    atomic_write_json(run_dir / ("vision_encoder.json" if name == "image" else f"{name}_encoder.json"), pre)
    v = codecs.vocab
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, vocabulary {v.size} "
        f"({', '.join([f'{v.n_text} text'] + [f'{m.codes} {m.name} codes' for m in v.modalities])})")

    net = LossModule(model, cfg.train.loss_weights, cfg.train.z_loss)
    net, eager_net = parallelize(net, model, cfg.train, info)
    optimizer = make_optimizer(model, cfg.train)  # after sharding: AdamW's state lives beside each shard
    start_step, max_steps, state = 0, cfg.train.max_steps, {}
    if ckpt is not None:
        state, rank_state = load_checkpoint(ckpt, model, optimizer, info)
        start_step = state["step"]
        # The schedule's length as saved (a time budget fixes it at step 40), unless the user extends it.
        max_steps = state["max_steps"] if cfg.train.max_steps == state.get("config_max_steps") else cfg.train.max_steps
        if max_steps != state["max_steps"]:
            say(f"max_steps {state['max_steps']} -> {max_steps}: the cosine schedule now decays to step {max_steps}")
        if streaming:
            batches.load_state_dict(rank_state.get("data", {}))
        adjust_grad_accum(cfg, state, info, say)
        say(f"resumed from {ckpt} at step {start_step}")
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else contextlib.nullcontext()
    )
    return Run(model, net, eager_net, optimizer, batches, streaming, autocast, start_step, max_steps, ckpt is not None,
               tok_stats, state)


def adjust_grad_accum(cfg: RunConfig, state: dict, info, say) -> None:
    """Resuming on another number of processes keeps the global batch: grad_accum makes up the difference."""
    slots, dp = state.get("global_micro_batches"), info.dp_size
    if slots is None or slots == dp * cfg.train.grad_accum:
        return
    if slots % dp:
        raise ConfigError(f"the checkpoint's global batch is {slots} micro-batches, which {dp} data-parallel ranks "
                          "cannot share evenly: resume on a number of processes that divides it")
    say(f"{state.get('world_size')} -> {info.world_size} processes: grad_accum {cfg.train.grad_accum} -> "
        f"{slots // dp} keeps the global batch ({slots} micro-batches)")
    cfg.train.grad_accum = slots // dp


def micro_batch_index(run: Run, data_step: int, micro: int, cfg: RunConfig, info) -> int:
    """Which batch a micro-batch trains on. In-memory data: slot `rank * grad_accum + micro` of the
    global batch of `data_step`, a pure function of the step and slot, so 4 processes, 2 processes
    with grad_accum 2, and 1 with grad_accum 4 train on the same data. Streaming data: this rank's
    own stream, consecutively."""
    if run.streaming:
        return data_step * cfg.train.grad_accum + micro
    slots = info.dp_size * cfg.train.grad_accum
    return data_step * slots + info.dp_rank * cfg.train.grad_accum + micro


def seed_micro_batch(cfg: RunConfig, data_step: int, slot: int) -> None:
    """Training-time randomness (the flow variant's noise) as a pure function of (seed, step, slot):
    exact on resume, and the same on any number of processes."""
    torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, data_step, slot]).generate_state(1)[0]))


def step_flops(run: Run, step: int, cfg: RunConfig, info) -> int:
    """FLOPs of one optimisation step (forward and backward of its micro-batches), counted on the
    eager model and the step's real batch. Gradients and random state are left as they were, so
    the run trains exactly as it would without the count."""
    batch = run.batches.batch(micro_batch_index(run, step + run.state.get("data_offset", 0), 0, cfg, info)).to(info.device)
    devices = [info.device] if info.device.type == "cuda" else []
    sharded = cfg.train.parallelism == "fsdp2" and info.enabled

    def forward_backward_once():
        args = (batch.ids, batch.targets, batch.positions, batch.doc_ids, batch.generated)
        with run.autocast:
            # FSDP2 gathers parameters in the wrapped module's forward; elsewhere the local model is cheapest.
            loss, _ = run.eager_net(*args) if sharded else run.model.loss(*args[:4], cfg.train.loss_weights,
                                                                         cfg.train.z_loss, batch.generated)
        loss.backward()

    with torch.random.fork_rng(devices=devices):
        flops = count_flops(forward_backward_once)
    run.optimizer.zero_grad(set_to_none=True)
    return flops * cfg.train.grad_accum


def forward_backward(run: Run, step: int, data_step: int, cfg: RunConfig, info, say=print) -> tuple[dict[str, float], int, float]:
    """One optimisation step's gradients: `grad_accum` micro-batches, then clipping.
    -> (mean losses by name, tokens seen by all ranks, gradient norm before clipping).

    A modality's loss is averaged over its tokens in all micro-batches (a micro-batch without any
    reports NaN and counts for nothing); a modality absent from the whole step is left out. The
    total loss is the mean over all ranks (the number every rank's spike decision reads)."""
    loss_sum, sums, counts = 0.0, {}, {}
    tokens = 0
    for micro in range(cfg.train.grad_accum):
        batch = run.batches.batch(micro_batch_index(run, data_step, micro, cfg, info)).to(info.device)
        seed_micro_batch(cfg, data_step, info.dp_rank * cfg.train.grad_accum + micro)
        with no_sync(run.net, micro == cfg.train.grad_accum - 1), run.autocast:
            loss, stats = _call(run, step, batch, say)
            (loss / cfg.train.grad_accum).backward()
        loss_sum += loss.item() / cfg.train.grad_accum
        for k, v in stats.items():
            if k.startswith("loss_"):
                count = int(stats.get("tokens_" + k[len("loss_"):], 1))
                if count:
                    sums[k] = sums.get(k, 0.0) + float(v) * count
                    counts[k] = counts.get(k, 0) + count
        tokens += int((batch.doc_ids >= 0).sum()) * info.dp_size
    grad_norm = clip_grad_norm([p for p in run.model.parameters() if p.requires_grad], cfg.train.grad_clip)
    loss_sum = dist.mean_over_ranks(info, loss_sum)
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
    lock = RunLock(run_dir) if info.is_main else contextlib.nullcontext()
    with lock:
        summary = _train(cfg, run_dir, resume, show_progress, info, say)
    dist.barrier(info)
    dist.teardown(info)
    return summary


def _train(cfg: RunConfig, run_dir: Path, resume: bool, show_progress: bool, info, say) -> dict:
    run = setup_run(cfg, run_dir, resume, show_progress, info, say)
    model, optimizer, start_step, max_steps = run.model, run.optimizer, run.start_step, run.max_steps
    if start_step >= max_steps and (run_dir / "train_summary.json").exists():
        say(f"already trained {start_step} of {max_steps} steps: nothing to do (extend it with train.max_steps=N)")
        return json.loads((run_dir / "train_summary.json").read_text())
    metrics = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start_step)
    writer = CheckpointWriter(run_dir, info, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    guard = SpikeGuard(cfg.train.spike_policy, cfg.train.spike_factor, cfg.train.spike_warmup, run.state.get("loss_ema"))
    data_offset = run.state.get("data_offset", 0)  # batches skipped by rollbacks: step s trains on data_step s + offset

    def checkpoint(at_step: int) -> None:
        state = {"max_steps": max_steps, "config_max_steps": cfg.train.max_steps, "data_offset": data_offset,
                 "loss_ema": guard.ema, "global_micro_batches": info.dp_size * cfg.train.grad_accum}
        rank_state = {"data": run.batches.state_dict()} if run.streaming else {}
        writer.save(at_step, model, optimizer, state, rank_state)

    flops = step_flops(run, start_step, cfg, info)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    peak = gemm_peak(info.device, dtype)
    layout = cfg.train.parallelism + (f" x tp {cfg.train.tp}" if cfg.train.tp > 1 else "") + (
        f" (HSDP: shards of {cfg.train.dp_shard})" if cfg.train.dp_shard else "")
    say(f"step: {flops / 1e9:.2f} GFLOP (counted: forward + backward); GEMM peak {format_flops(peak)} "
        f"(measured: {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads)"
        + (f"; {info.world_size} processes, {layout}" if info.enabled else "")
        + ("; compiling the step (the first one is slow)" if cfg.train.compile else ""))

    bar = TrainProgress(max_steps, start_step, enabled=info.is_main and show_progress)
    t_start, tokens_window, steps_window, t_window = time.time(), 0, 0, time.time()
    step, last_saved, trained, rollbacks = start_step, start_step if run.resumed else -1, 0, 0
    while step < max_steps:
        # Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps.
        lr = set_lr(optimizer, lr_at(step, cfg.train.lr, cfg.train.warmup_steps, max_steps, cfg.train.min_lr_ratio))
        stats_sum, tokens, grad_norm = forward_backward(run, step, step + data_offset, cfg, info, say)
        tokens_window += tokens
        steps_window += 1
        trained += 1
        # Timing comes before the skip below: a skipped update must not skip the measurement.
        if trained == 11:
            t_steady = time.time()  # the first steps are slow (allocation, caches): time from here
        if trained == 41:
            t_first_fix = time.time()
        # Fix the schedule length from the measured speed, so that the run fits the budget: over steps
        # 11-40 first, then once more over 41-240, so that a hiccup in the first 30 steps (another
        # process, a slow host) cannot cost a quarter of the run. The cosine schedule just follows.
        recheck = trained == BUDGET_RECHECK_AT and step + 1 < max_steps
        if cfg.train.time_budget_min and not run.resumed and (trained == 41 or recheck):
            since, n = (t_steady, 30) if trained == 41 else (t_first_fix, BUDGET_RECHECK_AT - 41)
            per_step = (time.time() - since) / n
            # Steps so far (compilation included) used part of the budget; the rest run at per_step.
            left = cfg.train.time_budget_min * 60 - (time.time() - t_start)
            budget_steps = step + 1 + int(max(left, 0.0) / per_step)
            max_steps = dist.broadcast_int(info, max(step + 2, min(cfg.train.max_steps, budget_steps)))
            bar.set_total(max_steps)
            say(f"time budget {cfg.train.time_budget_min} min at {per_step:.3f} s/step"
                + (f" (steps 41-{BUDGET_RECHECK_AT - 1})" if recheck else "") + f" -> {max_steps} steps")
        event = guard.check(step, stats_sum["loss"], grad_norm)
        if event is not None and event.action == "rolled_back" and (last_saved < 0 or rollbacks >= 5):
            event.action = "skipped"  # nothing to roll back to yet (or rolling back keeps failing)
        if event is None or event.action == "logged":
            optimizer.step()
            guard.accept(stats_sum["loss"])
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0 or step == max_steps - 1 or event is not None:
            elapsed = time.time() - t_window
            record = {"step": step + 1, **{k: _round(v) for k, v in stats_sum.items()}, "lr": lr,
                      "grad_norm": _round(grad_norm, 4), "tokens_per_s": round(tokens_window / max(elapsed, 1e-9), 1),
                      "tokens_per_s_per_device": round(tokens_window / max(elapsed, 1e-9) / info.world_size, 1),
                      "mfu": round(flops * steps_window / max(elapsed, 1e-9) / peak, 4),
                      "elapsed_s": round(time.time() - t_start, 2), **(event.record() if event else {})}
            metrics.write(record)
            bar.update(step + 1, record)
            tokens_window, steps_window, t_window = 0, 0, time.time()
        else:
            bar.update(step + 1, None)
        if event is not None and event.action != "logged":
            what = {"nonfinite_grad": "non-finite gradient norm", "nonfinite_loss": "non-finite loss"}.get(event.kind, "loss spike")
            say(f"step {step + 1}: {what}, update {event.action.replace('_', ' ')} (loss {event.loss:.4g}"
                + (f", average {event.ema:.4g})" if event.ema is not None else ")"))
        if event is not None and event.action == "rolled_back":
            # Back to the last checkpoint; the batches from it through the spike (and the window) are skipped.
            writer.wait()
            ckpt = latest_checkpoint(run_dir)
            state, _ = load_checkpoint(ckpt, model, optimizer, info)
            data_offset += step + 1 + cfg.train.spike_skip_window - state["step"]
            guard.ema, rollbacks = state.get("loss_ema"), rollbacks + 1
            say(f"rolled back to step {state['step']}; data skips ahead to batch {state['step'] + data_offset}")
            step = state["step"]
            metrics.truncate(step, keep_events=True)
            continue
        writer.poll()
        if (step + 1) % cfg.train.ckpt_every == 0 and step + 1 < max_steps:
            checkpoint(step + 1)
            last_saved = step + 1
        step += 1
    bar.close()
    final_step = max(step, start_step)
    if final_step > last_saved:
        checkpoint(final_step)
    writer.wait()
    weights = full_state_dict(model, info)  # collective under FSDP2: rank 0 receives the whole model
    if info.is_main:
        export_model(model, run_dir, weights)
    if info.enabled and cfg.train.parallelism == "ddp":
        atomic_write_json(run_dir / f"rank{info.rank}_checksum.json", {"step": final_step, "checksum": param_checksum(model)})
    summary = {
        "steps": final_step,
        "train_minutes": round((time.time() - t_start) / 60, 3),
        "params": model.num_params(),
        "final_loss": guard.ema,
        "step_gflop": round(flops / 1e9, 3),
        "gemm_peak_gflop_per_s": round(peak / 1e9, 1),
        "mfu": round(flops * trained / max(time.time() - t_start, 1e-9) / peak, 4),
        "tokenizer": run.tokenizer_stats,
        "world_size": info.world_size,
        "parallelism": layout if info.enabled else "single process",
    }
    if info.is_main:
        atomic_write_json(run_dir / "train_summary.json", summary)
    return summary


def _round(v: float, digits: int = 5) -> float | None:
    return round(v, digits) if math.isfinite(v) else None  # JSON has no NaN


def export_model(model: NativeMultimodalModel, run_dir: Path, weights: dict | None = None) -> None:
    """The final weights, beside the codecs: what `nmm.load(run_dir)` reads."""
    save_safetensors(model.state_dict() if weights is None else weights, run_dir / "model.safetensors")
    atomic_write_json(run_dir / "model.json", to_dict(model.cfg))
