"""θ0, the shared starting point of every finetune: the configured architecture, its seeded
initialisation, a user's checkpoint, pretraining, and θ0's posterior (the finetunes' prior)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from varmerge import evaluate, models, train
from varmerge.config import ExperimentConfig
from varmerge.learned import chance, check_pretrained
from varmerge.pipeline.data import model_path, prepare_pretrain
from varmerge.plan import RunPlan
from varmerge.posterior import DiagonalGaussian, PosteriorMeta
from varmerge.progress import Report, lightning_callbacks


def model_options(cfg: ExperimentConfig) -> dict:
    """The builder's keyword options: ``model.options`` plus what the data implies (pooled inputs)
    and a backbone folder given as ``base.checkpoint``."""
    options = dict(cfg.model.options)
    if model_path(cfg) is not None:
        options["model_path"] = model_path(cfg)
    if cfg.data.image_pool > 1 and cfg.model.name in ("logreg", "mlp"):
        options.setdefault("in_features", (28 // cfg.data.image_pool) ** 2)
    return options


def build_architecture(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The configured architecture (weights from torch's current RNG)."""
    return models.build_model(cfg.model.name, num_classes=num_classes, **model_options(cfg))


def seeded_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The configured architecture, initialised from ``posterior.seed``."""
    torch.manual_seed(cfg.posterior.seed)
    return build_architecture(cfg, num_classes)


def initial_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The model before pretraining: a seeded init (``posterior.seed``), with ``base.checkpoint``'s
    entries loaded when it is a state dict file (every entry must be the model's, shapes equal)."""
    model = seeded_model(cfg, num_classes)
    if cfg.base is None or Path(cfg.base.checkpoint).is_dir():
        return model
    from safetensors.torch import load_file

    path = cfg.base.checkpoint
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors_rust.SafetensorError is not exported
        raise ValueError(f"base.checkpoint {path}: not a readable safetensors file ({exc})") from None
    own = model.state_dict()
    extra = [k for k in tensors if k not in own]
    if extra:
        raise ValueError(f"base.checkpoint {path}: entries the model does not have: {extra[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"base.checkpoint {path}: {k!r} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    return model


def has_prior(cfg: ExperimentConfig) -> bool:
    """Whether θ0 comes with a posterior (the finetunes' prior): pretrained, or a checkpoint with
    a prior precision or prior data."""
    return cfg.pretrain is not None or (cfg.base is not None and bool(cfg.base.prior_precision or cfg.base.prior_data))


def theta0(
    plan: RunPlan, num_classes: int, *, logger=None, report: Report | None = None
) -> tuple[nn.Module, DiagonalGaussian | None]:
    """θ0 and its posterior, the prior the finetunes start from (None without one).

    With ``pretrain``: IVON on :func:`prepare_pretrain`'s examples from :func:`initial_model`;
    the prior is IVON's posterior. With only ``base``: the checkpoint and, with ``prior_data``,
    the per-example mean of squared gradients over those examples (+ ``prior_precision``, default
    1e-4), or a prior of ``prior_precision`` everywhere. Otherwise the seeded init and no prior.
    """
    cfg = plan.cfg
    model = initial_model(cfg, num_classes)
    if plan.pretrain is None:
        if not has_prior(cfg):
            return model, None
        if cfg.base.prior_data is not None:
            return model, _squared_gradient_prior(cfg, model)
        mean = models.trainable_state_dict(model)
        prec = {k: torch.full_like(v, cfg.base.prior_precision) for k, v in mean.items()}
        return model, DiagonalGaussian(mean, prec, PosteriorMeta(task="base", optimizer="scalar", ess=1.0))
    x, y = prepare_pretrain(cfg)
    tr = dataclasses.replace(plan.pretrain.trainer, logger=logger, callbacks=lightning_callbacks(report))
    data = train.as_data(x, y)
    model, prior = train.fit(model, data, plan.pretrain.optimizer, tr, seed=plan.pretrain.seed, task="pretrain")
    if cfg.gate.stop:  # before θ0 is saved: a θ0 that learned nothing is not worth finetuning from
        n = min(len(y), PRETRAIN_CHECK_EXAMPLES)
        weights = {k: v.unsqueeze(0) for k, v in models.trainable_state_dict(model).items()}
        acc = float(
            evaluate.evaluate_tasks(model, weights, [(evaluate.slice_inputs(x, 0, n), y[:n])])["accuracy"][0, 0]
        )
        check_pretrained(acc, chance(y[:n]), cfg.gate.margin, cfg.pretrain.lr, cfg.pretrain.steps)
    return model, prior


#: Pretraining examples θ0 is scored on by the gate (the first ones: it was trained on them).
PRETRAIN_CHECK_EXAMPLES = 2048


def _squared_gradient_prior(cfg: ExperimentConfig, model: nn.Module) -> DiagonalGaussian:
    """``base.prior_data``'s squared-gradient pass at θ0, on the per-example scale after ``ess``."""
    x, y = prepare_pretrain(cfg, pd=cfg.base.prior_data)
    data = train.as_data(x, y)
    n = len(y)
    floor = cfg.base.prior_precision or 1e-4
    loader = train.make_loader(data, cfg.posterior.batch_size, shuffle=False, what="base.prior_data")
    meta = PosteriorMeta(task="base", optimizer="squared_gradients", ess=float(n), weight_decay=0.0)
    return train.adamw_sg_posterior(model, loader, prior_precision=floor * n, meta=meta)


def carried_hessian(cfg: ExperimentConfig, prior: DiagonalGaussian | None, optimizer: str):
    """The per-example Hessian an ``optimizer`` finetune starts from: the prior's, for IVON,
    unless ``pretrain.carry_hessian`` is off; None without a prior or for AdamW / full VON."""
    if prior is None or optimizer != "ivon":
        return None
    if cfg.pretrain is not None and not cfg.pretrain.carry_hessian:
        return None
    return prior.per_example_hessian()
