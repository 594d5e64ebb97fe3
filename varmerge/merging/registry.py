"""The registry of merging methods and the one dispatcher over them.

Every method is a :class:`MergeMethod` spec, declared with :func:`register` next to its function:

* ``posterior``: the posterior view the rule reads — ``"none"`` (means only), ``"diagonal"``
  (means and diagonal precisions), ``"mixture"`` (per task a list of diagonal components and
  their weights) or ``"full"`` (flat means and (P, P) precision matrices);
* ``needs_base`` (θ0) and ``needs_calibration`` (per-task layer-input Grams, ``grams=``);
* ``options``: a pydantic model (frozen, ``extra="forbid"``, strict types) of the rule's
  settings with their defaults — the only place a setting's name, type and default is declared.
  The rule gets them as one keyword argument each, or, for a model with ``bundled = True`` (rules
  with many settings), the validated model itself as ``options=``;
* ``kind``: ``"rule"`` (returns merged weights) or ``"estimator"`` (a front estimator such as
  MAP, which predicts scores and returns no models).

:func:`apply` turns posteriors into the declared view, passes means / precisions / θ0 / Grams as
the spec says, validates the options through the spec's model and calls the rule; callers (the
pipeline, the config checks) never branch on a method's name. A bad option value fails when a
config is read: the options model checks every value (the rule's own checks), and a spec's
``check`` what depends on the number of tasks.

The rule modules are listed in :data:`RULE_MODULES` and loaded on the first lookup, whatever
was imported before; nothing here imports :mod:`varmerge.merge` (the public facade).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from varmerge.merging.kernels import check_chunk_elems

__all__ = [
    "METHOD_KINDS",
    "POSTERIOR_KINDS",
    "RULE_MODULES",
    "CalibrationOptions",
    "ChunkedOptions",
    "MergeMethod",
    "Options",
    "all_methods",
    "apply",
    "get_method",
    "names",
    "register",
]

PosteriorKind = Literal["none", "diagonal", "mixture", "full", "mixture_full"]
MethodKind = Literal["rule", "estimator"]

#: What a rule may read from the posteriors (see the module docstring).
POSTERIOR_KINDS: tuple[str, ...] = ("none", "diagonal", "mixture", "full", "mixture_full")
METHOD_KINDS: tuple[str, ...] = ("rule", "estimator")

#: The modules whose ``@register`` declarations make up the registry, in listing order.
RULE_MODULES = ("varmerge.merging.gaussian", "varmerge.merging.baselines", "varmerge.merging.estimators")

_METHODS: dict[str, MergeMethod] = {}
_loaded = False


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
class Options(BaseModel):
    """A method's settings: names, strict types and defaults (the empty model: no settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Fields the pipeline reads itself: validated here, never passed to the rule.
    pipeline_fields: ClassVar[frozenset[str]] = frozenset()
    #: True: the rule takes this model itself as ``options=``; False: one keyword per field.
    bundled: ClassVar[bool] = False

    def rule_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the rule's function takes: ``options=self`` for a bundled model,
        else one per field (every field but the pipeline's)."""
        if self.bundled:
            return {"options": self}
        return {k: getattr(self, k) for k in type(self).model_fields if k not in self.pipeline_fields}


class ChunkedOptions(Options):
    """Settings of the rules built on :func:`varmerge.merging.kernels.chunked_merge`."""

    chunk_elems: int | None = None  # columns per chunk (default: a cache-sized chunk)

    @field_validator("chunk_elems")
    @classmethod
    def _chunk(cls, v: int | None) -> int | None:
        check_chunk_elems(v)
        return v


class CalibrationOptions(Options):
    """Settings of a calibration rule: the pipeline computes Grams on ``calibration_examples``."""

    pipeline_fields: ClassVar[frozenset[str]] = frozenset({"calibration_examples"})

    calibration_examples: int = 256  # first N training inputs of each task

    @field_validator("calibration_examples")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"calibration_examples must be a positive integer, got {v!r}")
        return v


