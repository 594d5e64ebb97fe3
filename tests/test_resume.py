"""A flow killed (SIGKILL) during the finetunes resumes: completed posteriors are reused, never retrained."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests_helpers import TINY

pytestmark = pytest.mark.slow


def test_killed_flow_resumes_without_retraining(tmp_path, monkeypatch):
    cfg = copy.deepcopy(TINY)
    cfg["name"] = "resume"
    cfg["posterior"]["steps"] = 120  # a few seconds per task: a window to kill in
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "runs"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    proc = subprocess.Popen([sys.executable, "-m", "varmerge.cli", "run", str(path), "--output", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    posteriors = out / "resume" / "posteriors"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(posteriors.glob("*.safetensors"))) < 1:
            assert proc.poll() is None, "the flow ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = {p.name: p.stat().st_mtime_ns for p in posteriors.glob("*.safetensors")}
    assert 1 <= len(done) < 3, done
    assert not (out / "resume" / "front.json").exists()

    # resume in-process and count the finetunes that really run
    from prefect.testing.utilities import prefect_test_harness

    from flows.front import front_flow
    from varmerge import pipeline

    calls = []
    real = pipeline.finetune_task
    monkeypatch.setattr(pipeline, "finetune_task", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect2"))
    with prefect_test_harness(server_startup_timeout=90):
        summary = front_flow(str(path), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", output_dir=str(out))
    assert len(calls) == 3 - len(done), calls
    for name, mtime in done.items():
        assert (posteriors / name).stat().st_mtime_ns == mtime  # reused as they were
    assert len(list(posteriors.glob("*.safetensors"))) == 3
    assert Path(summary["run_dir"], "front.json").exists()
