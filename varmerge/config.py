"""The experiment schema: one pydantic model for configs/*.yaml and DVC's params.yaml.

Unknown keys are refused (``extra="forbid"``) and every error names the offending field.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def ivon_settings(section, where: str, **fields):
    """The ``OptimizerSettings`` of a config section with IVON's fields (lr, weight_decay, ess,
    mc_samples, hess_init, beta2 and the other arguments in ``ivon``); ``fields`` override (e.g.
    the optimizer ``name``). Raises ValueError naming the section for a bad IVON argument."""
    from varmerge.train.settings import OptimizerSettings

    taken = sorted(set(section.ivon) & {"hess_init", "beta2"})
    if taken:
        raise ValueError(f"ivon: {taken} have fields of their own: set {where}.{taken[0]} instead")
    values = {
        "name": "ivon",
        "lr": section.lr,
        "weight_decay": section.weight_decay,
        "ess": section.ess,
        "mc_samples": section.mc_samples,
        "ivon": {"hess_init": section.hess_init, "beta2": section.beta2, **section.ivon},
    }
    return OptimizerSettings(**{**values, **fields})


class TaskConfig(_Strict):
    name: str
    classes: list[int] = Field(default_factory=list, description="global class ids of this task")
    domain: str | None = Field(None, description="for text sources split by domain (tweets)")
    max_train: int | None = Field(
        None,
        gt=0,
        description="keep at most this many training examples of the task (seeded, stratified by class): "
        "tasks of very different sizes, as users have them",
    )
    label_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="replace this fraction of the task's training labels by another of its classes (seeded): "
        "a noisy task, for benchmarks",
    )

    @model_validator(mode="after")
    def _one_kind(self):
        if not self.classes and self.domain is None:
            raise ValueError(f"task {self.name!r} needs 'classes' (a class subset) or 'domain'")
        return self


class DataConfig(_Strict):
    source: str = Field(
        "mnist5k", description="mnist5k | fashion_mnist | mnist_idx | fortunes | tweets | hub | files (your own)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the source")
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_per_task: int | None = Field(None, gt=0)
    max_length: int = Field(64, gt=0, description="tokens per text (text sources)")
    max_test_per_task: int | None = Field(
        None, gt=0, description="cap the test set (evaluating G models costs G passes)"
    )
    image_pool: int = Field(
        1,
        ge=1,
        le=14,
        description="average-pool images by this factor (2: 28x28 -> 14x14; full Gaussians stay affordable)",
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
    name: Literal["logreg", "mlp", "resnet20", "lora_text", "hf_text"] = Field(
        "logreg",
        description="hf_text: a local Hugging Face sequence-classification folder (options: model_path, "
        "finetune: lora | full, r, alpha, dropout, target_modules)",
    )
    options: dict[str, Any] = Field(default_factory=dict)


class _Training(_Strict):
    """The training fields of a section that trains with IVON (``posterior``, ``pretrain``)."""

    steps: int = Field(500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    ess: float | None = Field(None, gt=0, description="IVON effective sample size (default: #training examples)")
    hess_init: float = Field(0.1, gt=0)
    beta2: float = Field(0.99999, gt=0, lt=1, description="IVON Hessian EMA; 0.999 lets short runs learn h")
    mc_samples: int = Field(1, ge=1)
    ivon: dict[str, Any] = Field(
        default_factory=dict,
        description="IVON's other keyword arguments, passed to ivon.IVON (beta1, clip_radius, hess_approx, "
        "rescale_lr, debias, sync)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _ivon_arguments(self):
        """``ivon`` holds IVON's arguments that have no field here; the optimizer settings (what
        the run builds from this section) check them, and IVON checks their values."""
        if self.ivon:
            ivon_settings(self, type(self).section)
        return self


class PosteriorConfig(_Training):
    section: ClassVar[str] = "posterior"

    method: str = Field(
        "ivon", description="adamw_sg | ivon | multi_ivon | soup_ivon | full_von | mixture_full_von (the registry)"
    )
    prior_precision: float = Field(1e-4, ge=0, description="δ added to squared-gradient precisions")
    precision: Literal["32-true", "64-true", "bf16-mixed", "16-mixed"] = Field(
        "32-true", description="Lightning training precision (16-mixed needs a gradient scaler: AdamW only)"
    )
    components: int = Field(
        1, ge=1, description="K: seeds (multi_ivon), runs (soup_ivon) or mixture_full_von components"
    )
    weights_lr: float = Field(
        3e-6, ge=0, description="mixture_full_von: step size of the mixture weights (paper: 3e-6)"
    )
    init_spread: float = Field(
        1.0, ge=0, description="mixture_full_von: component offsets at start, in standard deviations"
    )
    warm_start: int = Field(
        0, ge=0, description="mixture_full_von: full-VON iterations whose Gaussian the components start from"
    )
    checkpoint_steps: list[int] = Field(default_factory=list, description="soup_ivon checkpoints")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        _posterior_methods().get_method(v)
        return v

    @model_validator(mode="after")
    def _method(self):
        """The method's own options (its registered options model), and a precision its
        optimizer can train at."""
        spec = _posterior_methods().get_method(self.method)
        spec.parse_options(self)
        if self.precision == "16-mixed" and spec.optimizer != "adamw":
            raise ValueError(
                f"precision 16-mixed needs a gradient scaler, which {self.method} ({spec.optimizer}) cannot use; "
                "use 32-true or bf16-mixed"
            )
        return self


class PretrainDataConfig(_Strict):
    """Where pretraining (or prior) examples come from: the *train* split of a source, never a
    test split."""

    source: str | None = Field(None, description="default: data.source")
    options: dict[str, Any] | None = Field(None, description="the source's options (default: data.options)")
    classes: list[int] = Field(default_factory=list, description="keep these classes (default: all)")
    domains: list[str] = Field(default_factory=list, description="keep these domains (text sources; default: all)")
    offset: int = Field(0, ge=0, description="skip the first examples (after the filters): those the tasks use")
    max_examples: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_filter(self):
        if self.classes and self.domains:
            raise ValueError("give classes or domains, not both")
        return self


class PretrainConfig(_Training):
    """θ0 and its posterior: IVON on data no task's test set sees, from ``base`` or a seeded init.

    The finetunes (and multitask finetunes) start from the pretrained weights and, when they train
    with IVON, from its Hessian (``carry_hessian``): the paper's "IVON initialised at the
    pretrained posterior" (App. B.3)."""

    section: ClassVar[str] = "pretrain"

    data: PretrainDataConfig = PretrainDataConfig()
    carry_hessian: bool = Field(True, description="IVON finetunes start from the pretrained Hessian")


