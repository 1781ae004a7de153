"""`nmm bench memory`: what fp32, bf16 and int8 weight-only loading cost and what they change, on one run.

    nmm bench memory                  # trains shapes-quick into a temporary directory first
    nmm bench memory runs/demo --n 200 --out bench-memory.json

For each precision (`fp32`, `bf16`, `int8` = int8 linear layers with the rest fp32, `int8+bf16` = int8
linear layers with the rest bf16; `nmm.quant`):

- **weights**: bytes of the model's parameters and buffers as loaded, and of its linear layers alone;
- **peak RSS**: a fresh Python process imports nmm, records its resident memory, runs `nmm.load(RUN,
  dtype=..., quantize=...)` and reports its peak (Linux VmHWM) and final resident memory above that
  baseline. On a model of a few MB this is lost in the allocator's noise, so the same is measured on a
  larger random-weight model of the run's architecture (`rss_size`, default d_model 1024, 8 layers:
  about 0.1 B parameters), together with the loading nmm did before (an fp32 model, the whole file
  read, `load_state_dict`, then a cast) for comparison;
- **logit error** against fp32 on held-out documents (shapes-world scenes the run never trained on, as
  caption -> image and image -> caption documents; plain text for other worlds): max and mean |logit
  difference| over every position and vocabulary entry, the fraction of positions whose top-1 token
  agrees, and the held-out next-token loss (softmax over the target's own modality);
- **decode speed**: greedy text decoding of the same prompts (`TEXT_PROMPTS`), exactly `new_tokens` new
  tokens (eos disallowed) at batch 1 and 8, every precision taking turns round by round
  (`common.time_turns`), and whether the tokens equal fp32's;
- **judged accuracy**: `evaluate_tasks` with `shapes_captioning` (exact match) and `shapes_t2i` (judged
  accuracy) at `n` items per split, each with its bootstrap CI, and the paired difference against fp32
  on the same items (its CI resamples items jointly), so the quality change is a judged number.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nmm.bench.common import TEXT_PROMPTS, env_info, set_threads, time_turns

PRECISIONS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8"),
              "int8+bf16": ("bf16", "int8")}
# task -> its judged metrics: all-or-nothing per item, and the finer per-attribute share
TASKS = {"shapes_captioning": ("exact_match", "attribute_accuracy"),
         "shapes_t2i": ("judged_accuracy", "attribute_accuracy")}
MB = 2**20


def parse_precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {', '.join(bad)}: one of {', '.join(PRECISIONS)}")
    if "fp32" not in names:
        names.insert(0, "fp32")  # the reference every error and difference is measured against
    return names


def load_at(run: Path, name: str, device: str = "cpu"):
    import nmm

    dtype, quantize = PRECISIONS[name]
    return nmm.load(run, device=device, dtype=dtype, quantize=quantize)


# ---- peak RSS of a fresh process ---------------------------------------------------------------------
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(run: str, name: str, mode: str) -> dict:
    """In a fresh process: baseline RSS after the imports, then one load; -> MiB figures."""
    torch.set_num_threads(1)
    # Every import either way of loading needs, before the baseline (nmm.api imported nmm.train.checkpoint,
    # and so torch.distributed.checkpoint, before nmm.quant).
    import nmm.api  # noqa: F401
    from nmm.config import ModelConfig, _build
    from nmm.modalities.codecs import Codecs
    from nmm.model.model import NativeMultimodalModel
    from nmm.quant import weight_bytes
    from nmm.train.checkpoint import load_state_dict_into, load_weights

    Codecs.load(run)  # the codecs' own imports too; their weights are counted in every row alike
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "nmm":
        pipe = load_at(Path(run), name)
        model = pipe.model
    else:  # what nmm.load did before nmm.quant: an fp32 model, the whole file in memory, then a cast
        cfg = _build(ModelConfig, json.loads((Path(run) / "model.json").read_text()))
        model = NativeMultimodalModel(cfg, Codecs.load(run).vocab)
        load_state_dict_into(model, load_weights(Path(run) / "model.safetensors"), Path(run) / "model.safetensors")
        dtype, _ = PRECISIONS[name]
        model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    seconds = time.perf_counter() - t0
    return {"baseline_mb": round(base, 1), "peak_mb": round(_rss_mb("VmHWM"), 1), "final_mb": round(_rss_mb("VmRSS"), 1),
            "load_peak_mb": round(_rss_mb("VmHWM") - base, 1), "resident_mb": round(_rss_mb("VmRSS") - base, 1),
            "weights_mb": round(weight_bytes(model)["total"] / MB, 2), "seconds": round(seconds, 3)}


def measure_rss(run: Path, name: str, mode: str = "nmm") -> dict:
    """`_child` in a fresh interpreter (`python -m nmm.bench.memory --child RUN PRECISION MODE`)."""
    out = subprocess.run([sys.executable, "-m", "nmm.bench.memory", "--child", str(run), name, mode],
                         capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-RSS child failed ({name}, {mode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_rss_run(run: Path, dst: Path, d_model: int, n_layers: int, seed: int = 0) -> dict:
    """A random-weight run of `run`'s architecture at d_model / n_layers (heads of 64, about the run's
    grouping of query heads per key/value head, SwiGLU of 8/3 d rounded to 64), with `run`'s codecs: a model big enough for its memory to stand out of the noise."""
    import shutil

    from nmm.config import ModelConfig, _build, to_dict
    from nmm.modalities.codecs import Codecs
    from nmm.model.model import NativeMultimodalModel
    from nmm.utils import atomic_write_json, save_safetensors

    cfg = _build(ModelConfig, json.loads((run / "model.json").read_text()))
    heads = max(1, d_model // 64)
    group = max(1, cfg.n_heads // cfg.n_kv_heads)  # the run's query heads per key/value head, or near it
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // group))
    cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads = d_model, n_layers, heads, kv
    cfg.ffn_hidden = round(d_model * 8 / 3 / 64) * 64
    dst.mkdir(parents=True, exist_ok=True)
    for f in run.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "model.json"):
            shutil.copy(f, dst / f.name)
    codecs = Codecs.load(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NativeMultimodalModel(cfg, codecs.vocab)
    save_safetensors(model.state_dict(), dst / "model.safetensors")
    atomic_write_json(dst / "model.json", to_dict(cfg))
    return {"d_model": d_model, "n_layers": n_layers, "n_heads": heads, "n_kv_heads": kv,
            "ffn_hidden": cfg.ffn_hidden, "parameters": model.num_params(),
            "file_mb": round((dst / "model.safetensors").stat().st_size / MB, 1)}


# ---- logits on held-out documents ---------------------------------------------------------------------
def heldout_documents(pipe, cfg, n: int, seed: int) -> list[list[int]]:
    """Token ids of held-out documents: for the shapes world, n scenes as caption -> image and n as
    image -> caption (held-out scenes, not the evaluation's: another seed); else n plain-text documents."""
    from nmm.modalities.document import Document, ItemSegment, TextSegment

    codecs = pipe.codecs
    docs = []
    if cfg is not None and "shapes" in cfg.data.source.split("+") and "image" in codecs.modalities:
        from nmm.eval.scenes import eval_scenes, render
        from nmm.train.prepare import make_world

        world = make_world(cfg)
        scenes = eval_scenes(world, n, seed, "heldout")
        codes = codecs.encode_images(render(world, scenes))
        for scene, c in zip(scenes, codes):
            caption = world.caption(scene)
            docs.append(Document([TextSegment(caption), ItemSegment("image", codes=c)]))
            docs.append(Document([ItemSegment("image", codes=c), TextSegment(caption)]))
    else:
        docs = [Document([TextSegment(t)]) for t in (TEXT_PROMPTS * (n // len(TEXT_PROMPTS) + 1))[:n]]
    limit = pipe.model.cfg.max_seq_len
    return [codecs.encode_document(d)[0][:limit] for d in docs]


def _restricted_nll(logits: torch.Tensor, targets: torch.Tensor, vocab) -> torch.Tensor:
    """(T, V) fp32 logits, (T,) next ids -> (T,) -log p, the softmax over the target's own modality
    (text ids and specials, or one modality's codes), as the model's heads are trained."""
    lo = torch.zeros_like(targets)
    hi = torch.full_like(targets, vocab.text_size)
    for name in vocab.names:
        if name == "text":
            continue
        a, b = vocab.range(name)
        inside = (targets >= a) & (targets < b)
        lo, hi = torch.where(inside, a, lo), torch.where(inside, b, hi)
    cols = torch.arange(logits.shape[-1])
    allowed = (cols[None] >= lo[:, None]) & (cols[None] < hi[:, None])
    masked = logits.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(masked, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)


@torch.no_grad()
def logits_of(pipe, docs: list[list[int]]) -> list[torch.Tensor]:
    return [pipe.model(torch.tensor([d]))[0].float() for d in docs]


def logit_error(ref: list[torch.Tensor], got: list[torch.Tensor], docs: list[list[int]], vocab) -> dict:
    max_abs, abs_sum, count, agree, positions, nll, n_tok = 0.0, 0.0, 0, 0, 0, 0.0, 0
    scale = []
    for r, g, d in zip(ref, got, docs):
        ok = torch.isfinite(r) & torch.isfinite(g)
        diff = (r - g).abs()[ok]
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        abs_sum, count = abs_sum + float(diff.sum()), count + diff.numel()
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        positions += r.shape[0]
        scale.append(r[torch.isfinite(r)].std().item())
        targets = torch.tensor(d[1:])
        nll += float(_restricted_nll(g[:-1], targets, vocab).sum())
        n_tok += len(d) - 1
    return {"max_abs": max_abs, "mean_abs": abs_sum / max(count, 1), "top1_agreement": agree / max(positions, 1),
            "heldout_loss": nll / max(n_tok, 1), "fp32_logit_std": float(np.mean(scale)), "documents": len(docs),
            "positions": positions}


def _prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- decoding speed -----------------------------------------------------------------------------------
def decode_speed(pipes: dict, batches=(1, 8), new_tokens: int = 32, repeats: int = 3, warmup: int = 1) -> dict:
    from nmm.infer.sampling import SamplingConfig

    any_pipe = next(iter(pipes.values()))
    prompts = [any_pipe.codecs.prompt([t]) for t in TEXT_PROMPTS]
    greedy = SamplingConfig(temperature=0.0)
    out: dict = {}
    for b in batches:
        chunk = (prompts * (b // len(prompts) + 1))[:b]
        tokens: dict[str, list] = {}

        def runner(name, chunk=chunk, tokens=tokens):
            def go():
                tokens[name] = pipes[name].engine.generate(chunk, new_tokens, greedy, allow_images=False,
                                                           ignore_eos=True).tokens
            return go

        times = time_turns({name: runner(name) for name in pipes}, repeats, warmup)
        for name, t in times.items():
            out.setdefault(name, {})[f"batch_{b}"] = {
                "tokens_per_s": round(b * new_tokens / t.median, 1), "median_s": round(t.median, 4),
                "same_tokens_as_fp32": float(np.mean([a == r for a, r in zip(tokens[name], tokens["fp32"])])),
                "prefix_agreement": float(np.mean([_prefix(a, r) / max(len(r), 1)
                                                   for a, r in zip(tokens[name], tokens["fp32"])]))}
    return out


# ---- judged accuracy ----------------------------------------------------------------------------------
def judged(pipe, cfg, out_dir: Path, n: int, log) -> tuple[dict, dict]:
    """-> ({"task metric": {split: {value, ci_low, ci_high, n}}}, {"task metric": {split: per-item scores}})."""
    from nmm.eval.harness import evaluate_tasks
    from nmm.eval.judge import ATTRIBUTES

    cfg.eval.n_samples = n
    outcome = evaluate_tasks(pipe, cfg, out_dir, tasks=",".join(TASKS), log=log, force=True, progress=False,
                             report=False, strict=True)
    per_item = {"exact_match": lambda r: float(r["exact"]), "judged_accuracy": lambda r: float(r["exact"]),
                "attribute_accuracy": lambda r: float(np.mean([r[a] for a in ATTRIBUTES]))}
    scores, items = {}, {}
    for task, metrics in TASKS.items():
        for metric in metrics:
            key = f"{task} {metric}"
            for r in outcome.records:
                if r["task"] == task and r["metric"] == metric:
                    scores.setdefault(key, {})[r["split"]] = {k: r[k] for k in ("value", "ci_low", "ci_high", "n")}
            for split, res in outcome.fresh.get(task, {}).items():
                items.setdefault(key, {})[split] = [per_item[metric](row) for row in res.extra["rows"]]
    return scores, items


def paired_difference(a: list[float], ref: list[float], seed: int = 0) -> dict:
    from nmm.eval.stats import bootstrap_mean

    est = bootstrap_mean(np.asarray(a) - np.asarray(ref), seed=seed)
    return {"value": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n,
            "items_changed": int(np.sum(np.asarray(a) != np.asarray(ref)))}  # items whose score moved


# ---- the whole benchmark --------------------------------------------------------------------------
def train_quick_run(dst: Path, log=print) -> Path:
    from nmm.config import load_config
    from nmm.train.trainer import train

    log(f"no RUN given: training shapes-quick into {dst} (a few minutes)")
    train(load_config("shapes-quick"), dst, show_progress=False, log=lambda *a: None)
    return dst


def run_memory(run: Path, precisions=("fp32", "bf16", "int8", "int8+bf16"), n: int = 200, docs: int = 32,
               new_tokens: int = 32, repeats: int = 3, threads: int = 1, eval_threads: int | None = None,
               rss_size: tuple[int, int] | None = (1024, 8), eval_dir: Path | None = None, log=print) -> dict:
    from nmm.config import load_config
    from nmm.quant import weight_bytes

    run = Path(run)
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").exists() else None
    precisions = parse_precisions(",".join(precisions))
    eval_threads = eval_threads or threads
    result: dict = {"run": str(run), "env": env_info(), "precisions": precisions,
                    "config": {"n": n, "documents": docs, "new_tokens": new_tokens, "repeats": repeats,
                               "threads": threads, "eval_threads": eval_threads,
                               "precisions": {p: {"dtype": PRECISIONS[p][0], "quantize": PRECISIONS[p][1]}
                                              for p in precisions}},
                    "rows": {p: {} for p in precisions}}
    rows = result["rows"]

    log("peak RSS of a fresh process loading the run ...")
    for p in precisions:
        rows[p]["rss"] = measure_rss(run, p)
    if rss_size:
        with tempfile.TemporaryDirectory(prefix="nmm-bench-memory-") as tmp:
            big = Path(tmp) / "big"
            info = make_rss_run(run, big, *rss_size)
            log(f"peak RSS on a random {info['parameters'] / 1e6:.0f} M-parameter model "
                f"({info['file_mb']:.0f} MB fp32 file) ...")
            result["rss_model"] = info
            for p in precisions:
                rows[p]["rss_big"] = measure_rss(big, p)
                if p in ("fp32", "bf16"):
                    rows[p]["rss_big_before"] = measure_rss(big, p, mode="before")

    set_threads(threads)
    pipes = {p: load_at(run, p) for p in precisions}
    for p, pipe in pipes.items():
        wb = weight_bytes(pipe.model)
        rows[p]["weights"] = {"total_bytes": wb["total"], "linear_bytes": wb["linear"]}
    ref_w = rows["fp32"]["weights"]
    for p in precisions:
        w = rows[p]["weights"]
        w["total_vs_fp32"] = round(w["total_bytes"] / ref_w["total_bytes"], 4)
        w["linear_vs_fp32"] = round(w["linear_bytes"] / max(ref_w["linear_bytes"], 1), 4)

    log("logits on held-out documents ...")
    documents = heldout_documents(pipes["fp32"], cfg, docs, seed=(cfg.eval.seed if cfg else 0) + 7)
    ref = logits_of(pipes["fp32"], documents)
    for p, pipe in pipes.items():
        rows[p]["logits"] = logit_error(ref, ref if p == "fp32" else logits_of(pipe, documents), documents, pipe.vocab)

    log("decode speed ...")
    for p, speed in decode_speed(pipes, new_tokens=new_tokens, repeats=repeats).items():
        rows[p]["decode"] = speed

    if cfg is not None and "shapes" in cfg.data.source.split("+") and "image" in pipes["fp32"].codecs.modalities:
        log(f"judged accuracy, n = {n} per task and split ...")
        set_threads(eval_threads)
        items = {}
        with tempfile.TemporaryDirectory(prefix="nmm-bench-memory-eval-") as tmp:
            for p, pipe in pipes.items():
                t0 = time.perf_counter()
                out = Path(eval_dir) / p if eval_dir else Path(tmp) / p
                rows[p]["judged"], items[p] = judged(pipe, load_config(run / "config.yaml"), out, n, log=lambda *a: None)
                rows[p]["eval_seconds"] = round(time.perf_counter() - t0, 1)
                log(f"  {p}: " + ", ".join(f"{t} {s}: {v['value']:.3f}" for t, sp in rows[p]["judged"].items()
                                            for s, v in sp.items()))
        for p in precisions:
            if p == "fp32":
                continue
            rows[p]["judged_vs_fp32"] = {
                t: {s: paired_difference(items[p][t][s], items["fp32"][t][s]) for s in items[p][t]} for t in items[p]}
    else:
        result["judged_note"] = "no shapes-world evaluation for this run's data source"
    return result


# ---- tables -------------------------------------------------------------------------------------------
def _ci(v: dict, pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(v['value'])} [{f(v['ci_low'])}, {f(v['ci_high'])}]"


def tables(result: dict) -> list:
    from rich.table import Table

    rows, precs = result["rows"], result["precisions"]
    mem = Table(title=f"memory of {result['run']}", caption=(
        "weights: parameters + buffers as loaded; linear: the linear layers' part; load peak / resident: a fresh "
        "process running nmm.load, above its baseline after imports"))
    for col in ("precision", "weights MB", "x fp32", "linear MB", "linear x fp32", "load peak MB", "resident MB"):
        mem.add_column(col, justify="right")
    for p in precs:
        w, rss = rows[p]["weights"], rows[p]["rss"]
        mem.add_row(p, f"{w['total_bytes'] / MB:.3f}", f"{w['total_vs_fp32']:.3f}", f"{w['linear_bytes'] / MB:.3f}",
                    f"{w['linear_vs_fp32']:.3f}", f"{rss['load_peak_mb']:.1f}", f"{rss['resident_mb']:.1f}")
    out = [mem]
    if "rss_model" in result:
        info = result["rss_model"]
        big = Table(title=f"peak RSS loading a random {info['parameters'] / 1e6:.0f} M-parameter model of the same "
                          f"architecture (d_model {info['d_model']}, {info['n_layers']} layers, "
                          f"{info['file_mb']:.0f} MB fp32 file)",
                    caption="before: what nmm.load did until now (an fp32 model, the whole file read, "
                            "load_state_dict, then a cast)")
        for col in ("precision", "weights MB", "load peak MB", "resident MB", "seconds", "before: peak MB",
                    "before: seconds"):
            big.add_column(col, justify="right")
        for p in precs:
            r, b = rows[p]["rss_big"], rows[p].get("rss_big_before")
            big.add_row(p, f"{r['weights_mb']:.0f}", f"{r['load_peak_mb']:.0f}", f"{r['resident_mb']:.0f}",
                        f"{r['seconds']:.2f}", f"{b['load_peak_mb']:.0f}" if b else "-", f"{b['seconds']:.2f}" if b else "-")
        out.append(big)
    qual = Table(title="logits and decoding against fp32", caption=(
        f"{rows[precs[0]]['logits']['documents']} held-out documents, every position and vocabulary entry (fp32 "
        f"logits' std {rows['fp32']['logits']['fp32_logit_std']:.2f}); loss: held-out next-token loss; tok/s: "
        f"greedy text decoding of the same prompts, {result['config']['new_tokens']} new tokens, "
        f"{result['config']['threads']} thread(s), precisions taking turns; same rows / prefix b8: the batch-8 "
        "continuations identical to fp32's, and their mean share of tokens before the first difference"))
    for col in ("precision", "max |dlogit|", "mean |dlogit|", "top-1 agree", "loss", "tok/s b1", "tok/s b8",
                "same rows b8", "same prefix b8"):
        qual.add_column(col, justify="right")
    for p in precs:
        lg, dec = rows[p]["logits"], rows[p]["decode"]
        b8 = dec["batch_8"]
        qual.add_row(p, f"{lg['max_abs']:.2e}", f"{lg['mean_abs']:.2e}", f"{lg['top1_agreement']:.2%}",
                     f"{lg['heldout_loss']:.4f}", f"{dec['batch_1']['tokens_per_s']:.0f}",
                     f"{b8['tokens_per_s']:.0f}", f"{b8['same_tokens_as_fp32']:.0%}", f"{b8['prefix_agreement']:.0%}")
    out.append(qual)
    if any("judged" in rows[p] for p in precs):
        judged_t = Table(title=f"judged accuracy, % (95% bootstrap CI), n = {result['config']['n']} per split",
                         caption="second line: the paired difference against fp32 on the same items, in points "
                                 "(95% CI), and how many items' scores changed")
        judged_t.add_column("task / split")
        for p in precs:
            judged_t.add_column(p, justify="right")
        for t in rows["fp32"].get("judged", {}):
            for split in rows["fp32"]["judged"][t]:
                cells = []
                for p in precs:
                    v = rows[p]["judged"][t][split]
                    d = rows[p].get("judged_vs_fp32", {}).get(t, {}).get(split)
                    cell = _ci(v)
                    if d:
                        cell += (f"\n{100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
                                 f" ({d['items_changed']} changed)")
                    cells.append(cell)
                judged_t.add_row(f"{t}\n{split}", *cells)
        out.append(judged_t)
    return out


# ---- computed footprints of a 7B model -------------------------------------------------------------
def computed_footprint(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                       qk_norm_params_per_layer: int = 0) -> dict:
    """Weights of a Llama/Chameleon-shaped model at each precision, computed from its dimensions (GB,
    1e9 bytes): every linear layer (q/k/v/o, gate/up/down, the LM head) int8 + an fp32 (or bf16) scale per
    output row; the embedding and norms in the floating dtype."""
    hd = hidden // heads
    attn = hidden * (heads * hd) * 2 + hidden * (kv_heads * hd) * 2
    mlp = 3 * hidden * ffn
    linear = layers * (attn + mlp) + vocab * hidden
    rows = layers * (heads * hd + 2 * kv_heads * hd + hidden + 2 * ffn + hidden) + vocab
    other = vocab * hidden + layers * (2 * hidden + qk_norm_params_per_layer) + hidden
    params = linear + other
    gb = 1e9
    return {"parameters": params, "linear_parameters": linear,
            "fp32_gb": 4 * params / gb, "bf16_gb": 2 * params / gb,
            "int8_gb": (linear + 4 * rows + 4 * other) / gb, "int8+bf16_gb": (linear + 2 * rows + 2 * other) / gb,
            "largest_tensor": vocab * hidden}


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(*argv[1:4])))
        return
    raise SystemExit("usage: nmm bench memory [RUN] (this module's command line is for its own child processes)")


if __name__ == "__main__":
    _main(sys.argv[1:])
