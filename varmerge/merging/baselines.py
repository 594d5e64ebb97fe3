"""Baseline merging rules from the model-merging literature (each cites its paper).

Each rule is registered (:mod:`varmerge.merging.registry`) under its name with a pydantic model
of its settings and, like the posterior-based rules, takes ``alpha`` as a (T,) vector (one merged
state dict) or a (G, T) batch (tensors with a leading G dimension). α always enters as the
weight of task t in a weighted combination, so that α = e_t returns (a processed version of)
model t and the rule reduces to the α-weighted task arithmetic θ0 + Σ_t α_t τ_t,
τ_t = θ_t − θ0, in its "no-op" setting:

============  =============================================================  ==================
name          merged θ̂_α                                                     reduces to TA when
============  =============================================================  ==================
ties          θ0 + λ · α-weighted disjoint mean of sign-agreeing trimmed τ_t   density 1, signs agree
dare          θ0 + λ Σ_t α_t (m_t ⊙ τ_t) / (1 − p),  m_t ~ Bernoulli(1 − p)    drop 0
slerp         θ0 + spherical interpolation of the τ_t (per tensor)             colinear τ_t
model_soup    (1/T) Σ_t θ_t for every α (uniform soup; α is ignored)            α uniform
regmean       per linear/conv layer argmin_W Σ_t α_t E‖X_t(W − W_t)‖²          equal input Grams
esm           θ0 + λ Σ_t α_t P_U τ_t P_V  (joint essential subspaces)          full rank
============  =============================================================  ==================

Inputs are never modified; bad input raises :class:`ValueError` naming the problem. The MAP
front estimator (Li et al. 2025) is not a merge rule: see :mod:`varmerge.map_front`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from varmerge._checks import check_alpha, check_state_dicts
from varmerge.merging.gaussian import simple_average
from varmerge.merging.kernels import (
    LazyStack,
    StateDict,
    check_base,
    chunked_merge,
    compute_dtype,
    finish,
    flat,
    solve_spd_rows,
)
from varmerge.merging.registry import CalibrationOptions, ChunkedOptions, Options, register

__all__ = [
    "DareOptions",
    "EsmOptions",
    "RegmeanOptions",
    "SlerpOptions",
    "TiesOptions",
    "calibration_grams",
    "dare",
    "esm",
    "model_soup",
    "regmean",
    "slerp",
    "ties",
]


# --------------------------------------------------------------------------------------------
# settings (merge.options.<name> in a config; the rules check the values)
# --------------------------------------------------------------------------------------------
class TiesOptions(ChunkedOptions):
    density: float = 0.2  # fraction of each task vector kept
    scale: float = 1.0
    trim: str = "global"  # global | tensor


class DareOptions(ChunkedOptions):
    drop: float = 0.9  # drop probability p
    seed: int = 0
    scale: float = 1.0


class SlerpOptions(Options):
    dot_threshold: float = 0.9995  # |cos Ω| above which slerp falls back to linear interpolation
    eps: float = 1e-8
    max_block_elems: int = 1 << 22


class RegmeanOptions(CalibrationOptions):
    ridge: float = 1e-4
    off_diagonal: float = 1.0
    max_batch_bytes: int = 1 << 28


class EsmOptions(ChunkedOptions):
    rank: int | None = None  # singular directions kept per task (default ⌊min(out, rest)/T⌋)
    energy: float | None = None  # or the fewest reaching this fraction of Σ s²
    scale: float = 1.0


# --------------------------------------------------------------------------------------------
# small validators
# --------------------------------------------------------------------------------------------
def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _scale(scale) -> float:
    return _number(scale, "scale")


def _check_ties(density, trim, scale) -> tuple[float, float]:
    """TIES's density, trim and scale checked; returns ``(density, scale)`` as floats."""
    density = _number(density, "TIES density")
    if not 0 < density <= 1:
        raise ValueError(f"TIES density must be in (0, 1], got {density!r}")
    if trim not in ("global", "tensor"):
        raise ValueError(f"TIES trim must be 'global' or 'tensor', got {trim!r}")
    return density, _scale(scale)


