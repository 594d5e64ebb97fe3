"""The tasks' data, prepared once per run: the configured source loaded, split into tasks
(class subsets or domains), tokenised or pooled, capped; the pretraining slices; and the flat
tensor form the run store keeps (:func:`tasks_to_tensors`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from varmerge import data as vdata
from varmerge import models
from varmerge.config import ExperimentConfig, PretrainDataConfig


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


def _take(x, y, idx: torch.Tensor):
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}, y[idx]
    return x[idx], y[idx]


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
        if t.max_train is not None:
            try:
                keep = torch.from_numpy(vdata.stratified_cap(tr[1].numpy(), t.max_train, cfg.data.seed))
            except ValueError as exc:
                raise ValueError(f"task {t.name!r}: max_train {t.max_train}: {exc}") from None
            tr = _take(*tr, keep)
        if t.label_noise > 0:
            noisy = vdata.noisy_labels(tr[1].numpy(), t.label_noise, cfg.data.seed)
            tr = (tr[0], torch.from_numpy(noisy).to(tr[1].dtype))
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
