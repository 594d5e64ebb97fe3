"""Posterior containers (diagonal, mixture, full Gaussian) and where posteriors come from.

A posterior is a file: :meth:`save` writes safetensors (means, precisions, mixture components)
plus metadata; :meth:`load` checks the content hash, the kind, the keys/shapes against an
expected model and that every precision is finite and non-negative.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from varmerge import io
from varmerge._checks import check_precision_tensor


@dataclass
class PosteriorMeta:
    """Where a posterior came from. ``extra`` holds free-form string-able entries."""

    task: str = ""
    optimizer: str = ""  # adamw_sg | ivon | multi_ivon | soup_ivon | full_von | ...
    seed: int | None = None
    ess: float | None = None
    weight_decay: float | None = None
    model: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PosteriorMeta:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown posterior metadata fields {sorted(unknown)}")
        return cls(**dict(d))


def _check_pair(mean: Mapping, precision: Mapping, where: str) -> None:
    if not mean:
        raise ValueError(f"{where}: empty posterior (no parameters)")
    if set(mean) != set(precision):
        missing = sorted(set(mean) - set(precision))
        extra = sorted(set(precision) - set(mean))
        raise ValueError(f"{where}: precision keys differ from mean keys: missing {missing[:5]}, extra {extra[:5]}")
    for k, m in mean.items():
        p = precision[k]
        if m.shape != p.shape:
            raise ValueError(f"{where}: {k!r} mean shape {tuple(m.shape)} != precision shape {tuple(p.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError(f"{where}: mean {k!r} has non-finite entries")
        check_precision_tensor(p, f"{where}: precision {k!r}")


def _check_expected(mean: Mapping, expected, where: str) -> None:
    if expected is not None:
        io.check_matches_model(mean, expected, where)


@dataclass
class DiagonalGaussian:
    """N(mean, diag(1 / precision)) over named parameters."""

    mean: dict[str, torch.Tensor]
    precision: dict[str, torch.Tensor]
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        _check_pair(self.mean, self.precision, f"DiagonalGaussian(task={self.meta.task!r})")

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.mean.values())

    # -- files ---------------------------------------------------------------------------
    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}mean/{k}": v for k, v in self.mean.items()}
        out.update({f"{prefix}precision/{k}": v for k, v in self.precision.items()})
        return out

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically; returns the content hash."""
        return io.save_tensors(
            path, self.tensors(), {"kind": "diagonal", "meta": self.meta.to_dict(), "names": self.names}
        )

    @classmethod
    def load(cls, path, expected: Mapping | None = None) -> DiagonalGaussian:
        tensors, header = io.load_tensors(path)
        if header.get("kind") != "diagonal":
            raise ValueError(f"{path}: holds a {header.get('kind')!r} posterior, not 'diagonal'")
        mean, prec = _split(tensors, "", header["names"], str(path))
        _check_expected(mean, expected, str(path))
        return cls(mean, prec, PosteriorMeta.from_dict(header.get("meta", {})))

    # -- sources -------------------------------------------------------------------------
    @classmethod
    def from_ivon(cls, model: nn.Module, optimizer, meta: PosteriorMeta | None = None) -> DiagonalGaussian:
        """Mean = current parameters, precision = ess · (hess + weight_decay) from an IVON state.

        IVON keeps ``hess`` flat per param group, in the group's parameter order; it is mapped
        back to parameter names by identity with ``model.named_parameters()``.
        """
        names = {id(p): n for n, p in model.named_parameters()}
        mean, prec = {}, {}
        ess_seen, wd_seen = set(), set()
        for gi, group in enumerate(optimizer.param_groups):
            if "hess" not in group:
                raise ValueError(f"optimizer param group {gi} has no 'hess': is this an IVON optimizer?")
            hess = group["hess"]
            ess, wd = float(group["ess"]), float(group["weight_decay"])
            ess_seen.add(ess)
            wd_seen.add(wd)
            offset = 0
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("IVON optimizer holds a parameter that is not in the model")
                n = p.numel()
                h = hess[offset : offset + n].view_as(p)
                offset += n
                name = names[id(p)]
                mean[name] = p.detach().clone()
                prec[name] = (ess * (h.detach() + wd)).clone()
            if offset != hess.numel():
                raise ValueError(
                    f"IVON group {gi}: hess has {hess.numel()} entries, parameters have {offset}"
                )
        meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta(optimizer="ivon")
        if meta.ess is None and len(ess_seen) == 1:
            meta.ess = ess_seen.pop()
        if meta.weight_decay is None and len(wd_seen) == 1:
            meta.weight_decay = wd_seen.pop()
        return cls(mean, prec, meta)


