"""`nmm bench loader`: how fast the shard loader delivers training batches.

Packs `samples` scenes of the shapes world into shards (`nmm data pack`), then times
`StreamingBatches` (read the tar, decode PNGs, encode with the image tokenizer, draw roles, pack
rows) with `data.num_workers` 0, 1 and 2, and `PackedBatches` over the same images pre-tokenised
in memory, which is the ceiling: it only draws and packs. Each variant returns `batches` batches
after a first one that is timed apart (it includes starting the worker processes and the first
chunk's decoding). samples/s counts the documents in the returned rows.

The codecs are a text tokenizer trained on the shards' captions and an image tokenizer with its
initial weights: encoding costs the same whatever the weights learned. The consumer does nothing
with a batch, so the numbers are the loader's own ceiling; while a model trains, the workers
prepare batches in the time its steps take.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from nmm.config import load_config
from nmm.data.mixture import DocumentMixture, PackedBatches
from nmm.data.pack import pack
from nmm.data.shards import ShardSource
from nmm.modalities.codecs import Codecs, untrained_codec
from nmm.modalities.text import TextTokenizer


def _time(batches, n: int) -> dict:
    """Time `batches.batch(0)` apart, then batches 1..n."""
    t0 = time.perf_counter()
    first = batches.batch(0)
    t_first = time.perf_counter() - t0
    docs = tokens = 0
    t1 = time.perf_counter()
    for i in range(1, n + 1):
        b = batches.batch(i)
        docs += int((b.doc_ids.max(dim=1).values + 1).sum())
        tokens += int((b.doc_ids >= 0).sum())
    seconds = time.perf_counter() - t1
    return {"first_batch_s": round(t_first, 4), "batches": n, "seconds": round(seconds, 4),
            "batches_per_s": round(n / seconds, 2), "samples_per_s": round(docs / seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "docs_per_batch": round(docs / n, 2),
            "batch_shape": list(first.ids.shape)}


def run_loader(samples: int = 2000, shard_size: int = 100, batches: int = 40, workers: tuple[int, ...] = (0, 1, 2),
               batch_size: int = 16, seq_len: int = 256, prefetch: int = 2, threads: int = 2, log=print) -> dict:
    """The loader's throughput on packed shapes shards (see the module docstring) -> a JSON-able dict."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="nmm-bench-loader-") as tmp:
        out = Path(tmp) / "shards"
        t0 = time.perf_counter()
        report = pack("shapes", out, count=samples, shard_size=shard_size, show_progress=False)
        log(f"packed {report['kept']} scenes into {len(report['shards'])} shards ({time.perf_counter() - t0:.1f} s)")
        cfg = load_config("shapes-demo", ["data.source=shards", f"data.shards={json.dumps({report['pattern']: 1.0})}",
                                          f"train.batch_size={batch_size}", f"train.seq_len={seq_len}",
                                          f"data.prefetch={prefetch}"])
        source = ShardSource(cfg)
        codecs = Codecs(TextTokenizer.train(source.texts(), vocab_size=cfg.text.vocab_size),
                        untrained_codec("image", cfg).eval())
        results: dict = {"samples": report["kept"], "shards": len(report["shards"]), "batch_size": batch_size,
                         "seq_len": seq_len, "prefetch": prefetch, "threads": threads, "variants": {}}
        for n in workers:
            cfg.data.num_workers = n
            stream = source.batches(codecs, cfg)
            results["variants"][f"streaming, {n} workers"] = row = _time(stream, batches)
            stream.close()
            log(f"StreamingBatches num_workers={n}: {row['samples_per_s']:.0f} samples/s, "
                f"{row['batches_per_s']:.1f} batches/s (first batch {row['first_batch_s']:.2f} s)")
        mixture = DocumentMixture(cfg.data, codecs, source.roles(codecs, cfg.data))
        results["variants"]["PackedBatches, in memory"] = row = _time(
            PackedBatches(mixture, batch_size, seq_len, cfg.train.seed), batches)
        log(f"PackedBatches (pool of {len(mixture.pool or source.image_pool)} in memory): "
            f"{row['samples_per_s']:.0f} samples/s, {row['batches_per_s']:.1f} batches/s")
    return results


def format_table(result: dict) -> str:
    title = (f"loader throughput: {result['samples']} shapes samples in {result['shards']} shards, batch "
             f"{result['batch_size']} x {result['seq_len']}, prefetch {result['prefetch']}, {result['threads']} threads")
    lines = [title, f"{'variant':<28}{'samples/s':>11}{'batches/s':>11}{'tokens/s':>11}{'first batch s':>15}"]
    for name, r in result["variants"].items():
        lines.append(f"{name:<28}{r['samples_per_s']:>11.0f}{r['batches_per_s']:>11.1f}{r['tokens_per_s']:>11.0f}"
                     f"{r['first_batch_s']:>15.2f}")
    return "\n".join(lines)
