"""MAP front estimator: surrogate recovery, NSGA front validity, determinism, bad input."""

import numpy as np
import pytest
import torch

from varmerge import map_front as mf
from varmerge import pareto
from varmerge.grid import simplex_grid

F64 = torch.float64


def quadratic_metric(T=3, seed=0):
    """A metric exactly quadratic in α, written with a constant, linear terms and all squares
    (not in the Scheffé basis the surrogate uses), so recovering it tests the reduction too."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(T, generator=g, dtype=F64)
    lin = torch.randn(T, T, generator=g, dtype=F64) * 0.3
    quad = torch.randn(T, T, T, generator=g, dtype=F64) * 0.3

    def f(alpha):
        a = torch.as_tensor(alpha, dtype=F64)
        return c + a @ lin + torch.einsum("ni,tij,nj->nt", a, quad, a)

    return f


def test_design_has_vertices_centroid_midpoints_then_seeded_points():
    d = mf.design_alpha(3, 12, seed=4)
    assert d.shape == (12, 3)
    torch.testing.assert_close(d[:3], torch.eye(3, dtype=F64))
    torch.testing.assert_close(d[3], torch.full((3,), 1 / 3, dtype=F64))
    assert {tuple(r) for r in d[4:7].tolist()} == {(0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)}
    assert (d >= 0).all() and torch.allclose(d.sum(1), torch.ones(12, dtype=F64))
    assert torch.equal(d, mf.design_alpha(3, 12, seed=4))
    assert not torch.equal(d[7:], mf.design_alpha(3, 12, seed=5)[7:])
    assert len(mf.design_alpha(3)) == mf.default_evaluations(3) == 9


@pytest.mark.parametrize("T", [2, 3, 4])
def test_surrogate_recovers_an_exactly_quadratic_metric(T):
    f = quadratic_metric(T, seed=T)
    calls = []

    def evaluate(design):
        calls.append(design.clone())
        return {"accuracy": f(design), "loss": -f(design)}

    grid = simplex_grid(T, 0.1)
    res = mf.map_front(evaluate, grid, seed=0, n_gen=30)
    assert len(calls) == 1 and res.evaluations == len(calls[0]) == mf.default_evaluations(T)
    torch.testing.assert_close(res.predictions["accuracy"], f(grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.predictions["loss"], -f(grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.front_values, f(res.front_alpha), rtol=0, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3"])
def test_front_is_non_dominated_on_the_simplex_and_covers_the_grid_front(algorithm):
    f = quadratic_metric(3, seed=11)
    grid = simplex_grid(3, 0.02)
    res = mf.map_front(f, grid, n_evaluations=10, seed=3, algorithm=algorithm)
    a, v = res.front_alpha, res.front_values
    assert len(a) >= 5
    assert (a >= 0).all() and torch.allclose(a.sum(1), torch.ones(len(a), dtype=F64), atol=1e-12)
    strict = torch.from_numpy(__import__("moocore").is_nondominated(v.numpy(), maximise=True, keep_weakly=False).copy())
    assert strict.all()  # no point dominates another, no duplicates
    # the NSGA front is about as good as the brute-force front of the surrogate on a fine grid
    ref = f(grid).min(0).values - 0.1
    hv_nsga = pareto.hypervolume(v, ref)
    hv_grid = pareto.hypervolume(f(grid), ref)
    assert hv_nsga >= 0.97 * hv_grid


def test_front_of_minimised_metric():
    f = quadratic_metric(3, seed=12)
    grid = simplex_grid(3, 0.05)
    res = mf.map_front(lambda a: {"loss": f(a)}, grid, objective=mf.Objective("loss", maximize=False), seed=1, n_gen=40)
    assert pareto.pareto_mask(-res.front_values).all()


def test_map_is_deterministic_for_a_seed():
    f = quadratic_metric(3, seed=13)
    grid = simplex_grid(3, 0.1)
    one = mf.map_front(f, grid, n_evaluations=11, seed=7, n_gen=40)
    two = mf.map_front(f, grid, n_evaluations=11, seed=7, n_gen=40)
    assert torch.equal(one.design_alpha, two.design_alpha)
    assert torch.equal(one.front_alpha, two.front_alpha)
    assert torch.equal(one.front_values, two.front_values)
    assert torch.equal(one.predictions["accuracy"], two.predictions["accuracy"])
    other = mf.map_front(f, grid, n_evaluations=11, seed=8, n_gen=40)
    assert not torch.equal(one.design_alpha, other.design_alpha)


def test_noisy_metric_is_fitted_by_least_squares():
    f = quadratic_metric(3, seed=14)
    rng = np.random.default_rng(0)
    design = mf.design_alpha(3, 40, seed=2)
    noisy = f(design) + torch.from_numpy(rng.normal(0, 0.01, size=(40, 3)))
    s = mf.QuadraticSurrogate.fit(design, noisy)
    phi = mf.quadratic_features(design).numpy()
    want = np.linalg.lstsq(phi, noisy.numpy(), rcond=None)[0]
    np.testing.assert_allclose(s.coef.numpy(), want, rtol=1e-9, atol=1e-10)


def test_bad_input():
    f = quadratic_metric(3)
    grid = simplex_grid(3, 0.25)
    with pytest.raises(ValueError, match="n_evaluations must be an integer >= 6"):
        mf.map_front(f, grid, n_evaluations=5)
    with pytest.raises(ValueError, match="off the simplex"):
        mf.map_front(f, grid * 2)
    with pytest.raises(ValueError, match="algorithm must be"):
        mf.map_front(f, grid, algorithm="moead")
    with pytest.raises(ValueError, match="pop_size must be an integer >= 2"):
        mf.map_front(f, grid, pop_size=1)
    with pytest.raises(ValueError, match="containing 'accuracy'"):
        mf.map_front(lambda a: {"loss": f(a)}, grid)
    with pytest.raises(ValueError, match="expected \\(9, K\\)"):
        mf.map_front(lambda a: f(a)[:3], grid)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mf.map_front(lambda a: f(a) * float("nan"), grid)
    with pytest.raises(ValueError, match="tasks >= 2"):
        mf.map_front(lambda a: a, torch.ones(1, 1, dtype=F64))
    degenerate = torch.tensor([[1.0, 0, 0]] * 6 + [[0, 1.0, 0]], dtype=F64)
    with pytest.raises(ValueError, match="determine only"):
        mf.QuadraticSurrogate.fit(degenerate, torch.zeros(7, 3, dtype=F64))