def _check_dare(drop, seed, scale) -> tuple[float, float]:
    """DARE's drop probability, seed and scale checked; returns ``(drop, scale)`` as floats."""
    p = _number(drop, "DARE drop")
    if not 0 <= p < 1:
        raise ValueError(f"DARE drop must be in [0, 1), got {drop!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"DARE seed must be an integer, got {seed!r}")
    return p, _scale(scale)


def _check_regmean(ridge, off_diagonal) -> tuple[float, float]:
    ridge = _number(ridge, "regmean ridge")
    if ridge < 0:
        raise ValueError(f"regmean ridge must be >= 0, got {ridge!r}")
    c = _number(off_diagonal, "regmean off_diagonal")
    if not 0 <= c <= 1:
        raise ValueError(f"regmean off_diagonal must be in [0, 1], got {off_diagonal!r}")
    return ridge, c


def _task_vectors(base: StateDict, means: Sequence[StateDict], key: str, dtype) -> torch.Tensor:
    """(T, n) stack of τ_t = θ_t − θ0 for one key, in ``dtype`` (a fresh tensor)."""
    b = flat(base[key]).to(dtype)
    return torch.stack([flat(m[key]).to(dtype) - b for m in means])


# --------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------
def _ties_thresholds(base, means, keys, density: float, trim: str) -> dict[str, torch.Tensor]:
    """Per key, the (T,) magnitude each task's entries must reach to survive trimming.

    ``global``: one threshold per task over all its parameters (the k-th largest |τ_t|, k =
    ⌈density·P⌉); ``tensor``: the same per parameter tensor.
    """
    T = len(means)

    def kth_largest(v: torch.Tensor) -> torch.Tensor:
        n = v.numel()
        k = max(1, math.ceil(density * n))
        return torch.kthvalue(v, n - k + 1).values

    if trim == "tensor":
        out = {}
        for key in keys:
            tau = _task_vectors(base, means, key, torch.float64).abs()
            out[key] = torch.stack([kth_largest(tau[t]) for t in range(T)])
        return out
    mags = [torch.cat([_task_vectors(base, [m], k, torch.float64).abs()[0] for k in keys]) for m in means]
    thr = torch.stack([kth_largest(v) for v in mags])
    return {k: thr for k in keys}


@register("ties", needs_base=True, options=TiesOptions, check=lambda o, T: _check_ties(o.density, o.trim, o.scale))
@torch.no_grad()
def ties(
    base: StateDict,
    means: Sequence[StateDict],
    alpha,
    *,
    trim: str = "global",
    density: float = 0.2,
    scale: float = 1.0,
    chunk_elems: int | None = None,
    out=None,
):
    """TIES-merging (Yadav et al., NeurIPS 2023), α-weighted: trim, elect sign, disjoint mean.

    With task vectors τ_t = θ_t − θ0:

    1. *trim*: τ̂_t keeps the entries of τ_t whose magnitude is among the top ``density``
       fraction (k = ⌈density·P⌉ entries, ties at the threshold kept) and zeroes the rest.
       ``trim="global"`` (default, as in the paper) ranks each task's entries over all its P
       parameters at once; ``trim="tensor"`` ranks within each parameter tensor (mergekit style).
    2. *elect*: γ = sign(Σ_t α_t τ̂_t) per entry — the α-weighted mass (the paper's Σ_t τ̂_t is
       the uniform α).
    3. *disjoint mean*: over the tasks A = {t : sign(τ̂_t) = γ, τ̂_t ≠ 0},
       τ_m = Σ_{t∈A} α_t τ̂_t / Σ_{t∈A} α_t (0 where γ = 0).

    θ̂_α = θ0 + ``scale`` · τ_m. α = e_t gives θ0 + scale · τ̂_t; with density 1 and τ_t that
    agree in sign (and are non-zero) it is task arithmetic θ0 + scale Σ_t α_t τ_t.
    The trimming thresholds do not depend on α; the election and the mean are computed for
    all G rows at once, chunk by chunk, from four (G, T) @ (T, chunk) products.
    """
    keys = check_state_dicts(means, "means")
    check_base(base, means[0])
    density, lam = _check_ties(density, trim, scale)
    a, batched = check_alpha(alpha, len(means))
    thresholds = _ties_thresholds(base, means, keys, density, trim)

    def sources(k):
        n = means[0][k].numel()
        thr = thresholds[k].to(device=means[0][k].device)
        return [flat(base[k]), LazyStack([m[k] for m in means]), thr[:, None].expand(-1, n)]

    def kernel(al, b, th, thr, out, scratch):
        tau = th.sub_(b)  # (T, m), a fresh copy
        tau.mul_(tau.abs() >= thr.to(tau.dtype))
        pos_mass = al @ tau.clamp_min(0)
        neg_mass = al @ tau.clamp_max(0)
        pos_weight = al @ (tau > 0).to(tau.dtype)
        neg_weight = al @ (tau < 0).to(tau.dtype)
        mass = pos_mass + neg_mass
        zero = torch.zeros((), dtype=tau.dtype, device=tau.device)
        merged = torch.where(mass > 0, pos_mass / pos_weight, torch.where(mass < 0, neg_mass / neg_weight, zero))
        torch.add(b, merged, alpha=lam, out=out)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------
@register("dare", needs_base=True, options=DareOptions, check=lambda o, T: _check_dare(o.drop, o.seed, o.scale))
@torch.no_grad()
def dare(
    base: StateDict,
    means: Sequence[StateDict],
    alpha,
    *,
    drop: float = 0.9,
    seed: int = 0,
    scale: float = 1.0,
    chunk_elems: int | None = None,
    out=None,
):
    """DARE (Yu et al., ICML 2024, "Language models are Super Mario"): drop and rescale.

    Each entry of each task vector τ_t = θ_t − θ0 is dropped with probability p = ``drop`` and
    the survivors are rescaled by 1/(1 − p), so E[τ̃_t] = τ_t; then α-weighted task arithmetic
    θ̂_α = θ0 + ``scale`` Σ_t α_t τ̃_t. The masks come from one ``torch.Generator`` seeded with
    ``seed`` (drawn on the CPU, parameter by parameter in the models' key order, task by task),
    so a seed always gives the same masks, and every α row of a batch uses the same masks.
    p = 0 is task arithmetic exactly.
    """
    keys = check_state_dicts(means, "means")
    check_base(base, means[0])
    p, lam = _check_dare(drop, seed, scale)
    a, batched = check_alpha(alpha, len(means))
    gen = torch.Generator().manual_seed(seed)
    # Draw every mask up front in key order: the result cannot depend on chunking.
    keep = {}
    for k in keys:
        n = means[0][k].numel()
        keep[k] = torch.stack([torch.rand(n, generator=gen) >= p for _ in means])

    def sources(k):
        ref = means[0][k]
        cdt = compute_dtype(ref.dtype)
        tau = _task_vectors(base, means, k, cdt)
        tau.mul_(keep[k].to(ref.device)).div_(1.0 - p)
        return [flat(base[k]), tau]

    def kernel(al, b, tau, out, scratch):
        torch.mm(al, tau, out=out)
        out.mul_(lam).add_(b)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


# --------------------------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------------------------
def _slerp_rows(r: torch.Tensor, v: torch.Tensor, w: torch.Tensor, dot_threshold: float, eps: float) -> torch.Tensor:
    """Row g: slerp(r_g, v, w_g) = sin((1−w)Ω)/sin Ω · r_g + sin(wΩ)/sin Ω · v, cos Ω = r̂_g·v̂.

    Rows where |cos Ω| > ``dot_threshold`` (nearly colinear or anti-colinear) or where either
    vector has norm ≤ ``eps`` use the linear interpolation (1 − w) r_g + w v.
    """
    nr = torch.linalg.vector_norm(r, dim=1)
    nv = torch.linalg.vector_norm(v)
    degenerate = (nr <= eps) | (nv <= eps)
    cos = (r @ v) / (nr * nv).clamp_min(eps * eps)
    cos = cos.clamp(-1.0, 1.0)
    linear = degenerate | (cos.abs() > dot_threshold)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    safe = torch.where(linear, torch.ones_like(so), so)
    s0 = torch.where(linear, 1.0 - w, torch.sin((1.0 - w) * omega) / safe)
    s1 = torch.where(linear, w, torch.sin(w * omega) / safe)
    return s0[:, None] * r + s1[:, None] * v


def _slerp_iterated(v: torch.Tensor, al: torch.Tensor, dot_threshold: float, eps: float) -> torch.Tensor:
    """(g, n): for each row of the (g, T) weights ``al``, the pairwise slerp of the (T, n) rows of
    ``v`` with renormalised weights (see :func:`slerp`)."""
    r = v[0].expand(al.shape[0], v.shape[1]).clone()
    cum = al[:, 0].clone()
    for t in range(1, v.shape[0]):
        total = cum + al[:, t]
        w = torch.where(total > 0, al[:, t] / total.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(total))
        r = _slerp_rows(r, v[t], w, dot_threshold, eps)
        cum = total
    return r


@register("slerp", needs_base=True, options=SlerpOptions)
@torch.no_grad()
def slerp(
    base: StateDict | None,
    means: Sequence[StateDict],
    alpha,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    max_block_elems: int = 1 << 22,
):
    """Spherical linear interpolation (Shoemake 1985) of task vectors, per parameter tensor.

    Two models (T = 2): for each parameter tensor, with v_t = θ_t − θ0 flattened and
    cos Ω = v̂_1·v̂_2, τ = sin((1−t)Ω)/sin Ω · v_1 + sin(tΩ)/sin Ω · v_2 with t = α_2, and
    θ̂_α = θ0 + τ. This is the per-tensor rule of mergekit's ``slerp`` applied to task
    vectors; with ``base=None`` the weights θ_t themselves are interpolated instead (mergekit's
    setting). t = 0 / 1 return the endpoints exactly; for v_1, v_2 of equal norm the result
    keeps that norm; nearly colinear vectors (|cos Ω| > ``dot_threshold``) and zero vectors
    fall back to linear interpolation (1 − t) v_1 + t v_2.

    T > 2: iterated pairwise slerp with renormalised weights (the weighted-mean recursion on
    the sphere): r_1 = v_1, r_t = slerp(r_{t−1}, v_t, α_t / (α_1 + … + α_t)), τ = r_T
    (a weight of 0 when α_1 + … + α_t = 0). It is exact at the vertices, preserves equal norms
    and is linear interpolation for colinear vectors, but unlike a spherical (Karcher) mean
    it depends on the task order. Vectorised over the G rows, in row blocks of at most
    ``max_block_elems`` elements per tensor.
    """
    keys = check_state_dicts(means, "means")
    if base is not None:
        check_base(base, means[0])
    dot_threshold = _number(dot_threshold, "slerp dot_threshold")
    if not 0 < dot_threshold <= 1:
        raise ValueError(f"slerp dot_threshold must be in (0, 1], got {dot_threshold!r}")
    eps = _number(eps, "slerp eps")
    a, batched = check_alpha(alpha, len(means))
    G = a.shape[0]
    result = {}
    for k in keys:
        ref = means[0][k]
        cdt = compute_dtype(ref.dtype)
        n = ref.numel()
        if base is not None:
            v = _task_vectors(base, means, k, cdt)
            b = flat(base[k]).to(cdt)
        else:
            v = torch.stack([flat(m[k]).to(cdt) for m in means])
            b = None
        al = a.to(device=ref.device, dtype=cdt)
        merged = torch.empty((G, n), dtype=cdt, device=ref.device)
        rows = max(1, int(max_block_elems) // max(n, 1))
        for lo in range(0, G, rows):
            r = _slerp_iterated(v, al[lo : lo + rows], dot_threshold, eps)
            merged[lo : lo + rows] = r if b is None else r + b
        result[k] = merged.to(ref.dtype).reshape((G, *ref.shape))
    return finish(result, batched)


# --------------------------------------------------------------------------------------------
# model soup
# --------------------------------------------------------------------------------------------
@register("model_soup", options=ChunkedOptions)
@torch.no_grad()
def model_soup(means: Sequence[StateDict], alpha, *, chunk_elems: int | None = None, out=None):
    """Uniform model soup (Wortsman et al., ICML 2022): (1/T) Σ_t θ_t, whatever α is.

    α is validated and only fixes the output's shape: every row of a (G, T) batch is the same
    uniform average (so on a front plot the soup is a single point). The greedy soup needs
    held-out scores and is not a function of α; it is not provided.
    """
    check_state_dicts(means, "means")
    T = len(means)
    a, batched = check_alpha(alpha, T)
    uniform = torch.full_like(a, 1.0 / T)
    return simple_average(means, uniform if batched else uniform[0], chunk_elems=chunk_elems, out=out)


# --------------------------------------------------------------------------------------------
# ESM (parameter-space essential subspaces)
# --------------------------------------------------------------------------------------------
def _kept_rank(s: torch.Tensor, rank: int | None, energy: float | None, default: int) -> int:
    """How many leading singular values of one task update to keep (numerical zeros never)."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    numeric = int((s > s[0] * max(s.numel(), 1) * torch.finfo(s.dtype).eps).sum())
    if energy is not None:
        cum = torch.cumsum(s * s, 0)
        r = int((cum < energy * cum[-1]).sum()) + 1
    else:
        r = rank if rank is not None else default
    return max(0, min(r, numeric))


def _orthonormal_span(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, q) of the span of the columns of ``vectors`` (d, R), via SVD."""
    if vectors.shape[1] == 0:
        return vectors
    u, s, _ = torch.linalg.svd(vectors, full_matrices=False)
    tol = s[0] * max(vectors.shape) * torch.finfo(s.dtype).eps
    return u[:, s > tol]


def _esm_updates(taus: torch.Tensor, rank, energy) -> torch.Tensor:
    """(T, m, n) task updates → their projections P_U τ_t P_V onto the joint essential spaces."""
    T, m, n = taus.shape
    default = max(1, min(m, n) // T)
    lefts, rights = [], []
    for t in range(T):
        u, s, vh = torch.linalg.svd(taus[t], full_matrices=False)
        r = _kept_rank(s, rank, energy, default)
        lefts.append(u[:, :r])
        rights.append(vh[:r].T)
    qu = _orthonormal_span(torch.cat(lefts, dim=1))  # (m, p)
    qv = _orthonormal_span(torch.cat(rights, dim=1))  # (n, q)
    core = qu.T @ taus @ qv  # (T, p, q): coordinates of each update in the joint subspaces
    return qu @ core @ qv.T


def _esm_energy(rank, energy) -> float | None:
    """Check ESM's ``rank`` / ``energy`` (at most one of them); returns ``energy`` as a float or None."""
    if rank is not None and energy is not None:
        raise ValueError("ESM takes rank or energy, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"ESM rank must be an integer >= 1, got {rank!r}")
    if energy is not None:
        energy = _number(energy, "ESM energy")
        if not 0 < energy <= 1:
            raise ValueError(f"ESM energy must be in (0, 1], got {energy!r}")
    return energy


def _esm_values(o: EsmOptions, num_tasks: int) -> None:
    _esm_energy(o.rank, o.energy)
    _scale(o.scale)


@register("esm", needs_base=True, options=EsmOptions, check=_esm_values)
@torch.no_grad()
def esm(
    base: StateDict,
    means: Sequence[StateDict],
    alpha,
    *,
    rank: int | None = None,
    energy: float | None = None,
    scale: float = 1.0,
    chunk_elems: int | None = None,
    out=None,
):
    """Essential-subspace merging: keep each task's top singular directions, fuse in their span.

    For every parameter with ≥ 2 dimensions, reshaped to a matrix (out, rest) (conv kernels
    included), and task updates τ_t = θ_t − θ0 = U_t S_t V_tᵀ (float64 SVD):

    1. *essential directions*: task t keeps its top r_t singular pairs — r_t = ``rank``, or the
       fewest reaching an ``energy`` fraction of Σ s², or by default ⌊min(out, rest)/T⌋
       (TSV-Merge's share per task); numerically zero singular values are never kept;
    2. *orthogonalise across tasks*: orthonormal bases Q_U, Q_V of the spans of the stacked
       kept left vectors [U_1,r … U_T,r] and right vectors [V_1,r … V_T,r] (SVD of the stacks);
    3. *fuse*: θ̂_α = θ0 + ``scale`` Σ_t α_t Q_U Q_Uᵀ τ_t Q_V Q_Vᵀ — each update keeps only its
       part in the joint essential subspace; the low-energy directions outside every task's
       essential subspace, whose accumulation across tasks is the interference ESM removes,
       are dropped.

    1-D parameters (biases, norms) use task arithmetic. α enters linearly, as in task
    arithmetic; α = e_t gives θ0 + scale · P_U τ_t P_V. Without truncation (``rank`` ≥ the
    matrix's smaller side, or ``energy=1``) P_U τ_t P_V = τ_t and the rule *is* task arithmetic.

    This is a parameter-space reading of ESM (Li, Qi, Geng, Tian; CVPR 2026): the paper takes
    the principal directions of the activation shifts X Δwᵀ on calibration data, and its
    orthogonalisation (as TSV-Merge's, Gargiulo et al. 2025, which replaces the stacked bases
    by their nearest orthogonal factors) does not reduce to task arithmetic at full rank; the
    projection used here does.
    """
    keys = check_state_dicts(means, "means")
    check_base(base, means[0])
    energy = _esm_energy(rank, energy)
    lam = _scale(scale)
    a, batched = check_alpha(alpha, len(means))

    def sources(k):
        ref = means[0][k]
        cdt = compute_dtype(ref.dtype)
        if ref.ndim < 2:
            return [flat(base[k]), _task_vectors(base, means, k, cdt)]
        taus = _task_vectors(base, means, k, torch.float64).reshape(len(means), ref.shape[0], -1)
        updates = _esm_updates(taus, rank, energy).reshape(len(means), -1)
        return [flat(base[k]), updates.to(cdt)]

    def kernel(al, b, upd, out, scratch):
        torch.mm(al, upd, out=out)
        out.mul_(lam).add_(b)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


# --------------------------------------------------------------------------------------------
# RegMean / convex-QP calibration merge
# --------------------------------------------------------------------------------------------
def _bias_key(weight_key: str) -> str:
    if not weight_key.endswith("weight"):
        raise ValueError(f"grams[{weight_key!r}] has a bias coordinate but the key does not end in 'weight'")
    return weight_key[: -len("weight")] + "bias"


def _check_grams(grams, means, keys) -> dict[str, tuple[int, str | None]]:
    """Validate per-task Gram matrices; returns key -> (input dim, bias key or None)."""
    T = len(means)
    if isinstance(grams, Mapping) or not isinstance(grams, Sequence):
        raise ValueError("grams must be a sequence (one mapping per task) of name -> (d, d) Gram")
    if len(grams) != T:
        raise ValueError(f"got {T} models but {len(grams)} sets of Gram matrices")
    names = list(grams[0].keys()) if isinstance(grams[0], Mapping) else None
    if names is None:
        raise ValueError(f"grams[0] is a {type(grams[0]).__name__}, not a mapping")
    plan = {}
    for t, gt in enumerate(grams):
        if not isinstance(gt, Mapping):
            raise ValueError(f"grams[{t}] is a {type(gt).__name__}, not a mapping")
        if set(gt) != set(names):
            raise ValueError(f"grams[{t}] covers {sorted(gt)[:5]} but grams[0] covers {sorted(names)[:5]}")
        for k in names:
            if k not in keys:
                raise ValueError(f"grams[{t}] has {k!r}, which is not a parameter of the models")
            w = means[0][k]
            if w.ndim < 2:
                raise ValueError(f"grams[{t}][{k!r}]: {k!r} is not a weight matrix (shape {tuple(w.shape)})")
            n_in = w[0].numel()
            g = gt[k]
            if (
                not isinstance(g, torch.Tensor)
                or g.ndim != 2
                or g.shape[0] != g.shape[1]
                or g.shape[0] not in (n_in, n_in + 1)
            ):
                raise ValueError(
                    f"grams[{t}][{k!r}] must be a ({n_in}, {n_in}) Gram matrix (or {n_in + 1} with a "
                    f"bias coordinate), got {tuple(getattr(g, 'shape', ()))}"
                )
            if not torch.isfinite(g).all():
                raise ValueError(f"grams[{t}][{k!r}] has non-finite entries")
            bias = None
            if g.shape[0] == n_in + 1:
                bias = _bias_key(k)
                if bias not in keys or means[0][bias].shape != (w.shape[0],):
                    raise ValueError(
                        f"grams[{t}][{k!r}] has a bias coordinate but the models have no "
                        f"({w.shape[0]},) parameter {bias!r}"
                    )
            if t == 0:
                plan[k] = (g.shape[0], bias)
            elif plan[k] != (g.shape[0], bias):
                raise ValueError(f"grams[{t}][{k!r}] has shape {tuple(g.shape)}, grams[0] another")
    biases = [b for _, b in plan.values() if b is not None]
    if len(set(biases)) != len(biases):
        raise ValueError("two Gram matrices claim the same bias parameter")
    return plan


def _regmean_system(means: Sequence[StateDict], grams: Sequence[torch.Tensor], key: str, bias, ridge: float, c: float):
    """One layer's (T, d, d) G̃_t + ρ_t I and (T, out, d) W̃_t (G̃_t + ρ_t I) in float64 (see :func:`regmean`)."""
    f64 = torch.float64
    w_ref = means[0][key]
    dev, out_dim = w_ref.device, w_ref.shape[0]
    W = torch.stack([m[key].reshape(out_dim, -1).to(f64) for m in means])  # (T, out, in)
    if bias is not None:
        W = torch.cat([W, torch.stack([m[bias].to(f64) for m in means])[:, :, None]], dim=2)
    A = []
    for gram in grams:
        g = gram.to(device=dev, dtype=f64)
        diag = torch.diagonal(g)
        g = c * g + (1 - c) * torch.diag(diag) if c != 1 else g.clone()
        rho = ridge * (float(diag.mean()) if float(diag.mean()) > 0 else 1.0)
        g.diagonal().add_(rho)
        A.append(g)
    A = torch.stack(A)  # (T, d, d)
    return A, W @ A


def _regmean_solve(A: torch.Tensor, R: torch.Tensor, a: torch.Tensor, key: str, max_batch_bytes: int) -> torch.Tensor:
    """(G, out, d) W = (Σ_t α_t R_t)(Σ_t α_t A_t)⁻¹ for every row of the (G, T) α, in blocks of rows."""
    (G, T), d, out_dim = a.shape, A.shape[-1], R.shape[1]
    al = a.to(device=A.device, dtype=torch.float64)
    per = max(1, int(max_batch_bytes) // (d * d * 8))
    sol = torch.empty((G, out_dim, d), dtype=torch.float64, device=A.device)
    for lo in range(0, G, per):
        ag = al[lo : lo + per]
        Ag = (ag @ A.reshape(T, -1)).reshape(-1, d, d)
        Bg = (ag @ R.reshape(T, -1)).reshape(-1, out_dim, d)
        what = f"regmean: Σ_t α_t (G_t + ρ_t I) for {key!r}"
        sol[lo : lo + per] = solve_spd_rows(Ag, Bg.transpose(1, 2), a, lo, what, "raise ridge").transpose(1, 2)
    return sol


@register(
    "regmean",
    needs_calibration=True,
    options=RegmeanOptions,
    check=lambda o, num_tasks: _check_regmean(o.ridge, o.off_diagonal),
)
@torch.no_grad()
def regmean(
    means: Sequence[StateDict],
    alpha,
    *,
    grams: Sequence[Mapping[str, torch.Tensor]],
    ridge: float = 1e-4,
    off_diagonal: float = 1.0,
    max_batch_bytes: int = 1 << 28,
):
    """Convex-QP calibration merge in closed form (RegMean, Jin et al., ICLR 2023), α-weighted.

    For each layer with a Gram matrix in ``grams`` — a linear layer's weight W (out, in), or a
    conv kernel (out, in·kh·kw) acting on unfolded patches — with task t's calibration inputs X_t
    (rows: examples, tokens or patches) and mean Gram G_t = X_tᵀX_t / N_t, the merged weight
    minimises the α-weighted squared output error against the finetuned layers,

        Σ_t α_t [ ‖X_t (W − W_t)ᵀ‖² / N_t + ρ_t ‖W − W_t‖² ],

        W = (Σ_t α_t W_t (G̃_t + ρ_t I)) (Σ_t α_t (G̃_t + ρ_t I))⁻¹,

    with G̃_t = c·G_t + (1 − c)·diag(G_t), c = ``off_diagonal`` (RegMean's non-diagonal scaling;
    1 is the exact QP, 0 a per-input-feature weighted average) and the ridge ρ_t = ``ridge`` ·
    mean(diag G_t) pulling directions no input excites towards the α-weighted average. A Gram
    with one extra coordinate (the constant input 1, appended by :func:`calibration_grams` when
    the layer's bias is merged too) solves weight and bias jointly: W̃ = [W | b]. Every other
    parameter (norms, embeddings, layers without a Gram) is α-weighted averaged Σ_t α_t θ_t.
    α = e_t returns model t. The (G, d, d) systems are Cholesky-solved in float64, in batches of
    at most ``max_batch_bytes``. This is the linear-layer closed form of the convex-QP merge of
    arXiv 2605.29101; the models need not share a base.
    """
    keys = check_state_dicts(means, "means")
    plan = _check_grams(grams, means, keys)
    ridge, c = _check_regmean(ridge, off_diagonal)
    a, batched = check_alpha(alpha, len(means))
    G = a.shape[0]
    solved = set(plan) | {b for _, b in plan.values() if b is not None}
    rest = [k for k in keys if k not in solved]
    result: dict[str, torch.Tensor] = {}
    if rest:
        avg = simple_average([{k: m[k] for k in rest} for m in means], a)
        result.update(avg)
    for k, (_, bias) in plan.items():
        w_ref = means[0][k]
        A, R = _regmean_system(means, [g[k] for g in grams], k, bias, ridge, c)
        sol = _regmean_solve(A, R, a, k, max_batch_bytes)
        n_in = w_ref[0].numel()
        result[k] = sol[:, :, :n_in].to(w_ref.dtype).reshape((G, *w_ref.shape))
        if bias is not None:
            result[bias] = sol[:, :, n_in].to(means[0][bias].dtype).contiguous()
    ordered = {k: result[k] for k in keys}
    return finish(ordered, batched)


def _gram_targets(model: nn.Module, trainable: set[str], conv: bool) -> dict[str, tuple]:
    """Modules whose trainable weight gets a Gram: name -> (module, weight key, bias merged?)."""
    targets = {}
    for name, mod in model.named_modules():
        wkey = f"{name}.weight" if name else "weight"
        if wkey not in trainable:
            continue
        bkey = f"{name}.bias" if name else "bias"
        has_bias = getattr(mod, "bias", None) is not None and bkey in trainable
        if isinstance(mod, nn.Linear):
            targets[name] = (mod, wkey, has_bias)
        elif (
            conv
            and isinstance(mod, nn.Conv2d)
            and mod.groups == 1
            and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        ):
            targets[name] = (mod, wkey, has_bias)
    return targets


def _layer_rows(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows a layer's weight multiplies: features (linear) or unfolded patches (conv)."""
    if isinstance(mod, nn.Conv2d):
        patches = F.unfold(
            x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride
        )  # (N, C·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def calibration_grams(
    model: nn.Module,
    state_dicts: Sequence[StateDict] | None,
    inputs: Sequence,
    *,
    batch_size: int = 64,
    conv: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Per-task mean input Grams G_t = X_tᵀX_t / N_t of every mergeable layer, for :func:`regmean`.

    ``inputs[t]`` are task t's calibration inputs (an (N, ...) tensor or a mapping of token
    tensors, as the model takes them). For each task the model is copied and, when
    ``state_dicts`` is given, task t's finetuned trainable weights are loaded (RegMean: each
    layer sees the inputs it sees in the finetuned model t); with ``state_dicts=None`` every
    task uses ``model``'s own weights (e.g. θ0). Forward hooks record the input of every
    ``nn.Linear`` whose weight is trainable (leading dims flattened; with an ``attention_mask``
    only real tokens count) and, with ``conv``, of every ``nn.Conv2d`` (groups 1, zero padding)
    as unfolded patches. When the layer's bias is trainable too, a constant-1 coordinate is
    appended (the Gram is (in + 1)²) so that :func:`regmean` solves weight and bias together.
    Returns one ``{weight name: (d, d) float64 CPU tensor}`` per task. ``model`` is unchanged.
    """
    from varmerge import evaluate, models

    if state_dicts is not None and len(state_dicts) != len(inputs):
        raise ValueError(f"got {len(state_dicts)} state dicts but {len(inputs)} input sets")
    if len(inputs) == 0:
        raise ValueError("inputs is empty: need calibration inputs for at least one task")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for t, x in enumerate(inputs):
        n = evaluate.num_examples(x)
        if n == 0:
            raise ValueError(f"task {t} has no calibration inputs")
        m = copy.deepcopy(model)
        if state_dicts is not None:
            models.load_trainable(m, state_dicts[t])
        m.eval()
        out.append(_task_grams(m, _gram_targets(m, trainable, conv), x, n, batch_size))
    return out


def _task_grams(model: nn.Module, targets: dict, x, n: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Run ``x`` through ``model`` in batches; mean Gram of each target layer's input rows."""
    from varmerge import evaluate, models

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(wkey: str, has_bias: bool):
        def hook(mod, args, _out):
            rows = _layer_rows(mod, args[0], state["mask"]).detach()
            if has_bias:
                rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
            # in the model's precision per batch, summed over batches in float64
            g = (rows.T @ rows).to(device="cpu", dtype=torch.float64)
            sums[wkey] = g if wkey not in sums else sums[wkey] + g
            counts[wkey] = counts.get(wkey, 0) + rows.shape[0]

        return hook

    handles = [mod.register_forward_hook(make_hook(wkey, hb)) for mod, wkey, hb in targets.values()]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for lo in range(0, n, batch_size):
            xb = evaluate.slice_inputs(x, lo, min(lo + batch_size, n))
            xb = xb.to(dev) if isinstance(xb, torch.Tensor) else {k: v.to(dev) for k, v in xb.items()}
            state["mask"] = xb.get("attention_mask") if isinstance(xb, Mapping) else None
            models.forward(model, xb)
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / max(counts[k], 1) for k in sums}
