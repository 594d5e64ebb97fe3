"""The two frozen settings objects every training entry point takes, each validated once.

:class:`OptimizerSettings` says how to optimise (which optimizer, its learning rate, prior and
IVON's own arguments), :class:`TrainerSettings` how to run Lightning (steps, batch size, device,
precision, logging). the run plan (:mod:`varmerge.plan`) builds them
from a config; a bad value raises one ValueError naming it, before anything trains.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ivon
import torch

__all__ = [
    "ACCELERATORS",
    "IVON_OWN_ARGUMENTS",
    "OPTIMIZERS",
    "PRECISIONS",
    "OptimizerSettings",
    "TrainerSettings",
    "Training",
]

OPTIMIZERS = ("adamw", "ivon", "full_von")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: Lightning precisions; "16-mixed" needs a gradient scaler, which IVON cannot go through.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")

#: ``ivon.IVON``'s keyword arguments that ``OptimizerSettings.ivon`` may set (the others are fields).
IVON_OWN_ARGUMENTS = tuple(
    n for n in inspect.signature(ivon.IVON).parameters if n not in ("params", "lr", "ess", "weight_decay", "mc_samples")
)


def _number(name: str, value: Any, *, low: float, strict: bool, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {rel} {low}, got {value!r}")


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class OptimizerSettings:
    """How to optimise. Fields an optimizer does not read are ignored (a config sets them all).

    * ``name``: ``"adamw"`` (torch AdamW; posterior: squared gradients + δ), ``"ivon"`` or
      ``"full_von"`` (full-Gaussian VON of logistic regression, :func:`varmerge.train.fit_full_von`).
    * ``lr``: AdamW's / IVON's learning rate; full VON's step size ρ in (0, 1].
    * ``weight_decay``: AdamW's decoupled decay, IVON's prior precision per example.
    * ``ess``: IVON's effective sample size; None = the number of training examples.
    * ``mc_samples``: sampled gradients per IVON step (>= 1) or per full VON iteration (0: Newton
      at the mean).
    * ``prior_precision``: δ, AdamW-SG's precision floor (None: N · weight_decay) and full VON's
      prior precision (None: 1).
    * ``ivon``: IVON's own keyword arguments (``hess_init``, ``beta1``, ``beta2``, ``clip_radius``,
      ``hess_approx``, ``rescale_lr``, ``debias``, ``sync``), passed straight to
      ``ivon.IVON(params, lr=lr, ess=ess, weight_decay=weight_decay, mc_samples=mc_samples, **ivon)``;
      IVON's defaults apply to the ones left out (``hess_init=1``, ``beta2=0.99999``).
    * ``initial_hess``: IVON's Hessian at step 0, per trainable parameter name (a pretrained
      posterior's :meth:`~varmerge.posterior.DiagonalGaussian.per_example_hessian`: the finetune
      starts *at the pretrained posterior*); None starts every entry at ``hess_init``.
    """

    name: str = "ivon"
    lr: float = 0.1
    weight_decay: float = 1e-4
    ess: float | None = None
    mc_samples: int = 1
    prior_precision: float | None = None
    ivon: Mapping[str, Any] = field(default_factory=dict)
    initial_hess: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        _number("lr", self.lr, low=0.0, strict=True)
        if self.name == "full_von" and self.lr > 1:
            raise ValueError(f"full VON's lr (step size ρ) must be in (0, 1], got {self.lr}")
        _number("weight_decay", self.weight_decay, low=0.0, strict=False)
        _number("ess", self.ess, low=0.0, strict=True, none_ok=True)
        _number("prior_precision", self.prior_precision, low=0.0, strict=False, none_ok=True)
        _positive_int("mc_samples", self.mc_samples, low=0 if self.name == "full_von" else 1)
        if not isinstance(self.ivon, Mapping):
            raise ValueError(f"ivon must be a mapping of IVON's keyword arguments, got {type(self.ivon).__name__}")
        unknown = sorted(set(self.ivon) - set(IVON_OWN_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"ivon: unknown IVON argument(s) {unknown}; ivon.IVON takes {list(IVON_OWN_ARGUMENTS)} "
                "(lr, ess, weight_decay and mc_samples are fields of their own)"
            )
        object.__setattr__(self, "ivon", types.MappingProxyType(dict(self.ivon)))
        if self.initial_hess is not None:
            if self.name != "ivon":
                raise ValueError(f"initial_hess is IVON's state; optimizer {self.name!r} has none")
            bad = [k for k, v in self.initial_hess.items() if not bool(torch.isfinite(v).all() and (v > 0).all())]
            if bad:
                raise ValueError(f"initial_hess must be finite and > 0; not so for {bad[:5]}")
            object.__setattr__(self, "initial_hess", types.MappingProxyType(dict(self.initial_hess)))
        # IVON checks its own arguments' values: build it once on a one-element parameter
        try:
            self.make_ivon([torch.zeros(1, requires_grad=True)], ess=self.ess or 1.0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ivon: {dict(self.ivon)} rejected by ivon.IVON: {exc}") from None

    def __reduce__(self):
        """Pickled as its fields (the read-only mappings as dicts): a run plan goes to Dask workers."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["ivon"] = dict(self.ivon)
        if self.initial_hess is not None:
            fields["initial_hess"] = dict(self.initial_hess)
        return (_rebuild, (type(self), fields))

    def make_ivon(self, params, *, ess: float) -> ivon.IVON:
        """``ivon.IVON`` over ``params`` with these settings (``ess`` resolved by the caller)."""
        return ivon.IVON(
            params,
            lr=float(self.lr),
            ess=float(ess),
            weight_decay=float(self.weight_decay),
            mc_samples=self.mc_samples,
            **self.ivon,
        )


def _rebuild(cls, fields: dict):
    return cls(**fields)


@dataclass(frozen=True)
class TrainerSettings:
    """How Lightning runs: ``steps`` optimiser steps (full VON: iterations) of ``batch_size``.

    ``accelerator`` and ``precision`` go to ``lightning.Trainer``; ``logger`` is any Lightning
    logger (None: no logging), ``log_every_n_steps`` its interval; ``progress`` shows the progress
    bar and Lightning's info messages; ``callbacks`` are Lightning callbacks.
    """

    steps: int
    batch_size: int = 128
    accelerator: str = "auto"
    precision: str = "32-true"
    logger: Any = None
    progress: bool = False
    callbacks: Sequence[Any] = ()
    log_every_n_steps: int = 50

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("log_every_n_steps", self.log_every_n_steps)
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator {self.accelerator!r}; use one of {ACCELERATORS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        object.__setattr__(self, "callbacks", tuple(self.callbacks))


@dataclass(frozen=True)
class Training:
    """One training stage: how to optimise, how Lightning runs, and the seed."""

    optimizer: OptimizerSettings
    trainer: TrainerSettings
    seed: int

    def key(self) -> dict:
        """Everything of the stage a trained model depends on (for the run store's keys): the
        optimizer's settings, the trainer's steps, batch size, device and precision, the seed."""
        opt = {f.name: getattr(self.optimizer, f.name) for f in dataclasses.fields(self.optimizer)}
        opt = {**opt, "ivon": dict(self.optimizer.ivon)}
        opt.pop("initial_hess")  # θ0's prior: keyed by its file's hash
        tr = self.trainer
        return {"optimizer": opt, "trainer": [tr.steps, tr.batch_size, tr.accelerator, tr.precision], "seed": self.seed}
