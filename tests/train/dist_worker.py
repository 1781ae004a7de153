"""Run by tests/train/test_parallel.py under torchrun (2 processes, gloo): checks that need the
model's parts, not a whole training run. Writes one JSON result per rank to OUT/rank{r}.json.

1. Tensor parallelism, with and without sequence parallelism: the blocks split over 2 ranks give
   the logits of the unsplit model.
2. DDP through a batch that has no image on one rank (dense, and MoE where experts then get no
   tokens): it trains, and both ranks end with the same weights.
3. FSDP2 through the same batches, early fusion and the decoupled variant: it trains.
"""

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as tdist

from nmm.config import ModelConfig, TrainConfig, _build
from nmm.modalities.codecs import Codecs
from nmm.model.model import NativeMultimodalModel
from nmm.train import distributed as dist
from nmm.train.parallel import apply_tensor_parallel, device_mesh, parallelize
from nmm.train.trainer import LossModule, param_checksum


def batch_for(vocab, with_image: bool, T: int = 96):
    """One packed row: a caption after an image (image codes as inputs, caption as target), or text only."""
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, vocab.n_text, (T,), generator=g)
    ids = text.clone()
    if with_image:
        n = vocab.tokens_per_image
        codes = torch.randint(0, vocab.spec("image").codes, (n,), generator=g)
        ids[: n + 2] = torch.cat([torch.tensor([vocab.begin("image")]), torch.as_tensor(vocab.ids("image", codes)),
                                  torch.tensor([vocab.end("image")])])[: n + 2]
    targets = torch.cat([ids[1:], torch.tensor([-100])])
    if with_image:
        targets[: vocab.tokens_per_image + 1] = -100  # the image is an input here; only text has loss
    positions = torch.arange(T)
    return [t.unsqueeze(0) for t in (ids, targets, positions, torch.zeros(T, dtype=torch.long))] + [
        torch.zeros(1, T, dtype=torch.bool)]


def main(run_dir: Path, out: Path) -> None:
    info = dist.setup()
    codecs = Codecs.load(run_dir)
    model_cfg = _build(ModelConfig, json.loads((run_dir / "model.json").read_text()))
    result = {}

    # 1. tensor parallel logits == one process's
    torch.manual_seed(0)
    whole = NativeMultimodalModel(model_cfg, codecs.vocab)
    mesh = device_mesh(info.world_size, 2, info.device)
    ids = batch_for(codecs.vocab, True)[0][:, :95]  # odd length: the sequence shards unevenly
    for sp in (False, True):
        model = copy.deepcopy(whole)
        apply_tensor_parallel(model.backbone.blocks, mesh["tp"], sequence_parallel=sp)
        norm = model.backbone.blocks[0].attn_norm.weight
        result[f"tp_sp{int(sp)}_norm_is_dtensor"] = type(norm).__name__ == "DTensor"
        with torch.no_grad():
            result[f"tp_sp{int(sp)}_logits_max_diff"] = float((model(ids) - whole(ids)).abs().max())

    # 2. DDP where rank 1's batch has no image (dense and MoE)
    for routing in ("dense", "moe"):
        torch.manual_seed(0)
        m = NativeMultimodalModel(replace(model_cfg, routing=routing), codecs.vocab)
        net, _ = parallelize(LossModule(m, {}, 0.0), m, TrainConfig(), info)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            loss, _ = net(*batch_for(codecs.vocab, with_image=info.rank == 0))
            loss.backward()
            opt.step()
            opt.zero_grad()
        result[f"ddp_{routing}_checksum"] = param_checksum(m)

    # 3. FSDP2 where rank 1's batch has no image: the decoupled variant's understanding projector is
    #    then unused on rank 1 (its collectives used to disagree and abort gloo)
    for name, changes in (("early", {}), ("decoupled", {"image_repr": "decoupled"})):
        torch.manual_seed(0)
        m = NativeMultimodalModel(replace(model_cfg, **changes), codecs.vocab)
        net, _ = parallelize(LossModule(m, {}, 0.0), m, TrainConfig(parallelism="fsdp2"), info)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            loss, _ = net(*batch_for(codecs.vocab, with_image=info.rank == 0))
            loss.backward()
            opt.step()
            opt.zero_grad()
        result[f"fsdp2_{name}_loss"] = float(loss)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    tdist.barrier()
    dist.teardown(info)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
