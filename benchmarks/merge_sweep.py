"""Merge-sweep throughput against a plain tensor copy, measured side by side in one process.

    python -m benchmarks.merge_sweep [--params 4000000] [--grid 64] [--tasks 3] [--repeats 3]

The sweep is memory-bandwidth bound. "Effective bandwidth" counts the bytes that must move at
least once: every input read once (means and precisions of T models) plus every output written
once (G merged models). The reference is ``dst.copy_(src)`` on a buffer the size of the sweep's
output, whose bandwidth is (read + write) bytes / time. The ratio is sweep / copy.
"""

from __future__ import annotations

import argparse
import time

import torch

from varmerge import merge
from varmerge.grid import simplex_grid


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, page faults)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_models(T: int, P: int, K: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a few tensors of realistic sizes rather than one flat vector
    sizes = [P // 2, P // 4, P // 8, P - P // 2 - P // 4 - P // 8]
    means = [[{f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(sizes)} for _ in range(K)] for _ in range(T)]
    precs = [[{k: torch.rand(v.shape, generator=g) + 0.1 for k, v in m.items()} for m in mt] for mt in means]
    return means, precs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--grid", type=int, default=64, help="number of α (G)")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--components", type=int, default=3, help="K for the mixture sweep")
    ap.add_argument("--iterations", type=int, default=5, help="EM iterations for the mixture sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    T, P, G = args.tasks, args.params, args.grid
    spacing_grid = simplex_grid(T, 0.02)
    alpha = spacing_grid[torch.linspace(0, len(spacing_grid) - 1, G).long()]
    means, precs = make_models(T, P, K=1)
    m1 = [m[0] for m in means]
    p1 = [p[0] for p in precs]
    elem = 4  # float32

    src = torch.randn(G * P)
    dst = torch.empty_like(src)
    t_copy = best_time(lambda: dst.copy_(src), args.repeats)
    copy_bw = 2 * G * P * elem / t_copy

    def report(name, seconds, bytes_moved):
        bw = bytes_moved / seconds
        print(f"{name:<28} {seconds * 1e3:9.1f} ms  {bw / 1e9:7.2f} GB/s  ratio to copy {bw / copy_bw:5.2f}")

    print(
        f"T={T} models x {P / 1e6:.1f}M float32 params, G={G} α, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    report("tensor copy (reference)", t_copy, 2 * G * P * elem)
    # fresh outputs: every call allocates G x P floats, and the OS faults those pages in on
    # first write (the copy's destination is warm); reused: a long sweep in blocks reuses `out`
    t_hw = best_time(lambda: merge.hessian_weighted(m1, p1, alpha), args.repeats)
    report("hessian_weighted (fresh out)", t_hw, (2 * T * P + G * P) * elem)
    out = {k: torch.empty((G, *v.shape)) for k, v in m1[0].items()}
    t_hw_out = best_time(lambda: merge.hessian_weighted(m1, p1, alpha, out=out), args.repeats)
    report("hessian_weighted (reused out)", t_hw_out, (2 * T * P + G * P) * elem)
    t_simple = best_time(lambda: merge.simple_average(m1, alpha, out=out), args.repeats)
    report("simple_average (reused out)", t_simple, (T * P + G * P) * elem)
    fault = best_time(lambda: torch.empty(G * P).fill_(0.0), args.repeats)
    report("alloc + first write (ref.)", fault, G * P * elem)

    K, it = args.components, args.iterations
    mm, mp = make_models(T, P, K=K, seed=1)
    mix_options = merge.MixtureOptions(iterations=it)
    t_mix = best_time(lambda: merge.mixture_weighted(mm, mp, alpha, options=mix_options), max(1, args.repeats - 1))
    # minimum traffic for the mixture: inputs once + output once (the EM re-reads per iteration)
    report(f"mixture sweep (K={K}, {it} it)", t_mix, (2 * T * K * P + G * P) * elem)
    print(f"mixture / hessian time: {t_mix / t_hw:.1f}x")
    print("(set THP_MEM_ALLOC_ENABLE=1 to let torch use transparent huge pages: fewer page faults)")


if __name__ == "__main__":
    main()
