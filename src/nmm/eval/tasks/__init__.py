"""Evaluation tasks, one per module. Each module registers its task(s) with `@register` on import;
the harness imports every module here (names starting with "_" excepted), so a new task is just a
new file. See `nmm.eval.task` for the interface and docs/evaluation.md for each task's metrics."""
