"""Fan-out on Dask: the front flow on a local cluster of 2 worker processes against 1, with the
thread runner and the library alone beside them, side by side in one run.

    python -m benchmarks.dask_scaling [--config configs/smoke.yaml] [--steps 600] [--repeats 2]
                                      [--output results/dask_scaling.json]

Each repeat runs, in fresh processes on fresh output folders and interleaved: ``varmerge demo``
(the sequence with the library alone), ``varmerge run`` on the thread runner, and ``varmerge run
--workers 1`` and ``--workers 2`` (a local Dask cluster). Every process runs torch on one thread
(``OMP_NUM_THREADS=1``, what Dask's workers use anyway), so all four do the same arithmetic and
the 2-worker run can use both cores of a 2-core machine only by running two tasks at once.
``--steps`` lengthens the finetunes (``posterior.steps``) so that the tasks are not all overhead.

Reported, as medians over the repeats:
* the fan-out time: the seconds of the finetunes, sweeps and multitask finetunes (``front.json``'s
  stages), and the ratio 1 worker / 2 workers;
* the Prefect overhead per task (thread runner − library, per task run) and the Dask overhead
  per task (1 worker − thread runner, per task run): what a task costs beyond its arithmetic;
* the whole command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.flow_overhead import ROOT, timed

VARIANTS = {"library (demo)": [], "thread": ["--runner", "thread"], "dask 1 worker": ["--workers", "1"]}
VARIANTS["dask 2 workers"] = ["--workers", "2"]
FANOUT = ("finetunes", "sweeps", "multitask")


def task_runs(cfg: dict) -> int:
    """Prefect task runs of the fan-out: finetunes, sweeps (the grids here are one batch: no
    blocks) and multitask finetunes."""
    return len(cfg["data"]["tasks"]) + len(cfg["merge"]["methods"]) + cfg.get("selection", {}).get("top_k", 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--steps", type=int, default=600, help="posterior.steps of every finetune")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "dask_scaling.json")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load((ROOT / args.config).read_text())
    cfg["posterior"]["steps"] = args.steps
    varmerge = str(Path(sys.executable).with_name("varmerge"))
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="dask_scaling-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "OMP_NUM_THREADS": "1"}
        env.pop("PREFECT_API_URL", None)  # each command starts its own Prefect API, as a user's does
        for i in range(args.repeats):
            for name, extra in VARIANTS.items():
                out = Path(tmp) / f"r{i}" / name.replace(" ", "_").strip("()")
                cmd = [varmerge, "demo" if not extra else "run", str(config), "--output", str(out), "-q", *extra]
                wall = timed(cmd, env)
                front = json.loads(next(out.rglob("front.json")).read_text())
                stages = front["seconds"]
                row = {"wall_s": round(wall, 2), "fanout_s": round(sum(stages[k] for k in FANOUT), 2)}
                row["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
                rows[name].append(row)
                print(f"repeat {i + 1} {name:15s} wall {wall:6.1f} s   fan-out {row['fanout_s']:6.1f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    n = task_runs(cfg)
    fan = {v: median(v, "fanout_s") for v in VARIANTS}
    result = {
        "config": args.config,
        "posterior_steps": args.steps,
        "cpus": os.cpu_count(),
        "task_runs": n,
        "runs": rows,
        "median_fanout_s": fan,
        "median_wall_s": {v: median(v, "wall_s") for v in VARIANTS},
        "speedup_2_workers_over_1": round(fan["dask 1 worker"] / fan["dask 2 workers"], 3),
        "prefect_overhead_per_task_s": round((fan["thread"] - fan["library (demo)"]) / n, 3),
        "dask_overhead_per_task_s": round((fan["dask 1 worker"] - fan["thread"]) / n, 3),
    }
    print(
        f"fan-out (median, {n} task runs): library {fan['library (demo)']:.1f} s, thread {fan['thread']:.1f} s, "
        f"dask 1 worker {fan['dask 1 worker']:.1f} s, 2 workers {fan['dask 2 workers']:.1f} s\n"
        f"2 workers vs 1: {result['speedup_2_workers_over_1']:.2f}x; overhead per task: Prefect "
        f"{result['prefect_overhead_per_task_s']:.2f} s, Dask {result['dask_overhead_per_task_s']:.2f} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
