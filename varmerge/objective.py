"""What "the best α" means, the α a user picks without varmerge, and whether α matters at all.

- :class:`Objective`: one number per α from its per-task scores (higher is better): the ``mean``
  over tasks, the ``worst_task`` score, or a ``weighted`` mean with task weights on the simplex.
  Selection, the closed-loop search, regret and the verdict all rank α by it.
- :func:`default_alphas`: the practitioner's free defaults. **pooled** (α_t ∝ N_t: concatenate
  the datasets: with L̄_t a per-example mean (README, "What α means"), Σ_t α_t L̄_t is then the
  mean loss over the pooled examples), **uniform** (α_t = 1/T) and **temperature** (α_t ∝ N_t^τ,
  τ = 0.5 by default: multilingual practice, between the two).
- :func:`with_defaults`: the α grid with the defaults added as exact rows (where not already on
  it), so every merged front scores them by an exact merge, and a real finetune can be placed
  at them.
- :func:`verdict`: does the best α beat pooled by at least a margin, by every method's front?

Pure library code: no prefect, mlflow or files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

KINDS = ("mean", "worst_task", "weighted")
#: α rows closer than this (max norm) are the same α.
SAME_ALPHA = 1e-9


@dataclass(frozen=True)
class Objective:
    """How per-task scores (higher is better) rank α; ``weights`` only for ``weighted``."""

    kind: str = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown objective {self.kind!r}; use one of {list(KINDS)}")
        if (self.kind == "weighted") != (self.weights is not None):
            raise ValueError("objective 'weighted' needs task weights, and only it takes them")
        if self.weights is not None:
            w = self.weights
            if any(not math.isfinite(v) or v < 0 for v in w) or abs(sum(w) - 1.0) > 1e-6:
                raise ValueError(f"objective weights must be >= 0 and sum to 1 (on the simplex), got {list(w)}")

    def __call__(self, scores) -> torch.Tensor:
        """(..., T) per-task scores -> (...) objective values (float64)."""
        s = torch.as_tensor(scores, dtype=torch.float64)
        if self.kind == "mean":
            return s.mean(-1)
        if self.kind == "worst_task":
            return s.amin(-1)
        w = torch.tensor(self.weights, dtype=torch.float64)
        if w.numel() != s.shape[-1]:
            raise ValueError(f"objective has {w.numel()} task weights, the scores {s.shape[-1]} tasks")
        return s @ w

    @property
    def label(self) -> str:
        return {"mean": "mean accuracy", "worst_task": "worst-task accuracy", "weighted": "weighted accuracy"}[
            self.kind
        ]


def default_alphas(sizes: Sequence[int], temperature: float = 0.5) -> dict[str, torch.Tensor]:
    """The free defaults from the tasks' training examples ``sizes``: ``pooled`` (∝ N_t),
    ``uniform`` and ``temperature`` (∝ N_t^τ), each a (T,) float64 α on the simplex."""
    n = torch.tensor([float(v) for v in sizes], dtype=torch.float64)
    if n.numel() < 2 or not bool((n > 0).all()):
        raise ValueError(f"default α need at least 2 tasks with training examples, got sizes {list(sizes)}")
    if not 0 <= temperature <= 1:
        raise ValueError(f"temperature τ must lie in [0, 1] (0: uniform, 1: pooled), got {temperature}")
    t = n**temperature
    return {"pooled": n / n.sum(), "uniform": torch.full_like(n, 1.0 / len(n)), "temperature": t / t.sum()}


def row_of(alpha: torch.Tensor, a) -> int | None:
    """The row of ``alpha`` ((G, T)) equal to ``a`` (within :data:`SAME_ALPHA`), or None."""
    d = (torch.as_tensor(alpha, dtype=torch.float64) - torch.as_tensor(a, dtype=torch.float64)).abs().amax(-1)
    i = int(d.argmin())
    return i if float(d[i]) <= SAME_ALPHA else None


def with_defaults(grid: torch.Tensor, defaults: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``grid`` with each default α appended as a row, unless it is already there."""
    rows = [grid]
    for a in defaults.values():
        a = torch.as_tensor(a, dtype=grid.dtype).reshape(1, -1)
        if row_of(torch.cat(rows), a[0]) is None:
            rows.append(a)
    return torch.cat(rows)


