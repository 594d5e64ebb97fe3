"""Fingerprint every committed config: a shortened run of each through ``varmerge demo`` (the
library's sequence) and, for the smallest, ``varmerge run`` (the Prefect flow), keeping every
number they produce. Two trees that print the same fingerprints compute the same bits: this is
how a refactor is checked to change no result.

    python scripts/fingerprint.py --out /tmp/fp-new.json [--flow] [CONFIG ...]
    python scripts/fingerprint.py --compare /tmp/fp-old.json /tmp/fp-new.json

Run it from the root of the tree to fingerprint (``cd OTHER_TREE && python
/path/to/scripts/fingerprint.py``): the ``varmerge`` code imported is the current folder's. Each
config is shortened the same way (a rule fixed here, not chosen per config): at most 20 optimiser
steps everywhere (pretraining, finetunes, multitask finetunes; SoupIVON snapshots at 10 and 20),
at most 200 training and 100 test examples per task, α spacing 0.25 and at most the top-2 α.
Seconds, run ids and paths are dropped; floats are kept exactly (JSON round-trips them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

VOLATILE = {"seconds", "mlflow_run_id", "tracking_uri", "run_dir", "registered_model", "config"}
STEPS = 20


def shorten(cfg: dict, out: Path) -> dict:
    """The fixed shortening rule of the module docstring."""
    cfg = json.loads(json.dumps(cfg))
    data = cfg["data"]
    data["max_train_per_task"] = min(data.get("max_train_per_task") or 10**9, 200)
    data["max_test_per_task"] = min(data.get("max_test_per_task") or 10**9, 100)
    post = cfg.setdefault("posterior", {})
    post["steps"] = min(post.get("steps", 500), STEPS)
    if post.get("checkpoint_steps"):
        post["checkpoint_steps"] = [10, 20]
    if cfg.get("pretrain"):
        cfg["pretrain"]["steps"] = min(cfg["pretrain"].get("steps", 500), STEPS)
    cfg["multitask_steps"] = STEPS
    cfg.setdefault("merge", {})["spacing"] = 0.25
    sel = cfg.setdefault("selection", {})
    if sel.get("strategy", "top_k") == "top_k":
        sel["top_k"] = min(sel.get("top_k", 1), 2)
    else:
        sel["budget"] = min(sel["budget"], 2)
        sel["batch"] = 1
    cfg["output_dir"] = str(out)
    return cfg


def scrub(x):
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    return x


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def fingerprint(configs: list[Path], flow: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cli = [sys.executable, "-m", "flows.cli"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        for path in configs:
            short = shorten(yaml.safe_load(path.read_text()), Path(tmp) / "runs")
            cfg_path = Path(tmp) / path.name
            cfg_path.write_text(yaml.safe_dump(short))
            demo = Path(tmp) / "demo" / path.stem
            run([*cli, "demo", str(cfg_path), "--output", str(demo), "--quiet"], env)
            out[f"demo:{path}"] = scrub(json.loads((demo / "front.json").read_text()))
            print(f"demo {path}: done", flush=True)
        if flow:
            path = configs[0]
            cfg_path = Path(tmp) / path.name
            run([*cli, "run", str(cfg_path), "--output", str(Path(tmp) / "flow"), "--quiet"], env)
            front = next((Path(tmp) / "flow").glob("*/front.json"))
            out[f"run:{path}"] = scrub(json.loads(front.read_text()))
            print(f"run {path}: done", flush=True)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            bad += 1
            print(f"DIFFERENT: {k}")
        else:
            print(f"identical: {k}")
    return bad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--flow", action="store_true", help="also run the first config through `varmerge run`")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args(argv)
    if args.compare:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        raise SystemExit(1 if compare(old, new) else 0)
    configs = args.configs or sorted(Path("configs").glob("*.yaml")) + sorted(Path("configs/table1").glob("*.yaml"))
    configs = sorted(configs, key=lambda p: p.name != "smoke.yaml")  # smoke first: the flow runs it
    result = fingerprint(configs, args.flow)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(f"{len(result)} fingerprints")


if __name__ == "__main__":
    main()
