"""Finetuning with Lightning and where the task posteriors come from (METHOD.md, Section 3.5).

Objective. A single-task finetune minimises ``l_t(θ) + R0(θ)``, the multitask finetune of eq. 1
``Σ_t α_t l_t(θ) + R0(θ)``, both from the same pretrained θ0 (the weights of the ``model`` passed
in). ``l_t`` is the *mean* cross-entropy over a minibatch of task t. ``R0`` is, by default, the
optimizer's weight decay (a Gaussian prior around **zero**: AdamW's decoupled decay, or IVON's
``weight_decay`` which is its prior precision per example). ``l2_to_init=λ`` adds the explicit term
``λ/2 ‖θ − θ0‖²`` to the loss (a prior around θ0, over trainable parameters only); combine it with
``weight_decay=0`` to have only the prior around θ0.

Optimizers (``optimizer=``):

* ``"adamw"``: torch AdamW with automatic optimisation. The posterior is the Laplace-style
  ``N(θ, diag(1/h))`` with ``h = Σ_i (∇l_i)² + δ`` over the training examples (per-example squared
  gradients, one extra pass, :func:`varmerge.posterior.squared_gradient_precision`), meta optimizer
  ``"adamw_sg"``. δ defaults to ``N · (weight_decay + l2_to_init)``, the curvature of R0 on the
  scale of the summed loss.
* ``"ivon"``: ``ivon.IVON`` with Lightning manual optimisation; the posterior is
  ``DiagonalGaussian.from_ivon`` (precision = ess · (hess + weight_decay)). Metrics and the returned
  model are at the posterior mean.
* ``"full_von"``: full-Gaussian variational online Newton for multinomial logistic regression
  (:func:`fit_full_von`), a :class:`~varmerge.posterior.FullGaussian`.

Mixtures: :func:`fit_multi_ivon` (K seeds → K components) and :func:`fit_soup_ivon` (L runs ×
snapshot steps → L·S components, via :class:`IVONSnapshots`).

Batches are ``(x, y)`` tuples or dicts with a ``labels`` entry (the LoRA text model: the other
entries are passed to the model as keyword arguments). ``forward_fn(model, batch) -> logits`` and
``label_fn(batch) -> labels`` override both. Models return logits over all classes and labels are
global class ids, so every task shares one head.

Nothing here imports prefect, mlflow or dvc; pass an MLflow logger as ``logger=`` from the
orchestration layer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ivon
import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from varmerge.posterior import (
    DiagonalGaussian,
    FullGaussian,
    MixtureGaussian,
    PosteriorMeta,
    add_prior_precision,
    squared_gradient_precision,
)

__all__ = [
    "OPTIMIZERS",
    "IVONSnapshots",
    "SingleTaskModule",
    "WeightedMultitaskModule",
    "adamw_sg_posterior",
    "default_forward",
    "default_labels",
    "fit",
    "fit_full_von",
    "fit_multi_ivon",
    "fit_multitask",
    "fit_soup_ivon",
    "full_von",
    "make_loader",
    "softmax_regression_hessian",
    "task_loss",
    "weighted_multitask_loss",
]

OPTIMIZERS = ("adamw", "ivon", "full_von")
LR_SCHEDULES = ("constant", "cosine")

ForwardFn = Callable[[nn.Module, Any], Tensor]
LabelFn = Callable[[Any], Tensor]
Data = Any  # (x, y) tensors | Dataset | DataLoader


# --------------------------------------------------------------------------------------------
# batches and losses
# --------------------------------------------------------------------------------------------
_LABEL_KEYS = ("labels", "label", "y")


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    raise ValueError(
        f"the model returned a {type(out).__name__}, not logits; pass forward_fn(model, batch) -> logits"
    )


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """``model(x)`` for an ``(x, y)`` batch; ``model(**inputs)`` for a dict batch minus its labels."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return _logits(model(**inputs))
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return _logits(model(batch[0]))
    raise ValueError(
        f"cannot read a {type(batch).__name__} batch; use (x, y) tuples or dicts with 'labels', "
        "or pass forward_fn and label_fn"
    )


