"""`evaluate_tasks`: run registered tasks on a model, resumably, and write results and the report.

    from nmm.eval import evaluate_tasks
    outcome = evaluate_tasks(pipe, cfg, run_dir / "eval")              # every task the model allows
    outcome = evaluate_tasks(pipe, cfg, run_dir / "eval", tasks="shapes_t2i,shapes_fid", force=True)

A task finished earlier for the same weights, eval config and task version is kept as it is in
results.json and not run again, unless `force`. Tasks the model cannot do (a missing modality, a
different data world) are recorded as skipped with the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nmm.eval.judge import ShapesJudge
from nmm.eval.results import empty_results, make_record, read_results, write_results
from nmm.eval.task import EvalContext, SplitResult, Task, all_tasks, resolve_tasks
from nmm.utils import atomic_write_bytes, atomic_write_json


@dataclass
class EvalOutcome:
    data: dict  # what results.json now holds
    fresh: dict[str, dict[str, SplitResult]] = field(default_factory=dict)  # tasks run by this call
    path: Path | None = None
    report: Path | None = None

    @property
    def metrics(self) -> dict:
        return self.data["metrics"]

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    @property
    def failed(self) -> dict[str, str]:
        return {n: t.get("error", "") for n, t in self.data["tasks"].items() if t["status"] == "failed"}


# ---- identity of what is evaluated -------------------------------------------------------------

def git_revision() -> str | None:
    """The checked-out commit of the source tree nmm runs from, read from .git (no git process)."""
    for parent in Path(__file__).resolve().parents:
        dot_git = parent / ".git"
        if dot_git.is_file():  # a worktree: ".git" names the real git directory
            dot_git = (parent / dot_git.read_text().split("gitdir:", 1)[-1].strip()).resolve()
        if not dot_git.is_dir():
            continue
        try:
            head = (dot_git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head[:12]
            ref = head[4:].strip()
            common = dot_git / "commondir"
            roots = [dot_git] + ([(dot_git / common.read_text().strip()).resolve()] if common.exists() else [])
            for root in roots:
                if (root / ref).exists():
                    return (root / ref).read_text().strip()[:12]
                packed = root / "packed-refs"
                if packed.exists():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0][:12]
        except OSError:
            return None
        return None
    return None


def config_hash(cfg) -> str:
    """Hash of everything in the config that changes what evaluation measures."""
    parts = {"eval": asdict(cfg.eval), "data": asdict(cfg.data), "image_size": cfg.image.image_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def weights_fingerprint(pipe) -> str:
    """Hash of the model's and the image tokenizer's weights: a retrained run never reuses results."""
    h = hashlib.sha256()
    modules = [pipe.model] + [m for m in (getattr(pipe.codecs, "image", None),) if hasattr(m, "state_dict")]
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()[:12]


def model_modalities(pipe) -> frozenset[str]:
    """The modalities a pipeline reads and writes: text, plus one per non-text codec it carries."""
    return frozenset({"text", *pipe.codecs.modalities})


def make_context(pipe, cfg, cache_dir: Path | None = None, log=print, options: dict | None = None) -> EvalContext:
    world_name = cfg.data.source
    world = judge = None
    if "shapes" in world_name.split("+"):
        from nmm.train.prepare import make_world

        world = make_world(cfg)
        judge = ShapesJudge(world)
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("NMM_CACHE_DIR", Path.home() / ".cache" / "nmm"))
    return EvalContext(pipe, cfg, model_modalities(pipe), world_name, world, judge, cache, log,
                       options=dict(options or {}))


# ---- the harness ----------------------------------------------------------------------------------

def evaluate_tasks(pipe, cfg, out_dir: Path, tasks=None, log=print, force: bool = False,
                   progress: bool | None = None, cache_dir: Path | None = None, report: bool = True,
                   options: dict | None = None, strict: bool = False) -> EvalOutcome:
    """Run `tasks` (names, "a,b", Task objects; None = all registered) and update out_dir/results.json.

    progress: a rich progress bar per task and split (None: only when stderr is a terminal).
    cache_dir: where helper models (the Fréchet feature network) are cached; default
    $NMM_CACHE_DIR or ~/.cache/nmm. options: task name -> task-specific knobs. A task that raises
    is recorded as failed and the others still run, unless `strict` (then the error propagates,
    after the finished tasks are saved).
    """
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    selected = resolve_tasks(tasks)  # unknown names fail before any work
    data = read_results(path)  # a corrupt file fails before any work, and is left untouched
    if data is None:
        if path.exists():
            log(f"  {path} is from an older nmm: replacing it")
        data = empty_results()
    ctx = make_context(pipe, cfg, cache_dir, log, options)
    identity = {"config_hash": config_hash(cfg), "weights": weights_fingerprint(pipe), "git": git_revision()}
    data.update(identity, eval_config=asdict(cfg.eval))

    to_run = []
    for task in selected:
        reason = task.unavailable(ctx)
        previous = data["tasks"].get(task.name, {})
        if reason:
            log(f"  {task.name}: skipped ({reason})")
            data["tasks"][task.name] = {"status": "skipped", "reason": reason}
            data["records"] = [r for r in data["records"] if r["task"] != task.name]
        elif not force and previous.get("status") == "done" and previous.get("version") == task.version \
                and not is_stale(previous, identity):
            log(f"  {task.name}: kept from {path} (done {previous.get('finished', '?')}; --force reruns it)")
        else:
            to_run.append(task)
    chosen = {t.name for t in selected}
    for name, info in data["tasks"].items():
        if name not in chosen and info["status"] == "done" and is_stale(info, identity):
            log(f"  {name}: results in {path} are from other weights or another config (not re-run: not selected)")

    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = EvalOutcome(data, path=path)
    with _progress_bars(progress) as bars:
        for task in to_run:
            t0 = time.time()
            try:
                results = _run_task(task, ctx, bars)
            except Exception as e:  # one broken task must not lose the others' results
                if strict:
                    write_results(path, data)
                    raise
                log(f"  {task.name}: FAILED: {type(e).__name__}: {e}")
                data["tasks"][task.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc(limit=6)}
                data["records"] = [r for r in data["records"] if r["task"] != task.name]
                write_results(path, data)
                continue
            records = [make_record(task, split, metric, est)
                       for split, res in results.items() for metric, est in res.metrics.items()]
            data["records"] = _ordered([r for r in data["records"] if r["task"] != task.name] + records)
            data["tasks"][task.name] = {"status": "done", "version": task.version, **identity,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "seconds": round(time.time() - t0, 2), "splits": list(results),
                                        "title": task.title, "kind": task.kind}
            for split, res in results.items():
                _save_samples(out_dir, task, split, res)
                log(f"  {task.name} {split}: " + ", ".join(
                    f"{m} {res.metrics[m].value:.3f}" for m in task.headline if m in res.metrics))
            write_results(path, data)  # after every task: an interruption keeps what is done
            outcome.fresh[task.name] = results
    write_results(path, data)
    if report:
        from nmm.eval.html_report import write_eval_report

        outcome.report = write_eval_report(out_dir, data)
    return outcome


def is_stale(info: dict, identity: dict) -> bool:
    """A finished task's results were computed for other weights or another eval config."""
    return any(info.get(k) != identity.get(k) for k in ("config_hash", "weights"))


