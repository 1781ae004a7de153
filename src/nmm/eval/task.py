"""The evaluation task interface, the context tasks run in, and the task registry.

A task is one small module in `nmm/eval/tasks/`: a `Task` subclass decorated with `@register`.
The harness discovers every module in that package, so adding a task touches no other file.

A task splits its work into four steps, so the scorer can be tested on its own:

    items   = task.build(ctx, split)            # inputs and ground truth, deterministic from the seed
    outputs = task.predict(ctx, items)          # the model's outputs, batched through ctx.pipe
    outputs = task.oracle(ctx, items)           # or: ground-truth outputs (scorer must give ~100%)
    result  = task.score(ctx, split, items, outputs)   # -> SplitResult: metrics with intervals

Fine-tuning tasks (digits, Fashion-MNIST) fit the same shape: `prepare(ctx)` trains an adapted
copy of the model once (and may cache it under `ctx.cache_dir`), `predict` uses that copy.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nmm.errors import InputError
from nmm.eval.stats import DEFAULT_RESAMPLES, Estimate, bootstrap_mean


@dataclass
class SplitResult:
    """What one task produced on one split."""

    metrics: dict[str, Estimate]
    # Examples for the report (the first few items): each has "title" (text under the picture)
    # and "ok" (the verdict), plus any task-specific fields. JSON-serialisable.
    samples: list[dict] = field(default_factory=list)
    # Pictures for the same examples, (K, H, W', 3) uint8, one per sample (W' may exceed W when a
    # task shows input and output side by side).
    images: np.ndarray | None = None
    # name -> {"labels": [...], "matrix": [[count]] (rows = truth, columns = prediction)}
    confusion: dict[str, dict] = field(default_factory=dict)
    # Anything else the harness keeps in memory for callers (not saved), e.g. full-size image stacks.
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class. Subclasses set the class attributes and implement build/predict/score."""

    name: str = ""  # registry key, used on the command line
    title: str = ""  # one line for listings and the report
    kind: str = ""  # M2T (to text), M2G (to image), M2M (mixed in/out), T2T (text only)
    modalities: tuple[str, ...] = ("text",)  # what the model must read/write
    world: str | None = None  # the data source its items come from ("shapes", "speech"); "a+b" runs have both
    splits: tuple[str, ...] = ("heldout",)
    version: int = 1  # bump when build/score change, so cached results are recomputed
    flat_prefix: str = ""  # flat metric keys: f"{split_prefix}{flat_prefix}_{metric}"
    headline: tuple[str, ...] = ()  # the metrics a comparison shows first
    lower_is_better: frozenset[str] = frozenset()
    report_samples: int = 24  # examples kept for the report

    def unavailable(self, ctx: EvalContext) -> str | None:
        """Why this task cannot run for this model, or None."""
        missing = [m for m in self.modalities if m not in ctx.modalities]
        if missing:
            return (f"needs the {', '.join(missing)} modality; this model has "
                    f"{', '.join(sorted(ctx.modalities))}")
        if self.world is not None and self.world not in (ctx.world_name or "").split("+"):
            return f"needs the {self.world} world; this run was trained on data.source={ctx.world_name}"
        return None

    def prepare(self, ctx: EvalContext) -> None:
        """One-off work before the splits run (a fine-tune, a feature network). Default: none."""

    def build(self, ctx: EvalContext, split: str) -> list:
        raise NotImplementedError

    def predict(self, ctx: EvalContext, items: list) -> list:
        raise NotImplementedError

    def oracle(self, ctx: EvalContext, items: list) -> list:
        """Ground-truth outputs in the form `predict` returns them (for testing the scorer)."""
        raise NotImplementedError(f"task {self.name} has no ground-truth outputs")

    def score(self, ctx: EvalContext, split: str, items: list, outputs: list) -> SplitResult:
        raise NotImplementedError

    def run(self, ctx: EvalContext, split: str) -> SplitResult:
        items = self.build(ctx, split)
        return self.score(ctx, split, items, self.predict(ctx, items))

    def flat_key(self, split: str, metric: str) -> str:
        prefix = "" if split == "heldout" else f"{split}_"
        return f"{prefix}{self.flat_prefix or self.name}_{metric}"

    def better(self, metric: str) -> str:
        return "lower" if metric in self.lower_is_better else "higher"

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "kind": self.kind, "modalities": list(self.modalities),
                "world": self.world, "splits": list(self.splits), "headline": list(self.headline)}


