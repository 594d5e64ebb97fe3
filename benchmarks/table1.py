"""The paper's Table 1 (the CPU-reproducible columns), front quality and a cost ledger.

    python -m benchmarks.table1 [--only mnist|fashion|cnn|lora|<experiment>] [--output PATH]
    python -m benchmarks.table1 --report-only      # rewrite docs/RESULTS.md from the JSON

Run from the repository root in the project's venv. For every experiment (a config in
``configs/table1/`` or ``configs/``) it

1. finetunes each task once (the config's posterior: MultiIVON or SoupIVON mixtures) and, for
   logistic regression, also computes the paper's full-Gaussian VON posteriors;
2. merges over the config's α grid with every configured method (variational rules and the
   baselines) plus ``hessian_full``, and scores every merged model on every task;
3. runs the real multitask finetune at the best five α of each method, and over a coarser
   ground-truth grid whose Pareto front is the reference front;
4. records hypervolume (reference point 0 in every task) and IGD+ of each method's estimated front
   against the reference front, the predicted-vs-realised gap at the chosen α, the seconds of
   every stage, adaptive α refinement, and the effect of the number of mixture components K.

Results go to ``results/table1.json`` (updated experiment by experiment, so ``--only`` runs add
up and a crash loses only the experiment in progress), figures to ``docs/figures/``, and the
report to ``docs/RESULTS.md``; every number there is read from the JSON. A run into another
``--output`` writes its report beside it (``--report`` to choose) and its figures beside that
report, never into ``docs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from varmerge import merge, models, pareto, pipeline, plots, train
from varmerge.config import load_config
from varmerge.files import atomic_write
from varmerge.grid import simplex_grid
from varmerge.plan import MergeStep, make_plan
from varmerge.posterior import ALPHA_CONVENTION, MixtureGaussian, PosteriorMeta
from varmerge.refine import refine_alpha
from varmerge.sequence import LocalRunner, estimate_front
from varmerge.train.von import MixtureVONSettings, VONSettings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "results" / "table1.json"
REPORT = ROOT / "docs" / "RESULTS.md"

#: Paper Table 1 (max mean accuracy %, in brackets the best multitask finetune at the method's top-5 α).
PAPER = {
    "mnist_imbalanced": {
        "column": "MNIST logreg imbalanced",
        "simple": (76.9, 90.2),
        "hessian_full": (80.3, 89.4),
        "mixture": (87.2, 90.4),
        "multitask": 90.4,
    },
    "mnist_balanced": {
        "column": "MNIST logreg balanced",
        "simple": (71.3, 90.7),
        "hessian_full": (78.5, 90.6),
        "mixture": (83.2, 90.5),
        "multitask": 90.7,
    },
    "cnn": {
        "column": "ResNet-20 CIFAR-10",
        "simple": (63.2, 67.4),
        "hessian": (63.3, 65.9),
        "mixture": (64.6, 68.1),
        "multitask": 68.1,
    },
    "lora": {
        "column": "RoBERTa RT/SST-2/Yelp",
        "simple": (93.5, 95.2),
        "hessian": (93.6, 95.5),
        "mixture": (94.1, 95.4),
        "multitask": 95.5,
    },
}

#: The paper's full-Gaussian VON settings (App. B.2): ρ = 0.1, 3 MC samples, 25 iterations.
FULL_VON = {"lr": 0.1, "mc_samples": 3, "num_iters": 25, "prior_precision": 1.0}

#: Mixtures of full Gaussians (``mixture_full_von``): K = 5 components started from the full-VON
#: Gaussian after its 25 iterations (spread 0.1 standard deviations), then 20 mixture-VI
#: iterations at VON's step 0.1 and the paper's 3e-6 for the weights. From the paper's start
#: (δ I, 25 iterations at step 0.02) the components were far from converged (72.2 max mean
#: accuracy on imbalanced MNIST, K = 5); 20 components cost 4x these.
MIXTURE_FULL = {
    "components": 5,
    "lr": 0.1,
    "lr_weights": 3e-6,
    "mc_samples": 3,
    "num_iters": 20,
    "prior_precision": 1.0,
    "init_spread": 0.1,
    "warm_start": 25,
}
#: The full-Gaussian merges solve by preconditioned CG (``python -m benchmarks.full_solvers``
#: measures it against the Cholesky default side by side), so ``mixture_full`` sweeps the same
#: fine grid as the other rules: EM to a fixed point (≤ 10 steps, each α stopping once none of its
#: responsibilities moves by 1e-3).
HESSIAN_FULL_MERGE = {"options": {"solver": "pcg"}}
MIXTURE_FULL_MERGE = {"options": {"iterations": 10, "tol": 1e-3, "solver": "pcg"}}

#: Variational rules first, then the baselines, in table order.
MAIN_METHODS = ("simple", "task_arithmetic", "hessian", "hessian_full", "mixture_full", "mixture")


@dataclass(frozen=True)
class Experiment:
    config: str
    group: str
    paper: str | None = None  # key of PAPER
    full_von: dict | None = None  # full-Gaussian posteriors (logistic regression only)
    mixture_full: dict | None = None  # mixtures of full Gaussians (logistic regression only)
    gt_spacing: float = 0.1
    ks: tuple[int, ...] = (1, 2, 3, 5)
    max_gap: float | None = None  # target: best multitask − best mixture merge (points)
    workers: int = 2  # parallel multitask finetunes (single-threaded processes)
    von_batch: int | None = None  # stochastic VON minibatch (large datasets)


EXPERIMENTS: dict[str, Experiment] = {
    "mnist_imbalanced": Experiment(
        "configs/table1/mnist_imbalanced.yaml",
        "mnist",
        "mnist_imbalanced",
        FULL_VON,
        mixture_full=MIXTURE_FULL,
        max_gap=3.0,
    ),
    "mnist_balanced": Experiment(
        "configs/table1/mnist_balanced.yaml",
        "mnist",
        "mnist_balanced",
        FULL_VON,
        mixture_full=MIXTURE_FULL,
        max_gap=7.0,
    ),
    "fashion_imbalanced": Experiment(
        "configs/table1/fashion_imbalanced.yaml",
        "fashion",
        "mnist_imbalanced",
        FULL_VON,
        mixture_full=MIXTURE_FULL,
        max_gap=3.0,
        von_batch=2000,
    ),
    "fashion_balanced": Experiment(
        "configs/table1/fashion_balanced.yaml",
        "fashion",
        "mnist_balanced",
        FULL_VON,
        mixture_full=MIXTURE_FULL,
        max_gap=7.0,
        von_batch=2000,
    ),
    "cnn_fashion": Experiment(
        "configs/table1/cnn_fashion.yaml", "cnn", "cnn", gt_spacing=0.2, ks=(1, 2, 5, 10), max_gap=3.0
    ),
    "lora_tweets": Experiment(
        "configs/table1/lora_tweets.yaml", "lora", "lora", gt_spacing=0.25, ks=(1, 2, 3), max_gap=1.4
    ),
}


# --------------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Wall-clock seconds per stage (re-entrant stages add up)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


_WORKER: dict = {}


def _init_worker(plan, base, tasks, prior) -> None:
    torch.set_num_threads(1)
    _WORKER.update(plan=plan, base=base, tasks=tasks, prior=prior)


def _finetune_at(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    w = _WORKER
    acc = pipeline.multitask_finetune(w["plan"], w["base"], w["tasks"], a, prior=w["prior"])[1]
    return acc, time.perf_counter() - t0


class MultitaskRuns:
    """Real multitask finetunes, one per distinct α (training is seeded: same α, same model).

    ``workers`` > 1 runs them in that many forked single-threaded processes (logistic regression
    finetunes are too small to use two cores each); the recorded seconds are per finetune, so
    cost ratios do not depend on the parallelism.
    """

    def __init__(self, plan, base, tasks, status, workers: int = 1, prior=None):
        self.plan, self.base, self.tasks, self.status, self.workers = plan, base, tasks, status, workers
        self.prior = prior  # θ0's posterior: IVON multitask finetunes start from its Hessian
        self.acc: dict[tuple, torch.Tensor] = {}
        self.seconds: dict[tuple, float] = {}

    @staticmethod
    def key(a: torch.Tensor) -> tuple:
        return tuple(round(float(v), 6) for v in a)

    def run(self, alphas: torch.Tensor, what: str) -> None:
        todo, seen = [], set()
        for a in alphas:
            k = self.key(a)
            if k not in self.acc and k not in seen:
                seen.add(k)
                todo.append(a)
        if not todo:
            return
        if self.workers > 1 and len(todo) > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context("fork"),
                initializer=_init_worker,
                initargs=(self.plan, self.base, self.tasks, self.prior),
            ) as pool:
                futures = {pool.submit(_finetune_at, a): self.key(a) for a in todo}
                for i, f in enumerate(cf.as_completed(futures)):
                    self.acc[futures[f]], self.seconds[futures[f]] = f.result()
                    self.status(f"{what}: multitask finetune {i + 1}/{len(todo)} ({self.workers} workers)")
            return
        for i, a in enumerate(todo):
            self.status(f"{what}: multitask finetune {i + 1}/{len(todo)} at α={[round(float(v), 2) for v in a]}")
            t0 = time.perf_counter()
            self.acc[self.key(a)] = pipeline.multitask_finetune(self.plan, self.base, self.tasks, a, prior=self.prior)[
                1
            ]
            self.seconds[self.key(a)] = time.perf_counter() - t0

    def __call__(self, alphas: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.acc[self.key(a)] for a in alphas])

    def cost(self, alphas: torch.Tensor) -> float:
        return sum(self.seconds[self.key(a)] for a in alphas)

    def best(self) -> tuple[tuple, torch.Tensor]:
        return max(self.acc.items(), key=lambda kv: float(kv[1].mean()))


def _round(x, n: int = 6):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return [_round(v, n) for v in x]
    return round(float(x), n)


def full_posteriors(exp: Experiment, cfg, base, tasks):
    """The paper's full-Gaussian VON posterior of each task (logistic regression)."""
    out = []
    for t in tasks:
        opts = dict(exp.full_von)
        if exp.von_batch:
            opts["batch_size"] = exp.von_batch
        settings = VONSettings(seed=cfg.posterior.seed, **opts)
        out.append(train.fit_full_von(copy.deepcopy(base), t.train[0], t.train[1], settings))
    return out


