"""Per-task accuracy and loss of many merged models at once.

A merge over a (G, T) batch of α returns a *batched state dict*: every tensor has a leading G
dimension, one slice per α (see :mod:`varmerge.merge`). :func:`evaluate_batched` evaluates all
G models on the same inputs with ``torch.func.functional_call`` + ``torch.func.vmap`` over G: the
inputs are shared (``in_dims=None``), so the first layer of all G models runs as one wide matrix
product and no module is rebuilt per α. Work is cut into chunks of α (``chunk_g``) and of
examples (``batch_size``) to bound memory; by default the α chunk is sized from an estimate of
the model's activation memory per example (one probe forward pass) and ``memory_budget``.

Names of the batched state dict must be parameters of the model (normally its trainable ones);
every other parameter and every buffer is taken from the model itself. Models run in eval mode
under ``torch.inference_mode``; the model's train/eval mode is restored afterwards.

Text models (peft LoRA over a Hugging Face encoder) take their inputs as a mapping of (N, L)
tensors (``input_ids``, ``attention_mask``, …) and are called with keyword arguments. ``vmap``
over the Hugging Face BERT works (PyTorch has no batching rule for the CPU SDPA kernel and runs
that op as an internal loop over G, warning once, which is silenced here); the frozen encoder
runs once per α either way, so there batching does not reduce the work, but it is exact and
keeps one code path. Should ``vmap`` fail for some model, ``vectorize=None`` (the default) falls
back to a chunked loop over α that calls ``functional_call`` once per α; ``vectorize=True`` makes
the failure an error instead, ``vectorize=False`` always loops. These and the chunk sizes are an
:class:`EvalSettings`.

Where the speed comes from: batching removes the per-α Python and dispatch overhead and turns
thin per-α matrix products (a logistic regression's 784 → 10) into one wide GEMM; it does not
reduce the arithmetic. A model whose evaluation is GEMM or convolution bound per α already
(an MLP with a 256-wide first layer, ResNet-20) is therefore only slightly faster batched on a
CPU (``python -m benchmarks.eval_sweep`` measures both side by side); on a GPU, where the loop
is bound by kernel launches, batching matters more.

:func:`evaluate_loop` is the naive reference: copy the module once, then per α load the weights
into it and run it batch by batch. It shares no code path with ``functional_call``/``vmap``
and serves as the test oracle and the benchmark baseline.

Losses are mean cross-entropies (nats) over the examples, accumulated in float64; accuracies
are fractions of examples whose argmax logit equals the label. Both come back as float64.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from torch.func import functional_call, vmap

from varmerge.models import forward

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EvalSettings",
    "Inputs",
    "evaluate_batched",
    "evaluate_loop",
    "evaluate_tasks",
    "num_examples",
    "slice_inputs",
]

log = logging.getLogger(__name__)

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]  # noqa: UP007 (runtime alias, py3.10)

#: Default activation working set of one (α-chunk × example-chunk) pass, in bytes. On a CPU
#: it is kept cache-sized: the evaluation of a wide first layer is GEMM bound either way and
#: larger chunks only add memory traffic to the elementwise ops. On a GPU larger passes amortise
#: kernel launches.
DEFAULT_MEMORY_BUDGET = {"cpu": 16 * 2**20, "cuda": 2 * 2**30}

#: Safety factor on the largest per-example activation: live tensors at the peak of a forward.
_ACTIVATION_FACTOR = 4


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How :func:`evaluate_batched` and :func:`evaluate_tasks` cut and run the work.

    ``batch_size`` examples and ``chunk_g`` α go through one vmapped pass (``chunk_g=None``: as
    many α as ``memory_budget`` bytes of activations allow, estimated from one probe forward;
    default :data:`DEFAULT_MEMORY_BUDGET` for the model's device; if not even one α fits
    ``batch_size`` examples, fewer examples per pass are used). ``vectorize``: None tries
    ``vmap`` and falls back to a loop over α, True insists on ``vmap``, False always loops.
    """

    batch_size: int = 1024
    chunk_g: int | None = None
    memory_budget: int | None = None
    vectorize: bool | None = None


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def num_examples(x: Inputs) -> int:
    """N of an input tensor (N, ...) or of a mapping of (N, ...) tensors (all must agree)."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise ValueError("inputs must have a leading example dimension, got a scalar tensor")
        return int(x.shape[0])
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("input mapping is empty")
        sizes = {}
        for k, v in x.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0:
                raise ValueError(f"input {k!r} must be a tensor with a leading example dimension")
            sizes[k] = int(v.shape[0])
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on the number of examples: {sizes}")
        return next(iter(sizes.values()))
    raise ValueError(f"inputs must be a tensor or a mapping of tensors, got {type(x).__name__}")


def slice_inputs(x: Inputs, lo: int, hi: int, *, trim_padding: bool = True) -> Inputs:
    """Examples ``lo:hi`` of ``x``.

    For a mapping with an ``attention_mask`` of shape (N, L), trailing sequence positions that
    are padding for every example of the slice are dropped from every (N, L, ...) tensor
    (right padding only shrinks; nothing a model attends to is removed).
    """
    if isinstance(x, torch.Tensor):
        return x[lo:hi]
    out = {k: v[lo:hi] for k, v in x.items()}
    mask = out.get("attention_mask")
    if trim_padding and mask is not None and mask.ndim == 2 and mask.shape[0] > 0:
        L = mask.shape[1]
        used = torch.nonzero(mask.any(dim=0))
        keep = int(used.max()) + 1 if used.numel() else 1
        if keep < L:
            out = {k: (v[:, :keep] if v.ndim >= 2 and v.shape[1] == L else v) for k, v in out.items()}
    return out


def _to_device(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_labels(y: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the inputs, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative class ids, got {int(y.min())}")
    return y.long()


def _check_merged(model: nn.Module, merged: Mapping[str, torch.Tensor]) -> int:
    """Validate a batched state dict against the model; returns G."""
    if not isinstance(merged, Mapping) or not merged:
        raise ValueError("merged must be a non-empty mapping of parameter names to (G, ...) tensors")
    params = dict(model.named_parameters())
    unknown = sorted(k for k in merged if k not in params)
    if unknown:
        trainable = [n for n, p in params.items() if p.requires_grad]
        raise ValueError(
            f"merged names {unknown[:5]}{' …' if len(unknown) > 5 else ''} are not parameters of "
            f"the model; its trainable parameters are {trainable[:8]}{' …' if len(trainable) > 8 else ''}"
        )
    sizes = {}
    for k, v in merged.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"merged[{k!r}] is a {type(v).__name__}, not a tensor")
        want = tuple(params[k].shape)
        if v.ndim != len(want) + 1 or tuple(v.shape[1:]) != want:
            raise ValueError(
                f"merged[{k!r}] has shape {tuple(v.shape)}; expected (G, {', '.join(map(str, want))}) "
                f"for parameter shape {want} (a single merge? add a leading G dimension)"
            )
        if not v.is_floating_point():
            raise ValueError(f"merged[{k!r}] has dtype {v.dtype}; expected floating point")
        sizes[k] = int(v.shape[0])
    if len(set(sizes.values())) != 1:
        raise ValueError(f"merged tensors disagree on the number of models G: {sizes}")
    G = next(iter(sizes.values()))
    if G < 1:
        raise ValueError("merged holds G = 0 models")
    return G


# --------------------------------------------------------------------------------------------
# memory planning and progress
# --------------------------------------------------------------------------------------------
def _bytes_per_example(model: nn.Module, sample: Inputs) -> int:
    """Estimated activation bytes per example and per α, from one probe forward pass."""
    largest = [0]

    def hook(_mod, _inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        logits = forward(model, sample)
    finally:
        for h in handles:
            h.remove()
    n = max(num_examples(sample), 1)
    peak = max(largest[0], logits.numel() * logits.element_size())
    return max(1, math.ceil(_ACTIVATION_FACTOR * peak / n))


def _plan(model: nn.Module, x: Inputs, G: int, settings: EvalSettings, device: torch.device) -> tuple[int, int]:
    """(α per pass, examples per pass)."""
    batch_size, chunk_g, memory_budget = settings.batch_size, settings.chunk_g, settings.memory_budget
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if chunk_g is not None:
        if not isinstance(chunk_g, int) or chunk_g < 1:
            raise ValueError(f"chunk_g must be a positive integer or None, got {chunk_g!r}")
        return min(chunk_g, G), batch_size
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    per_example = _bytes_per_example(model, _to_device(slice_inputs(x, 0, 2), device))
    rows = max(1, memory_budget // per_example)  # (α, example) pairs per pass
    if rows >= batch_size:
        return min(G, rows // batch_size), batch_size
    return 1, rows


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*", category=UserWarning)
            yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# metrics of one chunk
# --------------------------------------------------------------------------------------------
def _per_example(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, b, C) logits and (b,) labels → (g, b) cross-entropies and (g, b) hits.

    Cross-entropy as logsumexp − picked logit, written out: for few classes it is several
    times faster than ``F.cross_entropy`` (whose log-softmax vectorises along the class
    dimension) and works on any memory layout of ``logits`` without a copy.
    """
    g, b, C = logits.shape
    if b and int(y.max()) >= C:
        raise ValueError(f"label {int(y.max())} is out of range for a model with {C} classes")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    top, argmax = logits.max(dim=-1)  # first maximal index on ties, as argmax
    lse = (logits - top.unsqueeze(-1)).exp().sum(dim=-1).log() + top
    picked = logits.gather(-1, y.expand(g, b).unsqueeze(-1)).squeeze(-1)
    return lse - picked, argmax == y