@dataclass
class MixtureGaussian:
    """Σ_k weight_k N(mean_k, diag(1/precision_k)): MultiIVON / SoupIVON posteriors."""

    components: list[DiagonalGaussian]
    weights: list[float] | None = None
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        if not self.components:
            raise ValueError("a mixture needs at least one component")
        ref = self.components[0].mean
        for i, c in enumerate(self.components[1:], start=1):
            if set(c.mean) != set(ref) or any(c.mean[k].shape != ref[k].shape for k in ref):
                raise ValueError(
                    f"mixture component {i} has different parameters or shapes than component 0"
                )
        K = len(self.components)
        if self.weights is None:
            self.weights = [1.0 / K] * K
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        if w.shape != (K,) or (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be {K} positive numbers summing to 1, got {self.weights}")

    @property
    def K(self) -> int:
        return len(self.components)

    @property
    def means(self) -> list[dict[str, torch.Tensor]]:
        return [c.mean for c in self.components]

    @property
    def precisions(self) -> list[dict[str, torch.Tensor]]:
        return [c.precision for c in self.components]

    def save(self, path) -> str:
        tensors = {}
        for k, c in enumerate(self.components):
            tensors.update(c.tensors(prefix=f"c{k}/"))
        header = {
            "kind": "mixture",
            "K": self.K,
            "weights": list(self.weights),
            "meta": self.meta.to_dict(),
            "component_meta": [c.meta.to_dict() for c in self.components],
            "names": self.components[0].names,
        }
        return io.save_tensors(path, tensors, header)

    @classmethod
    def load(cls, path, expected: Mapping | None = None) -> MixtureGaussian:
        tensors, header = io.load_tensors(path)
        if header.get("kind") != "mixture":
            raise ValueError(f"{path}: holds a {header.get('kind')!r} posterior, not 'mixture'")
        comps = []
        for k, cm in enumerate(header["component_meta"]):
            mean, prec = _split(tensors, f"c{k}/", header["names"], f"{path} component {k}")
            comps.append(DiagonalGaussian(mean, prec, PosteriorMeta.from_dict(cm)))
        if len(comps) != header.get("K") or len(tensors) != 2 * len(header["names"]) * len(comps):
            raise ValueError(f"{path}: mixture has inconsistent component count (header K={header.get('K')})")
        _check_expected(comps[0].mean, expected, str(path))
        return cls(comps, header["weights"], PosteriorMeta.from_dict(header.get("meta", {})))


@dataclass
class FullGaussian:
    """N(mean, precision⁻¹) over a flat parameter vector; ``shapes`` unflattens it by name."""

    mean: torch.Tensor
    precision: torch.Tensor
    shapes: dict[str, tuple[int, ...]]
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        P = self.mean.numel()
        if self.mean.ndim != 1 or self.precision.shape != (P, P):
            raise ValueError(f"FullGaussian needs a (P,) mean and (P, P) precision, got "
                             f"{tuple(self.mean.shape)} and {tuple(self.precision.shape)}")
        if sum(int(torch.Size(s).numel()) for s in self.shapes.values()) != P:
            raise ValueError("FullGaussian shapes do not add up to the mean's length")
        if not torch.isfinite(self.mean).all() or not torch.isfinite(self.precision).all():
            raise ValueError("FullGaussian has non-finite entries in its mean or precision")
        if (torch.diagonal(self.precision) < 0).any():
            raise ValueError("FullGaussian precision has negative diagonal entries")

    def state_dict(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Unflatten ``flat`` (default: the mean; may carry a leading batch dim) by name."""
        flat = self.mean if flat is None else flat
        out, offset = {}, 0
        lead = flat.shape[:-1]
        for name, shape in self.shapes.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[..., offset : offset + n].reshape(*lead, *shape)
            offset += n
        return out

    def diagonal(self) -> DiagonalGaussian:
        return DiagonalGaussian(self.state_dict(), self.state_dict(torch.diagonal(self.precision).clone()), self.meta)

    def save(self, path) -> str:
        header = {"kind": "full", "meta": self.meta.to_dict(), "shapes": {k: list(v) for k, v in self.shapes.items()}}
        return io.save_tensors(path, {"mean": self.mean, "precision": self.precision}, header)

    @classmethod
    def load(cls, path, expected: Mapping | None = None) -> FullGaussian:
        tensors, header = io.load_tensors(path)
        if header.get("kind") != "full":
            raise ValueError(f"{path}: holds a {header.get('kind')!r} posterior, not 'full'")
        if set(tensors) != {"mean", "precision"}:
            raise ValueError(f"{path}: full posterior needs exactly 'mean' and 'precision' tensors")
        shapes = {k: tuple(v) for k, v in header["shapes"].items()}
        post = cls(tensors["mean"], tensors["precision"], shapes, PosteriorMeta.from_dict(header.get("meta", {})))
        if expected is not None:
            io.check_matches_model(post.state_dict(), expected, str(path))
        return post


def _split(tensors, prefix, names, where):
    mean, prec = {}, {}
    for n in names:
        for store, part in ((mean, "mean"), (prec, "precision")):
            key = f"{prefix}{part}/{n}"
            if key not in tensors:
                raise ValueError(f"{where}: missing tensor {key!r}")
            store[n] = tensors[key]
    return mean, prec


def load_posterior(path, expected: Mapping | None = None):
    """Load whichever posterior kind the file holds."""
    _, header = io.load_tensors(path)
    kind = header.get("kind")
    cls = {"diagonal": DiagonalGaussian, "mixture": MixtureGaussian, "full": FullGaussian}.get(kind)
    if cls is None:
        raise ValueError(f"{path}: not a posterior file (kind {kind!r})")
    return cls.load(path, expected=expected)


# --------------------------------------------------------------------------------------------
# squared-gradient (empirical Fisher) precision
# --------------------------------------------------------------------------------------------
class _FunctionalModel:
    """Stands in for ``model`` inside ``loss_fn`` but calls it with given parameters."""

    def __init__(self, model: nn.Module, params_and_buffers):
        self._model = model
        self._pb = params_and_buffers

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._model, self._pb, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def squared_gradient_precision(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batches: Iterable,
    *,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_i (∂l_i/∂θ)² over every example of ``batches``, for each parameter with requires_grad.

    ``loss_fn(model, batch)`` returns per-example losses of shape (N,). Per-example gradients
    come from ``torch.func.vmap(torch.func.grad(...))`` over the batch's leading dimension (the
    model runs in eval mode during the pass, so dropout and batch-norm statistics are fixed).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def one_loss(p, example):
        batch1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), example)
        fmodel = _FunctionalModel(model, {**p, **frozen, **buffers})
        losses = loss_fn(fmodel, batch1)
        if losses.ndim != 1 or losses.shape[0] != 1:
            raise ValueError(f"loss_fn must return per-example losses of shape (N,), got {tuple(losses.shape)}")
        return losses[0]

    per_example = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0), chunk_size=chunk_size)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            grads = per_example(params, batch)
            for n, g in grads.items():
                total[n] += (g * g).sum(0)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("squared_gradient_precision got no batches")
    for n, t in total.items():
        check_precision_tensor(t, f"squared-gradient precision {n!r}")
    return total


def add_prior_precision(precision: Mapping[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    """precision + δ (the prior precision of the Laplace posterior of AdamW-SG)."""
    if not delta >= 0:
        raise ValueError(f"prior precision δ must be >= 0, got {delta!r}")
    return {k: v + delta for k, v in precision.items()}

