"""Merging rules against independent float64 oracles, properties, and bad input."""

import numpy as np
import pytest
import torch
from helpers import random_models
from hypothesis import given, settings
from hypothesis import strategies as st

from varmerge import merge
from varmerge.grid import simplex_grid

F64 = torch.float64


def flat(sd, keys):
    return torch.cat([sd[k].reshape(-1) for k in keys])


def dense_hessian_merge(means, precs, alpha):
    """Oracle: build dense diag matrices and solve the linear system with numpy."""
    keys = list(means[0])
    A = sum(a * np.diag(flat(p, keys).numpy()) for a, p in zip(alpha.tolist(), precs))
    b = sum(a * np.diag(flat(p, keys).numpy()) @ flat(m, keys).numpy() for a, m, p in zip(alpha.tolist(), means, precs))
    return torch.from_numpy(np.linalg.solve(A, b))


def test_hessian_diag_matches_dense_solve():
    means, precs = random_models(3, seed=1)
    for alpha in simplex_grid(3, 0.25):
        if (alpha == 0).sum() == 2:
            continue
        got = merge.hessian_weighted(means, precs, alpha)
        want = dense_hessian_merge(means, precs, alpha)
        torch.testing.assert_close(flat(got, list(means[0])), want, rtol=1e-12, atol=1e-12)


def test_hessian_prior_form_matches_formula_and_dense_solve():
    means, precs = random_models(3, seed=2)
    base, h0 = random_models(1, seed=3)
    base, h0 = base[0], h0[0]
    keys = list(base)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    got = flat(merge.hessian_weighted(means, precs, alpha, base=base, base_precision=h0), keys)
    H0 = np.diag(flat(h0, keys).numpy())
    th0 = flat(base, keys).numpy()
    A = H0 + sum(a * np.diag(flat(p, keys).numpy()) for a, p in zip(alpha.tolist(), precs))
    b = sum(
        a * (H0 + np.diag(flat(p, keys).numpy())) @ (flat(m, keys).numpy() - th0)
        for a, m, p in zip(alpha.tolist(), means, precs)
    )
    torch.testing.assert_close(got, torch.from_numpy(th0 + np.linalg.solve(A, b)), rtol=1e-12, atol=1e-12)


def test_two_gaussian_product_closed_form_full():
    """Full-Gaussian merge: the gradient of Σ α_t log N(θ|m_t, H_t⁻¹) vanishes at the result."""
    g = torch.Generator().manual_seed(0)
    P = 6
    means, precs = [], []
    for _ in range(2):
        R = torch.randn(P, P, generator=g, dtype=F64)
        precs.append(R @ R.T + 0.5 * torch.eye(P, dtype=F64))
        means.append(torch.randn(P, generator=g, dtype=F64))
    alpha = torch.tensor([0.3, 0.7], dtype=F64)
    got = merge.hessian_weighted_full(means, precs, alpha)
    want = np.linalg.solve(
        0.3 * precs[0].numpy() + 0.7 * precs[1].numpy(),
        0.3 * precs[0].numpy() @ means[0].numpy() + 0.7 * precs[1].numpy() @ means[1].numpy(),
    )
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-10)
    theta = got.clone().requires_grad_(True)
    obj = sum(-0.5 * a * (theta - m) @ H @ (theta - m) for a, m, H in zip(alpha, means, precs))
    (grad,) = torch.autograd.grad(obj, theta)
    assert grad.abs().max() < 1e-10


def test_full_with_diagonal_matrices_equals_diagonal_merge():
    means, precs = random_models(3, seed=4, shapes={"w": (7,)})
    grid = simplex_grid(3, 0.1)
    full = merge.hessian_weighted_full([m["w"] for m in means], [torch.diag(p["w"]) for p in precs], grid)
    diag = merge.hessian_weighted(means, precs, grid)["w"]
    torch.testing.assert_close(full, diag, rtol=1e-12, atol=1e-12)
    # chunked solve gives the same answer
    small = merge.hessian_weighted_full(
        [m["w"] for m in means],
        [torch.diag(p["w"]) for p in precs],
        grid,
        options=merge.HessianFullOptions(max_batch_bytes=1),
    )
    torch.testing.assert_close(small, full)


