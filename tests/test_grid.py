import itertools
import math

import pytest
import torch

from varmerge.grid import grid_size, simplex_grid


@pytest.mark.parametrize("T,spacing", [(2, 0.5), (2, 0.1), (3, 0.1), (3, 0.02), (4, 0.25), (5, 0.2)])
def test_grid_is_every_regular_point_once(T, spacing):
    g = simplex_grid(T, spacing)
    n = round(1 / spacing)
    assert g.dtype == torch.float64 and g.shape == (math.comb(n + T - 1, T - 1), T)
    assert g.shape[0] == grid_size(T, spacing)
    assert torch.allclose(g.sum(1), torch.ones(len(g), dtype=torch.float64), atol=1e-12)
    assert (g >= 0).all()
    counts = {tuple(int(round(v * n)) for v in row) for row in g.tolist()}
    brute = {c for c in itertools.product(range(n + 1), repeat=T) if sum(c) == n}
    assert counts == brute and len(counts) == g.shape[0]
    for t in range(T):  # vertices included
        e = torch.zeros(T, dtype=torch.float64)
        e[t] = 1
        assert (g == e).all(1).any()


def test_single_task_grid():
    assert simplex_grid(1, 0.1).tolist() == [[1.0]]


@pytest.mark.parametrize("spacing", [0.3, 0.0, -0.1, 1.5, float("nan"), 0.07])
def test_spacing_must_divide_one(spacing):
    with pytest.raises(ValueError, match="spacing"):
        simplex_grid(3, spacing)


def test_bad_task_count():
    with pytest.raises(ValueError, match="num_tasks"):
        simplex_grid(0, 0.1)