def mixture_full_posteriors(exp: Experiment, cfg, base, tasks):
    """Each task's mixture of full Gaussians (:data:`MIXTURE_FULL`; minibatches as the VON fits)."""
    return [
        train.fit_mixture_full_von(
            copy.deepcopy(base),
            t.train[0],
            t.train[1],
            MixtureVONSettings(seed=cfg.posterior.seed, **exp.mixture_full, batch_size=exp.von_batch),
            meta=PosteriorMeta(task=t.name),
        )
        for t in tasks
    ]


class Table1Runner(LocalRunner):
    """The front-estimation sequence as Table 1 runs it: timed finetunes, the paper's
    full-Gaussian posteriors beside the config's, ``hessian_full`` among the sweeps, and the
    multitask finetunes through :class:`MultitaskRuns` (shared with the ground truth)."""

    def __init__(self, plan, exp: Experiment, say, ledger: Ledger):
        super().__init__(plan)
        self.cfg = plan.cfg
        self.exp, self.say, self.ledger = exp, say, ledger
        self.ft_seconds: list[float] = []
        self.full = None
        self.mixture_full = None
        self.runs: MultitaskRuns | None = None
        self.last_posteriors: list = []

    def data(self):
        self.say(f"{self.cfg.name}: loading data")
        with self.ledger("data"):
            self.tasks, _ = data = super().data()  # the plan learns the tasks' sizes
        return data

    def theta0(self, data):
        if self.cfg.pretrain is not None:
            self.say(f"{self.cfg.name}: pretraining θ0 ({self.cfg.pretrain.steps} IVON steps)")
        self.base_model = super().theta0(data)
        self.pretrain = None
        if self.cfg.pretrain is not None:
            self.ledger.seconds["pretrain"] = self.pretrain_seconds
            theta0 = {k: v.unsqueeze(0) for k, v in models.trainable_state_dict(self.base_model).items()}
            self.pretrain = {
                "examples": len(pipeline.prepare_pretrain(self.cfg)[1]),
                "steps": self.cfg.pretrain.steps,
                "data": self.cfg.pretrain.data.model_dump(mode="json"),
                "seconds": _round(self.pretrain_seconds, 3),
                "theta0_accuracy": _round(pipeline.score_sweep(self.base_model, theta0, data[0])["accuracy"][0]),
            }
        self.runs = MultitaskRuns(
            self.plan, self.base_model, data[0], self.say, workers=self.exp.workers, prior=self.prior
        )
        return self.base_model

    def finetunes(self, data, base):
        posteriors = []
        for t in data[0]:
            self.say(
                f"{self.cfg.name}: finetuning {t.name} ({self.cfg.posterior.method}, K={self.cfg.posterior.components})"
            )
            t0 = time.perf_counter()
            posteriors.append(pipeline.finetune_task(self.plan, base, t, prior=self.prior)[0])
            self.ft_seconds.append(time.perf_counter() - t0)
        self.ledger.seconds["finetunes"] = sum(self.ft_seconds)
        self.last_posteriors = posteriors
        if self.exp.full_von:
            self.say(f"{self.cfg.name}: full-Gaussian VON posteriors")
            with self.ledger("full_von_posteriors"):
                self.full = full_posteriors(self.exp, self.cfg, base, data[0])
        if self.exp.mixture_full:
            self.say(f"{self.cfg.name}: mixtures of full Gaussians (K={self.exp.mixture_full['components']})")
            with self.ledger("mixture_full_posteriors"):
                self.mixture_full = mixture_full_posteriors(self.exp, self.cfg, base, data[0])
        return posteriors

    def posteriors_for(self, method: str, posteriors):
        return {"hessian_full": self.full, "mixture_full": self.mixture_full}.get(method, posteriors)

    def sweep(self, method, data, base, posteriors, alpha=None):
        return super().sweep(method, data, base, self.posteriors_for(method, posteriors), alpha)

    def sweeps(self, data, base, posteriors, methods):
        out = {}
        for m in methods:
            self.say(f"{self.cfg.name}: '{m}' over the α grid")
            out[m] = self.sweep(m, data, base, posteriors)
        self.ledger.seconds["merge"] = sum(s["merge_seconds"] for s in out.values())
        self.ledger.seconds["evaluation"] = sum(s["eval_seconds"] for s in out.values())
        return out

    def multitasks(self, data, base, alphas):
        with self.ledger("multitask_finetunes"):
            self.runs.run(alphas, f"{self.cfg.name}: multitask finetune at the chosen α")
        return list(self.runs(alphas))