def headline_records(data: dict) -> list[dict]:
    """The records of each task's headline metrics (all metrics for tasks nmm does not know)."""
    headline = {t.name: set(t.headline) for t in all_tasks()}
    return [r for r in data["records"] if r["metric"] in headline.get(r["task"], {r["metric"]})]


def _run_task(task: Task, ctx: EvalContext, bars) -> dict[str, SplitResult]:
    task.prepare(ctx)
    results = {}
    try:
        for split in task.splits:
            items = task.build(ctx, split)
            ctx.advance = bars.start(f"{task.name} {split}", len(items))
            results[split] = task.score(ctx, split, items, task.predict(ctx, items))
    finally:
        ctx.advance = lambda n: None
    return results


def _ordered(records: list[dict]) -> list[dict]:
    """Records grouped by task in registry order (unknown tasks last), each task's own order kept."""
    order = {t.name: i for i, t in enumerate(all_tasks())}
    return sorted(records, key=lambda r: order.get(r["task"], len(order)))  # stable sort


def _save_samples(out_dir: Path, task: Task, split: str, res: SplitResult) -> None:
    """Report material for one task and split: examples (JSON) and their pictures (npz)."""
    folder = out_dir / "samples"
    atomic_write_json(folder / f"{task.name}.{split}.json",
                      {"task": task.name, "split": split, "samples": res.samples, "confusion": res.confusion})
    images = folder / f"{task.name}.{split}.npz"
    if res.images is not None and len(res.images):
        buf = io.BytesIO()
        np.savez_compressed(buf, images=np.asarray(res.images, dtype=np.uint8))
        atomic_write_bytes(images, buf.getvalue())
    elif images.exists():
        images.unlink()  # stale pictures from an earlier version of the task


class _NoBars:
    def start(self, description: str, total: int):
        return lambda n: None


@contextmanager
def _progress_bars(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield _NoBars()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nmm.progress import console

    class Bars:
        def __init__(self, progress: Progress):
            self.p = progress

        def start(self, description: str, total: int):
            bar = self.p.add_task(description, total=total)
            return lambda n: self.p.advance(bar, n)

    with Progress(TextColumn("[bold]{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as p:
        yield Bars(p)
