"""The registry of posterior methods: how each task's finetune yields its posterior.

Every ``posterior.method`` of a config is a :class:`PosteriorMethod`, declared here with
:func:`register` next to its fit function:

* ``structure``: the posterior it yields — ``diagonal``, ``mixture``, ``full`` or
  ``mixture_full`` (:data:`varmerge.posterior.EXACT_VIEWS` says which merge rules can read it);
* ``optimizer``: what its finetune trains with (``adamw``, ``ivon`` or ``full_von``) and
  ``multitask_optimizer`` what the real multitask finetune trains with (``adamw`` or ``ivon``:
  full VON exists for logistic regression's per-task posteriors only);
* ``options``: a pydantic model of the fields of the ``posterior`` section that only this method
  reads (``components``, ``checkpoint_steps``, ...), validated by it; the shared fields (steps,
  batch size, learning rate, ...) become the run plan's optimizer and trainer settings;
* ``fit(job)``: the finetune of one task (a :class:`FitJob`), returning the posterior and the
  finetuned trainable weights.

Config validation (names, options, which merges a method can feed), the run plan (the
optimizers), the dispatch of :func:`varmerge.pipeline.finetune_task`, the store's keys and the
progress labels all read the spec: no caller branches on a method's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:  # annotations only: the pipeline imports this module
    from torch import nn

    from varmerge.pipeline import TaskData
    from varmerge.posterior import DiagonalGaussian
    from varmerge.train import OptimizerSettings, TrainerSettings, Training

Structure = Literal["diagonal", "mixture", "full", "mixture_full"]


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
class Options(BaseModel):
    """A method's own settings (the empty model: none). Built from the ``posterior`` section's
    fields of the same names; ``steps`` may be among them where a check needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def key(self) -> dict[str, Any]:
        """What of the options a posterior depends on (every field)."""
        return self.model_dump(mode="json")


class MultiIVONOptions(Options):
    components: int = Field(2, description="K IVON runs with seeds seed, seed + 1, ...")

    @field_validator("components")
    @classmethod
    def _several(cls, v: int) -> int:
        if v < 2:
            raise ValueError("multi_ivon needs components >= 2 (K seeds per task)")
        return v


class SoupIVONOptions(Options):
    components: int = Field(1, ge=1, description="IVON runs")
    checkpoint_steps: list[int] = Field(description="steps at which each run is snapshotted")
    steps: int

    @model_validator(mode="after")
    def _within(self):
        if not self.checkpoint_steps:
            raise ValueError("soup_ivon needs checkpoint_steps (steps at which to snapshot)")
        if max(self.checkpoint_steps) > self.steps or min(self.checkpoint_steps) < 1:
            raise ValueError(f"soup_ivon checkpoint_steps must lie in [1, steps={self.steps}]")
        return self


class MixtureVONOptions(Options):
    components: int = Field(1, ge=1)
    weights_lr: float = Field(3e-6, ge=0)
    init_spread: float = Field(1.0, ge=0)
    warm_start: int = Field(0, ge=0)


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitJob:
    """One task's finetune: a copy of θ0 (trained in place), the task's data, the training stage
    (optimizer with θ0's Hessian where IVON starts from it, trainer with logger and progress set,
    seed), the method's parsed options and a folder for pieces that finish before the posterior
    (``resume_dir``: reused after a crash; None: nothing persisted)."""

    model: nn.Module
    task: TaskData
    training: Training
    options: Options
    resume_dir: Path | None = None

    @property
    def optimizer(self) -> OptimizerSettings:
        return self.training.optimizer

    @property
    def trainer(self) -> TrainerSettings:
        return self.training.trainer

    @property
    def seed(self) -> int:
        return self.training.seed


@dataclass(frozen=True)
class PosteriorMethod:
    """A registered posterior method (see the module docstring)."""

    name: str
    structure: Structure
    optimizer: str
    multitask_optimizer: str
    options: type[Options]
    fit: Callable[[FitJob], tuple[Any, dict]]
    description: str = ""

    def parse_options(self, section: BaseModel | Mapping[str, Any]) -> Options:
        """The method's options from the ``posterior`` section (a model or a mapping): its fields
        of the options' names. Raises ValueError naming the method."""
        get = section.get if isinstance(section, Mapping) else lambda k, d=None: getattr(section, k, d)
        values = {k: get(k) for k in self.options.model_fields if get(k) is not None}
        try:
            return self.options.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"posterior.method {self.name}: {problems.replace('Value error, ', '')}") from None

    def label(self, options: Options) -> str:
        """How progress names a finetune of this method (``multi_ivon × 2``)."""
        runs = getattr(options, "components", None)
        return f"{self.name} × {runs}" if self.structure == "mixture" and runs else self.name


_METHODS: dict[str, PosteriorMethod] = {}


def register(
    name: str,
    fit: Callable[[FitJob], tuple[Any, dict]],
    *,
    structure: Structure,
    optimizer: str,
    options: type[Options] = Options,
    multitask_optimizer: str = "ivon",
) -> PosteriorMethod:
    """Declare the posterior method ``name`` (the name configs use)."""
    if name in _METHODS:
        raise ValueError(f"posterior method {name!r} is already registered")
    doc = (fit.__doc__ or "").strip().splitlines()
    spec = PosteriorMethod(name, structure, optimizer, multitask_optimizer, options, fit, doc[0] if doc else "")
    _METHODS[name] = spec
    return spec


