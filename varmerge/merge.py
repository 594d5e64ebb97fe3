"""Merging rules: each is the mode of a product of (powered) task posteriors (arXiv 2412.08147).

The public facade of :mod:`varmerge.merging`: ``merge.hessian_weighted(...)``, ``merge.ties(...)``,
``merge.get_method(name)``, ``merge.apply(name, posteriors, base, alpha, options)`` and the
registry :data:`MERGE_METHODS` all live here. The implementations are

* :mod:`varmerge.merging.gaussian`: simple averaging, task arithmetic, Hessian-weighted (diagonal
  and full precisions), mixture-weighted (Algorithm 1) and its objective;
* :mod:`varmerge.merging.baselines`: TIES, DARE, SLERP, model soup, RegMean (+ calibration Grams),
  ESM;
* :mod:`varmerge.merging.registry`: the specs (posterior view, θ0 / calibration needs, pydantic
  options model) and the generic dispatcher.

Every rule takes ``alpha`` as a (T,) vector, returning one merged state dict, or as a (G, T)
batch, returning a state dict whose tensors carry a leading G dimension, computed in one pass over
the parameters. Most rules take their settings as keyword arguments; ``mixture_weighted``,
``hessian_weighted_full`` and ``mixture_weighted_full`` take their options model as ``options=``,
e.g. ``merge.hessian_weighted_full(means, precisions, alpha, options=merge.HessianFullOptions(solver="pcg"))``.
Inputs are never modified; bad input raises :class:`ValueError` naming the offending key or
value. Nothing under :mod:`varmerge.merging` imports this module.
"""

from __future__ import annotations

from varmerge.merging import registry
from varmerge.merging.baselines import calibration_grams, dare, esm, model_soup, regmean, slerp, ties
from varmerge.merging.gaussian import (
    DEFAULT_PRECISION_FLOOR,
    HessianFullOptions,
    MixtureFullOptions,
    MixtureOptions,
    hessian_weighted,
    hessian_weighted_full,
    mixture_full_objective,
    mixture_objective,
    mixture_weighted,
    mixture_weighted_full,
    simple_average,
    task_arithmetic,
)
from varmerge.merging.kernels import StateDict
from varmerge.merging.registry import MergeMethod, Options, apply, get_method, register

__all__ = [
    "DEFAULT_PRECISION_FLOOR",
    "MERGE_METHODS",
    "HessianFullOptions",
    "MergeMethod",
    "MixtureFullOptions",
    "MixtureOptions",
    "Options",
    "StateDict",
    "apply",
    "calibration_grams",
    "dare",
    "esm",
    "get_method",
    "hessian_weighted",
    "hessian_weighted_full",
    "merge_names",
    "mixture_full_objective",
    "mixture_objective",
    "mixture_weighted",
    "mixture_weighted_full",
    "model_soup",
    "regmean",
    "register",
    "simple_average",
    "slerp",
    "task_arithmetic",
    "ties",
]

#: name -> :class:`MergeMethod` of every registered method (the live registry; front estimators
#: such as ``map`` have ``kind == "estimator"``).
MERGE_METHODS: dict[str, MergeMethod] = registry.all_methods()


def merge_names(kind: str | None = "rule") -> list[str]:
    """Sorted names of the merge rules (``kind=None``: every method, front estimators included)."""
    return registry.names(kind)
