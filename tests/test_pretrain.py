"""The pretraining stage: θ0 and its posterior, finetunes that start from it, user checkpoints.

* ``pretrain`` / ``base`` config sections and their one-line errors;
* IVON starts at a given Hessian (``OptimizerSettings.initial_hess``), the inverse of
  ``DiagonalGaussian.from_ivon``;
* the Hessian merge of posteriors whose precisions hold the prior is the prior form
  θ0 + (H0 + Σ α_t H_t)⁻¹ Σ α_t (H0 + H_t)(θ_t − θ0) of Daheim et al. (2024);
* :func:`varmerge.pipeline.theta0` (pretraining, checkpoints) and the preflight checks;
* the flow's pretrain step: a nested MLflow run, reused by another config naming the same section.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY, random_models
from safetensors.torch import save_file

from varmerge import merge, models, pipeline
from varmerge.config import ConfigError, parse_config
from varmerge.plan import make_plan
from varmerge.posterior import DiagonalGaussian, PosteriorMeta
from varmerge.preflight import PreflightError, check_start
from varmerge.train import OptimizerSettings, SingleTaskModule

PRETRAIN = {"data": {"offset": 2000, "max_examples": 400}, "steps": 10, "batch_size": 64, "lr": 0.1, "beta2": 0.99}


def config(**sections):
    return parse_config({**copy.deepcopy(TINY), **sections})


# ------------------------------------------------------------------------------------ config
def test_config_sections_parse_and_refuse_bad_values():
    cfg = config(pretrain=PRETRAIN, base={"checkpoint": "theta.safetensors"})  # pretraining from a checkpoint
    assert (
        cfg.pretrain.data.offset == 2000 and cfg.pretrain.carry_hessian and cfg.base.checkpoint == "theta.safetensors"
    )
    assert config(base={"checkpoint": "theta.safetensors", "prior_precision": 0.5}).base.prior_precision == 0.5
    bad = [
        ({"pretrain": {**PRETRAIN, "data": {"classes": [0], "domains": ["x"]}}}, "give classes or domains, not both"),
        ({"pretrain": {**PRETRAIN, "ivon": {"hess_init": 1.0}}}, "set pretrain.hess_init instead"),
        ({"pretrain": {**PRETRAIN, "ivon": {"beta1": 2.0}}}, "rejected by ivon.IVON"),
        ({"pretrain": {**PRETRAIN, "steps": 0}}, "pretrain.steps"),
        ({"base": {"checkpoint": "x", "prior_precision": -1}}, "base.prior_precision"),
        (
            {"pretrain": PRETRAIN, "base": {"checkpoint": "x", "prior_precision": 1.0}},
            "with pretrain the prior is the pretrained posterior",
        ),
    ]
    for sections, words in bad:
        with pytest.raises(ConfigError, match=words):
            config(**sections)


# ---------------------------------------------------------------------------- IVON's start
def test_ivon_starts_at_the_given_hessian_and_from_ivon_inverts_it():
    torch.manual_seed(0)
    model = models.build_model("mlp", num_classes=3, in_features=4, hidden=(5,))
    h = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    s = OptimizerSettings(name="ivon", lr=0.1, weight_decay=0.01, ess=50.0, initial_hess=h)
    module = SingleTaskModule(model, s)
    opt = module.configure_optimizers()
    post = DiagonalGaussian.from_ivon(model, opt, PosteriorMeta())
    assert post.meta.ess == 50.0 and post.meta.weight_decay == 0.01
    back = post.per_example_hessian()
    for n in h:
        torch.testing.assert_close(back[n], h[n])
    # without a start IVON begins at hess_init everywhere
    plain = SingleTaskModule(model, OptimizerSettings(name="ivon", ess=50.0, ivon={"hess_init": 0.3}))
    hess = plain.configure_optimizers().param_groups[0]["hess"]
    assert torch.allclose(hess, torch.full_like(hess, 0.3))


def test_initial_hess_is_checked():
    with pytest.raises(ValueError, match="initial_hess is IVON's state; optimizer 'adamw' has none"):
        OptimizerSettings(name="adamw", initial_hess={"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"finite and > 0; not so for \['w'\]"):
        OptimizerSettings(name="ivon", initial_hess={"w": torch.tensor([1.0, 0.0])})
    model = models.build_model("logreg", num_classes=3, in_features=4)
    s = OptimizerSettings(name="ivon", ess=1.0, initial_hess={"linear.weight": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="initial_hess lacks trainable parameters"):
        SingleTaskModule(model, s).configure_optimizers()


# -------------------------------------------------------------------------------- prior form
def test_hessian_merge_of_posteriors_holding_the_prior_is_the_prior_form():
    """Task precisions H0 + H_t (per example, one ess): the product-of-posteriors merge equals
    θ0 + (H0 + Σ α_t H_t)⁻¹ Σ α_t (H0 + H_t)(θ_t − θ0); the prior counts once."""
    T = 3
    means, hs = random_models(T, seed=1)
    theta0, h0 = random_models(1, seed=2)
    theta0, h0 = theta0[0], h0[0]
    posts = [
        DiagonalGaussian(m, {k: h0[k] + h[k] for k in h}, PosteriorMeta(task=str(t), ess=1.0))
        for t, (m, h) in enumerate(zip(means, hs, strict=True))
    ]
    alpha = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1.0, 0.0, 0.0]], dtype=torch.float64)
    merged = pipeline.merge_sweep(
        "hessian", posts, theta0, alpha, options=merge.get_method("hessian").parse_options({})
    )
    for g, a in enumerate(alpha):
        for k in theta0:
            total = h0[k] + sum(a[t] * hs[t][k] for t in range(T))
            step = sum(a[t] * (h0[k] + hs[t][k]) * (means[t][k] - theta0[k]) for t in range(T))
            torch.testing.assert_close(merged[k][g], theta0[k] + step / total)


# ------------------------------------------------------------------------------------ θ0
def test_pretraining_gives_theta0_and_an_ivon_prior_the_finetunes_start_from():
    cfg = config(pretrain=PRETRAIN)
    tasks, n = pipeline.prepare_tasks(cfg)
    model, prior = pipeline.theta0(make_plan(cfg), n)
    init = pipeline.initial_model(cfg, n)
    assert not torch.equal(model.linear.weight, init.linear.weight)  # it trained
    assert prior.meta.optimizer == "ivon" and prior.meta.ess == 400.0  # one example per pretraining example
    torch.testing.assert_close(prior.mean["linear.weight"], model.linear.weight.detach())
    h = pipeline.carried_hessian(cfg, prior, "ivon")
    torch.testing.assert_close(h["linear.weight"], prior.per_example_hessian()["linear.weight"])
    assert pipeline.carried_hessian(cfg, prior, "adamw") is None
    off = config(pretrain={**PRETRAIN, "carry_hessian": False})
    assert pipeline.carried_hessian(off, prior, "ivon") is None
    # the finetune is IVON from θ0 at that Hessian: one step with a negligible learning rate keeps it
    one = config(
        pretrain=PRETRAIN,
        posterior={"method": "ivon", "steps": 1, "lr": 1e-12, "beta2": 0.999999, "weight_decay": 0.0},
        merge={"methods": ["simple", "hessian"]},
        selection={"method": "hessian"},
    )
    post, _ = pipeline.finetune_task(make_plan(one), model, tasks[0], prior=prior)
    torch.testing.assert_close(post.per_example_hessian()["linear.weight"], h["linear.weight"], rtol=1e-3, atol=1e-6)
    cold, _ = pipeline.finetune_task(make_plan(one), model, tasks[0])
    assert not torch.allclose(cold.per_example_hessian()["linear.weight"], h["linear.weight"], rtol=1e-2)


def test_pretraining_examples_come_from_the_train_split_after_the_offset():
    cfg = config(pretrain={**PRETRAIN, "data": {"classes": [3, 4], "offset": 10, "max_examples": 50}})
    x, y = pipeline.prepare_pretrain(cfg)
    assert x.shape == (50, 1, 28, 28) and set(y.tolist()) <= {3, 4}
    full = config(pretrain={**PRETRAIN, "data": {"classes": [3, 4]}})
    xf, _ = pipeline.prepare_pretrain(full)
    torch.testing.assert_close(x, xf[10:60])
    with pytest.raises(ValueError, match="offset 100000 leaves no example"):
        pipeline.prepare_pretrain(config(pretrain={**PRETRAIN, "data": {"offset": 100000}}))


def test_a_user_checkpoint_is_theta0_and_a_scalar_prior(tmp_path):
    cfg = config()
    torch.manual_seed(5)
    theirs = models.build_model("logreg", num_classes=10)
    path = tmp_path / "theta.safetensors"
    save_file({"linear.weight": theirs.linear.weight.detach().contiguous()}, str(path))  # a partial state dict
    user = config(base={"checkpoint": str(path), "prior_precision": 2.0})
    model, prior = pipeline.theta0(make_plan(user), 10)
    torch.testing.assert_close(model.linear.weight, theirs.linear.weight)
    torch.testing.assert_close(model.linear.bias, pipeline.seeded_model(cfg, 10).linear.bias)  # the rest: seeded init
    assert torch.all(prior.per_example_hessian()["linear.bias"] == 2.0)
    check_start(user, 10)
    # a squared-gradient pass over given training examples at the checkpoint: per-example scale
    sg = config(base={"checkpoint": str(path), "prior_data": {"max_examples": 64}})
    _, prior = pipeline.theta0(make_plan(sg), 10)
    h = prior.per_example_hessian()["linear.weight"]
    assert prior.meta.optimizer == "squared_gradients" and prior.meta.ess == 64.0
    assert float(h.min()) >= 1e-4 - 1e-9 and float(h.max()) > 10 * 1e-4  # the floor, and real curvature
    with pytest.raises(PreflightError, match="base.prior_data shares"):
        check_start(
            config(base={"checkpoint": str(path), "prior_data": {"options": {"seed": 1}}}),
            10,
            pipeline.load_dataset(cfg),
        )
    wrong = tmp_path / "wrong.safetensors"
    save_file({"linear.weight": torch.zeros(10, 5)}, str(wrong))
    with pytest.raises(PreflightError, match=r"'linear.weight' has shape \(10, 5\), the model \(10, 784\)"):
        check_start(config(base={"checkpoint": str(wrong)}), 10)
    alien = tmp_path / "alien.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(alien))
    with pytest.raises(PreflightError, match=r"entries the model does not have: \['encoder.weight'\]"):
        check_start(config(base={"checkpoint": str(alien)}), 10)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    with pytest.raises(PreflightError, match="not a readable safetensors file"):
        check_start(config(base={"checkpoint": str(junk)}), 10)


def test_a_model_folder_checkpoint_is_the_text_backbone(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    cfg = config(model={"name": "lora_text", "options": {"r": 2}}, base={"checkpoint": str(folder)})
    assert pipeline.model_path(cfg) == str(folder) and pipeline.model_options(cfg)["model_path"] == str(folder)
    with pytest.raises(PreflightError, match="is a folder \\(a Hugging Face model\\); model 'logreg'"):
        check_start(config(base={"checkpoint": str(folder)}), 10)


def test_preflight_refuses_pretraining_on_a_tasks_test_examples():
    cfg = config(pretrain={**PRETRAIN, "data": {"options": {"seed": 1}}})  # another split of mnist5k
    ds = pipeline.load_dataset(cfg)
    with pytest.raises(PreflightError, match=r"pretrain.data shares \d+ examples with task 'a''s test set"):
        check_start(cfg, 10, ds)
    check_start(config(pretrain=PRETRAIN), 10, ds)  # the run's own train split: disjoint from the tests


def test_a_theta0_whose_prior_file_is_gone_is_refused_not_used_without_it(tmp_path):
    from tasks import steps
    from varmerge.plan import make_plan

    plan = make_plan(config(pretrain=PRETRAIN), output_dir=tmp_path / "runs")
    data_ref = steps.prepare_data.fn(plan)
    ref = steps.theta0.fn(plan, data_ref)
    assert ref["prior"] is not None and ref["path"].startswith("../pretrained/")
    assert steps.theta0.fn(plan, data_ref) == ref  # reused
    (plan.run_dir / ref["prior"]["path"]).unlink()
    with pytest.raises(ValueError, match="θ0's prior is missing beside"):
        steps.theta0.fn(plan, data_ref)


# --------------------------------------------------------------------------------------- flow
@pytest.fixture
def harness(prefect_server):  # the session's Prefect test API (tests/conftest.py)
    yield


@pytest.mark.slow
def test_flow_pretrains_once_for_every_config_naming_the_same_section(harness, tmp_path):
    from flows.front import front_flow
    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "runs"
    first = {**copy.deepcopy(TINY), "pretrain": PRETRAIN, "merge": {**TINY["merge"], "spacing": 0.5}}
    front_flow(first, tracking_uri=uri, output_dir=str(out))
    theta0 = sorted((out / "pretrained" / "base").glob("theta0-*.safetensors"))
    assert len(theta0) == 1 and len(list((out / "pretrained" / "base").glob("prior-*"))) == 1
    stamp = theta0[0].stat().st_mtime_ns
    second = {**first, "name": "tiny_other", "merge": {**first["merge"], "methods": ["simple", "hessian"]}}
    second["selection"] = {"strategy": "top_k", "top_k": 1, "method": "hessian"}
    front_flow(second, tracking_uri=uri, output_dir=str(out))
    assert sorted((out / "pretrained" / "base").glob("theta0-*")) == theta0 and theta0[0].stat().st_mtime_ns == stamp
    c = tracking.client(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    pretrain_runs = [r for r in runs if r.info.run_name == "pretrain"]
    assert len(pretrain_runs) == 1  # the second config reused θ0 and logged no second pretraining
    assert {"seconds", "test/a/accuracy"} <= set(pretrain_runs[0].data.metrics)
    # a different pretraining section is another θ0
    third = {**first, "name": "tiny_third", "pretrain": {**PRETRAIN, "steps": 12}}
    front_flow(third, tracking_uri=uri, output_dir=str(out))
    assert len(list((out / "pretrained" / "base").glob("theta0-*"))) == 2