def default_labels(batch: Any) -> Tensor:
    """``y`` of an ``(x, y)`` batch or ``batch['labels']`` of a dict batch."""
    if isinstance(batch, Mapping):
        for k in _LABEL_KEYS:
            if k in batch:
                return batch[k]
        raise ValueError(
            f"dict batch has no labels entry (looked for {_LABEL_KEYS}); keys: {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(f"cannot find labels in a {type(batch).__name__} batch; pass label_fn")


def task_loss(
    model: nn.Module,
    batch: Any,
    *,
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of one task's batch (``reduction="none"`` gives per-example losses)."""
    logits = forward_fn(model, batch)
    labels = label_fn(batch)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits: compute the loss in float32
    return F.cross_entropy(logits, labels.long(), reduction=reduction)


def weighted_multitask_loss(
    model: nn.Module,
    batches: Sequence[Any],
    alpha: Sequence[float] | Tensor,
    *,
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
) -> tuple[Tensor, list[Tensor | None]]:
    """``Σ_t α_t l_t`` with ``l_t`` the mean cross-entropy of task t's batch.

    Tasks with ``α_t = 0`` are skipped (not evaluated), so at ``α = e_t`` the value equals
    :func:`task_loss` of task t exactly. Returns the total and the per-task losses (None if skipped).
    """
    a = [float(v) for v in (alpha.tolist() if isinstance(alpha, Tensor) else alpha)]
    if len(a) != len(batches):
        raise ValueError(f"α has {len(a)} entries but there are {len(batches)} task batches")
    total: Tensor | None = None
    per_task: list[Tensor | None] = []
    for a_t, batch in zip(a, batches, strict=True):
        if a_t == 0.0:
            per_task.append(None)
            continue
        lt = task_loss(model, batch, forward_fn=forward_fn, label_fn=label_fn)
        per_task.append(lt.detach())
        term = lt if a_t == 1.0 else a_t * lt
        total = term if total is None else total + term
    if total is None:
        raise ValueError("α has no positive entry")
    return total, per_task


def _check_alpha(alpha, T: int) -> list[float]:
    a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    if a.numel() != T:
        raise ValueError(f"α has {a.numel()} entries but there are {T} tasks")
    if not torch.isfinite(a).all() or (a < 0).any() or abs(float(a.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"α must be a finite point on the simplex (α_t >= 0, Σ α_t = 1), got {a.tolist()}"
        )
    return a.tolist()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _as_dataset(data: Data, what: str = "data") -> Dataset:
    if isinstance(data, Dataset):
        return data
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        return TensorDataset(x, y)
    raise ValueError(
        f"{what} must be an (x, y) tuple of tensors, a torch Dataset or a DataLoader, got {type(data).__name__}"
    )


def make_loader(
    data: Data,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    what: str = "data",
) -> DataLoader:
    """A DataLoader over ``data`` (returned unchanged if it already is one).

    Shuffling uses its own generator seeded with ``seed``, so one loader's order does not depend on
    what else consumed the global RNG.
    """
    if isinstance(data, DataLoader):
        return data
    ds = _as_dataset(data, what)
    if len(ds) == 0:
        raise ValueError(f"{what} is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
    )


def _num_examples(data: Data) -> int | None:
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, (tuple, list)) and len(ds) == 2 and isinstance(ds[0], Tensor):
        return int(ds[0].shape[0])
    try:
        return len(ds)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# Lightning modules
# --------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to finetune")
    return params


class _FinetuneModule(L.LightningModule):
    """Shared optimiser logic; subclasses define :meth:`compute_loss`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str = "ivon",
        lr: float = 0.1,
        weight_decay: float = 1e-4,
        ess: float | None = None,
        hess_init: float = 1.0,
        mc_samples: int = 1,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        clip_radius: float = float("inf"),
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        l2_to_init: float = 0.0,
        forward_fn: ForwardFn = default_forward,
        label_fn: LabelFn = default_labels,
        task: str = "task",
    ):
        super().__init__()
        if optimizer not in ("adamw", "ivon"):
            raise ValueError(
                f"Lightning finetuning supports optimizer 'adamw' or 'ivon', got {optimizer!r}"
            )
        if optimizer == "ivon" and (ess is None or not ess > 0):
            raise ValueError(
                f"IVON needs an effective sample size ess > 0 (usually the training set size), got {ess!r}"
            )
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if not lr > 0 or not weight_decay >= 0 or not l2_to_init >= 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, l2_to_init >= 0; got {lr}, {weight_decay}, {l2_to_init}"
            )
        self.model = model
        self.optimizer_name = optimizer
        self.automatic_optimization = optimizer != "ivon"
        self.lr, self.weight_decay, self.ess = float(lr), float(weight_decay), ess
        self.hess_init, self.mc_samples = float(hess_init), mc_samples
        self.beta1, self.beta2, self.clip_radius = beta1, beta2, clip_radius
        self.adam_betas = tuple(adam_betas)
        self.lr_schedule, self.warmup_steps = lr_schedule, int(warmup_steps)
        self.l2_to_init = float(l2_to_init)
        self.forward_fn, self.label_fn = forward_fn, label_fn
        self.task = task
        self._theta0: dict[str, Tensor] = {}
        if self.l2_to_init > 0:
            self._theta0 = {n: p.detach().clone() for n, p in _trainable(model)}
        self.ivon_optimizer: ivon.IVON | None = None

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, batch: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def regulariser(self) -> Tensor | None:
        """Explicit ``λ/2 ‖θ − θ0‖²`` (None when ``l2_to_init == 0``)."""
        if not self._theta0:
            return None
        total = None
        for n, p in self.model.named_parameters():
            if n in self._theta0:
                t0 = self._theta0[n]
                if t0.device != p.device:
                    t0 = self._theta0[n] = t0.to(p.device)
                d = (p - t0).pow(2).sum()
                total = d if total is None else total + d
        return 0.5 * self.l2_to_init * total

    def forward(self, batch: Any) -> Tensor:
        return self.forward_fn(self.model, batch)

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for _, p in _trainable(self.model)]
        if self.optimizer_name == "ivon":
            opt = ivon.IVON(
                params,
                lr=self.lr,
                ess=float(self.ess),
                hess_init=self.hess_init,
                beta1=self.beta1,
                beta2=self.beta2,
                weight_decay=self.weight_decay,
                mc_samples=self.mc_samples,
                clip_radius=self.clip_radius,
            )
            self.ivon_optimizer = opt
        else:
            opt = torch.optim.AdamW(
                params, lr=self.lr, weight_decay=self.weight_decay, betas=self.adam_betas
            )
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        total = max(int(self.trainer.max_steps) - self.warmup_steps, 1)
        frac = min(max(step - self.warmup_steps, 0) / total, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    def training_step(self, batch: Any, batch_idx: int):
        if self.automatic_optimization:
            loss = self.compute_loss(batch)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
            return loss
        return self._ivon_step(batch)

    def _ivon_step(self, batch: Any) -> Tensor:
        """One IVON step: ``mc_samples`` sampled forward/backward passes, then the update.

        IVON's ``step(closure)`` calls the closure ``mc_samples`` times; each call draws θ ~ q
        inside ``sampled_params(train=True)``, zeroes the gradients, runs forward and
        ``manual_backward`` and, on leaving the context, IVON records the gradient sample and
        restores the mean. Going through the LightningOptimizer keeps ``global_step`` counting.
        """
        opt = self.optimizers()
        raw = opt.optimizer
        params = [p for group in raw.param_groups for p in group["params"]]

        def closure() -> Tensor:
            with raw.sampled_params(train=True):
                raw.zero_grad(set_to_none=True)
                loss = self.compute_loss(batch)
                self.manual_backward(loss)
                for p in params:  # a parameter the loss did not touch: IVON needs a gradient
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            return loss.detach()

        loss = opt.step(closure=closure)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    # -- evaluation at the mean --------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        logits = self.forward_fn(self.model, batch)
        labels = self.label_fn(batch)
        loss = F.cross_entropy(
            logits if logits.dtype == torch.float64 else logits.float(), labels.long()
        )
        acc = (logits.argmax(-1) == labels).float().mean()
        name = self._val_task_name(dataloader_idx)
        self.log(f"val/{name}/loss", loss, add_dataloader_idx=False)
        self.log(f"val/{name}/accuracy", acc, add_dataloader_idx=False, prog_bar=True)

    def _val_task_name(self, dataloader_idx: int) -> str:
        return self.task


class SingleTaskModule(_FinetuneModule):
    """Finetune on one task: mean cross-entropy + R0 (weight decay and/or ``l2_to_init``)."""

    def compute_loss(self, batch: Any) -> Tensor:
        loss = task_loss(self.model, batch, forward_fn=self.forward_fn, label_fn=self.label_fn)
        reg = self.regulariser()
        return loss if reg is None else loss + reg


class WeightedMultitaskModule(_FinetuneModule):
    """Multitask finetune of eq. 1: ``Σ_t α_t l_t(θ) + R0(θ)``, one batch per task per step.

    A training batch is a sequence (or a mapping in task order) of per-task batches, as produced
    by ``CombinedLoader(..., mode="max_size_cycle")``.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: Sequence[float],
        *,
        task_names: Sequence[str] | None = None,
        **kwargs,
    ):
        alpha = list(alpha)
        names = (
            list(task_names) if task_names is not None else [f"task{t}" for t in range(len(alpha))]
        )
        if len(names) != len(alpha):
            raise ValueError(f"{len(names)} task names for {len(alpha)} α entries")
        kwargs.setdefault("task", "multitask")
        super().__init__(model, **kwargs)
        self.alpha = _check_alpha(alpha, len(alpha))
        self.task_names = names

    def _batches(self, batch: Any) -> list[Any]:
        if isinstance(batch, Mapping):
            missing = [n for n in self.task_names if n not in batch]
            if missing:
                raise ValueError(f"multitask batch lacks tasks {missing}")
            return [batch[n] for n in self.task_names]
        return list(batch)

    def compute_loss(self, batch: Any) -> Tensor:
        loss, per_task = weighted_multitask_loss(
            self.model,
            self._batches(batch),
            self.alpha,
            forward_fn=self.forward_fn,
            label_fn=self.label_fn,
        )
        for name, lt in zip(self.task_names, per_task, strict=True):
            if lt is not None and self._trainer is not None:
                self.log(f"train/{name}/loss", lt, on_step=True, on_epoch=False)
        reg = self.regulariser()
        return loss if reg is None else loss + reg

    def _val_task_name(self, dataloader_idx: int) -> str:
        return (
            self.task_names[dataloader_idx]
            if dataloader_idx < len(self.task_names)
            else str(dataloader_idx)
        )


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------
def _to_cpu(post: DiagonalGaussian) -> DiagonalGaussian:
    return DiagonalGaussian(
        {k: v.detach().to("cpu").clone() for k, v in post.mean.items()},
        {k: v.detach().to("cpu").clone() for k, v in post.precision.items()},
        post.meta,
    )


def _ivon_posterior(model: nn.Module, opt: ivon.IVON, meta: PosteriorMeta) -> DiagonalGaussian:
    return _to_cpu(DiagonalGaussian.from_ivon(model, opt, meta))


class IVONSnapshots(L.Callback):
    """Snapshot the IVON posterior (``from_ivon``, on CPU) after given global steps.

    ``posteriors[step]`` holds the snapshot; ``meta`` is copied into each with
    ``extra["step"] = step``. Used for SoupIVON (checkpoints along a run).
    """

    def __init__(self, steps: Sequence[int], meta: PosteriorMeta | None = None):
        super().__init__()
        steps = sorted({int(s) for s in steps})
        if not steps or steps[0] < 1:
            raise ValueError(f"snapshot steps must be positive ints, got {steps}")
        self.steps = steps
        self.meta = meta or PosteriorMeta(optimizer="ivon")
        self.posteriors: dict[int, DiagonalGaussian] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.max_steps is not None
            and trainer.max_steps > 0
            and self.steps[-1] > trainer.max_steps
        ):
            raise ValueError(
                f"snapshot step {self.steps[-1]} is beyond max_steps={trainer.max_steps}"
            )
        if not isinstance(pl_module, _FinetuneModule) or pl_module.optimizer_name != "ivon":
            raise ValueError(
                "IVONSnapshots needs a varmerge finetune module trained with optimizer='ivon'"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.posteriors:
            meta = copy.deepcopy(self.meta)
            meta.extra = {**meta.extra, "step": step}
            self.posteriors[step] = _ivon_posterior(pl_module.model, pl_module.ivon_optimizer, meta)


# --------------------------------------------------------------------------------------------
# the functional entry points
# --------------------------------------------------------------------------------------------
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence Lightning's info banners and the 'few workers' hint (warnings stay on)."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _trainer(
    *,
    max_steps: int,
    accelerator: str,
    devices: Any,
    logger: Any,
    progress: bool,
    callbacks: Sequence[L.Callback],
    precision: Any,
    deterministic: bool | None,
    val_every_n_steps: int | None,
    log_every_n_steps: int,
) -> L.Trainer:
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    kwargs: dict[str, Any] = {}
    if val_every_n_steps is not None:
        kwargs.update(check_val_every_n_epoch=None, val_check_interval=int(val_every_n_steps))
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=devices,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=list(callbacks),
        precision=precision,
        deterministic=deterministic,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every_n_steps,
        **kwargs,
    )


