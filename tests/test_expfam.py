import pytest
import torch
from helpers import random_models
from scipy.optimize import minimize_scalar

from varmerge import expfam, merge
from varmerge.grid import simplex_grid

F64 = torch.float64


def test_gaussian_closed_form_equals_hessian_weighted():
    means, precs = random_models(3, seed=3, shapes={"w": (9,)})
    grid = simplex_grid(3, 0.1)
    mode = expfam.merged_mode(expfam.Gaussian(), [(m["w"], p["w"]) for m, p in zip(means, precs)], grid)
    torch.testing.assert_close(mode, merge.hessian_weighted(means, precs, grid)["w"])


def test_full_gaussian_closed_form_equals_full_merge():
    g = torch.Generator().manual_seed(1)
    ms, Hs = [], []
    for _ in range(2):
        R = torch.randn(4, 4, generator=g, dtype=F64)
        Hs.append(R @ R.T + torch.eye(4, dtype=F64))
        ms.append(torch.randn(4, generator=g, dtype=F64))
    alpha = torch.tensor([0.25, 0.75], dtype=F64)
    got = expfam.merged_mode(expfam.Gaussian(), list(zip(ms, Hs)), alpha)
    torch.testing.assert_close(got, merge.hessian_weighted_full(ms, Hs, alpha))


def test_beta_bernoulli_mode_matches_weighted_map():
    """Mode of Π_t Beta(a_t, b_t)^{α_t} in log-odds, checked against a numerical maximiser."""
    fam = expfam.BetaBernoulli()
    flips = [torch.tensor([1, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 0, 0, 0, 0]), torch.tensor([1, 0])]
    posts = [fam.posterior(f, 2.0, 2.0) for f in flips]
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    theta = expfam.merged_mode(fam, posts, alpha)

    def neg_log_p(th):  # −Σ α_t log Beta(π(θ); a_t, b_t), in θ with the Jacobian-free form of App. A.3
        p = 1 / (1 + torch.exp(-torch.tensor(th, dtype=F64)))
        return -float(
            sum(a * ((pa - 1) * torch.log(p) + (pb - 1) * torch.log1p(-p)) for a, (pa, pb) in zip(alpha, posts))
        )

    best = minimize_scalar(neg_log_p, bounds=(-10, 10), method="bounded", options={"xatol": 1e-10}).x
    assert abs(theta.item() - best) < 1e-6
    a_al = sum(a * pa for a, (pa, _) in zip(alpha, posts))
    b_al = sum(a * pb for a, (_, pb) in zip(alpha, posts))
    pi = fam.mode_probability(*fam.natural(a_al, b_al))
    torch.testing.assert_close(pi, (a_al - 1) / (a_al + b_al - 2))
    torch.testing.assert_close(torch.sigmoid(theta), pi)


def test_beta_bernoulli_batched_and_vertices():
    fam = expfam.BetaBernoulli()
    posts = [(torch.tensor(3.0), torch.tensor(5.0)), (torch.tensor(7.0), torch.tensor(2.0))]
    grid = simplex_grid(2, 0.25)
    modes = expfam.merged_mode(fam, posts, grid)
    assert modes.shape == (5,)
    torch.testing.assert_close(torch.sigmoid(modes[0]), torch.tensor((3 - 1) / (3 + 5 - 2), dtype=F64))
    torch.testing.assert_close(torch.sigmoid(modes[-1]), torch.tensor((7 - 1) / (7 + 2 - 2), dtype=F64))


def test_expfam_bad_inputs():
    with pytest.raises(ValueError, match="positive"):
        expfam.BetaBernoulli().natural(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="no interior mode"):
        expfam.merged_mode(expfam.BetaBernoulli(), [(torch.tensor(0.5), torch.tensor(3.0))], [1.0])
    with pytest.raises(ValueError, match="zero tasks"):
        expfam.aggregate([], [])
    with pytest.raises(ValueError, match="off the simplex"):
        expfam.aggregate([(torch.ones(2),), (torch.ones(2),)], [0.7, 0.7])
    with pytest.raises(ValueError, match="fits neither"):
        expfam.Gaussian().natural(torch.ones(3), torch.ones(2))
