"""MAP: a Pareto front from a quadratic surrogate of a few task-arithmetic merges.

Li et al. 2025, "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation". Instead of scoring a merge at every α of a grid, MAP

1. scores task arithmetic θ0 + Σ_t α_t τ_t at a small design of α (``n_evaluations`` real
   evaluations: the T vertices, the centroid, the edge midpoints, then seeded uniform points of
   the simplex);
2. fits, per task metric m_j, a quadratic surrogate in α by least squares. On the simplex a
   quadratic is the Scheffé form m̂_j(α) = Σ_i β_ji α_i + Σ_{i<k} β_jik α_i α_k
   (T + T(T−1)/2 coefficients; a constant and the squares are already in its span since
   Σ α_i = 1);
3. finds the surrogates' Pareto front with pymoo's NSGA-II (or NSGA-III with Das–Dennis
   reference directions), searching α ∈ [0, 1]^T repaired onto the simplex (α ← α / Σ α).

This is a *front estimator*, not a merge rule: it returns predicted metrics, not models.
The original searches the task-arithmetic scaling coefficients in a box; here α stays on the
simplex like every other method of the package. Everything is seeded and deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from varmerge._checks import check_alpha

__all__ = [
    "MapFront",
    "Objective",
    "QuadraticSurrogate",
    "check_settings",
    "default_evaluations",
    "design_alpha",
    "map_front",
    "quadratic_features",
    "surrogate_front",
]

F64 = torch.float64


def num_features(num_tasks: int) -> int:
    """Coefficients of a quadratic on the (T−1)-simplex: T + T(T−1)/2."""
    return num_tasks + num_tasks * (num_tasks - 1) // 2


def default_evaluations(num_tasks: int) -> int:
    """2T + 3, and never fewer than the surrogate's coefficients + 3 (9 for three tasks)."""
    return max(2 * num_tasks + 3, num_features(num_tasks) + 3)


def _check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 2:
        raise ValueError(f"MAP needs an integer number of tasks >= 2, got {num_tasks!r}")
    return int(num_tasks)


def quadratic_features(alpha) -> torch.Tensor:
    """(n, T + T(T−1)/2) float64 Scheffé features [α_1..α_T, α_i α_k (i < k)] of (n, T) α."""
    a = torch.as_tensor(alpha, dtype=F64)
    if a.ndim == 1:
        a = a.unsqueeze(0)
    if a.ndim != 2:
        raise ValueError(f"α must be (n, T), got shape {tuple(a.shape)}")
    i, k = torch.triu_indices(a.shape[1], a.shape[1], offset=1)
    return torch.cat([a, a[:, i] * a[:, k]], dim=1)