@dataclass
class EvalContext:
    """Everything a task may use: the pipeline, config, world, judge, caches and progress."""

    pipe: Any  # nmm.api.Pipeline
    cfg: Any  # nmm.config.RunConfig
    modalities: frozenset[str]
    world_name: str | None = None
    world: Any = None  # ShapesWorld when world_name == "shapes"
    judge: Any = None  # ShapesJudge for that world
    cache_dir: Path = Path(".")
    log: Callable[[str], None] = print
    advance: Callable[[int], None] = lambda n: None  # progress: n more items done
    memo: dict = field(default_factory=dict)  # shared by the tasks of one evaluate_tasks call
    options: dict = field(default_factory=dict)  # task name -> task-specific knobs (tests, experiments)

    @property
    def ec(self):
        return self.cfg.eval

    @property
    def resamples(self) -> int:
        return int(getattr(self.ec, "bootstrap_resamples", DEFAULT_RESAMPLES))

    def seed(self, *parts: str) -> int:
        """A stable seed per purpose (task, split, metric), derived from eval.seed."""
        return (self.ec.seed * 1_000_003 + zlib.crc32("/".join(parts).encode())) % 2**32

    def mean(self, values: Sequence[float], *parts: str) -> Estimate:
        return bootstrap_mean(values, seed=self.seed(*parts), resamples=self.resamples)

    def chunks(self, items: Sequence, size: int | None = None) -> Iterator[Sequence]:
        """Batches of `items`, advancing the progress bar after each."""
        size = size or self.ec.batch_size
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            yield chunk
            self.advance(len(chunk))

    def generate_images(self, prompts: list[str]) -> np.ndarray:
        """Text -> images (N, H, W, 3) uint8 with the eval sampling settings.

        Memoised on the prompt list, so tasks that judge the same generations differently (the
        GenEval categories and the Fréchet distance) sample them once.
        """
        key = ("generate_images", tuple(prompts))
        if key in self.memo:
            self.advance(len(prompts))
            return self.memo[key]
        ec, out = self.ec, []
        for i, chunk in enumerate(self.chunks(prompts)):
            # One seed per batch: reproducible for a fixed batch_size, and batches differ.
            out.append(self.pipe.generate_images(list(chunk), cfg_scale=ec.cfg_scale, temperature=ec.temperature,
                                                 top_k=ec.top_k, top_p=ec.top_p, seed=ec.seed + i,
                                                 batch_size=len(chunk)))
        self.memo[key] = np.concatenate(out)
        return self.memo[key]


# ---- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}
_discovered = False


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"two tasks are named {cls.name!r}: {type(_REGISTRY[cls.name]).__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    """Import every module of `nmm.eval.tasks` once; each registers its tasks on import."""
    global _discovered
    if _discovered:
        return
    import nmm.eval.tasks as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


KIND_ORDER = ("M2T", "M2G", "M2M", "T2T")


def all_tasks() -> list[Task]:
    """Every registered task: understanding first, then generation, mixed, text-only; in order of
    registration within a kind (modules are imported alphabetically)."""
    _discover()
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(_REGISTRY.values(), key=lambda t: rank.get(t.kind, len(rank)))


def get_task(name: str) -> Task:
    _discover()
    if name not in _REGISTRY:
        raise InputError(f"unknown eval task '{name}' (available: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def resolve_tasks(tasks: Sequence[str | Task] | str | None) -> list[Task]:
    """None -> every registered task; "a,b" or ["a", task] -> those tasks, in order, without repeats."""
    if tasks is None:
        return all_tasks()
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    out: list[Task] = []
    for t in tasks:
        task = t if isinstance(t, Task) else get_task(t)
        if task.name not in {x.name for x in out}:
            out.append(task)
    if not out:
        raise InputError("no eval tasks selected")
    return out