# --------------------------------------------------------------------------------------------
# one experiment
# --------------------------------------------------------------------------------------------
def table1_plan(cfg, exp: Experiment):
    """The config's run plan with the paper's full-Gaussian rules among its merges (swept on the
    full posteriors Table 1 fits beside the config's): ``hessian_full`` after ``hessian``,
    ``mixture_full`` after it, with the solver settings of :data:`HESSIAN_FULL_MERGE` and
    :data:`MIXTURE_FULL_MERGE`."""
    plan = make_plan(cfg)
    merges = list(plan.merges)
    extra = [("hessian_full", exp.full_von, HESSIAN_FULL_MERGE), ("mixture_full", exp.mixture_full, MIXTURE_FULL_MERGE)]
    for m, wanted, settings in extra:
        names = [s.name for s in merges]
        if wanted and m not in names:
            at = names.index("hessian") + 1 if m == "hessian_full" and "hessian" in names else 0
            at = names.index("hessian_full") + 1 if m == "mixture_full" else at
            merges.insert(at, MergeStep(m, merge.get_method(m).parse_options(settings["options"])))
    return dataclasses.replace(plan, merges=tuple(merges))


def with_merge(plan, name: str, options: dict):
    """``plan`` with the merge rule ``name`` (replaced or added) at ``options``."""
    step = MergeStep(name, merge.get_method(name).parse_options(options))
    merges = tuple(m for m in plan.merges if m.name != name) + (step,)
    return dataclasses.replace(plan, merges=merges)


