"""Selection: the top-k α of a merged front by the plan's objective, under its constraints."""

from __future__ import annotations

import torch

from varmerge import pareto
from varmerge.objective import row_of
from varmerge.plan import RunPlan


def constraints(plan: RunPlan, pooled=None) -> list[tuple[int, str, float]]:
    """The selection constraints as ``(task index, op, value)``: the configured ones and, with
    ``selection.max_drop_vs_pooled`` x and the (T,) scores at pooled α ``pooled``, every task
    ``>= pooled − x``."""
    names = plan.task_names
    out = [(names.index(c.task), c.op, c.value) for c in plan.cfg.selection.constraints]
    drop = plan.cfg.selection.max_drop_vs_pooled
    if drop is not None and pooled is not None:
        out += [(t, ">=", float(pooled[t]) - drop) for t in range(len(names))]
    return out


def pooled_scores(plan: RunPlan, alpha: torch.Tensor, accuracy: torch.Tensor) -> torch.Tensor:
    """The (T,) scores of a front at pooled α (an exact row of the plan's grid)."""
    row = row_of(alpha, plan.defaults()["pooled"])
    if row is None:
        raise ValueError("the front has no row at pooled α: it was not swept over the plan's grid")
    return accuracy[row]


def select(plan: RunPlan, alpha: torch.Tensor, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and α of the top-k by the plan's objective among rows meeting the constraints."""
    k = plan.cfg.selection.top_k
    cons = constraints(plan, pooled_scores(plan, alpha, accuracy))
    return pareto.select_alpha(
        alpha, accuracy, k=k, constraints=cons, task_names=plan.task_names, objective=plan.objective
    )
