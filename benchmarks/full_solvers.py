"""Full-Gaussian sweeps: batched Cholesky against preconditioned CG, side by side in one run.

    python -m benchmarks.full_solvers [--config configs/table1/mnist_imbalanced.yaml] [--spacing 0.02]
                                      [--components 5] [--mixture-spacing 0.05] [--iterations 10]
                                      [--only hessian_full|mixture_full]

Fits the paper's full-Gaussian VON posterior of each task (the Table 1 settings), then merges
them with ``hessian_full`` over the α grid with each solver and prints seconds, the speed-up and
max |Δθ| against the float64 Cholesky solution, and the max mean test accuracy of each sweep.
Then the same for ``mixture_full`` on mixtures of ``--components`` full Gaussians per task
(``mixture_full_von`` with Table 1's settings), at most ``--iterations`` EM steps, on a coarser
grid: the batched Cholesky with every step against early stopping (each α stops once none of its
responsibilities moves by more than 1e-3), CG, and EM started from the fixed points of a 0.1
anchor grid (float64 CG is left out there: 206 s against 248 s for the float64 Cholesky on an
earlier stop's mixtures). ``--only`` runs one rule's part.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.table1 import FULL_VON, MIXTURE_FULL, ROOT
from varmerge import merge, pipeline, train
from varmerge.config import load_config
from varmerge.grid import simplex_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/table1/mnist_imbalanced.yaml")
    ap.add_argument("--spacing", type=float, default=0.02)
    ap.add_argument("--components", type=int, default=5)
    ap.add_argument("--mixture-spacing", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--only", choices=["hessian_full", "mixture_full"], help="one rule's part only")
    args = ap.parse_args()
    cfg = load_config(ROOT / args.config)
    tasks, n = pipeline.prepare_tasks(cfg)
    base = pipeline.base_model(cfg, n)
    t0 = time.perf_counter()
    posts = [train.fit_full_von(copy.deepcopy(base), t.train[0], t.train[1], seed=0, **FULL_VON) for t in tasks]
    P = posts[0].mean.numel()
    alpha = simplex_grid(len(tasks), args.spacing)
    print(f"{cfg.name}: P = {P}, {len(alpha)} α, VON posteriors in {time.perf_counter() - t0:.1f} s")
    runs = {
        "cholesky float64": ({"solver": "cholesky"}, torch.float64),
        "cholesky float32": ({"solver": "cholesky"}, torch.float32),
        "pcg float64": ({"solver": "pcg"}, torch.float64),
        "pcg float32": ({"solver": "pcg", "pcg_tol": 1e-5}, torch.float32),  # float32's own residual floor
    }
    means = [p.mean for p in posts]
    ref, rows = None, []
    for name, (opts, dt) in runs.items() if args.only != "mixture_full" else ():
        m, h = [x.to(dt) for x in means], [p.precision.to(dt) for p in posts]
        w = merge.registry.mean_loss_alpha(alpha, posts)
        t0 = time.perf_counter()
        x = merge.hessian_weighted_full(m, h, w, **opts)
        sec = time.perf_counter() - t0
        x = x.double()
        ref = x if ref is None else ref
        merged = posts[0].state_dict(x.to(torch.float32))
        acc = pipeline.score_sweep(base, merged, tasks)["accuracy"].mean(1)
        rows.append((name, sec, float((x - ref).abs().max()), float(acc.max())))
    if rows:
        report("hessian_full", rows)
    if args.only == "hessian_full":
        return

    t0 = time.perf_counter()
    settings = {**MIXTURE_FULL, "components": args.components}
    mixtures = [train.fit_mixture_full_von(copy.deepcopy(base), t.train[0], t.train[1], **settings) for t in tasks]
    alpha = simplex_grid(len(tasks), args.mixture_spacing)
    fallbacks = sum(m.meta.extra["fallbacks"] for m in mixtures)
    print(
        f"mixture_full: K = {args.components}, {len(alpha)} α, {args.iterations} EM steps; mixture VI posteriors in "
        f"{time.perf_counter() - t0:.1f} s ({fallbacks} PD fallbacks)"
    )
    w = merge.registry.mean_loss_alpha(alpha, mixtures)
    ref, rows = None, []
    stop = {"tol": 1e-3}
    runs = {  # every EM step (10) first, then stopping early; the float64 Cholesky is the reference
        "cholesky float64": ({"solver": "cholesky"}, torch.float64),
        "cholesky float32": ({"solver": "cholesky"}, torch.float32),
        "pcg float32": ({"solver": "pcg", "pcg_tol": 1e-5}, torch.float32),
        "cholesky float32, early stop": ({"solver": "cholesky", **stop}, torch.float32),
        "cholesky float32, stop + anchors": ({"solver": "cholesky", "anchor_spacing": 0.1, **stop}, torch.float32),
    }
    for name, (opts, dt) in runs.items():
        m = [[c.mean.to(dt) for c in p.components] for p in mixtures]
        h = [[c.precision.to(dt) for c in p.components] for p in mixtures]
        t0 = time.perf_counter()
        x = merge.mixture_weighted_full(
            m, h, w, weights=[p.weights for p in mixtures], iterations=args.iterations, **opts
        )
        sec = time.perf_counter() - t0
        x = x.double()
        ref = x if ref is None else ref
        acc = pipeline.score_sweep(base, posts[0].state_dict(x.to(torch.float32)), tasks)["accuracy"].mean(1)
        rows.append((name, sec, float((x - ref).abs().max()), float(acc.max())))
    report("mixture_full", rows)


def report(rule: str, rows) -> None:
    base_sec = rows[0][1]
    print(f"{rule:<34} {'seconds':>8} {'speed-up':>9} {'max |Δθ|':>10} {'max mean acc':>13}")
    for name, sec, err, acc in rows:
        print(f"{name:<34} {sec:8.1f} {base_sec / sec:8.1f}x {err:10.2e} {100 * acc:12.2f}")


if __name__ == "__main__":
    main()
