"""Pareto fronts of per-task scores: non-dominated filter, indicators (moocore), α selection.

Scores are (N, T) arrays, one row per α, one column per task; ``maximize=True`` for accuracies.
The indicators come from moocore, a maintained C library; nothing here is hand-rolled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import moocore
import numpy as np
import torch


def _as_points(scores, what: str = "scores") -> np.ndarray:
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (N, T) array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return s


def pareto_mask(scores, maximize: bool = True) -> torch.Tensor:
    """Bool (N,) mask of the non-dominated rows (duplicates of a front point all kept)."""
    s = _as_points(scores)
    return torch.from_numpy(moocore.is_nondominated(s, maximise=maximize, keep_weakly=True).copy())


def _reference(reference, T: int) -> np.ndarray:
    r = np.asarray(reference, dtype=np.float64).reshape(-1)
    if r.size == 1:
        r = np.full(T, float(r[0]))
    if r.shape != (T,) or not np.isfinite(r).all():
        raise ValueError(f"reference point must have {T} finite entries, got {reference!r}")
    return r


def hypervolume(scores, reference, maximize: bool = True) -> float:
    """Hypervolume dominated by ``scores`` w.r.t. ``reference`` (e.g. 0 for accuracies).

    Points that do not strictly improve on the reference in every task contribute nothing.
    """
    s = _as_points(scores)
    r = _reference(reference, s.shape[1])
    return float(moocore.hypervolume(s, ref=r, maximise=maximize))


def igd_plus(scores, reference_front, maximize: bool = True) -> float:
    """IGD+ of ``scores`` against ``reference_front`` (lower is better; 0 = covers it)."""
    s = _as_points(scores)
    ref = _as_points(reference_front, "reference_front")
    if ref.shape[1] != s.shape[1]:
        raise ValueError(f"reference front has {ref.shape[1]} tasks, scores have {s.shape[1]}")
    return float(moocore.igd_plus(s, ref=ref, maximise=maximize))


Scorer = Callable[[torch.Tensor], torch.Tensor]  # (G, T) scores -> (G,) objective (an Objective)


def _rank(s: torch.Tensor, objective: Scorer | None) -> torch.Tensor:
    return s.mean(1) if objective is None else torch.as_tensor(objective(s), dtype=torch.float64)


def front_summary(alpha, scores, *, reference=0.0, reference_front=None, objective: Scorer | None = None) -> dict:
    """The summary of one front (a merge method's sweep, or real finetunes) over the α in ``alpha``
    ((G, T)) with per-task ``scores`` ((G, T), higher is better): the best mean score, the best
    ``objective`` (default: the mean) and its α, the non-dominated points (their α and scores),
    their number and hypervolume (from ``reference`` in every task), and, given a
    ``reference_front`` (e.g. the ground truth's), their IGD+ against it. The one summary the
    sequence, the flows and the benchmarks report."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    s = torch.as_tensor(_as_points(scores), dtype=torch.float64)
    if a.shape != s.shape:
        raise ValueError(f"alpha {tuple(a.shape)} and scores {tuple(s.shape)} differ in shape")
    value = _rank(s, objective)
    b = int(value.argmax())
    mask = pareto_mask(s)
    out = {
        "max_mean_accuracy": float(s.mean(1).max()),
        "max_objective": float(value[b]),
        "best_alpha": a[b].tolist(),
        "front_size": int(mask.sum()),
        "hypervolume": hypervolume(s[mask], reference),
        "front": {"alpha": a[mask].tolist(), "accuracy": s[mask].tolist()},
    }
    if reference_front is not None:
        out["igd_plus"] = igd_plus(s[mask], reference_front)
    return out


def best_alpha(
    alphas, scores, k: int = 1, *, decimals: int = 9, objective: Scorer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and α of the top-``k`` distinct α by ``objective`` (default: the mean score; ties
    broken by grid order).

    Returns ``(indices (k,), alphas (k, T))``; rows of α equal after rounding to ``decimals``
    count once.
    """
    a = torch.as_tensor(alphas, dtype=torch.float64)
    s = torch.as_tensor(_as_points(scores), dtype=torch.float64)
    if a.ndim != 2 or a.shape[0] != s.shape[0]:
        raise ValueError(f"alphas {tuple(a.shape)} and scores {tuple(s.shape)} do not have the same rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = torch.argsort(-_rank(s, objective), stable=True)
    chosen, seen = [], set()
    for i in order.tolist():
        key = tuple(np.round(a[i].numpy(), decimals))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(i)
        if len(chosen) == k:
            break
    idx = torch.tensor(chosen, dtype=torch.long)
    return idx, a[idx]


def select_alpha(
    alphas,
    scores,
    *,
    k: int = 1,
    constraints: Sequence[tuple[int, str, float]] = (),
    task_names: Sequence[str] | None = None,
    objective: Scorer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` α by ``objective`` (default: the mean score) among the rows meeting every
    constraint ``(task, op, value)``.

    ``op`` is one of ``>=``, ``>``, ``<=``, ``<``. Raises ValueError (naming the best value
    reached per constrained task, by ``task_names`` if given) when no row satisfies them.
    """
    s = torch.as_tensor(_as_points(scores), dtype=torch.float64)
    a = torch.as_tensor(alphas, dtype=torch.float64)
    ok = torch.ones(s.shape[0], dtype=torch.bool)
    ops = {">=": torch.ge, ">": torch.gt, "<=": torch.le, "<": torch.lt}
    for task, op, value in constraints:
        if op not in ops:
            raise ValueError(f"unknown constraint operator {op!r}; use one of {sorted(ops)}")
        if not 0 <= task < s.shape[1]:
            raise ValueError(f"constraint names task {task}, but there are {s.shape[1]} tasks")
        ok &= ops[op](s[:, task], value)
    if not ok.any():
        desc = "; ".join(
            f"{task_names[t] if task_names else f'task {t}'} {op} {v} (best reached {s[:, t].max().item():.4f})"
            for t, op, v in constraints
        )
        raise ValueError(f"no α on the grid satisfies the selection constraints: {desc}")
    rows = torch.nonzero(ok).squeeze(1)
    idx, chosen = best_alpha(a[rows], s[rows], k=k, objective=objective)
    return rows[idx], chosen


def alpha_map_error(alpha, accuracy, gt_alpha, gt_accuracy, *, atol: float = 1e-6) -> float:
    """Mean over the ground-truth α of |merged − multitask| per-task accuracy at the *same* α.

    Unlike IGD+ (which compares point sets and ignores which α produced a point) this tells a user
    whether the α read off an estimated front gives the promised per-task scores. Every
    ground-truth α must be on the merged grid (within ``atol``); a missing one is an error.
    """
    a, acc = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(accuracy, dtype=torch.float64)
    ga, gacc = torch.as_tensor(gt_alpha, dtype=torch.float64), torch.as_tensor(gt_accuracy, dtype=torch.float64)
    if a.shape != acc.shape or ga.shape != gacc.shape or a.shape[1:] != ga.shape[1:]:
        raise ValueError(
            f"shapes differ: merged {tuple(a.shape)}/{tuple(acc.shape)}, "
            f"ground truth {tuple(ga.shape)}/{tuple(gacc.shape)}"
        )
    dist = torch.cdist(ga, a, p=float("inf"))  # (G_gt, G)
    d, idx = dist.min(1)
    if (d > atol).any():
        missing = ga[int((d > atol).nonzero()[0])].tolist()
        raise ValueError(f"ground-truth α {missing} is not on the merged grid; use a merge grid that contains it")
    return float((acc[idx] - gacc).abs().mean())


def selection_regret(gt_accuracy, realised, objective: Scorer | None = None) -> dict[str, float]:
    """The best ground-truth multitask ``objective`` (default: mean accuracy) minus the realised
    one at the chosen α: ``top1`` (the first chosen α) and ``best_of_k`` (the best of the k chosen)."""
    gt = torch.as_tensor(gt_accuracy, dtype=torch.float64)
    best = float(_rank(gt, objective).max())
    values = _rank(torch.as_tensor(realised, dtype=torch.float64).reshape(-1, gt.shape[1]), objective)
    return {"top1": best - float(values[0]), "best_of_k": best - float(values.max())}
