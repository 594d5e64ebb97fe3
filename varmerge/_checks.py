"""Input validation shared by the merging rules. Every failure is a ValueError naming the culprit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

ALPHA_TOLERANCE = 1e-6


def check_alpha(alpha, num_tasks: int) -> tuple[torch.Tensor, bool]:
    """Validate α and return it as a float64 (G, T) tensor plus whether it was batched.

    Accepts a (T,) vector (one weighting) or a (G, T) batch. Every row must be finite,
    non-negative and sum to 1 within :data:`ALPHA_TOLERANCE`.
    """
    if isinstance(alpha, torch.Tensor):
        a = alpha.detach().to("cpu", torch.float64)
    else:
        try:
            a = torch.as_tensor(alpha, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"α must be a (T,) or (G, T) array of numbers, got {alpha!r}") from exc
    if a.ndim not in (1, 2):
        raise ValueError(f"α must have shape (T,) or (G, T); got shape {tuple(a.shape)}")
    batched = a.ndim == 2
    a2 = a if batched else a.unsqueeze(0)
    if a2.shape[0] == 0:
        raise ValueError("α batch is empty (G = 0)")
    if a2.shape[1] != num_tasks:
        raise ValueError(f"α has {a2.shape[1]} entries per row but there are {num_tasks} tasks")
    if not torch.isfinite(a2).all():
        bad = torch.nonzero(~torch.isfinite(a2))[0].tolist()
        raise ValueError(f"α contains a non-finite value at index {bad}: {a2[tuple(bad)].item()}")
    if (a2 < 0).any():
        bad = torch.nonzero(a2 < 0)[0].tolist()
        raise ValueError(f"α is off the simplex: negative entry {a2[tuple(bad)].item():.6g} at index {bad}")
    sums = a2.sum(dim=1)
    off = (sums - 1.0).abs() > ALPHA_TOLERANCE
    if off.any():
        row = int(torch.nonzero(off)[0])
        raise ValueError(
            f"α is off the simplex: row {row} sums to {sums[row].item():.9g}, not 1 "
            f"(tolerance {ALPHA_TOLERANCE:g}): {a2[row].tolist()}"
        )
    return a2, batched


def check_state_dicts(dicts: Sequence[Mapping[str, torch.Tensor]], what: str = "means", reference=None) -> list[str]:
    """All dicts share keys, shapes and a floating dtype (with ``reference`` if given).

    Returns the common key list in the first dict's order.
    """
    if isinstance(dicts, Mapping):
        raise ValueError(f"{what} must be a sequence of state dicts (one per task), got one mapping")
    if len(dicts) == 0:
        raise ValueError(f"{what} is empty: need at least one state dict")
    ref = dicts[0] if reference is None else reference
    if not isinstance(ref, Mapping) or len(ref) == 0:
        raise ValueError(f"{what}[0] must be a non-empty mapping of parameter name to tensor")
    keys = list(ref.keys())
    key_set = set(keys)
    for i, d in enumerate(dicts):
        if not isinstance(d, Mapping):
            raise ValueError(f"{what}[{i}] is a {type(d).__name__}, not a mapping name -> tensor")
        missing = [k for k in keys if k not in d]
        extra = [k for k in d if k not in key_set]
        if missing or extra:
            raise ValueError(f"{what}[{i}] keys do not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for k in keys:
            t, r = d[k], ref[k]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{what}[{i}][{k!r}] is a {type(t).__name__}, not a tensor")
            if t.shape != r.shape:
                raise ValueError(f"{what}[{i}][{k!r}] has shape {tuple(t.shape)}, expected {tuple(r.shape)}")
            if t.dtype != r.dtype:
                raise ValueError(f"{what}[{i}][{k!r}] has dtype {t.dtype}, expected {r.dtype}")
            if not t.is_floating_point():
                raise ValueError(f"{what}[{i}][{k!r}] has non-floating dtype {t.dtype}")
    return keys


def check_precisions(
    precisions: Sequence[Mapping[str, torch.Tensor]],
    means: Sequence[Mapping[str, torch.Tensor]],
    what: str = "precisions",
) -> None:
    """Precisions match the means' keys/shapes/dtypes and are finite and non-negative."""
    if len(precisions) != len(means):
        raise ValueError(f"got {len(means)} means but {len(precisions)} {what}")
    check_state_dicts(precisions, what, reference=means[0])
    for i, d in enumerate(precisions):
        for k, t in d.items():
            check_precision_tensor(t, f"{what}[{i}][{k!r}]")


def check_precision_tensor(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())  # one pass; NaN propagates into both
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        n = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {n} non-finite value(s) (NaN/Inf); a precision must be finite")
    if lo < 0:
        raise ValueError(f"{name} has negative entries (min {lo.item():.6g}); precisions must be >= 0")
