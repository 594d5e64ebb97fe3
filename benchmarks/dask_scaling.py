"""Fan-out on Dask: the front flow on 2 Dask workers against 1, with the thread runner and the
library alone beside them, side by side in one run.

    python -m benchmarks.dask_scaling [--config configs/smoke.yaml] [--steps 600] [--repeats 2]
                                      [--output results/dask_scaling.json]

Two running clusters on 127.0.0.1 (``dask scheduler`` + 1 or 2 ``dask worker`` processes), each
warmed by one flow first (a worker imports torch, Lightning and varmerge at its first task, once).
Each repeat then runs, in fresh processes on fresh output folders and interleaved: ``varmerge
demo`` (the sequence with the library alone), ``varmerge run`` on the thread runner, ``varmerge
run --workers 2`` (a local cluster the flow starts, cold), and ``varmerge run --address`` of the
1-worker and of the 2-worker cluster. Every process runs torch on one thread
(``OMP_NUM_THREADS=1``, what Dask's workers use anyway), so all do the same arithmetic and 2
workers can use both cores of a 2-core machine only by running two tasks at once. ``--steps``
lengthens the finetunes (``posterior.steps``) so that the tasks are not all overhead.

Reported, as medians over the repeats:
* the fan-out time: the seconds of the finetunes, sweeps and multitask finetunes (``front.json``'s
  stages), and the ratio 1 worker / 2 workers on the warm clusters;
* the Prefect overhead per task (thread runner − library, per task run) and the Dask overhead
  per task (warm 1 worker − thread runner, per task run): what a task costs beyond its arithmetic;
* what a cold local cluster adds (its start and the workers' first imports): local 2 workers −
  warm 2 workers;
* the whole command's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.flow_overhead import ROOT, timed

FANOUT = ("finetunes", "sweeps", "multitask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cluster(workers: int, env: dict, logs: Path):
    """A running Dask cluster on 127.0.0.1 with ``workers`` worker processes; yields its address."""
    import distributed

    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    args = [[dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]]
    args += [[dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]] * workers
    procs = []
    try:
        for i, a in enumerate(args):
            with open(logs / f"cluster{workers}-{i}.log", "wb") as log:
                procs.append(subprocess.Popen(a, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
            p.wait(30)


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
    with tempfile.TemporaryDirectory(prefix="dask_scaling-") as tmp, contextlib.ExitStack() as stack:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "OMP_NUM_THREADS": "1"}
        env.pop("PREFECT_API_URL", None)  # each command starts its own Prefect API, as a user's does
        one, two = (stack.enter_context(cluster(n, env, Path(tmp))) for n in (1, 2))
        variants = {
            "library (demo)": [],
            "thread": ["--runner", "thread"],
            "dask local 2 workers (cold)": ["--workers", "2"],
            "dask 1 worker": ["--address", one],
            "dask 2 workers": ["--address", two],
        }
        rows: dict[str, list[dict]] = {v: [] for v in variants}
        for address in (one, two):  # warm the workers: their first task imports everything
            timed(
                [varmerge, "run", str(config), "--output", str(Path(tmp) / "warm" / address[-5:]), "-q"]
                + ["--address", address],
                env,
            )
        for i in range(args.repeats):
            for name, extra in variants.items():
                out = Path(tmp) / f"r{i}" / name.replace(" ", "_").strip("()")
                cmd = [varmerge, "demo" if not extra else "run", str(config), "--output", str(out), "-q", *extra]
                wall = timed(cmd, env)
                front = json.loads(next(out.rglob("front.json")).read_text())
                stages = front["seconds"]
                row = {"wall_s": round(wall, 2), "fanout_s": round(sum(stages[k] for k in FANOUT), 2)}
                row["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
                rows[name].append(row)
                print(f"repeat {i + 1} {name:28s} wall {wall:6.1f} s   fan-out {row['fanout_s']:6.1f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    n = task_runs(cfg)
    fan = {v: median(v, "fanout_s") for v in rows}
    result = {
        "config": args.config,
        "posterior_steps": args.steps,
        "cpus": os.cpu_count(),
        "task_runs": n,
        "runs": rows,
        "median_fanout_s": fan,
        "median_wall_s": {v: median(v, "wall_s") for v in rows},
        "speedup_2_workers_over_1": round(fan["dask 1 worker"] / fan["dask 2 workers"], 3),
        "prefect_overhead_per_task_s": round((fan["thread"] - fan["library (demo)"]) / n, 3),
        "dask_overhead_per_task_s": round((fan["dask 1 worker"] - fan["thread"]) / n, 3),
        "cold_local_cluster_s": round(fan["dask local 2 workers (cold)"] - fan["dask 2 workers"], 2),
    }
    print(
        f"fan-out (median, {n} task runs): "
        + ", ".join(f"{v} {s:.1f} s" for v, s in fan.items())
        + f"\n2 workers vs 1 (warm): {result['speedup_2_workers_over_1']:.2f}x; overhead per task: Prefect "
        f"{result['prefect_overhead_per_task_s']:.2f} s, Dask {result['dask_overhead_per_task_s']:.2f} s; "
        f"a cold local cluster adds {result['cold_local_cluster_s']:.1f} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
