import os

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
def prefect_harness(tmp_path_factory):
    """One Prefect test API for the whole session (starting one costs ~12 s on 2 cores).

    Yields its URL: subprocesses given ``PREFECT_API_URL`` use it too instead of starting their
    own ephemeral API.
    """
    pytest.importorskip("prefect")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    try:
        with prefect_test_harness(server_startup_timeout=90):
            yield PREFECT_API_URL.value()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def reference_run(prefect_harness, tmp_path_factory):
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
