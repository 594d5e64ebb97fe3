"""The posterior-based rules: each is the mode of a product of (powered) task posteriors.

(Monzón Maldonado et al., arXiv 2412.08147, Section 3.) Isotropic Gaussians give simple
averaging and task arithmetic, diagonal Gaussians the Hessian-weighted merge, mixtures of
diagonal Gaussians the EM fixed point of Algorithm 1 and full Gaussians the full-precision
Hessian-weighted merge.

Every rule takes ``alpha`` as a (T,) vector, returning one merged state dict, or as a (G, T)
batch, returning a state dict whose tensors carry a leading G dimension. A batch is computed in
one pass over the parameters: each parameter is cut into cache-sized chunks and every chunk is
merged for all G weightings at once with a small (G, T) @ (T, chunk) matrix product
(:mod:`varmerge.merging.kernels`), so the sweep reads each input once and writes each output once.

Inputs are never modified. Mismatched keys, shapes or dtypes, α off the simplex and negative or
non-finite precisions raise :class:`ValueError` naming the offending key or value. Each rule is
registered (:mod:`varmerge.merging.registry`) with the posterior view it reads and a pydantic
model of its settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch

from varmerge._checks import check_alpha, check_precision_tensor, check_precisions, check_state_dicts
from varmerge.merging.kernels import (
    AnchorPreconditioner,
    LazyStack,
    StateDict,
    check_base,
    chunk_size,
    chunked_merge,
    combined_matvec,
    compute_dtype,
    finish,
    flat,
    pcg,
    solve_combined_pcg,
    solve_spd_rows,
    stack_rows,
)
from varmerge.merging.registry import ChunkedOptions, Options, register

__all__ = [
    "DEFAULT_PRECISION_FLOOR",
    "FullOptions",
    "HessianFullOptions",
    "HessianOptions",
    "MixtureFullOptions",
    "MixtureOptions",
    "TaskArithmeticOptions",
    "hessian_weighted",
    "hessian_weighted_full",
    "mixture_full_objective",
    "mixture_objective",
    "mixture_weighted",
    "mixture_weighted_full",
    "simple_average",
    "task_arithmetic",
]

#: Precisions are floored at this value so that a parameter no task constrains falls back to
#: averaging instead of 0/0.
DEFAULT_PRECISION_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# settings (merge.options.<name> in a config)
# --------------------------------------------------------------------------------------------
def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"task arithmetic scale must be finite, got {scale!r}")


def _check_iterations(iterations) -> None:
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")


class TaskArithmeticOptions(ChunkedOptions):
    scale: float = 1.0  # λ of θ0 + λ Σ_t α_t τ_t


class HessianOptions(ChunkedOptions):
    precision_floor: float = DEFAULT_PRECISION_FLOOR


class MixtureOptions(ChunkedOptions):
    bundled: ClassVar[bool] = True  # mixture_weighted takes options=

    iterations: int = 10  # EM steps after the Hessian-weighted start
    precision_floor: float = DEFAULT_PRECISION_FLOOR
    tol: float | None = None  # stop once no responsibility moves more than this


class FullOptions(Options):
    bundled: ClassVar[bool] = True  # the full rules take options=

    max_batch_bytes: int = 1 << 28  # memory of one batch of (P, P) systems


class HessianFullOptions(FullOptions):
    solver: Literal["cholesky", "pcg"] = "cholesky"  # pcg: kernels.solve_combined_pcg
    pcg_tol: float | None = None  # relative residual at which a row's CG stops (None: PCG_TOL of the dtype)
    anchor_spacing: float = 0.2  # the preconditioners' coarse grid


class MixtureFullOptions(FullOptions):
    iterations: int = 10  # EM steps after the start at the π-weighted Hessian merge
    tol: float | None = None  # an α stops once none of its responsibilities moves more than this
    solver: Literal["cholesky", "pcg"] = "cholesky"  # pcg: CG from the last iterate, anchor preconditioners
    pcg_tol: float | None = None  # None: PCG_TOL of the dtype
    anchor_spacing: float = 0.2  # pcg: the preconditioners' coarse grid
    start_spacing: float | None = None  # EM on this coarse grid first; each α starts at its nearest anchor


# --------------------------------------------------------------------------------------------
# isotropic posteriors
# --------------------------------------------------------------------------------------------
@register("simple", options=ChunkedOptions)
@torch.no_grad()
def simple_average(means: Sequence[StateDict], alpha, *, chunk_elems: int | None = None, out=None):
    """Simple averaging Σ_t α_t θ_t (isotropic Gaussians, prior N(0, I); eq. 9)."""
    keys = check_state_dicts(means, "means")
    a, batched = check_alpha(alpha, len(means))

    def sources(k):
        return [LazyStack([m[k] for m in means])]

    def kernel(al, th, out, scratch):
        torch.mm(al, th, out=out)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


@register("task_arithmetic", needs_base=True, options=TaskArithmeticOptions, check=lambda o, T: _check_scale(o.scale))
@torch.no_grad()
def task_arithmetic(
    base: StateDict, means: Sequence[StateDict], alpha, scale: float = 1.0, *, chunk_elems: int | None = None, out=None
):
    """Task arithmetic θ0 + λ Σ_t α_t (θ_t − θ0) (isotropic Gaussians, prior N(θ0, I); eq. 11)."""
    keys = check_state_dicts(means, "means")
    check_base(base, means[0])
    _check_scale(scale)
    a, batched = check_alpha(alpha, len(means))

    def sources(k):
        return [flat(base[k]), LazyStack([m[k] for m in means])]

    def kernel(al, b, th, out, scratch):
        torch.mm(al, th.sub_(b), out=out)
        out.mul_(scale).add_(b)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


# --------------------------------------------------------------------------------------------
# diagonal Gaussian posteriors
# --------------------------------------------------------------------------------------------
@register("hessian", posterior="diagonal", options=HessianOptions)
@torch.no_grad()
def hessian_weighted(
    means: Sequence[StateDict],
    precisions: Sequence[StateDict],
    alpha,
    *,
    base: StateDict | None = None,
    base_precision: StateDict | None = None,
    precision_floor: float = DEFAULT_PRECISION_FLOOR,
    chunk_elems: int | None = None,
    out=None,
):
    """Hessian-weighted merging (Σ α_t H_t)⁻¹ Σ α_t H_t θ_t with diagonal H (eq. 12).

    With ``base`` θ0 (and optionally ``base_precision`` H0) the prior form
    θ0 + (H0 + Σ α_t H_t)⁻¹ Σ α_t (H0 + H_t)(θ_t − θ0) is returned; α = e_t gives θ_t.
    Precisions are floored at ``precision_floor``. ``out`` (as for every chunked rule) takes
    preallocated (G, *shape) tensors to write into, e.g. reused across blocks of a long sweep.
    """
    keys = check_state_dicts(means, "means")
    check_precisions(precisions, means)
    a, batched = check_alpha(alpha, len(means))
    if base_precision is not None and base is None:
        raise ValueError("base_precision was given without base; pass base=θ0 as well")
    if base is not None:
        check_base(base, means[0])
    if base_precision is not None:
        check_state_dicts([base_precision], "base_precision", reference=means[0])
        for k, t in base_precision.items():
            check_precision_tensor(t, f"base_precision[{k!r}]")
    floor = float(precision_floor)

    if base is None:

        def sources(k):
            return [LazyStack([m[k] for m in means]), LazyStack([p[k] for p in precisions])]

        def kernel(al, th, h, out, scratch):
            h.clamp_min_(floor)
            torch.mm(al, h, out=scratch)  # Σ α h
            torch.mm(al, th.mul_(h), out=out)  # Σ α h θ
            out.div_(scratch)

    else:

        def sources(k):
            h0 = (
                flat(base_precision[k])
                if base_precision is not None
                else torch.zeros(base[k].numel(), dtype=base[k].dtype, device=base[k].device)
            )
            return [flat(base[k]), h0, LazyStack([m[k] for m in means]), LazyStack([p[k] for p in precisions])]

        def kernel(al, b, h0, th, h, out, scratch):
            h.clamp_min_(floor)
            torch.mm(al, h, out=scratch)
            scratch.add_(h0)  # H0 + Σ α h
            torch.mm(al, th.sub_(b).mul_(h.add_(h0)), out=out)  # Σ α (H0 + h)(θ − θ0)
            out.div_(scratch).add_(b)

    return chunked_merge(keys, means[0], a, batched, sources, kernel, chunk_elems, out)


# --------------------------------------------------------------------------------------------
# mixtures of diagonal Gaussians (Algorithm 1)
# --------------------------------------------------------------------------------------------
def _check_nesting(means, precisions, single: type, what: str) -> None:
    """Mixture inputs are a non-empty list of tasks, each a non-empty list of components (a bare
    ``single``, e.g. one state dict, is not), with as many precisions as means."""
    if isinstance(means, Mapping) or len(means) == 0:
        raise ValueError("mixture means must be a non-empty list (tasks) of lists (components)")
    if len(precisions) != len(means):
        raise ValueError(f"got {len(means)} tasks of means but {len(precisions)} of precisions")
    for t, (mt, pt) in enumerate(zip(means, precisions, strict=True)):
        if isinstance(mt, single):
            raise ValueError(f"means[{t}] is a single {what}; mixture merging needs a list of K components")
        if len(mt) == 0:
            raise ValueError(f"task {t} has no mixture components")
        if len(pt) != len(mt):
            raise ValueError(f"task {t} has {len(mt)} mean components but {len(pt)} precision components")


def _check_mixture(means, precisions):
    _check_nesting(means, precisions, Mapping, "state dict")
    flat_m = [c for mt in means for c in mt]
    flat_p = [c for pt in precisions for c in pt]
    task_of = [t for t, mt in enumerate(means) for _ in mt]
    keys = check_state_dicts(flat_m, "mixture means")
    for i, d in enumerate(flat_p):
        check_state_dicts([d], f"mixture precisions (component {i})", reference=flat_m[0])
        for k, v in d.items():
            check_precision_tensor(v, f"mixture precisions (component {i})[{k!r}]")
    return keys, flat_m, flat_p, torch.tensor(task_of)


def _mixture_logweights(weights, means) -> torch.Tensor:
    """log π_tk flattened over components, uniform 1/K_t unless ``weights`` is given."""
    logs = []
    for t, mt in enumerate(means):
        if weights is None:
            w = torch.full((len(mt),), 1.0 / len(mt), dtype=torch.float64)
        else:
            w = torch.as_tensor(weights[t], dtype=torch.float64)
            if w.shape != (len(mt),) or (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-6:
                raise ValueError(
                    f"mixture weights of task {t} must be {len(mt)} positive numbers summing to 1, got {w.tolist()}"
                )
        logs.append(w.log())
    return torch.cat(logs)


class _MixtureState:
    """Per-key (C, n) stacks of the components, centred on their mean for numerical accuracy."""

    def __init__(self, keys, flat_m, flat_p, floor):
        self.keys = keys
        self.anchor, self.delta, self.h, self.hdelta = {}, {}, {}, {}
        self.half_logdet = torch.zeros(len(flat_m), dtype=torch.float64)
        self.const = torch.zeros(len(flat_m), dtype=torch.float64)  # Σ h δ²
        for k in keys:
            cdt = compute_dtype(flat_m[0][k].dtype)
            th = stack_rows(flat_m, k).to(cdt)
            h = stack_rows(flat_p, k).to(cdt).clamp_min(floor)
            anchor = th.mean(0)
            delta = th - anchor
            self.anchor[k], self.delta[k], self.h[k] = anchor, delta, h
            self.hdelta[k] = h * delta
            self.half_logdet += 0.5 * h.log().sum(1, dtype=torch.float64).cpu()
            self.const += (self.hdelta[k] * delta).sum(1, dtype=torch.float64).cpu()

    def sq_mahalanobis(self, theta: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """(G, C) Σ_p h_c (θ̂_g − θ_c)², accumulated in float64 over chunks."""
        G = next(iter(theta.values())).shape[0]
        q = torch.zeros(G, len(self.const), dtype=torch.float64)
        for k in self.keys:
            d_all = theta[k].reshape(G, -1)
            n = d_all.shape[1]
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                d = d_all[:, lo:hi].to(self.h[k].dtype) - self.anchor[k][lo:hi]
                h, hd = self.h[k][:, lo:hi], self.hdelta[k][:, lo:hi]
                part = (d * d) @ h.T - 2.0 * (d @ hd.T)
                q += part.to(torch.float64).cpu()
        return q + self.const

    def update(
        self, weights: torch.Tensor, ref: StateDict, step: int, *, out: dict | None = None, score: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """θ̂ = anchor + (Σ w_c h_c δ_c) / (Σ w_c h_c) for (G, C) weights w, in one pass.

        With ``score`` the (G, C) squared Mahalanobis distances of the new θ̂ are accumulated
        while each chunk is still in cache (what the next E-step needs). ``out`` (the previous
        iterate) is overwritten in place when given.
        """
        G, C = weights.shape
        out = {} if out is None else out
        q = torch.zeros(G, C, dtype=torch.float64) if score else None
        for k in self.keys:
            cdt = self.h[k].dtype
            w = weights.to(cdt)
            n = self.h[k].shape[1]
            if k not in out:
                out[k] = torch.empty((G, *ref[k].shape), dtype=cdt, device=ref[k].device)
            merged = out[k].view(G, n)
            scratch = torch.empty((G, min(step, n)), dtype=cdt, device=ref[k].device)
            part = torch.empty((G, C), dtype=cdt) if score else None
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                o, sc = merged[:, lo:hi], scratch[:, : hi - lo]
                h, hd = self.h[k][:, lo:hi], self.hdelta[k][:, lo:hi]
                torch.mm(w, hd, out=o)
                torch.mm(w, h, out=sc)
                o.div_(sc)  # o = θ̂ − anchor
                if score:
                    # Σ h (d − δ)² = Σ h d² − 2 Σ h δ d (+ Σ h δ², added once by the caller)
                    torch.mm(o, hd.T, out=part)
                    q.add_(part.to(torch.float64), alpha=-2.0)
                    torch.mul(o, o, out=sc)
                    torch.mm(sc, h.T, out=part)
                    q.add_(part.to(torch.float64))
                o.add_(self.anchor[k][lo:hi])
        return out, (q + self.const if score else None)


def _responsibilities(log_joint: torch.Tensor, task_of: torch.Tensor, T: int) -> torch.Tensor:
    """Normalise (G, C) log π_k N(θ̂ | θ_tk, ·) over the components of each task (log space)."""
    resp = torch.empty_like(log_joint)
    for t in range(T):
        idx = task_of == t
        resp[:, idx] = torch.softmax(log_joint[:, idx], dim=1)
    return resp


@register("mixture", posterior="mixture", options=MixtureOptions, check=lambda o, T: _check_iterations(o.iterations))
@torch.no_grad()
def mixture_weighted(
    means: Sequence[Sequence[StateDict]],
    precisions: Sequence[Sequence[StateDict]],
    alpha,
    *,
    weights: Sequence[Sequence[float]] | None = None,
    options: MixtureOptions | None = None,
    callback: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
):
    """Mixture-weighted merging: EM fixed point of Π_t (Σ_k π_k N(θ_tk, H_tk⁻¹))^{α_t} (Alg. 1).

    ``means[t][k]`` and ``precisions[t][k]`` are the K_t diagonal components of task t.
    θ̂ starts at the Hessian-weighted merge of all components with uniform responsibilities
    (iteration 0); each of ``options.iterations`` EM steps then recomputes the responsibilities
    π̂_tk ∝ π_k N(θ̂ | θ_tk, diag(1/h_tk)) from log-densities (logsumexp, ½ Σ log h included)
    and sets θ̂ = (Σ π̂_tk α_t h_tk θ_tk) / (Σ π̂_tk α_t h_tk). ``options.tol`` stops early when
    no responsibility moves more than ``tol``; precisions are floored at ``precision_floor``.
    ``callback(i, θ̂)`` sees every iterate (the buffers are reused by the next iteration: copy
    what you keep). Each iteration is one pass over the components: the M-step and the next
    E-step's distances are computed chunk by chunk (``options.chunk_elems``).
    """
    opts = options if options is not None else MixtureOptions()
    iterations, tol = opts.iterations, opts.tol
    _check_iterations(iterations)
    keys, flat_m, flat_p, task_of = _check_mixture(means, precisions)
    T = len(means)
    a, batched = check_alpha(alpha, T)
    log_pi = _mixture_logweights(weights, means)
    state = _MixtureState(keys, flat_m, flat_p, float(opts.precision_floor))
    step = chunk_size(a.shape[0], opts.chunk_elems)
    alpha_c = a[:, task_of]  # (G, C): α_t of each component's task

    resp = _responsibilities(log_pi.expand(a.shape[0], -1).clone(), task_of, T)
    theta, q = state.update(alpha_c * resp, flat_m[0], step, score=iterations > 0)
    if callback is not None:
        callback(0, theta if batched else {k: v[0] for k, v in theta.items()})
    for i in range(1, iterations + 1):
        new_resp = _responsibilities(log_pi + state.half_logdet - 0.5 * q, task_of, T)
        moved = (new_resp - resp).abs().max().item()
        resp = new_resp
        last = i == iterations or (tol is not None and moved <= tol)
        theta, q = state.update(alpha_c * resp, flat_m[0], step, out=theta, score=not last)
        if callback is not None:
            callback(i, theta if batched else {k: v[0] for k, v in theta.items()})
        if last:
            break
    theta = {k: v.to(flat_m[0][k].dtype) for k, v in theta.items()}
    return finish(theta, batched)


@torch.no_grad()
def mixture_objective(
    theta: StateDict,
    means: Sequence[Sequence[StateDict]],
    precisions: Sequence[Sequence[StateDict]],
    alpha,
    *,
    weights: Sequence[Sequence[float]] | None = None,
    precision_floor: float = DEFAULT_PRECISION_FLOOR,
) -> torch.Tensor:
    """Σ_t α_t log q_t(θ̂) up to a constant (what Algorithm 1 increases), for one or G points.

    ``theta`` is one state dict (with α of shape (T,)) or a batched one (with α (G, T));
    returns a float64 scalar or (G,) tensor.
    """
    keys, flat_m, flat_p, task_of = _check_mixture(means, precisions)
    T = len(means)
    a, batched = check_alpha(alpha, T)
    th = theta if batched else {k: v.unsqueeze(0) for k, v in theta.items()}
    log_pi = _mixture_logweights(weights, means)
    state = _MixtureState(keys, flat_m, flat_p, float(precision_floor))
    q = state.sq_mahalanobis(th, chunk_size(a.shape[0], None))
    log_joint = log_pi + state.half_logdet - 0.5 * q  # (G, C)
    per_task = torch.stack([torch.logsumexp(log_joint[:, task_of == t], dim=1) for t in range(T)], dim=1)
    obj = (a * per_task).sum(1)
    return obj if batched else obj[0]


# --------------------------------------------------------------------------------------------
# full Gaussian posteriors (small models)
# --------------------------------------------------------------------------------------------
def _check_full(means, precisions):
    if len(means) == 0:
        raise ValueError("means is empty: need at least one task")
    if len(precisions) != len(means):
        raise ValueError(f"got {len(means)} means but {len(precisions)} precision matrices")
    P = None
    for t, (m, H) in enumerate(zip(means, precisions, strict=True)):
        if not isinstance(m, torch.Tensor) or m.ndim != 1:
            raise ValueError(f"means[{t}] must be a flat (P,) tensor, got {getattr(m, 'shape', m)}")
        P = m.shape[0] if P is None else P
        if m.shape[0] != P:
            raise ValueError(f"means[{t}] has {m.shape[0]} entries, expected {P}")
        if not isinstance(H, torch.Tensor) or H.shape != (P, P):
            raise ValueError(f"precisions[{t}] must be a ({P}, {P}) matrix, got {tuple(getattr(H, 'shape', ()))}")
        if m.dtype != means[0].dtype or H.dtype != means[0].dtype:
            raise ValueError(f"task {t}: dtypes differ ({m.dtype}, {H.dtype} vs {means[0].dtype})")
        if not torch.isfinite(m).all():
            raise ValueError(f"means[{t}] has non-finite entries")
        if not torch.isfinite(H).all():
            raise ValueError(f"precisions[{t}] has non-finite entries (NaN/Inf)")
        if not torch.allclose(H, H.T, rtol=1e-5, atol=1e-8 * float(H.abs().max().clamp_min(1))):
            raise ValueError(f"precisions[{t}] is not symmetric")
    return P


#: The relative residual at which CG stops when ``pcg_tol`` is not given: near each dtype's floor
#: (float32 CG stalls between 1e-6 and 1e-7).
PCG_TOL = {torch.float32: 1e-5, torch.float64: 1e-7}


def _pcg_tol(tol: float | None, dtype: torch.dtype) -> float:
    if tol is None:
        return PCG_TOL.get(dtype, 1e-5)
    if not tol >= 0:
        raise ValueError(f"pcg_tol must be >= 0, got {tol}")
    return tol


@register("hessian_full", posterior="full", options=HessianFullOptions, dtype=torch.float32)
@torch.no_grad()
def hessian_weighted_full(
    means: Sequence[torch.Tensor],
    precisions: Sequence[torch.Tensor],
    alpha,
    *,
    base: torch.Tensor | None = None,
    base_precision: torch.Tensor | None = None,
    options: HessianFullOptions | None = None,
):
    """Hessian-weighted merging with full precision matrices: (Σ α_t H_t)⁻¹ Σ α_t H_t θ_t.

    ``means[t]`` is a flat (P,) tensor, ``precisions[t]`` a symmetric (P, P) matrix. With
    ``options.solver="cholesky"`` the (G, P, P) batch of combined precisions is built and
    Cholesky-solved in chunks of at most ``max_batch_bytes``; ``"pcg"`` solves all α at once by
    preconditioned CG to ``pcg_tol`` (:func:`~varmerge.merging.kernels.solve_combined_pcg`: T
    matrix products per step, Cholesky factors only at the anchors of a grid of spacing
    ``anchor_spacing``). With ``base`` (and ``base_precision``) the prior form is used.
    """
    opts = options if options is not None else HessianFullOptions()
    _check_full(means, precisions)
    a, batched = check_alpha(alpha, len(means))
    H = torch.stack(list(precisions))  # (T, P, P)
    th = torch.stack(list(means))  # (T, P)
    H0, rhs = _full_prior(H, th, base, base_precision)
    al = a.to(th.dtype)
    if opts.solver == "pcg":
        x = _full_pcg(H, al, al @ rhs, H0, opts)
    elif opts.solver == "cholesky":
        x = _full_cholesky(H0, H, a, rhs, opts.max_batch_bytes)
    else:
        raise ValueError(f"solver must be 'cholesky' or 'pcg', got {opts.solver!r}")
    if base is not None:
        x = base + x
    return x if batched else x[0]


def _full_prior(H: torch.Tensor, th: torch.Tensor, base, base_precision) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H0, rhs)``: the prior precision (0 without ``base``) and the (T, P) right-hand sides
    H_t θ_t, or (H0 + H_t)(θ_t − θ0) with ``base`` θ0."""
    P, dt = th.shape[1], th.dtype
    if base_precision is not None and base is None:
        raise ValueError("base_precision was given without base; pass base=θ0 as well")
    if base is None:
        return torch.zeros(P, P, dtype=dt), torch.einsum("tij,tj->ti", H, th)
    if base.shape != (P,) or base.dtype != dt:
        raise ValueError(f"base must be a ({P},) tensor of dtype {dt}, got {tuple(base.shape)}")
    H0 = base_precision if base_precision is not None else torch.zeros(P, P, dtype=dt)
    if H0.shape != (P, P) or not torch.isfinite(H0).all():
        raise ValueError(f"base_precision must be a finite ({P}, {P}) matrix")
    return H0, torch.einsum("tij,tj->ti", H0 + H, th - base)


