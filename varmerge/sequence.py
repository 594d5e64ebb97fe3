"""The one sequence of a front estimation, written once and run by every entry point.

    plan → data → θ0 (seeded, a checkpoint, or pretrained) → per-task finetunes (posteriors)
         → α sweep per merge method → selection → real multitask finetunes at the chosen α
         → :class:`FrontResult` (and its summary)

Where each step runs is a :class:`Runner`'s business: :class:`LocalRunner` runs the library
functions of :mod:`varmerge.pipeline` in this process (``varmerge demo``, ``benchmarks.table1``);
the Prefect flow's runner (``tasks/runner.py``) runs each step as a Prefect task that reads and
writes the run store and logs to MLflow. A runner returns whatever handles it likes for data, θ0
and posteriors (tensors in memory, or file references); the sequence only passes them on. Sweeps
come back as ``{"alpha", "accuracy", "loss", "seconds"}`` and multitask finetunes as (T,) test
accuracies, so selection and the summary are the same code everywhere.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from varmerge import pareto, pipeline
from varmerge.learned import NotLearned, finetune_message, finetune_report
from varmerge.objective import Objective, Verdict, default_rows, realised_verdict, verdict
from varmerge.plan import RunPlan
from varmerge.posterior_methods import get_method
from varmerge.progress import Report
from varmerge.search import INTERVAL, Calibrated, calibrate


class Runner(Protocol):
    """Runs the steps of :func:`estimate_front` (see the module docstring). ``plan`` knows each
    task's training examples once :meth:`data` has run (the default α need them)."""

    plan: RunPlan

    def data(self) -> Any: ...

    def theta0(self, data: Any) -> Any: ...

    def finetunes(self, data: Any, theta0: Any) -> list[Any]: ...

    def learning(self, data: Any, theta0: Any, posteriors: list[Any]) -> dict[str, list[float]]: ...

    def sweeps(self, data: Any, theta0: Any, posteriors: list[Any], methods: Sequence[str]) -> dict[str, dict]: ...

    def multitasks(self, data: Any, theta0: Any, alphas: torch.Tensor) -> list[torch.Tensor]: ...


