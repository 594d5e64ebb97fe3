"""Selection: the top-k α of a merged front under the selection constraints."""

from __future__ import annotations

import torch

from varmerge import pareto
from varmerge.plan import RunPlan


def constraints(plan: RunPlan) -> list[tuple[int, str, float]]:
    """The selection constraints as ``(task index, op, value)``."""
    names = plan.task_names
    return [(names.index(c.task), c.op, c.value) for c in plan.cfg.selection.constraints]


def select(plan: RunPlan, alpha: torch.Tensor, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and α of the top-k by mean accuracy among rows meeting the constraints."""
    k = plan.cfg.selection.top_k
    return pareto.select_alpha(alpha, accuracy, k=k, constraints=constraints(plan), task_names=plan.task_names)
