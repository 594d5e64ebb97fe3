"""The chunked-merge machinery every rule of :mod:`varmerge.merging` shares (internal API).

A rule validates its inputs, then describes one parameter at a time: ``sources(key)`` lists the
flat tensors it reads (an (n,) view of θ0, or a lazily stacked (T, n) :class:`LazyStack` of the
tasks) and a ``kernel`` computes a (G, m) block of the merged tensor from (T, m) / (m,) slices.
:func:`chunked_merge` cuts every parameter into cache-sized chunks, so a (G, T) sweep reads each
input once and writes each output once, and handles dtypes (half precision is computed in
float32), preallocated outputs and the batched / single-α return shape (:func:`finish`).

The full-precision rules also solve by preconditioned conjugate gradients over all α at once
(:func:`pcg`, which computes only the rows still iterating; :func:`combined_matvec`; the shared
:class:`AnchorPreconditioner`).

These names are for the rule modules of this package (:mod:`varmerge.merging.gaussian`,
:mod:`varmerge.merging.baselines`); users call the rules through :mod:`varmerge.merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from varmerge._checks import check_state_dicts

__all__ = [
    "CHUNK_TARGET",
    "AnchorPreconditioner",
    "StateDict",
    "LazyStack",
    "check_base",
    "check_chunk_elems",
    "check_out",
    "chunk_size",
    "chunked_merge",
    "combined_matvec",
    "compute_dtype",
    "finish",
    "flat",
    "solve_spd_rows",
    "stack_rows",
]

StateDict = Mapping[str, torch.Tensor]

#: Target number of (G x chunk) output elements per chunk: temporaries stay in cache.
CHUNK_TARGET = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float32 for half-precision models, else the models' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_chunk_elems(chunk_elems: int | None) -> None:
    if chunk_elems is not None and chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")


def chunk_size(num_rows: int, chunk_elems: int | None) -> int:
    """Columns per chunk for ``num_rows`` (G) outputs; ``chunk_elems`` overrides (must be >= 1)."""
    if chunk_elems is not None:
        check_chunk_elems(chunk_elems)
        return int(chunk_elems)
    return max(4096, CHUNK_TARGET // max(num_rows, 1))


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an (n,) view (a copy only when ``t`` is not contiguous)."""
    return t.reshape(-1)


def finish(out: dict[str, torch.Tensor], batched: bool) -> dict[str, torch.Tensor]:
    """Return (G, ...) tensors for a batched α, the single row's tensors for a (T,) α."""
    if batched:
        return out
    return {k: v[0] for k, v in out.items()}


def check_out(out: Mapping[str, torch.Tensor], keys, ref: StateDict, G: int) -> None:
    """Preallocated outputs: one contiguous (G, *shape) tensor of the models' dtype per key."""
    for k in keys:
        if k not in out:
            raise ValueError(f"out is missing key {k!r}")
        t, want = out[k], (G, *ref[k].shape)
        if tuple(t.shape) != want or t.dtype != ref[k].dtype or not t.is_contiguous():
            raise ValueError(
                f"out[{k!r}] must be a contiguous {want} tensor of dtype {ref[k].dtype}, got {tuple(t.shape)} {t.dtype}"
            )


def check_base(base: StateDict, ref: StateDict, what: str = "base") -> None:
    """θ0 has the models' keys, shapes and dtypes (ValueError naming the first mismatch)."""
    check_state_dicts([base], what, reference=ref)


def solve_spd_rows(
    A: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor, first_row: int, what: str, hint: str
) -> torch.Tensor:
    """``A_g⁻¹ B_g`` (by Cholesky) for a block of α rows: ``A`` is (g, n, n), ``B`` (g, n, k).

    The block holds rows ``first_row, first_row + 1, ...`` of the (G, T) grid ``alpha``. If an
    ``A_g`` is not positive definite, ValueError names the first such row:
    ``"<what> is not positive definite at α row <i>: <α_i> (<hint>)"``.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if (info != 0).any():
        g = int(torch.nonzero(info)[0]) + first_row
        raise ValueError(f"{what} is not positive definite at α row {g}: {alpha[g].tolist()} ({hint})")
    return torch.cholesky_solve(B, L)


def stack_rows(dicts: Sequence[StateDict], key: str) -> torch.Tensor:
    """(T, n) stack of one key across tasks (a copy)."""
    return torch.stack([flat(d[key]) for d in dicts])


class LazyStack:
    """Column slices of a per-task list as (T, m) stacks, without materialising the (T, n) stack.

    ``stack[..., lo:hi]`` returns a fresh (T, hi − lo) tensor: kernels may modify it in place.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = [flat(t) for t in tensors]

    def __getitem__(self, idx):
        # idx is (Ellipsis, slice)
        sl = idx[-1]
        return torch.stack([t[sl] for t in self.tensors])


