"""Full-Gaussian variational online Newton (VON) for multinomial logistic regression.

:func:`full_von` is the algorithm on (x, y) tensors (Khan & Rue 2023, §1.3.2);
:func:`fit_full_von` runs it on a model's single ``nn.Linear`` and returns a
:class:`~varmerge.posterior.FullGaussian`; :func:`varmerge.train.fit` with
``OptimizerSettings(name="full_von")`` calls it with ``lr``, ``mc_samples``, ``prior_precision``
and ``trainer.steps`` iterations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from varmerge.posterior import FullGaussian, MixtureFullGaussian, PosteriorMeta
from varmerge.train.batches import Data, as_logits

__all__ = [
    "MixtureFit",
    "fit_full_von",
    "fit_mixture_full_von",
    "full_von",
    "mixture_full_von",
    "softmax_regression_hessian",
]


def full_tensors(data: Data) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of ``data`` (tensors, a TensorDataset, a Dataset or DataLoader of (x, y))."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, Dataset):
        loader = DataLoader(ds, batch_size=4096, shuffle=False)
        xs, ys = zip(*[(b[0], b[1]) for b in loader], strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise ValueError(f"full VON needs (x, y) tensors or a dataset of (x, y), got {type(data).__name__}")


def _find_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    if isinstance(model, nn.Linear):
        return "", model
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(lins) != 1:
        raise ValueError(f"full VON needs a model with exactly one nn.Linear (logistic regression), found {len(lins)}")
    name, lin = lins[0]
    own = {id(lin.weight)} | ({id(lin.bias)} if lin.bias is not None else set())
    other = [n for n, p in model.named_parameters() if id(p) not in own]
    if other:
        raise ValueError(f"full VON covers one nn.Linear only; the model has other parameters {other[:5]}")
    return name + ".", lin


def softmax_regression_hessian(x: Tensor, a: Tensor, *, chunk_size: int = 4096, out: Tensor | None = None) -> Tensor:
    """``Σ_i A_i ⊗ x_i x_iᵀ`` with ``A_i = diag(p_i) − p_i p_iᵀ`` (or any symmetric (C, C) weights).

    ``x`` is (N, D), ``a`` is (N, C, C); the result is (C·D, C·D) in class-major order (index
    ``c·D + d``). It is built block by block, ``H_{cc'} = Xᵀ diag(a[:, c, c']) X`` for c ≤ c', so
    the cost is C(C+1)/2 matrix products of (D × N)(N × D) and no (N, C·D) intermediate.
    """
    N, D = x.shape
    C = a.shape[-1]
    if a.shape != (N, C, C):
        raise ValueError(f"a must be (N, C, C) = ({N}, {C}, {C}), got {tuple(a.shape)}")
    H = out if out is not None else torch.zeros(C * D, C * D, dtype=x.dtype, device=x.device)
    H.zero_()
    for lo in range(0, N, chunk_size):
        xc, ac = x[lo : lo + chunk_size], a[lo : lo + chunk_size]
        for c in range(C):
            for c2 in range(c, C):
                blk = (xc * ac[:, c, c2, None]).T @ xc
                H[c * D : (c + 1) * D, c2 * D : (c2 + 1) * D] += blk
    for c in range(C):
        for c2 in range(c + 1, C):
            H[c2 * D : (c2 + 1) * D, c * D : (c + 1) * D] = H[c * D : (c + 1) * D, c2 * D : (c2 + 1) * D].T
    return H


@torch.no_grad()
def full_von(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    lr: float = 0.1,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    prior_mean: Tensor | None = None,
    init_mean: Tensor | None = None,
    init_precision: float | None = None,
    batch_size: int | None = None,
    reduce_inactive: bool = True,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Full-Gaussian VON (Khan & Rue 2023, §1.3.2) for softmax regression; returns ``(m, S)``.

    Parameters are θ = [W.flatten() (C·D, class-major), b (C)], the likelihood is
    ``Π_i softmax(W x_i + b)[y_i]`` and the prior ``N(μ0, δ⁻¹ I)`` (``μ0 = prior_mean`` or 0).
    Starting from ``m = init_mean`` (default μ0) and ``S = init_precision · I`` (default δ), each
    iteration draws θ_s ~ N(m, S⁻¹) (Cholesky of S), forms the expected gradient ĝ and Hessian Ĥ of
    the total NLL over the samples, and updates

        S ← (1 − ρ) S + ρ (Ĥ + δ I),      m ← m − ρ S⁻¹ (ĝ + δ (m − μ0)).

    ``mc_samples=0`` evaluates ĝ, Ĥ at the mean: a damped Newton method whose fixed point is the
    Laplace approximation (MAP, Hessian + δI). ``batch_size`` uses a random minibatch per iteration
    with the N/B scaling (stochastic VON); None is full batch.

    ``reduce_inactive``: a feature that is zero in every example (MNIST border pixels) has zero
    gradient and Hessian, so with the isotropic S0 its weights evolve independently and in closed
    form; they are split off and only the active block is factorised (exact, not an
    approximation).

    Cost per iteration, P = C·(D_active + 1): the Hessian takes C(C+1)/2 products of
    (D × N)(N × D) ≈ C² N D² flops and the Cholesky P³/3. For 5,000 MNIST digits (C = 10, 663 active
    pixels, P ≈ 6,640) that is about 2.2e11 + 1e11 flops, 5–10 s per iteration in float64 on two CPU
    cores, well under a second on a GPU; memory is a few P × P matrices (≈ 350 MB each in float64,
    half in float32 via ``dtype``).
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0 < lr <= 1:
        raise ValueError(f"VON learning rate ρ must be in (0, 1], got {lr}")
    if not prior_precision > 0:
        raise ValueError(f"prior precision δ must be > 0, got {prior_precision}")
    if not (isinstance(mc_samples, int) and mc_samples >= 0):
        raise ValueError(f"mc_samples must be an int >= 0, got {mc_samples!r}")
    N, D = x.shape
    C = int(num_classes)
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, dtype)
    y = y.to(device)
    P = C * D + C
    delta = float(prior_precision)
    s0 = delta if init_precision is None else float(init_precision)
    mu0 = torch.zeros(P, dtype=dtype, device=device) if prior_mean is None else prior_mean.to(device, dtype).flatten()
    m_full = mu0.clone() if init_mean is None else init_mean.to(device, dtype).flatten().clone()
    if mu0.numel() != P or m_full.numel() != P:
        raise ValueError(f"prior_mean / init_mean must have C·D + C = {P} entries")

    # active features (+ the bias column) and their positions in the full θ vector
    active = (x != 0).any(0) if reduce_inactive else torch.ones(D, dtype=torch.bool, device=device)
    act_idx = torch.nonzero(active).flatten()
    Da = int(act_idx.numel()) + 1
    cls = torch.arange(C, device=device)
    w_idx = cls[:, None] * D + act_idx[None, :]  # (C, Da-1)
    b_idx = C * D + cls  # (C,)
    full_idx = torch.cat([w_idx, b_idx[:, None]], dim=1).flatten()  # reduced (c, a) -> full index
    xa = torch.cat([x[:, act_idx], torch.ones(N, 1, dtype=dtype, device=device)], dim=1)  # (N, Da)
    Pa = C * Da
    onehot = F.one_hot(y, C).to(dtype)

    m = m_full[full_idx].clone()
    mu0_a = mu0[full_idx]
    S = torch.eye(Pa, dtype=dtype, device=device) * s0
    H = torch.empty(Pa, Pa, dtype=dtype, device=device)
    eye = torch.eye(Pa, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    chol = torch.linalg.cholesky(S)
    s_inactive = s0  # every split-off coordinate has precision s_inactive and its own mean
    inactive = torch.ones(P, dtype=torch.bool, device=device)
    inactive[full_idx] = False

    for _ in range(num_iters):
        if batch_size is not None and batch_size < N:
            sel = torch.randperm(N, generator=gen, device=device)[:batch_size]
            xb, yb, scale = xa[sel], onehot[sel], N / batch_size
        else:
            xb, yb, scale = xa, onehot, 1.0
        if mc_samples == 0:
            thetas = m[None]
        else:
            eps = torch.randn(mc_samples, Pa, generator=gen, dtype=dtype, device=device)
            # θ = m + L⁻ᵀ ε has covariance (L Lᵀ)⁻¹ = S⁻¹
            z = torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
            thetas = m[None] + z
        g = torch.zeros(Pa, dtype=dtype, device=device)
        A = torch.zeros(xb.shape[0], C, C, dtype=dtype, device=device)
        for th in thetas:
            logits = xb @ th.view(C, Da).T
            p = torch.softmax(logits, dim=-1)
            g += ((p - yb).T @ xb).flatten()
            A += torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        k = thetas.shape[0]
        g *= scale / k
        A *= scale / k
        softmax_regression_hessian(xb, A, chunk_size=chunk_size, out=H)
        H.add_(eye, alpha=delta)
        S.mul_(1 - lr).add_(H, alpha=lr)
        S = 0.5 * (S + S.T)
        chol, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise RuntimeError("VON precision lost positive definiteness; lower lr or use float64")
        step = torch.cholesky_solve((g + delta * (m - mu0_a))[:, None], chol).flatten()
        m = m - lr * step
        # split-off coordinates: zero likelihood gradient/Hessian, scalar recursion
        s_inactive = (1 - lr) * s_inactive + lr * delta
        m_full[inactive] -= lr * delta * (m_full[inactive] - mu0[inactive]) / s_inactive

    m_full[full_idx] = m
    S_full = torch.zeros(P, P, dtype=dtype, device=device)
    S_full[inactive, inactive] = s_inactive
    S_full[full_idx[:, None], full_idx[None, :]] = S
    return m_full, S_full


def fit_full_von(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float = 0.1,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    meta: PosteriorMeta | None = None,
) -> FullGaussian:
    """Full-Gaussian VON posterior of the model's single ``nn.Linear`` (softmax regression).

    ``model`` must be logistic regression: exactly one ``nn.Linear`` with weight (C, D) and bias
    (C,), applied to ``x`` flattened to (N, D) (this is checked on a few examples). The VON mean
    starts from the model's weights, the prior is ``N(0, δ⁻¹ I)`` (δ = ``prior_precision``) and
    ``batch_size`` gives stochastic VON (None: full batch). The model's weights are set to the
    final mean (in place) and a :class:`FullGaussian` with shapes ``{"<lin>.weight": (C, D),
    "<lin>.bias": (C,)}`` and meta optimizer ``full_von`` is returned (float64, on CPU). See
    :func:`full_von`.
    """
    prefix, lin = _find_linear(model)
    if lin.bias is None:
        raise ValueError("full VON expects an nn.Linear with a bias")
    C, D = lin.weight.shape
    xf = x.reshape(x.shape[0], -1)
    if xf.shape[1] != D:
        raise ValueError(f"x flattens to {xf.shape[1]} features but the linear layer takes {D}")
    with torch.no_grad():
        probe = x[: min(8, x.shape[0])].to(lin.weight.device, lin.weight.dtype)
        direct = probe.reshape(probe.shape[0], -1) @ lin.weight.T + lin.bias
        got = as_logits(model(probe)) if not isinstance(model, nn.Linear) else direct
        if got.shape != direct.shape or not torch.allclose(got, direct, rtol=1e-4, atol=1e-4):
            raise ValueError(
                "the model is not plain logistic regression on flattened inputs (its logits differ "
                "from x.flatten() @ Wᵀ + b); full VON needs exactly that"
            )
        theta0 = torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]).to("cpu", torch.float64)
    # the VON settings: passed to full_von and recorded in the posterior's meta
    settings = {"lr": lr, "mc_samples": mc_samples, "num_iters": num_iters, "prior_precision": prior_precision}
    m, S = full_von(xf, y, C, init_mean=theta0, batch_size=batch_size, seed=seed, **settings)
    m, S = m.cpu(), S.cpu()
    with torch.no_grad():
        lin.weight.copy_(m[: C * D].view(C, D).to(lin.weight.dtype))
        lin.bias.copy_(m[C * D :].to(lin.bias.dtype))
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    meta.optimizer = "full_von"
    meta.seed = seed if meta.seed is None else meta.seed
    meta.ess = float(xf.shape[0]) if meta.ess is None else meta.ess  # the precision sums N examples' Hessians
    meta.extra = {**meta.extra, **settings}
    shapes = {f"{prefix}weight": (C, D), f"{prefix}bias": (C,)}
    return FullGaussian(m, S, shapes, meta)


@dataclass
class MixtureFit:
    """What :func:`mixture_full_von` returns: ``means`` (K, P), ``precisions`` (K, P, P) and
    ``weights`` (K,) of the mixture, the number of PD ``fallbacks`` and the Monte Carlo ``elbo``
    estimate (E_q[log p(D | θ) + log p(θ) − log q(θ)], without log p's constants) at each
    iteration's start."""

    means: Tensor
    precisions: Tensor
    weights: Tensor
    fallbacks: int
    elbo: list[float]


def _log_mixture_derivatives(theta: Tensor, mu: Tensor, S: Tensor, log_pi: Tensor, half_logdet: Tensor):
    """log q(θ), ∇ log q(θ) and ∇² log q(θ) of q = Σ_j π_j N(μ_j, S_j⁻¹) at one point θ (P,)."""
    d = theta[None] - mu  # (K, P)
    Sd = torch.einsum("kij,kj->ki", S, d)  # S_j (θ − μ_j)
    lj = log_pi + half_logdet - 0.5 * (d * Sd).sum(1) - 0.5 * theta.numel() * math.log(2 * math.pi)
    logq = torch.logsumexp(lj, 0)
    r = torch.softmax(lj, 0)  # responsibilities
    g = -(r[:, None] * Sd).sum(0)
    # ∇² log q = Σ_j r_j (S_j d_j d_jᵀ S_j − S_j) − g gᵀ
    hess = torch.einsum("k,ki,kj->ij", r, Sd, Sd) - torch.einsum("k,kij->ij", r, S) - torch.outer(g, g)
    return logq, g, hess


@torch.no_grad()
def mixture_full_von(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    components: int,
    *,
    lr: float = 0.02,
    lr_weights: float = 3e-6,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    init_mean: Tensor | None = None,
    init_precision: Tensor | None = None,
    init_spread: float = 1.0,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> MixtureFit:
    """A mixture of K full Gaussians fitted by natural-gradient VI (Lin, Khan & Schmidt 2019, §4.1)
    to softmax regression with the prior N(0, δ⁻¹ I); returns a :class:`MixtureFit`.

    With f(θ) = log p(D | θ) + log p(θ) − log q(θ), each iteration draws ``mc_samples`` θ from each
    component N(μ_k, S_k⁻¹) and updates, with step β = ``lr``,

        S_k ← S_k − β E_k[∇² f],      μ_k ← μ_k + β S_k⁻¹ E_k[∇ f],
        log π_k − log π_K ← (same) + β_π (E_k[f] − E_K[f])        (β_π = ``lr_weights``),

    the natural gradients of the ELBO in the mixture's joint parametrisation. ∇² of the likelihood
    is exact (:func:`softmax_regression_hessian`), ∇ and ∇² of log q are the mixture's closed forms.
    −∇² log q is not positive semi-definite where components overlap: a step that would make S_k
    indefinite uses −∇² log q ≈ S_k for that component (the non-overlapping limit, which is full
    VON's update) and is counted in ``fallbacks``. With K = 1 and ``mc_samples=0`` this is
    :func:`full_von` at the mean step for step.

    ``batch_size`` draws one minibatch per iteration (shared by the components) and scales its
    likelihood terms by N/B, as stochastic :func:`full_von` does; None is full batch.

    Start: precisions ``init_precision`` (a (P, P) matrix, e.g. a converged full-VON precision;
    default δ I) and means ``init_mean`` (default 0) plus offsets drawn from N(0, ``init_spread``² ·
    init_precision⁻¹) (the first component at ``init_mean`` itself), weights 1/K.
    """
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    if not 0 < lr <= 1 or not 0 <= lr_weights:
        raise ValueError(f"step sizes must satisfy 0 < lr <= 1 and lr_weights >= 0, got {lr}, {lr_weights}")
    if not prior_precision > 0:
        raise ValueError(f"prior precision δ must be > 0, got {prior_precision}")
    N, D = x.shape
    C, K = int(num_classes), int(components)
    xa = torch.cat([x.to(dtype), torch.ones(N, 1, dtype=dtype)], dim=1)  # bias as a last feature
    Da, P = D + 1, C * (D + 1)
    onehot = F.one_hot(y.long(), C).to(dtype)
    delta = float(prior_precision)
    gen = torch.Generator().manual_seed(int(seed))
    # θ in (class, feature) order with the bias last per class; the caller maps it to [W, b]
    m0 = torch.zeros(P, dtype=dtype) if init_mean is None else init_mean.to(dtype).flatten()
    if m0.numel() != P:
        raise ValueError(f"init_mean must have C·(D+1) = {P} entries, got {m0.numel()}")
    S0 = torch.eye(P, dtype=dtype) * delta if init_precision is None else init_precision.to(dtype)
    if S0.shape != (P, P):
        raise ValueError(f"init_precision must be ({P}, {P}), got {tuple(S0.shape)}")
    eps = torch.randn(K, P, generator=gen, dtype=dtype) * init_spread
    offsets = torch.linalg.solve_triangular(torch.linalg.cholesky(S0).T, eps.T, upper=True).T
    offsets[0] = 0
    mu = m0[None] + offsets
    S = S0.expand(K, P, P).clone()
    eta = torch.zeros(K, dtype=dtype)  # log π up to a constant
    eye = torch.eye(P, dtype=dtype)
    fallbacks = 0

    def log_lik_grad(th: Tensor, xb: Tensor, yb: Tensor, scale: float):
        logits = xb @ th.view(C, Da).T
        p = torch.softmax(logits, -1)
        ll = scale * (yb * torch.log_softmax(logits, -1)).sum()
        g = scale * ((yb - p).T @ xb).flatten()  # ∇ log p(D | θ)
        return ll, g, p

    chol = torch.linalg.cholesky(S)
    elbo: list[float] = []
    for _ in range(num_iters):
        if batch_size is not None and batch_size < N:  # one minibatch per iteration, shared by the components
            sel = torch.randperm(N, generator=gen)[:batch_size]
            xb, yb, scale = xa[sel], onehot[sel], N / batch_size
        else:
            xb, yb, scale = xa, onehot, 1.0
        log_pi = torch.log_softmax(eta, 0)
        half_logdet = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        new_S, new_chol, new_mu, fbar = S.clone(), chol.clone(), mu.clone(), torch.zeros(K, dtype=dtype)
        for k in range(K):
            if mc_samples == 0:
                thetas = mu[k][None]
            else:
                eps = torch.randn(mc_samples, P, generator=gen, dtype=dtype)
                thetas = mu[k][None] + torch.linalg.solve_triangular(chol[k].T, eps.T, upper=True).T
            g_f = torch.zeros(P, dtype=dtype)
            h_q = torch.zeros(P, P, dtype=dtype)  # E[−∇² log q]
            A = torch.zeros(xb.shape[0], C, C, dtype=dtype)
            for th in thetas:
                ll, g_lik, p = log_lik_grad(th, xb, yb, scale)
                logq, g_q, hess_q = _log_mixture_derivatives(th, mu, S, log_pi, half_logdet)
                g_f += g_lik - delta * th - g_q
                h_q -= hess_q
                A += torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
                fbar[k] += ll - 0.5 * delta * th.dot(th) - logq
            n = thetas.shape[0]
            g_f, h_q, A, fbar[k] = g_f / n, h_q / n, A / n, fbar[k] / n
            h_lik = softmax_regression_hessian(xb, A * scale)  # E[−∇² log p(D | θ)]
            cand = S[k] + lr * (h_lik + delta * eye - h_q)  # S_k − β E_k[∇² f]
            cand = 0.5 * (cand + cand.T)
            L, info = torch.linalg.cholesky_ex(cand)
            if int(info) != 0:
                fallbacks += 1
                cand = (1 - lr) * S[k] + lr * (h_lik + delta * eye)
                L = torch.linalg.cholesky(cand)
            new_S[k], new_chol[k] = cand, L
            new_mu[k] = mu[k] + lr * torch.cholesky_solve(g_f[:, None], L).flatten()
        # the ELBO estimate at the iterate the samples came from (up to log p's constant)
        elbo.append(float((log_pi.exp() * fbar).sum()))
        if K > 1:
            eta = eta + lr_weights * (fbar - fbar[-1])
        S, chol, mu = new_S, new_chol, new_mu
    return MixtureFit(mu, S, torch.softmax(eta, 0), fallbacks, elbo)


def _class_major(C: int, D: int) -> Tensor:
    """Index map: entry i of :func:`mixture_full_von`'s (class, feature + bias) vector is entry
    ``idx[i]`` of the [W.flatten(), b] vector of :func:`full_von` and :class:`FullGaussian`."""
    idx = torch.empty(C * (D + 1), dtype=torch.long)
    for c in range(C):
        idx[c * (D + 1) : c * (D + 1) + D] = torch.arange(c * D, (c + 1) * D)
        idx[c * (D + 1) + D] = C * D + c
    return idx


def fit_mixture_full_von(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    components: int,
    lr: float = 0.02,
    lr_weights: float = 3e-6,
    mc_samples: int = 3,
    num_iters: int = 25,
    prior_precision: float = 1.0,
    init_spread: float = 1.0,
    warm_start: int = 0,
    batch_size: int | None = None,
    seed: int = 0,
    meta: PosteriorMeta | None = None,
) -> MixtureFullGaussian:
    """:func:`mixture_full_von` on the model's single ``nn.Linear``: a :class:`MixtureFullGaussian`
    (float64, on CPU) whose components are in the [W, b] order of :func:`fit_full_von`; the model's
    weights become the mean of the heaviest component.

    The first component starts at the model's weights, with precision δ I. ``warm_start`` > 0 runs
    that many full-VON iterations first (:func:`full_von`, same ``lr`` and ``mc_samples``) and
    starts every component from the Gaussian they reach: its precision, and means at its mean plus
    N(0, ``init_spread``² · covariance) offsets. With a small spread the components start
    overlapping where the posterior is, so the mixture's own iterations go to shaping it rather
    than to the walk from the prior that every component would otherwise repeat. ``batch_size``:
    minibatches of that size in both (None: full batch)."""
    prefix, lin = _find_linear(model)
    if lin.bias is None:
        raise ValueError("mixture VON expects an nn.Linear with a bias")
    C, D = lin.weight.shape
    xf = x.reshape(x.shape[0], -1)
    if xf.shape[1] != D:
        raise ValueError(f"x flattens to {xf.shape[1]} features but the linear layer takes {D}")
    idx = _class_major(C, D)
    theta0 = torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]).to("cpu", torch.float64)
    settings = {
        "lr": lr,
        "lr_weights": lr_weights,
        "mc_samples": mc_samples,
        "num_iters": num_iters,
        "prior_precision": prior_precision,
    }
    if warm_start < 0:
        raise ValueError(f"warm_start must be >= 0 full-VON iterations, got {warm_start}")
    start = {"init_mean": theta0[idx]}
    if warm_start:
        m, S = full_von(
            xf.cpu(), y.cpu(), C, lr=lr, mc_samples=mc_samples, num_iters=warm_start,
            prior_precision=prior_precision, init_mean=theta0, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        start = {"init_mean": m[idx], "init_precision": S[idx][:, idx]}
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    fit = mixture_full_von(
        xf.cpu(), y.cpu(), C, components, init_spread=init_spread, batch_size=batch_size, seed=seed, **start, **settings
    )
    mu, S, w, fallbacks = fit.means, fit.precisions, fit.weights, fit.fallbacks
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    shapes = {f"{prefix}weight": (C, D), f"{prefix}bias": (C,)}
    meta.optimizer = "mixture_full_von"
    meta.seed = seed if meta.seed is None else meta.seed
    meta.ess = float(xf.shape[0]) if meta.ess is None else meta.ess
    meta.extra = {
        **meta.extra,
        **settings,
        "components": components,
        "init_spread": init_spread,
        "warm_start": warm_start,
        "batch_size": batch_size,
        "fallbacks": fallbacks,
        "elbo": fit.elbo[-1] if fit.elbo else None,
    }
    comps = [
        FullGaussian(mu[k][inv], S[k][inv][:, inv], shapes, PosteriorMeta(task=meta.task, ess=meta.ess))
        for k in range(components)
    ]
    w = (w / w.sum()).tolist()
    best = comps[max(range(components), key=lambda k: w[k])].mean
    with torch.no_grad():
        lin.weight.copy_(best[: C * D].view(C, D).to(lin.weight.dtype))
        lin.bias.copy_(best[C * D :].to(lin.bias.dtype))
    return MixtureFullGaussian(comps, w, meta)
