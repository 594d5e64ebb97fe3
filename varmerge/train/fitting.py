"""The finetunes: :func:`fit` (one task, with its posterior) and :func:`fit_multitask` (eq. 1).

Both take the model, the data, an :class:`OptimizerSettings` and a :class:`TrainerSettings`;
The run plan (:mod:`varmerge.plan`) builds those from a config.

Posteriors: ``"ivon"`` gives ``DiagonalGaussian.from_ivon`` (precision = ess · (hess +
weight_decay)); ``"adamw"`` the Laplace-style ``N(θ, diag(1/h))`` with ``h = Σ_i (∇l_i)² + δ``
over the training examples (:func:`trained_sg_posterior`, meta optimizer ``"adamw_sg"``);
``"full_von"`` a :class:`~varmerge.posterior.FullGaussian` (:func:`varmerge.train.fit_full_von`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader

from varmerge.posterior import (
    DiagonalGaussian,
    FullGaussian,
    PosteriorMeta,
    add_prior_precision,
    squared_gradient_precision,
)
from varmerge.train.batches import Data, check_alpha, make_loader, num_examples, task_loss
from varmerge.train.modules import SingleTaskModule, WeightedMultitaskModule, ivon_posterior
from varmerge.train.settings import OptimizerSettings, TrainerSettings
from varmerge.train.von import VONSettings, fit_full_von, full_tensors

__all__ = ["adamw_sg_posterior", "fit", "fit_multitask", "trained_sg_posterior"]

_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence Lightning's info banners and the 'few workers' hint (warnings stay on). Always
    silenced: "module(s) in eval mode" (the models train in eval mode on purpose: no dropout,
    so a batch's loss is a deterministic function of the weights)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        if not enabled:
            yield
            return
        with _banners_off():
            yield


@contextlib.contextmanager
def _banners_off() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _lightning_trainer(settings: TrainerSettings) -> L.Trainer:
    """A ``lightning.Trainer`` for ``settings.steps`` steps on one device, without checkpoints."""
    return L.Trainer(
        max_steps=settings.steps,
        max_epochs=-1,
        accelerator=settings.accelerator,
        devices=1,
        logger=settings.logger if settings.logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=settings.progress,
        enable_model_summary=False,
        callbacks=list(settings.callbacks),
        precision=settings.precision,
        num_sanity_val_steps=0,
        log_every_n_steps=settings.log_every_n_steps,
    )


def _check(optimizer: OptimizerSettings, trainer: TrainerSettings, datas: Sequence[Data]) -> OptimizerSettings:
    """The pair checked together, with IVON's ``ess`` resolved to the number of training examples."""
    if optimizer.name == "ivon" and trainer.precision == "16-mixed":
        raise ValueError(
            "precision='16-mixed' uses a gradient scaler, which IVON's sampled gradients cannot go through; "
            "use 32-true or bf16-mixed"
        )
    if optimizer.name != "ivon" or optimizer.ess is not None:
        return optimizer
    sizes = [num_examples(d) for d in datas]
    if any(s is None for s in sizes):
        raise ValueError("cannot infer ess from the training data's length; set OptimizerSettings.ess")
    return dataclasses.replace(optimizer, ess=float(sum(sizes)))


def fit(
    model: nn.Module,
    data: Data,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    *,
    seed: int = 0,
    task: str = "task",
    compute_posterior: bool = True,
    meta: PosteriorMeta | None = None,
) -> tuple[nn.Module, DiagonalGaussian | FullGaussian | None]:
    """Finetune ``model`` (in place, from its current weights θ0) on one task's ``data``.

    ``data`` is ``(x, y)`` tensors, a Dataset (of ``(x, y)`` or dict examples) or a DataLoader.
    Returns ``(model, posterior)``; ``model`` holds the final weights (the IVON / VON mean) and
    comes back on CPU in the train/eval mode it came in. ``posterior`` is a
    :class:`DiagonalGaussian` (``"adamw"`` → meta ``adamw_sg``; ``"ivon"``), a
    :class:`FullGaussian` (``"full_von"``: ``trainer.steps`` full-batch VON iterations), or None
    with ``compute_posterior=False`` (AdamW / IVON). ``meta`` seeds the posterior's metadata.
    """
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta(task=task)
    meta.seed = seed if meta.seed is None else meta.seed
    meta.task = meta.task or task
    if optimizer.name == "full_von":
        x, y = full_tensors(data)
        settings = VONSettings(
            lr=optimizer.lr,
            mc_samples=optimizer.mc_samples,
            num_iters=trainer.steps,
            prior_precision=1.0 if optimizer.prior_precision is None else optimizer.prior_precision,
            seed=seed,
        )
        post = fit_full_von(model, x, y, settings, meta=meta)
        return model, post

    optimizer = _check(optimizer, trainer, [data])
    was_training = model.training
    with _quiet(not trainer.progress):
        L.seed_everything(seed, workers=True, verbose=trainer.progress)
        loader = make_loader(data, trainer.batch_size, shuffle=True, seed=seed, what="train_data")
        module = SingleTaskModule(model, optimizer)
        _lightning_trainer(trainer).fit(module, train_dataloaders=loader)
    model.cpu()
    model.train(was_training)
    if not compute_posterior:
        return model, None
    if optimizer.name == "ivon":
        meta.optimizer = meta.optimizer or "ivon"
        return model, ivon_posterior(model, module.ivon_optimizer, meta)
    return model, trained_sg_posterior(model, data, optimizer, trainer, meta=meta)


