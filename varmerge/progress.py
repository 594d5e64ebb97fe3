"""Progress of the long steps: θ0's pretraining, each task's finetune, each sweep's blocks of α,
each multitask finetune.

A step reports ``(done, total, note)`` to the :class:`Report` its caller gives it, and the caller
decides where that goes: a terminal bar (``varmerge demo`` / ``run``), a Prefect progress
artifact (the flows' tasks), or nowhere (``None``). :class:`StepProgress` reports Lightning's
optimiser steps; a fit made of several runs (MultiIVON, soups) says which run in ``note``.
"""

from __future__ import annotations

from typing import Protocol

import lightning as L


class Report(Protocol):
    def __call__(self, done: int, total: int, note: str = "") -> None: ...


class StepProgress(L.Callback):
    """A Lightning callback reporting ``(global step, max steps)`` at the start of each fit and
    after every training batch."""

    def __init__(self, report: Report):
        self.report = report
        self.fits = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fits += 1
        self._send(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._send(trainer)

    def _send(self, trainer: L.Trainer) -> None:
        self.report(trainer.global_step, trainer.max_steps, f"run {self.fits}" if self.fits > 1 else "")


def lightning_callbacks(report: Report | None) -> tuple:
    """The Lightning callbacks that tell ``report`` the optimiser steps (none without a report)."""
    return () if report is None else (StepProgress(report),)
