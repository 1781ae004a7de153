"""How one model is spread over the processes torchrun starts: DDP, FSDP2 and tensor parallelism,
through PyTorch's own stack (DeviceMesh, DTensor, `fully_shard`, `parallelize_module`), as torchtitan
does. The model is written for one device; everything here wraps it from outside.

    train.parallelism=ddp        every rank holds the whole model; gradients are all-reduced
    train.parallelism=fsdp2      every block (and the rest, at the root) is sharded over the ranks:
                                 parameters are gathered per block for its forward and backward
    train.tp=2                   with fsdp2: the ranks form a (data, tensor) mesh; each block's q/k/v,
                                 output, gate/up and down projections are split by heads / hidden
                                 width over the tensor dimension (Megatron's column / row split), and
                                 FSDP2 shards over the data dimension
    train.dp_shard=8             with fsdp2: shard within groups of 8 data-parallel ranks (a node) and
                                 replicate across the groups: HSDP, all-gathers stay inside a node

Options on top: `train.activation_checkpointing` (recompute each block in the backward instead of
keeping its activations), `train.mixed_precision` (FSDP2: bf16 parameters and compute, fp32 gradient
reduction), `train.cpu_offload` (FSDP2 keeps parameters and optimizer state in CPU memory; GPU only),
and `train.compile` (per block under FSDP2, the whole step otherwise).

A rank whose batch has no image, no audio or no token for some expert must not leave the others
waiting for a gradient that never comes. Every loss term runs its head even on zero positions
(`nmm.model.fusion.base.loss_rows`), so a dense model's parameters all get a (zero) gradient; the
routed and multi-interface models may leave parameters out of a step's graph, so DDP is told to look
for them (`find_unused_parameters`), and under FSDP2 the loss module adds every root-group parameter
with weight zero (`LossModule.touch_all_parameters`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from nmm.config import TrainConfig
from nmm.errors import ConfigError

PARALLELISMS = ("ddp", "fsdp2")

# DTensor warns at every 2-D reduction that a flattened mesh would take one collective, not two: true,
# and irrelevant at the one scalar per step (the gradient norm) where nmm meets it.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

# Tensor-parallel plan of one dense block (nmm.model.layers.Block): module name -> split.
# q/k/v and gate/up split their output features (heads, hidden units) over the tensor ranks; the
# output and down projections split their input features and all-reduce their output.
TP_PLAN = {"attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise", "attn.wo": "rowwise",
           "ffn.w_gate": "colwise", "ffn.w_up": "colwise", "ffn.w_down": "rowwise"}


def check_parallel_config(cfg: TrainConfig, model_cfg, world_size: int, device: torch.device) -> None:
    """Refuse a parallel layout that cannot work, naming the key, before anything is built."""
    if cfg.parallelism not in PARALLELISMS:
        raise ConfigError(f"config key 'train.parallelism': '{cfg.parallelism}' is not one of {', '.join(PARALLELISMS)}")
    if cfg.tp < 1 or world_size % cfg.tp:
        raise ConfigError(f"config key 'train.tp': {cfg.tp} must divide the number of processes ({world_size})")
    dp = world_size // cfg.tp
    if cfg.dp_shard < 0 or (cfg.dp_shard and dp % cfg.dp_shard):
        raise ConfigError(f"config key 'train.dp_shard': {cfg.dp_shard} must divide the data-parallel ranks "
                          f"({world_size} processes / tp {cfg.tp} = {dp})")
    if cfg.dp_shard and cfg.parallelism != "fsdp2":
        raise ConfigError("train.dp_shard shards FSDP2's groups (HSDP): set train.parallelism=fsdp2")
    if cfg.tp > 1:
        if cfg.parallelism != "fsdp2":
            raise ConfigError("train.tp > 1 composes with FSDP2 on a (data, tensor) mesh: set train.parallelism=fsdp2")
        if model_cfg.routing != "dense":
            raise ConfigError(f"train.tp > 1 splits dense blocks; model.routing={model_cfg.routing} is not supported "
                              "with tensor parallelism (use train.tp=1: FSDP2 shards experts and towers)")
        if cfg.sequence_parallel and model_cfg.uses_cross_attention:
            raise ConfigError("train.sequence_parallel shards the stream between blocks, which mid fusion's "
                              "cross-attention layers read whole: set train.sequence_parallel=false")
        if getattr(model_cfg, "qk_norm_kind", "rms") != "rms":
            raise ConfigError(f"train.tp > 1 splits heads; model.qk_norm_kind={model_cfg.qk_norm_kind} keeps "
                              "per-head weights for all heads (imported Chameleon): use train.tp=1")
        for key in ("n_heads", "n_kv_heads", "ffn_hidden"):
            if getattr(model_cfg, key) % cfg.tp:
                raise ConfigError(f"train.tp={cfg.tp} must divide model.{key}={getattr(model_cfg, key)}")
    if cfg.cpu_offload and (cfg.parallelism != "fsdp2" or device.type != "cuda"):
        raise ConfigError("train.cpu_offload moves FSDP2's parameters to CPU memory: it needs "
                          "train.parallelism=fsdp2 on GPUs (on a CPU they are in CPU memory already)")
    if cfg.mixed_precision and cfg.parallelism != "fsdp2":
        raise ConfigError("train.mixed_precision is FSDP2's bf16-parameter policy: set train.parallelism=fsdp2 "
                          "(for DDP or one process use train.dtype=bf16, autocast)")


def device_mesh(world_size: int, tp: int, device: torch.device, dp_shard: int = 0) -> DeviceMesh:
    """The ranks as a (dp_replicate, dp_shard, tp) grid; tensor-parallel ranks are neighbours (one
    node, fast links), then the ranks one FSDP2 group shards over."""
    dp = world_size // tp
    shard = dp_shard or dp
    return init_device_mesh(device.type, (dp // shard, shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """What `fully_shard` takes: a 1-D mesh shards; a 2-D (replicate, shard) mesh is HSDP."""
    return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def apply_tensor_parallel(blocks: nn.ModuleList, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Megatron's split of every block over the tensor ranks (`TP_PLAN`). With `sequence_parallel`
    the residual stream between the projections is sharded along the sequence too (Korthikanti et
    al. 2022): the norms run on a rank's T / tp positions, the row-parallel outputs reduce-scatter
    instead of all-reduce, and the inputs of attention and FFN are all-gathered; activation memory
    outside the projections drops by tp. The stream enters the first block whole and leaves the last whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    for i, block in enumerate(blocks):
        if not sequence_parallel:
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            parallelize_module(block, tp_mesh, {name: styles[kind]() for name, kind in TP_PLAN.items()})
            continue
        plan = {name: ColwiseParallel() if kind == "colwise" else RowwiseParallel(output_layouts=Shard(1),
                                                                                    use_local_output=False)
                for name, kind in TP_PLAN.items()}
        # Block.forward calls attn(x, cos, sin, mask, cache, start) and ffn(x, modality).
        plan.update({
            "attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None, None, None),
                                       use_local_output=True),
            "ffn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                      use_local_output=True),
        })
        parallelize_module(block, tp_mesh, plan)
        # Transformer.forward calls block(h, cos, sin, mask, cache, start, modality).
        if i == 0:
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None, None, None, None),
                desired_input_layouts=(Shard(1), None, None, None, None, None, None)))
        if i == len(blocks) - 1:
            parallelize_module(block, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                   desired_output_layouts=Replicate()))


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Each block recomputes its forward during the backward: activation memory of one block, not all.
    The wrapper keeps parameter names unchanged in state dicts (checkpoints load either way)."""
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp2(root: nn.Module, blocks: nn.ModuleList, dp_mesh: DeviceMesh, cfg: TrainConfig) -> None:
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    kwargs = {"mesh": dp_mesh}
    if cfg.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by the backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(root, **kwargs)  # embeddings, heads, modality interfaces: one group at the root


