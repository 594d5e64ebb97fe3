"""The experiment schema: one pydantic model for configs/*.yaml and DVC's params.yaml.

Unknown keys are refused (``extra="forbid"``) and every error names the offending field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

POSTERIOR_METHODS = ("adamw_sg", "ivon", "multi_ivon", "soup_ivon", "full_von")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    name: str
    classes: list[int] = Field(default_factory=list, description="global class ids of this task")
    domain: str | None = Field(None, description="for text sources split by domain (tweets)")

    @model_validator(mode="after")
    def _one_kind(self):
        if not self.classes and self.domain is None:
            raise ValueError(f"task {self.name!r} needs 'classes' (a class subset) or 'domain'")
        return self


class DataConfig(_Strict):
    source: str = Field("mnist5k", description="mnist5k | fashion_mnist | mnist_idx | fortunes | tweets | hub")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the source")
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_per_task: int | None = Field(None, gt=0)
    max_length: int = Field(64, gt=0, description="tokens per text (text sources)")
    max_test_per_task: int | None = Field(None, gt=0, description="cap the test set (evaluating G models costs G passes)")
    image_pool: int = Field(
        1, ge=1, le=14, description="average-pool images by this factor (2: 28x28 -> 14x14; full Gaussians stay affordable)"
    )
    tasks: list[TaskConfig]

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks):
        if len(tasks) < 2:
            raise ValueError(f"need at least 2 tasks to merge, got {len(tasks)}")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        seen: dict[int, str] = {}
        for t in tasks:
            for c in t.classes:
                if c < 0:
                    raise ValueError(f"task {t.name!r}: class id {c} is negative")
                if c in seen:
                    raise ValueError(f"class {c} is in both task {seen[c]!r} and task {t.name!r}")
                seen[c] = t.name
        return tasks


class ModelConfig(_Strict):
    name: Literal["logreg", "mlp", "resnet20", "lora_text"] = "logreg"
    options: dict[str, Any] = Field(default_factory=dict)


class PosteriorConfig(_Strict):
    method: Literal["adamw_sg", "ivon", "multi_ivon", "soup_ivon", "full_von"] = "ivon"
    steps: int = Field(500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    ess: float | None = Field(None, gt=0, description="IVON effective sample size (default: #train examples)")
    hess_init: float = Field(0.1, gt=0)
    beta2: float = Field(0.99999, gt=0, lt=1, description="IVON Hessian EMA; 0.999 lets short runs learn h")
    mc_samples: int = Field(1, ge=1)
    prior_precision: float = Field(1e-4, ge=0, description="δ added to squared-gradient precisions")
    components: int = Field(1, ge=1, description="K: seeds (multi_ivon) or runs (soup_ivon)")
    checkpoint_steps: list[int] = Field(default_factory=list, description="soup_ivon checkpoints")
    seed: int = 0

    @model_validator(mode="after")
    def _mixtures(self):
        if self.method == "multi_ivon" and self.components < 2:
            raise ValueError("multi_ivon needs components >= 2 (K seeds per task)")
        if self.method == "soup_ivon":
            if not self.checkpoint_steps:
                raise ValueError("soup_ivon needs checkpoint_steps (steps at which to snapshot)")
            if max(self.checkpoint_steps) > self.steps or min(self.checkpoint_steps) < 1:
                raise ValueError(f"soup_ivon checkpoint_steps must lie in [1, steps={self.steps}]")
        return self


#: ``merge.methods`` may name this front estimator (varmerge.map_front) besides the merge rules.
MAP_METHOD = "map"

#: Per-method options the pipeline itself reads (besides the rule's keyword arguments).
PIPELINE_OPTIONS = {"regmean": {"calibration_examples"}}

#: Options that have a dedicated MergeConfig field instead.
_DEDICATED_OPTIONS = {("task_arithmetic", "scale"): "merge.task_arithmetic_scale",
                      ("mixture", "iterations"): "merge.mixture_iterations"}

#: Keyword arguments of the rules that are data, not settings.
_NOT_OPTIONS = {"base", "means", "precisions", "alpha", "grams", "out", "callback", "base_precision",
                "weights", "evaluate", "metric", "maximize"}


def method_option_names(method: str) -> set[str]:
    """The keys ``merge.options[method]`` may use: the rule's settings (keyword arguments)."""
    import inspect

    if method == MAP_METHOD:
        from varmerge.map_front import map_front as fn
    else:
        from varmerge.merge import get_method

        fn = get_method(method).fn
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.default is not inspect.Parameter.empty}
    return (names - _NOT_OPTIONS) | PIPELINE_OPTIONS.get(method, set())


