"""The steps of :func:`varmerge.sequence.estimate_front` as Prefect tasks over the run store.

Handles are file references; the per-task finetunes, the per-method sweeps (split into blocks of
α when the pool has several workers) and the multitask finetunes fan out over a Prefect task
runner, the *pool* (:func:`task_pool`: the flow's own thread, or a Dask cluster); sweeps and
multitask results come back as the small tensors the sequence selects from. Only references cross
to the workers, which share the run folder. The runner keeps the references it produced
(``data_ref``, ``theta0_ref``, ``multitask_refs`` by their exact α): the flow registers the
model of the chosen α.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from prefect import unmapped
from prefect.context import get_run_context
from prefect.task_runners import TaskRunner

from tasks import steps
from tasks.tracking import Parent
from varmerge.config import RunnerConfig
from varmerge.pipeline import SWEEP_BLOCK
from varmerge.plan import RunPlan

DASK_CONNECT_TIMEOUT_S = 10


@dataclass
class Pool:
    """A started Prefect task runner and how many workers it has (sweeps split into that many
    blocks of α)."""

    task_runner: TaskRunner
    workers: int = 1
    description: str = "the flow's thread"


@contextlib.contextmanager
def task_pool(rc: RunnerConfig) -> Iterator[Pool]:
    """The pool of ``rc`` for the current flow run: ``thread`` is the flow's own task runner;
    ``dask`` starts a local cluster of worker processes (stopped on the way out) or connects to
    the scheduler at ``rc.address``. Errors reaching the cluster are one-line ``ValueError``s."""
    if rc.kind == "thread":
        yield Pool(get_run_context().task_runner)
        return
    from prefect_dask import DaskTaskRunner

    if rc.address is not None:
        dask = DaskTaskRunner(address=rc.address, client_kwargs={"timeout": DASK_CONNECT_TIMEOUT_S})
        where = f"the Dask cluster at {rc.address}"
    else:  # one torch thread per worker process (distributed sets OMP_NUM_THREADS=1 in each)
        logging.getLogger("distributed").setLevel(logging.WARNING)  # its scheduler runs here: no INFO chatter
        kwargs = {"n_workers": rc.local_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        dask = DaskTaskRunner(cluster_kwargs=kwargs)
        where = f"a local Dask cluster of {rc.local_workers} worker processes"
    with dask:
        try:
            workers = len(dask.client.scheduler_info(n_workers=-1)["workers"])
        except OSError as exc:
            raise ValueError(f"runner: cannot reach {where}: {exc}") from None
        if workers == 0:
            raise ValueError(f"runner: {where} has no workers: start some (dask worker {rc.address})")
        yield Pool(dask, workers, where)


class PrefectRunner:
    """The sequence's steps as Prefect tasks of ``pool`` over the run store of ``plan``."""

    def __init__(self, plan: RunPlan, pool: Pool, parent: Parent | None = None):
        self.plan, self.pool = plan, pool
        self.parent = parent  # the MLflow run the tasks log under (None: no logging)
        self.data_ref: dict | None = None
        self.theta0_ref: dict | None = None
        self.multitask_refs: dict[tuple[float, ...], dict] = {}  # by exact α, in the order they ran

    def data(self) -> dict:
        if self.data_ref is None:
            self.data_ref = steps.prepare_data(self.plan)
        return self.data_ref

    def theta0(self, data: dict) -> dict:
        self.theta0_ref = steps.theta0(self.plan, data, parent=self.parent)
        return self.theta0_ref

    def finetunes(self, data: dict, theta0: dict) -> list[dict]:
        fixed = {"plan": self.plan, "data_ref": data, "theta0_ref": theta0, "parent": self.parent}
        args = {**{k: unmapped(v) for k, v in fixed.items()}, "task_index": list(range(len(self.plan.tasks)))}
        return self.pool.task_runner.map(steps.finetune, args).result()

    def learning(self, data: dict, theta0: dict, posteriors: list[dict]) -> dict[str, list[float]]:
        args = {"plan": self.plan, "data_ref": data, "theta0_ref": theta0, "posterior_refs": posteriors}
        return self.pool.task_runner.submit(steps.learning_scores, args).result()

    def sweep_blocks(self, method: str) -> list[list[int]]:
        """``[lo, hi)`` rows of the α grid per block of ``method``'s sweep, one per worker: whole
        batches of :data:`~varmerge.pipeline.SWEEP_BLOCK` α, so the joined blocks equal the whole
        sweep bit for bit. None (an empty list) for a grid of one batch, one worker, or an
        estimator (MAP needs the whole grid)."""
        n = len(self.plan.grid())
        batches = -(-n // SWEEP_BLOCK)
        k = min(self.pool.workers, batches)
        if k <= 1 or self.plan.merge_step(method).spec.kind == "estimator":
            return []
        edges = [min(n, round(i * batches / k) * SWEEP_BLOCK) for i in range(k + 1)]
        return [[lo, hi] for lo, hi in zip(edges[:-1], edges[1:])]

    def sweeps(self, data: dict, theta0: dict, posteriors: list[dict], methods) -> dict[str, dict]:
        inputs = {"data": data, "theta0": theta0, "posteriors": posteriors}
        submit = self.pool.task_runner.submit
        futures = {}
        for m in methods:
            args = {"plan": self.plan, "method": m, "inputs": inputs}
            done = steps.find_sweep(self.plan, m, data, theta0, posteriors)
            blocks = [] if done else self.sweep_blocks(m)
            parts = [submit(steps.sweep_block, {**args, "rows": rows}) for rows in blocks]
            futures[m] = submit(steps.sweep, {**args, "parent": self.parent, "blocks": parts or None})
        return {m: steps.load_sweep(self.plan, f.result()) for m, f in futures.items()}

    def multitasks(self, data: dict, theta0: dict, alphas: torch.Tensor) -> list[torch.Tensor]:
        fixed = {"plan": self.plan, "data_ref": data, "theta0_ref": theta0, "parent": self.parent}
        args = {**{k: unmapped(v) for k, v in fixed.items()}, "alpha": [tuple(a.tolist()) for a in alphas]}
        refs = self.pool.task_runner.map(steps.multitask, args).result()
        self.multitask_refs.update({r["alpha"]: r for r in refs})
        return [torch.tensor(r["accuracy"], dtype=torch.float64) for r in refs]

    def multitask_ref(self, alpha: torch.Tensor) -> dict:
        """The reference of the multitask finetune this runner ran at ``alpha`` (a row of the grid)."""
        key = tuple(alpha.tolist())
        if key not in self.multitask_refs:
            raise KeyError(f"no multitask finetune at α {list(key)} in this run")
        return self.multitask_refs[key]
