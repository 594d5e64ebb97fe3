"""Single-purpose flows for deployments: one task's finetune, and one multitask finetune."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.front import resolve_config
from tasks.runner import Pool, PrefectRunner


def _runner(config) -> PrefectRunner:
    """A runner in this flow's thread: these flows run one task (a deployment per task scales out)."""
    from prefect.context import get_run_context

    cfg = resolve_config(config)
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return PrefectRunner(cfg, str(run_dir), Pool(get_run_context().task_runner))


@flow(name="varmerge-finetune-task")
def finetune_task_flow(config: str | dict, task: str) -> dict:
    """Finetune one task of ``config`` and write its posterior (reused if already there)."""
    from tasks import steps

    runner = _runner(config)
    names = [t.name for t in runner.cfg.data.tasks]
    if task not in names:
        raise ValueError(f"unknown task {task!r}; the config's tasks are {names}")
    data_ref = runner.data()
    return steps.finetune(runner.cfg_json, runner.run_dir, data_ref, runner.base(data_ref), names.index(task))


@flow(name="varmerge-multitask")
def multitask_flow(config: str | dict, alpha: list[float]) -> dict:
    """The real multitask finetune of ``config`` at weighting ``alpha`` (on the simplex)."""
    import torch

    from varmerge._checks import check_alpha

    runner = _runner(config)
    check_alpha(alpha, len(runner.cfg.data.tasks))
    data_ref = runner.data()
    runner.multitasks(data_ref, runner.base(data_ref), torch.tensor([[float(a) for a in alpha]]))
    return runner.multitask_refs[0]
