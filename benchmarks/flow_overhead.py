"""What the flow costs over the library: ``varmerge run`` (Prefect + MLflow) against ``varmerge
demo`` (the same sequence with the library alone) on one config, side by side in one run.

    python -m benchmarks.flow_overhead [--config configs/smoke.yaml] [--repeats 3]
                                       [--output results/flow_overhead.json]

Each repeat runs ``demo`` then ``run`` as the user would, each in a fresh process on a fresh
output folder (the Prefect home is one folder for the whole benchmark, as a project's ``.prefect``
is), and times the wall clock of the whole command. The ratio is of the medians. This machine's
timings vary from run to run (shared CPUs), hence the repeats and the interleaving. ``run``'s own
stages come from its ``front.json``; the rest of its wall time is start-up (imports, preflight,
Prefect's API server, the MLflow store) and the plots, registry and logging after the sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", type=Path, default=ROOT / "results" / "flow_overhead.json")
    args = ap.parse_args(argv)
    varmerge = str(Path(sys.executable).with_name("varmerge"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flow_overhead-") as tmp:
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect")}
        env.pop("PREFECT_API_URL", None)  # the user's case: `varmerge run` starts its own Prefect API
        for i in range(args.repeats):
            out = Path(tmp) / f"r{i}"
            demo = timed([varmerge, "demo", args.config, "--output", str(out / "demo")], env)
            run = timed([varmerge, "run", args.config, "--output", str(out / "run")], env)
            front = json.loads(next((out / "run").glob("*/front.json")).read_text())
            stages = {k: round(v, 2) for k, v in front["seconds"].items()}
            rows.append({"demo_s": round(demo, 2), "run_s": round(run, 2), "run_stages_s": stages})
            print(
                f"repeat {i + 1}: demo {demo:5.1f} s   run {run:5.1f} s   ratio {run / demo:.2f}   "
                f"run's sequence stages {stages}",
                flush=True,
            )
    demo_med = statistics.median(r["demo_s"] for r in rows)
    run_med = statistics.median(r["run_s"] for r in rows)
    result = {
        "config": args.config,
        "repeats": rows,
        "median_demo_s": demo_med,
        "median_run_s": run_med,
        "ratio_run_over_demo": round(run_med / demo_med, 3),
        "goal_ratio": 1.5,
    }
    print(f"median: demo {demo_med:.1f} s, run {run_med:.1f} s, ratio {run_med / demo_med:.2f} (goal <= 1.5)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
