"""The steps of a front estimation, as plain functions of a config (no orchestration here).

1. :func:`prepare_tasks`: offline data, split into tasks (train/test tensors per task);
2. :func:`base_model`: θ0, the shared starting point (seeded initialisation);
3. :func:`finetune_task`: one task's finetune and posterior (diagonal, mixture or full);
4. :func:`merge_sweep` + :func:`score_sweep`: every merged model on the α grid, scored per task;
5. :func:`select`: the front and the chosen α;
6. :func:`multitask_finetune`: the real multitask finetune at a chosen α (the realised score).

:mod:`varmerge.sequence` runs them in order (in process, or as Prefect tasks over the run store
of ``tasks/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from varmerge import data as vdata
from varmerge import evaluate, merge, models, pareto, train
from varmerge.config import MAP_METHOD, ExperimentConfig, PretrainDataConfig, ivon_settings
from varmerge.grid import simplex_grid
from varmerge.posterior import DiagonalGaussian, FullGaussian, MixtureGaussian, PosteriorMeta
from varmerge.progress import Report, StepProgress

Posterior = DiagonalGaussian | MixtureGaussian | FullGaussian


@dataclass
class TaskData:
    name: str
    classes: tuple[int, ...]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def tasks_to_tensors(tasks: Sequence[TaskData], num_classes: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-task train/test tensors as one flat tensor dict (``<task>/<split>/x[/<field>]``, ``.../y``)
    plus the header that :func:`tasks_from_tensors` needs: what one run prepares once and every step
    reads back."""
    tensors: dict[str, torch.Tensor] = {}
    for t in tasks:
        for split, (x, y) in (("train", t.train), ("test", t.test)):
            if isinstance(x, dict):
                tensors.update({f"{t.name}/{split}/x/{k}": v for k, v in x.items()})
            else:
                tensors[f"{t.name}/{split}/x"] = x
            tensors[f"{t.name}/{split}/y"] = y
    header = {
        "kind": "tasks",
        "num_classes": int(num_classes),
        "tasks": [{"name": t.name, "classes": list(t.classes)} for t in tasks],
    }
    return tensors, header


def tasks_from_tensors(tensors: dict[str, torch.Tensor], header: dict) -> tuple[list[TaskData], int]:
    """The inverse of :func:`tasks_to_tensors` (views of ``tensors``, no copies)."""
    if header.get("kind") != "tasks":
        raise ValueError(f"not a prepared-tasks file (kind {header.get('kind')!r})")
    out = []
    for t in header["tasks"]:
        splits = []
        for split in ("train", "test"):
            prefix = f"{t['name']}/{split}/x"
            x = tensors.get(prefix)
            if x is None:
                x = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
                if not x:
                    raise ValueError(f"prepared tasks lack {prefix!r}")
            splits.append((x, tensors[f"{t['name']}/{split}/y"]))
        out.append(TaskData(t["name"], tuple(t["classes"]), splits[0], splits[1]))
    return out, int(header["num_classes"])


#: The last dataset loaded and the last tasks prepared in this process, so that the checks before
#: a run (preflight) and the run itself read, split and tokenise the data once.
_LAST: dict[str, tuple] = {}


def _remember(slot: str, key: str, make):
    if slot not in _LAST or _LAST[slot][0] != key:
        _LAST[slot] = (key, make())
    return _LAST[slot][1]


def load_dataset(cfg: ExperimentConfig):
    """The configured source as a DatasetDict (seed/test_fraction passed where the source takes them)."""
    opts = dict(cfg.data.options)
    if cfg.data.source in vdata.SEEDED_SOURCES:
        opts.setdefault("seed", cfg.data.seed)
        opts.setdefault("test_fraction", cfg.data.test_fraction)
    return _remember("dataset", cfg.data.model_dump_json(), lambda: vdata.load_source(cfg.data.source, **opts))


def _cap(x, y, n: int | None):
    if n is None:
        return x, y
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}, y[:n]
    return x[:n], y[:n]


def _text_tensors(ds, tokenizer, max_length: int):
    """Tokenised ``text`` column as ``({"input_ids", "attention_mask"}, labels)`` tensors."""
    enc = models.tokenize(list(ds["text"]), tokenizer, max_length=max_length)
    return enc, torch.as_tensor(list(ds["label"]), dtype=torch.long)


