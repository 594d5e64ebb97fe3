"""Batches, losses and data loaders.

Batches are ``(x, y)`` tuples or dicts with a ``labels`` entry (the LoRA text model: the other
entries are passed to the model as keyword arguments). Models return logits over all classes and
labels are global class ids, so every task shares one head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["default_forward", "default_labels", "make_loader", "task_loss", "weighted_multitask_loss"]

Data = Any  # (x, y) tensors | Dataset | DataLoader

_LABEL_KEYS = ("labels", "label", "y")


def as_logits(out: Any) -> Tensor:
    """A model output as its logits tensor (a tensor, ``out.logits`` or ``out["logits"]``)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    raise ValueError(f"the model returned a {type(out).__name__}, not logits (a tensor or an output with .logits)")


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """``model(x)`` for an ``(x, y)`` batch; ``model(**inputs)`` for a dict batch minus its labels."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return as_logits(model(**inputs))
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return as_logits(model(batch[0]))
    raise ValueError(f"cannot read a {type(batch).__name__} batch; use (x, y) tuples or dicts with 'labels'")


def default_labels(batch: Any) -> Tensor:
    """``y`` of an ``(x, y)`` batch or ``batch['labels']`` of a dict batch."""
    if isinstance(batch, Mapping):
        for k in _LABEL_KEYS:
            if k in batch:
                return batch[k]
        raise ValueError(f"dict batch has no labels entry (looked for {_LABEL_KEYS}); keys: {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(f"cannot find labels in a {type(batch).__name__} batch")


def task_loss(model: nn.Module, batch: Any, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of one task's batch (``reduction="none"`` gives per-example losses)."""
    logits = default_forward(model, batch)
    labels = default_labels(batch)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits: compute the loss in float32
    return F.cross_entropy(logits, labels.long(), reduction=reduction)


def weighted_multitask_loss(
    model: nn.Module, batches: Sequence[Any], alpha: Sequence[float] | Tensor
) -> tuple[Tensor, list[Tensor | None]]:
    """``Σ_t α_t l_t`` with ``l_t`` the mean cross-entropy of task t's batch.

    Tasks with ``α_t = 0`` are skipped (not evaluated), so at ``α = e_t`` the value equals
    :func:`task_loss` of task t exactly. Returns the total and the per-task losses (None if skipped).
    """
    a = [float(v) for v in (alpha.tolist() if isinstance(alpha, Tensor) else alpha)]
    if len(a) != len(batches):
        raise ValueError(f"α has {len(a)} entries but there are {len(batches)} task batches")
    total: Tensor | None = None
    per_task: list[Tensor | None] = []
    for a_t, batch in zip(a, batches, strict=True):
        if a_t == 0.0:
            per_task.append(None)
            continue
        lt = task_loss(model, batch)
        per_task.append(lt.detach())
        term = lt if a_t == 1.0 else a_t * lt
        total = term if total is None else total + term
    if total is None:
        raise ValueError("α has no positive entry")
    return total, per_task


def check_alpha(alpha, T: int) -> list[float]:
    """``alpha`` as a list of T floats on the simplex (ValueError otherwise)."""
    a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    if a.numel() != T:
        raise ValueError(f"α has {a.numel()} entries but there are {T} tasks")
    if not torch.isfinite(a).all() or (a < 0).any() or abs(float(a.sum()) - 1.0) > 1e-6:
        raise ValueError(f"α must be a finite point on the simplex (α_t >= 0, Σ α_t = 1), got {a.tolist()}")
    return a.tolist()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class DictDataset(Dataset):
    """(dict of (N, ...) tensors, labels) as a Dataset of dict examples with ``labels`` (text)."""

    def __init__(self, x: Mapping[str, Tensor], y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.x.items()}, "labels": self.y[i]}


def as_data(x: Tensor | Mapping[str, Tensor], y: Tensor) -> Data:
    """What the training entry points take from a task's inputs and labels: ``(x, y)`` tensors,
    or a :class:`DictDataset` for token dicts."""
    return DictDataset(x, y) if isinstance(x, Mapping) else (x, y)


def _as_dataset(data: Data, what: str = "data") -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        return TensorDataset(x, y)
    raise ValueError(
        f"{what} must be an (x, y) tuple of tensors, a torch Dataset or a DataLoader, got {type(data).__name__}"
    )


def make_loader(data: Data, batch_size: int, *, shuffle: bool, seed: int = 0, what: str = "data") -> DataLoader:
    """A DataLoader over ``data`` (returned unchanged if it already is one).

    Shuffling uses its own generator seeded with ``seed``, so one loader's order does not depend on
    what else consumed the global RNG.
    """
    if isinstance(data, DataLoader):
        return data
    ds = _as_dataset(data, what)
    if len(ds) == 0:
        raise ValueError(f"{what} is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def num_examples(data: Data) -> int | None:
    """How many examples ``data`` holds (None when it has no length)."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, (tuple, list)) and len(ds) == 2 and isinstance(ds[0], Tensor):
        return int(ds[0].shape[0])
    try:
        return len(ds)
    except TypeError:
        return None