@dataclass
class FrontResult:
    """What a front estimation produced; :meth:`summary` is front.json's content."""

    plan: RunPlan
    sweeps: dict[str, dict]  # method -> alpha / accuracy / loss (G, T) / seconds
    chosen_index: torch.Tensor | None = None
    chosen_alpha: torch.Tensor | None = None
    realised: torch.Tensor | None = None  # (k, T) accuracies of the multitask finetunes
    realised_defaults: dict[str, torch.Tensor] = field(default_factory=dict)  # default name -> (T,)
    error: str | None = None  # why no α was chosen (constraints nobody meets)
    seconds: dict[str, float] = field(default_factory=dict)
    search: list[dict] | None = None  # closed_loop: one entry per iteration (see closed_loop)
    settled: str | None = None  # why closed_loop stopped before its budget (varmerge.search), if it did
    learning: dict | None = None  # the gate's report: each finetune against θ0 and chance (varmerge.learned)

    @property
    def tasks(self) -> list[str]:
        return self.plan.task_names

    @property
    def method(self) -> str:
        return self.plan.selection_method

    @property
    def objective(self) -> Objective:
        return self.plan.objective

    @property
    def alpha(self) -> torch.Tensor:
        return self.sweeps[self.method]["alpha"]

    @property
    def predicted(self) -> torch.Tensor | None:
        """(k, T) accuracies of the merged models at the chosen α."""
        if self.chosen_index is None:
            return None
        return self.sweeps[self.method]["accuracy"][self.chosen_index]

    @property
    def default_rows(self) -> dict[str, int]:
        return default_rows(self.alpha, self.plan.defaults())

    def verdict(self) -> Verdict:
        """Whether α matters, by the fronts of the closed loop's prior methods (the selection
        method and the variational rules among merge.methods)."""
        predicted = {m: self.sweeps[m]["accuracy"] for m in self.plan.prior_methods}
        return verdict(self.objective, predicted, self.default_rows["pooled"], self.plan.cfg.selection.margin)

    def defaults_summary(self) -> dict:
        """Per default α: the α, and every method's predicted accuracies and objective there (and
        the realised ones where a real finetune ran at it)."""
        out = {}
        for name, row in self.default_rows.items():
            entry = {
                "alpha": self.alpha[row].tolist(),
                "predicted": {
                    m: {
                        "accuracy": sw["accuracy"][row].tolist(),
                        "objective": float(self.objective(sw["accuracy"][row])),
                    }
                    for m, sw in self.sweeps.items()
                },
            }
            if name in self.realised_defaults:
                acc = self.realised_defaults[name]
                entry["realised"] = {"accuracy": acc.tolist(), "objective": float(self.objective(acc))}
            out[name] = entry
        return out

    def realised_rows(self) -> dict[int, torch.Tensor]:
        """Every real multitask finetune of the run by its grid row: the chosen α (a closed loop's
        every finetune) and the defaults finetuned."""
        out = {}
        if self.chosen_index is not None and self.realised is not None:
            out |= {int(r): acc for r, acc in zip(self.chosen_index.tolist(), self.realised, strict=True)}
        return out | {self.default_rows[d]: acc for d, acc in self.realised_defaults.items()}

    def calibrated(self) -> Calibrated:
        """The front re-estimated per task with an interval (:func:`varmerge.search.calibrate`):
        the prior methods' fronts corrected by every real finetune of the run."""
        priors = {m: self.sweeps[m]["accuracy"].numpy() for m in self.plan.prior_methods}
        realised = {r: acc.numpy() for r, acc in self.realised_rows().items()}
        return calibrate(self.alpha.numpy(), priors, realised)

    def calibrated_summary(self, cal: Calibrated) -> dict:
        def rounded(a):
            return np.round(a, 6).tolist()

        return {
            "interval": INTERVAL,
            "source": cal.source,
            "finetunes": cal.finetunes,
            "mean": rounded(cal.mean),
            "lower": rounded(cal.lower),
            "upper": rounded(cal.upper),
        }

    def chosen_summary(self, cal: Calibrated | None = None) -> dict | None:
        """The chosen α, predicted (merged, and calibrated by ``cal`` with its interval) and
        realised, and its gain over pooled α (per task and on the objective; predicted by the
        selection method's front, realised where pooled was finetuned)."""
        if self.chosen_alpha is None:
            return None
        predicted = self.predicted
        pooled = self.sweeps[self.method]["accuracy"][self.default_rows["pooled"]]
        gain = {"predicted": _gain(self.objective, predicted[0], pooled)}
        out = {
            "method": self.method,
            "alpha": self.chosen_alpha.tolist(),
            "predicted": predicted.tolist(),
            "predicted_objective": self.objective(predicted).tolist(),
            "realised": self.realised.tolist() if self.realised is not None else None,
        }
        if cal is not None:
            out["calibrated"] = cal.at(int(self.chosen_index[0]))
        if self.realised is not None:
            out["realised_objective"] = self.objective(self.realised).tolist()
            if "pooled" in self.realised_defaults:
                gain["realised"] = _gain(self.objective, self.realised[0], self.realised_defaults["pooled"])
        out["gain_over_pooled"] = gain
        return out

    def summary(self, cal: Calibrated | None = None) -> dict:
        """front.json's content; ``cal``: :meth:`calibrated`, if the caller has it already."""
        cal = self.calibrated() if cal is None else cal
        methods = {
            m: {
                **pareto.front_summary(sw["alpha"], sw["accuracy"], objective=self.objective),
                "seconds": float(sw["seconds"]),
            }
            for m, sw in self.sweeps.items()
        }
        obj = self.objective
        out = {
            "tasks": self.tasks,
            "grid_size": len(self.alpha),
            "objective": {"kind": obj.kind, "weights": list(obj.weights) if obj.weights else None, "label": obj.label},
            "methods": methods,
            "defaults": self.defaults_summary(),
            "learning": self.learning,
            "calibrated": self.calibrated_summary(cal),
            "verdict": self.verdict().as_dict(),
            "chosen": self.chosen_summary(cal),
            "seconds": dict(self.seconds),
        }
        if self.realised is not None and "pooled" in self.realised_defaults:
            by_row = self.realised_rows()
            out["realised_verdict"] = realised_verdict(
                self.objective,
                torch.stack(list(by_row.values())),
                self.realised_defaults["pooled"],
                self.plan.cfg.selection.margin,
                settled=self.settled,
            )
        if self.search is not None:
            out["search"] = self.search
        if self.error is not None:
            out["error"] = self.error
        return out


def _gain(objective: Objective, acc: torch.Tensor, pooled: torch.Tensor) -> dict:
    return {"per_task": (acc - pooled).tolist(), "objective": float(objective(acc) - objective(pooled))}