class _Sums:
    """Float64 sums of losses and hits per (α, segment)."""

    def __init__(self, G: int, seg: torch.Tensor, num_segments: int):
        self.loss = torch.zeros(G, num_segments, dtype=torch.float64)
        self.hits = torch.zeros(G, num_segments, dtype=torch.float64)
        self.seg = seg.cpu()
        self.count = torch.bincount(self.seg, minlength=num_segments).to(torch.float64)
        self.single = num_segments == 1

    def add(self, g0: int, lo: int, nll: torch.Tensor, hits: torch.Tensor) -> None:
        g1, b = g0 + nll.shape[0], nll.shape[1]
        nll64 = nll.to(torch.float64)
        hits64 = hits.to(torch.float64)
        if self.single:
            self.loss[g0:g1, 0] += nll64.sum(dim=1).cpu()
            self.hits[g0:g1, 0] += hits64.sum(dim=1).cpu()
        else:
            idx = self.seg[lo : lo + b]
            self.loss[g0:g1].index_add_(1, idx, nll64.cpu())
            self.hits[g0:g1].index_add_(1, idx, hits64.cpu())

    def result(self) -> dict[str, torch.Tensor]:
        if (self.count == 0).any():
            raise ValueError("a task has no examples")
        return {"accuracy": self.hits / self.count, "loss": self.loss / self.count}


