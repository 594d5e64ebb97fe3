"""Full-Gaussian sweeps: batched Cholesky against preconditioned CG, side by side in one run.

    python -m benchmarks.full_solvers [--experiment mnist_imbalanced] [--spacing 0.02]
                                      [--components 5] [--mixture-spacing 0.05] [--iterations 10]
                                      [--only hessian_full|mixture_full]

Fits the paper's full-Gaussian VON posterior of each task (the Table 1 settings), then merges
them with ``hessian_full`` over the α grid with each solver and reports seconds, the speed-up
over the batched Cholesky in float64 and in float32 (the default solver, at the registry's
float32), max |Δθ| over the α against the float64 Cholesky solution, and the max mean test
accuracy of each sweep. Then the same for ``mixture_full`` on mixtures of ``--components`` full
Gaussians per task (``mixture_full_von`` with Table 1's settings), at most ``--iterations`` EM
steps, on a coarser grid: the batched Cholesky with every step and with early stopping (each α
stops once none of its responsibilities moves by more than 1e-3, Table 1's setting), and CG with
both. The table goes into ``results/table1.json`` (``full_solvers``) and the report beside it
(``docs/RESULTS.md``) is rewritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.table1 import (
    DEFAULT_OUTPUT,
    EXPERIMENTS,
    ROOT,
    full_posteriors,
    generated,
    load_results,
    mixture_full_posteriors,
    save_with_report,
)
from varmerge import merge, pipeline
from varmerge.config import load_config
from varmerge.grid import simplex_grid

STOP = {"tol": 1e-3}
CG32 = {"solver": "pcg", "pcg_tol": 1e-5}  # float32's own residual floor
HESSIAN_RUNS = {  # the float64 Cholesky is the reference, the float32 one today's default
    "cholesky float64": ({"solver": "cholesky"}, torch.float64),
    "cholesky float32": ({"solver": "cholesky"}, torch.float32),
    "pcg float64": ({"solver": "pcg"}, torch.float64),
    "pcg float32": (CG32, torch.float32),
}
MIXTURE_RUNS = {  # every EM step first, then stopping early
    "cholesky float64": ({"solver": "cholesky"}, torch.float64),
    "cholesky float32": ({"solver": "cholesky"}, torch.float32),
    "pcg float32": (CG32, torch.float32),
    "cholesky float32, early stop": ({"solver": "cholesky", **STOP}, torch.float32),
    "pcg float32, early stop": ({**CG32, **STOP}, torch.float32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--experiment", default="mnist_imbalanced", choices=[n for n, e in EXPERIMENTS.items() if e.full_von]
    )
    ap.add_argument("--spacing", type=float, default=0.02)
    ap.add_argument("--components", type=int, default=5)
    ap.add_argument("--mixture-spacing", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--only", choices=["hessian_full", "mixture_full"], help="one rule's part only")
    args = ap.parse_args()
    exp = EXPERIMENTS[args.experiment]
    cfg = load_config(ROOT / exp.config)
    tasks, n = pipeline.prepare_tasks(cfg)
    base = pipeline.seeded_model(cfg, n)
    t0 = time.perf_counter()
    posts = full_posteriors(exp, cfg, base, tasks)  # Table 1's posteriors
    P = posts[0].mean.numel()
    results = load_results(DEFAULT_OUTPUT)
    out = (
        results.get("full_solvers", {}) if results.get("full_solvers", {}).get("experiment") == args.experiment else {}
    )
    out.update(experiment=args.experiment, parameters=P, generated=generated())
    if args.only != "mixture_full":
        alpha = simplex_grid(len(tasks), args.spacing)
        print(f"{cfg.name}: P = {P}, {len(alpha)} α, VON posteriors in {time.perf_counter() - t0:.1f} s", flush=True)
        w = merge.registry.mean_loss_alpha(alpha, posts)

        def hessian(opts, dt):
            return merge.hessian_weighted_full(
                [p.mean.to(dt) for p in posts],
                [p.precision.to(dt) for p in posts],
                w,
                options=merge.HessianFullOptions(**opts),
            )

        out["hessian_full"] = {
            "grid": {"spacing": args.spacing, "size": len(alpha)},
            "rows": sweep(HESSIAN_RUNS, hessian, base, posts[0], tasks),
        }
    if args.only != "hessian_full":
        t0 = time.perf_counter()
        k_exp = dataclasses.replace(exp, mixture_full={**exp.mixture_full, "components": args.components})
        mixtures = mixture_full_posteriors(k_exp, cfg, base, tasks)
        alpha = simplex_grid(len(tasks), args.mixture_spacing)
        fit_s = time.perf_counter() - t0
        print(
            f"mixture_full: K = {args.components}, {len(alpha)} α, {args.iterations} EM steps; "
            f"mixture VI in {fit_s:.1f} s",
            flush=True,
        )
        w = merge.registry.mean_loss_alpha(alpha, mixtures)

        def mixture(opts, dt):
            m = [[c.mean.to(dt) for c in p.components] for p in mixtures]
            h = [[c.precision.to(dt) for c in p.components] for p in mixtures]
            weights = [p.weights for p in mixtures]
            options = merge.MixtureFullOptions(iterations=args.iterations, **opts)
            return merge.mixture_weighted_full(m, h, w, weights=weights, options=options)

        out["mixture_full"] = {
            "grid": {"spacing": args.mixture_spacing, "size": len(alpha)},
            "components": args.components,
            "iterations": args.iterations,
            "early_stop_tol": STOP["tol"],
            "fit_seconds": round(fit_s, 1),
            "rows": sweep(MIXTURE_RUNS, mixture, base, posts[0], tasks),
        }
    results["full_solvers"] = out
    print(f"wrote {DEFAULT_OUTPUT} and {save_with_report(results, DEFAULT_OUTPUT)}")


def sweep(runs: dict, solve, base, post, tasks) -> list[dict]:
    """Each run of ``runs`` (name -> (options, dtype)) timed, against the first one's θ, scored."""
    ref, rows = None, []
    for name, (opts, dt) in runs.items():
        t0 = time.perf_counter()
        x = solve(opts, dt)
        sec = time.perf_counter() - t0
        x = x.double()
        ref = x if ref is None else ref
        acc = pipeline.score_sweep(base, post.state_dict(x.to(torch.float32)), tasks)["accuracy"].mean(1)
        rows.append({"solver": name, "seconds": round(sec, 2), "max_abs_dtheta": float((x - ref).abs().max()),
                     "max_mean_accuracy": round(float(acc.max()), 6)})  # fmt: skip
        print(
            f"  {name:<30} {sec:8.1f} s  max |Δθ| {rows[-1]['max_abs_dtheta']:.2e}  "
            f"max mean acc {100 * float(acc.max()):.2f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
