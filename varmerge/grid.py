"""Regular grids on the probability simplex (the α of the multitask finetune)."""

from __future__ import annotations

import math

import numpy as np
import torch
from pymoo.util.ref_dirs import get_reference_directions


def _divisions(spacing: float) -> int:
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing)) or not 0 < spacing <= 1:
        raise ValueError(f"α grid spacing must be a number in (0, 1], got {spacing!r}")
    n = round(1.0 / spacing)
    if abs(n * spacing - 1.0) > 1e-9:
        raise ValueError(
            f"α grid spacing {spacing!r} does not divide 1 (1/spacing = {1.0 / spacing:.6g}); "
            "use e.g. 0.5, 0.25, 0.2, 0.1, 0.05 or 0.02"
        )
    return n


def simplex_grid(num_tasks: int, spacing: float) -> torch.Tensor:
    """Every point of the regular simplex grid with the given spacing, vertices included.

    Returns a float64 tensor of shape (G, T) with G = C(n + T - 1, T - 1), n = 1/spacing.
    Rows are non-negative and sum to 1; each grid point appears exactly once. Points come
    from pymoo's Das–Dennis construction and are snapped to multiples of ``spacing``.
    """
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool):
        raise ValueError(f"num_tasks must be an integer, got {num_tasks!r}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    n = _divisions(spacing)
    if num_tasks == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    dirs = get_reference_directions("das-dennis", int(num_tasks), n_partitions=n)
    counts = np.rint(np.asarray(dirs, dtype=np.float64) * n).astype(np.int64)
    counts = np.unique(counts, axis=0)[::-1]  # deterministic order: lexicographic, e1 first
    grid = torch.from_numpy(counts.copy()).to(torch.float64) / n
    return grid


def grid_size(num_tasks: int, spacing: float) -> int:
    """Number of points of :func:`simplex_grid` without building it."""
    n = _divisions(spacing)
    return math.comb(n + num_tasks - 1, num_tasks - 1)