@pytest.mark.parametrize("method", ["simple", "task_arithmetic", "hessian", "hessian_prior", "mixture"])
def test_batched_alpha_equals_row_by_row(method):
    means, precs = random_models(3, seed=5, dtype=torch.float32)
    base = random_models(1, seed=6, dtype=torch.float32)[0][0]
    grid = simplex_grid(3, 0.1)
    mix_m = [[m, {k: v + 0.3 for k, v in m.items()}] for m in means]
    mix_p = [[p, {k: v * 2 for k, v in p.items()}] for p in precs]

    def run(alpha, chunk=None):
        if method == "simple":
            return merge.simple_average(means, alpha, chunk_elems=chunk)
        if method == "task_arithmetic":
            return merge.task_arithmetic(base, means, alpha, scale=0.8, chunk_elems=chunk)
        if method == "hessian":
            return merge.hessian_weighted(means, precs, alpha, chunk_elems=chunk)
        if method == "hessian_prior":
            return merge.hessian_weighted(means, precs, alpha, base=base, base_precision=precs[0], chunk_elems=chunk)
        return merge.mixture_weighted(
            mix_m, mix_p, alpha, options=merge.MixtureOptions(iterations=4, chunk_elems=chunk)
        )

    batched = run(grid)
    tiny_chunks = run(grid, chunk=3)
    for k in means[0]:
        assert batched[k].shape == (len(grid), *means[0][k].shape)
        assert batched[k].dtype == torch.float32
        torch.testing.assert_close(tiny_chunks[k], batched[k], rtol=1e-5, atol=1e-5)
    for g in [0, 7, 33, len(grid) - 1]:
        row = run(grid[g])
        for k in means[0]:
            torch.testing.assert_close(row[k], batched[k][g], rtol=1e-5, atol=1e-6)


def test_simple_and_task_arithmetic_formulas():
    means, _ = random_models(3, seed=7)
    base = random_models(1, seed=8)[0][0]
    alpha = torch.tensor([0.1, 0.6, 0.3], dtype=F64)
    s = merge.simple_average(means, alpha)
    ta = merge.task_arithmetic(base, means, alpha, scale=0.5)
    for k in base:
        want_s = sum(a * m[k] for a, m in zip(alpha, means))
        torch.testing.assert_close(s[k], want_s)
        torch.testing.assert_close(ta[k], base[k] + 0.5 * sum(a * (m[k] - base[k]) for a, m in zip(alpha, means)))


def test_k1_mixture_equals_hessian_weighted():
    means, precs = random_models(3, seed=9)
    grid = simplex_grid(3, 0.1)
    mix = merge.mixture_weighted(
        [[m] for m in means], [[p] for p in precs], grid, options=merge.MixtureOptions(iterations=5)
    )
    hw = merge.hessian_weighted(means, precs, grid)
    for k in hw:
        torch.testing.assert_close(mix[k], hw[k], rtol=1e-12, atol=1e-12)


def _mixture_problem(seed=10, T=3, K=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (6,), "b": (2, 3)}
    means = [
        [{k: 2 * torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()} for _ in range(K)] for _ in range(T)
    ]
    precs = [
        [{k: torch.rand(s, generator=g, dtype=F64) * 4 + 0.2 for k, s in shapes.items()} for _ in range(K)]
        for _ in range(T)
    ]
    return means, precs


def test_mixture_em_objective_never_decreases_and_reaches_fixed_point():
    means, precs = _mixture_problem()
    grid = simplex_grid(3, 0.2)
    history = []
    merge.mixture_weighted(
        means,
        precs,
        grid,
        options=merge.MixtureOptions(iterations=60),
        callback=lambda i, th: history.append({k: v.clone() for k, v in th.items()}),
    )
    objs = torch.stack([merge.mixture_objective(th, means, precs, grid) for th in history])
    diffs = objs[1:] - objs[:-1]
    assert (diffs >= -1e-9).all(), diffs.min()
    assert (objs[-1] > objs[0] + 1e-6).any()  # EM did move somewhere
    # fixed point: one more EM step from the final iterate changes nothing
    last = history[-1]
    again = []
    merge.mixture_weighted(
        means,
        precs,
        grid,
        options=merge.MixtureOptions(iterations=61),
        callback=lambda i, th: again.append(th) if i >= 60 else None,
    )
    for k in last:
        torch.testing.assert_close(again[-1][k], last[k], rtol=1e-7, atol=1e-7)