class BaseConfig(_Strict):
    """A user's θ0: a safetensors state dict of the configured model (all or some of its entries)
    or, for ``lora_text`` and ``hf_text``, a Hugging Face model folder (the backbone)."""

    checkpoint: str
    prior_precision: float | None = Field(
        None, gt=0, description="per-example prior precision: IVON finetunes start with this Hessian"
    )
    prior_data: PretrainDataConfig | None = Field(
        None,
        description="a squared-gradient pass over these examples at the checkpoint gives the prior (per example; "
        "prior_precision, default 1e-4, is added as a floor)",
    )


#: ``merge.methods`` may name this front estimator (varmerge.map_front) besides the merge rules.
MAP_METHOD = "map"

#: Former MergeConfig fields, now options of their rule's model.
_MOVED = {"mixture_iterations": "options.mixture.iterations", "task_arithmetic_scale": "options.task_arithmetic.scale"}


def _registry():
    from varmerge.merging import registry

    return registry


def _posterior_methods():
    from varmerge import posterior_methods

    return posterior_methods


def check_method_options(method: str, options: dict[str, Any], num_tasks: int) -> None:
    """Validate ``options`` through the method's options model and, for a method whose values
    depend on the number of tasks, its ``check``, so that a bad value fails now, not after the
    finetunes. Raises ValueError naming the method."""
    spec = _registry().get_method(method)
    try:
        opts = spec.parse_options(options)
        if spec.check is not None:
            spec.check(opts, num_tasks)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"merge.options.{method}: {exc}") from None


class MergeConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["simple", "hessian", "mixture"])
    spacing: float = Field(0.1, description="α grid spacing; must divide 1")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method settings, e.g. {mixture: {iterations: 10}, task_arithmetic: {scale: 1.0}, "
        "ties: {density: 0.2}, dare: {drop: 0.9}, esm: {rank: 8}, regmean: {ridge: 1e-4, "
        "calibration_examples: 256}, map: {n_evaluations: 12}}",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict):
            for old, new in _MOVED.items():
                if old in data:
                    raise ValueError(f"merge.{old} is now merge.{new}")
        return data

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v):
        n = round(1 / v) if v > 0 else 0
        if not (0 < v <= 1) or not math.isclose(n * v, 1.0, abs_tol=1e-9):
            raise ValueError(f"α spacing {v} does not divide 1 (try 0.5, 0.25, 0.2, 0.1, 0.05, 0.02)")
        return v

    @field_validator("methods", "options")
    @classmethod
    def _known(cls, v, info):
        """Registered names only (the options' values: check_method_options, once the number of
        tasks is known)."""
        known = _registry().names()
        unknown = [m for m in v if m not in known]
        where = "unknown merge methods" if info.field_name == "methods" else "options name unknown merge methods"
        if unknown or not (v or info.field_name == "options"):
            raise ValueError(f"{where} {unknown}; known: {known}")
        return v


class Constraint(_Strict):
    task: str
    op: Literal[">=", ">", "<=", "<"] = ">="
    value: float


#: The closed loop's default budget: pooled and uniform α, then one finetune where the merged
#: fronts, corrected by those two, expect the most (docs/RESULTS.md: regret within 3 finetunes).
DEFAULT_BUDGET = 3


class SelectionConfig(_Strict):
    objective: Literal["mean", "worst_task", "weighted"] = Field(
        "mean",
        description="what the best α maximises: the mean over tasks, the worst task, or a weighted mean (weights)",
    )
    weights: dict[str, float] | None = Field(
        None, description="objective weighted: a weight per task name, on the simplex (>= 0, sum 1)"
    )
    constraints: list[Constraint] = Field(default_factory=list)
    max_drop_vs_pooled: float | None = Field(
        None,
        ge=0,
        description="a constraint: no task predicted more than this (accuracy, 0.01 = 1 point) below its "
        "score at pooled α",
    )
    temperature: float = Field(
        0.5, ge=0, le=1, description="τ of the temperature default α_t ∝ N_t^τ (0: uniform, 1: pooled)"
    )
    finetune_defaults: list[Literal["pooled", "uniform", "temperature"]] = Field(
        default_factory=list,
        description="also run the real multitask finetune at these default α, to compare with the chosen one "
        "(the closed loop always starts at pooled)",
    )
    start: list[Literal["pooled", "uniform", "temperature"]] = Field(
        default_factory=lambda: ["pooled", "uniform"],
        min_length=1,
        description="closed_loop: the first finetunes, at these default α (the ones a user would try anyway), "
        "run at once",
    )
    margin: float = Field(
        0.005,
        ge=0,
        description="the verdict: α matters little when the best α beats pooled by less than this on the "
        "objective (0.005 = half a point)",
    )
    strategy: Literal["top_k", "closed_loop"] = Field(
        "closed_loop",
        description="closed_loop (the default, chosen from the evidence of docs/RESULTS.md): a budget of real "
        "finetunes from pooled and uniform α, each next one placed by a GP of realised − predicted "
        "(varmerge/search.py); top_k: finetune at the top-k α of the merged front",
    )
    top_k: int = Field(1, ge=1, description="top_k: multitask finetunes at the top-k α")
    method: str | None = Field(None, description="merge method whose front picks α (default: last)")
    budget: int = Field(DEFAULT_BUDGET, ge=1, description="closed_loop: real multitask finetunes in all")
    batch: int = Field(1, ge=1, description="closed_loop: finetunes per iteration (run at once)")
    epsilon: float = Field(1e-3, ge=0, description="closed_loop: stop when no α is expected to gain more")
    prior_methods: list[str] | None = Field(
        None,
        description="closed_loop: merge methods whose predictions form the prior (default: the selection method "
        "and the variational rules among merge.methods)",
    )

    @model_validator(mode="after")
    def _strategy(self):
        if (self.objective == "weighted") != (self.weights is not None):
            raise ValueError("selection.weights go with selection.objective weighted, and it needs them")
        if self.weights is not None:
            w = list(self.weights.values())
            if any(not math.isfinite(v) or v < 0 for v in w) or abs(sum(w) - 1) > 1e-6:
                raise ValueError(f"selection.weights must be >= 0 and sum to 1 (on the simplex), got {self.weights}")
        if self.strategy == "closed_loop":
            if "top_k" in self.model_fields_set:
                raise ValueError("selection.top_k needs selection.strategy top_k (the default strategy is closed_loop)")
            if self.batch > self.budget:
                raise ValueError(f"selection.batch {self.batch} is larger than selection.budget {self.budget}")
        else:
            given = [k for k in ("budget", "prior_methods") if k in self.model_fields_set]
            if given or self.batch != 1:
                raise ValueError(f"selection.{(given or ['batch'])[0]} needs selection.strategy closed_loop")
        return self


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default sqlite in the run folder)")
    experiment: str = "varmerge"


