"""The `nmm` command line. Each subcommand is a plain typed function.

    nmm demo                                   train + evaluate + report on the built-in shapes world
    nmm train shapes-tiny --out runs/x train.max_steps=200
    nmm generate runs/x --prompt "a small red circle at the top left"
    nmm generate runs/x --image picture.png --prompt describe
    nmm eval runs/x --tasks shapes_t2i,shapes_fid
    nmm compare runs/a runs/b
    nmm inspect shapes-demo
    nmm sweep --out runs/sweep                 the design space (fusion x routing x size) at matched compute
    nmm bench decode --run shapes-demo           nmm vs Hugging Face on the same weights (decode|image|server|all)
    nmm data pack shapes OUT --count 20000     WebDataset shards for data.source=shards, curated (docs/data.md)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from nmm.errors import NmmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="nmm: native multimodal models. One transformer over interleaved text and image tokens.")
# A log file gets 120 columns (rich falls back to 80 when stdout is not a terminal: tables wrap badly).
out_console = Console() if sys.stdout.isatty() else Console(width=120)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides as dot-list: train.max_steps=200 model.d_model=128")]


def _metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


@app.command()
def demo(
    world: Annotated[str, typer.Argument(help="What the model learns: shapes (text + images), speech (text + "
                                              "speech, both directions) or video (text + clips, both directions).")] = "shapes",
    out: Annotated[Path | None, typer.Option(help="Run directory to create (default runs/demo, runs/demo-speech, "
                                                  "runs/demo-video).")] = None,
    quick: Annotated[bool, typer.Option(help="Smoke version in about a minute (same outputs, weak model).")] = False,
    overrides: Overrides = None,
):
    """Train a native multimodal model on built-in data, evaluate it, write a report.

    `nmm demo` (shapes): an early-fusion text + image model. Writes OUT/metrics.json and OUT/report.html
    (loss curves, reconstructions, generated images with judge verdicts, captions of held-out images).
    About 15-20 minutes on 2 CPU cores; --quick < 1 min.

    `nmm demo speech`: one model that transcribes speech and speaks text, on eSpeak NG voices (some held out
    for evaluation). Writes OUT/metrics.json and OUT/eval/report.html (audio players, spectrograms).
    At most 30 minutes on 2 CPU cores, audio codec and evaluation included.

    `nmm demo video`: one model that captions clips of the moving shapes world and makes clips from
    captions (held-out motion combinations too). Writes OUT/metrics.json and OUT/eval/report.html
    (filmstrips and playing GIFs with the clip judge's verdicts). About 20 minutes on 2 CPU cores.
    """
    from nmm.demo import run_demo, run_speech_demo, run_video_demo
    from nmm.eval.report import SPEECH_HEADLINE_METRICS, VIDEO_HEADLINE_METRICS, headline_rows

    runners = {"shapes": (run_demo, None, "runs/demo"), "speech": (run_speech_demo, SPEECH_HEADLINE_METRICS, "runs/demo-speech"),
               "video": (run_video_demo, VIDEO_HEADLINE_METRICS, "runs/demo-video")}
    if world not in runners:
        raise NmmError(f"nmm demo: unknown world '{world}' ({' | '.join(runners)})")
    runner, headline, default_out = runners[world]
    out = out or Path(default_out)
    metrics = runner(out, quick=quick, overrides=overrides)
    rows = headline_rows(out, metrics) if headline is None else headline_rows(out, metrics, headline)
    table = Table(title=f"nmm demo {world}: {metrics.get('steps')} steps, {metrics.get('params', 0) / 1e6:.2f}M "
                        f"parameters, {metrics.get('demo_minutes', 0):.1f} min", title_justify="left")
    held_out = {"shapes": "held-out scenes", "speech": "held-out voices", "video": "held-out clips"}[world]
    columns = ("metric", held_out, "unseen combinations", "target") if world != "speech" else ("metric", held_out, "target")
    for column in columns:
        table.add_column(column, justify="left" if column in ("metric", "target") else "right")
    for row in rows:
        table.add_row(*(row if world != "speech" else (row[0], row[1], row[3])))
    out_console.print(table)
    out_console.print(f"values [95% interval] n=items; every number: {out / 'metrics.json'}; "
                      f"pictures{', sound' if world == 'speech' else ''} and curves: {metrics['report']}")


@app.command("train")
def train_cmd(
    preset: Annotated[str, typer.Argument(help="Preset name (see `nmm inspect --list`) or a YAML file.")],
    out: Annotated[Path, typer.Option(help="Run directory (created; holds config, checkpoints, metrics).")],
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in OUT.")] = False,
    overrides: Overrides = None,
):
    """Train a model (tokenizers first, then the transformer). Works under `torchrun` too."""
    from nmm.config import load_config
    from nmm.train.trainer import train

    cfg = load_config(preset, overrides)  # validates the preset even when resuming
    if resume:  # a resumed run continues with the config it was started with
        if not (out / "config.yaml").exists():
            raise NmmError(f"{out}: --resume given but there is no config.yaml in it")
        cfg = load_config(out / "config.yaml", overrides)
    summary = train(cfg, out, resume=resume)
    out_console.print(f"trained {summary['steps']} steps in {summary['train_minutes']:.2f} min -> {out}")


ANSWERS = ("text", "image", "speech", "video")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    prompt: Annotated[str, typer.Option(help="Caption to draw or text to speak, or a question/instruction about "
                                             "--image.")] = "describe",
    image: Annotated[Optional[Path], typer.Option(help="An input image: caption it (prompt 'describe') or ask about it.")] = None,
    audio: Annotated[Optional[Path], typer.Option(help="An input recording (WAV/FLAC/OGG/MP3): transcribe it.")] = None,
    video: Annotated[Optional[Path], typer.Option(help="An input clip (GIF/MP4/WebM): caption it.")] = None,
    answer: Annotated[Optional[str], typer.Option(help="What to write: text | image | speech | video (default: text "
                                                       "about an input, else the model's first output modality).")] = None,
    speak: Annotated[bool, typer.Option("--speak", help="Answer in speech (the same as --answer speech).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Where to write a generated image (PNG), speech (WAV) or clip "
                                                     "(GIF); default generated.png / .wav / .gif.")] = None,
    cfg_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance (1 = off; default 2 for "
                                                            "images and clips, 1 for speech).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.3,
    top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Text -> image (PNG), speech (WAV) or clip (GIF); image -> text (a caption or an answer); speech ->
    text; clip -> text."""
    import nmm

    pipe = nmm.load(run_dir)
    has = set(pipe.codecs.modalities)
    given = {name: path for name, path in (("image", image), ("audio", audio), ("video", video)) if path is not None}
    for name in given:
        if name not in has:
            raise NmmError(f"{run_dir}: this model has no {name} modality (it has: text, {', '.join(has) or 'nothing else'})")
    kind = "speech" if speak else answer
    if kind is None:
        kind = "text" if given else next((k for k, m in (("image", "image"), ("speech", "audio"), ("video", "video"))
                                          if m in has), "text")
    if kind not in ANSWERS:
        raise NmmError(f"--answer {kind}: expected one of {', '.join(ANSWERS)}")
    if kind == "text":
        out_console.print(_describe(pipe, given, prompt, temperature, seed))
        return
    if given:
        raise NmmError(f"--answer {kind} writes from the prompt alone; drop --{next(iter(given))} (or answer in text)")
    modality = {"image": "image", "speech": "audio", "video": "video"}[kind]
    if modality not in has:
        raise NmmError(f"{run_dir}: this model cannot write {kind} (no {modality} modality)")
    scale = (1.0 if modality == "audio" else 2.0) if cfg_scale is None else cfg_scale
    item = pipe.generate_items(modality, [prompt], cfg_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed)[0]
    out = out or Path("generated." + {"image": "png", "audio": "wav", "video": "gif"}[modality])
    out.parent.mkdir(parents=True, exist_ok=True)
    out_console.print(f"wrote {out}{_write(pipe, modality, item, out)}")


def _describe(pipe, given: dict, prompt: str, temperature: float, seed: int) -> str:
    """The text answer about an input item (a caption, a transcript, an answer to a question on an image)."""
    if "audio" in given:
        from nmm.modalities.audio import read_audio

        try:
            wave, notes = read_audio(given["audio"], str(given["audio"]))
        except (OSError, ValueError) as e:
            raise NmmError(str(e)) from None
        for note in notes:
            out_console.print(f"[dim]{given['audio']}: {note}[/dim]")
        return pipe.transcribe([wave], temperature=temperature, seed=seed)[0]
    if "video" in given:
        try:
            clip = pipe.codecs.codec("video").from_bytes(given["video"].read_bytes())
        except (OSError, ValueError) as e:
            raise NmmError(f"{given['video']}: {e}") from None
        return pipe.describe("video", clip[None], temperature=temperature, seed=seed)[0]
    if "image" not in given:
        raise NmmError("nothing to answer about: give --image, --audio or --video, or --answer image|speech|video")
    from nmm.data.folder import load_image

    arr = load_image(given["image"], pipe.codecs.image.config.image_size)[None]
    if prompt.strip().lower() in ("describe", "caption", ""):
        return pipe.caption(arr, temperature=temperature, seed=seed)[0]
    return pipe.answer(arr, [prompt], temperature=temperature, seed=seed)[0]


def _write(pipe, modality: str, item, out: Path) -> str:
    """Write a generated item as a file people open (PNG upscaled to 256 px, WAV, looping GIF)."""
    if modality == "audio":
        from nmm.modalities.audio import write_wav

        write_wav(out, item)
        return f" ({len(item) / 16_000:.2f} s)"
    if modality == "video":
        out.write_bytes(pipe.codecs.codec("video").to_bytes(item))
        return f" ({len(item)} frames)"
    from PIL import Image

    scale = max(1, 256 // item.shape[0])
    Image.fromarray(item).resize((item.shape[1] * scale, item.shape[0] * scale), Image.NEAREST).save(out)
    return ""


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A trained run directory.", show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated tasks to run (default: every task the "
                                                      "model's modalities allow). See --list.")] = None,
    list_tasks: Annotated[bool, typer.Option("--list", help="List the evaluation tasks and exit.")] = False,
    force: Annotated[bool, typer.Option(help="Re-run tasks already finished in RUN_DIR/eval/results.json.")] = False,
    samples: Annotated[Optional[int], typer.Option(help="Samples per task and split (eval.n_samples).")] = None,
    overrides: Overrides = None,
):
    """Evaluate a run: captioning, QA, GenEval-style text-to-image, editing, interleaved generation,
    Fréchet distance, text perplexity; each on held-out scenes and held-out attribute combinations,
    with 95% bootstrap intervals. Resumable: finished tasks are kept unless --force.
    Writes RUN_DIR/eval/results.json and RUN_DIR/eval/report.html.

    `nmm eval compare RUN_DIR...` compares evaluated runs (the same as `nmm compare`)."""
    if list_tasks:
        from nmm.eval.console import tasks_table

        out_console.print(tasks_table())
        return
    if run_dir is None:
        raise NmmError("nmm eval needs a run directory (or --list to see the tasks)")
    if run_dir == Path("compare") and not run_dir.is_dir():  # `nmm eval compare A B ...`
        return compare(list(map(Path, overrides or [])))
    import nmm
    from nmm.config import load_config
    from nmm.eval import evaluate_tasks
    from nmm.eval.console import results_table

    if not (run_dir / "config.yaml").exists():
        raise NmmError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    if samples:
        cfg.eval.n_samples = samples
    pipe = nmm.load(run_dir)
    outcome = evaluate_tasks(pipe, cfg, run_dir / "eval", tasks=tasks, force=force, log=out_console.print)
    out_console.print(results_table(outcome.data, f"nmm eval {run_dir}"))
    out_console.print(f"results: {outcome.path}\nreport:  {outcome.report}")
    if outcome.failed:
        failed = "; ".join(f"{name}: {error}" for name, error in outcome.failed.items())
        raise NmmError(f"{len(outcome.failed)} eval task(s) failed ({failed}); the others are in {outcome.path}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Evaluated run directories (first = baseline).")],
    plot: Annotated[Path, typer.Option(help="Where to write the comparison plot (PNG).")] = Path("compare.png"),
    all_metrics: Annotated[bool, typer.Option("--all", help="Every metric, not only each task's headline.")] = False,
):
    """Compare evaluated runs: a markdown table (value [95% CI], best in bold, * = interval clear of the
    first run's) on stdout, and a bar plot with intervals."""
    from nmm.eval import compare_runs

    print(compare_runs(runs, metrics="all" if all_metrics else "headline", plot=plot))


