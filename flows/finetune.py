"""Single-purpose flows for deployments: one task's finetune, and one multitask finetune."""

from __future__ import annotations

from prefect import flow
from prefect.context import get_run_context

from flows.front import resolve_plan
from tasks.runner import Pool, PrefectRunner
from varmerge.plan import RunPlan


def _runner(config: str | dict | RunPlan) -> PrefectRunner:
    """A runner in this flow's thread: these flows run one task (a deployment per task scales out)."""
    return PrefectRunner(resolve_plan(config), Pool(get_run_context().task_runner))


@flow(name="varmerge-finetune-task")
def finetune_task_flow(config: str | dict | RunPlan, task: str) -> dict:
    """Finetune one task of ``config`` and write its posterior (reused if already there)."""
    from tasks import steps

    runner = _runner(config)
    names = runner.plan.task_names
    if task not in names:
        raise ValueError(f"unknown task {task!r}; the config's tasks are {names}")
    data_ref = runner.data()
    return steps.finetune(runner.plan, data_ref, runner.theta0(data_ref), names.index(task))


@flow(name="varmerge-multitask")
def multitask_flow(config: str | dict | RunPlan, alpha: list[float]) -> dict:
    """The real multitask finetune of ``config`` at weighting ``alpha`` (on the simplex)."""
    from varmerge._checks import check_alpha

    runner = _runner(config)
    weights, _ = check_alpha(alpha, len(runner.plan.tasks))
    data_ref = runner.data()
    runner.multitasks(data_ref, runner.theta0(data_ref), weights)
    return runner.multitask_ref(weights[0])
