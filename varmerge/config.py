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
    pretrain_steps: int = Field(0, ge=0, description="steps of shared pretraining giving θ0 (0: θ0 = init)")


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


class MergeConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["simple", "hessian", "mixture"])
    spacing: float = Field(0.1, description="α grid spacing; must divide 1")
    mixture_iterations: int = Field(10, ge=0)
    task_arithmetic_scale: float = 1.0

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

        unknown = [m for m in v if m not in MERGE_METHODS]
        if unknown or not v:
            raise ValueError(f"unknown merge methods {unknown}; known: {sorted(MERGE_METHODS)}")
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
        return self


class ConfigError(ValueError):
    """A config file that cannot be used; the message is meant for the user as is."""


def _format(err: ValidationError, path: str) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/*.yaml for the schema)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


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