def _error_text(name: str, err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        if e["type"] == "value_error":  # our own validators name the setting and the value
            problems.append(e["msg"].removeprefix("Value error, "))
        else:
            loc = ".".join(str(x) for x in (name, *e["loc"]))
            problems.append(f"options.{loc}: {e['msg']} (got {e['input']!r})")
    return "; ".join(problems)


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeMethod:
    """A registered method and what it needs (see the module docstring)."""

    name: str
    fn: Callable[..., Any]
    posterior: PosteriorKind = "none"
    needs_base: bool = False
    needs_calibration: bool = False
    options: type[Options] = Options
    kind: MethodKind = "rule"
    #: Cast the posteriors' tensors to this dtype before calling (None: keep theirs).
    dtype: torch.dtype | None = None
    #: ``check(options, num_tasks)`` raises ValueError for values that cannot work with that
    #: many tasks (the options model checks the rest).
    check: Callable[[Options, int], None] | None = None
    description: str = ""

    def option_names(self) -> list[str]:
        return sorted(self.options.model_fields)

    def parse_options(self, options: Mapping[str, Any] | Options | None = None) -> Options:
        """``options`` validated by the spec's model (ValueError naming method and option)."""
        if isinstance(options, self.options):
            return options
        if options is None:
            options = {}
        if isinstance(options, Options) or not isinstance(options, Mapping):
            raise ValueError(
                f"options.{self.name} must be a mapping of {self.name}'s settings, got {type(options).__name__}"
            )
        for key in options:
            if key not in self.options.model_fields:
                raise ValueError(
                    f"options.{self.name}: unknown option {key!r}; {self.name} takes {self.option_names()}"
                )
        try:
            return self.options.model_validate(dict(options))
        except ValidationError as err:
            raise ValueError(_error_text(self.name, err)) from None


def register(
    name: str,
    *,
    posterior: PosteriorKind = "none",
    needs_base: bool = False,
    needs_calibration: bool = False,
    options: type[Options] = Options,
    kind: MethodKind = "rule",
    dtype: torch.dtype | None = None,
    check: Callable[[Options, int], None] | None = None,
) -> Callable:
    """Declare ``fn`` as the method ``name`` (the name configs, the CLI and plots use)."""
    if posterior not in POSTERIOR_KINDS:
        raise ValueError(f"{name}: posterior must be one of {POSTERIOR_KINDS}, got {posterior!r}")
    if kind not in METHOD_KINDS:
        raise ValueError(f"{name}: kind must be one of {METHOD_KINDS}, got {kind!r}")
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise ValueError(f"{name}: options must be a subclass of registry.Options, got {options!r}")
    cfg = options.model_config
    if cfg.get("extra") != "forbid" or not cfg.get("frozen"):
        raise ValueError(f"{name}: the options model {options.__name__} must be frozen with extra='forbid'")
    required = [k for k, f in options.model_fields.items() if f.is_required()]
    if required:
        raise ValueError(f"{name}: every option needs a default; {options.__name__} requires {required}")
    if needs_calibration and not issubclass(options, CalibrationOptions):
        raise ValueError(f"{name}: a calibration rule's options must derive from CalibrationOptions")

    def deco(fn):
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        description = doc[0] if doc else ""
        # the fields in MergeMethod's order
        spec = MergeMethod(name, fn, posterior, needs_base, needs_calibration, options, kind, dtype, check, description)
        _METHODS[name] = spec
        return fn

    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in RULE_MODULES:
            importlib.import_module(module)


def all_methods() -> dict[str, MergeMethod]:
    """name -> spec of every registered method (the live registry)."""
    _load()
    return _METHODS


def get_method(name: str) -> MergeMethod:
    _load()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise ValueError(f"unknown merge method {name!r}; known methods: {known}") from None


def names(kind: MethodKind | None = None) -> list[str]:
    """Sorted names of the registered methods (of one ``kind`` if given)."""
    return sorted(n for n, s in all_methods().items() if kind is None or s.kind == kind)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    if isinstance(x, Mapping):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return [_cast(v, dtype) for v in x]


def _views(spec: MergeMethod, posteriors: Sequence) -> list:
    want = "diagonal" if spec.posterior == "none" else spec.posterior
    out = []
    for i, p in enumerate(posteriors):
        if not hasattr(p, "as_kind"):
            raise ValueError(
                f"{spec.name}: posteriors[{i}] is a {type(p).__name__}, not a posterior "
                "(DiagonalGaussian, MixtureGaussian or FullGaussian)"
            )
        out.append(p.as_kind(want, user=spec.name))
    return out


def _ess(view) -> float:
    ess = view.meta.ess
    if ess is None and hasattr(view, "components"):
        ess = view.components[0].meta.ess
    ess = 1.0 if ess is None else float(ess)
    if not (math.isfinite(ess) and ess > 0):
        raise ValueError(f"posterior of task {view.meta.task!r} has ess {ess!r}; it must be a positive number")
    return ess


def mean_loss_alpha(alpha, posteriors: Sequence) -> torch.Tensor:
    """α for rules that weight precisions: ``α_t / ess_t``, renormalised per row (float64).

    A precision is ``ess_t`` × the per-example one, so weighting it by ``α_t / ess_t`` makes the
    merge the mode of ``Σ_t α_t (L̄_t + R0)`` (per-task mean losses, the prior once): the
    objective of the multitask finetune at α (``varmerge.posterior.ALPHA_CONVENTION``). The
    Gaussian and mixture rules are invariant to a common scale of their weights, so the
    renormalised α stays on the simplex and means the same merge.
    """
    from varmerge._checks import check_alpha

    a, batched = check_alpha(alpha, len(posteriors))  # off the simplex fails here, not renormalised
    w = a / torch.tensor([_ess(p) for p in posteriors], dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    return w if batched else w[0]


def apply(
    method: str | MergeMethod,
    posteriors: Sequence,
    base: Mapping[str, torch.Tensor] | None,
    alpha,
    options: Mapping[str, Any] | Options | None = None,
    *,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
):
    """Merge ``posteriors`` with ``method`` at ``alpha`` ((T,) or (G, T)).

    The posteriors are turned into the spec's view (``as_kind``): ``none`` passes
    ``means=`` (each task's single diagonal Gaussian's mean: a mixture's first component, a full
    Gaussian's mean), ``diagonal`` adds ``precisions=``, ``mixture`` passes per-task lists of
    component means and precisions and ``weights=``, ``full`` flat means and precision
    matrices (the flat result is unflattened by name). θ0 (``base=``) and ``grams=`` go to the
    rules that declare them; ``options`` are validated by the spec's model.
    """
    spec = method if isinstance(method, MergeMethod) else get_method(method)
    if spec.kind != "rule":
        raise ValueError(
            f"{spec.name!r} is a front estimator, not a merge rule: it predicts scores and returns no models"
        )
    if len(posteriors) == 0:
        raise ValueError(f"{spec.name}: no posteriors to merge")
    opts = spec.parse_options(options)
    views = _views(spec, posteriors)
    if spec.posterior != "none":
        alpha = mean_loss_alpha(alpha, views)
    if spec.posterior == "mixture":
        data = {"means": [v.means for v in views], "precisions": [v.precisions for v in views]}
    elif spec.posterior == "mixture_full":
        data = {
            "means": [[c.mean for c in v.components] for v in views],
            "precisions": [[c.precision for c in v.components] for v in views],
        }
    else:
        data = {"means": [v.mean for v in views]}
        if spec.posterior != "none":
            data["precisions"] = [v.precision for v in views]
    if spec.dtype is not None:
        data = {k: _cast(v, spec.dtype) for k, v in data.items()}
    if spec.posterior in ("mixture", "mixture_full"):
        data["weights"] = [list(v.weights) for v in views]
    if spec.needs_base:
        if base is None:
            raise ValueError(f"merge method {spec.name!r} needs θ0 (base=...)")
        data["base"] = base
    if spec.needs_calibration:
        if grams is None:
            raise ValueError(f"merge method {spec.name!r} needs calibration Grams (grams=...)")
        data["grams"] = grams
    merged = spec.fn(alpha=alpha, **data, **opts.rule_kwargs())
    if spec.posterior in ("full", "mixture_full"):
        return views[0].state_dict(merged)
    return merged