class RunnerConfig(_Strict):
    """Where the flow's tasks run: ``thread`` (one thread of the flow's process, in order:
    deterministic), or ``dask`` (prefect-dask): a local cluster of ``workers`` processes, or the
    existing Dask scheduler at ``address`` (its workers must share the output folder)."""

    kind: Literal["thread", "dask"] = "thread"
    address: str | None = Field(None, description="tcp://HOST:PORT of a running Dask scheduler (kind dask)")
    workers: int | None = Field(None, ge=1, description="worker processes of a local Dask cluster (default 2)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "thread" and (self.address is not None or self.workers is not None):
            given = "address" if self.address is not None else "workers"
            raise ValueError(f"runner.{given} needs runner.kind dask (the thread runner runs in this process)")
        if self.address is not None and self.workers is not None:
            raise ValueError("runner.workers sizes a local cluster; with runner.address the cluster's own workers run")
        if self.address is not None and not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?", self.address):
            raise ValueError(f"runner.address {self.address!r} is not a Dask scheduler address (tcp://HOST:PORT)")
        return self

    @property
    def local_workers(self) -> int:
        return self.workers or 2


class GateConfig(_Strict):
    """The check that the training learned, before money is spent on sweeps and multitask
    finetunes: each task's finetune against θ0 and chance on its own test set, and a pretrained
    θ0 against chance on its own examples."""

    margin: float = Field(
        0.02, ge=0, lt=1, description="a finetune learned if it beats chance (and does not fall below θ0) by this"
    )
    stop: bool = Field(True, description="stop the run when one did not learn (false: say so and go on)")


class ExperimentConfig(_Strict):
    name: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    base: BaseConfig | None = Field(None, description="start from a user checkpoint instead of a seeded init")
    pretrain: PretrainConfig | None = Field(None, description="pretrain θ0 (and its posterior) with IVON first")
    posterior: PosteriorConfig = PosteriorConfig()
    merge: MergeConfig = MergeConfig()
    selection: SelectionConfig = SelectionConfig()
    gate: GateConfig = GateConfig()
    multitask_steps: int | None = Field(None, gt=0, description="default: posterior.steps")
    accelerator: str = Field("auto", description="Lightning accelerator: auto | cpu | gpu")
    output_dir: str = "runs"
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _cross(self):
        names = [t.name for t in self.data.tasks]
        unknown = sorted(set(self.selection.weights or {}) - set(names))
        missing = [n for n in names if self.selection.weights is not None and n not in self.selection.weights]
        if unknown or missing:
            raise ValueError(
                f"selection.weights name {'unknown tasks ' + str(unknown) if unknown else ''}"
                f"{' and ' if unknown and missing else ''}{'no weight for ' + str(missing) if missing else ''}; "
                f"tasks are {names}"
            )
        for c in self.selection.constraints:
            if c.task not in names:
                raise ValueError(f"selection constraint names task {c.task!r}; tasks are {names}")
        if self.selection.method is not None and self.selection.method not in self.merge.methods:
            raise ValueError(
                f"selection.method {self.selection.method!r} is not among merge.methods {self.merge.methods}"
            )
        unknown = [m for m in self.selection.prior_methods or [] if m not in self.merge.methods]
        if unknown:
            raise ValueError(f"selection.prior_methods {unknown} are not among merge.methods {self.merge.methods}")
        from varmerge.posterior import EXACT_VIEWS

        structures = {m: _posterior_methods().get_method(m).structure for m in _posterior_methods().names()}
        have = structures[self.posterior.method]
        for method in self.merge.methods:
            need = _registry().get_method(method).posterior
            if need not in EXACT_VIEWS[have]:
                producers = " or ".join(m for m, k in structures.items() if need in EXACT_VIEWS[k])
                raise ValueError(
                    f"merge method {method!r} needs a {need} posterior but posterior.method "
                    f"{self.posterior.method!r} gives a {have} one: set posterior.method to {producers}"
                )
        for method, opts in self.merge.options.items():
            check_method_options(method, opts, len(self.data.tasks))
        if self.pretrain is not None and self.base is not None:
            given = [k for k in ("prior_precision", "prior_data") if getattr(self.base, k) is not None]
            if given:
                raise ValueError(f"base.{given[0]}: with pretrain the prior is the pretrained posterior; drop one")
        return self


class ConfigError(ValueError):
    """A config file that cannot be used; the message is meant for the user as is."""


def _format(err: ValidationError, path: str, section: str | None = None) -> str:
    """One line: ``path: invalid config: loc: msg`` (several problems joined by ``; ``);
    ``section`` prefixes the locations of a section validated on its own."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in ([section] if section else []) + list(e["loc"])) or "(top level)"
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


def with_runner(cfg: ExperimentConfig, runner: dict, source: str = "<runner>") -> ExperimentConfig:
    """``cfg`` with its ``runner`` section replaced by ``runner`` (only that section is validated:
    nothing else of the config depends on it)."""
    try:
        section = RunnerConfig.model_validate(runner)
    except ValidationError as err:
        raise ConfigError(_format(err, source, "runner")) from None
    return cfg.model_copy(update={"runner": section})


def read_config(path: str | Path) -> dict:
    """A YAML experiment config as a mapping, not yet validated, with its relative file paths
    read from the config file's folder (see :func:`_relative_to`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _relative_to(data, path.parent)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config (``params.yaml`` uses the same schema)."""
    return parse_config(read_config(path), str(path))


#: The user's files a config names, by where they sit in it: (section path, option keys).
_PATHS = (
    (("data", "options"), ("train", "test", "root")),
    (("pretrain", "data", "options"), ("train", "test", "root")),
    (("pretrain", "prior_data", "options"), ("train", "test")),
    (("base", "prior_data", "options"), ("train", "test")),
    (("model", "options"), ("model_path",)),
    (("base",), ("checkpoint",)),
)


def _relative_to(data, folder: Path):
    """The raw config ``data`` with every relative file path it names (data files, a model
    folder, a checkpoint) read from the config file's ``folder``, as a user who writes
    ``train: data/reviews.csv`` beside the config means it; absolute paths and ``~`` stay."""
    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    for section, keys in _PATHS:
        node = out
        for key in section:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for key in keys:
            value = node.get(key)
            if isinstance(value, str):
                node[key] = _against(value, folder)
            elif isinstance(value, dict):
                node[key] = {k: _against(v, folder) if isinstance(v, str) else v for k, v in value.items()}
    return out


def _against(value: str, folder: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (folder / p).resolve())
