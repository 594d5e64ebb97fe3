"""Did the training learn? The gate before money is spent on sweeps and multitask finetunes.

A task's finetune learned when, on its own test set, the finetuned weights (the posterior's mean)
score at least ``margin`` above chance (the share of the task's most common test label: what
always answering it scores) and no more than ``margin`` below θ0 (a finetune that made its own
task worse went wrong). A pretrained θ0 learned when it scores ``margin`` above chance on the
examples it was pretrained on. A run whose finetune did not learn stops with one line naming the
task, the scores and what to change (``gate.stop: false`` says so and goes on).

Pure library code: no prefect, mlflow or files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NotLearned(ValueError):
    """A finetune (or θ0's pretraining) did not learn; the message says which and what to change."""


def chance(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most common label."""
    y = torch.as_tensor(labels).reshape(-1)
    if y.numel() == 0:
        raise ValueError("chance of an empty label set")
    return float(torch.bincount(y.long()).max()) / y.numel()


def finetune_report(
    names: Sequence[str], own: Sequence[float], theta0: Sequence[float], chances: Sequence[float], margin: float
) -> dict:
    """Per task: its finetune's accuracy on its own test set (``own``), θ0's there, chance, and
    whether it learned; ``failed``: the tasks that did not, with why."""
    tasks, failed = {}, {}
    for n, a, b, c in zip(names, own, theta0, chances, strict=True):
        why = None
        if a < c + margin:
            why = f"not {100 * margin:g} points above chance ({100 * c:.1f} %)"
        elif a < b - margin:
            why = f"below θ0's {100 * b:.1f} %"
        tasks[n] = {"accuracy": float(a), "theta0": float(b), "chance": float(c), "learned": why is None}
        if why:
            failed[n] = why
    return {"margin": margin, "tasks": tasks, "failed": failed}


def finetune_message(report: dict, lr: float, steps: int | None, stop: bool) -> str:
    """One line: which finetunes did not learn, their scores and what to change."""
    tasks = report["tasks"]
    what = "; ".join(
        f"task {n!r}: its finetune scores {100 * tasks[n]['accuracy']:.1f} % on its own test set, {why}"
        for n, why in report["failed"].items()
    )
    advice = (
        f"raise posterior.lr (now {lr:g}) or posterior.steps (now {steps}), lower posterior.ess, "
        "or check the task's labels"
    )
    tail = "gate.stop: false goes on anyway" if stop else "going on (gate.stop: false)"
    return f"the finetunes did not learn — {what}: {advice}; {tail}"


def check_pretrained(accuracy: float, chance_level: float, margin: float, lr: float, steps: int) -> None:
    """Raise :class:`NotLearned` when pretrained θ0 is not ``margin`` above chance on its own examples."""
    if accuracy < chance_level + margin:
        raise NotLearned(
            f"pretraining did not learn: θ0 scores {100 * accuracy:.1f} % on its own examples, chance "
            f"{100 * chance_level:.1f} %: raise pretrain.lr (now {lr:g}) or pretrain.steps (now {steps}); "
            "gate.stop: false goes on anyway"
        )
