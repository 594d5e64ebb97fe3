"""Single-purpose flows for deployments: one task's finetune, and one multitask finetune."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.front import _resolve
from tasks import steps


def _setup(config):
    cfg = _resolve(config)
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


@flow(name="varmerge-finetune-task")
def finetune_task_flow(config: str | dict, task: str) -> dict:
    """Finetune one task of ``config`` and write its posterior (reused if already there)."""
    cfg, run_dir, cfg_json = _setup(config)
    names = [t.name for t in cfg.data.tasks]
    if task not in names:
        raise ValueError(f"unknown task {task!r}; the config's tasks are {names}")
    data_ref = steps.prepare_data(cfg_json, str(run_dir))
    base_ref = steps.base_model(cfg_json, str(run_dir), data_ref)
    return steps.finetune(cfg_json, str(run_dir), data_ref, base_ref, names.index(task))


@flow(name="varmerge-multitask")
def multitask_flow(config: str | dict, alpha: list[float]) -> dict:
    """The real multitask finetune of ``config`` at weighting ``alpha`` (on the simplex)."""
    from varmerge._checks import check_alpha

    cfg, run_dir, cfg_json = _setup(config)
    check_alpha(alpha, len(cfg.data.tasks))
    data_ref = steps.prepare_data(cfg_json, str(run_dir))
    base_ref = steps.base_model(cfg_json, str(run_dir), data_ref)
    return steps.multitask(cfg_json, str(run_dir), data_ref, base_ref, [float(a) for a in alpha])
