"""Mixtures of full Gaussians: the posterior structure and the ``mixture_full`` merge rule.

Oracles: K = 1 is ``hessian_full``; the EM objective never decreases and ends at a fixed point;
on P = 2 the result is the mode of Π_t q_t^{α_t} found by a brute-force grid search; bad inputs
raise ValueError naming the value; files round-trip with validation on load.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from varmerge import merge
from varmerge.merge import HessianFullOptions, MixtureFullOptions
from varmerge.posterior import FullGaussian, MixtureFullGaussian, load_posterior

f64 = torch.float64


def spd(P: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    A = torch.randn(P, P, generator=g, dtype=f64)
    return scale * (A @ A.T / P + 0.5 * torch.eye(P, dtype=f64))


def problem(T=3, K=3, P=5, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    means = [[torch.randn(P, generator=g, dtype=f64) * spread for _ in range(K)] for _ in range(T)]
    precs = [[spd(P, g, float(torch.rand(1, generator=g)) * 3 + 0.5) for _ in range(K)] for _ in range(T)]
    w = torch.rand(T, K, generator=g, dtype=f64) + 0.2
    weights = (w / w.sum(1, keepdim=True)).tolist()
    return means, precs, weights


ALPHA = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.1, 0.2], [1.0, 0.0, 0.0]], dtype=f64)


def test_one_component_is_the_full_hessian_merge():
    means, precs, _ = problem(K=1)
    got = merge.mixture_weighted_full(means, precs, ALPHA, options=MixtureFullOptions(iterations=5))
    want = merge.hessian_weighted_full([m[0] for m in means], [h[0] for h in precs], ALPHA)
    torch.testing.assert_close(got, want)


def test_em_objective_never_decreases_and_ends_at_a_fixed_point():
    means, precs, weights = problem(seed=1)
    iterates = []
    merge.mixture_weighted_full(
        means,
        precs,
        ALPHA,
        weights=weights,
        options=MixtureFullOptions(iterations=40),
        callback=lambda i, x: iterates.append(x.clone()),
    )
    objs = torch.stack([merge.mixture_full_objective(x, means, precs, ALPHA, weights=weights) for x in iterates])
    steps = objs[1:] - objs[:-1]
    assert (steps >= -1e-9).all(), steps.min()
    assert float(steps.sum()) > 1e-3  # EM moved away from the start
    last = iterates[-1]
    again = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=MixtureFullOptions(iterations=41))
    torch.testing.assert_close(again, last, atol=1e-8, rtol=0)  # one more step does not move it


def test_anchor_starts_reach_the_same_fixed_points_in_fewer_steps():
    from varmerge.grid import simplex_grid

    means, precs, weights = problem(seed=5, spread=0.3)  # overlapping components: one maximum per α
    alpha = simplex_grid(3, 0.1)
    counted = []
    em = {"iterations": 60, "tol": 1e-10}
    plain = merge.mixture_weighted_full(means, precs, alpha, weights=weights, options=MixtureFullOptions(**em))
    fast = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(**em, start_spacing=0.5),
        callback=lambda i, x: counted.append(x.clone()),
    )  # fmt: skip
    torch.testing.assert_close(fast, plain, atol=1e-7, rtol=0)
    start = counted[0]  # the M-step from responsibilities at the nearest anchor's fixed point
    from_pi = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(iterations=0)
    )
    assert float((start - plain).abs().max()) < float((from_pi - plain).abs().max())
    with pytest.raises(ValueError, match="start_spacing must be in"):
        merge.mixture_weighted_full(means, precs, alpha, weights=weights, options=MixtureFullOptions(start_spacing=0.0))


def test_mode_matches_a_brute_force_search_on_two_parameters():
    means, precs, weights = problem(T=3, K=2, P=2, seed=3, spread=1.0)
    a = torch.tensor([0.5, 0.3, 0.2], dtype=f64)
    got = merge.mixture_weighted_full(
        means, precs, a, weights=weights, options=MixtureFullOptions(iterations=200, tol=1e-12)
    )
    ticks = torch.linspace(-4, 4, 801, dtype=f64)
    grid = torch.cartesian_prod(ticks, ticks)
    obj = merge.mixture_full_objective(grid, means, precs, a.expand(len(grid), -1), weights=weights)
    best = grid[int(obj.argmax())]
    assert float((got - best).abs().max()) <= 0.02  # the grid step is 0.01
    assert float(merge.mixture_full_objective(got, means, precs, a, weights=weights)) >= float(obj.max()) - 1e-6


def test_batched_equals_one_at_a_time_and_blocks_do_not_change_the_result():
    means, precs, weights = problem(seed=4)
    six = MixtureFullOptions(iterations=6)
    batch = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=six)
    small_blocks = MixtureFullOptions(iterations=6, max_batch_bytes=5 * 5 * 8)
    small = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=small_blocks)
    torch.testing.assert_close(small, batch)
    for g, a in enumerate(ALPHA):
        torch.testing.assert_close(merge.mixture_weighted_full(means, precs, a, weights=weights, options=six), batch[g])


def test_bad_inputs_name_the_value():
    means, precs, weights = problem(T=2, K=2, P=3, seed=5)
    a = torch.tensor([0.5, 0.5], dtype=f64)
    bad_h = [list(h) for h in precs]
    bad_h[1][0] = -torch.eye(3, dtype=f64)
    with pytest.raises(ValueError, match="precision of task 1, component 0 is not positive definite"):
        merge.mixture_weighted_full(means, bad_h, a)
    with pytest.raises(ValueError, match=r"mixture weights of task 0 must be 2 positive numbers summing to 1"):
        merge.mixture_weighted_full(means, precs, a, weights=[[0.7, 0.7], weights[1]])
    with pytest.raises(ValueError, match="task 1 has 2 mean components but 1 precision components"):
        merge.mixture_weighted_full(means, [precs[0], precs[1][:1]], a)
    with pytest.raises(ValueError, match=r"task 1: means\[1\] has 4 entries, expected 3"):
        merge.mixture_weighted_full([means[0], [means[1][0], torch.zeros(4, dtype=f64)]], precs, a)
    with pytest.raises(ValueError, match="simplex"):
        merge.mixture_weighted_full(means, precs, torch.tensor([0.9, 0.3], dtype=f64))
    with pytest.raises(ValueError, match="not symmetric"):
        merge.mixture_weighted_full(
            means, [[precs[0][0] + torch.triu(torch.ones(3, 3, dtype=f64), 1), precs[0][1]], precs[1]], a
        )


def _posterior(means, precs, weights, shapes, ess=1.0):
    from varmerge.posterior import PosteriorMeta

    return MixtureFullGaussian(
        [FullGaussian(m, h, shapes) for m, h in zip(means, precs, strict=True)], weights, PosteriorMeta(ess=ess)
    )


def test_posterior_file_round_trip_views_and_the_registry(tmp_path):
    means, precs, weights = problem(T=3, K=2, P=6, seed=6)
    shapes = {"w": (2, 2), "b": (2,)}
    posts = [_posterior(m, h, w, shapes) for m, h, w in zip(means, precs, weights, strict=True)]
    path = tmp_path / "p.safetensors"
    posts[0].save(path)
    back = load_posterior(path, expected={"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    assert isinstance(back, MixtureFullGaussian) and back.K == 2 and back.weights == pytest.approx(weights[0])
    torch.testing.assert_close(back.components[1].precision, precs[0][1])
    assert back.mixture().K == 2 and back.diagonal().mean["w"].shape == (2, 2)
    merged = merge.apply("mixture_full", posts, None, ALPHA[0], {"iterations": 4})
    flat = merge.mixture_weighted_full(
        means, precs, ALPHA[0], weights=weights, options=MixtureFullOptions(iterations=4)
    )
    got = torch.cat([merged["w"].reshape(-1), merged["b"]])  # the registry solves in float32
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), flat, atol=1e-4, rtol=1e-4)
    # a full Gaussian is a one-component mixture: mixture_full runs on full_von posteriors
    fulls = [p.components[0] for p in posts]
    one = merge.apply("mixture_full", fulls, None, ALPHA[0])
    ref = merge.apply("hessian_full", fulls, None, ALPHA[0])
    torch.testing.assert_close(one["w"], ref["w"], atol=1e-4, rtol=1e-4)  # both solve in float32
    with pytest.raises(ValueError, match="needs mixtures of full Gaussians"):
        merge.apply("mixture_full", [p.diagonal() for p in posts], None, ALPHA[0])


def test_a_damaged_file_is_refused(tmp_path):
    from varmerge import files

    means, precs, weights = problem(T=1, K=2, P=6, seed=7)
    post = _posterior(means[0], precs[0], weights[0], {"w": (2, 2), "b": (2,)})
    tensors = {
        "c0/mean": means[0][0],
        "c0/precision": 2 * torch.ones(6, 6, dtype=f64) - torch.eye(6, dtype=f64),  # diagonal > 0, indefinite
        "c1/mean": means[0][1],
        "c1/precision": precs[0][1],
    }
    header = {
        "kind": "mixture_full",
        "K": 2,
        "weights": weights[0],
        "meta": post.meta.to_dict(),
        "component_meta": [c.meta.to_dict() for c in post.components],
        "shapes": {"w": [2, 2], "b": [2]},
    }
    files.save_tensors(tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match="bad.safetensors: mixture component 0: precision is not positive definite"):
        load_posterior(tmp_path / "bad.safetensors")
    files.save_tensors(tmp_path / "short.safetensors", {k: v for k, v in tensors.items() if k.startswith("c0")}, header)
    with pytest.raises(ValueError, match="inconsistent components"):
        load_posterior(tmp_path / "short.safetensors")


# ------------------------------------------------------------------------------ fitting (VI)
def _data(n=120, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=f64)
    w = torch.randn(c, d, generator=g, dtype=f64) * 2
    y = (x @ w.T).argmax(1)
    return x, y


def test_one_component_at_the_mean_is_full_von_step_for_step():
    from varmerge.train.von import MixtureVONSettings, VONSettings, _class_major, full_von, mixture_full_von

    x, y = _data()
    shared = {"lr": 0.3, "mc_samples": 0, "num_iters": 6, "prior_precision": 2.0}
    m_ref, S_ref = full_von(x, y, 3, VONSettings(**shared, reduce_inactive=False))
    fit = mixture_full_von(x, y, 3, MixtureVONSettings(components=1, **shared))
    mu, S, w, fallbacks = fit.means, fit.precisions, fit.weights, fit.fallbacks
    idx = _class_major(3, 4)
    torch.testing.assert_close(mu[0], m_ref[idx])
    torch.testing.assert_close(S[0], S_ref[idx][:, idx])
    assert w.tolist() == [1.0] and fallbacks == 0


def test_fitted_mixture_is_a_valid_posterior_that_predicts(tmp_path):
    from varmerge import models
    from varmerge.train.von import MixtureVONSettings, fit_mixture_full_von

    x, y = _data(n=200, seed=1)
    model = models.build_model("logreg", num_classes=3, in_features=4).double()
    settings = MixtureVONSettings(components=3, lr=0.2, lr_weights=0.01, num_iters=30, prior_precision=1.0)
    post = fit_mixture_full_von(model, x, y, settings)
    assert post.K == 3 and sum(post.weights) == pytest.approx(1.0) and all(w > 0 for w in post.weights)
    assert post.meta.optimizer == "mixture_full_von" and post.meta.ess == 200.0
    for c in post.components:  # every component classifies the training data well
        sd = c.state_dict()
        acc = ((x @ sd["linear.weight"].T + sd["linear.bias"]).argmax(1) == y).double().mean()
        assert float(acc) > 0.85
    post.save(tmp_path / "m.safetensors")
    back = load_posterior(tmp_path / "m.safetensors", expected=models.trainable_state_dict(model))
    merged = merge.apply("mixture_full", [back, post], None, torch.tensor([0.5, 0.5], dtype=f64))
    assert torch.isfinite(merged["linear.weight"]).all()


def test_warm_start_begins_at_the_full_von_gaussian_and_fits_better_in_the_same_iterations():
    from varmerge import models
    from varmerge.train.von import MixtureVONSettings, VONSettings, fit_full_von, fit_mixture_full_von

    x, y = _data(n=200, seed=2)
    base = models.build_model("logreg", num_classes=3, in_features=4).double()
    von = fit_full_von(copy.deepcopy(base), x, y, VONSettings(lr=0.2, mc_samples=3, num_iters=20, prior_precision=1.0))
    settings = {"components": 3, "lr": 0.2, "mc_samples": 3, "prior_precision": 1.0, "init_spread": 0.1}
    start = fit_mixture_full_von(copy.deepcopy(base), x, y, MixtureVONSettings(num_iters=0, warm_start=20, **settings))
    torch.testing.assert_close(start.components[0].mean, von.mean)  # same seed, same VON iterations
    for c in start.components:
        torch.testing.assert_close(c.precision, von.precision)
    assert 0 < float((start.components[1].mean - von.mean).norm()) < 1.0  # a small offset
    warm = fit_mixture_full_von(copy.deepcopy(base), x, y, MixtureVONSettings(num_iters=4, warm_start=20, **settings))
    cold = fit_mixture_full_von(copy.deepcopy(base), x, y, MixtureVONSettings(num_iters=4, **settings))
    assert warm.meta.extra["warm_start"] == 20 and warm.meta.extra["init_spread"] == 0.1
    assert warm.meta.extra["elbo"] > cold.meta.extra["elbo"] + 1.0  # the ELBO estimate, recorded in meta
    with pytest.raises(ValueError, match="warm_start must be >= 0"):
        fit_mixture_full_von(copy.deepcopy(base), x, y, MixtureVONSettings(num_iters=1, warm_start=-1, **settings))


def test_mixture_vi_checks_its_start_and_records_the_elbo_per_iteration():
    from varmerge.train.von import MixtureVONSettings, mixture_full_von

    x, y = _data()
    fit = mixture_full_von(x, y, 3, MixtureVONSettings(components=2, lr=0.2, num_iters=5, prior_precision=1.0))
    assert len(fit.elbo) == 5 and all(math.isfinite(e) for e in fit.elbo)
    # minibatches scaled by N/B estimate the same precision as the full batch
    one = {"components": 1, "lr": 0.3, "num_iters": 30, "prior_precision": 1.0}
    full = mixture_full_von(x, y, 3, MixtureVONSettings(**one))
    mini = mixture_full_von(x, y, 3, MixtureVONSettings(**one, batch_size=60))
    ratio = torch.trace(mini.precisions[0]) / torch.trace(full.precisions[0])
    assert 0.8 < float(ratio) < 1.25
    with pytest.raises(ValueError, match=r"init_precision must be \(15, 15\)"):
        mixture_full_von(x, y, 3, MixtureVONSettings(components=2, num_iters=1), init_precision=torch.eye(4, dtype=f64))


def test_a_config_runs_mixture_full_von_posteriors_through_the_front():
    from helpers import TINY

    from varmerge.config import parse_config
    from varmerge.plan import make_plan
    from varmerge.sequence import LocalRunner, estimate_front

    cfg = parse_config(
        {
            **TINY,
            "data": {**TINY["data"], "image_pool": 2, "max_train_per_task": 100, "max_test_per_task": 50},
            "posterior": {"method": "mixture_full_von", "components": 2, "steps": 3, "lr": 0.3, "prior_precision": 1.0},
            "merge": {
                "methods": ["hessian_full", "mixture_full"],
                "spacing": 0.5,
                "options": {"mixture_full": {"iterations": 3}},
            },
            "selection": {"strategy": "top_k", "top_k": 1, "method": "mixture_full"},
            "multitask_steps": 5,
        }
    )
    plan = make_plan(cfg)
    result = estimate_front(LocalRunner(plan))
    acc = result.sweeps["mixture_full"]["accuracy"]
    assert acc.shape == (7, 3) and float(acc.max(0).values.min()) > 0.6  # spacing 0.5 and (1/3, 1/3, 1/3)
    assert result.realised is not None and result.realised.shape == (1, 3)


def test_the_posterior_section_sets_the_mixture_start():
    from helpers import TINY

    from varmerge import pipeline
    from varmerge.config import parse_config
    from varmerge.plan import make_plan

    posterior = {"method": "mixture_full_von", "components": 2, "steps": 2, "lr": 0.3, "prior_precision": 1.0}
    cfg = parse_config(
        {
            **TINY,
            "data": {**TINY["data"], "image_pool": 2, "max_train_per_task": 60, "max_test_per_task": 20},
            "posterior": {**posterior, "warm_start": 3, "init_spread": 0.05},
        }
    )
    tasks, n = pipeline.prepare_tasks(cfg)
    post, _ = pipeline.finetune_task(make_plan(cfg), pipeline.seeded_model(cfg, n), tasks[0])
    assert post.meta.extra["warm_start"] == 3 and post.meta.extra["init_spread"] == 0.05
    with pytest.raises(ValueError, match="warm_start"):
        parse_config({**TINY, "posterior": {**posterior, "warm_start": -1}})


# --------------------------------------------------------------------------- the CG solver
def test_preconditioned_cg_equals_the_cholesky_sweep():
    from varmerge.grid import simplex_grid
    from varmerge.merging.kernels import solve_combined_pcg

    g = torch.Generator().manual_seed(8)
    P, T = 40, 3
    H = torch.stack([spd(P, g, s) for s in (0.5, 2.0, 8.0)])  # unequal scales: anchors matter
    means = [torch.randn(P, generator=g, dtype=f64) for _ in range(T)]
    alpha = simplex_grid(T, 0.05)
    want = merge.hessian_weighted_full(means, list(H), alpha)
    cg = HessianFullOptions(solver="pcg", pcg_tol=1e-10)
    got = merge.hessian_weighted_full(means, list(H), alpha, options=cg)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    base, H0 = torch.randn(P, generator=g, dtype=f64), spd(P, g)
    want = merge.hessian_weighted_full(means, list(H), alpha, base=base, base_precision=H0)
    got = merge.hessian_weighted_full(means, list(H), alpha, base=base, base_precision=H0, options=cg)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    b = torch.randn(len(alpha), P, generator=g, dtype=f64)
    _, info = solve_combined_pcg(H, alpha, b, tol=1e-10)
    assert (
        info["anchors"] <= 21 and info["iterations"] < P and "unconverged" not in info
    )  # fewer steps than plain CG's P
    f32 = [m.float() for m in means], [h.float() for h in H]  # the registry's dtype: its own default tolerance
    got = merge.hessian_weighted_full(*f32, alpha, options=HessianFullOptions(solver="pcg"))
    torch.testing.assert_close(got.double(), merge.hessian_weighted_full(means, list(H), alpha), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pcg_tol must be >= 0"):
        merge.hessian_weighted_full(means, list(H), alpha, options=HessianFullOptions(solver="pcg", pcg_tol=-1.0))
    with pytest.raises(ValueError, match=r"solver\n  Input should be 'cholesky' or 'pcg'"):
        HessianFullOptions(solver="lu")
    with pytest.raises(ValueError, match="solver must be 'cholesky' or 'pcg'"):  # an options object built unchecked
        merge.hessian_weighted_full(means, list(H), alpha, options=HessianFullOptions.model_construct(solver="lu"))
    with pytest.raises(ValueError, match=r"CG did not reach pcg_tol=0.0 for \d+ α rows"):  # never silently wrong
        merge.hessian_weighted_full(means, list(H), alpha, options=HessianFullOptions(solver="pcg", pcg_tol=0.0))


def test_mixture_em_by_cg_equals_refactorising_every_step():
    from varmerge.grid import simplex_grid

    means, precs, weights = problem(seed=9, P=12)
    cg = {"solver": "pcg", "pcg_tol": 1e-12}
    want = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=MixtureFullOptions(iterations=8))
    got = merge.mixture_weighted_full(
        means, precs, ALPHA, weights=weights, options=MixtureFullOptions(iterations=8, **cg)
    )
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    alpha = simplex_grid(3, 0.1)  # many α on few anchors, each row stopping on its own, every iterate
    em = {"iterations": 20, "tol": 1e-6}
    seen = {"cholesky": [], "pcg": []}
    want = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(**em),
        callback=lambda i, x: seen["cholesky"].append(x),
    )  # fmt: skip
    got = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(anchor_spacing=0.5, **cg, **em),
        callback=lambda i, x: seen["pcg"].append(x),
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    assert len(seen["pcg"]) == len(seen["cholesky"]) == 21
    for x, y in zip(seen["pcg"], seen["cholesky"], strict=True):
        torch.testing.assert_close(x, y, atol=1e-8, rtol=1e-8)
    want = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(start_spacing=0.5, **em)
    )
    got = merge.mixture_weighted_full(
        means, precs, alpha, weights=weights, options=MixtureFullOptions(start_spacing=0.5, **cg, **em)
    )
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match=r"mixture_full: CG did not reach pcg_tol=0.0 for \d+ α rows"):
        merge.mixture_weighted_full(
            means, precs, alpha, weights=weights, options=MixtureFullOptions(solver="pcg", pcg_tol=0.0)
        )
    with pytest.raises(ValueError, match="anchor_spacing must be in"):
        merge.mixture_weighted_full(
            means, precs, alpha, weights=weights, options=MixtureFullOptions(solver="pcg", anchor_spacing=1.5)
        )


def test_cg_computes_only_the_rows_still_iterating():
    from varmerge.merging.kernels import pcg

    g = torch.Generator().manual_seed(3)
    A = torch.stack([spd(6, g), torch.eye(6, dtype=f64)])  # row 1 converges in one step
    b = torch.randn(2, 6, generator=g, dtype=f64)
    seen = []

    def matvec(V, rows):
        seen.append(rows.tolist())
        return torch.einsum("gij,gj->gi", A[rows], V)

    x, iters, unconverged = pcg(matvec, lambda R, rows: R, b, torch.zeros_like(b), tol=1e-12, max_iter=50)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=0)
    assert unconverged == 0 and int(iters[1]) == 1 and int(iters[0]) > 1
    assert seen[:2] == [[0, 1], [0, 1]] and all(r == [0] for r in seen[2:])


def test_each_alpha_stops_on_its_own_so_blocks_do_not_change_the_early_stopped_result():
    """With ``tol`` every α row stops after its own last move above ``tol``: batched, in blocks of
    one or one at a time, the result is the same, and rows that settle early stop changing."""
    means, precs, weights = problem(seed=5, spread=0.3)  # overlapping components: slow, smooth EM
    em = {"iterations": 60, "tol": 1e-6}
    kw = {"weights": weights, "options": MixtureFullOptions(**em)}
    seen = []
    batch = merge.mixture_weighted_full(means, precs, ALPHA, callback=lambda i, x: seen.append(x.clone()), **kw)
    small_blocks = MixtureFullOptions(max_batch_bytes=5 * 5 * 8, **em)
    small = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=small_blocks)
    torch.testing.assert_close(small, batch, atol=1e-12, rtol=0)  # batched BLAS: ulps apart
    for g, a in enumerate(ALPHA):
        torch.testing.assert_close(merge.mixture_weighted_full(means, precs, a, **kw), batch[g], atol=1e-12, rtol=0)
    steps = [max([0] + [i for i in range(1, len(seen)) if not torch.equal(seen[i][g], seen[i - 1][g])])
             for g in range(len(ALPHA))]  # fmt: skip
    assert min(steps) < max(steps), steps  # some α stop earlier than others
    full = merge.mixture_weighted_full(means, precs, ALPHA, weights=weights, options=MixtureFullOptions(iterations=60))
    torch.testing.assert_close(batch, full, atol=1e-4, rtol=0)
