"""The chunked-merge machinery every rule of :mod:`varmerge.merging` shares (internal API).

A rule validates its inputs, then describes one parameter at a time: ``sources(key)`` lists the
flat tensors it reads (an (n,) view of θ0, or a lazily stacked (T, n) :class:`LazyStack` of the
tasks) and a ``kernel`` computes a (G, m) block of the merged tensor from (T, m) / (m,) slices.
:func:`chunked_merge` cuts every parameter into cache-sized chunks, so a (G, T) sweep reads each
input once and writes each output once, and handles dtypes (half precision is computed in
float32), preallocated outputs and the batched / single-α return shape (:func:`finish`).

These names are for the rule modules of this package (:mod:`varmerge.merging.gaussian`,
:mod:`varmerge.merging.baselines`); users call the rules through :mod:`varmerge.merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from varmerge._checks import check_state_dicts

__all__ = [
    "CHUNK_TARGET",
    "StateDict",
    "LazyStack",
    "check_base",
    "check_out",
    "chunk_size",
    "chunked_merge",
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


def chunk_size(num_rows: int, chunk_elems: int | None) -> int:
    """Columns per chunk for ``num_rows`` (G) outputs; ``chunk_elems`` overrides (must be >= 1)."""
    if chunk_elems is not None:
        if chunk_elems < 1:
            raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
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
