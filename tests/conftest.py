import os
import sys
from pathlib import Path

import pytest
import torch

# Keep every service offline and quiet in tests.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prefect reads its log level when it is first imported: quiet, as `varmerge run` keeps it, so a
# CLI test sees the CLI's own output whatever test imported Prefect first.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect server for the whole session, as users run it: ``prefect server start`` on
    127.0.0.1 with its UI and its services (the scheduler). The in-process flows (through
    Prefect's settings), flow and CLI subprocesses (given ``PREFECT_API_URL``), the deployment
    test's work pools and worker, and the browser test all use it. Yields its API URL."""
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from servers import Procs, free_port, prefect_env, wait_healthy

    root = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = prefect_env(root / "home", port, ui=True)
    procs = Procs(root)
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = procs.start("server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env)
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(root / "client")  # this process's Prefect home (not the user's)
    try:
        wait_healthy(f"{env['PREFECT_API_URL']}/health", server, root / "server.log")
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env["PREFECT_API_URL"]
    finally:
        procs.stop_all()
        if saved is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = saved


@pytest.fixture(scope="session")
def reference_run(prefect_server, tmp_path_factory):
    """One uninterrupted front flow of ``helpers.RESUME`` (shared by the resume and
    determinism tests): ``{"config", "out", "run_dir", "uri", "summary"}``."""
    import yaml
    from helpers import RESUME

    from flows.front import front_flow

    root = tmp_path_factory.mktemp("reference")
    config = root / "resume.yaml"
    config.write_text(yaml.safe_dump(RESUME))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = front_flow(str(config), tracking_uri=uri, output_dir=str(root / "runs"))
    return {
        "config": config,
        "out": root / "runs",
        "run_dir": root / "runs" / RESUME["name"],
        "uri": uri,
        "summary": summary,
    }


@pytest.fixture
def restore_env():
    """Put ``os.environ`` back after a test that runs ``varmerge run`` in-process (the CLI sets
    logging and Prefect defaults with ``setdefault``, which would leak into later tests)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
