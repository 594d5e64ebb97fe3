"""One meaning of α: the merge at α is the optimum of the multitask objective at the same α,
``Σ_t α_t L̄_t(θ) + R0(θ)`` with per-task *mean* losses and the prior once (README, "What α means").

Tasks have unequal sizes (N = 100 / 400 / 1,600). Where the quadratic approximation is exact (a
quadratic task loss) the equality is exact; for logistic regression under a strong prior with
full Gaussians (Laplace, from full VON with no sampling) it holds to within the approximation. Each
test also checks that today's-before convention — precisions on the summed-loss scale weighted by
α itself, i.e. the optimum of ``Σ_t α_t N_t L̄_t`` — misses the multitask optimum by far more.
"""

from __future__ import annotations

import pytest
import torch

from varmerge import merge, train
from varmerge.posterior import ALPHA_CONVENTION, DiagonalGaussian, FullGaussian, MixtureGaussian, PosteriorMeta
from varmerge.train.von import VONSettings

N = (100, 400, 1600)
ALPHAS = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]], dtype=torch.float64)
LAM = 0.5  # per-example prior precision (R0 = λ/2 ‖θ‖²)


def _quadratic_tasks(D: int = 5, full: bool = False, seed: int = 0):
    """Per-example losses ½ (θ − x_i)ᵀ A_i (θ − x_i): task t's mean loss has Hessian H̄_t and
    linear term b̄_t = mean A_i x_i. Returns (H̄_t, b̄_t) per task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, n in enumerate(N):
        x = torch.randn(n, D, generator=g, dtype=torch.float64) + 2.0 * t
        if full:
            B = torch.randn(n, D, D, generator=g, dtype=torch.float64) / D**0.5
            A = B @ B.transpose(1, 2) + 0.1 * torch.eye(D, dtype=torch.float64)
            out.append((A.mean(0), (A @ x[..., None]).squeeze(-1).mean(0)))
        else:
            A = torch.rand(n, D, generator=g, dtype=torch.float64) * (1 + 3 * t) + 0.1
            out.append((A.mean(0), (A * x).mean(0)))
    return out


def _multitask_optimum(tasks, alpha, full: bool) -> torch.Tensor:
    """argmin Σ_t α_t L̄_t + λ/2 ‖θ‖² in closed form."""
    H = sum(a * h for a, (h, _) in zip(alpha, tasks, strict=True))
    b = sum(a * bb for a, (_, bb) in zip(alpha, tasks, strict=True))
    if full:
        return torch.linalg.solve(H + LAM * torch.eye(len(b), dtype=torch.float64), b)
    return b / (H + LAM)


def test_posterior_files_record_the_convention(tmp_path):
    post = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.ones(2)}, PosteriorMeta(task="a", ess=10.0))
    post.save(tmp_path / "p.safetensors")
    assert DiagonalGaussian.load(tmp_path / "p.safetensors").meta.alpha_convention == ALPHA_CONVENTION


@pytest.mark.parametrize("method", ["hessian", "mixture"])
def test_diagonal_merge_is_the_multitask_optimum_of_a_quadratic(method):
    tasks = _quadratic_tasks()
    posts = []
    for (h, b), n in zip(tasks, N, strict=True):
        prec = h + LAM  # per-example precision of L̄_t + R0; the file holds N_t × it
        post = DiagonalGaussian({"w": b / prec}, {"w": n * prec}, PosteriorMeta(task=f"t{n}", ess=float(n)))
        posts.append(MixtureGaussian([post]) if method == "mixture" else post)
    merged = merge.apply(method, posts, None, ALPHAS)["w"]
    old = merge.hessian_weighted(
        [p.as_kind("diagonal").mean for p in posts], [p.as_kind("diagonal").precision for p in posts], ALPHAS
    )["w"]
    for g, a in enumerate(ALPHAS):
        want = _multitask_optimum(tasks, a, full=False)
        torch.testing.assert_close(merged[g], want, rtol=1e-12, atol=1e-12)
        if a.max() < 1:  # the old convention is the optimum at α' ∝ α_t N_t instead
            assert (old[g] - want).abs().max() > 1e-2, a


def test_full_merge_is_the_multitask_optimum_of_a_quadratic():
    tasks = _quadratic_tasks(full=True)
    eye = torch.eye(5, dtype=torch.float64)
    posts = [
        FullGaussian(
            torch.linalg.solve(h + LAM * eye, b),
            n * (h + LAM * eye),
            {"w": (5,)},
            PosteriorMeta(task=f"t{n}", ess=float(n)),
        )
        for (h, b), n in zip(tasks, N, strict=True)
    ]
    merged = merge.apply("hessian_full", posts, None, ALPHAS)["w"]  # solved in float32
    old = merge.hessian_weighted_full([p.mean for p in posts], [p.precision for p in posts], ALPHAS)
    for g, a in enumerate(ALPHAS):
        want = _multitask_optimum(tasks, a, full=True)
        torch.testing.assert_close(merged[g].double(), want, rtol=1e-5, atol=1e-5)
        if a.max() < 1:
            assert (old[g] - want).abs().max() > 1e-2, a


def _logreg_tasks(D: int = 3, C: int = 3, seed: int = 0):
    """Three tasks of one softmax regression problem (one shared 3-class head), different inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g, dtype=torch.float64) * 2
    out = []
    for t, n in enumerate(N):
        x = torch.randn(n, D, generator=g, dtype=torch.float64) + torch.tensor([t, -t, 0.5 * t], dtype=torch.float64)
        logits = x @ W.T + torch.randn(n, C, generator=g, dtype=torch.float64)
        out.append((x, logits.argmax(-1)))
    return out


def _mean_nll(theta, x, y, C):
    D = x.shape[1]
    W, b = theta[: C * D].view(C, D), theta[C * D :]
    return torch.nn.functional.cross_entropy(x @ W.T + b, y)


def _newton(fn, P: int, iters: int = 30) -> torch.Tensor:
    theta = torch.zeros(P, dtype=torch.float64)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(fn, theta)
        H = torch.autograd.functional.hessian(fn, theta)
        theta = theta - torch.linalg.solve(H, g)
    return theta


def test_full_gaussian_logistic_regression_merge_matches_the_multitask_optimum():
    C, D = 3, 3
    P = C * D + C
    tasks = _logreg_tasks(D, C)
    posts = []
    for (x, y), n in zip(tasks, N, strict=True):
        # Laplace posterior of N_t·L̄_t + N_t·λ/2 ‖θ‖² (VON without sampling is Newton's method)
        m, S = train.full_von(x, y, C, VONSettings(lr=1.0, mc_samples=0, num_iters=30, prior_precision=n * LAM))
        posts.append(FullGaussian(m, S, {"w": (P,)}, PosteriorMeta(task=f"t{n}", ess=float(n))))
    merged = merge.apply("hessian_full", posts, None, ALPHAS)["w"].double()
    old = merge.hessian_weighted_full([p.mean for p in posts], [p.precision for p in posts], ALPHAS)
    for g, a in enumerate(ALPHAS):

        def objective(theta, a=a):
            total = 0.5 * LAM * theta.pow(2).sum()
            return total + sum(w * _mean_nll(theta, x, y, C) for w, (x, y) in zip(a, tasks, strict=True) if w > 0)

        want = _newton(objective, P)
        err, old_err = (merged[g] - want).abs().max(), (old[g] - want).abs().max()
        assert err < 0.005, (a, err)  # measured 0.0008-0.0022; the old convention 0.045-0.090
        if a.max() < 1:
            assert old_err > 10 * err, (a, err, old_err)
