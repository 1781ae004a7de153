"""`nmm bench`: inference ratios against Hugging Face and the server's scaling, measured in one run.

    nmm bench decode --run shapes-demo --out bench-decode.json
    nmm bench image  --run runs/demo
    nmm bench server --run shapes-demo
    nmm bench all    --run shapes-demo --compile --out bench.json   # eager and compiled pairs
    nmm bench train  --compile                                     # training step and MFU vs HF Llama
    nmm bench video  --run runs/demo-video                         # seconds per clip vs HF generate
    nmm bench loader                                               # shard loader samples/s at 0/1/2 workers
    nmm bench parallel                                             # step time and loss tolerance: DDP, FSDP2, TP
    nmm bench memory runs/demo                                     # fp32 / bf16 / int8: memory, logit error, accuracy
    nmm bench tokenizer --minutes 10                               # the general image tokenizer: PSNR, code usage

Each subcommand prints a table and writes JSON: {"target": ..., "<benchmark>": {...}}, with every
timing, the ratios and whether the goal was met. TARGET is a run directory (its trained weights) or
a preset name (random weights at that config, as `nmm serve PRESET`): speed does not depend on
what the weights learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

bench_app = typer.Typer(no_args_is_help=True, help=__doc__.split("\n\n")[0] + "\n\nSee `nmm bench COMMAND --help` "
                                                    "for what each one measures.")
console = Console()

Run = Annotated[str, typer.Option("--run", help="A run directory, or a preset name for random weights at that "
                                                "config (like `nmm serve`).")]
Out = Annotated[Path | None, typer.Option(help="JSON file to write (default: bench-<benchmark>.json).")]
Quick = Annotated[bool, typer.Option(help="A few seconds each: smaller batches, fewer tokens and repeats (for tests; "
                                          "the numbers mean little).")]
Threads = Annotated[int, typer.Option(help="torch threads for nmm and HF alike (decode/image), and of the server "
                                           "process (server; 0: torch's default).")]
Repeats = Annotated[int | None, typer.Option(help="Timed rounds per batch size (default 5; --quick: 1).")]
Compile = Annotated[bool, typer.Option("--compile", help=(
    "Also the compiled pair (decode/image): nmm's Engine(compile=True) vs HF generate with a static cache and a "
    "compiled decode step (both compiled in the untimed warm-up), in the same rounds as the eager pair."))]
Stream = Annotated[bool, typer.Option("--stream", help="Server: streamed requests, adding time to first token and time "
                                                       "per output token (the server then wakes per token).")]

# The settings behind --quick: enough to exercise every code path, not to measure anything.
QUICK = {
    "decode": {"batches": (1, 2), "new_tokens": 8, "repeats": 1, "warmup": 0},
    "image": {"batches": (1,), "repeats": 1, "warmup": 0},
    "server": {"clients": (1, 2), "requests_per_level": 4, "warmup_requests": 1, "max_tokens": 8},
    "speech": {"batches": (1, 2), "utterances": 2, "repeats": 1, "warmup": 0, "max_text_tokens": 8,
               "max_audio_tokens": 8},
    "video": {"batches": (1, 2), "clips": 2, "repeats": 1, "warmup": 0, "max_text_tokens": 8, "max_tokens": 8},
}


def _load(run: str):
    from nmm.bench.common import load_target

    pipe, name = load_target(run)
    console.print(f"model: {name} ({pipe.model.num_params() / 1e6:.2f} M parameters)")
    return pipe


def _decode(pipe, quick: bool, threads: int, repeats: int | None, new_tokens: int, compile: bool) -> dict:
    from nmm.bench.decode import run_decode

    kw = dict(QUICK["decode"]) if quick else {"new_tokens": new_tokens}
    if repeats:
        kw["repeats"] = repeats
    return run_decode(pipe, threads=threads, compile=compile, log=console.print, **kw)


def _image(pipe, quick: bool, threads: int, repeats: int | None, compile: bool) -> dict:
    from nmm.bench.image import run_image

    kw = dict(QUICK["image"]) if quick else {}
    if repeats:
        kw["repeats"] = repeats
    return run_image(pipe, threads=threads, compile=compile, log=console.print, **kw)


def _server(run: str, quick: bool, requests: int, max_tokens: int, threads: int = 1, stream: bool = False) -> dict:
    from nmm.bench.server import run_server

    kw = dict(QUICK["server"]) if quick else {"requests_per_level": requests, "max_tokens": max_tokens}
    return run_server(run, threads=threads if threads > 0 else None, stream=stream, log=console.print, **kw)


def _finish(results: dict, run: str, quick: bool, out: Path | None, default_name: str) -> None:
    from nmm.bench.common import write_json
    from nmm.bench.report import TABLES

    for name, result in results.items():
        console.print(TABLES[name](result))
    path = out or Path(f"bench-{default_name}.json")
    write_json(path, {"target": run, "quick": quick, **results})
    console.print(f"wrote {path}")


@bench_app.command("decode")
def decode(run: Run = "shapes-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
           repeats: Repeats = None, compile: Compile = False,
           new_tokens: Annotated[int, typer.Option(help="New tokens per sequence.")] = 64):
    """Text decoding tokens/s at batch 1 and 8: nmm's Engine vs Hugging Face `generate`, same weights.

    The nmm model is copied into HF (LlamaForCausalLM, or Qwen3ForCausalLM when it has QK-norm) and
    the logits are checked to match (max |diff| < 1e-4) before anything is timed. Both decode the
    same prompts greedily for exactly NEW_TOKENS tokens (eos disallowed), text ids only; the table
    also says whether both produced the same tokens. Pairs: eager nmm vs eager HF; with --compile
    also Engine(compile=True) vs HF generate(cache_implementation="static") with a compiled decode
    step. Goal (compiled pair): nmm >= 2x HF at batch 1."""
    _finish({"decode": _decode(_load(run), quick, threads, repeats, new_tokens, compile)}, run, quick, out, "decode")


@bench_app.command("image")
def image(run: Run = "shapes-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
          repeats: Repeats = None, compile: Compile = False):
    """Seconds per image with classifier-free guidance: nmm's generate_images vs HF `generate`, same weights.

    Caption -> 64 image codes + <eoi> with CFG scale 2 -> pixels, at batch 1 and 8. nmm runs
    `Pipeline.generate_images`; HF runs `generate` with `guidance_scale` (its unconditional branch
    is `<bos> <boi>`, as nmm's) and a logits processor allowing only image codes, then <eoi>. The
    logits are checked to match first; decoding is greedy on both sides, so the images must be
    identical (the table says whether they are). Pairs: eager nmm vs eager HF (stock CFG; the table
    adds HF with the unconditional prompts batched, as nmm does); with --compile also
    Engine(compile=True) vs HF with batched CFG, a static cache and a compiled decode step.
    Goal (compiled pair): nmm >= 2x faster at batch 1."""
    _finish({"image": _image(_load(run), quick, threads, repeats, compile)}, run, quick, out, "image")


@bench_app.command("server")
def server(run: Run = "shapes-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
           requests: Annotated[int, typer.Option(help="Requests per concurrency level.")] = 128,
           max_tokens: Annotated[int, typer.Option(help="Length of every answer (max_tokens = min_tokens).")] = 32,
           stream: Stream = False):
    """Requests/s, tokens/s and p50/p99 latency of `nmm serve` at 1, 8 and 32 concurrent clients.

    Starts `nmm serve RUN` on 127.0.0.1 as a subprocess and drives it over HTTP: every client sends
    the same greedy chat completion until REQUESTS have been answered at that level; every answer is
    exactly MAX_TOKENS tokens (min_tokens / ignore_eos, as vLLM's benchmark; checked), so the levels
    load the batched decoder. A 429 (queue full) is retried after a pause and counted. Goal:
    requests/s at 32 clients >= 10x one client. The server runs with THREADS torch threads (default
    1, as decode and image). --quick: 1 and 2 clients, 4 requests of 8 tokens."""
    _finish({"server": _server(run, quick, requests, max_tokens, threads, stream)}, run, quick, out, "server")


@bench_app.command("speech")
def speech(run: Run = "speech-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
           repeats: Repeats = None):
    """Real-time factors of speech recognition and synthesis: nmm's Engine vs HF `generate`, same weights.

    Held-out voices' speech is transcribed (audio codes -> text until <eos>), and their texts are spoken
    (text -> audio codes until <eoa>), greedily on both sides at batch 1 and 8; the logits are checked to
    match first and the table says whether both produced the same tokens. RTF = compute seconds / audio
    seconds. The codec's encoder and the Griffin-Lim vocoder are timed on their own."""
    from nmm.bench.speech import run_speech

    kw = dict(QUICK["speech"]) if quick else {}
    if repeats:
        kw["repeats"] = repeats
    result = run_speech(_load(run), threads=threads, log=console.print, **kw)
    _finish({"speech": result}, run, quick, out, "speech")


@bench_app.command("video")
def video(run: Run = "video-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
          repeats: Repeats = None):
    """Seconds per clip for text -> clip and clip captioning: nmm's Engine vs HF `generate`, same weights.

    Captions of moving-shapes clips are turned into clips (greedy, video codes until <eov>) and clips are
    captioned (until <eos>), at batch 1 and 8 on both sides; the logits are checked to match first and the
    table says whether both produced the same tokens. Decoding codes to frames is timed on its own."""
    from nmm.bench.video import run_video
    from nmm.config import load_config

    kw = dict(QUICK["video"]) if quick else {}
    if repeats:
        kw["repeats"] = repeats
    cfg = load_config(str(Path(run) / "config.yaml") if Path(run).is_dir() else run)
    result = run_video(_load(run), cfg, threads=threads, log=console.print, **kw)
    _finish({"video": result}, run, quick, out, "video")


@bench_app.command("train")
def train(out: Out = None, quick: Quick = False, compile: Annotated[bool, typer.Option(
              "--compile", help="Also the compiled pair: nmm loss() and HF Llama forward+CE, each through "
                                "torch.compile (default options), in the same rounds.")] = False,
          threads: Annotated[int, typer.Option(help="torch threads for every variant.")] = 2,
          steps: Annotated[int, typer.Option(help="Timed steps per variant.")] = 10,
          size: Annotated[str, typer.Option(help="d_model,layers,heads,kv_heads,ffn,batch,seq (default: the "
                                                 "shapes demo's model and batch).")] = "192,4,6,2,512,16,256"):
    """Training tokens/s and MFU: nmm's training step vs a Hugging Face Llama of identical dimensions.

    One step is forward + loss + backward + AdamW on the same batch (random documents of text and image
    codes at the demo's vocabulary). Rows: nmm loss() (what `nmm train` runs), nmm forward+CE, the same with
    an unfactorised head (HF's computation exactly), HF LlamaForCausalLM + CE; with --compile the compiled
    pair. Variants take turns step by step; ratios from the median step. MFU = the step's counted FLOPs
    (forward + backward) / median step time / this machine's measured GEMM peak (same dtype and threads).
    Also `python benchmarks/train_throughput.py` (more options)."""
    from nmm.bench.common import write_json
    from nmm.bench.train import format_table, parse_args, run

    d, layers, heads, kv, ffn, batch, seq = (int(x) for x in size.split(","))
    argv = ["--d-model", d, "--layers", layers, "--heads", heads, "--kv-heads", kv, "--ffn", ffn, "--batch", batch,
            "--seq", seq, "--threads", threads, "--steps", 2 if quick else steps, "--warmup", 1 if quick else 3]
    result = run(parse_args([str(a) for a in argv] + (["--compile"] if compile else [])))
    print(format_table(result))  # plain: a wide table must not wrap at the terminal width
    path = out or Path("bench-train.json")
    write_json(path, {"target": "synthetic", "quick": quick, "train": result})
    console.print(f"wrote {path}")


@bench_app.command("loader")
def loader(out: Out = None, quick: Quick = False,
           samples: Annotated[int, typer.Option(help="Shapes scenes packed into shards.")] = 2000,
           batches: Annotated[int, typer.Option(help="Timed batches per variant.")] = 40,
           workers: Annotated[str, typer.Option(help="data.num_workers values to time, comma-separated.")] = "0,1,2",
           batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 16,
           seq_len: Annotated[int, typer.Option(help="Tokens per row.")] = 256,
           threads: Annotated[int, typer.Option(help="torch threads of the main process.")] = 2):
    """Shard loader throughput: samples/s and batches/s of StreamingBatches at data.num_workers 0, 1, 2.

    Packs SAMPLES shapes scenes into shards (100 per shard), then times the loader that
    `data.source=shards` trains from (tar reading, PNG decoding, image tokenizer encoding, roles,
    packing; in DataLoader workers when num_workers > 0) and, for comparison, PackedBatches over the
    same images pre-tokenised in memory. The first batch (worker start-up) is timed apart."""
    from nmm.bench.common import write_json
    from nmm.bench.loader import format_table, run_loader

    counts = tuple(int(w) for w in workers.split(",") if w.strip())
    kw = {"samples": 300, "batches": 4, "batch_size": 4, "seq_len": 160} if quick else {
        "samples": samples, "batches": batches, "batch_size": batch_size, "seq_len": seq_len}
    result = run_loader(workers=counts, threads=threads, log=console.print, **kw)
    print(format_table(result))
    path = out or Path("bench-loader.json")
    write_json(path, {"target": "shapes shards", "quick": quick, "loader": result})
    console.print(f"wrote {path}")


@bench_app.command("parallel")
def parallel(out: Out = None,
             preset: Annotated[str, typer.Option(help="The preset every layout trains.")] = "shapes-quick",
             steps: Annotated[int, typer.Option(help="Training steps per layout.")] = 30,
             procs: Annotated[int, typer.Option(help="Processes of the parallel layouts (torchrun).")] = 2):
    """Step time and loss tolerance of each parallel layout: one process vs DDP, FSDP2 and FSDP2 x
    tensor parallel on PROCS processes, same preset, seed and global batch (see nmm/bench/parallel.py)."""
    from rich.table import Table

    from nmm.bench.parallel import run_parallel_bench

    path = out or Path("bench-parallel.json")
    rows = run_parallel_bench(preset, steps, procs, path, log=console.print)
    table = Table(title=f"{preset}, {steps} steps, global batch = {procs} micro-batches", title_justify="left")
    for col in ("layout", "processes", "s/step", "tokens/s", "per process", "max |loss - one process|"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        table.add_row(r["layout"], str(r["processes"]), f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['tokens_per_s_per_process']:.0f}", f"{r['max_loss_diff_vs_one_process']:.1e}")
    console.print(table)
    console.print(f"wrote {path}")


@bench_app.command("tokenizer")
def tokenizer(out: Out = None, quick: Quick = False,
              minutes: Annotated[float, typer.Option(help="Training minutes per data set.")] = 10.0,
              datasets: Annotated[str, typer.Option(help="Comma-separated: photos (scikit-learn's sample photos), "
                                                         "fashion (Fashion-MNIST).")] = "photos,fashion",
              photo_size: Annotated[int, typer.Option(help="Pixels per side of the photo crops.")] = 64,
              fashion_size: Annotated[int, typer.Option(help="Pixels per side of Fashion-MNIST images.")] = 64,
              set_: Annotated[list[str] | None, typer.Option("--set", help="An image_vq field, e.g. --set downsample=16 "
                                                                          "--set quantizer=fsq (repeatable).")] = None,
              grids: Annotated[Path, typer.Option(help="Folder for the reconstruction grid PNGs.")] = Path("bench-tokenizer"),
              threads: Annotated[int, typer.Option(help="torch threads (1 is fastest on a busy 2-core machine).")] = 1):
    """PSNR, codebook usage and reconstruction grids of the general image tokenizer (image_vq) after MINUTES of
    training on real pictures: crops of scikit-learn's two sample photos (held-out crops for evaluation) and
    Fashion-MNIST (see nmm/bench/tokenizer.py)."""
    from nmm.bench.common import write_json
    from nmm.bench.tokenizer import QUICK, format_table, run_tokenizer_bench

    overrides = list(set_ or [])
    if quick:
        minutes, overrides = QUICK["minutes"], [f"{k}={v}" for k, v in QUICK["set"].items()] + overrides
    names = tuple(d.strip() for d in datasets.split(",") if d.strip())
    result = run_tokenizer_bench(minutes, names, photo_size, fashion_size, overrides, grids, threads, log=console.print)
    print(format_table(result))
    path = out or Path("bench-tokenizer.json")
    write_json(path, {"target": "image_vq", "quick": quick, "tokenizer": result})
    console.print(f"wrote {path}")


@bench_app.command("all")
def all_(run: Run = "shapes-demo", out: Out = None, quick: Quick = False, threads: Threads = 1,
         repeats: Repeats = None, compile: Compile = False, stream: Stream = False):
    """decode, image and server in one run, written to one JSON file (default bench-all.json)."""
    pipe = _load(run)
    results = {"decode": _decode(pipe, quick, threads, repeats, 64, compile),
               "image": _image(pipe, quick, threads, repeats, compile)}
    results["server"] = _server(run, quick, 128, 32, threads, stream)
    _finish(results, run, quick, out, "all")


@bench_app.command("memory")
def memory(run: Annotated[Path | None, typer.Argument(help="A run directory (default: train shapes-quick into a "
                                                           "temporary directory first).")] = None,
           out: Out = None, quick: Quick = False, threads: Threads = 1,
           n: Annotated[int, typer.Option(help="Judged items per eval task and split.")] = 200,
           precisions: Annotated[str, typer.Option(help="Comma-separated: fp32, bf16, int8 (int8 linear layers, the "
                                                        "rest fp32), int8+bf16.")] = "fp32,bf16,int8,int8+bf16",
           rss_size: Annotated[str, typer.Option(help="d_model,layers of the random model whose load peak RSS is also "
                                                      "measured ('' to skip).")] = "1024,8"):
    """fp32 / bf16 / int8 weight-only: weight bytes, peak RSS of a fresh process loading, logit error vs fp32,
    decode tokens/s and judged accuracy (shapes_captioning, shapes_t2i) with CIs. See nmm/bench/memory.py."""
    import tempfile

    from nmm.bench.common import write_json
    from nmm.bench.memory import run_memory, tables, train_quick_run

    kw = {"n": 16, "docs": 8, "new_tokens": 8, "repeats": 1} if quick else {"n": n}
    size = tuple(int(x) for x in rss_size.split(",")) if rss_size.strip() else None
    if quick and size:
        size = (256, 2)
    with tempfile.TemporaryDirectory(prefix="nmm-bench-memory-run-") as tmp:
        target = run if run is not None else train_quick_run(Path(tmp) / "shapes-quick", log=console.print)
        result = run_memory(target, precisions=tuple(precisions.split(",")), threads=threads, rss_size=size,
                            log=console.print, **kw)
    for table in tables(result):
        console.print(table)
    path = out or Path("bench-memory.json")
    write_json(path, {"target": str(run) if run else "shapes-quick (trained here)", "quick": quick, "memory": result})
    console.print(f"wrote {path}")
