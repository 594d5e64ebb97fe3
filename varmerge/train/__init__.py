"""Finetuning with Lightning and where the task posteriors come from (the paper's Section 3.5).

Every entry point takes two frozen settings objects (:mod:`varmerge.train.settings`):
:class:`OptimizerSettings` (``"adamw"`` | ``"ivon"`` | ``"full_von"``, lr, weight decay, ess, MC
samples, prior precision and IVON's own arguments, passed straight to ``ivon.IVON``) and
:class:`TrainerSettings` (steps, batch size, accelerator, precision, logger, progress,
callbacks). The run plan (:mod:`varmerge.plan`) builds them from a config, once. The modules:

* :mod:`~varmerge.train.batches`: batches, losses, loaders;
* :mod:`~varmerge.train.modules`: the Lightning modules and :class:`IVONSnapshots`;
* :mod:`~varmerge.train.fitting`: :func:`fit` (one task and its posterior), :func:`fit_multitask`
  (eq. 1 at a weighting α), :func:`trained_sg_posterior` (AdamW-SG);
* :mod:`~varmerge.train.ensembles`: :func:`fit_multi_ivon`, :func:`fit_soup_ivon` (mixtures);
* :mod:`~varmerge.train.von`: full-Gaussian VON and mixtures of full Gaussians (natural-gradient
  mixture VI) for logistic regression.

Nothing here imports prefect, mlflow or dvc; pass an MLflow logger in ``TrainerSettings.logger``
from the orchestration layer.
"""

from varmerge.train.batches import (
    as_data,
    default_forward,
    default_labels,
    make_loader,
    task_loss,
    weighted_multitask_loss,
)
from varmerge.train.ensembles import IVONRuns, fit_multi_ivon, fit_soup_ivon
from varmerge.train.fitting import adamw_sg_posterior, fit, fit_multitask, trained_sg_posterior
from varmerge.train.modules import IVONSnapshots, SingleTaskModule, WeightedMultitaskModule
from varmerge.train.settings import OPTIMIZERS, OptimizerSettings, TrainerSettings, Training
from varmerge.train.von import (
    MixtureVONSettings,
    VONSettings,
    fit_full_von,
    fit_mixture_full_von,
    full_von,
    mixture_full_von,
    softmax_regression_hessian,
)

__all__ = [
    "OPTIMIZERS",
    "IVONRuns",
    "IVONSnapshots",
    "MixtureVONSettings",
    "OptimizerSettings",
    "SingleTaskModule",
    "TrainerSettings",
    "Training",
    "VONSettings",
    "WeightedMultitaskModule",
    "adamw_sg_posterior",
    "as_data",
    "default_forward",
    "default_labels",
    "fit",
    "fit_full_von",
    "fit_mixture_full_von",
    "fit_multi_ivon",
    "fit_multitask",
    "fit_soup_ivon",
    "full_von",
    "mixture_full_von",
    "make_loader",
    "softmax_regression_hessian",
    "task_loss",
    "trained_sg_posterior",
    "weighted_multitask_loss",
]