def default_rows(alpha: torch.Tensor, defaults: Mapping[str, Sequence[float]]) -> dict[str, int]:
    """The row of each default α in ``alpha`` (they are exact rows of :func:`with_defaults`)."""
    out = {}
    for name, a in defaults.items():
        r = row_of(alpha, a)
        if r is None:
            raise ValueError(f"the {name} α {[round(float(v), 4) for v in a]} is not a row of the α grid")
        out[name] = r
    return out


@dataclass(frozen=True)
class Verdict:
    """Whether α matters: the predicted gain of the best α over pooled per method (objective units),
    and the call: ``True`` (every method predicts at least ``margin``), ``False`` (every method
    predicts less) or ``None`` (the methods disagree)."""

    matters: bool | None
    gains: dict[str, float]
    margin: float
    objective: str
    flat: bool = False  # every front predicts the same objective at every α: it cannot tell

    @property
    def message(self) -> str:
        g = sorted(self.gains.values())
        span = f"{100 * g[0]:.1f}" if len(g) == 1 or g[-1] - g[0] < 5e-4 else f"{100 * g[0]:.1f}–{100 * g[-1]:.1f}"
        what = f"{self.objective}, {len(g)} merge method{'s' if len(g) > 1 else ''}"
        if self.flat:
            return (
                f"α may matter: the merged fronts cannot tell, they predict the same {self.objective} at every α "
                f"(a task no merged model serves); a real finetune decides"
            )
        if self.matters is False:
            return (
                f"α matters little here: pooled data is predicted within {span} points of the best α "
                f"({what}; margin {100 * self.margin:.1f})"
            )
        if self.matters:
            return f"α matters: the best α is predicted {span} points above pooled data ({what})"
        return (
            f"α may matter: the merge methods disagree on the gain over pooled data ({span} points; "
            f"{what}; margin {100 * self.margin:.1f}): a real finetune decides"
        )

    def as_dict(self) -> dict:
        return {
            "matters": self.matters,
            "gains": dict(self.gains),
            "margin": self.margin,
            "objective": self.objective,
            "flat": self.flat,
            "message": self.message,
        }


def verdict(objective: Objective, predicted: Mapping[str, torch.Tensor], pooled_row: int, margin: float) -> Verdict:
    """The verdict from merged fronts: ``predicted`` is {method: (G, T) scores on one α grid},
    ``pooled_row`` the grid row of pooled α. The gain of a method is its best objective on the
    grid minus its objective at pooled α (>= 0). Fronts whose objective varies by less than the
    margin over the whole grid (e.g. the worst task when one task is served by no merged model)
    give no verdict: a flat front is no evidence that α does not matter."""
    if not predicted:
        raise ValueError("a verdict needs at least one method's predictions")
    gains, spreads = {}, []
    for m, p in predicted.items():
        v = objective(p)
        gains[m] = float(v.max() - v[pooled_row])
        spreads.append(float(v.max() - v.min()))
    if all(s < margin for s in spreads):
        return Verdict(None, gains, margin, objective.label, flat=True)
    small = [g < margin for g in gains.values()]
    matters = False if all(small) else True if not any(small) else None
    return Verdict(matters, gains, margin, objective.label)


def realised_verdict(objective: Objective, realised, pooled, margin: float, settled: str | None = None) -> dict:
    """The verdict of real finetunes: the best realised objective (over the (n, T) ``realised``
    scores) minus pooled α's realised one (``pooled``, (T,)); "α matters little" below
    ``margin``. Finetunes at n α say nothing about the α not tried unless a closed loop
    ``settled`` the question (the reason it stopped before its budget, see
    :mod:`varmerge.search`); the message says which."""
    values = objective(torch.as_tensor(realised, dtype=torch.float64).reshape(-1, len(pooled)))
    gain = float(values.max() - objective(torch.as_tensor(pooled, dtype=torch.float64)))
    n = len(values)
    by = f"{n} real finetune{'s' if n > 1 else ''}"
    above = f"the best is {100 * gain:.1f} points of {objective.label} above pooled data (margin {100 * margin:.1f})"
    if gain >= margin:
        message = f"α matters by the {by}: {above}"
    elif settled:
        message = f"α matters little here: after {by} {above}; {settled}, so the search stopped early"
    else:
        message = f"α matters little so far by the {by}: {above}; the α not tried may differ"
    return {"matters": gain >= margin, "gain": gain, "finetunes": n, "settled": settled, "message": message}
