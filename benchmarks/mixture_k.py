"""The number of mixture components K against front quality and cost, for mixtures of full Gaussians.

    python -m benchmarks.mixture_k [--experiment mnist_imbalanced] [--ks 1 5 10 20]

For each K, fits every task's ``mixture_full_von`` posterior with Table 1's settings
(:data:`benchmarks.table1.MIXTURE_FULL`, only K changes), merges them with ``mixture_full`` on the
ground-truth α grid of that experiment and scores the merged models: max mean accuracy (also of
EM's start, the π-weighted Hessian merge of all components, before any EM step),
hypervolume, IGD+ and the α-map error against the multitask ground truth that
``python -m benchmarks.table1`` recorded in ``results/table1.json`` (run that first), and the
seconds of the fits and of the sweep. K = 1 is one full Gaussian from the same start (the full-VON
Gaussian and 20 more VI iterations). The table goes into that results file (``mixture_full_k``)
and the report beside it (``docs/RESULTS.md`` for the default file) is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.table1 import (
    DEFAULT_OUTPUT,
    EXPERIMENTS,
    MIXTURE_FULL,
    MIXTURE_FULL_MERGE,
    ROOT,
    _round,
    generated,
    load_results,
    mixture_full_posteriors,
    save_with_report,
    with_merge,
)
from varmerge import pareto, pipeline
from varmerge.config import load_config
from varmerge.plan import make_plan


def ground_truth(results: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground-truth α grid and multitask accuracies Table 1 recorded for ``name``."""
    exp = results["experiments"].get(name)
    gt = (exp or {}).get("multitask", {}).get("ground_truth", {})
    if "accuracy" not in gt:
        raise SystemExit(
            f"no ground-truth accuracies for {name}: run `python -m benchmarks.table1 --only {name}` first"
        )
    return torch.tensor(gt["alpha"], dtype=torch.float64), torch.tensor(gt["accuracy"], dtype=torch.float64)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--experiment", default="mnist_imbalanced", choices=[n for n, e in EXPERIMENTS.items() if e.mixture_full]
    )
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument(
        "--results", default=str(DEFAULT_OUTPUT), help="Table 1's results: the ground truth, and the output"
    )
    args = ap.parse_args(argv)
    if any(k < 1 for k in args.ks):
        raise SystemExit(f"every K must be >= 1, got {args.ks}")
    exp = EXPERIMENTS[args.experiment]
    path = Path(args.results)
    results = load_results(path)
    gt_alpha, gt_acc = ground_truth(results, args.experiment)
    ref_front = gt_acc[pareto.pareto_mask(gt_acc)]
    cfg = load_config(ROOT / exp.config)
    plan = make_plan(cfg)
    tasks, n = pipeline.prepare_tasks(cfg)
    base = pipeline.seeded_model(cfg, n)
    rows = []
    for k in args.ks:
        t0 = time.perf_counter()
        with_k = dataclasses.replace(exp, mixture_full={**MIXTURE_FULL, "components": k})
        posts = mixture_full_posteriors(with_k, cfg, base, tasks)
        fit_s = time.perf_counter() - t0
        em_start = with_merge(plan, "mixture_full", {**MIXTURE_FULL_MERGE["options"], "iterations": 0})
        start = pipeline.sweep_and_score(em_start, "mixture_full", posts, base, tasks, gt_alpha)["accuracy"]
        em = with_merge(plan, "mixture_full", MIXTURE_FULL_MERGE["options"])
        s = pipeline.sweep_and_score(em, "mixture_full", posts, base, tasks, gt_alpha)
        acc = s["accuracy"]
        front = acc[pareto.pareto_mask(acc)]
        rows.append(
            {
                "K": k,
                "max_mean_accuracy": _round(acc.mean(1).max()),
                "hypervolume": _round(pareto.hypervolume(front, 0.0)),
                "igd_plus": _round(pareto.igd_plus(front, ref_front)),
                "alpha_map_error": _round(pareto.alpha_map_error(gt_alpha, acc, gt_alpha, gt_acc)),
                "em_start_max_mean_accuracy": _round(start.mean(1).max()),
                "fit_seconds": _round(fit_s, 1),
                "sweep_seconds": _round(s["merge_seconds"] + s["eval_seconds"], 1),
                "elbo_per_task": [_round(p.meta.extra["elbo"], 1) for p in posts],
                "fallbacks": sum(p.meta.extra["fallbacks"] for p in posts),
            }
        )
        r = rows[-1]
        print(
            f"K={k:>2}: max mean acc {100 * r['max_mean_accuracy']:.2f}, IGD+ {r['igd_plus']:.4f}, "
            f"HV {r['hypervolume']:.4f}, α-map error {100 * r['alpha_map_error']:.1f}, "
            f"fit {r['fit_seconds']:.0f} s, sweep {r['sweep_seconds']:.0f} s",
            flush=True,
        )
    results["mixture_full_k"] = {
        "experiment": args.experiment,
        "grid": {"spacing": exp.gt_spacing, "size": len(gt_alpha)},
        "multitask_best_mean_accuracy": _round(gt_acc.mean(1).max()),
        "settings": {"posterior": MIXTURE_FULL, "merge": MIXTURE_FULL_MERGE["options"]},
        "rows": rows,
        "generated": generated(),
    }
    print(f"wrote {path} and {save_with_report(results, path)}")


if __name__ == "__main__":
    main()
