"""``varmerge`` with a kill point, for the crash-and-resume tests (tests/test_resume.py).

    python tests/fault_launcher.py STAGE[:NAME] CLI-ARGS...

runs the CLI in this process with one stage function wrapped so that the process SIGKILLs itself
when that stage starts — as abrupt as a machine losing power, so nothing gets to clean up. The
flows run their tasks in this process (thread runner), so the wrapped functions are the ones the
tasks call. Stages (and names):

* ``finetune`` (task name) — a task's finetune, before any training;
* ``sweep`` (merge method) — a merge method's α sweep, before merging;
* ``multitask[:N]`` — the N-th multitask finetune of the process (default the first), before training;
* ``register`` — the final model, after it is logged to MLflow and before it is registered.

These stages are too short, or show no file when they start, to be killed from outside at a
deterministic point. Production code has no hook for this: the launcher patches module attributes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before(module, name: str, matches) -> None:
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if matches(args, kwargs):
            _die()
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def install(fault: str) -> None:
    """Arm the kill point ``STAGE[:NAME]``."""
    import mlflow

    from varmerge import pipeline

    stage, _, want = fault.partition(":")
    if stage == "finetune":  # finetune_task(plan, base, task, ...)
        _kill_before(pipeline, "finetune_task", lambda a, k: not want or a[2].name == want)
    elif stage == "sweep":  # sweep_and_score(plan, method, ...)
        _kill_before(pipeline, "sweep_and_score", lambda a, k: not want or a[1] == want)
    elif stage == "multitask":  # multitask:N: before the N-th multitask finetune (default the first)
        calls = []

        def nth(a, k) -> bool:
            calls.append(1)
            return len(calls) == int(want or 1)

        _kill_before(pipeline, "multitask_finetune", nth)
    elif stage == "register":
        _kill_before(mlflow, "register_model", lambda a, k: True)
    else:
        raise SystemExit(f"unknown fault stage {stage!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from flows.cli import app

    app(sys.argv[2:])
