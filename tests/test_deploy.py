"""The local deployment round trip users take, end to end on 127.0.0.1.

A Prefect server (the session's ``prefect server start``, with its scheduler) →
``prefect work-pool create cpu|gpu --type process`` → ``prefect worker start --pool cpu``
started *outside* the repo, with no ``VARMERGE_ROOT`` → ``prefect deploy --all`` from the repo
root (reads ``prefect.yaml``) → ``prefect deployment run varmerge-front/front-nightly --param
config=TINY --param tracking_uri=sqlite:///... --watch`` → the run completes and writes
``front.json``; the ``front-dask`` deployment is stored with its Dask runner (the Dask runner's
flow runs are ``tests/test_dask.py``'s); the stored cron schedule produced scheduled runs. The
CLI and the worker have a temporary ``PREFECT_HOME``, and every process this test starts is
stopped (the worker first) whatever happens.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import TINY as SHARED_TINY
from servers import Procs, prefect_env, tail

pytest.importorskip("prefect")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect"

TINY = {**copy.deepcopy(SHARED_TINY), "name": "tiny-deploy", "multitask_steps": 20}
TINY["posterior"]["steps"] = 20


def _cli(args: list[str], env: dict, logs: Path, name: str, timeout: float = 120, **kw) -> str:
    r = subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)
    (logs / f"{name}.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _run_deployment(name, dep, config, uri, procs, env, cwd, logs, worker) -> dict:
    """Run deployment ``varmerge-front/NAME`` on ``config``, watched to its end; its completed run."""
    api = env["PREFECT_API_URL"]
    args = ["deployment", "run", f"varmerge-front/{name}", "--param", f"config={config}"]
    args += ["--param", f"tracking_uri={uri}", "--watch", "--watch-timeout", "300"]
    watcher = procs.start(f"run-{name}", [PREFECT, *args], env=env, cwd=cwd)
    try:
        rc = watcher.wait(330)
    except subprocess.TimeoutExpired:
        rc = None
    report = f"\n--- run ---\n{tail(logs / f'run-{name}.log')}\n--- worker ---\n{tail(logs / 'worker.log', 8000)}"
    assert worker.poll() is None, f"the worker died{report}"
    assert rc == 0, f"the flow run did not complete (watch rc={rc}){report}"
    runs = _post(
        f"{api}/flow_runs/filter",
        {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
    )
    assert len(runs) == 1, runs
    return runs[0]


def _check_pull_steps(steps: list[dict], other: Path, api: str) -> None:
    """The stored pull steps move to the repo root recorded at deploy time, or to $VARMERGE_ROOT."""
    from prefect.deployments.steps.core import run_steps
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert str(REPO) in json.dumps(steps), steps
    cwd, old = os.getcwd(), os.environ.pop("VARMERGE_ROOT", None)
    try:
        for root, want in ((None, REPO), (str(other), other)):
            if root:
                os.environ["VARMERGE_ROOT"] = root
            os.chdir(other if root is None else REPO)
            with temporary_settings({PREFECT_API_URL: api}):  # not an ephemeral API
                out = asyncio.run(run_steps(steps, print_function=lambda *a, **k: None))
            assert Path(out["directory"]).resolve() == want.resolve(), (root, out)
    finally:
        os.chdir(cwd)
        os.environ.pop("VARMERGE_ROOT", None)
        if old is not None:
            os.environ["VARMERGE_ROOT"] = old


@pytest.mark.slow
def test_local_deployment_round_trip(prefect_server, tmp_path):
    port = int(prefect_server.removesuffix("/api").rsplit(":", 1)[1])
    home, logs, elsewhere = tmp_path / "prefect_home", tmp_path / "logs", tmp_path / "elsewhere"
    for d in (home, logs, elsewhere):
        d.mkdir()
    env = prefect_env(home, port)
    api = env["PREFECT_API_URL"]

    out_dir = tmp_path / "runs"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(out_dir)}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    procs, t0, phases = Procs(logs), time.monotonic(), {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 1)

    try:
        # 2. the work pools prefect.yaml names (both at once), then a worker for `cpu` started
        #    outside the repo with no VARMERGE_ROOT: the pull steps alone must find the repo root
        pools = [
            subprocess.Popen(
                [PREFECT, "work-pool", "create", pool, "--type", "process"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pool in ("cpu", "gpu")
        ]
        try:
            outs = [p.communicate(timeout=120)[0] for p in pools]
        finally:
            for p in pools:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, out in zip(pools, outs, strict=True):
            assert p.returncode == 0, f"{p.args}:\n{out}"
        worker = procs.start(
            "worker", [PREFECT, "worker", "start", "--pool", "cpu", "--name", "test-cpu"], env=env, cwd=elsewhere
        )
        phase("pools")

        # 3. every deployment of prefect.yaml, from the repo root
        _cli(["--no-prompt", "deploy", "--all"], env, logs, "deploy", timeout=240, cwd=REPO)
        dep = _get(f"{api}/deployments/name/varmerge-front/front-nightly")
        crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone"), s["active"]) for s in dep["schedules"]]
        assert crons == [("0 2 * * *", "UTC", True)], dep["schedules"]
        assert (dep["work_pool_name"], dep["entrypoint"]) == ("cpu", "flows/front.py:front_flow")
        _check_pull_steps(dep["pull_steps"], elsewhere, api)
        phase("deploy")

        # 4. a cheap run of the nightly deployment (the tiny config), watched to its end
        run = _run_deployment("front-nightly", dep, config, uri, procs, env, elsewhere, logs, worker)
        assert run["parameters"]["config"] == str(config), run
        summary = json.loads((out_dir / "tiny-deploy" / "front.json").read_text())
        assert set(summary["methods"]) == {"simple", "hessian", "mixture"}
        stored = summary["tracking_uri"].removeprefix("sqlite:///")  # relative to the run folder
        assert (out_dir / "tiny-deploy" / stored).resolve() == Path(uri.removeprefix("sqlite:///")).resolve()
        assert summary["grid_size"] == 16  # spacing 0.25 and (1/3, 1/3, 1/3): pooled = uniform, equal tasks
        phase("run")

        # 4b. the Dask deployment: the same flow, its tasks on a local cluster of worker processes
        dask = _get(f"{api}/deployments/name/varmerge-front/front-dask")
        assert dask["parameters"]["runner"] == {"kind": "dask", "workers": 2}, dask["parameters"]
        assert (dask["work_pool_name"], dask["entrypoint"]) == ("cpu", "flows/front.py:front_flow")

        # 5. the server's scheduler turned the cron schedule into scheduled nightly runs
        deadline, nightly = time.monotonic() + 30, []
        while not nightly and time.monotonic() < deadline:
            nightly = _post(
                f"{api}/flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [dep["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
            )
            time.sleep(0 if nightly else 1)
        assert nightly, (
            "the scheduler created no runs for the cron schedule; see the session server's log "
            "(SQLAlchemy 2.1 breaks Prefect 3.8's scheduler: pin sqlalchemy<2.1)"
        )
        assert all(r["expected_start_time"].endswith("T02:00:00Z") for r in nightly), nightly
        phase("schedule")
    finally:
        procs.stop_all()
        phase("stop")
        timings = {"seconds": phases, "stopped": procs.stopped}
        (logs / "timings.json").write_text(json.dumps(timings, indent=1))
        print(f"deployment round trip: {timings}")
    assert not procs.alive(), f"processes left running: {procs.alive()}"
