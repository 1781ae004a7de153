"""Evaluation: tasks (nmm.eval.tasks), the harness, results with intervals, reports, comparisons.

    from nmm.eval import evaluate_tasks, compare_runs, list_tasks
"""

from nmm.eval.compare import compare_runs
from nmm.eval.harness import EvalOutcome, evaluate_tasks
from nmm.eval.results import EvalResultsError
from nmm.eval.task import EvalContext, SplitResult, Task, all_tasks, get_task, register


def list_tasks() -> list[dict]:
    """Name, title, kind, modalities, world and splits of every registered task."""
    return [t.describe() for t in all_tasks()]


__all__ = ["EvalContext", "EvalOutcome", "EvalResultsError", "SplitResult", "Task", "all_tasks", "compare_runs",
           "evaluate_tasks", "get_task", "list_tasks", "register"]