def test_mixture_stationary_point_has_zero_gradient():
    """At the EM fixed point ∇ Σ_t α_t log Σ_k π_k N(θ|θ_tk, H_tk⁻¹) = 0 (autograd oracle)."""
    means, precs = _mixture_problem(seed=11, T=2, K=2)
    alpha = torch.tensor([0.4, 0.6], dtype=F64)
    theta = merge.mixture_weighted(means, precs, alpha, options=merge.MixtureOptions(iterations=300))
    keys = list(theta)
    x = flat(theta, keys).clone().requires_grad_(True)
    obj = 0
    for t in range(2):
        comps = []
        for k in range(2):
            m, h = flat(means[t][k], keys), flat(precs[t][k], keys)
            comps.append(np.log(0.5) + 0.5 * h.log().sum() - 0.5 * (h * (x - m) ** 2).sum())
        obj = obj + alpha[t] * torch.logsumexp(torch.stack(comps), 0)
    (grad,) = torch.autograd.grad(obj, x)
    assert grad.abs().max() < 1e-6


def test_mixture_responsibilities_stable_for_huge_models():
    """Log densities differing by thousands must not under/overflow (logsumexp)."""
    g = torch.Generator().manual_seed(12)
    n = 200_000
    means = [[{"w": torch.randn(n, generator=g) * s} for s in (1.0, 3.0)] for _ in range(2)]
    precs = [[{"w": torch.full((n,), 50.0)} for _ in range(2)] for _ in range(2)]
    out = merge.mixture_weighted(means, precs, simplex_grid(2, 0.25), options=merge.MixtureOptions(iterations=5))
    assert torch.isfinite(out["w"]).all()


def test_mixture_with_unequal_component_counts():
    means, precs = _mixture_problem(seed=13, T=2, K=3)
    means[1], precs[1] = means[1][:1], precs[1][:1]
    out = merge.mixture_weighted(
        means, precs, torch.tensor([0.0, 1.0], dtype=F64), options=merge.MixtureOptions(iterations=3)
    )
    for k in out:  # all weight on a 1-component task returns that component
        torch.testing.assert_close(out[k], means[1][0][k])


