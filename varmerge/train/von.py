"""Full-Gaussian variational online Newton (VON) for multinomial logistic regression.

Two small optimizers on (x, y) tensors, each driven by a frozen settings object and advanced by
``step()``: :class:`FullVON` (Khan & Rue 2023, §1.3.2; settings :class:`VONSettings`) and
:class:`MixtureFullVON`, a mixture of full Gaussians fitted by natural-gradient VI (settings
:class:`MixtureVONSettings`). :func:`full_von` and :func:`mixture_full_von` run them;
:func:`fit_full_von` and :func:`fit_mixture_full_von` run them on a model's single ``nn.Linear``
and return posteriors. :func:`varmerge.train.fit` with ``OptimizerSettings(name="full_von")``
calls :func:`fit_full_von` with ``lr``, ``mc_samples``, ``prior_precision`` and ``trainer.steps``
iterations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from varmerge.posterior import FullGaussian, MixtureFullGaussian, PosteriorMeta
from varmerge.train.batches import Data, as_logits

__all__ = [
    "FullVON",
    "MixtureFit",
    "MixtureFullVON",
    "MixtureVONSettings",
    "VONSettings",
    "fit_full_von",
    "fit_mixture_full_von",
    "full_von",
    "mixture_full_von",
    "softmax_regression_hessian",
]


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VONSettings:
    """Settings of full-Gaussian VON (:class:`FullVON`), checked on construction.

    ``lr``: the step ρ in (0, 1]; ``mc_samples``: samples per iteration (0: at the mean);
    ``num_iters``: iterations; ``prior_precision``: δ of the prior N(μ0, δ⁻¹ I); ``batch_size``:
    one random minibatch of that size per iteration, its terms scaled by N/B (None: full batch);
    ``seed``: of the sampler. Numerics: ``dtype``, ``device`` (None: the inputs' device),
    ``chunk_size`` (examples per block of :func:`softmax_regression_hessian`) and
    ``reduce_inactive`` (see :class:`FullVON`).
    """

    lr: float = 0.1
    mc_samples: int = 3
    num_iters: int = 25
    prior_precision: float = 1.0
    batch_size: int | None = None
    seed: int = 0
    reduce_inactive: bool = True
    dtype: torch.dtype = torch.float64
    device: str | torch.device | None = None
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.lr <= 1:
            raise ValueError(f"VON learning rate ρ must be in (0, 1], got {self.lr}")
        if not self.prior_precision > 0:
            raise ValueError(f"prior precision δ must be > 0, got {self.prior_precision}")
        if not (isinstance(self.mc_samples, int) and self.mc_samples >= 0):
            raise ValueError(f"mc_samples must be an int >= 0, got {self.mc_samples!r}")


@dataclass(frozen=True, kw_only=True)
class MixtureVONSettings(VONSettings):
    """Settings of a mixture of full Gaussians (:class:`MixtureFullVON`), checked on construction.

    Those of :class:`VONSettings` (with ``lr`` β = 0.02 by default; ``device`` and
    ``reduce_inactive`` act on the warm start only, the mixture runs on the CPU) plus
    ``components`` K, ``lr_weights`` β_π (the step of the mixture weights), ``init_spread`` (the
    components' offsets at the start, in standard deviations) and ``warm_start`` (full-VON
    iterations run first, see :func:`mixture_full_von`; 0: none).
    """

    components: int
    lr: float = 0.02
    lr_weights: float = 3e-6
    init_spread: float = 1.0
    warm_start: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if not 0 <= self.lr_weights:
            raise ValueError(f"lr_weights must be >= 0, got {self.lr_weights}")
        if self.warm_start < 0:
            raise ValueError(f"warm_start must be >= 0 full-VON iterations, got {self.warm_start}")

    def warm_start_settings(self) -> VONSettings:
        """The full-VON settings of the warm start: these, for ``warm_start`` iterations."""
        shared = {f.name: getattr(self, f.name) for f in fields(VONSettings)}
        return VONSettings(**{**shared, "num_iters": self.warm_start})


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
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


def _minibatch(xa: Tensor, onehot: Tensor, batch_size: int | None, gen: torch.Generator):
    """``(x, one-hot y, N/B)`` of a random minibatch of ``batch_size`` examples (None: all, scale 1)."""
    N = xa.shape[0]
    if batch_size is not None and batch_size < N:
        sel = torch.randperm(N, generator=gen, device=xa.device)[:batch_size]
        return xa[sel], onehot[sel], N / batch_size
    return xa, onehot, 1.0


def _samples(mean: Tensor, chol: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """(n, P) draws of N(mean, (L Lᵀ)⁻¹), L = ``chol``: θ = mean + L⁻ᵀ ε; n = 0 is the mean itself."""
    if n == 0:
        return mean[None]
    eps = torch.randn(n, mean.numel(), generator=gen, dtype=mean.dtype, device=mean.device)
    return mean[None] + torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T


def _softmax_weights(p: Tensor) -> Tensor:
    """(N, C, C) ``diag(p_i) − p_i p_iᵀ``: the per-example weights of the softmax Hessian."""
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


# --------------------------------------------------------------------------------------------
# full-Gaussian VON
# --------------------------------------------------------------------------------------------
class FullVON:
    """Full-Gaussian VON (Khan & Rue 2023, §1.3.2) for softmax regression, one iteration per :meth:`step`.

    Parameters are θ = [W.flatten() (C·D, class-major), b (C)], the likelihood is
    ``Π_i softmax(W x_i + b)[y_i]`` and the prior ``N(μ0, δ⁻¹ I)`` (``μ0 = prior_mean`` or 0).
    Starting from ``m = init_mean`` (default μ0) and ``S = init_precision · I`` (default δ), each
    step draws θ_s ~ N(m, S⁻¹) (Cholesky of S), forms the expected gradient ĝ and Hessian Ĥ of the
    total NLL over the samples, and updates

        S ← (1 − ρ) S + ρ (Ĥ + δ I),      m ← m − ρ S⁻¹ (ĝ + δ (m − μ0)).

    ``mc_samples=0`` evaluates ĝ, Ĥ at the mean: a damped Newton method whose fixed point is the
    Laplace approximation (MAP, Hessian + δI). ``batch_size`` gives stochastic VON.

    ``reduce_inactive``: a feature that is zero in every example (MNIST border pixels) has zero
    gradient and Hessian, so with the isotropic S0 its weights evolve independently and in closed
    form; they are split off and only the active block is factorised (exact, not an approximation).

    Cost per step, P = C·(D_active + 1): C(C+1)/2 products of (D × N)(N × D) for the Hessian and
    a P × P Cholesky; memory is a few P × P matrices (``dtype`` float32 halves it).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        settings: VONSettings | None = None,
        *,
        init_mean: Tensor | None = None,
        init_precision: float | None = None,
        prior_mean: Tensor | None = None,
    ):
        s = self.settings = settings if settings is not None else VONSettings()
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"x must be (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        C = self.C = int(num_classes)
        y = y.long()
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise ValueError(f"labels must lie in [0, {C}), got range [{int(y.min())}, {int(y.max())}]")
        device = torch.device(s.device) if s.device is not None else x.device
        x, y = x.to(device, s.dtype), y.to(device)
        P = C * x.shape[1] + C
        self.delta = float(s.prior_precision)
        s0 = self.delta if init_precision is None else float(init_precision)
        zeros = torch.zeros(P, dtype=s.dtype, device=device)
        self.mu0 = zeros if prior_mean is None else prior_mean.to(device, s.dtype).flatten()
        self.m_full = self.mu0.clone() if init_mean is None else init_mean.to(device, s.dtype).flatten().clone()
        if self.mu0.numel() != P or self.m_full.numel() != P:
            raise ValueError(f"prior_mean / init_mean must have C·D + C = {P} entries")
        self._split_inactive(x, y, s0)

    def _split_inactive(self, x: Tensor, y: Tensor, s0: float) -> None:
        """The active block (features not zero everywhere, and the bias) and the split-off rest."""
        s, C, (N, D) = self.settings, self.C, x.shape
        dtype, device = x.dtype, x.device
        active = (x != 0).any(0) if s.reduce_inactive else torch.ones(D, dtype=torch.bool, device=device)
        act_idx = torch.nonzero(active).flatten()
        self.Da = int(act_idx.numel()) + 1
        cls = torch.arange(C, device=device)
        w_idx = cls[:, None] * D + act_idx[None, :]  # (C, Da-1)
        b_idx = C * D + cls  # (C,)
        self.full_idx = torch.cat([w_idx, b_idx[:, None]], dim=1).flatten()  # reduced (c, a) -> full index
        self.xa = torch.cat([x[:, act_idx], torch.ones(N, 1, dtype=dtype, device=device)], dim=1)  # (N, Da)
        Pa = C * self.Da
        self.onehot = F.one_hot(y, C).to(dtype)
        self.m = self.m_full[self.full_idx].clone()
        self.mu0_a = self.mu0[self.full_idx]
        self.S = torch.eye(Pa, dtype=dtype, device=device) * s0
        self.H = torch.empty(Pa, Pa, dtype=dtype, device=device)
        self.eye = torch.eye(Pa, dtype=dtype, device=device)
        self.gen = torch.Generator(device=device).manual_seed(int(s.seed))
        self.chol = torch.linalg.cholesky(self.S)
        self.s_inactive = s0  # every split-off coordinate has precision s_inactive and its own mean
        self.inactive = torch.ones(self.mu0.numel(), dtype=torch.bool, device=device)
        self.inactive[self.full_idx] = False

    @torch.no_grad()
    def step(self) -> None:
        """One VON iteration (a fresh minibatch and fresh samples)."""
        s, delta, lr = self.settings, self.delta, self.settings.lr
        xb, yb, scale = _minibatch(self.xa, self.onehot, s.batch_size, self.gen)
        thetas = _samples(self.m, self.chol, s.mc_samples, self.gen)
        g, A = self._expected_gradient(thetas, xb, yb, scale)
        softmax_regression_hessian(xb, A, chunk_size=s.chunk_size, out=self.H)
        self.H.add_(self.eye, alpha=delta)
        self.S = self._new_precision(self.S, self.H, lr)
        chol, info = torch.linalg.cholesky_ex(self.S)
        if int(info) != 0:
            raise RuntimeError("VON precision lost positive definiteness; lower lr or use float64")
        self.chol = chol
        step = torch.cholesky_solve((g + delta * (self.m - self.mu0_a))[:, None], chol).flatten()
        self.m = self.m - lr * step
        # split-off coordinates: zero likelihood gradient/Hessian, scalar recursion
        self.s_inactive = (1 - lr) * self.s_inactive + lr * delta
        idx = self.inactive
        self.m_full[idx] -= lr * delta * (self.m_full[idx] - self.mu0[idx]) / self.s_inactive

    def _expected_gradient(self, thetas: Tensor, xb: Tensor, yb: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """ĝ (Pa,) of the NLL and the (B, C, C) weights of Ĥ, averaged over ``thetas``, times ``scale``."""
        C = self.C
        g = torch.zeros(thetas.shape[1], dtype=xb.dtype, device=xb.device)
        A = torch.zeros(xb.shape[0], C, C, dtype=xb.dtype, device=xb.device)
        for th in thetas:
            p = torch.softmax(xb @ th.view(C, self.Da).T, dim=-1)
            g += ((p - yb).T @ xb).flatten()
            A += _softmax_weights(p)
        k = thetas.shape[0]
        g *= scale / k
        A *= scale / k
        return g, A

    @staticmethod
    def _new_precision(S: Tensor, H: Tensor, lr: float) -> Tensor:
        """(1 − ρ) S + ρ H (in place on S), symmetrised."""
        S.mul_(1 - lr).add_(H, alpha=lr)
        return 0.5 * (S + S.T)

    def result(self) -> tuple[Tensor, Tensor]:
        """The current ``(m, S)`` over all C·D + C parameters."""
        m_full = self.m_full.clone()
        m_full[self.full_idx] = self.m
        P = m_full.numel()
        S_full = torch.zeros(P, P, dtype=m_full.dtype, device=m_full.device)
        S_full[self.inactive, self.inactive] = self.s_inactive
        S_full[self.full_idx[:, None], self.full_idx[None, :]] = self.S
        return m_full, S_full


@torch.no_grad()
def full_von(
    x: Tensor, y: Tensor, num_classes: int, settings: VONSettings | None = None, **start: Tensor | float | None
) -> tuple[Tensor, Tensor]:
    """``settings.num_iters`` steps of :class:`FullVON` on ``(x, y)``; returns ``(m, S)``.

    ``start``: :class:`FullVON`'s ``init_mean``, ``init_precision`` and ``prior_mean``.
    """
    opt = FullVON(x, y, num_classes, settings, **start)
    for _ in range(opt.settings.num_iters):
        opt.step()
    return opt.result()


def _logreg_layer(model: nn.Module, x: Tensor, what: str) -> tuple[str, nn.Linear, Tensor]:
    """``(prefix, the model's single nn.Linear, x flattened to (N, D))``, checked."""
    prefix, lin = _find_linear(model)
    if lin.bias is None:
        raise ValueError(f"{what} expects an nn.Linear with a bias")
    xf = x.reshape(x.shape[0], -1)
    if xf.shape[1] != lin.weight.shape[1]:
        raise ValueError(f"x flattens to {xf.shape[1]} features but the linear layer takes {lin.weight.shape[1]}")
    return prefix, lin, xf


def _theta(lin: nn.Linear) -> Tensor:
    """[W.flatten(), b] of ``lin`` in float64 on the CPU."""
    return torch.cat([lin.weight.detach().flatten(), lin.bias.detach().flatten()]).to("cpu", torch.float64)


@torch.no_grad()
def _load_theta(lin: nn.Linear, theta: Tensor) -> None:
    C, D = lin.weight.shape
    lin.weight.copy_(theta[: C * D].view(C, D).to(lin.weight.dtype))
    lin.bias.copy_(theta[C * D :].to(lin.bias.dtype))


def _posterior_meta(meta: PosteriorMeta | None, optimizer: str, seed: int, n: int, extra: dict) -> PosteriorMeta:
    """A copy of ``meta`` with the optimizer, the seed and ess (N: the precision sums N examples' Hessians)."""
    meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta()
    meta.optimizer = optimizer
    meta.seed = seed if meta.seed is None else meta.seed
    meta.ess = float(n) if meta.ess is None else meta.ess
    meta.extra = {**meta.extra, **extra}
    return meta


def fit_full_von(
    model: nn.Module, x: Tensor, y: Tensor, settings: VONSettings | None = None, *, meta: PosteriorMeta | None = None
) -> FullGaussian:
    """Full-Gaussian VON posterior of the model's single ``nn.Linear`` (softmax regression).

    ``model`` must be logistic regression: exactly one ``nn.Linear`` with weight (C, D) and bias
    (C,), applied to ``x`` flattened to (N, D) (this is checked on a few examples). The VON mean
    starts from the model's weights and the prior is ``N(0, δ⁻¹ I)``. The model's weights are set
    to the final mean (in place) and a :class:`FullGaussian` with shapes ``{"<lin>.weight": (C,
    D), "<lin>.bias": (C,)}`` and meta optimizer ``full_von`` is returned (on CPU, in
    ``settings.dtype``). See :class:`FullVON`.
    """
    s = settings if settings is not None else VONSettings()
    prefix, lin, xf = _logreg_layer(model, x, "full VON")
    C, D = lin.weight.shape
    with torch.no_grad():
        probe = x[: min(8, x.shape[0])].to(lin.weight.device, lin.weight.dtype)
        direct = probe.reshape(probe.shape[0], -1) @ lin.weight.T + lin.bias
        got = as_logits(model(probe)) if not isinstance(model, nn.Linear) else direct
        if got.shape != direct.shape or not torch.allclose(got, direct, rtol=1e-4, atol=1e-4):
            raise ValueError(
                "the model is not plain logistic regression on flattened inputs (its logits differ "
                "from x.flatten() @ Wᵀ + b); full VON needs exactly that"
            )
    m, S = full_von(xf, y, C, s, init_mean=_theta(lin))
    m, S = m.cpu(), S.cpu()
    _load_theta(lin, m)
    recorded = {"lr": s.lr, "mc_samples": s.mc_samples, "num_iters": s.num_iters, "prior_precision": s.prior_precision}
    meta = _posterior_meta(meta, "full_von", s.seed, xf.shape[0], recorded)
    return FullGaussian(m, S, {f"{prefix}weight": (C, D), f"{prefix}bias": (C,)}, meta)


# --------------------------------------------------------------------------------------------
# mixtures of full Gaussians
# --------------------------------------------------------------------------------------------
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


class MixtureFullVON:
    """A mixture of K full Gaussians fitted by natural-gradient VI (Lin, Khan & Schmidt 2019, §4.1) to
    softmax regression with the prior N(0, δ⁻¹ I), one iteration per :meth:`step`.

    With f(θ) = log p(D | θ) + log p(θ) − log q(θ), each step draws ``mc_samples`` θ from each
    component N(μ_k, S_k⁻¹) and updates, with step β = ``lr``,

        S_k ← S_k − β E_k[∇² f],      μ_k ← μ_k + β S_k⁻¹ E_k[∇ f],
        log π_k − log π_K ← (same) + β_π (E_k[f] − E_K[f])        (β_π = ``lr_weights``),

    the natural gradients of the ELBO in the mixture's joint parametrisation. ∇² of the likelihood
    is exact (:func:`softmax_regression_hessian`), ∇ and ∇² of log q are the mixture's closed forms.
    −∇² log q is not positive semi-definite where components overlap: a step that would make S_k
    indefinite uses −∇² log q ≈ S_k for that component (the non-overlapping limit, which is full
    VON's update) and is counted in ``fallbacks``. With K = 1 and ``mc_samples=0`` this is
    :class:`FullVON` at the mean step for step. ``batch_size`` draws one minibatch per step, shared
    by the components.

    θ is in (class, feature) order with the bias last per class. Start: precisions
    ``init_precision`` ((P, P); default δ I) and means ``init_mean`` (default 0) plus offsets drawn
    from N(0, ``init_spread``² · init_precision⁻¹) (the first component at ``init_mean`` itself),
    weights 1/K. ``settings.warm_start`` > 0 first runs that many :class:`FullVON` steps from
    ``init_mean`` (same ``lr``, ``mc_samples``, prior, minibatches and seed; not with
    ``init_precision``) and starts from the Gaussian they reach: its precision, and its mean.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        settings: MixtureVONSettings,
        *,
        init_mean: Tensor | None = None,
        init_precision: Tensor | None = None,
    ):
        s, dtype = settings, settings.dtype
        self.settings = s
        if s.warm_start:
            if init_precision is not None:
                raise ValueError("a warm start begins at full VON's precision; pass no init_precision with it")
            init_mean, init_precision = _warm_start(x, y, num_classes, s, init_mean)
        N, D = x.shape
        self.C, self.Da, K, P = int(num_classes), D + 1, int(s.components), int(num_classes) * (D + 1)
        self.xa = torch.cat([x.to(dtype), torch.ones(N, 1, dtype=dtype)], dim=1)  # bias as a last feature
        self.onehot = F.one_hot(y.long(), self.C).to(dtype)
        self.delta = float(s.prior_precision)
        self.gen = torch.Generator().manual_seed(int(s.seed))
        m0 = torch.zeros(P, dtype=dtype) if init_mean is None else init_mean.to(dtype).flatten()
        if m0.numel() != P:
            raise ValueError(f"init_mean must have C·(D+1) = {P} entries, got {m0.numel()}")
        S0 = torch.eye(P, dtype=dtype) * self.delta if init_precision is None else init_precision.to(dtype)
        if S0.shape != (P, P):
            raise ValueError(f"init_precision must be ({P}, {P}), got {tuple(S0.shape)}")
        eps = torch.randn(K, P, generator=self.gen, dtype=dtype) * s.init_spread
        offsets = torch.linalg.solve_triangular(torch.linalg.cholesky(S0).T, eps.T, upper=True).T
        offsets[0] = 0
        self.mu = m0[None] + offsets
        self.S = S0.expand(K, P, P).clone()
        self.eta = torch.zeros(K, dtype=dtype)  # log π up to a constant
        self.eye = torch.eye(P, dtype=dtype)
        self.fallbacks = 0
        self.chol = torch.linalg.cholesky(self.S)
        self.elbo: list[float] = []

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: every component's natural-gradient step, then the weights'."""
        s, K = self.settings, self.mu.shape[0]
        xb, yb, scale = _minibatch(self.xa, self.onehot, s.batch_size, self.gen)
        log_pi = torch.log_softmax(self.eta, 0)
        half_logdet = torch.diagonal(self.chol, dim1=-2, dim2=-1).log().sum(-1)
        new_S, new_chol, new_mu = self.S.clone(), self.chol.clone(), self.mu.clone()
        fbar = torch.zeros(K, dtype=self.mu.dtype)
        for k in range(K):
            thetas = _samples(self.mu[k], self.chol[k], s.mc_samples, self.gen)
            g_f, h_q, A, fbar[k] = self._expectations(thetas, (xb, yb, scale), log_pi, half_logdet)
            h_lik = softmax_regression_hessian(xb, A * scale, chunk_size=s.chunk_size)  # E[−∇² log p(D | θ)]
            new_S[k], new_chol[k] = self._new_precision(self.S[k], h_lik, h_q, self.delta * self.eye, s.lr)
            new_mu[k] = self.mu[k] + s.lr * torch.cholesky_solve(g_f[:, None], new_chol[k]).flatten()
        # the ELBO estimate at the iterate the samples came from (up to log p's constant)
        self.elbo.append(float((log_pi.exp() * fbar).sum()))
        if K > 1:
            self.eta = self.eta + s.lr_weights * (fbar - fbar[-1])
        self.S, self.chol, self.mu = new_S, new_chol, new_mu

    def _expectations(self, thetas: Tensor, batch: tuple, log_pi: Tensor, half_logdet: Tensor):
        """E[∇ f], E[−∇² log q], the (B, C, C) weights of E[−∇² log p(D | θ)] / scale and E[f] over ``thetas``."""
        xb, yb, scale = batch
        P, dtype, delta = thetas.shape[1], thetas.dtype, self.delta
        g_f = torch.zeros(P, dtype=dtype)
        h_q = torch.zeros(P, P, dtype=dtype)  # E[−∇² log q]
        A = torch.zeros(xb.shape[0], self.C, self.C, dtype=dtype)
        f = torch.zeros((), dtype=dtype)
        for th in thetas:
            logits = xb @ th.view(self.C, self.Da).T
            p = torch.softmax(logits, -1)
            ll = scale * (yb * torch.log_softmax(logits, -1)).sum()
            g_lik = scale * ((yb - p).T @ xb).flatten()  # ∇ log p(D | θ)
            logq, g_q, hess_q = _log_mixture_derivatives(th, self.mu, self.S, log_pi, half_logdet)
            g_f += g_lik - delta * th - g_q
            h_q -= hess_q
            A += _softmax_weights(p)
            f += ll - 0.5 * delta * th.dot(th) - logq
        n = thetas.shape[0]
        return g_f / n, h_q / n, A / n, f / n

    def _new_precision(self, S_k: Tensor, h_lik: Tensor, h_q: Tensor, prior: Tensor, lr: float):
        """``(S_k − β E_k[∇² f], its Cholesky factor)``, or VON's update where that is not PD (a fallback)."""
        cand = S_k + lr * (h_lik + prior - h_q)
        cand = 0.5 * (cand + cand.T)
        L, info = torch.linalg.cholesky_ex(cand)
        if int(info) != 0:
            self.fallbacks += 1
            cand = (1 - lr) * S_k + lr * (h_lik + prior)
            L = torch.linalg.cholesky(cand)
        return cand, L

    def result(self) -> MixtureFit:
        return MixtureFit(self.mu, self.S, torch.softmax(self.eta, 0), self.fallbacks, self.elbo)


def _class_major(C: int, D: int) -> Tensor:
    """Index map: entry i of :func:`mixture_full_von`'s (class, feature + bias) vector is entry
    ``idx[i]`` of the [W.flatten(), b] vector of :func:`full_von` and :class:`FullGaussian`."""
    idx = torch.empty(C * (D + 1), dtype=torch.long)
    for c in range(C):
        idx[c * (D + 1) : c * (D + 1) + D] = torch.arange(c * D, (c + 1) * D)
        idx[c * (D + 1) + D] = C * D + c
    return idx


def _warm_start(x: Tensor, y: Tensor, C: int, settings: MixtureVONSettings, init_mean: Tensor | None):
    """``(mean, precision)`` in the mixture's order after ``settings.warm_start`` full-VON steps from ``init_mean``."""
    idx = _class_major(C, x.shape[1])
    theta0 = None
    if init_mean is not None:
        flat = init_mean.flatten()
        if flat.numel() != idx.numel():
            raise ValueError(f"init_mean must have C·(D+1) = {idx.numel()} entries, got {flat.numel()}")
        theta0 = torch.empty_like(flat)
        theta0[idx] = flat
    m, S = full_von(x, y, C, settings.warm_start_settings(), init_mean=theta0)
    return m[idx], S[idx][:, idx]


@torch.no_grad()
def mixture_full_von(
    x: Tensor, y: Tensor, num_classes: int, settings: MixtureVONSettings, **start: Tensor | None
) -> MixtureFit:
    """``settings.num_iters`` steps of :class:`MixtureFullVON` on ``(x, y)`` (on the CPU).

    ``start``: :class:`MixtureFullVON`'s ``init_mean`` and ``init_precision``.
    """
    opt = MixtureFullVON(x, y, num_classes, settings, **start)
    for _ in range(settings.num_iters):
        opt.step()
    return opt.result()


def fit_mixture_full_von(
    model: nn.Module, x: Tensor, y: Tensor, settings: MixtureVONSettings, *, meta: PosteriorMeta | None = None
) -> MixtureFullGaussian:
    """:func:`mixture_full_von` on the model's single ``nn.Linear``: a :class:`MixtureFullGaussian`
    (on CPU) whose components are in the [W, b] order of :func:`fit_full_von`; the model's weights
    become the mean of the heaviest component.

    The components start at the model's weights (the first exactly, the others offset), with
    precision δ I, or, with ``settings.warm_start`` > 0, from the full-VON Gaussian reached from
    there. With a small ``init_spread`` the components then start overlapping where the posterior
    is, so the mixture's own iterations go to shaping it rather than to the walk from the prior
    that every component would otherwise repeat.
    """
    s = settings
    prefix, lin, xf = _logreg_layer(model, x, "mixture VON")
    C, D = lin.weight.shape
    idx = _class_major(C, D)
    fit = mixture_full_von(xf.cpu(), y.cpu(), C, s, init_mean=_theta(lin)[idx])
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    recorded = {
        "lr": s.lr,
        "lr_weights": s.lr_weights,
        "mc_samples": s.mc_samples,
        "num_iters": s.num_iters,
        "prior_precision": s.prior_precision,
        "components": s.components,
        "init_spread": s.init_spread,
        "warm_start": s.warm_start,
        "batch_size": s.batch_size,
        "fallbacks": fit.fallbacks,
        "elbo": fit.elbo[-1] if fit.elbo else None,
    }
    meta = _posterior_meta(meta, "mixture_full_von", s.seed, xf.shape[0], recorded)
    shapes = {f"{prefix}weight": (C, D), f"{prefix}bias": (C,)}
    comps = [
        FullGaussian(mu[inv], S[inv][:, inv], shapes, PosteriorMeta(task=meta.task, ess=meta.ess))
        for mu, S in zip(fit.means, fit.precisions, strict=True)
    ]
    w = (fit.weights / fit.weights.sum()).tolist()
    _load_theta(lin, comps[max(range(s.components), key=lambda k: w[k])].mean)
    return MixtureFullGaussian(comps, w, meta)