def _full_pcg(H: torch.Tensor, al: torch.Tensor, b: torch.Tensor, H0: torch.Tensor, opts: HessianFullOptions):
    """(G, P) solutions of (H0 + Σ α_t H_t) x = b by preconditioned CG; refuses unconverged rows."""
    pcg_tol = _pcg_tol(opts.pcg_tol, H.dtype)
    x, info = solve_combined_pcg(H, al, b, anchor_spacing=opts.anchor_spacing, tol=pcg_tol, base=H0)
    if "unconverged" in info:
        raise ValueError(
            f"hessian_full: CG did not reach pcg_tol={pcg_tol} for {info['unconverged']} α rows in "
            f"{info['iterations']} steps; raise pcg_tol or use solver: cholesky"
        )
    return x


def _full_cholesky(H0: torch.Tensor, H: torch.Tensor, a: torch.Tensor, rhs: torch.Tensor, max_batch_bytes: int):
    """(G, P) solutions of (H0 + Σ α_t H_t) x = Σ α_t rhs_t, Cholesky-solved in blocks of α rows."""
    P = H.shape[-1]
    al = a.to(H.dtype)
    per = max(1, int(max_batch_bytes // max(P * P * H.element_size(), 1)))
    outs = []
    for lo in range(0, al.shape[0], per):
        ag = al[lo : lo + per]
        A = H0 + torch.einsum("gt,tij->gij", ag, H)
        b = ag @ rhs
        sol = solve_spd_rows(
            A, b.unsqueeze(-1), a, lo, "combined precision Σ α_t H_t", "add a prior precision or check the posteriors"
        )
        outs.append(sol.squeeze(-1))
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------
# mixtures of full Gaussians (the paper's MNIST mixture row)
# --------------------------------------------------------------------------------------------
class _FullMixture:
    """The components of every task stacked: means (C, P), precisions (C, P, P), H_c θ_c, ½ log det
    H_c, log π_c and the task of each component (validated: shapes, symmetry, positive definite)."""

    def __init__(self, means, precisions, weights):
        _check_nesting(means, precisions, torch.Tensor, "tensor")
        flat_m, flat_h, task_of = [], [], []
        for t, (mt, ht) in enumerate(zip(means, precisions, strict=True)):
            try:
                P = _check_full(list(mt), list(ht))  # names the component: means[k] / precisions[k]
            except ValueError as exc:
                raise ValueError(f"task {t}: {exc}") from None
            if flat_m and (P != flat_m[0].shape[0] or mt[0].dtype != flat_m[0].dtype):
                raise ValueError(
                    f"task {t}: {P} parameters of {mt[0].dtype}, task 0 has {flat_m[0].shape[0]} of {flat_m[0].dtype}"
                )
            flat_m += list(mt)
            flat_h += list(ht)
            task_of += [t] * len(mt)
        self.P = flat_m[0].shape[0]
        self.theta = torch.stack(flat_m)
        self.H = torch.stack(flat_h)
        chol, info = torch.linalg.cholesky_ex(self.H)
        if (info != 0).any():
            c = int(torch.nonzero(info)[0])
            raise ValueError(
                f"precision of task {task_of[c]}, component {c - task_of.index(task_of[c])} is not positive definite"
            )
        self.half_logdet = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1).to(torch.float64)
        self.Htheta = torch.einsum("cij,cj->ci", self.H, self.theta)
        self.task_of = torch.tensor(task_of)
        self.T = len(means)
        self.log_pi = _mixture_logweights(weights, means)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """(g, C): log π_c + ½ log det H_c − ½ (x − θ_c)ᵀ H_c (x − θ_c) for (g, P) points x."""
        q = torch.empty(x.shape[0], len(self.theta), dtype=torch.float64)
        for c in range(len(self.theta)):
            d = x - self.theta[c]
            q[:, c] = ((d @ self.H[c]) * d).sum(-1).to(torch.float64)
        return self.log_pi + self.half_logdet - 0.5 * q

    def solve(self, w: torch.Tensor, alpha: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(g, P) θ̂ = (Σ_c w_c H_c)⁻¹ Σ_c w_c H_c θ_c for (g, C) weights w, by Cholesky; ``rows``: the
        (g,) rows of the (G, T) grid ``alpha`` these systems belong to (for errors)."""
        wd = w.to(self.H.dtype)
        A = torch.einsum("gc,cij->gij", wd, self.H)
        b = (wd @ self.Htheta).unsqueeze(-1)
        L, info = torch.linalg.cholesky_ex(A)
        if (info != 0).any():
            g = int(rows[int(torch.nonzero(info)[0])])
            raise ValueError(f"combined precision Σ r α H is not positive definite at α row {g}: {alpha[g].tolist()}")
        return torch.cholesky_solve(b, L).squeeze(-1)

    def task_precisions(self) -> torch.Tensor:
        """(T, P, P) Σ_k π_tk H_tk: the combined precision at responsibilities π is Σ_t α_t of these."""
        pi = self.log_pi.exp().to(self.H.dtype)
        parts = [torch.einsum("c,cij->ij", pi[self.task_of == t], self.H[self.task_of == t]) for t in range(self.T)]
        return torch.stack(parts)


@register(
    "mixture_full",
    posterior="mixture_full",
    options=MixtureFullOptions,
    dtype=torch.float32,
    check=lambda o, T: _check_em_options(o),
)
@torch.no_grad()
def mixture_weighted_full(
    means: Sequence[Sequence[torch.Tensor]],
    precisions: Sequence[Sequence[torch.Tensor]],
    alpha,
    *,
    weights: Sequence[Sequence[float]] | None = None,
    options: MixtureFullOptions | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
):
    """Algorithm 1 with full precisions: the EM fixed point of Π_t (Σ_k π_tk N(θ_tk, H_tk⁻¹))^{α_t}.

    ``means[t][k]`` is a flat (P,) tensor and ``precisions[t][k]`` a symmetric positive definite
    (P, P) matrix; ``weights[t]`` the learned π_tk (default uniform). θ̂ starts at the Hessian-
    weighted merge of all components with responsibilities π (iteration 0); each of
    ``options.iterations`` EM steps sets r_tk ∝ π_tk N(θ̂ | θ_tk, H_tk⁻¹) per task, from
    log-densities (½ log det H_tk included), then θ̂ = (Σ_tk r_tk α_t H_tk)⁻¹ Σ_tk r_tk α_t H_tk θ_tk.
    Each step cannot decrease :func:`mixture_full_objective` (it maximises Jensen's lower bound at
    the current r). With K = 1 everywhere this is :func:`hessian_weighted_full`. ``callback(i,
    θ̂)`` sees every iterate ((G, P)). With ``options.tol`` each α stops after the step in which
    none of its responsibilities moved by more than ``tol``.

    ``options.solver="cholesky"`` factorises every α's system at every step, in blocks of at most
    ``max_batch_bytes`` of (P, P) systems. ``"pcg"`` solves all α at once by conjugate gradients
    to ``pcg_tol``, each step started at the previous iterate: a task's components have similar
    precisions, so Σ_tk r_tk α_t H_tk stays close to Σ_t α_t H̄_t (H̄_t = Σ_k π_tk H_tk), and the
    inverse of that matrix at the nearest point of a grid of spacing ``anchor_spacing``
    preconditions every step (:class:`~varmerge.merging.kernels.AnchorPreconditioner`, at most 21
    factorisations for three tasks at 0.2). A CG product costs C matrix products batched over the
    α rows still iterating.

    ``options.start_spacing``: first run EM on the simplex grid of that spacing, then start each
    α's EM from the responsibilities at its nearest anchor's fixed point instead of π (neighbouring
    α have nearby fixed points, so with ``tol`` most α stop after a step or two). The objective
    can have several local maxima; a start from a neighbour's solution may end in another one than
    the start from π (a continuation along the grid).
    """
    opts = options if options is not None else MixtureFullOptions()
    _check_em_options(opts)
    mix = _FullMixture(means, precisions, weights)
    a, batched = check_alpha(alpha, mix.T)
    em = _MixtureEM(mix, opts.iterations, opts.tol, opts.max_batch_bytes)
    pcg = opts.solver == "pcg"
    solve = em.run_pcg if pcg else em.run
    extra = {"pcg_tol": _pcg_tol(opts.pcg_tol, mix.H.dtype), "anchor_spacing": opts.anchor_spacing} if pcg else {}
    start = None
    if opts.start_spacing is not None:  # EM on a coarse grid first; every α starts at its nearest anchor
        from varmerge.grid import simplex_grid

        anchors = simplex_grid(mix.T, opts.start_spacing).to(a.dtype)
        start = solve(anchors, **extra)[torch.cdist(a, anchors).argmin(1)]
    each = None if callback is None else (lambda i, x: callback(i, x if batched else x[0]))
    x = solve(a, start, each, **extra)
    return x if batched else x[0]


def _check_em_options(opts: MixtureFullOptions) -> None:
    _check_iterations(opts.iterations)
    if opts.solver not in ("cholesky", "pcg"):
        raise ValueError(f"solver must be 'cholesky' or 'pcg', got {opts.solver!r}")
    for name, value in (("anchor_spacing", opts.anchor_spacing), ("start_spacing", opts.start_spacing)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")


class _MixtureEM:
    """The EM iteration of :func:`mixture_weighted_full`; with ``tol`` each row stops after the
    step in which none of its responsibilities moved by more than ``tol``, so a row's result does
    not depend on the rows it is batched with."""

    def __init__(self, mix: _FullMixture, iterations: int, tol, max_batch_bytes: int):
        self.mix, self.iterations, self.tol = mix, iterations, tol
        self.per = max(1, int(max_batch_bytes // max(mix.P * mix.P * mix.theta.element_size(), 1)))

    def _first(self, a: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        """(G, C) responsibilities of iteration 0: π, or those at the points ``start``."""
        mix = self.mix
        if start is None:
            return _responsibilities(mix.log_pi.expand(a.shape[0], -1).clone(), mix.task_of, mix.T)
        return _responsibilities(mix.log_joint(start), mix.task_of, mix.T)

    def _steps(self, a, resp, theta, solve, keep) -> None:
        """EM steps 1..iterations on (G, C) ``resp`` and (G, P) ``theta`` in place; ``solve(rows,
        w)`` gives θ̂ of the (g,) ``rows`` for their (g, C) weights α_t r_tk."""
        mix = self.mix
        alpha_c = a[:, mix.task_of]  # (G, C): α_t of each component's task
        active = torch.arange(a.shape[0])  # the rows still iterating: each stops on its own
        for i in range(1, self.iterations + 1):
            if len(active) == 0:
                for rest in range(i, self.iterations + 1):
                    keep(rest, theta)
                return
            sel = slice(None) if len(active) == a.shape[0] else active  # no copies while all iterate
            new = _responsibilities(mix.log_joint(theta[sel]), mix.task_of, mix.T)
            moved = (new - resp[sel]).abs().amax(1)
            resp[sel] = new
            theta[sel] = solve(active, alpha_c[sel] * new)
            keep(i, theta)
            if self.tol is not None:
                active = active[moved > self.tol]

    @staticmethod
    def _keeper(callback):
        iterates: list[list[torch.Tensor]] = []  # kept only for a callback

        def keep(i: int, theta: torch.Tensor) -> None:
            if callback is not None:
                while len(iterates) <= i:
                    iterates.append([])
                iterates[i].append(theta.clone())  # theta is updated in place

        def flush() -> None:
            if callback is not None:
                for i, parts in enumerate(iterates):
                    callback(i, torch.cat(parts))

        return keep, flush

    def run(self, a: torch.Tensor, start: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """(G, P) fixed points for (G, T) α, refactorising every step in blocks of α rows;
        ``start`` (G, P): first responsibilities at these points instead of π."""
        mix = self.mix
        keep, flush = self._keeper(callback)
        outs = []
        for lo in range(0, a.shape[0], self.per):
            ab = a[lo : lo + self.per]
            rows = torch.arange(lo, lo + ab.shape[0])
            resp = self._first(ab, None if start is None else start[lo : lo + self.per])
            theta = mix.solve(ab[:, mix.task_of] * resp, a, rows)
            keep(0, theta)
            self._steps(ab, resp, theta, lambda act, w, rows=rows: mix.solve(w, a, rows[act]), keep)
            outs.append(theta)
        flush()
        return torch.cat(outs)

    def run_pcg(
        self, a: torch.Tensor, start=None, callback=None, *, pcg_tol: float, anchor_spacing: float
    ) -> torch.Tensor:
        """The same fixed points, every system solved by CG (see :func:`mixture_weighted_full`)."""
        mix = self.mix
        dt = mix.H.dtype
        keep, flush = self._keeper(callback)
        Hbar = mix.task_precisions()
        precond = AnchorPreconditioner(Hbar, a.to(dt), spacing=anchor_spacing)

        def cg(matvec, pre, b, x0):
            x, _, unconverged = pcg(matvec, pre, b, x0, tol=pcg_tol, max_iter=10 * mix.P)
            if unconverged:
                raise ValueError(
                    f"mixture_full: CG did not reach pcg_tol={pcg_tol} for {unconverged} α rows; use solver: cholesky"
                )
            return x

        resp = self._first(a, start)
        w = (a[:, mix.task_of] * resp).to(dt)
        rows = torch.arange(a.shape[0])
        # at π the system is the T-term Σ_t α_t H̄_t: T products per CG step instead of C
        matvec = combined_matvec(Hbar, a.to(dt)) if start is None else combined_matvec(mix.H, w)
        b = w @ mix.Htheta
        theta = cg(matvec, precond, b, precond(b, rows))
        keep(0, theta)

        def solve(active, w):
            w = w.to(dt)
            return cg(combined_matvec(mix.H, w), lambda R, r: precond(R, active[r]), w @ mix.Htheta, theta[active])

        self._steps(a, resp, theta, solve, keep)
        flush()
        return theta


@torch.no_grad()
def mixture_full_objective(
    theta: torch.Tensor,
    means: Sequence[Sequence[torch.Tensor]],
    precisions: Sequence[Sequence[torch.Tensor]],
    alpha,
    *,
    weights: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """Σ_t α_t log Σ_k π_tk N(θ | θ_tk, H_tk⁻¹) up to a constant, at (P,) θ with (T,) α, or at (G, P)
    points with (G, T) α; float64."""
    mix = _FullMixture(means, precisions, weights)
    a, batched = check_alpha(alpha, mix.T)
    x = theta if batched else theta.unsqueeze(0)
    lj = mix.log_joint(x.to(mix.theta.dtype))
    per_task = torch.stack([torch.logsumexp(lj[:, mix.task_of == t], dim=1) for t in range(mix.T)], dim=1)
    obj = (a * per_task).sum(1)
    return obj if batched else obj[0]