def run_experiment(name: str, exp: Experiment, console: Console, report_dir: Path = REPORT.parent) -> dict:
    cfg = load_config(ROOT / exp.config)
    plan = table1_plan(cfg, exp)
    ledger = Ledger()
    status = console.status("")
    status.start()

    def say(msg: str) -> None:
        status.update(msg)
        if not console.is_terminal:  # a log file gets one line per step
            console.log(msg)

    try:
        runner = Table1Runner(plan, exp, say, ledger)
        front = estimate_front(runner)  # the pipeline's own sequence, in process
        tasks, base, ft_seconds, sweeps = runner.tasks, runner.base_model, runner.ft_seconds, front.sweeps
        posteriors = runner.last_posteriors
        T, names = len(tasks), [t.name for t in tasks]
        K = len(posteriors[0].components) if isinstance(posteriors[0], MixtureGaussian) else 1
        alpha = front.alpha

        # the α each method would finetune at: its top-k by predicted mean accuracy
        uniform = int(((alpha - 1.0 / T) ** 2).sum(1).argmin())
        chosen = {}
        for m, sw in sweeps.items():
            if m == "model_soup":  # α-independent: its weighting is the uniform one
                chosen[m] = (torch.tensor([uniform]), alpha[[uniform]])
            else:  # each method's own grid (mixture_full sweeps a coarser one)
                chosen[m] = pareto.best_alpha(sw["alpha"], sw["accuracy"], k=cfg.selection.top_k)
        runs = runner.runs
        gt_alpha = simplex_grid(T, exp.gt_spacing)
        with ledger("multitask_finetunes"):
            runs.run(
                torch.cat([gt_alpha] + [top for _, top in chosen.values()]),
                f"{name}: ground truth ({len(gt_alpha)} α) + top-{cfg.selection.top_k} of each method",
            )
        gt_acc = runs(gt_alpha)
        ref_front = gt_acc[pareto.pareto_mask(gt_acc)]

        results, predicted_realised = {}, {}
        for m, sw in sweeps.items():
            acc, a_m = sw["accuracy"], sw["alpha"]
            mean = acc.mean(1)
            b = uniform if m == "model_soup" else int(mean.argmax())  # every α gives the soup
            idx, top = chosen[m]
            realised = runs(top)
            predicted = acc[idx]
            front = acc[pareto.pareto_mask(acc)]
            predicted_realised[m] = (predicted.mean(1).tolist(), realised.mean(1).tolist())
            results[m] = {
                "max_mean_accuracy": _round(mean[b]),
                "best_alpha": _round(a_m[b]),
                "grid_size": len(a_m),
                "multitask_at_top5": _round(realised.mean(1).max()),
                "top5_alpha": _round(top),
                "predicted_top5": _round(predicted.mean(1)),
                "realised_top5": _round(realised.mean(1)),
                "gap_at_chosen": _round(predicted[0].mean() - realised[0].mean()),
                "predicted_top5_per_task": _round(predicted),
                "realised_top5_per_task": _round(realised),
                "alpha_map_error": _round(pareto.alpha_map_error(a_m, acc, gt_alpha, gt_acc)),
                "selection_regret": {k: _round(v) for k, v in pareto.selection_regret(gt_acc, realised).items()},
                "hypervolume": _round(pareto.hypervolume(front, 0.0)),
                "igd_plus": _round(pareto.igd_plus(front, ref_front)),
                "front_size": int(len(front)),
                "seconds": _round(sw["merge_seconds"] + sw["eval_seconds"], 3),
                "merge_seconds": _round(sw["merge_seconds"], 3),
                "eval_seconds": _round(sw["eval_seconds"], 3),
            }
            if "evaluations" in sw:
                results[m]["evaluations"] = int(sw["evaluations"])

        best_key, best_acc = runs.best()
        multitask = {
            "best_mean_accuracy": _round(best_acc.mean()),
            "best_alpha": list(best_key),
            "runs": len(runs.acc),
            "ground_truth": {
                "spacing": exp.gt_spacing,
                "grid_size": len(gt_alpha),
                "max_mean_accuracy": _round(gt_acc.mean(1).max()),
                "hypervolume": _round(pareto.hypervolume(ref_front, 0.0)),
                "front_size": int(len(ref_front)),
                "seconds": _round(runs.cost(gt_alpha), 3),
                "mean_seconds_per_finetune": _round(runs.cost(gt_alpha) / len(gt_alpha), 3),
                "alpha": _round(gt_alpha),
                "accuracy": _round(gt_acc),
            },
        }

        # cost of estimating the front on the ground-truth grid vs the ground-truth sweep there
        cost = {}
        per_component = sum(ft_seconds) / K
        for m in [m for m in MAIN_METHODS if m in sweeps]:
            say(f"{name}: '{m}' on the ground-truth grid (cost ledger)")
            s = pipeline.sweep_and_score(plan, m, runner.posteriors_for(m, posteriors), base, tasks, gt_alpha)
            post_s = {
                "mixture": sum(ft_seconds),
                "hessian_full": ledger.seconds.get("full_von_posteriors", 0.0),
                "mixture_full": ledger.seconds.get("mixture_full_posteriors", 0.0),
            }
            estimate = post_s.get(m, per_component) + s["merge_seconds"] + s["eval_seconds"]
            cost[m] = {
                "posterior_seconds": _round(post_s.get(m, per_component), 3),
                "sweep_seconds_gt_grid": _round(s["merge_seconds"] + s["eval_seconds"], 3),
                "ratio_vs_ground_truth": _round(estimate / multitask["ground_truth"]["seconds"], 4),
                "ratio_vs_fine_grid_multitask_extrapolated": _round(
                    (post_s.get(m, per_component) + results[m]["seconds"])
                    / (results[m]["grid_size"] * multitask["ground_truth"]["mean_seconds_per_finetune"]),
                    5,
                ),
            }

        # adaptive refinement: coarse grid, then the fine grid near the best region
        refinement = {}
        for m in [m for m in ("mixture", "hessian_full", "hessian") if m in sweeps]:
            say(f"{name}: adaptive refinement for '{m}'")
            posts = runner.posteriors_for(m, posteriors)
            t0 = time.perf_counter()
            r = refine_alpha(
                lambda a, m=m, posts=posts: pipeline.sweep_and_score(plan, m, posts, base, tasks, a)["accuracy"],
                T,
                coarse=exp.gt_spacing,
                fine=cfg.merge.spacing,
            )
            refinement[m] = {
                "best_alpha": _round(r.best_alpha),
                "best_mean_accuracy": _round(r.best_score),
                "full_grid_best_alpha": results[m]["best_alpha"],
                "full_grid_best_mean_accuracy": results[m]["max_mean_accuracy"],
                "same_best_alpha": bool(
                    torch.allclose(r.best_alpha, torch.tensor(results[m]["best_alpha"], dtype=torch.float64), atol=1e-6)
                ),
                "evaluations": r.evaluations,
                "full_grid_evaluations": len(alpha),
                "rounds": r.rounds,
                "seconds": _round(time.perf_counter() - t0, 3),
                "full_grid_seconds": results[m]["seconds"],
            }

        # the number of mixture components
        k_table = []
        if "mixture" in sweeps and K > 1:
            for k in [k for k in exp.ks if k <= K]:
                say(f"{name}: mixture with K={k}")
                sub = [MixtureGaussian(p.components[:k]) for p in posteriors]
                s = pipeline.sweep_and_score(plan, "mixture", sub, base, tasks, alpha)
                mean = s["accuracy"].mean(1)
                b = int(mean.argmax())
                k_table.append(
                    {
                        "K": k,
                        "max_mean_accuracy": _round(mean[b]),
                        "best_alpha": _round(alpha[b]),
                        "finetune_seconds": _round(sum(ft_seconds) * k / K, 3),
                        "sweep_seconds": _round(s["merge_seconds"] + s["eval_seconds"], 3),
                    }
                )

        say(f"{name}: figures")
        figures = draw_figures(name, names, sweeps, gt_acc, predicted_realised, report_dir)
    finally:
        status.stop()

    out = {
        "config": exp.config,
        "name": cfg.name,
        "commit": _git_commit(),
        "alpha_convention": ALPHA_CONVENTION,
        "group": exp.group,
        "paper": exp.paper,
        "tasks": names,
        "train_examples": [len(t.train[1]) for t in tasks],
        "test_examples": [len(t.test[1]) for t in tasks],
        "posterior": {
            "method": cfg.posterior.method,
            "components": K,
            "steps": cfg.posterior.steps,
            "full_von": exp.full_von,
            "hessian_full": {"posterior": exp.full_von, "merge": HESSIAN_FULL_MERGE} if exp.full_von else None,
            "mixture_full": {"posterior": exp.mixture_full, "merge": MIXTURE_FULL_MERGE} if exp.mixture_full else None,
        },
        "pretrain": runner.pretrain,
        "grid": {"spacing": cfg.merge.spacing, "size": len(alpha)},
        "top_k": cfg.selection.top_k,
        "hypervolume_reference_point": [0.0] * T,
        "methods": results,
        "multitask": multitask,
        "cost": {
            "stages_seconds": {k: _round(v, 3) for k, v in ledger.seconds.items()},
            "total_seconds": _round(sum(ledger.seconds.values()), 3),
            "front_estimate": cost,
        },
        "refinement": refinement,
        "k_table": k_table,
        "figures": figures,
    }
    out["targets"] = check_targets(exp, out)
    return out


