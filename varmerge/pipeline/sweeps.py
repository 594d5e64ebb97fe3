"""The α sweeps: every merged model of a rule over the α grid (in blocks that bound memory),
scored on every task, and MAP's surrogate predictions."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from varmerge import evaluate, merge, models
from varmerge.config import MAP_METHOD, ExperimentConfig
from varmerge.pipeline.data import TaskData
from varmerge.plan import RunPlan
from varmerge.posterior import DiagonalGaussian, FullGaussian, MixtureGaussian
from varmerge.progress import Report

Posterior = DiagonalGaussian | MixtureGaussian | FullGaussian


def sweep_device(cfg: ExperimentConfig) -> torch.device:
    """Where the α sweeps merge and score: the GPU when training may use one (``accelerator``
    auto or gpu) and one is visible, else the CPU."""
    if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


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


def sweep_block_size(num_params: int) -> int:
    """α merged and scored at a time for a model of ``num_params`` trainable weights:
    :data:`SWEEP_BLOCK`, halved while the block's merged weights exceed :data:`SWEEP_ELEMENTS`
    (a full finetune of a transformer). A power of two, so it divides :data:`SWEEP_BLOCK`."""
    block = SWEEP_BLOCK
    while block > 1 and block * num_params > SWEEP_ELEMENTS:
        block //= 2
    return block


def sweep_and_score(
    plan: RunPlan,
    method: str,
    posteriors: Sequence[Posterior],
    model: nn.Module,
    tasks: Sequence[TaskData],
    alpha: torch.Tensor | None = None,
    *,
    block: int | None = None,
    report: Report | None = None,
) -> dict[str, torch.Tensor]:
    """Merge and score over the α grid in blocks of ``block`` α (default :func:`sweep_block_size`:
    bounds memory for big models); ``report`` is told the α done after each block. A row's result
    depends on the block it is computed in (chunk sizes follow the block's size), so a sweep split
    at multiples of :data:`SWEEP_BLOCK` gives the same bits as the whole one.

    Returns ``alpha``, (G, T) ``accuracy`` and ``loss``, and the wall-clock ``merge_seconds``
    (incl. calibration Grams) and ``eval_seconds`` of the sweep.

    ``method`` is a registered merge rule or a front estimator (``map``, dispatched on the spec's
    kind to :func:`map_sweep`). Settings are the plan's options of the method (``merge.options``,
    parsed by its options model); a calibration rule's Grams are computed once per sweep from the
    first ``calibration_examples`` (default 256) training inputs of each task.
    """
    step = plan.merge_step(method)
    spec, options = step.spec, step.options
    alpha = plan.grid() if alpha is None else alpha
    if spec.kind == "estimator":

        def score_task_arithmetic(design: torch.Tensor) -> dict[str, torch.Tensor]:
            s = sweep_and_score(plan, "task_arithmetic", posteriors, model, tasks, design, block=block, report=report)
            return {"accuracy": s["accuracy"], "loss": s["loss"]}

        return map_sweep(options, alpha, score_task_arithmetic)
    t0 = time.perf_counter()
    grams = (
        calibration_grams(model, posteriors, tasks, options.calibration_examples) if spec.needs_calibration else None
    )
    grams_seconds = time.perf_counter() - t0
    merge = functools.partial(merge_sweep, method, posteriors, options=options, grams=grams)
    res = _blocks(merge, model, tasks, alpha, block, report)
    return {**res, "merge_seconds": grams_seconds + res["merge_seconds"]}


def _blocks(merge: Callable, model: nn.Module, tasks, alpha: torch.Tensor, block: int | None, report) -> dict:
    """``merge(θ0, α block)`` and scoring over ``alpha`` block by block (see :func:`sweep_and_score`)."""
    base = models.trainable_state_dict(model)
    device = next(iter(base.values())).device  # the model's: the posteriors are there too
    block = block or sweep_block_size(sum(v.numel() for v in base.values()))
    merge_s = eval_s = 0.0
    acc, loss = [], []
    if report is not None:
        report(0, len(alpha))
    for lo in range(0, len(alpha), block):
        t0 = time.perf_counter()
        merged = merge(base, alpha[lo : lo + block].to(device))
        t1 = time.perf_counter()
        s = score_sweep(model, merged, tasks)
        merge_s, eval_s = merge_s + t1 - t0, eval_s + time.perf_counter() - t1
        acc.append(s["accuracy"].cpu())
        loss.append(s["loss"].cpu())
        if report is not None:
            report(min(lo + block, len(alpha)), len(alpha))
    acc, loss = torch.cat(acc), torch.cat(loss)
    return {"alpha": alpha, "accuracy": acc, "loss": loss, "merge_seconds": merge_s, "eval_seconds": eval_s}


def map_sweep(
    options: merge.Options, alpha: torch.Tensor, score: Callable[[torch.Tensor], dict[str, torch.Tensor]]
) -> dict:
    """MAP (:mod:`varmerge.map_front`): task arithmetic scored at a few α, quadratic surrogates.

    ``score(design)`` gives the (E, T) ``accuracy`` and ``loss`` of task arithmetic at the design
    α (:func:`sweep_and_score` passes its own sweep of ``task_arithmetic``). Returns the
    surrogates' (G, T) float64 predictions on the α grid ``alpha`` as ``accuracy`` (clipped to
    [0, 1]) and ``loss`` (clipped at 0), so fronts, selection and indicators treat MAP like any
    merge, plus the NSGA front of the accuracy surrogate (``front_alpha``, ``front_accuracy``)
    and the number of real evaluations. ``options``: MAP's parsed options (n_evaluations, seed,
    algorithm, pop_size, n_gen); task arithmetic uses ``merge.options.task_arithmetic``.
    """
    spec = merge.get_method(MAP_METHOD)
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