def design_alpha(num_tasks: int, n_evaluations: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """The (n, T) α at which MAP evaluates task arithmetic, in this order: the T vertices, the
    centroid, the T(T−1)/2 edge midpoints, then seeded uniform (Dirichlet(1)) simplex points;
    the first ``n_evaluations`` (default :func:`default_evaluations`) are used.
    """
    T = _check_num_tasks(num_tasks)
    n = default_evaluations(T) if n_evaluations is None else n_evaluations
    need = num_features(T)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < need:
        raise ValueError(
            f"MAP n_evaluations must be an integer >= {need} (the quadratic surrogate has {need} "
            f"coefficients for {T} tasks), got {n!r}"
        )
    pts = [np.eye(T), np.full((1, T), 1.0 / T)]
    mids = np.zeros((T * (T - 1) // 2, T))
    for r, (i, k) in enumerate(zip(*np.triu_indices(T, k=1))):
        mids[r, [i, k]] = 0.5
    pts.append(mids)
    fixed = np.concatenate(pts)
    extra = max(0, int(n) - len(fixed))
    rng = np.random.default_rng(seed)
    pts = np.concatenate([fixed, rng.dirichlet(np.ones(T), size=extra)]) if extra else fixed
    return torch.from_numpy(pts[: int(n)].copy()).to(F64)


@dataclass
class QuadraticSurrogate:
    """Least-squares quadratic surrogates m̂(α) = φ(α) β of several metrics at once.

    ``coef`` is (F, K): F = T + T(T−1)/2 Scheffé features, K metrics (e.g. one per task).
    """

    coef: torch.Tensor
    num_tasks: int

    @classmethod
    def fit(cls, alpha, values) -> QuadraticSurrogate:
        a, _ = check_alpha(alpha, torch.as_tensor(alpha).shape[-1])
        y = torch.as_tensor(values, dtype=F64)
        if y.ndim == 1:
            y = y.unsqueeze(1)
        if y.ndim != 2 or y.shape[0] != a.shape[0]:
            raise ValueError(f"values must be (n, K) with n = {a.shape[0]} rows, got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("surrogate values contain NaN or Inf")
        phi = quadratic_features(a)
        rank = int(torch.linalg.matrix_rank(phi))
        if rank < phi.shape[1]:
            raise ValueError(
                f"the {a.shape[0]} design points determine only {rank} of the {phi.shape[1]} "
                "quadratic coefficients; add evaluations at other α"
            )
        coef = torch.linalg.lstsq(phi, y, driver="gelsd").solution
        return cls(coef=coef, num_tasks=a.shape[1])

    def predict(self, alpha) -> torch.Tensor:
        """(G, K) float64 predictions at a (G, T) batch (or (K,) at one (T,) α)."""
        a, batched = check_alpha(alpha, self.num_tasks)
        pred = quadratic_features(a) @ self.coef
        return pred if batched else pred[0]


def check_settings(
    num_tasks: int,
    n_evaluations: int | None = None,
    *,
    algorithm: str = "nsga2",
    pop_size: int = 100,
    n_gen: int = 100,
    seed: int = 0,
) -> None:
    """Raise ValueError for MAP settings that cannot work (before any evaluation is spent)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"MAP seed must be a non-negative integer, got {seed!r}")
    design_alpha(num_tasks, n_evaluations, seed=seed)
    if algorithm not in ("nsga2", "nsga3"):
        raise ValueError(f"MAP algorithm must be 'nsga2' or 'nsga3', got {algorithm!r}")
    for name, v in (("pop_size", pop_size), ("n_gen", n_gen)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
            raise ValueError(f"MAP {name} must be an integer >= 2, got {v!r}")


def _to_simplex(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    s = x.sum(axis=1, keepdims=True)
    uniform = np.full_like(x, 1.0 / x.shape[1])
    return np.where(s > 0, x / np.where(s > 0, s, 1.0), uniform)


def _simplex_lattice(T: int, count: int) -> np.ndarray:
    """The Das–Dennis lattice of the (T−1)-simplex with the most points not above ``count``
    (at least 2 partitions)."""
    from pymoo.util.ref_dirs import get_reference_directions

    p = 1
    while math.comb(p + 1 + T - 1, T - 1) <= count:
        p += 1
    return np.asarray(get_reference_directions("das-dennis", T, n_partitions=p), dtype=np.float64)


def _nsga(T: int, K: int, algorithm: str, pop_size: int, seed: int):
    """NSGA-II or NSGA-III whose population starts at a simplex lattice (completed with seeded
    Dirichlet points) and whose offspring are repaired onto the simplex; also returns the start."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.repair import Repair
    from pymoo.util.ref_dirs import get_reference_directions

    class SimplexRepair(Repair):
        def _do(self, problem, X, **kwargs):
            return _to_simplex(X)

    start = _simplex_lattice(T, pop_size)[:pop_size]
    if len(start) < pop_size:
        rng = np.random.default_rng(seed)
        start = np.concatenate([start, rng.dirichlet(np.ones(T), size=pop_size - len(start))])
    if algorithm == "nsga2":
        return NSGA2(pop_size=pop_size, sampling=start, repair=SimplexRepair(), eliminate_duplicates=True), start
    dirs = _simplex_lattice(T, pop_size) if K == T else get_reference_directions("energy", K, pop_size, seed=seed)
    return NSGA3(ref_dirs=dirs, pop_size=pop_size, sampling=start, repair=SimplexRepair()), start


def surrogate_front(
    surrogate: QuadraticSurrogate,
    *,
    maximize: bool = True,
    algorithm: str = "nsga2",
    pop_size: int = 100,
    n_gen: int = 100,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-dominated set found by NSGA-II/III on the surrogate over the simplex.

    Returns ``(alpha (n, T), predicted (n, K))`` float64, without duplicates, sorted by α.
    The initial population is a Das–Dennis lattice of the simplex (completed with seeded random
    points); offspring are repaired onto the simplex by clipping at 0 and normalising.
    """
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    from varmerge.pareto import pareto_mask

    T = surrogate.num_tasks
    check_settings(T, algorithm=algorithm, pop_size=pop_size, n_gen=n_gen, seed=seed)
    K = surrogate.coef.shape[1]
    coef = surrogate.coef.numpy()
    sign = -1.0 if maximize else 1.0
    iu = np.triu_indices(T, k=1)

    class SurrogateProblem(Problem):
        def __init__(self):
            super().__init__(n_var=T, n_obj=K, xl=0.0, xu=1.0)

        def _evaluate(self, X, out, *args, **kwargs):
            x = _to_simplex(X)
            out["F"] = sign * (np.concatenate([x, x[:, iu[0]] * x[:, iu[1]]], axis=1) @ coef)

    algo, start = _nsga(T, K, algorithm, pop_size, seed)
    res = minimize(SurrogateProblem(), algo, ("n_gen", int(n_gen)), seed=int(seed), verbose=False)
    X = np.atleast_2d(np.asarray(res.X if res.X is not None else start, dtype=np.float64))
    X = np.unique(np.round(_to_simplex(X), 12), axis=0)
    a = torch.from_numpy(_to_simplex(X)).to(F64)
    pred = surrogate.predict(a)
    keep = pareto_mask(pred if maximize else -pred)
    values = (pred if maximize else -pred)[keep]
    # drop weakly dominated duplicates of the same objective vector
    _, first = np.unique(np.round(values.numpy(), 12), axis=0, return_index=True)
    idx = torch.nonzero(keep).squeeze(1)[torch.from_numpy(np.sort(first))]
    return a[idx], pred[idx]


@dataclass
class MapFront:
    """What :func:`map_front` produced (all tensors float64)."""

    alpha: torch.Tensor  # (G, T): the α grid predictions are made on
    predictions: dict[str, torch.Tensor]  # metric -> (G, K) surrogate predictions on the grid
    front_alpha: torch.Tensor  # (n, T): the surrogate's Pareto set found by NSGA
    front_values: torch.Tensor  # (n, K): the front metric's predictions there
    design_alpha: torch.Tensor  # (E, T): where the real evaluations were made
    design_scores: dict[str, torch.Tensor]  # metric -> (E, K) real scores
    surrogates: dict[str, QuadraticSurrogate] = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        """Number of real (merge + evaluate) evaluations used."""
        return int(self.design_alpha.shape[0])


@dataclass(frozen=True)
class Objective:
    """What MAP's front is searched on: the metric ``metric``, maximised unless ``maximize=False``."""

    metric: str = "accuracy"
    maximize: bool = True


def map_front(
    evaluate: Callable[[torch.Tensor], Mapping[str, torch.Tensor] | torch.Tensor],
    alpha,
    *,
    n_evaluations: int | None = None,
    seed: int = 0,
    objective: Objective = Objective(),
    algorithm: str = "nsga2",
    pop_size: int = 100,
    n_gen: int = 100,
) -> MapFront:
    """MAP's amortised front: evaluate at a small design, fit quadratics, NSGA on them.

    ``evaluate(design)`` gets the (E, T) float64 design α and returns the real scores of the
    merges there, an (E, K) tensor (taken as ``objective.metric``) or a mapping of metric names
    to (E, K) tensors — one surrogate is fitted per metric. ``alpha`` (G, T) is the grid the
    surrogates are evaluated on. The front is searched on ``objective`` (default: accuracy,
    maximised). Deterministic for a ``seed`` (design points and NSGA).
    """
    metric = objective.metric
    a, _ = check_alpha(alpha, torch.as_tensor(alpha).shape[-1])
    T = _check_num_tasks(a.shape[1])
    check_settings(T, n_evaluations, algorithm=algorithm, pop_size=pop_size, n_gen=n_gen, seed=seed)
    design = design_alpha(T, n_evaluations, seed=seed)
    scores = evaluate(design.clone())
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        scores = {metric: scores}
    if not isinstance(scores, Mapping) or metric not in scores:
        raise ValueError(f"evaluate must return a tensor or a mapping containing {metric!r}")
    design_scores = {}
    for name, v in scores.items():
        v = torch.as_tensor(v, dtype=F64).detach().cpu()
        if v.ndim != 2 or v.shape[0] != len(design):
            raise ValueError(f"evaluate returned {name!r} of shape {tuple(v.shape)}; expected ({len(design)}, K)")
        design_scores[name] = v
    surrogates = {name: QuadraticSurrogate.fit(design, v) for name, v in design_scores.items()}
    predictions = {name: s.predict(a) for name, s in surrogates.items()}
    front_alpha, front_values = surrogate_front(
        surrogates[metric], maximize=objective.maximize, algorithm=algorithm, pop_size=pop_size, n_gen=n_gen, seed=seed
    )
    return MapFront(a, predictions, front_alpha, front_values, design, design_scores, surrogates)