def check_method_options(method: str, options: dict[str, Any], num_tasks: int) -> None:
    """Try ``options`` on a tiny problem so that a bad value fails now, not after the finetunes.

    Rules needing precisions are not probed (their options are checked when they run).
    Raises ValueError naming the method.
    """
    import torch

    from varmerge.merge import get_method

    opts = dict(options)
    try:
        if method == MAP_METHOD:
            from varmerge.map_front import check_settings

            check_settings(num_tasks, **opts)
            return
        n_cal = opts.pop("calibration_examples", 1)
        if isinstance(n_cal, bool) or not isinstance(n_cal, int) or n_cal < 1:
            raise ValueError(f"calibration_examples must be a positive integer, got {n_cal!r}")
        spec = get_method(method)
        if spec.needs_precision:
            return
        f64 = torch.float64
        base = {"w": torch.zeros(2, 2, dtype=f64), "b": torch.zeros(2, dtype=f64)}
        means = [{"w": torch.eye(2, dtype=f64) * (t + 1), "b": torch.ones(2, dtype=f64) * t}
                 for t in range(num_tasks)]
        kwargs: dict[str, Any] = {"base": base} if spec.needs_base else {}
        if spec.needs_calibration:
            kwargs["grams"] = [{"w": torch.eye(2, dtype=f64)} for _ in range(num_tasks)]
        spec.fn(means=means, alpha=torch.full((num_tasks,), 1.0 / num_tasks, dtype=f64), **kwargs, **opts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"merge.options.{method}: {exc}") from None


class MergeConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["simple", "hessian", "mixture"])
    spacing: float = Field(0.1, description="α grid spacing; must divide 1")
    mixture_iterations: int = Field(10, ge=0)
    task_arithmetic_scale: float = 1.0
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method settings, e.g. {ties: {density: 0.2}, dare: {drop: 0.9}, esm: {rank: 8}, "
        "regmean: {ridge: 1e-4, calibration_examples: 256}, map: {n_evaluations: 12}}",
    )

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v):
        n = round(1 / v) if v > 0 else 0
        if not (0 < v <= 1) or not math.isclose(n * v, 1.0, abs_tol=1e-9):
            raise ValueError(f"α spacing {v} does not divide 1 (try 0.5, 0.25, 0.2, 0.1, 0.05, 0.02)")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        from varmerge.merge import MERGE_METHODS

        unknown = [m for m in v if m not in MERGE_METHODS and m != MAP_METHOD]
        if unknown or not v:
            raise ValueError(
                f"unknown merge methods {unknown}; known: {sorted([*MERGE_METHODS, MAP_METHOD])}"
            )
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        from varmerge.merge import MERGE_METHODS

        known = sorted([*MERGE_METHODS, MAP_METHOD])
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"options name unknown merge methods {unknown}; known: {known}")
        for method, opts in v.items():
            allowed = method_option_names(method)
            for key in opts:
                if (method, key) in _DEDICATED_OPTIONS:
                    raise ValueError(
                        f"options.{method}.{key}: set {_DEDICATED_OPTIONS[method, key]} instead"
                    )
                if key not in allowed:
                    raise ValueError(
                        f"options.{method}: unknown option {key!r}; {method} takes {sorted(allowed)}"
                    )
        return v


class Constraint(_Strict):
    task: str
    op: Literal[">=", ">", "<=", "<"] = ">="
    value: float


class SelectionConfig(_Strict):
    rule: Literal["max_mean"] = "max_mean"
    constraints: list[Constraint] = Field(default_factory=list)
    top_k: int = Field(1, ge=1, description="multitask finetunes at the top-k α")
    method: str | None = Field(None, description="merge method whose front picks α (default: last)")


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default sqlite in the run folder)")
    experiment: str = "varmerge"


class ExperimentConfig(_Strict):
    name: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    posterior: PosteriorConfig = PosteriorConfig()
    merge: MergeConfig = MergeConfig()
    selection: SelectionConfig = SelectionConfig()
    multitask_steps: int | None = Field(None, gt=0, description="default: posterior.steps")
    accelerator: str = Field("auto", description="Lightning accelerator: auto | cpu | gpu")
    output_dir: str = "runs"
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross(self):
        names = [t.name for t in self.data.tasks]
        for c in self.selection.constraints:
            if c.task not in names:
                raise ValueError(f"selection constraint names task {c.task!r}; tasks are {names}")
        if self.selection.method is not None and self.selection.method not in self.merge.methods:
            raise ValueError(
                f"selection.method {self.selection.method!r} is not among merge.methods {self.merge.methods}"
            )
        if "mixture" in self.merge.methods and self.posterior.method not in ("multi_ivon", "soup_ivon"):
            raise ValueError(
                "merge method 'mixture' needs a mixture posterior: set posterior.method to "
                "multi_ivon or soup_ivon"
            )
        if "hessian_full" in self.merge.methods and self.posterior.method != "full_von":
            raise ValueError("merge method 'hessian_full' needs posterior.method: full_von")
        for method, opts in self.merge.options.items():
            check_method_options(method, opts, len(self.data.tasks))
        return self


class ConfigError(ValueError):
    """A config file that cannot be used; the message is meant for the user as is."""


def _format(err: ValidationError, path: str) -> str:
    """One line: ``path: invalid config: loc: msg`` (several problems joined by ``; ``)."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/*.yaml for the schema)"
        problems.append(f"{loc}: {' '.join(msg.split())}")
    head = f"{path}: invalid config" + (f" ({len(problems)} problems)" if len(problems) > 1 else "")
    return f"{head}: {'; '.join(problems)}"


def parse_config(data: dict, source: str = "<config>") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a YAML mapping, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config (``params.yaml`` uses the same schema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