def estimate_front(runner: Runner) -> FrontResult:
    """Run the sequence with ``runner`` (its plan, sized by the data once loaded). An α no
    constraint admits is not an exception here: the result carries the fronts and ``error`` (the
    caller saves what there is, then reports it)."""
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(stage: str):
        t0 = time.perf_counter()
        yield
        seconds[stage] = time.perf_counter() - t0

    with timed("data"):
        data = runner.data()
        theta0 = runner.theta0(data)
    plan = runner.plan
    with timed("finetunes"):
        posteriors = runner.finetunes(data, theta0)
        learning = gate(plan, runner.learning(data, theta0, posteriors))
    with timed("sweeps"):
        sweeps = runner.sweeps(data, theta0, posteriors, plan.method_names)
    result = FrontResult(plan, sweeps, seconds=seconds, learning=learning)
    if plan.cfg.selection.strategy == "closed_loop":
        with timed("multitask"):
            closed_loop(plan, runner, data, theta0, result)
        return result
    try:
        result.chosen_index, result.chosen_alpha = pipeline.select(
            plan, result.alpha, result.sweeps[result.method]["accuracy"]
        )
    except ValueError as exc:
        result.error = str(exc)
        return result
    rows = result.default_rows
    defaults = [rows[d] for d in plan.cfg.selection.finetune_defaults]
    wanted = list(dict.fromkeys(result.chosen_index.tolist() + defaults))  # each α finetuned once
    with timed("multitask"):
        done = dict(zip(wanted, runner.multitasks(data, theta0, result.alpha[wanted]), strict=True))
    result.realised = torch.stack([done[int(r)] for r in result.chosen_index])
    result.realised_defaults = {d: done[rows[d]] for d in plan.cfg.selection.finetune_defaults}
    return result


def gate(plan: RunPlan, scores: dict[str, list[float]]) -> dict:
    """The report of :func:`varmerge.learned.finetune_report` on ``scores`` (the runner's
    :meth:`~Runner.learning`); raises :class:`~varmerge.learned.NotLearned` when a finetune did
    not learn and ``gate.stop`` (before any sweep or multitask finetune runs)."""
    g, post = plan.cfg.gate, plan.cfg.posterior
    report = finetune_report(plan.task_names, scores["finetuned"], scores["theta0"], scores["chance"], g.margin)
    if report["failed"]:
        report["message"] = finetune_message(report, post.lr, post.steps, g.stop)
        if g.stop:
            raise NotLearned(report["message"])
    return report


def closed_loop(plan: RunPlan, runner: Runner, data: Any, theta0: Any, result: FrontResult) -> None:
    """``selection.strategy: closed_loop``: real multitask finetunes placed one batch at a time by
    :class:`varmerge.search.ClosedLoop` over the selection method's α grid, with the merged
    predictions of the plan's ``prior_methods`` as its prior, ranked by the plan's objective. The
    first finetunes are at the default α of ``selection.start`` (pooled and uniform: the ones a
    user would try anyway; with ``selection.max_drop_vs_pooled`` pooled's realised scores set the
    floor of every task), and the
    search stops early when no α is expected to beat the incumbent by more than the verdict's
    margin. Sets ``result``'s chosen α and realised accuracies (the incumbent first, then the
    other finetunes in the order they ran), ``result.realised_defaults`` (pooled, and any other
    default the search realised) and ``result.search``: per iteration its α, the model's
    predicted objective and expected improvement there, the realised accuracies, and the
    incumbent after it."""
    from varmerge.search import ClosedLoop, SearchSettings

    sel = plan.cfg.selection
    alpha = result.alpha
    rows = result.default_rows
    pooled = rows["pooled"]
    start = tuple(dict.fromkeys(rows[d] for d in sel.start))[: sel.budget]
    settings = SearchSettings(sel.budget, sel.batch, sel.epsilon, start=start, margin=sel.margin)
    priors = {m: result.sweeps[m]["accuracy"] for m in plan.prior_methods}
    search = ClosedLoop(alpha, priors, settings, pipeline.constraints(plan), plan.objective)
    result.search = []
    realised: dict[int, torch.Tensor] = {}
    while (step := search.propose()) is not None:
        for r, acc in zip(step.rows, runner.multitasks(data, theta0, alpha[step.rows]), strict=True):
            search.observe(alpha[r], acc)
            realised[r] = acc
        if pooled in step.rows and sel.max_drop_vs_pooled is not None:
            search.constraints = pipeline.constraints(plan, realised[pooled])
        inc = search.incumbent()
        result.search.append(
            {
                "alpha": alpha[step.rows].tolist(),
                "predicted_objective": step.predicted_objective,
                "expected_improvement": step.expected_improvement,
                "realised": [realised[r].tolist() for r in step.rows],
                "method_weights": step.method_weights,
                "incumbent_alpha": alpha[inc[0]].tolist() if inc else None,
                "incumbent_objective": inc[1] if inc else None,
            }
        )
    result.realised_defaults = {d: realised[r] for d, r in result.default_rows.items() if r in realised}
    result.settled = search.settled
    inc = search.incumbent()
    if inc is None:
        result.error = f"closed-loop search: none of the {len(realised)} realised α meets the selection constraints"
        return
    order = [inc[0]] + [r for r in search.rows if r != inc[0]]
    result.chosen_index = torch.tensor(order)
    result.chosen_alpha = alpha[result.chosen_index]
    result.realised = torch.stack([realised[r] for r in order])


