"""`RUN_DIR/eval/results.json`: reading, checking and writing evaluation results.

One file per run, rewritten atomically after every task, so an interrupted evaluation keeps what
it finished. Layout (format "nmm-eval/1"):

    {"format": "nmm-eval/1", "updated": "...", "git": "...", "config_hash": "...", "weights": "...",
     "eval_config": {...},
     "tasks":   {"shapes_t2i": {"status": "done", "version": 1, "config_hash": ..., "weights": ...,
                                "git": ..., "finished": "...", "seconds": 12.3, "splits": [...]},
                 "audio_captions": {"status": "skipped", "reason": "needs the audio modality ..."}},
     "records": [{"task", "split", "metric", "value", "ci_low", "ci_high", "n", "better", "key"}],
     "metrics": {"m2g_judged_accuracy": 0.41, ...}}     # flat view of the records, by "key"

A file that cannot be read as this layout raises `EvalResultsError` and is never overwritten.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from nmm.errors import NmmError
from nmm.utils import atomic_write_json

FORMAT = "nmm-eval/1"
STATUSES = ("done", "skipped", "failed")
RECORD_KEYS = ("task", "split", "metric", "value", "ci_low", "ci_high", "n")


class EvalResultsError(NmmError):
    """An evaluation results file that exists but cannot be used."""


def empty_results() -> dict:
    return {"format": FORMAT, "tasks": {}, "records": [], "metrics": {}}


def read_results(path: Path) -> dict | None:
    """The results in `path`; None if there are none yet (no file, or one from an older nmm).

    Raises EvalResultsError, naming the file and the problem, for anything unreadable.
    """
    path = Path(path)
    if not path.exists():
        return None
    advice = "move or delete it to evaluate from scratch (it has been left as it is)"
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise EvalResultsError(f"{path}: not a text file; {advice}") from None
    except json.JSONDecodeError as e:
        raise EvalResultsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {advice}") from None
    except OSError as e:
        raise EvalResultsError(f"{path}: cannot be read ({e.strerror}); {advice}") from None
    if isinstance(data, dict) and "format" not in data and isinstance(data.get("metrics"), dict):
        return None  # written by the first-generation runner: nothing to resume from
    problem = _problem(data)
    if problem:
        raise EvalResultsError(f"{path}: {problem}; {advice}")
    return data


def _problem(data) -> str | None:
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if data.get("format") != FORMAT:
        return f"unknown format {data.get('format')!r} (this nmm reads {FORMAT!r})"
    if not isinstance(data.get("tasks"), dict) or not isinstance(data.get("records"), list):
        return "missing its 'tasks' object or 'records' list"
    for name, info in data["tasks"].items():
        if not isinstance(info, dict) or info.get("status") not in STATUSES:
            return f"task {name!r} has no valid status (one of {', '.join(STATUSES)})"
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict) or any(k not in r for k in RECORD_KEYS):
            return f"record {i} lacks one of {', '.join(RECORD_KEYS)}"
        if not all(r[k] is None or _is_number(r[k]) for k in ("value", "ci_low", "ci_high")) or not _is_int(r["n"]):
            return f"record {i} ({r.get('task')}/{r.get('split')}/{r.get('metric')}) has a non-numeric value"
    return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: float) -> float | None:
    # JSON has no NaN or infinity; an undefined bound is stored as null.
    return float(x) if x is not None and math.isfinite(x) else None


def make_record(task, split: str, metric: str, estimate) -> dict:
    return {"task": task.name, "split": split, "metric": metric, "value": _finite(estimate.value),
            "ci_low": _finite(estimate.ci_low), "ci_high": _finite(estimate.ci_high), "n": int(estimate.n),
            "better": task.better(metric), "key": task.flat_key(split, metric)}


def flat_metrics(records: list[dict]) -> dict:
    return {r.get("key") or f"{r['task']}/{r['split']}/{r['metric']}": r["value"] for r in records}


def write_results(path: Path, data: dict) -> None:
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    data["metrics"] = flat_metrics(data["records"])
    atomic_write_json(path, data)


def load_run_results(run_dir: Path) -> dict:
    """For comparisons: the results of a run directory (or of its eval/ folder, or a results file)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "eval" / "results.json", run_dir / "results.json", run_dir):
        if path.is_file():
            data = read_results(path)
            if data is None:
                raise EvalResultsError(f"{path}: written by an older nmm; run `nmm eval {run_dir}` again")
            return data
    if not run_dir.exists():
        raise EvalResultsError(f"{run_dir}: no such run directory")
    raise EvalResultsError(f"{run_dir}: no eval/results.json; run `nmm eval {run_dir}` first")