def fit_multitask(
    model: nn.Module,
    task_data: Sequence[Data] | Mapping[str, Data],
    alpha: Sequence[float] | Tensor,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    *,
    seed: int = 0,
) -> nn.Module:
    """Multitask finetune of eq. 1 at weighting ``alpha`` (in place, from the model's weights θ0).

    Each step draws one batch of ``trainer.batch_size`` from every task (``CombinedLoader`` in
    ``"max_size_cycle"`` mode: shorter tasks cycle) and minimises ``Σ_t α_t l_t + R0``. Task t's
    loader shuffles with its own generator seeded ``seed + t``, so at ``α = e_0`` the run repeats
    :func:`fit` on task 0 with the same seed step for step. IVON's ``ess`` defaults to the total
    number of examples over all tasks. Returns the model (on CPU).
    """
    if optimizer.name not in ("adamw", "ivon"):
        raise ValueError(f"multitask finetuning supports optimizer 'adamw' or 'ivon', got {optimizer.name!r}")
    if isinstance(task_data, Mapping):
        names, datas = list(task_data), list(task_data.values())
    else:
        datas = list(task_data)
        names = [f"task{t}" for t in range(len(datas))]
    if not datas:
        raise ValueError("task_data is empty")
    a = check_alpha(alpha, len(datas))
    optimizer = _check(optimizer, trainer, datas)
    was_training = model.training
    with _quiet(not trainer.progress):
        L.seed_everything(seed, workers=True, verbose=trainer.progress)
        loaders = [
            make_loader(d, trainer.batch_size, shuffle=True, seed=seed + t, what=f"task_data[{names[t]!r}]")
            for t, d in enumerate(datas)
        ]
        module = WeightedMultitaskModule(model, a, optimizer, task_names=names)
        _lightning_trainer(trainer).fit(module, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    model.cpu()
    model.train(was_training)
    return model


# --------------------------------------------------------------------------------------------
# the AdamW-SG posterior
# --------------------------------------------------------------------------------------------
def trained_sg_posterior(
    model: nn.Module,
    data: Data,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    *,
    meta: PosteriorMeta | None = None,
) -> DiagonalGaussian:
    """The AdamW-SG posterior of an already trained ``model`` (what ``fit`` computes after AdamW).

    Squared gradients over ``data`` in batches of ``trainer.batch_size``, on the GPU when
    ``trainer.accelerator`` allows, plus the prior precision δ (``optimizer.prior_precision``,
    default ``N · optimizer.weight_decay``). Separate from training so a job can persist the
    trained weights first and redo only this pass after a crash.
    """
    delta, n_train = optimizer.prior_precision, num_examples(data)
    if delta is None:
        if n_train is None:
            raise ValueError("cannot infer N for the prior precision; set OptimizerSettings.prior_precision")
        delta = n_train * optimizer.weight_decay
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    if meta.ess is None and n_train is not None:
        meta.ess = float(n_train)  # the squared gradients sum over the N training examples
    meta.optimizer = meta.optimizer or "adamw_sg"
    meta.weight_decay = optimizer.weight_decay if meta.weight_decay is None else meta.weight_decay
    meta.extra = {**meta.extra, "prior_precision": float(delta)}
    sg_loader = make_loader(
        data.dataset if isinstance(data, DataLoader) else data, trainer.batch_size, shuffle=False, what="train_data"
    )
    return adamw_sg_posterior(
        model, sg_loader, prior_precision=delta, meta=meta, device=_posterior_device(trainer.accelerator)
    )


def _posterior_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def adamw_sg_posterior(
    model: nn.Module,
    batches,
    *,
    prior_precision: float,
    meta: PosteriorMeta | None = None,
    device: str | torch.device = "cpu",
) -> DiagonalGaussian:
    """``N(θ, diag(1/(Σ_i ∇l_i(θ)² + δ)))`` over the trainable parameters (per-example CE ``l_i``).

    ``batches`` is an iterable of training batches (each example counted once). The pass runs on
    ``device`` (the model is moved there and back); the result is on CPU.
    """

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        return task_loss(m, batch, reduction="none")

    device = torch.device(device)
    orig = next(model.parameters()).device
    model.to(device)
    try:
        moved = (move_data_to_device(b, device) for b in batches)
        sq = squared_gradient_precision(model, loss_fn, moved)
    finally:
        model.to(orig)
    prec = add_prior_precision({k: v.detach().cpu() for k, v in sq.items()}, float(prior_precision))
    mean = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in prec}
    meta = meta or PosteriorMeta()
    meta.optimizer = meta.optimizer or "adamw_sg"
    return DiagonalGaussian(mean, prec, meta)