def prepare_tasks(cfg: ExperimentConfig, dataset=None) -> tuple[list[TaskData], int]:
    """Per-task (x, y) train/test tensors and the number of classes of the shared head.

    Image sources give x as (N, 1, 28, 28) tensors; text sources give x as a dict of token
    tensors (``input_ids``, ``attention_mask``). Tasks are class subsets or, for sources with a
    ``domain`` column (tweets), domains sharing one label space.
    """
    ds = load_dataset(cfg) if dataset is None else dataset
    key = json.dumps(
        [
            cfg.data.model_dump(mode="json"),
            cfg.model.name,
            model_path(cfg),
            {split: getattr(part, "_fingerprint", id(part)) for split, part in ds.items()},
        ],
        sort_keys=True,
        default=str,
    )
    return _remember("tasks", key, lambda: _prepare_tasks(cfg, ds))


def _prepare_tasks(cfg: ExperimentConfig, ds) -> tuple[list[TaskData], int]:
    n_classes = vdata.num_classes(ds)
    for t in cfg.data.tasks:
        bad = [c for c in t.classes if c >= n_classes]
        if bad:
            raise ValueError(f"task {t.name!r}: class ids {bad} out of range (dataset has {n_classes} classes)")
    by_domain = [t.domain is not None for t in cfg.data.tasks]
    if any(by_domain) and not all(by_domain):
        raise ValueError("either every task names a 'domain' or none does")
    if all(by_domain):
        parts = vdata.split_by_domains(ds, [t.domain for t in cfg.data.tasks])
    else:
        parts = vdata.split_by_tasks(ds, [t.classes for t in cfg.data.tasks])
    is_text = "text" in next(iter(ds.values())).column_names
    tokenizer = models.text_tokenizer(model_path(cfg)) if is_text else None
    out = []
    for t, part in zip(cfg.data.tasks, parts, strict=True):
        tr, te = (_examples(cfg, part[split], tokenizer) for split in ("train", "test"))
        tr = _cap(*tr, cfg.data.max_train_per_task)
        te = _cap(*te, cfg.data.max_test_per_task)
        out.append(TaskData(t.name, tuple(t.classes), tr, te))
    return out, n_classes


def _examples(cfg: ExperimentConfig, ds, tokenizer) -> tuple:
    """(x, y) tensors of a split: tokenised text (``tokenizer`` given) or images pooled by
    ``data.image_pool``."""
    if tokenizer is not None:
        return _text_tensors(ds, tokenizer, cfg.data.max_length)
    x, y = vdata.image_tensors(ds)
    k = cfg.data.image_pool
    if k > 1:
        if x.shape[-1] % k:
            raise ValueError(f"data.image_pool {k} does not divide the image size {x.shape[-1]}")
        x = torch.nn.functional.avg_pool2d(x, k)
    return x, y


# ------------------------------------------------------------------------------ pretraining
def pretrain_source(cfg: ExperimentConfig, pd: PretrainDataConfig | None = None) -> tuple[str, dict]:
    """The source and options a slice (default ``pretrain.data``) loads (by default the run's own)."""
    pd = pd or cfg.pretrain.data
    source = pd.source or cfg.data.source
    options = pd.options if pd.options is not None else (cfg.data.options if source == cfg.data.source else {})
    return source, dict(options)


def load_pretrain_dataset(cfg: ExperimentConfig, pd: PretrainDataConfig | None = None):
    """The source of a slice (default ``pretrain.data``; the run's own dataset when it names the same source)."""
    source, opts = pretrain_source(cfg, pd)
    if source == cfg.data.source and opts == cfg.data.options:
        return load_dataset(cfg)
    if source in vdata.SEEDED_SOURCES:
        opts.setdefault("seed", cfg.data.seed)
        opts.setdefault("test_fraction", cfg.data.test_fraction)
    key = json.dumps([source, opts], sort_keys=True, default=str)
    return _remember("pretrain_dataset", key, lambda: vdata.load_source(source, **opts))


