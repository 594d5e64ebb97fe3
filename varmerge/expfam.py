"""Exponential-family merging in closed form (App. A.2 and A.3 of the paper).

For posteriors q_t ∝ exp(λ_tᵀ T(θ)) the merged posterior Π_t q_t^{α_t} is in the same family with
natural parameter λ_α = Σ_t α_t λ_t, and its mode solves ∇A(θ) = t(λ_α):

1. compute the natural parameters λ_t of every task posterior,
2. aggregate them, λ_α = Σ_t α_t λ_t (batched over a (G, T) α),
3. return the mode of the family at λ_α.

Families implemented: :class:`Gaussian` (diagonal or full precision; natural parameters (Hm, H),
written here with the precision instead of −½H) and :class:`BetaBernoulli` (λ = (a − 1, b − 1),
θ = log-odds; mode π = (a_α − 1)/(a_α + b_α − 2)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from varmerge._checks import check_alpha


class Family(Protocol):
    """An exponential family: ``natural(*params)`` -> tuple of tensors; ``mode(*natural)``."""

    def natural(self, *params: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def mode(self, *natural: torch.Tensor) -> torch.Tensor: ...


def aggregate(naturals: Sequence[Sequence[torch.Tensor]], alpha) -> tuple[torch.Tensor, ...]:
    """λ_α = Σ_t α_t λ_t for every component of the natural parameter.

    ``naturals[t]`` is the tuple of natural-parameter tensors of task t (same shapes across
    tasks). With α of shape (T,) the result has the tasks' shapes; with (G, T) it has a leading G.
    """
    if len(naturals) == 0:
        raise ValueError("no natural parameters given (zero tasks)")
    a, batched = check_alpha(alpha, len(naturals))
    n_parts = len(naturals[0])
    out = []
    for j in range(n_parts):
        parts = [nat[j] for nat in naturals]
        shape = parts[0].shape
        for t, p in enumerate(parts):
            if len(naturals[t]) != n_parts:
                raise ValueError(f"task {t} has {len(naturals[t])} natural-parameter parts, expected {n_parts}")
            if p.shape != shape:
                raise ValueError(
                    f"natural parameter part {j} of task {t} has shape {tuple(p.shape)}, expected {tuple(shape)}"
                )
            if not torch.isfinite(p).all():
                raise ValueError(f"natural parameter part {j} of task {t} is not finite")
        stacked = torch.stack(parts).to(torch.promote_types(parts[0].dtype, torch.float64))
        agg = torch.tensordot(a.to(stacked.dtype), stacked, dims=([1], [0]))
        out.append(agg if batched else agg[0])
    return tuple(out)


def merged_mode(family: Family, params: Sequence[Sequence[torch.Tensor]], alpha) -> torch.Tensor:
    """Mode of Π_t q_t^{α_t}: natural parameters of each task, aggregate, mode (App. A.2)."""
    return family.mode(*aggregate([family.natural(*p) for p in params], alpha))


class Gaussian:
    """N(m, H⁻¹) with ``H`` a diagonal (same shape as m) or full (P, P) precision.

    Natural parameters (η, H) with η = H m; the mode of the merged family is H_α⁻¹ η_α, which is
    Hessian-weighted merging (eq. 12).
    """

    def natural(self, mean: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if precision.shape == mean.shape:
            if (precision < 0).any():
                raise ValueError("Gaussian precision has negative entries")
            return precision * mean, precision
        if mean.ndim == 1 and precision.shape == (mean.shape[0], mean.shape[0]):
            return precision @ mean, precision
        raise ValueError(
            f"precision of shape {tuple(precision.shape)} fits neither a diagonal nor a full "
            f"Gaussian with mean of shape {tuple(mean.shape)}"
        )

    def mode(self, eta: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        if precision.shape == eta.shape:  # diagonal
            if (precision <= 0).any():
                raise ValueError("merged diagonal precision is not positive everywhere")
            return eta / precision
        L, info = torch.linalg.cholesky_ex(precision)
        if (info != 0).any():
            raise ValueError("merged precision matrix is not positive definite")
        return torch.cholesky_solve(eta.unsqueeze(-1), L).squeeze(-1)


class BetaBernoulli:
    """Beta(a, b) posterior of a coin's probability π, parametrised by θ = log(π / (1 − π)).

    Natural parameters λ = (a − 1, b − 1); the merged Beta has a_α, b_α the α-weighted averages
    of a_t, b_t, and its mode is π = (a_α − 1) / (a_α + b_α − 2), returned as the log-odds θ.
    """

    def natural(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        if (a <= 0).any() or (b <= 0).any():
            raise ValueError("Beta parameters a and b must be positive")
        return a - 1.0, b - 1.0

    def mode_probability(self, lam_a: torch.Tensor, lam_b: torch.Tensor) -> torch.Tensor:
        denom = lam_a + lam_b
        if (lam_a <= 0).any() or (lam_b <= 0).any():
            raise ValueError("the merged Beta has a_α <= 1 or b_α <= 1: its density has no interior mode")
        return lam_a / denom

    def mode(self, lam_a: torch.Tensor, lam_b: torch.Tensor) -> torch.Tensor:
        p = self.mode_probability(lam_a, lam_b)
        return torch.log(p) - torch.log1p(-p)

    @staticmethod
    def posterior(flips: torch.Tensor, a0: float = 1.0, b0: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Beta(a0 + #heads, b0 + #tails) from 0/1 coin flips (the conjugate update)."""
        flips = torch.as_tensor(flips, dtype=torch.float64)
        heads = flips.sum()
        return a0 + heads, b0 + flips.numel() - heads