def get_method(name: str) -> PosteriorMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown posterior method {name!r}; known: {', '.join(_METHODS)}") from None


def names() -> list[str]:
    return list(_METHODS)


# --------------------------------------------------------------------------------------------
# fit functions
# --------------------------------------------------------------------------------------------
def _data(task: TaskData):
    from varmerge.train.batches import as_data

    return as_data(*task.train)


def _trainable(model: nn.Module) -> dict:
    from varmerge.models import trainable_state_dict

    return trainable_state_dict(model)


def fit_single(job: FitJob):
    """One run of the method's optimizer; its posterior comes with the training (IVON, full VON)
    or from a squared-gradient pass after it (AdamW)."""
    from varmerge import train

    if job.optimizer.name == "adamw" and job.resume_dir is not None:
        return _adamw_sg_resumable(job)
    model, post = train.fit(job.model, _data(job.task), job.optimizer, job.trainer, seed=job.seed, task=job.task.name)
    return post, _trainable(model)


def fit_ivon_mixture(job: FitJob):
    """K IVON runs from θ0 (MultiIVON: their final posteriors; SoupIVON: each run's snapshots at
    ``checkpoint_steps``), equally weighted; finished runs persist in ``resume_dir``."""
    from varmerge import train

    snapshots = getattr(job.options, "checkpoint_steps", None)
    runs = train.IVONRuns(num_runs=job.options.components, seed=job.seed, task=job.task.name, snapshot_steps=snapshots)
    if job.resume_dir is not None:
        parts = _RunParts(Path(job.resume_dir), _trainable(job.model), job.options.components)
        runs = dataclasses.replace(runs, completed_runs=parts.completed(), on_run=parts.save)
    fit = train.fit_soup_ivon if snapshots else train.fit_multi_ivon
    post = fit(job.model, _data(job.task), job.optimizer, job.trainer, runs)
    return post, (post.components[-1] if snapshots else post.components[0]).mean


def fit_mixture_full_von(job: FitJob):
    """A mixture of K full Gaussians by natural-gradient VI, for logistic regression."""
    from varmerge import train
    from varmerge.posterior import PosteriorMeta

    o, opt = job.options, job.optimizer
    settings = train.MixtureVONSettings(
        components=o.components,
        lr=opt.lr,
        lr_weights=o.weights_lr,
        mc_samples=opt.mc_samples,
        num_iters=job.trainer.steps,
        prior_precision=opt.prior_precision,
        init_spread=o.init_spread,
        warm_start=o.warm_start,
        seed=job.seed,
    )
    x, y = job.task.train
    post = train.fit_mixture_full_von(job.model, x, y, settings, meta=PosteriorMeta(task=job.task.name))
    return post, _trainable(job.model)


class _RunParts:
    """Finished MultiIVON / SoupIVON runs as files ``run-<k>.safetensors`` in a resume folder."""

    def __init__(self, folder: Path, expected: dict, num_runs: int):
        self.folder, self.expected, self.num_runs = folder, expected, num_runs

    def path(self, run: int) -> Path:
        return self.folder / f"run-{run}.safetensors"

    def completed(self) -> dict[int, list[DiagonalGaussian]]:
        from varmerge.posterior import MixtureGaussian

        return {
            k: MixtureGaussian.load(self.path(k), expected=self.expected).components
            for k in range(self.num_runs)
            if self.path(k).exists()
        }

    def save(self, run: int, posteriors: list[DiagonalGaussian]) -> None:
        from varmerge.posterior import MixtureGaussian, PosteriorMeta

        MixtureGaussian(list(posteriors), meta=PosteriorMeta(task=posteriors[0].meta.task)).save(self.path(run))


def _resumable_state(model: nn.Module) -> dict:
    """What training changes: the trainable parameters and the buffers (e.g. batch-norm statistics)."""
    return {**_trainable(model), **{n: b.detach().clone() for n, b in model.named_buffers()}}


def _adamw_sg_resumable(job: FitJob):
    """AdamW training, its weights persisted, then the squared-gradient pass (as ``train.fit`` does)."""
    from varmerge import files, train
    from varmerge.posterior import PosteriorMeta

    model, data = job.model, _data(job.task)
    trained = Path(job.resume_dir) / "trained.safetensors"
    if trained.exists():
        state = files.load_state_dict(trained, expected=_resumable_state(model))
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{trained}: unexpected entries {unexpected[:5]}")
    else:
        fit_args = {"seed": job.seed, "task": job.task.name, "compute_posterior": False}
        model, _ = train.fit(model, data, job.optimizer, job.trainer, **fit_args)
        files.save_state_dict(trained, _resumable_state(model), {"task": job.task.name, "stage": "adamw-trained"})
    meta = PosteriorMeta(task=job.task.name, seed=job.seed)
    post = train.trained_sg_posterior(model, data, job.optimizer, job.trainer, meta=meta)
    return post, _trainable(model)


register("adamw_sg", fit_single, structure="diagonal", optimizer="adamw", multitask_optimizer="adamw")
register("ivon", fit_single, structure="diagonal", optimizer="ivon")
register("multi_ivon", fit_ivon_mixture, structure="mixture", optimizer="ivon", options=MultiIVONOptions)
register("soup_ivon", fit_ivon_mixture, structure="mixture", optimizer="ivon", options=SoupIVONOptions)
register("full_von", fit_single, structure="full", optimizer="full_von")
register(
    "mixture_full_von", fit_mixture_full_von, structure="mixture_full", optimizer="full_von", options=MixtureVONOptions
)
