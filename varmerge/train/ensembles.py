"""Mixture posteriors from several IVON runs: MultiIVON (K seeds) and SoupIVON (runs × snapshots)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

import varmerge.train as _package
from varmerge.posterior import DiagonalGaussian, MixtureGaussian, PosteriorMeta
from varmerge.train.batches import Data
from varmerge.train.modules import IVONSnapshots
from varmerge.train.settings import OptimizerSettings, TrainerSettings

__all__ = ["IVONRuns", "fit_multi_ivon", "fit_soup_ivon"]

Completed = Mapping[int, Sequence[DiagonalGaussian]]
OnRun = Callable[[int, list[DiagonalGaussian]], None]


@dataclass(frozen=True, kw_only=True)
class IVONRuns:
    """The IVON runs of a MultiIVON / SoupIVON mixture.

    ``num_runs`` runs from the same θ0 with seeds ``seed + k``; ``task`` names the posteriors;
    ``snapshot_steps`` (SoupIVON only): the global steps at which each run is snapshotted.
    ``completed_runs`` maps run index -> that run's posteriors (done before, e.g. by a killed job):
    those runs are not trained again; ``on_run(run, posteriors)`` sees each run as it finishes
    (to persist it).
    """

    num_runs: int
    seed: int = 0
    task: str = "task"
    snapshot_steps: Sequence[int] | None = None
    completed_runs: Completed | None = None
    on_run: OnRun | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_runs)]


def _train_run(
    model: nn.Module, data: Data, optimizer: OptimizerSettings, trainer: TrainerSettings, runs: IVONRuns, run: int
) -> list[DiagonalGaussian]:
    """Run ``run`` from the model's current weights: its final posterior, or its snapshots."""
    s = runs.seeds[run]
    meta = PosteriorMeta(task=runs.task, optimizer="ivon", seed=int(s), extra={"run": run})
    steps = runs.snapshot_steps
    snaps = IVONSnapshots(steps, meta) if steps else None
    run_trainer = dataclasses.replace(trainer, callbacks=(*trainer.callbacks, snaps)) if snaps else trainer
    _, post = _package.fit(model, data, optimizer, run_trainer, seed=int(s), task=runs.task, meta=meta)
    if snaps is None:
        return [post]
    missing = [st for st in snaps.steps if st not in snaps.posteriors]
    if missing:
        raise RuntimeError(f"run {run}: no snapshot taken at steps {missing}")
    return [snaps.posteriors[st] for st in snaps.steps]


def _ivon_mixture(
    name: str, model: nn.Module, data: Data, optimizer: OptimizerSettings, trainer: TrainerSettings, runs: IVONRuns
) -> MixtureGaussian:
    """IVON once per seed ``seed + k`` (k < ``num_runs``) from the same θ0; the mixture ``name``.

    Each run contributes its final posterior, or with ``snapshot_steps`` its snapshots at those
    steps; the components are equally weighted, run-major. Each run depends only on θ0 and its
    seed, so skipping ``completed_runs`` gives the same result as training them all. Every run
    goes through ``varmerge.train.fit`` looked up on the package at call time, so a wrapper
    patched there sees each run. The model is given back with its weights θ0.
    """
    if runs.num_runs < 1:
        raise ValueError(f"need num_runs >= 1, got {runs.num_runs}")
    if optimizer.name != "ivon":
        raise ValueError(f"MultiIVON / SoupIVON train with optimizer 'ivon', got {optimizer.name!r}")
    completed = dict(runs.completed_runs or {})
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    done: list[list[DiagonalGaussian]] = []
    try:
        for run in range(runs.num_runs):
            if run in completed:
                done.append(list(completed[run]))
                continue
            model.load_state_dict(theta0)
            done.append(_train_run(model, data, optimizer, trainer, runs, run))
            if runs.on_run is not None:
                runs.on_run(run, done[-1])
    finally:
        model.load_state_dict(theta0)
    comps = [c for r in done for c in r]
    extra = {"steps": runs.snapshot_steps} if runs.snapshot_steps else {}
    meta = PosteriorMeta(
        task=runs.task,
        optimizer=name,
        seed=runs.seeds[0],
        ess=comps[0].meta.ess,
        weight_decay=comps[0].meta.weight_decay,
        extra={"seeds": runs.seeds, **extra},
    )
    return MixtureGaussian(comps, meta=meta)


def fit_multi_ivon(
    model: nn.Module, data: Data, optimizer: OptimizerSettings, trainer: TrainerSettings, runs: IVONRuns
) -> MixtureGaussian:
    """MultiIVON: ``runs.num_runs`` IVON runs from the same θ0 with seeds ``runs.seed + k``.

    Returns the equal-weight :class:`MixtureGaussian` of their final posteriors (meta optimizer
    ``multi_ivon``). The model is given back with its initial weights θ0; component k's mean holds
    run k's weights. ``runs.completed_runs`` / ``runs.on_run``: resume from runs already done,
    persist runs as they finish (see :class:`IVONRuns`).
    """
    if runs.snapshot_steps is not None:
        raise ValueError("MultiIVON takes no snapshot_steps (SoupIVON does: fit_soup_ivon)")
    return _ivon_mixture("multi_ivon", model, data, optimizer, trainer, runs)


def fit_soup_ivon(
    model: nn.Module, data: Data, optimizer: OptimizerSettings, trainer: TrainerSettings, runs: IVONRuns
) -> MixtureGaussian:
    """SoupIVON: ``runs.num_runs`` IVON runs (seeds ``runs.seed + k``), each snapshotted at ``runs.snapshot_steps``.

    The snapshot steps are global steps within ``trainer.steps``. Returns the equal-weight mixture
    of ``num_runs · len(snapshot_steps)`` components, run-major (run 0's snapshots in step order
    first); meta optimizer ``soup_ivon``. The model is given back at θ0. ``completed_runs`` /
    ``on_run`` as in :func:`fit_multi_ivon`.
    """
    steps = sorted({int(s) for s in runs.snapshot_steps or ()})
    if not steps:
        raise ValueError("snapshot_steps is empty")
    return _ivon_mixture("soup_ivon", model, data, optimizer, trainer, dataclasses.replace(runs, snapshot_steps=steps))