def check_targets(exp: Experiment, r: dict) -> dict:
    m = r["methods"]
    acc = {k: v["max_mean_accuracy"] for k, v in m.items()}
    out = {}
    if {"mixture", "simple"} <= acc.keys():
        for h in ("hessian", "hessian_full"):
            if h in acc:
                out[f"ordering_mixture>{h}>simple"] = bool(acc["mixture"] > acc[h] > acc["simple"])
    if {"mixture", "hessian", "simple"} <= acc.keys():  # the neural rows' shape (issue 12): ties count
        out["shape_mixture>=hessian>=simple"] = bool(acc["mixture"] >= acc["hessian"] >= acc["simple"])
        igd = {k: m[k].get("igd_plus") for k in ("mixture", "hessian", "simple")}
        if None not in igd.values():
            out["shape_igd_plus_mixture<=hessian<=simple"] = bool(igd["mixture"] <= igd["hessian"] <= igd["simple"])
    if all(m.get(k, {}).get("alpha_map_error") is not None for k in ("mixture", "simple")):
        out["shape_alpha_map_error_mixture<simple"] = bool(
            m["mixture"]["alpha_map_error"] < m["simple"]["alpha_map_error"]
        )
    if {"mixture_full", "hessian_full", "simple"} <= acc.keys():  # issue 13: the paper's mixture row
        full = ("mixture_full", "hessian_full", "simple")
        out["mixture_full>hessian_full>simple"] = bool(acc["mixture_full"] > acc["hessian_full"] > acc["simple"])
        hv = [m[k]["hypervolume"] for k in full]
        igd = [m[k]["igd_plus"] for k in full]
        out["hypervolume_mixture_full>hessian_full>simple"] = bool(hv[0] > hv[1] > hv[2])
        out["igd_plus_mixture_full<hessian_full<simple"] = bool(igd[0] < igd[1] < igd[2])
        gap = 100 * (r["multitask"]["best_mean_accuracy"] - acc["mixture_full"])
        out["gap_points_mixture_full"] = round(gap, 2)
        out["gap_mixture_full_met"] = bool(gap <= 1.0)
        out["alpha_map_error_mixture_full<hessian_full"] = bool(
            m["mixture_full"]["alpha_map_error"] < m["hessian_full"]["alpha_map_error"]
        )
    if exp.max_gap is not None and "mixture" in acc:
        gap = 100 * (r["multitask"]["best_mean_accuracy"] - acc["mixture"])
        out["gap_points"] = round(gap, 2)
        out["max_gap_points"] = exp.max_gap
        out["gap_met"] = bool(gap <= exp.max_gap)
        best_merge = max(acc, key=acc.get)
        out["best_merge_method"] = best_merge
        out["gap_points_best_merge"] = round(100 * (r["multitask"]["best_mean_accuracy"] - acc[best_merge]), 2)
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def draw_figures(name, names, sweeps, gt_acc, predicted_realised, report_dir: Path) -> dict:
    """The experiment's figures under ``report_dir/figures/<name>``; paths relative to ``report_dir``
    (where the report that shows them goes)."""
    import matplotlib.pyplot as plt

    d = report_dir / "figures" / name
    d.mkdir(parents=True, exist_ok=True)
    rel = lambda p: str(Path(p).relative_to(report_dir))  # noqa: E731
    gt_front = gt_acc[pareto.pareto_mask(gt_acc)].tolist()
    main = {m: sweeps[m] for m in MAIN_METHODS if m in sweeps and m != "task_arithmetic"}
    others = {m: sweeps[m] for m in sweeps if m not in MAIN_METHODS or m == "mixture"}
    figs = {
        "fronts": plots.front_projections(
            main,
            names,
            d / "fronts.png",
            multitask=gt_front,
            title=f"{name}: estimated fronts vs multitask ground truth (circles)",
        ),
        "fronts_baselines": plots.front_projections(
            others,
            names,
            d / "fronts_baselines.png",
            multitask=gt_front,
            title=f"{name}: baselines vs mixture-weighted",
        ),
    }
    if len(names) == 3:
        figs["ternary"] = plots.ternary_mean_accuracy(main, names, d / "ternary.png")
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo = min(min(p + r) for p, r in predicted_realised.values())
    for m, (p, r) in predicted_realised.items():
        ax.scatter(p, r, marker=plots.MARKERS.get(m, "x"), label=m, s=28, alpha=0.85)
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8)
    ax.set_xlabel("predicted mean accuracy (merged model)")
    ax.set_ylabel("realised mean accuracy (multitask finetune)")
    ax.set_title(f"{name}: top-5 α of each method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(d / "predicted_vs_realised.png", dpi=110)
    plt.close(fig)
    figs["predicted_vs_realised"] = d / "predicted_vs_realised.png"
    return {k: rel(v) for k, v in figs.items()}


# --------------------------------------------------------------------------------------------
# results file and report
# --------------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def generated() -> dict:
    """When, at which commit and on what machine a result was produced."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": machine(),
    }


def save_with_report(results: dict, path: Path) -> Path:
    """Save ``results`` to ``path`` and rewrite the report beside it (``docs/RESULTS.md`` for the
    default results file); returns the report's path."""
    save_results(results, path)
    return write_report(results, REPORT if path.resolve() == DEFAULT_OUTPUT.resolve() else path.with_suffix(".md"))


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"experiments": {}}


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_report(results: dict, path: Path = REPORT) -> Path:
    from benchmarks.report import render

    path.parent.mkdir(parents=True, exist_ok=True)
    text = render(results, PAPER, EXPERIMENTS)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        help="a group (mnist, fashion, cnn, lora) or an experiment name; repeatable",
    )
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="results JSON (default results/table1.json)")
    ap.add_argument(
        "--report", default=None, help="the Markdown report (default docs/RESULTS.md, or beside a non-default --output)"
    )
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON")
    ap.add_argument(
        "--merge-from",
        action="append",
        default=[],
        metavar="JSON",
        help="copy the experiments of another results file (e.g. a run on another machine) into --output",
    )
    args = ap.parse_args(argv)
    console = Console()
    out = Path(args.output)
    if args.report is None:  # a run into a scratch file never rewrites the committed report
        args.report = str(REPORT if out.resolve() == DEFAULT_OUTPUT.resolve() else out.with_suffix(".md"))
    results = load_results(out)
    for other in args.merge_from:
        more = load_results(Path(other))
        results["experiments"].update(more["experiments"])
        results.setdefault("group_wall_seconds", {}).update(more.get("group_wall_seconds", {}))
    if args.merge_from:
        save_results(results, out)
    if not args.report_only:
        chosen = list(EXPERIMENTS)
        if args.only:
            known = set(EXPERIMENTS) | {e.group for e in EXPERIMENTS.values()}
            bad = [o for o in args.only if o not in known]
            if bad:
                raise SystemExit(f"unknown --only {bad}; choose from {sorted(known)}")
            chosen = [n for n, e in EXPERIMENTS.items() if n in args.only or e.group in args.only]
        t_all = time.perf_counter()
        groups: dict[str, float] = {}
        for name in chosen:
            t0 = time.perf_counter()
            r = run_experiment(name, EXPERIMENTS[name], console, Path(args.report).parent)
            r["wall_seconds"] = round(time.perf_counter() - t0, 1)
            groups[r["group"]] = groups.get(r["group"], 0.0) + r["wall_seconds"]
            results["experiments"][name] = r
            results.setdefault("group_wall_seconds", {}).update({r["group"]: round(groups[r["group"]], 1)})
            results["generated"] = generated()
            save_results(results, out)
            t = r["targets"]
            console.print(
                f"[bold]{name}[/] {r['wall_seconds']:.0f} s: "
                + ", ".join(
                    f"{m} {_pct(v['max_mean_accuracy'])} ({_pct(v['multitask_at_top5'])})"
                    for m, v in r["methods"].items()
                )
                + f"; multitask {_pct(r['multitask']['best_mean_accuracy'])}; targets {t}"
            )
        console.print(f"all: {time.perf_counter() - t_all:.0f} s")
    write_report(results, Path(args.report))
    console.print(f"wrote {out} and {args.report}")


if __name__ == "__main__":
    main()
