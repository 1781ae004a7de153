"""Run by tests/train/test_kill_resume.py: train, kill -9 at N moments, resume each time.

    python kill_driver.py RUN_DIR REFERENCE_DIR KILLS SEED [overrides...]

The driver imports nmm once and forks each training attempt (a child that resumes from the run's
latest checkpoint), so an attempt starts in a fraction of a second rather than paying Python's and
torch's import again. The parent never computes with more than one thread before forking (fork-safe).
Half the kills land after a random number of steps (zero: during start-up) plus a random
delay; the other half the moment a checkpoint is being written (a
`.tmp-*` folder exists), the case an atomic checkpoint must survive. Then an uninterrupted run of the
same config trains in REFERENCE_DIR. Prints one JSON line: kills, mid-checkpoint kills, attempts.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from nmm.config import load_config
from nmm.perf import gemm_peak
from nmm.train.trainer import train


def attempt(run: Path, overrides: list[str], resume: bool) -> int:
    pid = os.fork()
    if pid == 0:  # the child trains; its exit code says whether it finished
        try:
            train(load_config("shapes-tiny", overrides), run, resume=resume, show_progress=False, log=lambda *a: None)
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            print(f"attempt failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            os._exit(3)
    return pid


def logged_steps(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def main(run: Path, reference: Path, kills: int, seed: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    gemm_peak("cpu", torch.float32)  # measured once here; every child inherits the cached number
    rng = random.Random(seed)
    killed, mid_checkpoint, attempts = 0, 0, 0
    while True:
        resume = (run / "checkpoints" / "latest.json").exists()
        pid = attempt(run, overrides, resume)
        attempts += 1
        if killed < kills:
            # Odd kills: the moment a checkpoint folder is being written. Even kills: after 0-3 more
            # logged steps (0: during start-up), plus up to 50 ms, so the run never finishes early.
            at_checkpoint = killed % 2 == 1
            target, extra = logged_steps(run) + rng.randint(0, 3), rng.uniform(0.0, 0.05)
            deadline = time.time() + 60
            while time.time() < deadline:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break  # it finished (or failed) before the kill
                if at_checkpoint and any((run / "checkpoints").glob(".tmp-step_*")):
                    break
                if not at_checkpoint and logged_steps(run) >= target:
                    time.sleep(extra)
                    break
                time.sleep(0.002)
            try:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status):
                    killed += 1
                    mid_checkpoint += at_checkpoint and any((run / "checkpoints").glob(".tmp-step_*"))
                    continue
            except (ProcessLookupError, ChildProcessError):
                pass
            # it had exited already: finished, or failed
            if (run / "train_summary.json").exists():
                break
            raise SystemExit("a training attempt failed; see stderr")
        _, status = os.waitpid(pid, 0)
        if os.WEXITSTATUS(status) != 0:
            raise SystemExit("the last training attempt failed; see stderr")
        break
    pid = attempt(reference, overrides, False)
    _, status = os.waitpid(pid, 0)
    if os.WEXITSTATUS(status) != 0:
        raise SystemExit("the reference run failed; see stderr")
    print(json.dumps({"kills": killed, "mid_checkpoint_kills": int(mid_checkpoint), "attempts": attempts}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
