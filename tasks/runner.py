"""The steps of :func:`varmerge.sequence.estimate_front` as Prefect tasks over the run store.

Handles are file references; the per-task finetunes and the per-method sweeps fan out over the
flow's task runner; sweeps and multitask results come back as the small tensors the sequence
selects from. The runner keeps the references it produced (``data_ref``, ``base_ref``,
``multitask_refs``): the flow registers the first multitask model.
"""

from __future__ import annotations

import json

import torch
from prefect import unmapped

from tasks import steps
from tasks.tracking import Parent
from varmerge.config import ExperimentConfig


class PrefectRunner:
    def __init__(
        self, cfg: ExperimentConfig, run_dir: str, *, data_dir: str | None = None, parent: Parent | None = None
    ):
        self.cfg, self.run_dir, self.data_dir = cfg, str(run_dir), data_dir
        self.cfg_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        self.parent = parent  # the MLflow run the tasks log under (None: no logging)
        self.data_ref: dict | None = None
        self.base_ref: dict | None = None
        self.multitask_refs: list[dict] = []

    def data(self) -> dict:
        if self.data_ref is None:
            self.data_ref = steps.prepare_data(self.cfg_json, self.run_dir, self.data_dir)
        return self.data_ref

    def base(self, data: dict) -> dict:
        self.base_ref = steps.base_model(self.cfg_json, self.run_dir, data, parent=self.parent)
        return self.base_ref

    def finetunes(self, data: dict, base: dict) -> list[dict]:
        return steps.finetune.map(
            unmapped(self.cfg_json),
            unmapped(self.run_dir),
            unmapped(data),
            unmapped(base),
            list(range(len(self.cfg.data.tasks))),
            parent=unmapped(self.parent),
        ).result()

    def sweeps(self, data: dict, base: dict, posteriors: list[dict], methods) -> dict[str, dict]:
        futures = {
            m: steps.sweep.submit(self.cfg_json, self.run_dir, m, data, base, posteriors, parent=self.parent)
            for m in methods
        }
        return {m: steps.load_sweep(self.run_dir, f.result()) for m, f in futures.items()}

    def multitasks(self, data: dict, base: dict, alphas: torch.Tensor) -> list[torch.Tensor]:
        self.multitask_refs = steps.multitask.map(
            unmapped(self.cfg_json),
            unmapped(self.run_dir),
            unmapped(data),
            unmapped(base),
            [a.tolist() for a in alphas],
            parent=unmapped(self.parent),
        ).result()
        return [torch.tensor(r["accuracy"], dtype=torch.float64) for r in self.multitask_refs]
