"""The resolved run plan: a config turned, once, into everything a run decides.

:func:`varmerge.preflight.preflight` checks a run and returns its :class:`RunPlan`;
:func:`make_plan` builds one without the checks (library use, benchmarks). Every layer after
that — the sequence, the Prefect flow, its tasks, the pipeline — reads the plan: nothing
re-parses YAML or JSON, each merge rule's options are parsed once by its options model, and the
optimizer and trainer settings are built once. The plan is frozen and picklable (Dask workers
receive it).

Each decision is made here and only here: the run folder and the MLflow tracking URI, the
optimizer of each training stage (the posterior method's, :mod:`varmerge.posterior_methods`),
the posterior method's and the merge rules' parsed options, the method whose front picks α and
the closed loop's prior methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from varmerge import merge, posterior_methods
from varmerge.config import ExperimentConfig, ivon_settings
from varmerge.grid import simplex_grid
from varmerge.objective import Objective, default_alphas, with_defaults
from varmerge.train.settings import TrainerSettings, Training

#: The variational merge rules, whose fronts form the closed-loop search's prior by default.
VARIATIONAL_PRIORS = ("simple", "hessian", "hessian_full", "mixture", "mixture_full")


@dataclass(frozen=True)
class TaskPlan:
    """One task: its name, position, and (after preflight) its numbers of examples."""

    name: str
    index: int
    train_examples: int | None = None
    test_examples: int | None = None


@dataclass(frozen=True)
class MergeStep:
    """One merge rule (or front estimator) of ``merge.methods`` with its parsed options."""

    name: str
    options: merge.Options

    @property
    def spec(self) -> merge.MergeMethod:
        return merge.get_method(self.name)


@dataclass(frozen=True)
class RunPlan:
    """What a run of ``cfg`` does (see the module docstring)."""

    cfg: ExperimentConfig
    run_dir: Path
    tracking_uri: str
    tasks: tuple[TaskPlan, ...]
    posterior_options: posterior_methods.Options
    finetune: Training
    multitask: Training
    pretrain: Training | None
    merges: tuple[MergeStep, ...]
    merge_options: dict[str, merge.Options]
    selection_method: str
    prior_methods: tuple[str, ...]
    objective: Objective = Objective()
    data_dir: str | None = None
    num_classes: int | None = None
    config_file: str | None = None  # the YAML file the config came from (absolute), if any

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.merges]

    def merge_step(self, name: str) -> MergeStep:
        """A swept method, or a rule a front estimator evaluates (MAP's task arithmetic)."""
        for m in self.merges:
            if m.name == name:
                return m
        if name in self.merge_options:
            return MergeStep(name, self.merge_options[name])
        raise ValueError(f"merge method {name!r} is not among merge.methods {self.method_names}")

    @property
    def sized(self) -> bool:
        """Whether the plan knows each task's training examples (preflight, or the data, told it)."""
        return all(t.train_examples is not None for t in self.tasks)

    def defaults(self) -> dict[str, torch.Tensor]:
        """The free default α (pooled ∝ N_t, uniform, temperature ∝ N_t^τ) of the plan's tasks."""
        if not self.sized:
            raise ValueError("the run plan does not know the tasks' sizes yet (preflight or the data sets them)")
        sizes = [t.train_examples for t in self.tasks]
        return default_alphas(sizes, self.cfg.selection.temperature)

    def grid(self) -> torch.Tensor:
        """The (G, T) α grid: the simplex grid of ``merge.spacing`` and, as exact rows appended to
        it, the default α not already on it (every merged front scores them by a real merge)."""
        return with_defaults(simplex_grid(len(self.tasks), self.cfg.merge.spacing), self.defaults())

    def with_sizes(self, num_classes: int, train: dict[str, int], test: dict[str, int]) -> RunPlan:
        """This plan with what the data says: the number of classes and each task's examples."""
        tasks = tuple(
            dataclasses.replace(t, train_examples=train[t.name], test_examples=test[t.name]) for t in self.tasks
        )
        return dataclasses.replace(self, tasks=tasks, num_classes=num_classes)


def default_tracking_uri(run_dir: Path) -> str:
    """The default MLflow store of a run: ``sqlite:///<output folder>/mlflow.db``."""
    return f"sqlite:///{(Path(run_dir).parent / 'mlflow.db').resolve()}"


def run_folder(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> Path:
    """``<output folder>/<config name>``, absolute (``output_dir`` overrides ``cfg.output_dir``)."""
    return (Path(output_dir or cfg.output_dir) / cfg.name).resolve()


def _log_every(steps: int) -> int:
    """Training curves of about ten points (at most every 50 steps): each point is a write to the
    tracking store."""
    return max(1, min(50, steps // 10))


def _training(cfg: ExperimentConfig, optimizer: str, steps: int) -> Training:
    p = cfg.posterior
    opt = ivon_settings(p, "posterior", name=optimizer, prior_precision=p.prior_precision)
    tr = TrainerSettings(
        steps=steps,
        batch_size=p.batch_size,
        accelerator=cfg.accelerator,
        precision=p.precision,
        log_every_n_steps=_log_every(steps),
    )
    return Training(opt, tr, p.seed)


def _pretraining(cfg: ExperimentConfig) -> Training | None:
    p = cfg.pretrain
    if p is None:
        return None
    tr = TrainerSettings(
        steps=p.steps, batch_size=p.batch_size, accelerator=cfg.accelerator, log_every_n_steps=_log_every(p.steps)
    )
    return Training(ivon_settings(p, "pretrain"), tr, p.seed)


def prior_methods(cfg: ExperimentConfig, selection_method: str) -> tuple[str, ...]:
    """The merge methods whose predictions the closed-loop search averages: the config's
    ``selection.prior_methods``, else the selection method and every variational rule among
    ``merge.methods`` (a multi-fidelity prior: the search weighs each by how well it predicts)."""
    if cfg.selection.prior_methods:
        return tuple(cfg.selection.prior_methods)
    return tuple(m for m in cfg.merge.methods if m == selection_method or m in VARIATIONAL_PRIORS)


def objective(cfg: ExperimentConfig) -> Objective:
    """The selection objective, its weights in task order."""
    sel = cfg.selection
    weights = None if sel.weights is None else tuple(sel.weights[t.name] for t in cfg.data.tasks)
    return Objective(sel.objective, weights)


def make_plan(
    cfg: ExperimentConfig,
    *,
    output_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    data_dir: str | Path | None = None,
    config_file: str | Path | None = None,
) -> RunPlan:
    """The plan of ``cfg`` (no checks of data, model or services: :func:`~varmerge.preflight.preflight`
    does those and fills in the task sizes)."""
    run_dir = run_folder(cfg, output_dir)
    p = cfg.posterior
    method = posterior_methods.get_method(p.method)
    finetune = _training(cfg, method.optimizer, p.steps)
    multitask = _training(cfg, method.multitask_optimizer, cfg.multitask_steps or p.steps)
    # every method swept or given options, and task arithmetic, which MAP evaluates
    named = dict.fromkeys([*cfg.merge.methods, *cfg.merge.options, "task_arithmetic"])
    options = {m: merge.get_method(m).parse_options(cfg.merge.options.get(m, {})) for m in named}
    merges = tuple(MergeStep(m, options[m]) for m in cfg.merge.methods)
    selection = cfg.selection.method or cfg.merge.methods[-1]
    return RunPlan(
        cfg=cfg,
        run_dir=run_dir,
        tracking_uri=tracking_uri or cfg.tracking.uri or default_tracking_uri(run_dir),
        tasks=tuple(TaskPlan(t.name, i) for i, t in enumerate(cfg.data.tasks)),
        posterior_options=method.parse_options(p),
        finetune=finetune,
        multitask=multitask,
        pretrain=_pretraining(cfg),
        merges=merges,
        merge_options=options,
        selection_method=selection,
        prior_methods=prior_methods(cfg, selection),
        objective=objective(cfg),
        data_dir=str(data_dir) if data_dir is not None else None,
        config_file=str(Path(config_file).resolve()) if config_file is not None else None,
    )
