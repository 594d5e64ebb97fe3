"""The services a ``varmerge`` command starts and stops: a Prefect API server of its own, the
MLflow store, and the MLflow UI (a server in its own process group that nothing outlives).

Kept apart from the commands (:mod:`flows.cli`) and from what they print (:mod:`flows.render`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from varmerge.services import LOOPBACK

if TYPE_CHECKING:  # the plan imports torch and Lightning: the API server starts before that
    from varmerge.plan import RunPlan


def prefect_env(debug: bool) -> None:
    """Prefect's home in the project folder, a patient API start-up, quiet logs."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", LOOPBACK)
    # A failure reaches the user as one `error:` line; Prefect's and MLflow's own logs (Prefect
    # logs a failed run with its traceback) only with --debug or when the variables are set.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if debug else "CRITICAL")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if debug else "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


@contextmanager
def prefect_api(debug: bool = False):
    """A Prefect API server of this command's own, for the flows it runs, started first thing: it
    boots in its own process (``prefect server start --no-services --no-ui`` on a free loopback
    port) while this one imports torch and checks the inputs, where Prefect's ephemeral server
    would start only at the flow's first API call, after importing the server's code here too.
    Like that server, it lives as long as the command: stopped on the way out, and it gets
    SIGTERM if this process dies (Linux). Yields the :class:`OwnPrefectAPI`, or None when
    ``PREFECT_API_URL`` names a server (in the environment, or in Prefect's settings once Prefect
    is imported: tests)."""
    prefect_env(debug)
    if os.environ.get("PREFECT_API_URL") or _prefect_api_in_settings():
        yield None
        return
    api = OwnPrefectAPI()
    os.environ["PREFECT_API_URL"] = api.url
    try:
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        api.stop()


class OwnPrefectAPI:
    def __init__(self):
        import socket
        import subprocess
        import tempfile

        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{port}/api"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port)]
            + ["--no-services", "--no-ui"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def wait(self, timeout: float) -> None:
        """Return once the server answers; its last output in the error if it exits or times out."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        self.log.seek(0)
        output = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
        rc = self.proc.poll()
        what = f"exited with code {rc}" if rc is not None else f"did not answer within {timeout:.0f} s"
        raise RuntimeError(f"the Prefect API server {what}: {' | '.join(output)}")

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prefect_api_in_settings() -> bool:
    if "prefect.settings" not in sys.modules:  # not imported yet: only the environment can say
        return False
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextmanager
def start_services(plan: RunPlan, api: OwnPrefectAPI | None):
    """While the block imports the flow (the imports of Prefect and MLflow take seconds): create
    the MLflow store and the experiment in a thread (a new SQLite store runs its schema
    migrations); then wait for ``api``, the server of :func:`prefect_api` if any. Called after
    preflight: a run that fails its checks creates no store."""
    from concurrent.futures import ThreadPoolExecutor

    def mlflow_store() -> None:
        from tasks import tracking

        tracking.experiment_id(plan.tracking_uri, plan.cfg.tracking.experiment, tracking.artifact_root(plan.run_dir))

    with ThreadPoolExecutor(1, thread_name_prefix="varmerge-mlflow") as pool:
        store = pool.submit(mlflow_store)
        yield
        store.result()
    if api is not None:
        api.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))


def experiment_links(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """(name, link) of each experiment of the store, in the UI's model-training view: MLflow 3.17's
    UI opens every experiment in its GenAI view (traces, judges) unless the link or the user's
    toggle says otherwise. None for a SQLite store that does not exist yet (nothing is created)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []
    from tasks import tracking

    experiments = tracking.client(tracking_uri).search_experiments()
    view = "workflowType=machine_learning"
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?{view}") for e in experiments if e.name != "Default"]


#: Warnings the MLflow UI's processes print that are not the user's concern (MLflow's server
#: imports Starlette's deprecated WSGI middleware), as ``PYTHONWARNINGS`` entries.
UI_QUIET_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated,ignore::DeprecationWarning"


def ui_env() -> dict[str, str]:
    """The environment of ``varmerge ui``'s server: this one, with :data:`UI_QUIET_WARNINGS`
    after any ``PYTHONWARNINGS`` of the user's (theirs win: later entries take precedence)."""
    own = os.environ.get("PYTHONWARNINGS")
    return {**os.environ, "PYTHONWARNINGS": f"{UI_QUIET_WARNINGS},{own}" if own else UI_QUIET_WARNINGS}


def serve(cmd: list[str], grace_seconds: float = 10.0, env: dict[str, str] | None = None) -> int:
    """Run a server command (in ``env``, default this environment) in its own process group until
    it exits; SIGINT, SIGTERM or SIGHUP to this process stop the whole group (``mlflow ui`` forks
    gunicorn / uvicorn workers), with SIGKILL after ``grace_seconds``, so nothing outlives the
    command. Returns its exit code."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    stopping: list[float] = []

    def stop(signum, _frame) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > grace_seconds:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # workers the server left behind
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else rc


def ui_command(tracking_uri: str, host: str = LOOPBACK, port: int = 5000, workers: int = 1) -> list[str]:
    """The ``mlflow ui`` command line that ``varmerge ui`` runs: one worker process by default (a
    UI for one user starts in a fraction of the time of MLflow's default four)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