def prepare_pretrain(
    cfg: ExperimentConfig, dataset=None, pd: PretrainDataConfig | None = None
) -> tuple[torch.Tensor | dict, torch.Tensor]:
    """The pretraining examples as (x, y) tensors: the *train* split of the slice's source (default
    ``pretrain.data``; ``base.prior_data`` for a checkpoint's prior), filtered by classes or
    domains, from ``offset``, at most ``max_examples``; prepared as the tasks are (pooling,
    tokenisation), so θ0 takes the tasks' inputs."""
    pd = pd or cfg.pretrain.data
    ds = (load_pretrain_dataset(cfg, pd) if dataset is None else dataset)["train"]
    if pd.classes:
        ds = vdata.class_subset(ds, pd.classes)
    if pd.domains:
        if "domain" not in ds.column_names:
            raise ValueError(f"domains: the source has no 'domain' column ({ds.column_names})")
        col = ds["domain"]
        missing = sorted(set(pd.domains) - set(col))
        if missing:
            raise ValueError(f"no training examples of domains {missing}")
        keep = set(pd.domains)
        ds = ds.select([i for i, d in enumerate(col) if d in keep])
    stop = len(ds) if pd.max_examples is None else min(len(ds), pd.offset + pd.max_examples)
    if pd.offset >= stop:
        raise ValueError(f"offset {pd.offset} leaves no example of the {len(ds)} there are")
    ds = ds.select(range(pd.offset, stop))
    is_text = "text" in ds.column_names
    tokenizer = models.text_tokenizer(model_path(cfg)) if is_text else None
    return _examples(cfg, ds, tokenizer)


def model_path(cfg: ExperimentConfig) -> str | None:
    """The text backbone's folder: ``base.checkpoint`` when it is a folder, else ``model.options``."""
    if cfg.base is not None and Path(cfg.base.checkpoint).is_dir():
        return cfg.base.checkpoint
    return cfg.model.options.get("model_path")