def parallelize(net: nn.Module, model: nn.Module, cfg: TrainConfig, info) -> tuple[nn.Module, nn.Module]:
    """Wrap `net` (the model + loss) for this run's parallelism; `model` is the module inside it.
    -> (what the training step calls, the same without a whole-step torch.compile: the fallback if
    compiling fails). FSDP2 compiles per block, in place, so both are the same module there."""
    check_parallel_config(cfg, model.cfg, info.world_size, info.device)
    blocks = model.backbone.blocks
    if cfg.parallelism == "fsdp2" and info.enabled:
        mesh = device_mesh(info.world_size, cfg.tp, info.device, cfg.dp_shard)
        if cfg.tp > 1:
            apply_tensor_parallel(blocks, mesh["tp"], cfg.sequence_parallel)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(blocks)
        if cfg.compile:
            for block in blocks:
                block.compile()
        # The root group is the loss module: its forward (not the model's) is what the step calls.
        apply_fsdp2(net, blocks, fsdp_mesh(mesh), cfg)
        net.touch_all_parameters = True  # see LossModule: FSDP2 needs every rank's gradients to match
        return net, net
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if info.enabled:
        # Experts, modality-specific towers and frozen encoders may get no gradient in a given step.
        sparse = model.cfg.routing != "dense" or model.cfg.variant != "early-discrete"
        net = DistributedDataParallel(net, find_unused_parameters=sparse)
    return (torch.compile(net) if cfg.compile else net), net


def no_sync(net: nn.Module, last_micro: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step (gradient accumulation)."""
    inner = getattr(net, "_orig_mod", net)
    if isinstance(inner, DistributedDataParallel) and not last_micro:
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2's root module
        inner.set_requires_gradient_sync(last_micro)
    return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm over every rank's shards and return it (before clipping).

    Plain tensors (one process, DDP, or replicated across tensor ranks) count as they are; DTensor
    shards are summed over their mesh with `full_tensor()` of the squared norm (one scalar per parameter)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # Sum squares per (mesh, placements) group, then one reduction per group: DTensor shards of FSDP2
    # (data mesh) and of tensor parallelism (2-D mesh) sum over their ranks; plain tensors are whole.
    groups: dict = {}
    for g in grads:
        sq = g.detach().float().pow(2).sum()
        key = (sq.device_mesh, sq.placements) if isinstance(sq, DTensor) else None
        groups.setdefault(key, []).append(sq)
    parts = []
    for key, squares in groups.items():
        total = torch.stack(squares).sum()
        parts.append(total.full_tensor() if key is not None else total)
    total = torch.stack(parts).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype) if not isinstance(g, DTensor) else coef.item())
    return float(total)


def full_state_dict(model: nn.Module, info) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered onto rank 0 in CPU memory (collective; others get {})."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