def chunked_merge(
    keys: Sequence[str],
    ref: StateDict,
    alpha: torch.Tensor,
    batched: bool,
    sources: Callable[[str], Sequence[torch.Tensor]],
    kernel: Callable[..., None],
    chunk_elems: int | None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``kernel(alpha, *source_chunks, out=, scratch=)`` over cache-sized chunks of every key.

    ``sources(key)`` returns flat tensors, (n,) or lazily stacked (T, n); chunks are cut along
    the last dimension. The kernel writes the (G, m) result into ``out`` (a column slice of the
    merged tensor) and may use ``scratch``, a (G, m) buffer; it may modify stacked chunks in
    place (they are fresh copies) but never plain (n,) sources (views of the caller's tensors).
    ``ref`` gives each key's shape, dtype and device; ``out`` optional preallocated outputs.
    """
    G = alpha.shape[0]
    step = chunk_size(G, chunk_elems)
    if out is not None:
        check_out(out, keys, ref, G)
    result: dict[str, torch.Tensor] = {}
    for key in keys:
        r = ref[key]
        cdt = compute_dtype(r.dtype)
        a = alpha.to(device=r.device, dtype=cdt)
        flat_sources = sources(key)
        n = r.numel()
        if out is not None and cdt == r.dtype:
            merged = out[key].view(G, n)
        else:
            merged = torch.empty((G, n), dtype=cdt, device=r.device)
        scratch = torch.empty((G, min(step, n)), dtype=cdt, device=r.device)
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            parts = [s[..., lo:hi].to(cdt) for s in flat_sources]
            kernel(a, *parts, out=merged[:, lo:hi], scratch=scratch[:, : hi - lo])
        if out is not None and cdt != r.dtype:
            out[key].copy_(merged.view(out[key].shape))
        result[key] = out[key] if out is not None else merged.to(r.dtype).reshape((G, *r.shape))
    return finish(result, batched)


class AnchorPreconditioner:
    """The preconditioner of CG on ``B + Σ_t w_gt H_t``: each row g uses the inverse of the
    combined matrix at its nearest *anchor*, a point of the simplex grid of spacing ``spacing``
    over the normalised weights, scaled to the mean weight sum of the rows near it. One inverse per
    anchor in use, shared by all its rows, so applying it is one matrix product per anchor.

    ``H`` is (T, P, P) symmetric positive definite, ``weights`` (G, T) non-negative, ``base`` an
    optional (P, P) B. A matrix of the same combination with other, nearby weights (a mixture's
    components of one task, weighted by their responsibilities) is preconditioned as well.
    """

    def __init__(self, H: torch.Tensor, weights: torch.Tensor, *, spacing: float, base: torch.Tensor | None = None):
        from varmerge.grid import simplex_grid

        T, P, _ = H.shape
        dt = H.dtype
        w = weights.to(dt)
        scale = w.sum(1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        anchors = simplex_grid(T, spacing).to(dt)
        self.nearest = torch.cdist(w / scale, anchors, p=1).argmin(1)  # (G,)
        B = torch.zeros(P, P, dtype=dt) if base is None else base.to(dt)
        self.inverse = {}
        for a in torch.unique(self.nearest).tolist():
            s = float(scale[self.nearest == a].mean())  # the anchor's matrix at the mean scale of its rows
            L, info = torch.linalg.cholesky_ex(B + s * torch.einsum("t,tij->ij", anchors[a], H))
            if int(info) != 0:
                raise ValueError(f"the combined precision at anchor α {anchors[a].tolist()} is not positive definite")
            self.inverse[a] = torch.cholesky_inverse(L)

    def __call__(self, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """M⁻¹ r for the (g, P) residuals ``R`` of the (g,) rows ``rows``."""
        Z = torch.empty_like(R)
        near = self.nearest[rows]
        for a in torch.unique(near).tolist():
            idx = torch.nonzero(near == a).flatten()
            Z[idx] = R[idx] @ self.inverse[a]  # symmetric
        return Z


def combined_matvec(H: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None = None):
    """``(V, rows) -> V_g (B + Σ_j w_gj H_j)`` for (g, P) vectors of the (g,) ``rows`` of the
    (G, J) ``weights``, with (J, P, P) symmetric ``H``: J matrix products batched over the rows,
    skipping a term whose weight is zero on all of them (exact)."""

    def matvec(V: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        w = weights[rows]
        out = torch.zeros_like(V) if base is None else V @ base
        for j in range(H.shape[0]):
            if bool(w[:, j].any()):
                out += w[:, j, None] * (V @ H[j])
        return out

    return matvec


@torch.no_grad()
def solve_combined_pcg(
    H: torch.Tensor,
    weights: torch.Tensor,
    b: torch.Tensor,
    *,
    anchor_spacing: float = 0.2,
    tol: float = 1e-7,
    max_iter: int = 200,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Solve ``(B + Σ_t w_gt H_t) x_g = b_g`` for every row g by preconditioned conjugate gradients.

    ``H`` is (T, P, P) symmetric positive definite, ``weights`` (G, T) non-negative, ``b`` (G, P),
    ``base`` an optional (P, P) B. The structure is used three ways: a matrix–vector product is T
    products with the H_t, batched over all rows (BLAS-3); the preconditioner of a row is the
    combined matrix at its nearest anchor (:class:`AnchorPreconditioner`), shared by every row near
    it; the start is that preconditioner applied to the row's own right-hand side. Stops per row
    at relative residual ``tol``. Returns ``(x (G, P), info)`` with ``info``: ``anchors``,
    ``iterations`` (max over rows), ``mean_iterations``.
    """
    w = weights.to(H.dtype)
    precond = AnchorPreconditioner(H, w, spacing=anchor_spacing, base=base)
    rows = torch.arange(b.shape[0])
    x, iters, unconverged = pcg(combined_matvec(H, w, base), precond, b, precond(b, rows), tol=tol, max_iter=max_iter)
    info = {
        "anchors": len(precond.inverse),
        "iterations": int(iters.max()),
        "mean_iterations": float(iters.double().mean()),
    }
    if unconverged:
        info["unconverged"] = unconverged
    return x, info


@torch.no_grad()
def pcg(matvec, precond, b: torch.Tensor, x0: torch.Tensor, *, tol: float, max_iter: int):
    """Preconditioned conjugate gradients on every row of ``b`` (G, P) at once, from ``x0``.

    ``matvec(V, rows)`` and ``precond(R, rows)`` map the (g, P) vectors of the (g,) row indices
    ``rows`` to (g, P); each row stops at relative residual ``tol``, and only the rows still
    iterating are computed. Returns ``(x, iterations per row, rows not converged after max_iter)``.
    """
    dt = b.dtype
    x = x0.clone()
    rows = torch.arange(b.shape[0])
    r = b - matvec(x, rows)
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(dt).tiny)
    keep = r.norm(dim=1) / bnorm > tol
    rows, r = rows[keep], r[keep]
    iters = torch.zeros(b.shape[0], dtype=torch.long)
    z = precond(r, rows)
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(max_iter):
        if len(rows) == 0:
            break
        Ap = matvec(p, rows)
        step = rz / (p * Ap).sum(1)
        x[rows] += step[:, None] * p
        r -= step[:, None] * Ap
        iters[rows] += 1
        keep = r.norm(dim=1) / bnorm[rows] > tol
        if not bool(keep.all()):  # converged rows leave: later products cover the rest only
            rows, r, p, rz = rows[keep], r[keep], p[keep], rz[keep]
            if len(rows) == 0:
                break
        z = precond(r, rows)
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz)[:, None] * p
        rz = rz_new
    return x, iters, len(rows)
