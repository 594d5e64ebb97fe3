"""Fault injection for the crash-and-resume tests (tests only; inert unless the variable is set).

``VARMERGE_FAULT_AT=<stage>[:<name>]`` makes the process SIGKILL itself when that stage starts:
as abrupt as a machine losing power, so nothing gets to clean up. Stages (and names):

* ``finetune`` (task name) — a task's finetune, before any training;
* ``sweep`` (merge method) — a merge method's α sweep, before merging;
* ``multitask`` — a multitask finetune, before training;
* ``register`` — the final model, after it is logged to MLflow and before it is registered.

``tests/test_resume.py`` uses it for stages too short, or with no file appearing at their start,
to be killed from outside at a deterministic point.
"""

from __future__ import annotations

import os
import signal

ENV = "VARMERGE_FAULT_AT"


def fault_point(stage: str, name: str = "") -> None:
    """SIGKILL this process if ``VARMERGE_FAULT_AT`` names ``stage`` (and ``name``, if it gives one)."""
    want = os.environ.get(ENV)
    if not want:
        return
    want_stage, _, want_name = want.partition(":")
    if want_stage == stage and (not want_name or want_name == name):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