# --------------------------------------------------------------------------------------------
# batched evaluation
# --------------------------------------------------------------------------------------------
def _functional_logits(model: nn.Module) -> Callable[[Mapping[str, torch.Tensor], Inputs], torch.Tensor]:
    def call(params: Mapping[str, torch.Tensor], xb: Inputs) -> torch.Tensor:
        # non-strict: parameters and buffers not in ``params`` come from the module itself
        return forward(lambda *a, **k: functional_call(model, params, a, k), xb)

    return call


class _ChunkLogits:
    """(g, b, C) logits of a chunk of g models on shared inputs: vmapped over α, or a loop over α
    (``vectorize=False``, one α, or after ``vmap`` failed with ``vectorize=None``)."""

    def __init__(self, model: nn.Module, vectorize: bool | None):
        self.call = _functional_logits(model)
        self.batched_call = vmap(self.call, in_dims=(0, None))
        self.vectorize = vectorize
        self.use_vmap = vectorize is not False

    def __call__(self, chunk: Mapping[str, torch.Tensor], xb: Inputs) -> torch.Tensor:
        g = next(iter(chunk.values())).shape[0]
        if self.use_vmap and g > 1:  # one α: nothing to batch, skip vmap's rules
            try:
                return self.batched_call(chunk, xb)
            except (RuntimeError, NotImplementedError) as exc:
                if self.vectorize:
                    raise
                log.info("vmap over the model failed (%s); looping over α instead", exc)
                self.use_vmap = False
        return torch.stack([self.call({k: v[i] for k, v in chunk.items()}, xb) for i in range(g)])


def _evaluate_segments(
    model: nn.Module,
    merged: Mapping[str, torch.Tensor],
    x: Inputs,
    y: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    settings: EvalSettings,
    bar: str | None,
) -> dict[str, torch.Tensor]:
    """Sums of the metrics per (α, segment ``seg[i]`` of example i); ``bar``: a progress bar's
    description (None: no bar)."""
    G = _check_merged(model, merged)
    N = num_examples(x)
    if N == 0:
        raise ValueError("no examples to evaluate")
    y = _check_labels(y, N)
    device = _model_device(model)
    params = dict(model.named_parameters())
    logits_of = _ChunkLogits(model, settings.vectorize)
    sums = _Sums(G, seg, num_segments)

    with _eval_mode(model):
        cg, eb = _plan(model, x, G, settings, device)
        steps = math.ceil(G / cg) * math.ceil(N / eb)
        with _progress(bar is not None, steps, bar or "") as advance:
            for g0 in range(0, G, cg):
                chunk = {k: v[g0 : g0 + cg].to(device=device, dtype=params[k].dtype) for k, v in merged.items()}
                for lo in range(0, N, eb):
                    hi = min(lo + eb, N)
                    xb = _to_device(slice_inputs(x, lo, hi), device)
                    nll, hits = _per_example(logits_of(chunk, xb), y[lo:hi].to(device))
                    sums.add(g0, lo, nll, hits)
                    advance()
    return sums.result()