# ---------------------------------------------------------------- hypothesis properties
alphas3 = (
    st.lists(st.integers(0, 20), min_size=3, max_size=3)
    .filter(lambda v: sum(v) > 0)
    .map(lambda v: torch.tensor(v, dtype=F64) / sum(v))
)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_alpha_vertex_returns_model_t(t, seed):
    means, precs = random_models(3, seed=seed)
    base = random_models(1, seed=seed + 1)[0][0]
    e = torch.zeros(3, dtype=F64)
    e[t] = 1
    outs = [
        merge.simple_average(means, e),
        merge.task_arithmetic(base, means, e),
        merge.hessian_weighted(means, precs, e),
        merge.hessian_weighted(means, precs, e, base=base, base_precision=precs[(t + 1) % 3]),
        merge.mixture_weighted([[m] for m in means], [[p] for p in precs], e),
    ]
    for out in outs:
        for k in means[t]:
            torch.testing.assert_close(out[k], means[t][k], rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(alpha=alphas3, seed=st.integers(0, 10_000), c=st.floats(0.01, 100))
def test_equal_precisions_reduce_to_averaging(alpha, seed, c):
    means, precs = random_models(3, seed=seed)
    same = [{k: torch.full_like(v, c) for k, v in precs[0].items()} for _ in range(3)]
    hw = merge.hessian_weighted(means, same, alpha)
    avg = merge.simple_average(means, alpha)
    for k in hw:
        torch.testing.assert_close(hw[k], avg[k], rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(alpha=alphas3, seed=st.integers(0, 10_000), perm=st.permutations([0, 1, 2]))
def test_task_permutation_changes_nothing(alpha, seed, perm):
    means, precs = random_models(3, seed=seed)
    pm, pp, pa = [means[i] for i in perm], [precs[i] for i in perm], alpha[list(perm)]
    for f in (
        lambda m, p, a: merge.hessian_weighted(m, p, a),
        lambda m, p, a: merge.simple_average(m, a),
        lambda m, p, a: merge.mixture_weighted(
            [[x, {k: v + 1 for k, v in x.items()}] for x in m],
            [[y, y] for y in p],
            a,
            options=merge.MixtureOptions(iterations=3),
        ),
    ):
        a_out, b_out = f(means, precs, alpha), f(pm, pp, pa)
        for k in a_out:
            torch.testing.assert_close(a_out[k], b_out[k], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- bad input
def test_inputs_are_not_mutated():
    means, precs = random_models(3, seed=14)
    before = [{k: v.clone() for k, v in m.items()} for m in means + precs]
    merge.hessian_weighted(means, precs, simplex_grid(3, 0.5), base=means[0], base_precision=precs[0])
    merge.mixture_weighted([[m] for m in means], [[p] for p in precs], simplex_grid(3, 0.5))
    for b, a in zip(before, means + precs):
        for k in a:
            assert torch.equal(a[k], b[k])


@pytest.mark.parametrize(
    "alpha, match",
    [
        ([0.5, 0.6, -0.1], "negative"),
        ([0.5, 0.4, 0.2], "sums to"),
        ([0.5, 0.5], "2 entries per row but there are 3"),
        ([[[1.0, 0.0, 0.0]]], "shape"),
        ([float("nan"), 0.5, 0.5], "non-finite"),
        (torch.zeros(0, 3), "empty"),
    ],
)
def test_bad_alpha(alpha, match):
    means, precs = random_models(3)
    with pytest.raises(ValueError, match=match):
        merge.hessian_weighted(means, precs, alpha)


def test_alpha_tolerance_is_1e_minus_6():
    means, precs = random_models(3)
    merge.simple_average(means, [0.5, 0.3, 0.2 + 5e-7])
    with pytest.raises(ValueError, match="sums to"):
        merge.simple_average(means, [0.5, 0.3, 0.2 + 5e-6])


def test_mismatched_models_name_the_key():
    means, precs = random_models(3)
    bad = dict(means[1])
    bad.pop("head")
    bad["other"] = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="missing \\['head'\\].*'other'"):
        merge.simple_average([means[0], bad, means[2]], [0.2, 0.3, 0.5])
    wrong_shape = dict(means[2], head=torch.zeros(6, dtype=F64))
    with pytest.raises(ValueError, match="'head'.*shape"):
        merge.hessian_weighted([means[0], means[1], wrong_shape], precs, [0.2, 0.3, 0.5])
    wrong_dtype = {k: v.float() for k, v in means[1].items()}
    with pytest.raises(ValueError, match="dtype"):
        merge.simple_average([means[0], wrong_dtype, means[2]], [0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    "value, match", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (-1.0, "negative")]
)
def test_bad_precisions(value, match):
    means, precs = random_models(3)
    precs[1]["layer.bias"][2] = value
    with pytest.raises(ValueError, match=f"precisions\\[1\\]\\['layer.bias'\\].*{match}"):
        merge.hessian_weighted(means, precs, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=match):
        merge.mixture_weighted([[m] for m in means], [[p] for p in precs], [0.2, 0.3, 0.5])


def test_empty_inputs():
    with pytest.raises(ValueError, match="empty"):
        merge.simple_average([], [])
    with pytest.raises(ValueError, match="non-empty"):
        merge.simple_average([{}, {}], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        merge.mixture_weighted([], [], [1.0])
    with pytest.raises(ValueError, match="no mixture components"):
        merge.mixture_weighted([[]], [[]], [1.0])


def test_base_precision_without_base_is_refused():
    means, precs = random_models(2)
    with pytest.raises(ValueError, match="base_precision"):
        merge.hessian_weighted(means, precs, [0.5, 0.5], base_precision=precs[0])


def test_full_merge_bad_inputs():
    m = [torch.zeros(3, dtype=F64)] * 2
    with pytest.raises(ValueError, match="symmetric"):
        merge.hessian_weighted_full(m, [torch.eye(3, dtype=F64), torch.triu(torch.ones(3, 3, dtype=F64))], [0.5, 0.5])
    with pytest.raises(ValueError, match="positive definite"):
        merge.hessian_weighted_full(m, [torch.zeros(3, 3, dtype=F64)] * 2, [0.5, 0.5])
    with pytest.raises(ValueError, match="\\(3, 3\\) matrix"):
        merge.hessian_weighted_full(m, [torch.eye(2, dtype=F64)] * 2, [0.5, 0.5])


def test_registry():
    assert {"simple", "task_arithmetic", "hessian", "mixture", "hessian_full"} <= set(merge.merge_names())
    assert merge.get_method("mixture").posterior == "mixture"
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merge.get_method("nope")


def test_preallocated_out_is_filled_and_returned():
    means, precs = random_models(3, seed=21, dtype=torch.float32)
    grid = simplex_grid(3, 0.25)
    out = {k: torch.full((len(grid), *v.shape), float("nan")) for k, v in means[0].items()}
    got = merge.hessian_weighted(means, precs, grid, out=out)
    want = merge.hessian_weighted(means, precs, grid)
    for k in want:
        assert got[k] is out[k]
        torch.testing.assert_close(out[k], want[k])
    bad = dict(out, head=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="out\\['head'\\] must be"):
        merge.simple_average(means, grid, out=bad)