def _check_precision_mode(optimizer: str, precision: Any) -> None:
    if optimizer == "ivon" and str(precision).startswith("16"):
        raise ValueError(
            f"precision={precision!r} uses a gradient scaler, which IVON's sampled gradients cannot "
            "go through; use 32 or 'bf16-mixed'"
        )


def fit(
    model: nn.Module,
    train_data: Data,
    *,
    optimizer: str = "ivon",
    max_steps: int = 1000,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    ess: float | None = None,
    weight_decay: float = 1e-4,
    mc_samples: int = 1,
    hess_init: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99999,
    clip_radius: float = float("inf"),
    adam_betas: tuple[float, float] = (0.9, 0.999),
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    l2_to_init: float = 0.0,
    prior_precision: float | None = None,
    compute_posterior: bool = True,
    sg_batch_size: int | None = None,
    sg_chunk_size: int | None = None,
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
    task: str = "task",
    val_data: Data | None = None,
    val_every_n_steps: int | None = None,
    accelerator: str = "auto",
    devices: Any = 1,
    precision: Any = 32,
    deterministic: bool | None = None,
    logger: Any = None,
    progress: bool = True,
    quiet: bool | None = None,
    callbacks: Sequence[L.Callback] = (),
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    log_every_n_steps: int = 50,
    meta: PosteriorMeta | None = None,
    full_von_options: Mapping[str, Any] | None = None,
):
    """Finetune ``model`` (in place, from its current weights θ0) on one task.

    Returns ``(model, posterior)``; ``model`` holds the final weights (the IVON / VON mean) and
    comes back on CPU in the train/eval mode it came in. ``posterior`` is a
    :class:`DiagonalGaussian` (``"adamw"`` → meta ``adamw_sg``; ``"ivon"``) or a
    :class:`FullGaussian` (``"full_von"``: ``max_steps`` iterations of full-batch VON with learning
    rate ``lr``, ``mc_samples`` samples, ``prior_precision`` δ; ``full_von_options`` go to
    :func:`fit_full_von`), or None with ``compute_posterior=False``.

    ``ess`` defaults to the number of training examples N; the AdamW-SG prior precision δ to
    ``N · (weight_decay + l2_to_init)``. ``quiet`` (default: ``not progress``) silences Lightning's
    info messages. ``logger`` is any Lightning logger (default: none).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta(task=task)
    meta.seed = seed if meta.seed is None else meta.seed
    meta.task = meta.task or task
    if optimizer == "full_von":
        x, y = _full_tensors(train_data)
        opts = dict(full_von_options or {})
        opts.setdefault("prior_precision", 1.0 if prior_precision is None else prior_precision)
        post = fit_full_von(
            model,
            x,
            y,
            lr=lr,
            mc_samples=mc_samples,
            num_iters=max_steps,
            seed=seed,
            meta=meta,
            **opts,
        )
        return model, post

    quiet = (not progress) if quiet is None else quiet
    _check_precision_mode(optimizer, precision)
    n_train = _num_examples(train_data)
    if ess is None and optimizer == "ivon":
        if n_train is None:
            raise ValueError("cannot infer ess from the training data's length; pass ess=")
        ess = float(n_train)
    was_training = model.training
    with _quiet(quiet):
        L.seed_everything(seed, workers=True, verbose=not quiet)
        loader = make_loader(
            train_data,
            batch_size,
            shuffle=True,
            seed=seed,
            num_workers=num_workers,
            collate_fn=collate_fn,
            what="train_data",
        )
        module = SingleTaskModule(
            model,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            ess=ess,
            hess_init=hess_init,
            mc_samples=mc_samples,
            beta1=beta1,
            beta2=beta2,
            clip_radius=clip_radius,
            adam_betas=adam_betas,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            l2_to_init=l2_to_init,
            forward_fn=forward_fn,
            label_fn=label_fn,
            task=task,
        )
        val_loader = None
        if val_data is not None:
            val_loader = make_loader(
                val_data, batch_size, shuffle=False, collate_fn=collate_fn, what="val_data"
            )
        trainer = _trainer(
            max_steps=max_steps,
            accelerator=accelerator,
            devices=devices,
            logger=logger,
            progress=progress,
            callbacks=callbacks,
            precision=precision,
            deterministic=deterministic,
            val_every_n_steps=val_every_n_steps if val_loader is not None else None,
            log_every_n_steps=log_every_n_steps,
        )
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader)
    model.cpu()
    model.train(was_training)

    post = None
    if compute_posterior and optimizer == "ivon":
        meta.optimizer = meta.optimizer or "ivon"
        post = _ivon_posterior(model, module.ivon_optimizer, meta)
    elif compute_posterior and optimizer == "adamw":
        post = trained_sg_posterior(
            model,
            train_data,
            batch_size=sg_batch_size or batch_size,
            weight_decay=weight_decay,
            l2_to_init=l2_to_init,
            prior_precision=prior_precision,
            forward_fn=forward_fn,
            label_fn=label_fn,
            collate_fn=collate_fn,
            chunk_size=sg_chunk_size,
            accelerator=accelerator,
            meta=meta,
        )
    return model, post


def trained_sg_posterior(
    model: nn.Module,
    train_data: Data,
    *,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    l2_to_init: float = 0.0,
    prior_precision: float | None = None,
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
    collate_fn: Callable | None = None,
    chunk_size: int | None = None,
    accelerator: str = "auto",
    meta: PosteriorMeta | None = None,
) -> DiagonalGaussian:
    """The AdamW-SG posterior of an already trained ``model`` (what ``fit(optimizer="adamw")``
    computes after training): squared gradients over ``train_data`` + prior precision δ
    (default ``N · (weight_decay + l2_to_init)``). Separate from training so a job can persist
    the trained weights first and redo only this pass after a crash.
    """
    n_train = _num_examples(train_data)
    if prior_precision is None:
        if n_train is None:
            raise ValueError("cannot infer N for the prior precision; pass prior_precision=")
        prior_precision = n_train * (weight_decay + l2_to_init)
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    meta.optimizer = meta.optimizer or "adamw_sg"
    meta.weight_decay = weight_decay if meta.weight_decay is None else meta.weight_decay
    meta.extra = {**meta.extra, "prior_precision": float(prior_precision)}
    sg_loader = make_loader(
        train_data if not isinstance(train_data, DataLoader) else train_data.dataset,
        batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        what="train_data",
    )
    return adamw_sg_posterior(
        model,
        sg_loader,
        prior_precision=prior_precision,
        forward_fn=forward_fn,
        label_fn=label_fn,
        meta=meta,
        chunk_size=chunk_size,
        device=_posterior_device(accelerator),
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
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
    meta: PosteriorMeta | None = None,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> DiagonalGaussian:
    """``N(θ, diag(1/(Σ_i ∇l_i(θ)² + δ)))`` over the trainable parameters (per-example CE ``l_i``).

    ``batches`` is an iterable of training batches (each example counted once). The pass runs on
    ``device`` (the model is moved there and back); the result is on CPU.
    """

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        return task_loss(m, batch, forward_fn=forward_fn, label_fn=label_fn, reduction="none")

    device = torch.device(device)
    orig = next(model.parameters()).device
    model.to(device)
    try:
        moved = (move_data_to_device(b, device) for b in batches)
        sq = squared_gradient_precision(model, loss_fn, moved, chunk_size=chunk_size)
    finally:
        model.to(orig)
    prec = add_prior_precision({k: v.detach().cpu() for k, v in sq.items()}, float(prior_precision))
    mean = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in prec}
    meta = meta or PosteriorMeta()
    meta.optimizer = meta.optimizer or "adamw_sg"
    return DiagonalGaussian(mean, prec, meta)


def fit_multitask(
    model: nn.Module,
    task_data: Sequence[Data] | Mapping[str, Data],
    alpha: Sequence[float] | Tensor,
    *,
    optimizer: str = "ivon",
    max_steps: int = 1000,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    ess: float | None = None,
    weight_decay: float = 1e-4,
    mc_samples: int = 1,
    hess_init: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99999,
    clip_radius: float = float("inf"),
    adam_betas: tuple[float, float] = (0.9, 0.999),
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    l2_to_init: float = 0.0,
    forward_fn: ForwardFn = default_forward,
    label_fn: LabelFn = default_labels,
    val_data: Sequence[Data] | Mapping[str, Data] | None = None,
    val_every_n_steps: int | None = None,
    accelerator: str = "auto",
    devices: Any = 1,
    precision: Any = 32,
    deterministic: bool | None = None,
    logger: Any = None,
    progress: bool = True,
    quiet: bool | None = None,
    callbacks: Sequence[L.Callback] = (),
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    log_every_n_steps: int = 50,
) -> nn.Module:
    """Multitask finetune of eq. 1 at weighting ``alpha`` (in place, from the model's weights θ0).

    Each step draws one batch of ``batch_size`` from every task (``CombinedLoader`` in
    ``"max_size_cycle"`` mode: shorter tasks cycle) and minimises ``Σ_t α_t l_t + R0``. Task t's
    loader shuffles with its own generator seeded ``seed + t``, so at ``α = e_0`` the run repeats
    :func:`fit` on task 0 with the same seed step for step. IVON's ``ess`` defaults to the total
    number of examples over all tasks. Returns the model (on CPU).
    """
    if optimizer not in ("adamw", "ivon"):
        raise ValueError(
            f"multitask finetuning supports optimizer 'adamw' or 'ivon', got {optimizer!r}"
        )
    if isinstance(task_data, Mapping):
        names, datas = list(task_data), list(task_data.values())
    else:
        datas = list(task_data)
        names = [f"task{t}" for t in range(len(datas))]
    if not datas:
        raise ValueError("task_data is empty")
    a = _check_alpha(alpha, len(datas))
    quiet = (not progress) if quiet is None else quiet
    _check_precision_mode(optimizer, precision)
    if ess is None and optimizer == "ivon":
        sizes = [_num_examples(d) for d in datas]
        if any(s is None for s in sizes):
            raise ValueError("cannot infer ess from the task datasets' lengths; pass ess=")
        ess = float(sum(sizes))
    was_training = model.training
    with _quiet(quiet):
        L.seed_everything(seed, workers=True, verbose=not quiet)
        loaders = [
            make_loader(
                d,
                batch_size,
                shuffle=True,
                seed=seed + t,
                num_workers=num_workers,
                collate_fn=collate_fn,
                what=f"task_data[{names[t]!r}]",
            )
            for t, d in enumerate(datas)
        ]
        combined = CombinedLoader(loaders, mode="max_size_cycle")
        module = WeightedMultitaskModule(
            model,
            a,
            task_names=names,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            ess=ess,
            hess_init=hess_init,
            mc_samples=mc_samples,
            beta1=beta1,
            beta2=beta2,
            clip_radius=clip_radius,
            adam_betas=adam_betas,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            l2_to_init=l2_to_init,
            forward_fn=forward_fn,
            label_fn=label_fn,
        )
        val_loaders = None
        if val_data is not None:
            vals = list(val_data.values()) if isinstance(val_data, Mapping) else list(val_data)
            if len(vals) != len(datas):
                raise ValueError(f"val_data has {len(vals)} tasks, task_data has {len(datas)}")
            val_loaders = [
                make_loader(v, batch_size, shuffle=False, collate_fn=collate_fn) for v in vals
            ]
        trainer = _trainer(
            max_steps=max_steps,
            accelerator=accelerator,
            devices=devices,
            logger=logger,
            progress=progress,
            callbacks=callbacks,
            precision=precision,
            deterministic=deterministic,
            val_every_n_steps=val_every_n_steps if val_loaders is not None else None,
            log_every_n_steps=log_every_n_steps,
        )
        trainer.fit(module, train_dataloaders=combined, val_dataloaders=val_loaders)
    model.cpu()
    model.train(was_training)
    return model


# --------------------------------------------------------------------------------------------
# MultiIVON and SoupIVON
# --------------------------------------------------------------------------------------------
def _ivon_runs(model, train_data, *, seeds, snapshot_steps, kwargs, meta_base, completed=None, on_run=None):
    """Run IVON once per seed from the same θ0; returns per-run lists of snapshot posteriors.

    ``completed`` maps run index -> that run's posteriors (done before, e.g. by a killed job):
    those runs are not trained again. ``on_run(run, posteriors)`` sees each run as it finishes
    (to persist it). Each run depends only on θ0 and its seed, so skipping finished runs gives
    the same result as training them all.
    """
    completed = dict(completed or {})
    if kwargs.get("optimizer", "ivon") != "ivon":
        raise ValueError("MultiIVON / SoupIVON train with optimizer='ivon'")
    kwargs = {k: v for k, v in kwargs.items() if k != "optimizer"}
    user_callbacks = list(kwargs.pop("callbacks", ()))
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs: list[list[DiagonalGaussian]] = []
    try:
        for run, s in enumerate(seeds):
            if run in completed:
                runs.append(list(completed[run]))
                continue
            model.load_state_dict(theta0)
            meta = copy.deepcopy(meta_base)
            meta.optimizer, meta.seed = "ivon", int(s)
            meta.extra = {**meta.extra, "run": run}
            snaps = IVONSnapshots(snapshot_steps, meta) if snapshot_steps else None
            cbs = user_callbacks + ([snaps] if snaps else [])
            _, post = fit(
                model, train_data, optimizer="ivon", seed=int(s), callbacks=cbs, meta=meta, **kwargs
            )
            if snaps is None:
                runs.append([post])
            else:
                missing = [st for st in snaps.steps if st not in snaps.posteriors]
                if missing:
                    raise RuntimeError(f"run {run}: no snapshot taken at steps {missing}")
                runs.append([snaps.posteriors[st] for st in snaps.steps])
            if on_run is not None:
                on_run(run, runs[-1])
    finally:
        model.load_state_dict(theta0)
    return runs


def fit_multi_ivon(
    model: nn.Module,
    train_data: Data,
    *,
    num_runs: int,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    task: str = "task",
    completed_runs: Mapping[int, Sequence[DiagonalGaussian]] | None = None,
    on_run: Callable[[int, list[DiagonalGaussian]], None] | None = None,
    **fit_kwargs,
) -> MixtureGaussian:
    """MultiIVON: ``num_runs`` IVON runs from the same θ0 with seeds ``seed + k`` (or ``seeds``).

    Returns the equal-weight :class:`MixtureGaussian` of their final posteriors (meta optimizer
    ``multi_ivon``). ``fit_kwargs`` go to :func:`fit` (``max_steps``, ``lr``, ``ess``, ...). The model
    is given back with its initial weights θ0; component k's mean holds run k's weights.
    ``completed_runs`` / ``on_run``: resume from runs already done, persist runs as they finish
    (see :func:`_ivon_runs`).
    """
    seeds = list(seeds) if seeds is not None else [seed + k for k in range(num_runs)]
    if len(seeds) != num_runs or num_runs < 1:
        raise ValueError(f"need num_runs >= 1 seeds, got num_runs={num_runs}, seeds={seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"MultiIVON seeds must differ, got {seeds}")
    runs = _ivon_runs(
        model,
        train_data,
        seeds=seeds,
        snapshot_steps=None,
        kwargs=fit_kwargs,
        meta_base=PosteriorMeta(task=task),
        completed=completed_runs,
        on_run=on_run,
    )
    comps = [r[0] for r in runs]
    meta = PosteriorMeta(
        task=task,
        optimizer="multi_ivon",
        seed=seeds[0],
        ess=comps[0].meta.ess,
        weight_decay=comps[0].meta.weight_decay,
        extra={"seeds": [int(s) for s in seeds]},
    )
    return MixtureGaussian(comps, meta=meta)


def fit_soup_ivon(
    model: nn.Module,
    train_data: Data,
    *,
    num_runs: int,
    snapshot_steps: Sequence[int],
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    task: str = "task",
    completed_runs: Mapping[int, Sequence[DiagonalGaussian]] | None = None,
    on_run: Callable[[int, list[DiagonalGaussian]], None] | None = None,
    **fit_kwargs,
) -> MixtureGaussian:
    """SoupIVON: ``num_runs`` IVON runs, each snapshotted at ``snapshot_steps`` (global steps).

    Returns the equal-weight mixture of ``num_runs · len(snapshot_steps)`` components, run-major
    (run 0's snapshots in step order first); meta optimizer ``soup_ivon``. ``max_steps`` (in
    ``fit_kwargs``) defaults to the last snapshot step. The model is given back at θ0.
    ``completed_runs`` / ``on_run`` as in :func:`fit_multi_ivon`.
    """
    steps = sorted({int(s) for s in snapshot_steps})
    if not steps:
        raise ValueError("snapshot_steps is empty")
    fit_kwargs.setdefault("max_steps", steps[-1])
    seeds = list(seeds) if seeds is not None else [seed + k for k in range(num_runs)]
    if len(seeds) != num_runs or num_runs < 1:
        raise ValueError(f"need num_runs >= 1 seeds, got num_runs={num_runs}, seeds={seeds}")
    runs = _ivon_runs(
        model,
        train_data,
        seeds=seeds,
        snapshot_steps=steps,
        kwargs=fit_kwargs,
        meta_base=PosteriorMeta(task=task),
        completed=completed_runs,
        on_run=on_run,
    )
    comps = [c for r in runs for c in r]
    meta = PosteriorMeta(
        task=task,
        optimizer="soup_ivon",
        seed=seeds[0],
        ess=comps[0].meta.ess,
        weight_decay=comps[0].meta.weight_decay,
        extra={"seeds": [int(s) for s in seeds], "steps": steps},
    )
    return MixtureGaussian(comps, meta=meta)


# --------------------------------------------------------------------------------------------
# full-Gaussian variational online Newton for multinomial logistic regression
# --------------------------------------------------------------------------------------------
def _full_tensors(data: Data) -> tuple[Tensor, Tensor]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return data[0], data[1]
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, Dataset):
        loader = DataLoader(ds, batch_size=4096, shuffle=False)
        xs, ys = zip(*[(b[0], b[1]) for b in loader], strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise ValueError(
        f"full VON needs (x, y) tensors or a dataset of (x, y), got {type(data).__name__}"
    )


def _find_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    if isinstance(model, nn.Linear):
        return "", model
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(lins) != 1:
        raise ValueError(
            f"full VON needs a model with exactly one nn.Linear (logistic regression), found {len(lins)}"
        )
    name, lin = lins[0]
    own = {id(lin.weight)} | ({id(lin.bias)} if lin.bias is not None else set())
    other = [n for n, p in model.named_parameters() if id(p) not in own]
    if other:
        raise ValueError(
            f"full VON covers one nn.Linear only; the model has other parameters {other[:5]}"
        )
    return name + ".", lin


def softmax_regression_hessian(
    x: Tensor, a: Tensor, *, chunk_size: int = 4096, out: Tensor | None = None
) -> Tensor:
    """``Σ_i A_i ⊗ x_i x_iᵀ`` with ``A_i = diag(p_i) − p_i p_iᵀ`` (or any symmetric (C, C) weights).

    ``x`` is (N, D), ``a`` is (N, C, C); the result is (C·D, C·D) in class-major order (index
    ``c·D + d``). It is built block by block, ``H_{cc'} = Xᵀ diag(a[:, c, c']) X`` for c ≤ c', so
    the cost is C(C+1)/2 matrix products of (D × N)(N × D) and no (N, C·D) intermediate.
    """
    N, D = x.shape
    C = a.shape[-1]
    if a.shape != (N, C, C):
        raise ValueError(f"a must be (N, C, C) = ({N}, {C}, {C}), got {tuple(a.shape)}")
    H = out if out is not None else torch.zeros(C * D, C * D, dtype=x.dtype, device=x.device)
    H.zero_()
    for lo in range(0, N, chunk_size):
        xc, ac = x[lo : lo + chunk_size], a[lo : lo + chunk_size]
        for c in range(C):
            for c2 in range(c, C):
                blk = (xc * ac[:, c, c2, None]).T @ xc
                H[c * D : (c + 1) * D, c2 * D : (c2 + 1) * D] += blk
    for c in range(C):
        for c2 in range(c + 1, C):
            H[c2 * D : (c2 + 1) * D, c * D : (c + 1) * D] = H[
                c * D : (c + 1) * D, c2 * D : (c2 + 1) * D
            ].T
    return H


@torch.no_grad()
def full_von(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    lr: float = 0.1,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    prior_mean: Tensor | None = None,
    init_mean: Tensor | None = None,
    init_precision: float | None = None,
    batch_size: int | None = None,
    reduce_inactive: bool = True,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Full-Gaussian VON (Khan & Rue 2023, §1.3.2) for softmax regression; returns ``(m, S)``.

    Parameters are θ = [W.flatten() (C·D, class-major), b (C)], the likelihood is
    ``Π_i softmax(W x_i + b)[y_i]`` and the prior ``N(μ0, δ⁻¹ I)`` (``μ0 = prior_mean`` or 0).
    Starting from ``m = init_mean`` (default μ0) and ``S = init_precision · I`` (default δ), each
    iteration draws θ_s ~ N(m, S⁻¹) (Cholesky of S), forms the expected gradient ĝ and Hessian Ĥ of
    the total NLL over the samples, and updates

        S ← (1 − ρ) S + ρ (Ĥ + δ I),      m ← m − ρ S⁻¹ (ĝ + δ (m − μ0)).

    ``mc_samples=0`` evaluates ĝ, Ĥ at the mean: a damped Newton method whose fixed point is the
    Laplace approximation (MAP, Hessian + δI). ``batch_size`` uses a random minibatch per iteration
    with the N/B scaling (stochastic VON); None is full batch.

    ``reduce_inactive``: a feature that is zero in every example (MNIST border pixels) has zero
    gradient and Hessian, so with the isotropic S0 its weights evolve independently and in closed
    form; they are split off and only the active block is factorised (exact, not an
    approximation).

    Cost per iteration, P = C·(D_active + 1): the Hessian takes C(C+1)/2 products of
    (D × N)(N × D) ≈ C² N D² flops and the Cholesky P³/3. For 5,000 MNIST digits (C = 10, 663 active
    pixels, P ≈ 6,640) that is about 2.2e11 + 1e11 flops, 5–10 s per iteration in float64 on two CPU
    cores, well under a second on a GPU; memory is a few P × P matrices (≈ 350 MB each in float64,
    half in float32 via ``dtype``).
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0 < lr <= 1:
        raise ValueError(f"VON learning rate ρ must be in (0, 1], got {lr}")
    if not prior_precision > 0:
        raise ValueError(f"prior precision δ must be > 0, got {prior_precision}")
    if not (isinstance(mc_samples, int) and mc_samples >= 0):
        raise ValueError(f"mc_samples must be an int >= 0, got {mc_samples!r}")
    N, D = x.shape
    C = int(num_classes)
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, dtype)
    y = y.to(device)
    P = C * D + C
    delta = float(prior_precision)
    s0 = delta if init_precision is None else float(init_precision)
    mu0 = (
        torch.zeros(P, dtype=dtype, device=device)
        if prior_mean is None
        else prior_mean.to(device, dtype).flatten()
    )
    m_full = mu0.clone() if init_mean is None else init_mean.to(device, dtype).flatten().clone()
    if mu0.numel() != P or m_full.numel() != P:
        raise ValueError(f"prior_mean / init_mean must have C·D + C = {P} entries")

    # active features (+ the bias column) and their positions in the full θ vector
    active = (x != 0).any(0) if reduce_inactive else torch.ones(D, dtype=torch.bool, device=device)
    act_idx = torch.nonzero(active).flatten()
    Da = int(act_idx.numel()) + 1
    cls = torch.arange(C, device=device)
    w_idx = cls[:, None] * D + act_idx[None, :]  # (C, Da-1)
    b_idx = C * D + cls  # (C,)
    full_idx = torch.cat([w_idx, b_idx[:, None]], dim=1).flatten()  # reduced (c, a) -> full index
    xa = torch.cat([x[:, act_idx], torch.ones(N, 1, dtype=dtype, device=device)], dim=1)  # (N, Da)
    Pa = C * Da
    onehot = F.one_hot(y, C).to(dtype)

    m = m_full[full_idx].clone()
    mu0_a = mu0[full_idx]
    S = torch.eye(Pa, dtype=dtype, device=device) * s0
    H = torch.empty(Pa, Pa, dtype=dtype, device=device)
    eye = torch.eye(Pa, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    chol = torch.linalg.cholesky(S)
    s_inactive = s0  # every split-off coordinate has precision s_inactive and its own mean
    inactive = torch.ones(P, dtype=torch.bool, device=device)
    inactive[full_idx] = False

    for _ in range(num_iters):
        if batch_size is not None and batch_size < N:
            sel = torch.randperm(N, generator=gen, device=device)[:batch_size]
            xb, yb, scale = xa[sel], onehot[sel], N / batch_size
        else:
            xb, yb, scale = xa, onehot, 1.0
        if mc_samples == 0:
            thetas = m[None]
        else:
            eps = torch.randn(mc_samples, Pa, generator=gen, dtype=dtype, device=device)
            # θ = m + L⁻ᵀ ε has covariance (L Lᵀ)⁻¹ = S⁻¹
            z = torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
            thetas = m[None] + z
        g = torch.zeros(Pa, dtype=dtype, device=device)
        A = torch.zeros(xb.shape[0], C, C, dtype=dtype, device=device)
        for th in thetas:
            logits = xb @ th.view(C, Da).T
            p = torch.softmax(logits, dim=-1)
            g += ((p - yb).T @ xb).flatten()
            A += torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        k = thetas.shape[0]
        g *= scale / k
        A *= scale / k
        softmax_regression_hessian(xb, A, chunk_size=chunk_size, out=H)
        H.add_(eye, alpha=delta)
        S.mul_(1 - lr).add_(H, alpha=lr)
        S = 0.5 * (S + S.T)
        chol, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise RuntimeError("VON precision lost positive definiteness; lower lr or use float64")
        step = torch.cholesky_solve((g + delta * (m - mu0_a))[:, None], chol).flatten()
        m = m - lr * step
        # split-off coordinates: zero likelihood gradient/Hessian, scalar recursion
        s_inactive = (1 - lr) * s_inactive + lr * delta
        m_full[inactive] -= lr * delta * (m_full[inactive] - mu0[inactive]) / s_inactive

    m_full[full_idx] = m
    S_full = torch.zeros(P, P, dtype=dtype, device=device)
    S_full[inactive, inactive] = s_inactive
    S_full[full_idx[:, None], full_idx[None, :]] = S
    return m_full, S_full


def fit_full_von(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float = 0.1,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    prior_around_init: bool = False,
    init_from_model: bool = True,
    init_precision: float | None = None,
    batch_size: int | None = None,
    reduce_inactive: bool = True,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    seed: int = 0,
    meta: PosteriorMeta | None = None,
) -> FullGaussian:
    """Full-Gaussian VON posterior of the model's single ``nn.Linear`` (softmax regression).

    ``model`` must be logistic regression: exactly one ``nn.Linear`` with weight (C, D) and bias
    (C,), applied to ``x`` flattened to (N, D) (this is checked on a few examples). The VON mean
    starts from the model's weights (``init_from_model``) and the prior is ``N(0, δ⁻¹ I)`` or, with
    ``prior_around_init``, ``N(θ0, δ⁻¹ I)``. The model's weights are set to the final mean (in
    place) and a :class:`FullGaussian` with shapes ``{"<lin>.weight": (C, D), "<lin>.bias": (C,)}``
    and meta optimizer ``full_von`` is returned (dtype ``dtype``, on CPU). See :func:`full_von`.
    """
    prefix, lin = _find_linear(model)
    if lin.bias is None:
        raise ValueError("full VON expects an nn.Linear with a bias")
    C, D = lin.weight.shape
    xf = x.reshape(x.shape[0], -1)
    if xf.shape[1] != D:
        raise ValueError(f"x flattens to {xf.shape[1]} features but the linear layer takes {D}")
    with torch.no_grad():
        probe = x[: min(8, x.shape[0])].to(lin.weight.device, lin.weight.dtype)
        direct = probe.reshape(probe.shape[0], -1) @ lin.weight.T + lin.bias
        got = _logits(model(probe)) if not isinstance(model, nn.Linear) else direct
        if got.shape != direct.shape or not torch.allclose(got, direct, rtol=1e-4, atol=1e-4):
            raise ValueError(
                "the model is not plain logistic regression on flattened inputs (its logits differ "
                "from x.flatten() @ Wᵀ + b); full VON needs exactly that"
            )
        theta0 = torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]).to(
            "cpu", dtype
        )
    m, S = full_von(
        xf,
        y,
        C,
        lr=lr,
        mc_samples=mc_samples,
        num_iters=num_iters,
        prior_precision=prior_precision,
        prior_mean=theta0 if prior_around_init else None,
        init_mean=theta0 if init_from_model else None,
        init_precision=init_precision,
        batch_size=batch_size,
        reduce_inactive=reduce_inactive,
        dtype=dtype,
        device=device,
        chunk_size=chunk_size,
        seed=seed,
    )
    m, S = m.cpu(), S.cpu()
    with torch.no_grad():
        lin.weight.copy_(m[: C * D].view(C, D).to(lin.weight.dtype))
        lin.bias.copy_(m[C * D :].to(lin.bias.dtype))
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    meta.optimizer = "full_von"
    meta.seed = seed if meta.seed is None else meta.seed
    meta.extra = {
        **meta.extra,
        "lr": lr,
        "mc_samples": mc_samples,
        "num_iters": num_iters,
        "prior_precision": prior_precision,
        "prior_around_init": prior_around_init,
    }
    shapes = {f"{prefix}weight": (C, D), f"{prefix}bias": (C,)}
    return FullGaussian(m, S, shapes, meta)