def initial_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The model before pretraining: a seeded init (``posterior.seed``), with ``base.checkpoint``'s
    entries loaded when it is a state dict file (every entry must be the model's, shapes equal)."""
    model = base_model(cfg, num_classes)
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


def pretrain_settings(cfg: ExperimentConfig) -> tuple[train.OptimizerSettings, train.TrainerSettings]:
    """IVON and Lightning settings of ``cfg.pretrain``."""
    p = cfg.pretrain
    check_accelerator(cfg.accelerator)
    opt = ivon_settings(p, "pretrain")
    tr = train.TrainerSettings(
        steps=p.steps,
        batch_size=p.batch_size,
        accelerator=cfg.accelerator,
        log_every_n_steps=max(1, min(50, p.steps // 20)),
    )
    return opt, tr


def start_point(
    cfg: ExperimentConfig, num_classes: int, *, logger=None, report: Report | None = None
) -> tuple[nn.Module, DiagonalGaussian | None]:
    """θ0 and its posterior, the prior the finetunes start from (None without one).

    With ``pretrain``: IVON on :func:`prepare_pretrain`'s examples from :func:`initial_model`;
    the prior is IVON's posterior. With only ``base``: the checkpoint and, with ``prior_data``,
    the per-example mean of squared gradients over those examples (+ ``prior_precision``, default
    1e-4), or a prior of ``prior_precision`` everywhere. Otherwise the seeded init and no prior.
    """
    model = initial_model(cfg, num_classes)
    if cfg.pretrain is None:
        if cfg.base is None or (cfg.base.prior_precision is None and cfg.base.prior_data is None):
            return model, None
        if cfg.base.prior_data is not None:
            return model, _squared_gradient_prior(cfg, model)
        mean = models.trainable_state_dict(model)
        prec = {k: torch.full_like(v, cfg.base.prior_precision) for k, v in mean.items()}
        return model, DiagonalGaussian(mean, prec, PosteriorMeta(task="base", optimizer="scalar", ess=1.0))
    x, y = prepare_pretrain(cfg)
    opt, tr = pretrain_settings(cfg)
    tr = dataclasses.replace(tr, logger=logger, callbacks=_progress_callbacks(report))
    data = _DictDataset(x, y) if isinstance(x, dict) else (x, y)
    model, prior = train.fit(model, data, opt, tr, seed=cfg.pretrain.seed, task="pretrain")
    return model, prior


def _squared_gradient_prior(cfg: ExperimentConfig, model: nn.Module) -> DiagonalGaussian:
    """``base.prior_data``'s squared-gradient pass at θ0, on the per-example scale after ``ess``."""
    x, y = prepare_pretrain(cfg, pd=cfg.base.prior_data)
    data = _DictDataset(x, y) if isinstance(x, dict) else (x, y)
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


class _DictDataset(torch.utils.data.Dataset):
    """(dict of (N, ...) tensors, labels) as a Dataset of dict examples with ``labels``."""

    def __init__(self, x: dict, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.x.items()}, "labels": self.y[i]}


def train_data(task: TaskData):
    """What :mod:`varmerge.train` takes: (x, y) tensors, or a Dataset of dicts for text."""
    x, y = task.train
    return _DictDataset(x, y) if isinstance(x, dict) else (x, y)


def model_options(cfg: ExperimentConfig) -> dict:
    """The builder's keyword options: ``model.options`` plus what the data implies (pooled inputs)
    and a backbone folder given as ``base.checkpoint``."""
    options = dict(cfg.model.options)
    if model_path(cfg) is not None:
        options["model_path"] = model_path(cfg)
    if cfg.data.image_pool > 1 and cfg.model.name in ("logreg", "mlp"):
        options.setdefault("in_features", (28 // cfg.data.image_pool) ** 2)
    return options


def build_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The configured architecture (weights from torch's current RNG)."""
    return models.build_model(cfg.model.name, num_classes=num_classes, **model_options(cfg))


def base_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """θ0: the configured model, initialised from ``posterior.seed``."""
    torch.manual_seed(cfg.posterior.seed)
    return build_model(cfg, num_classes)


def sweep_device(cfg: ExperimentConfig) -> torch.device:
    """Where the α sweeps merge and score: the GPU when training may use one (``accelerator``
    auto or gpu) and one is visible, else the CPU."""
    if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def check_accelerator(accelerator: str) -> None:
    """Fail fast when a GPU is requested where none exists (``auto`` falls back to the CPU)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"accelerator: {accelerator} was requested but no CUDA device is visible; "
            "use accelerator: auto (GPU when present, else CPU) or cpu"
        )
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"unknown accelerator {accelerator!r}; use auto, cpu or gpu")


#: The optimizer each posterior method trains with.
_METHOD_OPTIMIZER = {
    "adamw_sg": "adamw",
    "ivon": "ivon",
    "multi_ivon": "ivon",
    "soup_ivon": "ivon",
    "full_von": "full_von",
    "mixture_full_von": "full_von",
}


def optimizer_settings(cfg: ExperimentConfig, *, name: str | None = None) -> train.OptimizerSettings:
    """The optimizer of ``cfg.posterior`` (``name`` overrides the method's: the multitask finetune
    of a full VON config trains with IVON)."""
    p = cfg.posterior
    return ivon_settings(p, "posterior", name=name or _METHOD_OPTIMIZER[p.method], prior_precision=p.prior_precision)


def trainer_settings(cfg: ExperimentConfig, *, logger=None, report: Report | None = None) -> train.TrainerSettings:
    """How Lightning runs ``cfg.posterior.steps`` steps on ``cfg.accelerator`` (checked first);
    ``report`` is told the optimiser steps (:class:`varmerge.progress.StepProgress`)."""
    check_accelerator(cfg.accelerator)
    p = cfg.posterior
    return train.TrainerSettings(
        steps=p.steps,
        batch_size=p.batch_size,
        accelerator=cfg.accelerator,
        precision=p.precision,
        logger=logger,
        callbacks=_progress_callbacks(report),
        log_every_n_steps=max(1, min(50, p.steps // 20)),
    )


def _progress_callbacks(report: Report | None) -> tuple:
    return () if report is None else (StepProgress(report),)


def finetune_task(
    cfg: ExperimentConfig,
    base: nn.Module,
    task: TaskData,
    *,
    report: Report | None = None,
    logger=None,
    resume_dir: str | os.PathLike | None = None,
    prior: DiagonalGaussian | None = None,
) -> tuple[Posterior, dict[str, torch.Tensor]]:
    """Finetune a copy of ``base`` on one task; returns (posterior, finetuned trainable weights).

    ``prior``: θ0's posterior (:func:`start_point`); IVON finetunes start from its Hessian
    (:func:`carried_hessian`).

    ``logger`` is any Lightning logger (the flows pass an MLflow logger bound to the task's run).
    ``resume_dir``: a folder for the pieces that finish before the posterior does — each
    MultiIVON / SoupIVON run (``run-<k>.safetensors``) and the AdamW-trained weights before the
    squared-gradient pass (``trained.safetensors``) — written atomically as they complete and
    reused when present, so a job killed mid-posterior redoes only what was unfinished. The
    caller keys the folder by the inputs (config, data, θ0) and removes it once the posterior is
    saved. Single-run IVON and full VON produce their posterior with the training itself.
    """
    import copy

    p = cfg.posterior
    model = copy.deepcopy(base)
    opt, tr = optimizer_settings(cfg), trainer_settings(cfg, logger=logger, report=report)
    opt = dataclasses.replace(opt, initial_hess=carried_hessian(cfg, prior, opt.name))
    if p.method == "adamw_sg" and resume_dir is not None:
        return _adamw_sg_resumable(cfg, model, task, opt, tr, Path(resume_dir))
    runs = {}
    if p.method in ("multi_ivon", "soup_ivon") and resume_dir is not None:
        parts = _RunParts(Path(resume_dir), models.trainable_state_dict(base), p.components)
        runs = {"completed_runs": parts.completed(), "on_run": parts.save}
    if p.method in ("ivon", "adamw_sg", "full_von"):
        model, post = train.fit(model, train_data(task), opt, tr, seed=p.seed, task=task.name)
        return post, models.trainable_state_dict(model)
    if p.method == "mixture_full_von":
        x, y = task.train
        post = train.fit_mixture_full_von(
            model,
            x,
            y,
            components=p.components,
            lr=p.lr,
            lr_weights=p.weights_lr,
            mc_samples=p.mc_samples,
            num_iters=p.steps,
            prior_precision=p.prior_precision,
            init_spread=p.init_spread,
            warm_start=p.warm_start,
            seed=p.seed,
            meta=PosteriorMeta(task=task.name),
        )
        return post, models.trainable_state_dict(model)
    if p.method == "multi_ivon":
        post = train.fit_multi_ivon(
            model, train_data(task), opt, tr, num_runs=p.components, seed=p.seed, task=task.name, **runs
        )
        return post, post.components[0].mean
    if p.method == "soup_ivon":
        post = train.fit_soup_ivon(
            model,
            train_data(task),
            opt,
            tr,
            num_runs=p.components,
            snapshot_steps=p.checkpoint_steps,
            seed=p.seed,
            task=task.name,
            **runs,
        )
        return post, post.components[-1].mean
    raise ValueError(f"unknown posterior method {p.method!r}")


class _RunParts:
    """Finished MultiIVON / SoupIVON runs as files ``run-<k>.safetensors`` (see finetune_task)."""

    def __init__(self, folder: Path, expected: dict[str, torch.Tensor], num_runs: int):
        self.folder, self.expected, self.num_runs = folder, expected, num_runs

    def path(self, run: int) -> Path:
        return self.folder / f"run-{run}.safetensors"

    def completed(self) -> dict[int, list[DiagonalGaussian]]:
        return {
            k: MixtureGaussian.load(self.path(k), expected=self.expected).components
            for k in range(self.num_runs)
            if self.path(k).exists()
        }

    def save(self, run: int, posteriors: list[DiagonalGaussian]) -> None:
        MixtureGaussian(list(posteriors), meta=PosteriorMeta(task=posteriors[0].meta.task)).save(self.path(run))


def _resumable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters and the buffers (e.g. batch-norm statistics)."""
    return {**models.trainable_state_dict(model), **{n: b.detach().clone() for n, b in model.named_buffers()}}


def _adamw_sg_resumable(
    cfg: ExperimentConfig,
    model: nn.Module,
    task: TaskData,
    opt: train.OptimizerSettings,
    tr: train.TrainerSettings,
    folder: Path,
):
    """AdamW training, its weights persisted, then the squared-gradient pass (as ``train.fit`` does)."""
    from varmerge import io

    p = cfg.posterior
    trained = folder / "trained.safetensors"
    if trained.exists():
        state = io.load_state_dict(trained, expected=_resumable_state(model))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{trained}: unexpected entries {unexpected[:5]}")
    else:
        model, _ = train.fit(model, train_data(task), opt, tr, seed=p.seed, task=task.name, compute_posterior=False)
        io.save_state_dict(trained, _resumable_state(model), {"task": task.name, "stage": "adamw-trained"})
    post = train.trained_sg_posterior(model, train_data(task), opt, tr, meta=PosteriorMeta(task=task.name, seed=p.seed))
    return post, models.trainable_state_dict(model)


def _diagonal(post: Posterior) -> DiagonalGaussian:
    """The single diagonal Gaussian a non-mixture rule uses (a mixture's first component)."""
    return post.diagonal()


def merge_sweep(
    method: str,
    posteriors: Sequence[Posterior],
    base: dict[str, torch.Tensor],
    alpha: torch.Tensor,
    *,
    options: dict | merge.Options | None = None,
    grams: Sequence[dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merged trainable weights for every α row (tensors with a leading G dimension).

    The generic dispatch of :func:`varmerge.merge.apply`: each posterior gives the view the rule
    declares (a single diagonal Gaussian — a mixture's first component, the cost of one IVON run
    as in the paper's Hessian-weighted rows —, a mixture, or a full Gaussian, solved in float32).
    ``options`` are the rule's settings (``merge.options[method]``, validated by its options
    model); ``grams`` the per-task calibration Grams a calibration rule (``regmean``) needs, see
    :func:`calibration_grams`.
    """
    return merge.apply(method, posteriors, base, alpha, options, grams=grams)


def calibration_grams(
    model: nn.Module, posteriors: Sequence[Posterior], tasks: Sequence[TaskData], examples: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Layer-input Grams of each task's finetuned model on its first ``examples`` training inputs."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"calibration_examples must be a positive integer, got {examples!r}")
    inputs = [evaluate.slice_inputs(t.train[0], 0, examples) for t in tasks]
    return merge.calibration_grams(model, [_diagonal(p).mean for p in posteriors], inputs)


def score_sweep(
    model: nn.Module, merged: dict[str, torch.Tensor], tasks: Sequence[TaskData], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Test accuracy and loss, (G, T) float64, of every merged model on every task."""
    return evaluate.evaluate_tasks(model, merged, [t.test for t in tasks], progress=progress)


SWEEP_BLOCK = 256  # α merged and scored at a time by sweep_and_score (at most)
SWEEP_ELEMENTS = 1 << 27  # merged weights held at a time: 512 MiB of float32


def sweep_block(num_params: int) -> int:
    """α merged and scored at a time for a model of ``num_params`` trainable weights:
    :data:`SWEEP_BLOCK`, halved while the block's merged weights exceed :data:`SWEEP_ELEMENTS`
    (a full finetune of a transformer). A power of two, so it divides :data:`SWEEP_BLOCK`."""
    block = SWEEP_BLOCK
    while block > 1 and block * num_params > SWEEP_ELEMENTS:
        block //= 2
    return block


def sweep_and_score(
    cfg: ExperimentConfig,
    method: str,
    posteriors: Sequence[Posterior],
    model: nn.Module,
    tasks: Sequence[TaskData],
    alpha: torch.Tensor | None = None,
    *,
    block: int | None = None,
    report: Report | None = None,
) -> dict[str, torch.Tensor]:
    """Merge and score over the α grid in blocks of ``block`` α (default :func:`sweep_block`:
    bounds memory for big models); ``report`` is told the α done after each block. A row's result
    depends on the block it is computed in (chunk sizes follow the block's size), so a sweep split
    at multiples of :data:`SWEEP_BLOCK` gives the same bits as the whole one.

    Returns ``alpha``, (G, T) ``accuracy`` and ``loss``, and the wall-clock ``merge_seconds``
    (incl. calibration Grams) and ``eval_seconds`` of the sweep.

    ``method`` is a registered merge rule or a front estimator (``map``, dispatched on the spec's
    kind to :func:`map_sweep`). Settings come from ``cfg.merge.options[method]``, validated by the
    method's options model; a calibration rule's Grams are computed once per sweep from the first
    ``calibration_examples`` (default 256) training inputs of each task.
    """
    spec = merge.get_method(method)
    alpha = simplex_grid(len(tasks), cfg.merge.spacing) if alpha is None else alpha
    if spec.kind == "estimator":

        def score_task_arithmetic(design: torch.Tensor) -> dict[str, torch.Tensor]:
            s = sweep_and_score(cfg, "task_arithmetic", posteriors, model, tasks, design, block=block, report=report)
            return {"accuracy": s["accuracy"], "loss": s["loss"]}

        return map_sweep(cfg, alpha, score_task_arithmetic)
    base = models.trainable_state_dict(model)
    device = next(iter(base.values())).device  # the model's: the posteriors are there too
    block = block or sweep_block(sum(v.numel() for v in base.values()))
    options = spec.parse_options(cfg.merge.options.get(method, {}))
    t0 = time.perf_counter()
    grams = None
    if spec.needs_calibration:
        grams = calibration_grams(model, posteriors, tasks, options.calibration_examples)
    merge_s = time.perf_counter() - t0
    eval_s = 0.0
    acc, loss = [], []
    if report is not None:
        report(0, len(alpha))
    for lo in range(0, len(alpha), block):
        t0 = time.perf_counter()
        merged = merge_sweep(method, posteriors, base, alpha[lo : lo + block].to(device), options=options, grams=grams)
        t1 = time.perf_counter()
        s = score_sweep(model, merged, tasks)
        merge_s, eval_s = merge_s + t1 - t0, eval_s + time.perf_counter() - t1
        acc.append(s["accuracy"].cpu())
        loss.append(s["loss"].cpu())
        if report is not None:
            report(min(lo + block, len(alpha)), len(alpha))
    return {
        "alpha": alpha,
        "accuracy": torch.cat(acc),
        "loss": torch.cat(loss),
        "merge_seconds": merge_s,
        "eval_seconds": eval_s,
    }


def map_sweep(
    cfg: ExperimentConfig, alpha: torch.Tensor, score: Callable[[torch.Tensor], dict[str, torch.Tensor]]
) -> dict:
    """MAP (:mod:`varmerge.map_front`): task arithmetic scored at a few α, quadratic surrogates.

    ``score(design)`` gives the (E, T) ``accuracy`` and ``loss`` of task arithmetic at the design
    α (:func:`sweep_and_score` passes its own sweep of ``task_arithmetic``). Returns the
    surrogates' (G, T) float64 predictions on the α grid ``alpha`` as ``accuracy`` (clipped to
    [0, 1]) and ``loss`` (clipped at 0), so fronts, selection and indicators treat MAP like any
    merge, plus the NSGA front of the accuracy surrogate (``front_alpha``, ``front_accuracy``)
    and the number of real evaluations. Options: ``cfg.merge.options["map"]`` (n_evaluations,
    seed, algorithm, pop_size, n_gen); task arithmetic uses ``merge.options.task_arithmetic``.
    """
    spec = merge.get_method(MAP_METHOD)
    options = spec.parse_options(cfg.merge.options.get(MAP_METHOD, {}))
    t0 = time.perf_counter()
    res = spec.fn(score, alpha, **options.rule_kwargs())
    return {
        "alpha": alpha,
        "accuracy": res.predictions["accuracy"].clamp(0.0, 1.0),
        "loss": res.predictions["loss"].clamp_min(0.0),
        "front_alpha": res.front_alpha,
        "front_accuracy": res.front_values.clamp(0.0, 1.0),
        "evaluations": res.evaluations,
        "merge_seconds": 0.0,
        "eval_seconds": time.perf_counter() - t0,
    }


def select(cfg: ExperimentConfig, alpha: torch.Tensor, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and α of the top-k by mean accuracy among rows meeting the constraints."""
    names = [t.name for t in cfg.data.tasks]
    cons = [(names.index(c.task), c.op, c.value) for c in cfg.selection.constraints]
    return pareto.select_alpha(alpha, accuracy, k=cfg.selection.top_k, constraints=cons, task_names=names)


def multitask_finetune(
    cfg: ExperimentConfig,
    base: nn.Module,
    tasks: Sequence[TaskData],
    alpha: Sequence[float],
    *,
    report: Report | None = None,
    logger=None,
    prior: DiagonalGaussian | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """The real finetune of Σ_t α_t l_t from θ0; returns the model and its (T,) test accuracies.
    With IVON it starts from ``prior``'s Hessian, as the per-task finetunes do."""
    import copy

    p = cfg.posterior
    model = copy.deepcopy(base)
    # IVON's ess defaults to the examples of all tasks; full VON configs finetune with IVON
    opt = optimizer_settings(cfg, name="adamw" if p.method == "adamw_sg" else "ivon")
    opt = dataclasses.replace(opt, initial_hess=carried_hessian(cfg, prior, opt.name))
    tr = dataclasses.replace(trainer_settings(cfg, logger=logger, report=report), steps=cfg.multitask_steps or p.steps)
    model = train.fit_multitask(
        model, [train_data(t) for t in tasks], torch.as_tensor(alpha, dtype=torch.float64), opt, tr, seed=p.seed
    )
    sd = {k: v.unsqueeze(0) for k, v in models.trainable_state_dict(model).items()}
    scores = score_sweep(model, sd, tasks)
    return model, scores["accuracy"][0]
