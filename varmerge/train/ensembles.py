"""Mixture posteriors from several IVON runs: MultiIVON (K seeds) and SoupIVON (runs × snapshots)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from torch import nn

import varmerge.train as _package
from varmerge.posterior import DiagonalGaussian, MixtureGaussian, PosteriorMeta
from varmerge.train.batches import Data
from varmerge.train.modules import IVONSnapshots
from varmerge.train.settings import OptimizerSettings, TrainerSettings

__all__ = ["fit_multi_ivon", "fit_soup_ivon"]

Completed = Mapping[int, Sequence[DiagonalGaussian]]
OnRun = Callable[[int, list[DiagonalGaussian]], None]


def _ivon_mixture(
    name: str,
    model: nn.Module,
    data: Data,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    num_runs: int,
    seed: int,
    task: str,
    completed: Completed | None,
    on_run: OnRun | None,
    snapshot_steps: list[int] | None = None,
) -> MixtureGaussian:
    """IVON once per seed ``seed + k`` (k < ``num_runs``) from the same θ0; the mixture ``name``.

    Each run contributes its final posterior, or with ``snapshot_steps`` its snapshots at those
    steps; the components are equally weighted, run-major. ``completed`` maps run index -> that
    run's posteriors (done before, e.g. by a killed job): those runs are not trained again.
    ``on_run(run, posteriors)`` sees each run as it finishes (to persist it). Each run depends
    only on θ0 and its seed, so skipping finished runs gives the same result as training them
    all. Every run goes through ``varmerge.train.fit`` looked up on the package at call time, so
    a wrapper patched there sees each run. The model is given back with its weights θ0.
    """
    if num_runs < 1:
        raise ValueError(f"need num_runs >= 1, got {num_runs}")
    if optimizer.name != "ivon":
        raise ValueError(f"MultiIVON / SoupIVON train with optimizer 'ivon', got {optimizer.name!r}")
    seeds = [seed + k for k in range(num_runs)]
    completed = dict(completed or {})
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs: list[list[DiagonalGaussian]] = []
    try:
        for run, s in enumerate(seeds):
            if run in completed:
                runs.append(list(completed[run]))
                continue
            model.load_state_dict(theta0)
            meta = PosteriorMeta(task=task, optimizer="ivon", seed=int(s), extra={"run": run})
            snaps = IVONSnapshots(snapshot_steps, meta) if snapshot_steps else None
            run_trainer = dataclasses.replace(trainer, callbacks=(*trainer.callbacks, snaps)) if snaps else trainer
            _, post = _package.fit(model, data, optimizer, run_trainer, seed=int(s), task=task, meta=meta)
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
    comps = [c for r in runs for c in r]
    extra = {"steps": snapshot_steps} if snapshot_steps else {}
    meta = PosteriorMeta(
        task=task,
        optimizer=name,
        seed=seeds[0],
        ess=comps[0].meta.ess,
        weight_decay=comps[0].meta.weight_decay,
        extra={"seeds": seeds, **extra},
    )
    return MixtureGaussian(comps, meta=meta)


def fit_multi_ivon(
    model: nn.Module,
    data: Data,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    *,
    num_runs: int,
    seed: int = 0,
    task: str = "task",
    completed_runs: Completed | None = None,
    on_run: OnRun | None = None,
) -> MixtureGaussian:
    """MultiIVON: ``num_runs`` IVON runs from the same θ0 with seeds ``seed + k``.

    Returns the equal-weight :class:`MixtureGaussian` of their final posteriors (meta optimizer
    ``multi_ivon``). The model is given back with its initial weights θ0; component k's mean holds
    run k's weights. ``completed_runs`` / ``on_run``: resume from runs already done, persist runs
    as they finish (see :func:`_ivon_mixture`).
    """
    return _ivon_mixture("multi_ivon", model, data, optimizer, trainer, num_runs, seed, task, completed_runs, on_run)


def fit_soup_ivon(
    model: nn.Module,
    data: Data,
    optimizer: OptimizerSettings,
    trainer: TrainerSettings,
    *,
    num_runs: int,
    snapshot_steps: Sequence[int],
    seed: int = 0,
    task: str = "task",
    completed_runs: Completed | None = None,
    on_run: OnRun | None = None,
) -> MixtureGaussian:
    """SoupIVON: ``num_runs`` IVON runs (seeds ``seed + k``), each snapshotted at ``snapshot_steps``.

    The snapshot steps are global steps within ``trainer.steps``. Returns the equal-weight mixture
    of ``num_runs · len(snapshot_steps)`` components, run-major (run 0's snapshots in step order
    first); meta optimizer ``soup_ivon``. The model is given back at θ0. ``completed_runs`` /
    ``on_run`` as in :func:`fit_multi_ivon`.
    """
    steps = sorted({int(s) for s in snapshot_steps})
    if not steps:
        raise ValueError("snapshot_steps is empty")
    return _ivon_mixture(
        "soup_ivon", model, data, optimizer, trainer, num_runs, seed, task, completed_runs, on_run, steps
    )