class LocalRunner:
    """The steps in this process, in memory (no files, no Prefect, no MLflow).

    ``steps(label)`` (a context manager factory, e.g. the CLI's progress bars) is entered around
    each step and yields the :class:`~varmerge.progress.Report` that step's progress goes to (or
    None). Handles: data = ``(task data, num_classes)``, θ0 as a module (its posterior, the prior
    of the finetunes, in ``self.prior``), posteriors in memory.
    """

    def __init__(self, plan: RunPlan, steps: Callable[[str], AbstractContextManager[Report | None]] | None = None):
        self.plan = plan
        self.steps = steps
        self.prior = None  # θ0's posterior, set by theta0()
        self.pretrain_seconds = 0.0

    def step(self, label: str) -> AbstractContextManager[Report | None]:
        return self.steps(label) if self.steps is not None else contextlib.nullcontext()

    def data(self):
        """The tasks and the number of classes; the plan learns each task's examples here (unless
        preflight told it)."""
        with self.step("loading data"):
            tasks, num_classes = pipeline.prepare_tasks(self.plan.cfg)
        if not self.plan.sized:
            train = {t.name: len(t.train[1]) for t in tasks}
            self.plan = self.plan.with_sizes(num_classes, train, {t.name: len(t.test[1]) for t in tasks})
        return tasks, num_classes

    def theta0(self, data):
        """θ0 (pretrained when the config says so); its posterior is kept as ``self.prior``."""
        what = "pretraining θ0" if self.plan.pretrain is not None else "building θ0"
        with self.step(what) as report:
            t0 = time.perf_counter()
            model, self.prior = pipeline.theta0(self.plan, data[1], report=report)
            self.pretrain_seconds = time.perf_counter() - t0
        return model

    def finetunes(self, data, theta0):
        out = []
        for t in data[0]:
            with self.step(finetune_label(self.plan, t)) as report:
                out.append(pipeline.finetune_task(self.plan, theta0, t, prior=self.prior, report=report)[0])
        return out

    def learning(self, data, theta0, posteriors):
        with self.step("checking the finetunes learned"):
            return pipeline.learning_scores(theta0, posteriors, data[0])

    def sweep(self, method: str, data, theta0, posteriors, alpha: torch.Tensor | None = None, report=None) -> dict:
        """One method's sweep (over ``alpha``, default the plan's grid), with its seconds."""
        t0 = time.perf_counter()
        res = pipeline.sweep_and_score(self.plan, method, posteriors, theta0, data[0], alpha, report=report)
        return {**res, "seconds": time.perf_counter() - t0}

    def sweeps(self, data, theta0, posteriors, methods):
        out = {}
        for m in methods:
            with self.step(sweep_label(m)) as report:
                out[m] = self.sweep(m, data, theta0, posteriors, report=report)
        return out

    def multitasks(self, data, theta0, alphas):
        out = []
        for a in alphas:
            with self.step(multitask_label(a.tolist())) as report:
                res = pipeline.multitask_finetune(self.plan, theta0, data[0], a, prior=self.prior, report=report)
                out.append(res[1])
        return out


def finetune_label(plan: RunPlan, task) -> str:
    method = get_method(plan.cfg.posterior.method)
    return f"finetune {task.name} ({method.label(plan.posterior_options)})"


def sweep_label(method: str) -> str:
    return f"merge + evaluate {method}"


def multitask_label(alpha) -> str:
    return f"multitask α={[round(float(v), 2) for v in alpha]}"
