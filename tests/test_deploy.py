"""The local deployment round trip users take, end to end on 127.0.0.1.

``prefect server start`` → ``prefect work-pool create cpu|gpu --type process`` →
``prefect worker start --pool cpu`` started *outside* the repo, with no ``VARMERGE_ROOT`` →
``prefect deploy --all`` from the repo root (reads ``prefect.yaml``) → ``prefect deployment run
varmerge-front/front-nightly --param config=TINY --param tracking_uri=sqlite:///... --watch`` →
the run completes and writes ``front.json``; the stored cron schedule produced scheduled runs.
Everything runs with a temporary ``PREFECT_HOME`` on a free port, and every process this test
starts is stopped (worker first, then server) whatever happens. About 70 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import TINY as SHARED_TINY

pytest.importorskip("prefect")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect"

TINY = {**copy.deepcopy(SHARED_TINY), "name": "tiny-deploy", "multitask_steps": 20}
TINY["posterior"]["steps"] = 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, port: int) -> dict[str, str]:
    # nothing inherited may point the CLI at another profile, server or repo root
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "VARMERGE_ROOT"}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class _Procs:
    """Background processes, each in its own session so that a stop reaches its children too."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.stopped: dict[str, str] = {}

    def start(self, name: str, args: list[str], **kw) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            p = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kw
            )
        self.started.append((name, p))
        return p

    def stop(self, name: str, p: subprocess.Popen, grace: float) -> None:
        """SIGTERM to the process group this test created, SIGKILL after ``grace`` seconds."""
        t0, how = time.monotonic(), "had exited"
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if p.poll() is not None and not _group_alive(p.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            how = sig.name
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (p.poll() is None or _group_alive(p.pid)):
                time.sleep(0.2)
        self.stopped[name] = f"{how}, {time.monotonic() - t0:.1f} s"

    def stop_all(self) -> None:
        # the watcher and the worker (whose flow-run processes share its group) before the server;
        # an idle Prefect 3.8 worker may ignore SIGTERM, hence the short grace for all but the server
        for name, p in reversed(self.started):
            self.stop(name, p, grace=20 if name == "server" else 8)

    def alive(self) -> list[str]:
        return [n for n, p in self.started if p.poll() is None or _group_alive(p.pid)]


def _cli(args: list[str], env: dict, logs: Path, name: str, timeout: float = 120, **kw) -> str:
    r = subprocess.run([PREFECT, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)
    (logs / f"{name}.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited ({server.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{_tail(log)}")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


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
def test_local_deployment_round_trip(tmp_path):
    port = _free_port()
    home, logs, elsewhere = tmp_path / "prefect_home", tmp_path / "logs", tmp_path / "elsewhere"
    for d in (home, logs, elsewhere):
        d.mkdir()
    env = _env(home, port)
    api = env["PREFECT_API_URL"]

    out_dir = tmp_path / "runs"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(out_dir)}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    procs, t0, phases = _Procs(logs), time.monotonic(), {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 1)

    try:
        # 1. the API server, on 127.0.0.1 only
        server = procs.start(
            "server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=elsewhere
        )
        _wait_healthy(f"{api}/health", server, logs / "server.log")
        phase("server")

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
        watcher = procs.start(
            "run",
            [
                PREFECT,
                "deployment",
                "run",
                "varmerge-front/front-nightly",
                "--param",
                f"config={config}",
                "--param",
                f"tracking_uri={uri}",
                "--watch",
                "--watch-timeout",
                "300",
            ],
            env=env,
            cwd=elsewhere,
        )
        try:
            rc = watcher.wait(330)
        except subprocess.TimeoutExpired:
            rc = None
        report = f"\n--- run ---\n{_tail(logs / 'run.log')}\n--- worker ---\n{_tail(logs / 'worker.log', 8000)}"
        assert worker.poll() is None, f"the worker died{report}"
        assert rc == 0, f"the flow run did not complete (watch rc={rc}){report}"
        runs = _post(
            f"{api}/flow_runs/filter",
            {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
        )
        assert len(runs) == 1 and runs[0]["parameters"]["config"] == str(config), runs

        summary = json.loads((out_dir / "tiny-deploy" / "front.json").read_text())
        assert set(summary["methods"]) == {"simple", "hessian", "mixture"}
        stored = summary["tracking_uri"].removeprefix("sqlite:///")  # relative to the run folder
        assert (out_dir / "tiny-deploy" / stored).resolve() == Path(uri.removeprefix("sqlite:///")).resolve()
        assert summary["grid_size"] == 15
        phase("run")

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
        errors = sorted({ln.strip() for ln in _tail(logs / "server.log", 100_000).splitlines() if "Error:" in ln})
        assert nightly, (
            "the scheduler created no runs for the cron schedule; server errors: "
            f"{errors} (SQLAlchemy 2.1 breaks Prefect 3.8's scheduler: pin sqlalchemy<2.1)"
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