@app.command()
def inspect(
    target: Annotated[Optional[str], typer.Argument(help="Preset name, YAML file or run directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets.")] = False,
):
    """Describe a model in the roadmap's terms: fusion, representation, capabilities, parameters."""
    from nmm.config import list_presets as presets
    from nmm.inspect import describe

    if list_presets or target is None:
        for name in presets():
            out_console.print(name)
        return
    info = describe(target)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out_console.print(_metrics_table(info, f"nmm inspect {target}"))
        for k, v in info.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                out_console.print(f"{k}: {v}")


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="Sweep directory: one run per point, sweep.csv/.md/.json and plots.")] = Path("runs/sweep"),
    grid: Annotated[str, typer.Option(help="Named grid: default (about an hour on 2 CPU cores), small (every variant, tiny models, ~20 min) or quick (minutes).")] = "default",
    quick: Annotated[bool, typer.Option("--quick", help="Same as --grid quick.")] = False,
    variants: Annotated[Optional[str], typer.Option(help="Comma-separated subset of the grid's variants, e.g. early-discrete,moe.")] = None,
    sizes: Annotated[Optional[str], typer.Option(help="Comma-separated model sizes: xs, s, m.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Training FLOPs per run (default: the grid's).")] = None,
    overrides: Overrides = None,
):
    """Train and evaluate a grid of design-space variants at matched training FLOPs.

    Every point trains on the same shared tokenizers for budget / (3 x measured forward FLOPs per
    token x tokens per step) steps, then gets a held-out text loss curve, M2T captioning and M2G
    judged accuracy with bootstrap intervals, and, for MoE, per-modality routing histograms.
    Finished points are kept when the command is run again."""
    from nmm.sweep import run_sweep

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    results = run_sweep(out, "quick" if quick else grid, split(variants), split(sizes), budget, overrides,
                        log=out_console.print)
    out_console.print((out / "sweep.md").read_text())
    out_console.print(f"{len(results['points'])} points in {results['minutes']} min -> {out}/sweep.md, sweep.csv, "
                      "loss_vs_compute.png, accuracy.png" + (", routing.png" if (out / "routing.png").exists() else ""))


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="A trained run directory, or a preset name to serve random weights "
                                               "(for trying the API without training).")],
    host: Annotated[str, typer.Option(help="Address to bind. 0.0.0.0 makes the server reachable from other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="NMM_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on the /v1 routes.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights and KV cache dtype: fp32 or bf16 (bf16: half the memory; "
                                            "fast on GPUs and recent CPUs).")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="Run the decode step through torch.compile (slow start: "
                                               "the first requests wait for compilation).")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows decoded together (a CFG image takes two).")] = 32,
    max_cache_mb: Annotated[Optional[float], typer.Option(min=0, help="Cap on KV-cache memory; fewer rows if "
                                                                      "--max-batch rows would not fit.")] = None,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting for a row before the server answers "
                                                       "429.")] = 16,
):
    """Serve a model over HTTP: an OpenAI-compatible API (/v1), /metrics, and a web playground at /."""
    try:
        import uvicorn

        from nmm.serve import Limits, create_app, load_pipeline
    except ImportError as e:
        raise NmmError(f"nmm serve needs the server extras ({e.name} is missing): pip install 'nmm-toolkit[serve]'") from None
    if dtype not in ("fp32", "bf16"):
        raise NmmError(f"--dtype must be fp32 or bf16, not '{dtype}'")

    pipe, name = load_pipeline(target, dtype=None if dtype == "fp32" else dtype, compile=compile)
    if name.endswith("-random"):
        out_console.print(f"[yellow]{target}: random weights (untrained), for trying the API[/yellow]")
    try:
        app = create_app(pipe, name, api_key=api_key,
                         limits=Limits(max_batch=max_batch, max_cache_mb=max_cache_mb, max_queue=max_queue))
    except ValueError as e:  # e.g. --max-cache-mb too small for one row
        raise NmmError(str(e)) from None
    auth = "API key required" if api_key else "no API key"
    out_console.print(f"serving {name} at http://{host}:{port} (playground at /, OpenAI API at /v1, {auth}; "
                      f"batch of {app.state.scheduler.rows} rows, {dtype}{', compiled' if compile else ''})")
    uvicorn.run(app, host=host, port=port, log_level="info")


