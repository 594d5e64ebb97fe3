"""Posterior containers (diagonal, mixture, full Gaussian) and where posteriors come from.

A posterior is a file: :meth:`save` writes safetensors (means, precisions, mixture components)
plus metadata; :meth:`load` checks the content hash, the kind, the keys/shapes against an
expected model and that every precision is finite and non-negative.

One interface over the three structures: every posterior gives the view a merging rule reads,
``as_kind("diagonal" | "mixture" | "full")`` (or :meth:`diagonal`, :meth:`mixture`, :meth:`full`):

===============  =====================  ==========================  ======================
posterior        ``diagonal()``         ``mixture()``               ``full()``
===============  =====================  ==========================  ======================
DiagonalGaussian itself                 a 1-component mixture       ValueError
MixtureGaussian  its first component    itself                      ValueError
FullGaussian     diag of the precision  1 component (its diagonal)  itself
===============  =====================  ==========================  ======================

:data:`EXACT_VIEWS` lists the views a config may rely on (a mixture rule needs a real mixture,
not the degenerate K = 1 one a single Gaussian gives).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from varmerge import files
from varmerge._checks import check_precision_tensor

#: What α means (README, "What α means"): a precision is stored on the scale of the task's
#: summed loss, ``ess`` × the per-example precision (``ess`` = the task's N), and a merge weights
#: task t by ``α_t / ess_t``, so the merge at α is the mode of ``Σ_t α_t (L̄_t + R0)``: per-task
#: *mean* losses, the prior counted once — the objective of the multitask finetune at α.
ALPHA_CONVENTION = "mean_loss: merges weight precisions by alpha_t / ess_t"


@dataclass
class PosteriorMeta:
    """Where a posterior came from. ``extra`` holds free-form string-able entries.

    ``ess`` is the scale of the precision (the number of examples it sums over); a posterior
    without one is taken to be on the per-example scale already (ess 1).
    """

    task: str = ""
    optimizer: str = ""  # adamw_sg | ivon | multi_ivon | soup_ivon | full_von | ...
    seed: int | None = None
    ess: float | None = None
    alpha_convention: str = ALPHA_CONVENTION
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


#: Posterior structure -> the views it gives exactly: a rule reading means only ("none") or one
#: diagonal Gaussian can use any (a mixture's first component, a full Gaussian's diagonal); the
#: mixture and full rules need their own structure.
EXACT_VIEWS: dict[str, tuple[str, ...]] = {
    "diagonal": ("none", "diagonal"),
    "mixture": ("none", "diagonal", "mixture"),
    "full": ("none", "diagonal", "full", "mixture_full"),
    "mixture_full": ("none", "diagonal", "mixture", "full", "mixture_full"),
}


class _Views:
    """``as_kind`` over the ``diagonal`` / ``mixture`` / ``full`` methods of each structure."""

    kind: ClassVar[str]

    def as_kind(self, kind: str, *, user: str | None = None):
        """The ``kind`` view ("none" and "diagonal": one DiagonalGaussian; "mixture"; "full").

        ``user`` (e.g. the merge rule's name) is named in the error when the view does not exist.
        """
        if kind in ("none", "diagonal"):
            return self.diagonal()
        if kind == "mixture":
            return self.mixture()
        if kind == "full":
            return self.full(user=user)
        if kind == "mixture_full":
            return self.mixture_full(user=user)
        raise ValueError(f"unknown posterior kind {kind!r}; kinds: none, diagonal, mixture, full, mixture_full")

    @classmethod
    def load(cls, path, expected: Mapping | None = None):
        """Read a file written by ``save`` (its hash checked; keys and shapes against ``expected``)."""
        return cls.from_tensors(*files.load_tensors(path), expected, str(path))

    def full(self, *, user: str | None = None):
        raise ValueError(
            f"{user or 'this rule'} needs full-Gaussian posteriors (posterior.method: full_von); "
            f"got a {self.kind} posterior (task {self.meta.task!r}), which has no full precision matrix"
        )

    def mixture_full(self, *, user: str | None = None):
        raise ValueError(
            f"{user or 'this rule'} needs mixtures of full Gaussians (or full Gaussians: posterior.method "
            f"full_von); got a {self.kind} posterior (task {self.meta.task!r}), which has no full precision matrix"
        )


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
        files.check_matches_model(mean, expected, where)


@dataclass
class DiagonalGaussian(_Views):
    """N(mean, diag(1 / precision)) over named parameters."""

    kind: ClassVar[str] = "diagonal"

    mean: dict[str, torch.Tensor]
    precision: dict[str, torch.Tensor]
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        _check_pair(self.mean, self.precision, f"DiagonalGaussian(task={self.meta.task!r})")

    def diagonal(self) -> DiagonalGaussian:
        return self

    def mixture(self) -> MixtureGaussian:
        """This Gaussian as a 1-component mixture."""
        return MixtureGaussian([self], meta=self.meta)

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.mean.values())

    def per_example_hessian(self, floor: float = 1e-8) -> dict[str, torch.Tensor]:
        """``precision / ess − weight_decay`` (at least ``floor``): the per-example Hessian an IVON
        run keeps as its state, e.g. a pretrained posterior's, from which finetunes start.
        Without ``meta.ess`` the precision is taken per example; without ``weight_decay``, 0."""
        ess = self.meta.ess or 1.0
        wd = self.meta.weight_decay or 0.0
        return {k: (v / ess - wd).clamp_min(floor) for k, v in self.precision.items()}

    # -- files ---------------------------------------------------------------------------
    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}mean/{k}": v for k, v in self.mean.items()}
        out.update({f"{prefix}precision/{k}": v for k, v in self.precision.items()})
        return out

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically; returns the content hash."""
        return files.save_tensors(
            path, self.tensors(), {"kind": "diagonal", "meta": self.meta.to_dict(), "names": self.names}
        )

    @classmethod
    def from_tensors(cls, tensors, header, expected: Mapping | None = None, where: str = "posterior"):
        _check_kind(header, "diagonal", where)
        mean, prec = _split(tensors, "", header["names"], where)
        _check_expected(mean, expected, where)
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
                raise ValueError(f"IVON group {gi}: hess has {hess.numel()} entries, parameters have {offset}")
        meta = copy.deepcopy(meta) if meta is not None else PosteriorMeta(optimizer="ivon")
        if meta.ess is None and len(ess_seen) == 1:
            meta.ess = ess_seen.pop()
        if meta.weight_decay is None and len(wd_seen) == 1:
            meta.weight_decay = wd_seen.pop()
        return cls(mean, prec, meta)


@dataclass
class _Mixture(_Views):
    """Σ_k weight_k · component_k: the components (checked by ``_check_component``), their weights
    (default uniform; K positive finite numbers summing to 1) and the mixture's meta."""

    components: list
    weights: list[float] | None = None
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        if not self.components:
            raise ValueError("a mixture needs at least one component")
        for i, c in enumerate(self.components):
            self._check_component(i, c)
        K = len(self.components)
        if self.weights is None:
            self.weights = [1.0 / K] * K
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        if w.shape != (K,) or not torch.isfinite(w).all() or (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be {K} positive numbers summing to 1, got {self.weights}")

    def _check_component(self, i: int, c) -> None:
        """Raise ValueError when component ``i`` does not fit component 0."""

    @property
    def K(self) -> int:
        return len(self.components)

    def save(self, path) -> str:
        """Write atomically; returns the content hash."""
        header = {
            "kind": self.kind,
            "K": self.K,
            "weights": list(self.weights),
            "meta": self.meta.to_dict(),
            "component_meta": [c.meta.to_dict() for c in self.components],
            **self._layout(),
        }
        return files.save_tensors(path, self._tensors(), header)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The components' tensors under ``c<k>/`` prefixes."""
        raise NotImplementedError

    def _layout(self) -> dict:
        """The header entries that describe the components' parameters."""
        raise NotImplementedError


@dataclass
class MixtureGaussian(_Mixture):
    """Σ_k weight_k N(mean_k, diag(1/precision_k)): MultiIVON / SoupIVON posteriors."""

    kind: ClassVar[str] = "mixture"

    components: list[DiagonalGaussian]

    def _check_component(self, i: int, c: DiagonalGaussian) -> None:
        ref = self.components[0].mean
        if i and (set(c.mean) != set(ref) or any(c.mean[k].shape != ref[k].shape for k in ref)):
            raise ValueError(f"mixture component {i} has different parameters or shapes than component 0")

    @property
    def means(self) -> list[dict[str, torch.Tensor]]:
        return [c.mean for c in self.components]

    @property
    def precisions(self) -> list[dict[str, torch.Tensor]]:
        return [c.precision for c in self.components]

    def diagonal(self) -> DiagonalGaussian:
        """The first component (the cost of one IVON run, as in the paper's Hessian-weighted rows)."""
        return self.components[0]

    def mixture(self) -> MixtureGaussian:
        return self

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for k, c in enumerate(self.components):
            tensors.update(c.tensors(prefix=f"c{k}/"))
        return tensors

    def _layout(self) -> dict:
        return {"names": self.components[0].names}

    @classmethod
    def from_tensors(cls, tensors, header, expected: Mapping | None = None, where: str = "posterior"):
        _check_kind(header, "mixture", where)
        comps = []
        for k, cm in enumerate(header["component_meta"]):
            mean, prec = _split(tensors, f"c{k}/", header["names"], f"{where} component {k}")
            comps.append(DiagonalGaussian(mean, prec, PosteriorMeta.from_dict(cm)))
        if len(comps) != header.get("K") or len(tensors) != 2 * len(header["names"]) * len(comps):
            raise ValueError(f"{where}: mixture has inconsistent component count (header K={header.get('K')})")
        _check_expected(comps[0].mean, expected, where)
        return cls(comps, header["weights"], PosteriorMeta.from_dict(header.get("meta", {})))


@dataclass
class FullGaussian(_Views):
    """N(mean, precision⁻¹) over a flat parameter vector; ``shapes`` unflattens it by name."""

    kind: ClassVar[str] = "full"

    mean: torch.Tensor
    precision: torch.Tensor
    shapes: dict[str, tuple[int, ...]]
    meta: PosteriorMeta = field(default_factory=PosteriorMeta)

    def __post_init__(self):
        P = self.mean.numel()
        if self.mean.ndim != 1 or self.precision.shape != (P, P):
            raise ValueError(
                f"FullGaussian needs a (P,) mean and (P, P) precision, got "
                f"{tuple(self.mean.shape)} and {tuple(self.precision.shape)}"
            )
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
        """N(mean, diag(1 / diag(precision))) by name."""
        return DiagonalGaussian(self.state_dict(), self.state_dict(torch.diagonal(self.precision).clone()), self.meta)

    def mixture(self) -> MixtureGaussian:
        """The diagonal as a 1-component mixture."""
        return MixtureGaussian([self.diagonal()], meta=self.meta)

    def full(self, *, user: str | None = None) -> FullGaussian:
        return self

    def mixture_full(self, *, user: str | None = None) -> MixtureFullGaussian:
        """This Gaussian as a 1-component mixture."""
        return MixtureFullGaussian([self], meta=self.meta)

    def save(self, path) -> str:
        header = {"kind": "full", "meta": self.meta.to_dict(), "shapes": {k: list(v) for k, v in self.shapes.items()}}
        return files.save_tensors(path, {"mean": self.mean, "precision": self.precision}, header)

    @classmethod
    def from_tensors(cls, tensors, header, expected: Mapping | None = None, where: str = "posterior"):
        _check_kind(header, "full", where)
        if set(tensors) != {"mean", "precision"}:
            raise ValueError(f"{where}: full posterior needs exactly 'mean' and 'precision' tensors")
        shapes = {k: tuple(v) for k, v in header["shapes"].items()}
        post = cls(tensors["mean"], tensors["precision"], shapes, PosteriorMeta.from_dict(header.get("meta", {})))
        if expected is not None:
            files.check_matches_model(post.state_dict(), expected, where)
        return post


@dataclass
class MixtureFullGaussian(_Mixture):
    """Σ_k weight_k N(mean_k, precision_k⁻¹) over one flat parameter vector (small models).

    The components are :class:`FullGaussian` of the same parameters; ``weights`` are the learned
    mixture weights π_k (default uniform). Each precision must be positive definite (checked by a
    Cholesky factorisation, so a bad file or fit fails here, naming the component).
    """

    kind: ClassVar[str] = "mixture_full"

    components: list[FullGaussian]

    def _check_component(self, i: int, c: FullGaussian) -> None:
        ref = self.components[0]
        if i and (c.shapes != ref.shapes or c.mean.dtype != ref.mean.dtype):
            raise ValueError(f"mixture component {i} has different parameters, shapes or dtype than component 0")
        if torch.linalg.cholesky_ex(c.precision)[1] != 0:
            raise ValueError(f"mixture component {i}: precision is not positive definite")

    def diagonal(self) -> DiagonalGaussian:
        """The first component's diagonal."""
        return self.components[0].diagonal()

    def mixture(self) -> MixtureGaussian:
        """The mixture of the components' diagonals, with the same weights."""
        return MixtureGaussian([c.diagonal() for c in self.components], list(self.weights), self.meta)

    def full(self, *, user: str | None = None) -> FullGaussian:
        """The first component (one fit's cost, as the diagonal mixtures' first component)."""
        return self.components[0]

    def mixture_full(self, *, user: str | None = None) -> MixtureFullGaussian:
        return self

    def state_dict(self, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.components[0].state_dict(flat)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for k, c in enumerate(self.components):
            tensors[f"c{k}/mean"], tensors[f"c{k}/precision"] = c.mean, c.precision
        return tensors

    def _layout(self) -> dict:
        return {"shapes": {k: list(v) for k, v in self.components[0].shapes.items()}}

    @classmethod
    def from_tensors(cls, tensors, header, expected: Mapping | None = None, where: str = "posterior"):
        _check_kind(header, "mixture_full", where)
        K = header.get("K")
        want = {f"c{k}/{part}" for k in range(K or 0) for part in ("mean", "precision")}
        if not K or set(tensors) != want or len(header.get("component_meta", [])) != K:
            raise ValueError(f"{where}: mixture of full Gaussians has inconsistent components (header K={K})")
        shapes = {k: tuple(v) for k, v in header["shapes"].items()}
        try:
            comps = []
            for k, cm in enumerate(header["component_meta"]):
                mean, prec = tensors[f"c{k}/mean"], tensors[f"c{k}/precision"]
                try:
                    comps.append(FullGaussian(mean, prec, shapes, PosteriorMeta.from_dict(cm)))
                except ValueError as exc:
                    raise ValueError(f"mixture component {k}: {exc}") from None
            post = cls(comps, header["weights"], PosteriorMeta.from_dict(header.get("meta", {})))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if expected is not None:
            files.check_matches_model(post.state_dict(), expected, where)
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


def _check_kind(header: Mapping, kind: str, where: str) -> None:
    if header.get("kind") != kind:
        raise ValueError(f"{where}: holds a {header.get('kind')!r} posterior, not {kind!r}")


def posterior_from_tensors(
    tensors, header, expected: Mapping | None = None, where: str = "posterior", device: torch.device | str | None = None
):
    """Whichever posterior kind ``header`` names, from tensors already read (and hash-checked),
    on ``device`` (default: where the tensors are)."""
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    kind = header.get("kind")
    cls = {
        "diagonal": DiagonalGaussian,
        "mixture": MixtureGaussian,
        "full": FullGaussian,
        "mixture_full": MixtureFullGaussian,
    }.get(kind)
    if cls is None:
        raise ValueError(f"{where}: not a posterior file (kind {kind!r})")
    return cls.from_tensors(tensors, header, expected, where)


def load_posterior(path, expected: Mapping | None = None, device: torch.device | str | None = None):
    """Load whichever posterior kind the file holds (read and hash-checked once), on ``device``."""
    return posterior_from_tensors(*files.load_tensors(path), expected, str(path), device)


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
