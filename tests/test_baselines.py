"""Baseline merging rules (TIES, DARE, SLERP, model soup, RegMean, ESM): oracles, properties,
batching, bad input, and their use through the config and the pipeline."""

import math

import numpy as np
import pytest
import torch
from helpers import random_models
from torch import nn

from varmerge import merge
from varmerge.grid import simplex_grid
from varmerge.merging import baselines

F64 = torch.float64
NEW_RULES = ["ties", "dare", "slerp", "model_soup", "regmean", "esm"]


def flat(sd, keys=None):
    keys = keys or list(sd)
    return torch.cat([sd[k].reshape(-1) for k in keys])


def agreeing_models(T=3, seed=0, dtype=F64):
    """θ0 and T models whose task vectors share one sign pattern and have no zero entries."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 4), "b": (5,), "head": (3, 2, 2)}
    base = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    sign = {k: torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0).to(dtype) for k, s in shapes.items()}
    means = [
        {k: base[k] + sign[k] * (0.1 + torch.rand(s, generator=g, dtype=dtype)) for k, s in shapes.items()}
        for _ in range(T)
    ]
    return base, means


def task_arithmetic(base, means, alpha):
    return {k: base[k] + sum(a * (m[k] - base[k]) for a, m in zip(alpha.tolist(), means)) for k in base}


def assert_dicts_close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ------------------------------------------------------------------------------------ registry
def test_new_rules_are_registered_with_their_needs():
    assert set(NEW_RULES) <= set(merge.merge_names())
    for name in ("ties", "dare", "slerp", "esm"):
        assert merge.get_method(name).needs_base
    assert not merge.get_method("model_soup").needs_base
    assert merge.get_method("regmean").needs_calibration
    assert not merge.get_method("ties").needs_calibration


# ---------------------------------------------------------------------------------------- TIES
def ties_oracle(base, means, alpha, density, trim):
    """Entry-by-entry TIES in numpy (top-k by sorting; α-weighted election and disjoint mean)."""
    keys = list(base)
    T = len(means)
    taus = [{k: (m[k] - base[k]).numpy().ravel() for k in keys} for m in means]
    trimmed = [dict(t) for t in taus]
    for t in range(T):
        groups = [keys] if trim == "global" else [[k] for k in keys]
        for group in groups:
            v = np.concatenate([taus[t][k] for k in group])
            kk = math.ceil(density * v.size)
            thr = np.sort(np.abs(v))[::-1][kk - 1]
            for k in group:
                trimmed[t][k] = np.where(np.abs(taus[t][k]) >= thr, taus[t][k], 0.0)
    out = {}
    for k in keys:
        res = np.zeros_like(trimmed[0][k])
        for i in range(res.size):
            vals = [trimmed[t][k][i] for t in range(T)]
            gamma = np.sign(sum(a * v for a, v in zip(alpha, vals)))
            num = sum(a * v for a, v in zip(alpha, vals) if v != 0 and np.sign(v) == gamma)
            den = sum(a for a, v in zip(alpha, vals) if v != 0 and np.sign(v) == gamma)
            res[i] = num / den if gamma != 0 and den > 0 else 0.0
        out[k] = base[k] + torch.from_numpy(res).reshape(base[k].shape)
    return out


def test_ties_full_density_with_agreeing_signs_is_task_arithmetic():
    base, means = agreeing_models()
    grid = simplex_grid(3, 0.1)
    got = baselines.ties(base, means, grid, density=1.0)
    for g in range(len(grid)):
        want = task_arithmetic(base, means, grid[g])
        for k in base:
            torch.testing.assert_close(got[k][g], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trim", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_ties_matches_entrywise_oracle(trim, density):
    means, _ = random_models(3, seed=31)
    base = random_models(1, seed=32)[0][0]
    for alpha in ([0.2, 0.5, 0.3], [0.0, 0.4, 0.6], [1 / 3] * 3):
        a = torch.tensor(alpha, dtype=F64)
        got = baselines.ties(base, means, a, density=density, trim=trim)
        want = ties_oracle(base, means, alpha, density, trim)
        assert_dicts_close(got, want, rtol=1e-12, atol=1e-12)


def test_ties_vertex_returns_trimmed_task_vector_and_scale():
    means, _ = random_models(3, seed=33)
    base = random_models(1, seed=34)[0][0]
    e = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    got = baselines.ties(base, means, e, density=0.5)
    tau = flat(means[1]) - flat(base)
    kept = (flat(got) - flat(base)) != 0
    assert int(kept.sum()) == math.ceil(0.5 * tau.numel())
    torch.testing.assert_close((flat(got) - flat(base))[kept], tau[kept])
    assert tau[kept].abs().min() >= tau[~kept].abs().max()
    half = baselines.ties(base, means, e, density=0.5, scale=0.5)
    torch.testing.assert_close(flat(half) - flat(base), 0.5 * (flat(got) - flat(base)))


# ---------------------------------------------------------------------------------------- DARE
def test_dare_without_dropping_is_task_arithmetic():
    means, _ = random_models(3, seed=40)
    base = random_models(1, seed=41)[0][0]
    grid = simplex_grid(3, 0.2)
    got = baselines.dare(base, means, grid, drop=0.0, seed=5)
    want = merge.task_arithmetic(base, means, grid)
    assert_dicts_close(got, want, rtol=1e-13, atol=1e-13)


def test_dare_is_deterministic_per_seed_and_rescales_survivors():
    means, _ = random_models(3, seed=42, shapes={"w": (60, 50), "b": (60,)})
    base = random_models(1, seed=43, shapes={"w": (60, 50), "b": (60,)})[0][0]
    a = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    one = baselines.dare(base, means, a, drop=0.7, seed=3)
    again = baselines.dare(base, means, a, drop=0.7, seed=3)
    other = baselines.dare(base, means, a, drop=0.7, seed=4)
    for k in base:
        assert torch.equal(one[k], again[k])
    assert not torch.equal(one["w"], other["w"])
    delta, tau = flat(one) - flat(base), flat(means[2]) - flat(base)
    kept = delta != 0
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3)
    assert abs(1 - kept.double().mean().item() - 0.7) < 0.03  # ~70 % dropped
    # the same masks for every α row of a batch
    grid = simplex_grid(3, 0.25)
    batch = baselines.dare(base, means, grid, drop=0.7, seed=3)
    for g in (0, 5, len(grid) - 1):
        row = baselines.dare(base, means, grid[g], drop=0.7, seed=3)
        for k in base:
            torch.testing.assert_close(batch[k][g], row[k], rtol=1e-13, atol=1e-13)


def test_dare_averages_to_task_arithmetic_over_seeds():
    shapes = {"w": (8, 5), "b": (8,)}
    means, _ = random_models(3, seed=44, shapes=shapes)
    base = random_models(1, seed=45, shapes=shapes)[0][0]
    a = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    p, n = 0.5, 600
    runs = torch.stack([flat(baselines.dare(base, means, a, drop=p, seed=s)) for s in range(n)])
    ta = flat(merge.task_arithmetic(base, means, a))
    taus = torch.stack([flat(m) - flat(base) for m in means])
    # per entry Var = Σ α_t² τ_t² p / (1 − p); the mean of n runs is within 5 standard errors
    se = ((a[:, None] ** 2 * taus**2).sum(0) * p / (1 - p) / n).sqrt()
    assert ((runs.mean(0) - ta).abs() <= 5 * se + 1e-12).all()
    assert (runs.std(0) > 0).any()


# --------------------------------------------------------------------------------------- SLERP
def test_slerp_two_models_endpoints_angle_and_norm():
    """In the plane spanned by two equal-norm task vectors, slerp moves at constant speed in angle."""
    base = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    u = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    v = torch.tensor([math.cos(1.2), math.sin(1.2), 0.0], dtype=F64)
    means = [{"w": base["w"] + 3 * u}, {"w": base["w"] + 3 * v}]
    for t in (0.0, 1.0):
        got = baselines.slerp(base, means, torch.tensor([1 - t, t], dtype=F64))
        assert torch.equal(got["w"], means[int(t)]["w"])
    for t in (0.1, 0.25, 0.5, 0.9):
        tau = baselines.slerp(base, means, torch.tensor([1 - t, t], dtype=F64))["w"] - base["w"]
        want = 3 * torch.tensor([math.cos(1.2 * t), math.sin(1.2 * t), 0.0], dtype=F64)
        torch.testing.assert_close(tau, want, rtol=1e-12, atol=1e-12)


def test_slerp_keeps_equal_norms_per_tensor_and_for_many_models():
    g = torch.Generator().manual_seed(50)
    shapes = {"w": (6, 7), "b": (6,)}
    base = {k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()}
    means = []
    for _ in range(3):
        d = {k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()}
        means.append({k: base[k] + 2.5 * d[k] / d[k].norm() for k in shapes})
    grid = simplex_grid(3, 0.1)
    got = baselines.slerp(base, means, grid)
    for k in shapes:
        norms = (got[k] - base[k]).reshape(len(grid), -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 2.5), rtol=1e-12, atol=1e-12)
    for t in range(3):  # vertices are the models
        row = (grid[:, t] == 1).nonzero()[0, 0]
        for k in shapes:
            torch.testing.assert_close(got[k][row], means[t][k], rtol=1e-14, atol=1e-14)


def test_slerp_colinear_and_zero_vectors_fall_back_to_linear():
    base = {"w": torch.zeros(4, dtype=F64), "z": torch.ones(2, dtype=F64)}
    d = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=F64)
    means = [{"w": d, "z": torch.ones(2, dtype=F64)}, {"w": 3 * d, "z": torch.ones(2, dtype=F64)}]
    a = torch.tensor([0.6, 0.4], dtype=F64)
    got = baselines.slerp(base, means, a)
    torch.testing.assert_close(got["w"], 0.6 * d + 0.4 * 3 * d)
    torch.testing.assert_close(got["z"], torch.ones(2, dtype=F64))  # zero task vectors
    anti = [{"w": d, "z": torch.ones(2, dtype=F64)}, {"w": -d, "z": torch.ones(2, dtype=F64)}]
    torch.testing.assert_close(baselines.slerp(base, anti, a)["w"], 0.2 * d)
    assert torch.isfinite(baselines.slerp(base, anti, torch.tensor([0.5, 0.5], dtype=F64))["w"]).all()


def test_slerp_of_weights_without_base():
    u = {"w": torch.tensor([2.0, 0.0], dtype=F64)}
    v = {"w": torch.tensor([0.0, 2.0], dtype=F64)}
    got = baselines.slerp(None, [u, v], torch.tensor([0.5, 0.5], dtype=F64))
    torch.testing.assert_close(got["w"], torch.tensor([math.sqrt(2), math.sqrt(2)], dtype=F64))


# ----------------------------------------------------------------------------------- soup
def test_model_soup_is_the_uniform_average_for_every_alpha():
    means, _ = random_models(3, seed=60)
    grid = simplex_grid(3, 0.25)
    got = baselines.model_soup(means, grid)
    for k in means[0]:
        want = sum(m[k] for m in means) / 3
        for g in range(len(grid)):
            torch.testing.assert_close(got[k][g], want, rtol=1e-14, atol=1e-14)
    one = baselines.model_soup(means, [1.0, 0.0, 0.0])
    torch.testing.assert_close(one["head"], sum(m["head"] for m in means) / 3)


# ---------------------------------------------------------------------------------------- ESM
def esm_oracle(base, means, alpha, rank):
    """numpy/scipy: per matrix, top-`rank` SVD bases, scipy.linalg.orth of the stacks, project."""
    from scipy.linalg import orth

    out = {}
    for k, b in base.items():
        taus = [(m[k] - b).numpy() for m in means]
        if b.ndim < 2:
            out[k] = b + torch.from_numpy(sum(a * t for a, t in zip(alpha, taus)))
            continue
        mats = [t.reshape(b.shape[0], -1) for t in taus]
        us, vs = [], []
        for mt in mats:
            u, s, vh = np.linalg.svd(mt, full_matrices=False)
            us.append(u[:, :rank])
            vs.append(vh[:rank].T)
        qu, qv = orth(np.concatenate(us, 1)), orth(np.concatenate(vs, 1))
        fused = sum(a * (qu @ qu.T @ mt @ qv @ qv.T) for a, mt in zip(alpha, mats))
        out[k] = b + torch.from_numpy(fused.reshape(b.shape))
    return out


def test_esm_full_rank_is_task_arithmetic():
    shapes = {"w": (6, 9), "conv": (4, 3, 2, 2), "b": (6,)}
    means, _ = random_models(3, seed=70, shapes=shapes)
    base = random_models(1, seed=71, shapes=shapes)[0][0]
    grid = simplex_grid(3, 0.1)
    want = merge.task_arithmetic(base, means, grid)
    for kw in ({"rank": 100}, {"energy": 1.0}, {"rank": 6}):
        got = baselines.esm(base, means, grid, **kw)
        assert_dicts_close(got, want, rtol=1e-11, atol=1e-11)


def test_esm_truncated_matches_projection_oracle_and_drops_energy():
    shapes = {"w": (12, 10), "b": (12,)}
    means, _ = random_models(3, seed=72, shapes=shapes)
    base = random_models(1, seed=73, shapes=shapes)[0][0]
    a = [0.2, 0.3, 0.5]
    got = baselines.esm(base, means, torch.tensor(a, dtype=F64), rank=2)
    assert_dicts_close(got, esm_oracle(base, means, a, rank=2), rtol=1e-10, atol=1e-10)
    # the fused update lies in a ≤ 6-dimensional row space, so it has rank ≤ 6 < 10
    s = torch.linalg.svdvals(got["w"] - base["w"])
    assert (s[6:] < 1e-10).all() and s[5] > 1e-6
    default = baselines.esm(base, means, torch.tensor(a, dtype=F64))  # ⌊10 / 3⌋ = 3 per task
    assert_dicts_close(default, esm_oracle(base, means, a, rank=3), rtol=1e-10, atol=1e-10)


def test_esm_energy_keeps_the_fewest_directions_reaching_it():
    g = torch.Generator().manual_seed(74)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    s = torch.tensor([10.0, 1.0, 0.5, 0.1, 0, 0, 0, 0], dtype=F64)
    tau = q1 @ torch.diag(s) @ q2.T
    base = {"w": torch.zeros(8, 8, dtype=F64)}
    got = baselines.esm(base, [{"w": tau}, {"w": tau}], torch.tensor([0.5, 0.5], dtype=F64), energy=0.98)
    torch.testing.assert_close(got["w"], 10.0 * q1[:, :1] @ q2[:, :1].T, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ RegMean
class TwoLayer(nn.Module):
    def __init__(self, d_in=5, hidden=4, out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, out, bias=False)
        self.norm = nn.LayerNorm(out)

    def forward(self, x):
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


def linear_problem(seed=80, T=3, d_in=6, out=3):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d_in, out).to(F64)
    sds = [
        {"weight": torch.randn(out, d_in, generator=g, dtype=F64), "bias": torch.randn(out, generator=g, dtype=F64)}
        for _ in range(T)
    ]
    xs = [torch.randn(n, d_in, generator=g, dtype=F64) * (1 + t) for t, n in enumerate((20, 35, 50)[:T])]
    return model, sds, xs


def stacked_lstsq(sds, xs, alpha, ridge):
    """Oracle: min Σ_t α_t [‖X̃_t(W̃ − W̃_t)ᵀ‖²/N_t + ρ_t‖W̃ − W̃_t‖²] as one stacked least squares."""
    rows, targets = [], []
    for a, sd, x in zip(alpha, sds, xs):
        xt = np.concatenate([x.numpy(), np.ones((len(x), 1))], 1)
        wt = np.concatenate([sd["weight"].numpy(), sd["bias"].numpy()[:, None]], 1)
        rho = ridge * np.mean(np.diag(xt.T @ xt / len(x)))
        w = math.sqrt(a / len(x))
        rows += [w * xt, math.sqrt(a * rho) * np.eye(xt.shape[1])]
        targets += [w * xt @ wt.T, math.sqrt(a * rho) * wt.T]
    sol = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0].T
    return torch.from_numpy(sol[:, :-1]), torch.from_numpy(sol[:, -1])


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_regmean_on_a_linear_model_is_the_joint_least_squares_solution(ridge):
    model, sds, xs = linear_problem()
    grams = baselines.calibration_grams(model, sds, xs)
    assert set(grams[0]) == {"weight"} and grams[0]["weight"].shape == (7, 7)  # bias coordinate
    for alpha in ([0.2, 0.3, 0.5], [0.7, 0.0, 0.3], [1 / 3] * 3):
        got = baselines.regmean(sds, torch.tensor(alpha, dtype=F64), grams=grams, ridge=ridge)
        w, b = stacked_lstsq(sds, xs, alpha, ridge)
        torch.testing.assert_close(got["weight"], w, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["bias"], b, rtol=1e-9, atol=1e-9)


def test_regmean_vertex_returns_the_model_and_diagonal_grams_average_per_feature():
    model, sds, xs = linear_problem(seed=81)
    grams = baselines.calibration_grams(model, sds, xs)
    for t in range(3):
        e = torch.zeros(3, dtype=F64)
        e[t] = 1
        got = baselines.regmean(sds, e, grams=grams)
        assert_dicts_close(got, sds[t], rtol=1e-10, atol=1e-10)
    # off_diagonal = 0: each input feature's column is an average weighted by α_t (G_t,jj + ρ_t)
    a = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    got = baselines.regmean(sds, a, grams=grams, off_diagonal=0.0, ridge=0.0)
    d = torch.stack([torch.diagonal(g["weight"]) for g in grams])  # (T, 7)
    W = torch.stack([torch.cat([s["weight"], s["bias"][:, None]], 1) for s in sds])  # (T, 3, 7)
    want = (a[:, None, None] * d[:, None, :] * W).sum(0) / (a[:, None] * d).sum(0)
    torch.testing.assert_close(got["weight"], want[:, :-1])


def test_calibration_grams_use_each_tasks_finetuned_layers():
    torch.manual_seed(0)
    model = TwoLayer().to(F64)
    g = torch.Generator().manual_seed(82)
    sds = [
        {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in model.named_parameters()}
        for _ in range(2)
    ]
    xs = [torch.randn(13, 5, generator=g, dtype=F64) for _ in range(2)]
    grams = baselines.calibration_grams(model, sds, xs, batch_size=4)
    for t in range(2):
        x1 = torch.cat([xs[t], torch.ones(13, 1, dtype=F64)], 1)
        torch.testing.assert_close(grams[t]["fc1.weight"], x1.T @ x1 / 13)
        h = torch.relu(xs[t] @ sds[t]["fc1.weight"].T + sds[t]["fc1.bias"])
        torch.testing.assert_close(grams[t]["fc2.weight"], h.T @ h / 13)  # no bias coordinate
    at_base = baselines.calibration_grams(model, None, xs)
    h0 = torch.relu(model.fc1(xs[0]))
    torch.testing.assert_close(at_base[0]["fc2.weight"], h0.T @ h0 / 13)
    # LayerNorm parameters are α-averaged
    a = torch.tensor([0.25, 0.75], dtype=F64)
    got = baselines.regmean(sds, a, grams=grams)
    torch.testing.assert_close(got["norm.weight"], 0.25 * sds[0]["norm.weight"] + 0.75 * sds[1]["norm.weight"])


def test_regmean_conv_layer_is_stationary_for_the_output_error():
    """Autograd oracle through F.conv2d (no unfolding): the merged conv minimises the objective."""
    g = torch.Generator().manual_seed(83)
    model = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(F64)
    sds = [
        {"weight": torch.randn(3, 2, 3, 3, generator=g, dtype=F64), "bias": torch.randn(3, generator=g, dtype=F64)}
        for _ in range(3)
    ]
    xs = [torch.randn(4 + t, 2, 6, 5, generator=g, dtype=F64) for t in range(3)]
    grams = baselines.calibration_grams(model, sds, xs, batch_size=3)
    assert grams[0]["weight"].shape == (19, 19)
    a = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    ridge = 0.01
    got = baselines.regmean(sds, a, grams=grams, ridge=ridge)
    w = got["weight"].clone().requires_grad_(True)
    b = got["bias"].clone().requires_grad_(True)
    obj = 0
    for at, sd, x, gr in zip(a, sds, xs, grams):
        diff = nn.functional.conv2d(x, w - sd["weight"], b - sd["bias"], stride=2, padding=1)
        rows = diff.shape[0] * diff.shape[2] * diff.shape[3]
        rho = ridge * torch.diagonal(gr["weight"]).mean()
        obj = obj + at * (
            (diff**2).sum() / rows + rho * (((w - sd["weight"]) ** 2).sum() + ((b - sd["bias"]) ** 2).sum())
        )
    gw, gb = torch.autograd.grad(obj, (w, b))
    assert gw.abs().max() < 1e-10 and gb.abs().max() < 1e-10


def test_calibration_grams_count_only_real_tokens():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.emb(input_ids)).mean(1)

    torch.manual_seed(1)
    model = Tiny().to(F64)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]])
    mask = (ids != 0).long()
    grams = baselines.calibration_grams(model, None, [{"input_ids": ids, "attention_mask": mask}])
    e = model.emb(ids)[mask.bool()]
    e1 = torch.cat([e, torch.ones(len(e), 1, dtype=F64)], 1)
    torch.testing.assert_close(grams[0]["proj.weight"], e1.T @ e1 / 6)
    assert "emb.weight" not in grams[0]


# ----------------------------------------------------------------------------- batching
def _run_rule(name, base, means, alpha, grams, chunk=None):
    kw = {"chunk_elems": chunk} if chunk and name in ("ties", "dare", "esm", "model_soup") else {}
    if name == "ties":
        return baselines.ties(base, means, alpha, density=0.4, **kw)
    if name == "dare":
        return baselines.dare(base, means, alpha, drop=0.5, seed=1, **kw)
    if name == "slerp":
        return baselines.slerp(base, means, alpha, max_block_elems=chunk or (1 << 22))
    if name == "model_soup":
        return baselines.model_soup(means, alpha, **kw)
    if name == "esm":
        return baselines.esm(base, means, alpha, rank=1, **kw)
    return baselines.regmean(means, alpha, grams=grams, max_batch_bytes=chunk or (1 << 28))


@pytest.mark.parametrize("name", NEW_RULES)
def test_batched_alpha_equals_row_by_row(name):
    torch.manual_seed(2)
    model = TwoLayer()
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(90)
    means = [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    grams = baselines.calibration_grams(model, means, [torch.randn(30, 5, generator=g) for _ in range(3)])
    grid = simplex_grid(3, 0.1)
    batched = _run_rule(name, base, means, grid, grams)
    small = _run_rule(name, base, means, grid, grams, chunk=3)
    for k in base:
        assert batched[k].shape == (len(grid), *base[k].shape) and batched[k].dtype == torch.float32
        torch.testing.assert_close(small[k], batched[k], rtol=1e-5, atol=1e-6)
    for i in (0, 7, 33, len(grid) - 1):
        row = _run_rule(name, base, means, grid[i], grams)
        for k in base:
            torch.testing.assert_close(row[k], batched[k][i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NEW_RULES)
def test_inputs_are_not_mutated(name):
    model, sds, xs = linear_problem(seed=91)
    grams = baselines.calibration_grams(model, sds, xs)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = [{k: v.clone() for k, v in d.items()} for d in [base, *sds]]
    gram_before = [g["weight"].clone() for g in grams]
    _run_rule(name, base, sds, simplex_grid(3, 0.5), grams)
    for b, d in zip(before, [base, *sds]):
        for k in d:
            assert torch.equal(b[k], d[k])
    for gb, g in zip(gram_before, grams):
        assert torch.equal(gb, g["weight"])


# ----------------------------------------------------------------------------- bad input
def _problem():
    model, sds, xs = linear_problem(seed=92)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    return base, sds, baselines.calibration_grams(model, sds, xs)


A3 = [0.2, 0.3, 0.5]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b, m, g: baselines.ties(b, m, A3, density=0.0), "density must be in \\(0, 1\\]"),
        (lambda b, m, g: baselines.ties(b, m, A3, density=1.5), "density must be in \\(0, 1\\]"),
        (lambda b, m, g: baselines.ties(b, m, A3, density=float("nan")), "density must be a finite"),
        (lambda b, m, g: baselines.ties(b, m, A3, trim="layer"), "trim must be"),
        (lambda b, m, g: baselines.dare(b, m, A3, drop=1.0), "drop must be in \\[0, 1\\)"),
        (lambda b, m, g: baselines.dare(b, m, A3, drop=-0.1), "drop must be in \\[0, 1\\)"),
        (lambda b, m, g: baselines.dare(b, m, A3, seed=1.5), "seed must be an integer"),
        (lambda b, m, g: baselines.esm(b, m, A3, rank=0), "rank must be an integer >= 1"),
        (lambda b, m, g: baselines.esm(b, m, A3, rank=2, energy=0.9), "rank or energy, not both"),
        (lambda b, m, g: baselines.esm(b, m, A3, energy=0.0), "energy must be in \\(0, 1\\]"),
        (lambda b, m, g: baselines.esm(b, m, A3, scale=float("inf")), "scale must be a finite"),
        (
            lambda b, m, g: baselines.slerp({"weight": b["weight"]}, m, A3),
            "base\\[0\\] keys do not match: missing \\['bias'\\]",
        ),
        (lambda b, m, g: baselines.slerp(b, m, A3, dot_threshold=0.0), "dot_threshold"),
        (lambda b, m, g: baselines.ties(dict(b, bias=b["bias"].float()), m, A3), "base.*'bias'.*dtype"),
        (lambda b, m, g: baselines.dare(b, m, [0.5, 0.6, -0.1]), "negative"),
        (lambda b, m, g: baselines.esm(b, m, [0.5, 0.4, 0.2]), "sums to"),
        (lambda b, m, g: baselines.model_soup(m, [0.5, 0.5]), "2 entries per row but there are 3"),
        (lambda b, m, g: baselines.slerp(b, m, [[[1.0, 0, 0]]]), "shape"),
        (lambda b, m, g: baselines.model_soup([m[0], {"weight": m[1]["weight"]}, m[2]], A3), "missing \\['bias'\\]"),
        (lambda b, m, g: baselines.ties(b, [m[0], dict(m[1], weight=m[1]["weight"][:2]), m[2]], A3), "'weight'.*shape"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=g[:2]), "3 models but 2 sets"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=g[0]), "one mapping per task"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=[{"weight": x["weight"][:3, :3]} for x in g]), "Gram matrix"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=[{"other": x["weight"]} for x in g]), "not a parameter"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=[g[0], {}, g[2]]), "grams\\[1\\] covers"),
        (
            lambda b, m, g: baselines.regmean([{"weight": x["weight"]} for x in m], A3, grams=g),
            "no \\(3,\\) parameter 'bias'",
        ),
        (
            lambda b, m, g: baselines.regmean(m, A3, grams=[{"weight": x["weight"] * float("nan")} for x in g]),
            "non-finite",
        ),
        (lambda b, m, g: baselines.regmean(m, A3, grams=g, off_diagonal=2.0), "off_diagonal must be in \\[0, 1\\]"),
        (lambda b, m, g: baselines.regmean(m, A3, grams=g, ridge=-1.0), "ridge must be >= 0"),
        (
            lambda b, m, g: baselines.regmean(m, A3, grams=[{"weight": x["weight"] * 0} for x in g], ridge=0.0),
            "not positive definite",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
    base, sds, grams = _problem()
    with pytest.raises(ValueError, match=match):
        call(base, sds, grams)


def test_calibration_grams_bad_input():
    model, sds, xs = linear_problem(seed=93)
    with pytest.raises(ValueError, match="3 state dicts but 2 input sets"):
        baselines.calibration_grams(model, sds, xs[:2])
    with pytest.raises(ValueError, match="missing trainable parameters"):
        baselines.calibration_grams(model, [{"weight": s["weight"]} for s in sds], xs)
    with pytest.raises(ValueError, match="no calibration inputs"):
        baselines.calibration_grams(model, sds, [x[:0] for x in xs])


# ------------------------------------------------------------------------- config + pipeline
def _cfg(methods, options=None):
    from pathlib import Path

    import yaml

    from varmerge.config import parse_config

    d = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml").read_text())
    d["merge"]["methods"] = methods
    if options is not None:
        d["merge"]["options"] = options
    d["selection"]["method"] = methods[-1]
    return parse_config(d, "test.yaml")


def test_config_accepts_options_and_map():
    cfg = _cfg(
        ["simple", *NEW_RULES, "map"],
        {
            "ties": {"density": 0.3},
            "dare": {"drop": 0.5, "seed": 2},
            "esm": {"rank": 4},
            "regmean": {"ridge": 1e-3, "calibration_examples": 64},
            "map": {"n_evaluations": 12, "seed": 1},
        },
    )
    assert cfg.merge.options["ties"] == {"density": 0.3}
    assert "map" in cfg.merge.methods


@pytest.mark.parametrize(
    "methods, options, match",
    [
        (["ties"], {"tie": {"density": 0.3}}, "options name unknown merge methods \\['tie'\\]"),
        (["ties"], {"ties": {"dens": 0.3}}, "options.ties: unknown option 'dens'"),
        (["map"], {"map": {"grid": 3}}, "options.map: unknown option 'grid'"),
        (["ties"], {"ties": {"density": "high"}}, "options.ties.density: Input should be a valid number"),
        (["dare"], {"dare": {"seed": True}}, "options.dare.seed: Input should be a valid integer"),
        (["mixture"], {"mixture": {"iterations": -1}}, "merge.options.mixture: iterations must be a non-negative"),
        (
            ["task_arithmetic"],
            {"task_arithmetic": {"scale": float("inf")}},
            "merge.options.task_arithmetic: task arithmetic scale must be finite",
        ),
        (["ties", "mapp"], {}, "unknown merge methods \\['mapp'\\]"),
        # bad values fail at validation, before any finetune
        (["ties"], {"ties": {"density": 2.0}}, "merge.options.ties: TIES density must be in"),
        (["dare"], {"dare": {"drop": 1.0}}, "merge.options.dare: DARE drop must be in"),
        (["esm"], {"esm": {"rank": 0}}, "merge.options.esm: ESM rank must be"),
        (["regmean"], {"regmean": {"calibration_examples": 0}}, "calibration_examples must be a positive"),
        (["regmean"], {"regmean": {"ridge": -1}}, "merge.options.regmean: regmean ridge must be >= 0"),
        (["map"], {"map": {"n_evaluations": 4}}, "merge.options.map: MAP n_evaluations must be an integer >= 6"),
        (["map"], {"map": {"algorithm": "moead"}}, "merge.options.map: MAP algorithm"),
    ],
)
def test_config_rejects_bad_options(methods, options, match):
    from varmerge.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg(methods, options)


def test_every_new_method_runs_through_sweep_and_score():
    """The pipeline path on a tiny logistic regression: every rule, MAP included, gives (G, T)."""
    from varmerge import models, pipeline
    from varmerge.plan import make_plan
    from varmerge.posterior import DiagonalGaussian

    g = torch.Generator().manual_seed(100)
    torch.manual_seed(0)
    model = models.build_model("logreg", num_classes=10)
    base = models.trainable_state_dict(model)
    tasks, posts = [], []
    for t, classes in enumerate(([0, 1], [2, 3, 4], [5, 6, 7, 8, 9])):
        x = torch.rand(40, 1, 28, 28, generator=g)
        y = torch.tensor(classes)[torch.randint(len(classes), (40,), generator=g)]
        tasks.append(pipeline.TaskData(f"t{t}", tuple(classes), (x[:30], y[:30]), (x[30:], y[30:])))
        mean = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        posts.append(DiagonalGaussian(mean, {k: torch.ones_like(v) for k, v in mean.items()}))
    cfg = _cfg(
        ["simple", *NEW_RULES, "map"],
        {"regmean": {"calibration_examples": 16}, "map": {"n_evaluations": 8, "n_gen": 10, "pop_size": 20}},
    )
    alpha = simplex_grid(3, 0.25)
    for m in cfg.merge.methods:
        res = pipeline.sweep_and_score(make_plan(cfg), m, posts, model, tasks, alpha, block=4)
        assert res["accuracy"].shape == (len(alpha), 3) and res["accuracy"].dtype == F64, m
        assert torch.isfinite(res["loss"]).all() and (res["accuracy"] >= 0).all() and (res["accuracy"] <= 1).all()
        if m == "map":
            assert res["evaluations"] == 8
            assert res["front_alpha"].shape[1] == 3 and res["front_accuracy"].shape == res["front_alpha"].shape
    # the calibration Grams come from the first N training inputs of each task
    grams = pipeline.calibration_grams(model, posts, tasks, 16)
    x = torch.cat([tasks[1].train[0][:16].reshape(16, -1), torch.ones(16, 1)], 1).double()
    torch.testing.assert_close(grams[1]["linear.weight"], x.T @ x / 16)
