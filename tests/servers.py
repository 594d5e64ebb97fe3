"""Background services for the slow tests: free ports, Prefect servers and their environment,
process groups stopped whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, port: int, ui: bool = False) -> dict[str, str]:
    """The environment of a Prefect CLI, server or worker on 127.0.0.1:``port`` with its own home
    (``ui``: the server also serves Prefect's web UI)."""
    # nothing inherited may point the CLI at another profile, server or repo root
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "VARMERGE_ROOT"}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
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


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Procs:
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
            if p.poll() is not None and not group_alive(p.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            how = sig.name
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (p.poll() is None or group_alive(p.pid)):
                time.sleep(0.2)
        self.stopped[name] = f"{how}, {time.monotonic() - t0:.1f} s"

    def stop_all(self) -> None:
        # the watcher and the worker (whose flow-run processes share its group) before the server;
        # an idle Prefect 3.8 worker may ignore SIGTERM, hence the short grace for all but the server
        for name, p in reversed(self.started):
            self.stop(name, p, grace=20 if name == "server" else 8)

    def alive(self) -> list[str]:
        return [n for n, p in self.started if p.poll() is None or group_alive(p.pid)]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited ({server.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{tail(log)}")


def stops_its_group(proc: subprocess.Popen, sig, started, timeout: float = 90) -> None:
    """Once ``started()``, send ``sig`` to ``proc``: it exits 0 and every process it started is gone."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while not started():
        assert proc.poll() is None, "the command exited before its server answered"
        assert time.monotonic() < deadline, f"the server did not answer within {timeout:.0f} s"
        time.sleep(0.2)
    group = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert group, "the server runs as a child process"
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(group, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
