"""The Lightning modules of a finetune and the IVON snapshot callback.

A single-task finetune minimises ``l_t(θ) + R0(θ)``, the multitask finetune of eq. 1
``Σ_t α_t l_t(θ) + R0(θ)``; ``l_t`` is the *mean* cross-entropy over a minibatch of task t and
``R0`` the optimizer's weight decay (a Gaussian prior around zero: AdamW's decoupled decay or
IVON's ``weight_decay``, its prior precision per example). AdamW uses Lightning's automatic
optimisation, IVON manual optimisation (``mc_samples`` sampled passes per step).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import ivon
import lightning as L
import torch
from torch import Tensor, nn

from varmerge.posterior import DiagonalGaussian, PosteriorMeta
from varmerge.train.batches import check_alpha, default_forward, task_loss, weighted_multitask_loss
from varmerge.train.settings import OptimizerSettings

__all__ = ["IVONSnapshots", "SingleTaskModule", "WeightedMultitaskModule", "ivon_posterior"]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to finetune")
    return params


def _start_hess(opt: ivon.IVON, named: list[tuple[str, nn.Parameter]], hess: Mapping[str, Tensor]) -> None:
    """Set IVON's flat per-group ``hess`` from per-parameter tensors (names of ``named``)."""
    names = {id(p): n for n, p in named}
    missing = [n for n, _ in named if n not in hess]
    if missing:
        raise ValueError(f"initial_hess lacks trainable parameters {missing[:5]}")
    for group in opt.param_groups:
        parts = []
        for p in group["params"]:
            h = hess[names[id(p)]]
            if tuple(h.shape) != tuple(p.shape):
                raise ValueError(
                    f"initial_hess[{names[id(p)]!r}] has shape {tuple(h.shape)}, the parameter {tuple(p.shape)}"
                )
            parts.append(h.reshape(-1).to(group["hess"]))
        group["hess"].copy_(torch.cat(parts))


class _FinetuneModule(L.LightningModule):
    """Shared optimiser logic; subclasses define :meth:`compute_loss`.

    ``optimizer.ess`` must be resolved (not None) for IVON; :func:`varmerge.train.fit` does that.
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerSettings):
        super().__init__()
        if optimizer.name not in ("adamw", "ivon"):
            raise ValueError(f"Lightning finetuning supports optimizer 'adamw' or 'ivon', got {optimizer.name!r}")
        if optimizer.name == "ivon" and optimizer.ess is None:
            raise ValueError("IVON needs an effective sample size: resolve OptimizerSettings.ess first")
        self.model = model
        self.optimizer_settings = optimizer
        self.optimizer_name = optimizer.name
        self.automatic_optimization = optimizer.name != "ivon"
        self.ivon_optimizer: ivon.IVON | None = None

    def compute_loss(self, batch: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Any) -> Tensor:
        return default_forward(self.model, batch)

    def configure_optimizers(self):
        params = [p for _, p in _trainable(self.model)]
        s = self.optimizer_settings
        if s.name == "ivon":
            self.ivon_optimizer = s.make_ivon(params, ess=s.ess)
            if s.initial_hess is not None:
                _start_hess(self.ivon_optimizer, _trainable(self.model), s.initial_hess)
            return self.ivon_optimizer
        return torch.optim.AdamW(params, lr=float(s.lr), weight_decay=float(s.weight_decay))

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
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss


class SingleTaskModule(_FinetuneModule):
    """Finetune on one task: mean cross-entropy (+ the optimizer's weight decay)."""

    def compute_loss(self, batch: Any) -> Tensor:
        return task_loss(self.model, batch)


class WeightedMultitaskModule(_FinetuneModule):
    """Multitask finetune of eq. 1: ``Σ_t α_t l_t(θ) + R0(θ)``, one batch per task per step.

    A training batch is a sequence (or a mapping in task order) of per-task batches, as produced
    by ``CombinedLoader(..., mode="max_size_cycle")``.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: Sequence[float],
        optimizer: OptimizerSettings,
        *,
        task_names: Sequence[str] | None = None,
    ):
        alpha = list(alpha)
        names = list(task_names) if task_names is not None else [f"task{t}" for t in range(len(alpha))]
        if len(names) != len(alpha):
            raise ValueError(f"{len(names)} task names for {len(alpha)} α entries")
        super().__init__(model, optimizer)
        self.alpha = check_alpha(alpha, len(alpha))
        self.task_names = names

    def _batches(self, batch: Any) -> list[Any]:
        if isinstance(batch, Mapping):
            missing = [n for n in self.task_names if n not in batch]
            if missing:
                raise ValueError(f"multitask batch lacks tasks {missing}")
            return [batch[n] for n in self.task_names]
        return list(batch)

    def compute_loss(self, batch: Any) -> Tensor:
        loss, per_task = weighted_multitask_loss(self.model, self._batches(batch), self.alpha)
        for name, lt in zip(self.task_names, per_task, strict=True):
            if lt is not None and self._trainer is not None:
                self.log(f"train/{name}/loss", lt, on_step=True, on_epoch=False)
        return loss


# --------------------------------------------------------------------------------------------
# posteriors and snapshots
# --------------------------------------------------------------------------------------------
def ivon_posterior(model: nn.Module, opt: ivon.IVON, meta: PosteriorMeta) -> DiagonalGaussian:
    """``DiagonalGaussian.from_ivon`` of the model and its optimizer, copied to CPU."""
    post = DiagonalGaussian.from_ivon(model, opt, meta)
    return DiagonalGaussian(
        {k: v.detach().to("cpu").clone() for k, v in post.mean.items()},
        {k: v.detach().to("cpu").clone() for k, v in post.precision.items()},
        post.meta,
    )


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
        if trainer.max_steps is not None and trainer.max_steps > 0 and self.steps[-1] > trainer.max_steps:
            raise ValueError(f"snapshot step {self.steps[-1]} is beyond max_steps={trainer.max_steps}")
        if not isinstance(pl_module, _FinetuneModule) or pl_module.optimizer_name != "ivon":
            raise ValueError("IVONSnapshots needs a varmerge finetune module trained with optimizer 'ivon'")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.posteriors:
            meta = copy.deepcopy(self.meta)
            meta.extra = {**meta.extra, "step": step}
            self.posteriors[step] = ivon_posterior(pl_module.model, pl_module.ivon_optimizer, meta)