# `nmm data pack`: shards for data.source=shards (nmm/data/pack.py, nmm/data/curation.py, docs/data.md).
data_app = typer.Typer(no_args_is_help=True, help="Data at scale: the shapes world or a folder of data into WebDataset "
                                                  "shards for data.source=shards, curated on the way (docs/data.md).")


@data_app.command("pack")
def data_pack(
    src: Annotated[str, typer.Argument(help="'shapes' (the built-in world), or a folder: images + captions.jsonl "
                                            '({"image", "caption"}), recordings + transcripts.jsonl ({"file", "text"}) '
                                            'or videos + captions.jsonl ({"file", "caption"}).')],
    out: Annotated[Path, typer.Argument(help="Folder to create: shard-000000.tar, ... and report.json.")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard (a run needs at least ranks x data.num_workers "
                                                 "shards).")] = 1000,
    count: Annotated[int, typer.Option(help="shapes: scenes to render.")] = 1000,
    seed: Annotated[int, typer.Option(help="shapes: random seed of the scenes.")] = 0,
    image_size: Annotated[int, typer.Option(help="shapes: pixels per side of the rendered images.")] = 32,
    kind: Annotated[Optional[str], typer.Option(help="A folder's kind: image, audio or video (default: from its "
                                                     "index file).")] = None,
    min_size: Annotated[int, typer.Option(help="Drop images whose shorter side is under this many pixels.")] = 16,
    min_caption_chars: Annotated[int, typer.Option(help="Drop items whose caption / transcript is shorter.")] = 3,
    max_caption_chars: Annotated[int, typer.Option(help="Drop items whose caption / transcript is longer.")] = 500,
    near_dup_distance: Annotated[Optional[int], typer.Option(
        help="Drop an image whose perceptual hash (64-bit pHash) is within this many bits of one kept; -1: off. "
             "Default 6, and off for shapes (its scenes can differ in colour alone, which pHash does not see).")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(help="Drop recordings and clips longer than this.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress.")] = True,
):
    """Pack data into WebDataset tar shards for `data.source=shards`, curated on the way.

    Items are stored raw (image, audio or video files + a .txt caption), so any run's codecs can
    read them. Dropped with a reason: bad index lines, missing and unreadable files, images under
    --min-size, captions outside the length bounds, recordings or clips over --max-seconds, exact
    duplicates (SHA-256 of the file) and near-duplicate images (perceptual hash). OUT/report.json
    counts kept and dropped items by reason, with example keys, and lists the shards. Then train:

        nmm train shapes-tiny --out runs/s data.source=shards 'data.shards={"OUT/shard-{000000..000009}.tar": 1.0}'
    """
    from nmm.data.curation import CurationOptions
    from nmm.data.pack import pack

    options = CurationOptions(min_size=min_size, min_caption_chars=min_caption_chars,
                              max_caption_chars=max_caption_chars, max_seconds=max_seconds,
                              near_dup_distance=(-1 if src == "shapes" else CurationOptions.near_dup_distance)
                              if near_dup_distance is None else near_dup_distance)
    report = pack(src, out, kind=kind, shard_size=shard_size, count=count, seed=seed, image_size=image_size,
                  options=options, show_progress=progress)
    table = Table(title=f"nmm data pack {src}: kept {report['kept']} of {report['seen']} {report['kind']} items "
                        f"in {len(report['shards'])} shards ({report['seconds']:.1f} s)", title_justify="left")
    for column in ("dropped", "count", "for example"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for reason, dropped in report["dropped_by_reason"].items():
        first = dropped["examples"][0]
        table.add_row(reason, str(dropped["count"]), f"{first['key']}: {first['detail']}")
    if not report["dropped_by_reason"]:
        table.add_row("nothing", "0", "")
    out_console.print(table)
    out_console.print(f"report: {out / 'report.json'}\nshards: {report['pattern']}\ntrain with: {report['train_with']}")


app.add_typer(data_app, name="data", help="Data at scale: pack data into WebDataset shards, with curation. See "
                                          "`nmm data pack --help`.")

# `nmm import hf SRC DST` / `nmm export RUN [--hf DST]`: checkpoints in and out (docs/checkpoints.md, docs/scaling.md).
import_app = typer.Typer(no_args_is_help=True, help="Bring another project's checkpoint in as an nmm run directory.")


@import_app.command("hf")
def import_hf_command(
    src: Annotated[Path, typer.Argument(help="A local Hugging Face model directory: config.json, safetensors "
                                             "weights (one file or shards), tokenizer.json. Today: Chameleon.")],
    dst: Annotated[Path, typer.Argument(help="The nmm run directory to create (nmm.load, generate, serve read it).")],
    dtype: Annotated[Optional[str], typer.Option(help="Store the weights as bf16 or fp32 (default: as stored).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists and is not empty.")] = False,
):
    """Convert a checkpoint, streaming (memory: about one 64 MiB block above the baseline, not the model)."""
    from nmm.interop import import_hf

    summary = import_hf(src, dst, dtype=dtype, overwrite=overwrite)
    flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))} | summary.get("vocab", {})
    out_console.print(_metrics_table(flat, f"imported {src}"))
    out_console.print(f"run: {dst}\ntry: nmm generate {dst} --image picture.png --prompt describe")


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="An nmm run directory (trained, being trained, or imported).")],
    hf: Annotated[Optional[Path], typer.Option(help="Write a Hugging Face checkpoint to this directory instead "
                                                    "(Chameleon or Llama / Qwen3, see --family).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The checkpoint folder to consolidate "
                                                            "(default: the run's latest).")] = None,
    family: Annotated[Optional[str], typer.Option(help="With --hf: chameleon | llama (Llama, or Qwen3 with QK-norm); "
                                                       "default: chameleon for Chameleon's QK-norm, else llama.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="With --hf: write the weights as bf16 or fp32.")] = None,
    overwrite: Annotated[bool, typer.Option(help="With --hf: replace the directory if it is not empty.")] = False,
):
    """Consolidate a training checkpoint (sharded by any number of processes) into RUN/model.safetensors,
    the file `nmm.load`, generate, serve and eval read; or, with --hf, write a Hugging Face checkpoint
    that transformers' from_pretrained loads."""
    if hf is None:
        from nmm.train.checkpoint import consolidate

        path, step = consolidate(run_dir, checkpoint)
        out_console.print(f"exported step {step} -> {path}")
        return
    from nmm.interop import export_hf

    summary = export_hf(run_dir, hf, family=family, dtype=dtype, overwrite=overwrite)
    out_console.print(_metrics_table({k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                                     f"exported {run_dir}"))
    out_console.print(f"checkpoint: {hf}")


app.add_typer(import_app, name="import", help="Bring a Hugging Face checkpoint in: `nmm import hf SRC DST`.")

# `nmm bench decode|image|server|all`: the subcommands live in nmm/bench/cli.py (imports nothing heavy).
from nmm.bench.cli import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench", help="Benchmarks: nmm vs Hugging Face on the same weights, and the server "
                                            "under load. See `nmm bench COMMAND --help`.")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2, not a traceback."""
    try:
        app(args=argv)  # exits via SystemExit on success, --help and usage errors
    except NmmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
