"""The real training of a run: each task's finetune (its posterior, by the method's registered
fit function, :mod:`varmerge.posterior_methods`) and the multitask finetune at a chosen α."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from varmerge import models, train
from varmerge.learned import chance
from varmerge.pipeline.data import TaskData
from varmerge.pipeline.sweeps import score_sweep
from varmerge.pipeline.theta0 import carried_hessian
from varmerge.plan import RunPlan
from varmerge.posterior import DiagonalGaussian
from varmerge.posterior_methods import FitJob, get_method
from varmerge.progress import Report, lightning_callbacks
from varmerge.train import Training


def check_accelerator(accelerator: str) -> None:
    """Fail fast when a GPU is requested where none exists (``auto`` falls back to the CPU)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"accelerator: {accelerator} was requested but no CUDA device is visible; "
            "use accelerator: auto (GPU when present, else CPU) or cpu"
        )
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"unknown accelerator {accelerator!r}; use auto, cpu or gpu")


def finetune_task(
    plan: RunPlan,
    base: nn.Module,
    task: TaskData,
    *,
    report: Report | None = None,
    logger=None,
    resume_dir: str | os.PathLike | None = None,
    prior: DiagonalGaussian | None = None,
):
    """Finetune a copy of ``base`` on one task with the plan's posterior method; returns
    ``(posterior, finetuned trainable weights)``.

    ``prior``: θ0's posterior; IVON finetunes start from its Hessian (:func:`carried_hessian`).
    ``logger`` is any Lightning logger (the flows pass an MLflow logger bound to the task's run);
    ``report`` is told the optimiser steps. ``resume_dir``: a folder for the pieces that finish
    before the posterior does (each MultiIVON / SoupIVON run, the AdamW-trained weights before the
    squared-gradient pass), written atomically as they complete and reused when present, so a job
    killed mid-posterior redoes only what was unfinished; the caller keys the folder by the
    inputs and removes it once the posterior is saved.
    """
    ft = plan.finetune
    optimizer = dataclasses.replace(ft.optimizer, initial_hess=carried_hessian(plan.cfg, prior, ft.optimizer.name))
    trainer = dataclasses.replace(ft.trainer, logger=logger, callbacks=lightning_callbacks(report))
    resume = Path(resume_dir) if resume_dir is not None else None
    job = FitJob(copy.deepcopy(base), task, Training(optimizer, trainer, ft.seed), plan.posterior_options, resume)
    return get_method(plan.cfg.posterior.method).fit(job)


def multitask_finetune(
    plan: RunPlan,
    base: nn.Module,
    tasks: Sequence[TaskData],
    alpha: Sequence[float],
    *,
    report: Report | None = None,
    logger=None,
    prior: DiagonalGaussian | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """The real finetune of Σ_t α_t l_t from θ0; returns the model and its (T,) test accuracies.
    With IVON it starts from ``prior``'s Hessian, as the per-task finetunes do."""
    model = copy.deepcopy(base)
    mt = plan.multitask  # IVON's ess defaults to the examples of all tasks; full VON configs finetune with IVON
    opt = dataclasses.replace(mt.optimizer, initial_hess=carried_hessian(plan.cfg, prior, mt.optimizer.name))
    tr = dataclasses.replace(mt.trainer, logger=logger, callbacks=lightning_callbacks(report))
    data = [train.as_data(*t.train) for t in tasks]
    model = train.fit_multitask(model, data, torch.as_tensor(alpha, dtype=torch.float64), opt, tr, seed=mt.seed)
    sd = {k: v.unsqueeze(0) for k, v in models.trainable_state_dict(model).items()}
    scores = score_sweep(model, sd, tasks)
    return model, scores["accuracy"][0]


def learning_scores(base: nn.Module, posteriors: Sequence, tasks: Sequence[TaskData]) -> dict[str, list[float]]:
    """θ0's (``base``) and each task's finetune's (its posterior's mean) test accuracy on that
    task's own test set, and chance there (its most common test label's share)."""
    start = models.trainable_state_dict(base)
    theta0, finetuned = [], []
    for post, task in zip(posteriors, tasks, strict=True):  # θ0 and the finetune, on this task only
        mean = post.diagonal().mean
        pair = {k: torch.stack([v, mean[k].to(v.dtype)]) for k, v in start.items()}
        acc = score_sweep(base, pair, [task])["accuracy"][:, 0]
        theta0.append(float(acc[0]))
        finetuned.append(float(acc[1]))
    return {"theta0": theta0, "finetuned": finetuned, "chance": [chance(t.test[1]) for t in tasks]}
