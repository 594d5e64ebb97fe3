import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varmerge import pareto


def brute_mask(s, maximize=True):
    s = s if maximize else -s
    n = len(s)
    keep = np.ones(n, bool)
    for i in range(n):
        for j in range(n):
            if np.all(s[j] >= s[i]) and np.any(s[j] > s[i]):
                keep[i] = False
                break
    return keep


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), T=st.integers(2, 4), seed=st.integers(0, 10**6), maximize=st.booleans())
def test_pareto_mask_matches_brute_force(n, T, seed, maximize):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=(n, T)).astype(float)  # ties and duplicates on purpose
    got = pareto.pareto_mask(torch.from_numpy(s), maximize=maximize).numpy()
    assert (got == brute_mask(s, maximize)).all()


def brute_hv_2d(points, ref):
    pts = sorted((p for p in points if p[0] > ref[0] and p[1] > ref[1]), key=lambda p: -p[0])
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 30))
def test_hypervolume_2d_matches_sweep(seed, n):
    s = np.random.default_rng(seed).random((n, 2))
    assert pareto.hypervolume(s, [0.0, 0.0]) == pytest.approx(brute_hv_2d(s, (0.0, 0.0)), abs=1e-12)
    # minimisation view of the same front
    assert pareto.hypervolume(-s, [0.0, 0.0], maximize=False) == pytest.approx(brute_hv_2d(s, (0.0, 0.0)), abs=1e-12)


def test_hypervolume_3d_box():
    assert pareto.hypervolume([[0.5, 0.5, 0.5]], 0.0) == pytest.approx(0.125)


def test_igd_plus_zero_on_reference_and_positive_below():
    ref = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    assert pareto.igd_plus(ref, ref) == pytest.approx(0.0)
    worse = ref - 0.1
    # IGD+ for maximisation: each reference point is dominated by 0.1 in both coordinates
    assert pareto.igd_plus(worse, ref) == pytest.approx(np.sqrt(0.02))


def test_best_alpha_topk_distinct():
    alphas = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.8], [0.8, 0.8], [0.2, 0.7]])
    idx, a = pareto.best_alpha(alphas, scores, k=2)
    assert idx.tolist() == [1, 0]
    assert a.tolist() == [[0.5, 0.5], [1.0, 0.0]]


def test_select_alpha_constraints():
    alphas = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([[0.95, 0.1], [0.7, 0.8], [0.2, 0.99]])
    idx, _ = pareto.select_alpha(alphas, scores, constraints=[(1, ">=", 0.9)])
    assert idx.tolist() == [2]
    with pytest.raises(ValueError, match="no α on the grid satisfies.*best reached 0.99"):
        pareto.select_alpha(alphas, scores, constraints=[(1, ">=", 0.995)])
    with pytest.raises(ValueError, match="task 5"):
        pareto.select_alpha(alphas, scores, constraints=[(5, ">=", 0.1)])


def test_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        pareto.pareto_mask([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="non-empty"):
        pareto.hypervolume(np.zeros((0, 2)), [0, 0])
    with pytest.raises(ValueError, match="reference point"):
        pareto.hypervolume([[0.5, 0.5]], [0, 0, 0])
