"""Closed-loop α search: a budget of real multitask finetunes, spent where the merged fronts say
they matter most.

The merged sweeps predict every task's accuracy at every α of the grid. The real multitask
finetune at α realises other accuracies; the model here is, per task t,

    realised_t(α) = prior_t(α) + r_t(α),    r_t ~ GP(0, k)  (scikit-learn's GaussianProcessRegressor)

where ``prior_t`` is a merge method's prediction, or with several methods (a multi-fidelity
prior) their average weighted by how well each has predicted the finetunes so far (Bayesian
model averaging: weight ∝ exp(−SSE / 2s²)). The residual GPs give each task a mean and a
standard deviation at every α of the grid. α are ranked by an :class:`~varmerge.objective.Objective`
of the per-task accuracies (mean by default, weighted mean, or worst task; the tasks taken as
independent: a weighted mean's variance is Σ w_t² σ_t², the worst task's expectation is taken over
a fixed set of draws). Their kernel is a² · RBF(ℓ) + σ_n² over α with the
length-scale ℓ fixed (``length_scale``), the amplitude a the root-mean-square residual seen so far
(at least ``amplitude_floor``) and σ_n = 1 point of accuracy. Hyperparameters fitted by maximum
likelihood to the one to five finetunes of a small budget are poorly determined (on Table 1's
columns: ℓ stays at its start with one point, then wanders between 0.16 and 1.1, and the noise
can reach its bound, explaining the misses as noise); with a fixed ℓ a large miss at one α makes
the far ones uncertain, so the search looks elsewhere.

The first batch is the settings' ``start`` rows if given (the product starts at pooled α: the
finetune a user would run anyway, which calibrates the front at no extra cost), else where the
prior predicts the best objective among α the constraints admit (where it predicts none, the α it
predicts to miss them by least). Each next α maximises
the expected improvement of the objective over the incumbent (the best realised α meeting the
constraints) times the probability that the constraints hold (constraint-weighted EI); before
any realised α meets them, the probability alone. A batch of b > 1 is chosen greedily with the
"kriging believer": each pick is added as if it realised its predicted mean, then the next is
chosen. The search stops at its budget, or when no α of the grid is expected to improve on the
incumbent by more than ``max(epsilon, margin)`` (``margin``: the verdict's, "α matters little"),
or, the rule of thumb a practitioner would use, when the start rows (pooled and uniform α: the two
ends of the temperature family α ∝ N^τ, τ from 1 to 0) realise objectives within ``margin`` of
each other. The second rule states the field's finding that on mean metrics in finetuning
proportional and uniform weights are hard to beat; it does not look off the line between them (a
task worth less than its pooled share), which the first rule may, when the merged fronts are
trusted. Both set ``settled`` (to the reason): the search stopped before its budget, α matters little.
Everything is deterministic: the
same observations give the same next α (a resumed search continues as the killed one would).

Pure library code (numpy, scipy, scikit-learn): no prefect, mlflow or files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from varmerge.objective import Objective

Constraint = tuple[int, str, float]  # (task index, ">=" | ">" | "<=" | "<", value)

#: The residuals' noise standard deviation: one point of accuracy (test-set and seed noise).
NOISE = 0.01
#: Why a search settled (stopped before its budget): the start rows realise within the margin
#: of each other, or no α of the grid is expected to gain more than the margin.
DEFAULTS_AGREE = "pooled and uniform α realise within the margin of each other"
NO_GAIN = "the search expects no α of the grid to gain more than the margin"


@dataclass(frozen=True)
class SearchSettings:
    budget: int  # real multitask finetunes in all
    batch: int = 1  # finetunes per iteration (run at once)
    epsilon: float = 1e-3  # stop when no α's expected improvement of the objective exceeds this
    prior_scale: float = 0.02  # s of the model averaging: how far (accuracy) a method may miss
    length_scale: float = 0.25  # ℓ of the residuals' RBF kernel, in units of α
    amplitude_floor: float = 0.01  # the residuals' prior standard deviation is at least this
    start: tuple[int, ...] = ()  # grid rows of the first finetunes (e.g. pooled α), before any proposal
    margin: float = 0.0  # once a finetune ran, stop when no α is expected to gain more than this

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"closed-loop budget must be a positive integer, got {self.budget!r}")
        if not isinstance(self.batch, int) or not 1 <= self.batch <= self.budget:
            raise ValueError(f"closed-loop batch must be between 1 and the budget ({self.budget}), got {self.batch!r}")
        if not self.epsilon >= 0:
            raise ValueError(f"closed-loop epsilon must be >= 0, got {self.epsilon!r}")
        if len(self.start) > self.budget:
            raise ValueError(f"closed-loop start rows {list(self.start)} exceed the budget ({self.budget})")
        if not self.margin >= 0:
            raise ValueError(f"closed-loop margin must be >= 0, got {self.margin!r}")
        for name in ("prior_scale", "length_scale", "amplitude_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"closed-loop {name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Step:
    """One proposal: the grid rows it chose, and what the model said about them then."""

    rows: list[int]
    predicted_objective: list[float]  # the model's objective at each row (prior + residual)
    expected_improvement: list[float | None]  # None: placed by the prior alone (no finetune yet)
    incumbent: float | None  # best realised feasible objective before this step
    method_weights: dict[str, float] = field(default_factory=dict)


def _feasible(acc: np.ndarray, constraints: Sequence[Constraint]) -> np.ndarray:
    ok = np.ones(acc.shape[:-1], dtype=bool)
    for t, op, v in constraints:
        x = acc[..., t]
        ok &= {">=": x >= v, ">": x > v, "<=": x <= v, "<": x < v}[op]
    return ok


class ClosedLoop:
    """The search over the rows of ``alpha`` (the merge grid, (G, T)) with the merged per-task
    accuracies ``predicted`` ({method: (G, T)}); see the module docstring."""

    def __init__(
        self,
        alpha,
        predicted: dict[str, object],
        settings: SearchSettings,
        constraints: Sequence[Constraint] = (),
        objective: Objective = Objective(),
    ):
        self.alpha = np.asarray(alpha, dtype=np.float64)
        if self.alpha.ndim != 2 or len(self.alpha) == 0:
            raise ValueError(f"alpha must be a (G, T) grid, got shape {self.alpha.shape}")
        if not predicted:
            raise ValueError("closed-loop search needs at least one merge method's predictions")
        self.predicted = {m: np.asarray(p, dtype=np.float64) for m, p in predicted.items()}
        for m, p in self.predicted.items():
            if p.shape != self.alpha.shape:
                raise ValueError(f"predictions of {m!r} have shape {p.shape}, the α grid {self.alpha.shape}")
        self.settings, self.constraints, self.objective = settings, list(constraints), objective
        bad = [r for r in settings.start if not 0 <= r < len(self.alpha)]
        if bad:
            raise ValueError(f"closed-loop start rows {bad} are not rows of the α grid ({len(self.alpha)})")
        self.rows: list[int] = []  # realised rows, in order
        self.realised: list[np.ndarray] = []  # (T,) each
        #: why the search stopped before its budget ("α matters little"): DEFAULTS_AGREE or NO_GAIN; None
        self.settled: str | None = None

    # ------------------------------------------------------------------------------ model
    def row_of(self, alpha) -> int:
        """The grid row of a realised α (exact up to 1e-6)."""
        d = np.abs(self.alpha - np.asarray(alpha, dtype=np.float64)).max(1)
        i = int(d.argmin())
        if d[i] > 1e-6:
            raise ValueError(f"α {list(alpha)} is not a point of the search's grid")
        return i

    def observe(self, alpha, accuracy) -> None:
        """A realised multitask finetune: its α (a grid point) and (T,) test accuracies."""
        acc = np.asarray(accuracy, dtype=np.float64)
        if acc.shape != (self.alpha.shape[1],):
            raise ValueError(f"realised accuracies must be {self.alpha.shape[1]} numbers, got {acc.shape}")
        self.rows.append(self.row_of(alpha))
        self.realised.append(acc)

    def method_weights(self, rows: Sequence[int], realised: Sequence[np.ndarray]) -> dict[str, float]:
        s2 = 2 * self.settings.prior_scale**2
        pairs = list(zip(rows, realised))
        sse = {m: sum(float(((p[r] - y) ** 2).sum()) for r, y in pairs) for m, p in self.predicted.items()}
        best = min(sse.values())
        w = {m: math.exp(-(e - best) / s2) for m, e in sse.items()}
        z = sum(w.values())
        return {m: v / z for m, v in w.items()}

    def _posterior(self, rows: Sequence[int], realised: Sequence[np.ndarray]):
        """(G, T) means and standard deviations of the per-task accuracies, and the weights."""
        weights = self.method_weights(rows, realised)
        prior = sum(w * self.predicted[m] for m, w in weights.items())
        if not rows:
            return prior, np.zeros_like(prior), weights
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        x = self.alpha[list(rows)]
        resid = np.stack(realised) - prior[list(rows)]
        mean, std = np.empty_like(prior), np.empty_like(prior)
        for t in range(prior.shape[1]):
            amp = max(float(np.sqrt((resid[:, t] ** 2).mean())), self.settings.amplitude_floor)
            kernel = ConstantKernel(amp**2, "fixed") * RBF(self.settings.length_scale, "fixed") + WhiteKernel(
                NOISE**2, "fixed"
            )
            gp = GaussianProcessRegressor(kernel, optimizer=None).fit(x, resid[:, t])
            m, s = gp.predict(self.alpha, return_std=True)
            mean[:, t], std[:, t] = np.clip(prior[:, t] + m, 0.0, 1.0), s  # accuracies lie in [0, 1]
        return mean, std, weights

    # -------------------------------------------------------------------------- proposals
    def value(self, acc) -> float:
        """The objective of one α's (T,) accuracies."""
        return float(self.objective(acc))

    def incumbent(self) -> tuple[int, float] | None:
        """(row, objective) of the best realised α meeting the constraints, or None."""
        best = None
        for r, y in zip(self.rows, self.realised):
            if _feasible(y, self.constraints) and (best is None or self.value(y) > best[1]):
                best = (r, self.value(y))
        return best

    def _shortfall(self, acc: np.ndarray) -> np.ndarray:
        """Per row, how far (accuracy, summed over the constraints) ``acc`` misses them."""
        miss = np.zeros(len(acc))
        for t, op, v in self.constraints:
            miss += np.maximum(v - acc[:, t], 0) if op in (">=", ">") else np.maximum(acc[:, t] - v, 0)
        return miss

    def _expected_improvement(self, mean: np.ndarray, std: np.ndarray, incumbent: float) -> np.ndarray:
        """Per row, E[max(objective − incumbent, 0)] with independent normal task accuracies: in
        closed form for a weighted mean (the mean: equal weights), by a fixed set of 512 draws
        for the worst task (deterministic: the same model gives the same value)."""
        T = mean.shape[1]
        if self.objective.kind == "worst_task":
            z = np.random.default_rng(0).standard_normal((512, 1, T))
            draws = (mean[None] + std[None] * z).min(-1)  # (S, G)
            return np.maximum(draws - incumbent, 0).mean(0)
        w = np.full(T, 1.0 / T) if self.objective.weights is None else np.asarray(self.objective.weights)
        mu, sigma = mean @ w, np.sqrt((std**2) @ (w**2))
        s = np.maximum(sigma, 1e-12)
        z = (mu - incumbent) / s
        return np.where(sigma > 1e-12, (mu - incumbent) * norm.cdf(z) + s * norm.pdf(z), np.maximum(mu - incumbent, 0))

    def _acquisition(self, mean: np.ndarray, std: np.ndarray, incumbent: float | None) -> np.ndarray:
        p_ok = np.ones(len(mean))
        for t, op, v in self.constraints:
            s = np.maximum(std[:, t], 1e-9)
            z = (mean[:, t] - v) / s
            p_ok *= norm.cdf(z) if op in (">=", ">") else norm.cdf(-z)
        if incumbent is None:
            return p_ok
        return self._expected_improvement(mean, std, incumbent) * p_ok

    def _defaults_agree(self) -> bool:
        """Whether the start rows (two or more: pooled and uniform α, the ends of the temperature
        family) were the only finetunes so far, all meet the constraints and realise objectives
        within ``margin`` of each other."""
        start = list(dict.fromkeys(self.settings.start))
        if len(start) < 2 or self.settings.margin <= 0 or sorted(self.rows) != sorted(start):
            return False
        if not all(_feasible(y, self.constraints) for y in self.realised):
            return False
        values = [self.value(y) for y in self.realised]
        return max(values) - min(values) < self.settings.margin

    def propose(self) -> Step | None:
        """The next batch of grid rows to finetune, or None when the budget is spent or no α is
        expected to improve on the incumbent by more than ``epsilon`` (and, once a finetune ran,
        ``margin``). The settings' ``start`` rows come first, as one batch; when two or more
        of them realise objectives within ``margin`` of each other, the search stops there (the
        verdict "α matters little": see the module docstring)."""
        left = self.settings.budget - len(self.rows)
        if left <= 0:
            return None
        rows, realised = list(self.rows), list(self.realised)
        found = self.incumbent()
        start = [r for r in dict.fromkeys(self.settings.start) if r not in rows][:left]
        if start:
            mean, _, w = self._posterior(rows, realised)
            return Step(
                start, [self.value(mean[r]) for r in start], [None] * len(start), found[1] if found else None, w
            )
        if self._defaults_agree():
            self.settled = DEFAULTS_AGREE
            return None
        threshold = max(self.settings.epsilon, self.settings.margin)
        chosen, predicted, gains, weights = [], [], [], {}
        for _ in range(min(self.settings.batch, left)):
            mean, std, w = self._posterior(rows, realised)
            weights = weights or w
            modelled = bool(self.rows)  # else: no finetune yet, the merged prediction's best ones
            if modelled:
                incumbent = max([self.value(y) for y in realised if _feasible(y, self.constraints)], default=None)
                score = self._acquisition(mean, std, incumbent)
            else:  # no α predicted to meet the constraints: the smallest predicted shortfall
                ok = _feasible(mean, self.constraints)
                score = np.where(ok, self.objective(mean).numpy(), -np.inf) if ok.any() else -self._shortfall(mean)
            score = np.where(np.isin(np.arange(len(score)), rows + chosen), -np.inf, score)
            i = int(np.argmax(score))
            if not np.isfinite(score[i]):
                break  # every grid point is taken
            gain = float(score[i]) if modelled else None
            if gain is not None and found is not None and gain <= threshold and not chosen:
                self.settled = NO_GAIN
                return None
            chosen.append(i)
            predicted.append(self.value(mean[i]))
            gains.append(gain)
            rows.append(i)  # kriging believer: as if it realised its predicted accuracies
            realised.append(mean[i].copy())
        if not chosen:
            return None
        return Step(chosen, predicted, gains, found[1] if found else None, weights)