def evaluate_batched(
    model: nn.Module,
    merged: Mapping[str, torch.Tensor],
    x: Inputs,
    y: torch.Tensor,
    settings: EvalSettings | None = None,
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Accuracy and mean cross-entropy of G merged models on ``(x, y)``, vectorised over α.

    ``merged`` maps parameter names of ``model`` (a subset, normally the trainable ones) to
    (G, *shape) tensors; ``x`` is an (N, ...) tensor or a mapping of (N, ...) tensors (text
    models); ``y`` holds (N,) class ids. ``settings``: the chunk sizes and ``vmap`` use
    (:class:`EvalSettings`); ``progress`` shows a progress bar. Returns ``{"accuracy": (G,),
    "loss": (G,)}`` in float64.
    """
    s = settings if settings is not None else EvalSettings()
    seg = torch.zeros(num_examples(x), dtype=torch.long)
    bar = "evaluating merged models" if progress else None
    out = _evaluate_segments(model, merged, x, y, seg, 1, s, bar)
    return {k: v[:, 0] for k, v in out.items()}


def _concatenable(xs: Sequence[Inputs]) -> bool:
    first = xs[0]
    if not isinstance(first, torch.Tensor):
        return False
    return all(
        isinstance(x, torch.Tensor)
        and x.shape[1:] == first.shape[1:]
        and x.dtype == first.dtype
        and x.device == first.device
        for x in xs
    )


def evaluate_tasks(
    model: nn.Module,
    merged: Mapping[str, torch.Tensor],
    tasks: Sequence[tuple[Inputs, torch.Tensor]],
    settings: EvalSettings | None = None,
    *,
    progress: bool = False,
    method: str = "batched",
) -> dict[str, torch.Tensor]:
    """Per-task metrics of G merged models: ``{"accuracy": (G, T), "loss": (G, T)}`` float64.

    ``tasks`` is a sequence of ``(x_t, y_t)`` test sets. Tensor inputs of equal trailing shape
    are concatenated and evaluated in one pass (per-task sums by segment); other inputs (e.g.
    text batches of different lengths) are evaluated task by task. ``method="loop"`` uses the
    naive :func:`evaluate_loop` per task instead (a reference; of the settings only
    ``batch_size`` applies).
    """
    s = settings if settings is not None else EvalSettings()
    if method not in ("batched", "loop"):
        raise ValueError(f"method must be 'batched' or 'loop', got {method!r}")
    if isinstance(tasks, Mapping) or len(tasks) == 0:
        raise ValueError("tasks must be a non-empty sequence of (x, y) pairs")
    for t, pair in enumerate(tasks):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"tasks[{t}] must be an (x, y) pair")
        if num_examples(pair[0]) == 0:
            raise ValueError(f"tasks[{t}] has no examples")
    if method == "loop":
        per = [evaluate_loop(model, merged, xt, yt, batch_size=s.batch_size, progress=progress) for xt, yt in tasks]
        return {k: torch.stack([p[k] for p in per], dim=1) for k in ("accuracy", "loss")}
    xs = [pair[0] for pair in tasks]
    if _concatenable(xs):
        ys = [_check_labels(yt, num_examples(xt)) for xt, yt in tasks]
        seg = torch.cat([torch.full((len(yt),), t, dtype=torch.long) for t, yt in enumerate(ys)])
        bar = f"evaluating merged models on {len(tasks)} tasks" if progress else None
        return _evaluate_segments(model, merged, torch.cat(xs), torch.cat(ys), seg, len(tasks), s, bar)
    per = [evaluate_batched(model, merged, xt, yt, s, progress=progress) for xt, yt in tasks]
    return {k: torch.stack([p[k] for p in per], dim=1) for k in ("accuracy", "loss")}


# --------------------------------------------------------------------------------------------
# the naive reference
# --------------------------------------------------------------------------------------------
def evaluate_loop(
    model: nn.Module,
    merged: Mapping[str, torch.Tensor],
    x: Inputs,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The per-α reference: copy the module once, then for each α load its weights and run it.

    Same inputs and outputs as :func:`evaluate_batched`; ``model`` itself is not modified.
    """
    G = _check_merged(model, merged)
    N = num_examples(x)
    if N == 0:
        raise ValueError("no examples to evaluate")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    y = _check_labels(y, N)
    module = copy.deepcopy(model).eval()
    device = _model_device(module)
    params = dict(module.named_parameters())
    sums = _Sums(G, torch.zeros(N, dtype=torch.long), 1)
    with torch.no_grad(), _progress(progress, G, "evaluating merged models (loop)") as advance:
        for g in range(G):
            for k, v in merged.items():
                params[k].copy_(v[g])
            for lo in range(0, N, batch_size):
                hi = min(lo + batch_size, N)
                xb = _to_device(slice_inputs(x, lo, hi), device)
                logits = forward(module, xb)
                nll, hits = _per_example(logits.unsqueeze(0), y[lo:hi].to(device))
                sums.add(g, lo, nll, hits)
            advance()
    return {k: v[:, 0] for k, v in sums.result().items()}