#: The central probability of a calibrated front's intervals.
INTERVAL = 0.8


@dataclass(frozen=True)
class Calibrated:
    """A front re-estimated per task (see :func:`calibrate`): (G, T) means and the bounds of the
    central :data:`INTERVAL` interval, how many real finetunes corrected it, and from what."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    finetunes: int
    source: str

    def at(self, row: int) -> dict[str, list[float]]:
        return {"mean": self.mean[row].tolist(), "lower": self.lower[row].tolist(), "upper": self.upper[row].tolist()}


def calibrate(alpha, predicted: dict[str, object], realised: dict[int, object]) -> Calibrated:
    """The front a user can read as scores: per task, at every row of ``alpha``, a prediction and
    an :data:`INTERVAL` interval.

    After real finetunes (``realised``: grid row -> (T,) scores), the closed loop's model: the
    merged predictions of the methods ``predicted`` (weighted by how well each predicted the
    finetunes) plus a residual GP per task fitted to them (see the module docstring); the interval
    is its predictive one, with the 1-point noise. Before any, the merge methods' average and
    the spread between them (their standard deviation): what the merges themselves disagree on,
    the only uncertainty they give without a finetune (with one method: no interval)."""
    names = list(predicted)
    z = float(norm.ppf(0.5 + INTERVAL / 2))
    if realised:
        search = ClosedLoop(alpha, predicted, SearchSettings(budget=len(realised)))
        for r, y in realised.items():
            search.observe(search.alpha[r], y)
        mean, std, _ = search._posterior(search.rows, search.realised)
        n = len(realised)
        runs = f"{n} real finetune{'s' * (n > 1)}"
        source = f"the merged fronts of {', '.join(names)} corrected by a residual GP on {runs}"
    else:
        preds = np.stack([np.asarray(predicted[m], dtype=np.float64) for m in names])
        mean, std = preds.mean(0), preds.std(0)
        source = (
            f"the spread between the merge methods {', '.join(names)} (no real finetune yet)"
            if len(names) > 1
            else f"{names[0]} alone, no real finetune yet: no interval"
        )
    lower, upper = np.clip(mean - z * std, 0.0, 1.0), np.clip(mean + z * std, 0.0, 1.0)
    return Calibrated(mean, lower, upper, len(realised), source)
