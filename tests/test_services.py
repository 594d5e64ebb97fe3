"""Services listen on loopback by default and nothing phones home: the defaults the project sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import stops_its_group
from typer.testing import CliRunner

from flows import cli, services
from varmerge.services import LOOPBACK, SERVICE_ENV, apply_service_env

ROOT = Path(__file__).resolve().parents[1]


def test_ui_binds_loopback_by_default(monkeypatch):
    help_text = CliRunner().invoke(cli.app, ["ui", "--help"], terminal_width=200).output
    host_block = help_text[help_text.index("--host") : help_text.index("--help")]
    assert "[default: 127.0.0.1]" in host_block, help_text
    seen = []
    monkeypatch.setattr(services, "serve", lambda cmd, **_: seen.append(cmd) or 0)
    result = CliRunner().invoke(cli.app, ["ui", "--tracking-uri", "sqlite:///x.db"])
    assert result.exit_code == 0, result.output
    [cmd] = seen
    assert cmd[cmd.index("--host") + 1] == LOOPBACK == "127.0.0.1"
    assert "note:" not in result.output


def test_ui_of_a_run_folder_opens_that_run_s_store_from_anywhere(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(services, "serve", lambda cmd, **_: seen.append(cmd) or 0)
    run = tmp_path / "runs" / "own"
    run.mkdir(parents=True)
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # as flows.front.portable writes it: the store relative to the run folder
    (run / "front.json").write_text(json.dumps({"methods": {}, "tracking_uri": "sqlite:///../mlflow.db"}))
    monkeypatch.chdir(tmp_path / "runs")
    for target in ("own", "own/front.json"):
        result = CliRunner().invoke(cli.app, ["ui", target])
        assert result.exit_code == 0, result.output
        assert seen[-1][seen[-1].index("--backend-store-uri") + 1] == store, seen[-1]
    bad = CliRunner().invoke(cli.app, ["ui", str(tmp_path)])
    assert bad.exit_code == 2 and "no front.json there" in bad.output and len(seen) == 2


def test_ui_elsewhere_only_when_asked_and_with_a_note(monkeypatch):
    seen = []
    monkeypatch.setattr(services, "serve", lambda cmd, **_: seen.append(cmd) or 0)
    result = CliRunner().invoke(cli.app, ["ui", "--host", "0.0.0.0"], terminal_width=200)
    assert seen[0][seen[0].index("--host") + 1] == "0.0.0.0"
    assert "note:" in result.output and "no authentication" in result.output


def test_apply_service_env_sets_defaults_and_keeps_user_choices():
    env = {"DO_NOT_TRACK": "false"}
    out = apply_service_env(env)
    assert env["DO_NOT_TRACK"] == "false"  # the user's explicit choice wins
    assert out == {**SERVICE_ENV, "DO_NOT_TRACK": "false"}
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
    }.items():
        assert env[key] == value


@pytest.mark.parametrize("module", ["flows.cli", "tasks"])
def test_importing_the_entry_points_applies_the_env(module):
    """In a clean environment, importing the CLI (or tasks/, as a Prefect worker does) sets them."""
    code = f"import os, json, {module}; print(json.dumps({{k: os.environ.get(k) for k in {sorted(SERVICE_ENV)!r}}}))"
    clean = {k: v for k, v in __import__("os").environ.items() if k not in SERVICE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=clean, cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == SERVICE_ENV


def test_run_quiets_prefect_and_mlflow_logs_unless_debug(monkeypatch, restore_env):
    import logging

    for k in ("PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL", "PREFECT_HOME"):
        monkeypatch.delenv(k, raising=False)
    level = logging.getLogger("mlflow").level
    services.prefect_env(debug=False)
    logging.getLogger("mlflow").setLevel(level)
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "CRITICAL" and os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["PREFECT_SERVER_API_HOST"] == LOOPBACK


def test_no_service_binds_all_interfaces_in_shipped_scripts():
    for path in [ROOT / "scripts" / "deploy_local.sh", ROOT / "prefect.yaml", ROOT / "Makefile", ROOT / "dvc.yaml"]:
        text = path.read_text()
        assert "0.0.0.0" not in text, path
    assert "server start --host 127.0.0.1" in (ROOT / "scripts" / "deploy_local.sh").read_text()


@pytest.mark.slow
def test_ephemeral_prefect_api_is_on_loopback(prefect_server):
    from urllib.parse import urlparse

    assert urlparse(prefect_server).hostname == "127.0.0.1"


def test_serve_stops_the_whole_process_tree_on_sigint():
    """``serve`` (what ``varmerge ui`` runs its server with) on a server stand-in that forks a
    worker: SIGINT stops both (SIGTERM on the real MLflow UI: ``tests/test_browser.py``)."""
    import signal

    import psutil

    worker = "import time; time.sleep(120)"
    tree = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(120)"
    code = f"import sys\nfrom flows.services import serve\nsys.exit(serve([sys.executable, '-c', {tree!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        stops_its_group(proc, signal.SIGINT, lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 2)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_run_on_its_own_prefect_api_is_quiet_and_leaves_no_process(tmp_path):
    """``varmerge run`` as a user runs it (no PREFECT_API_URL: the command starts a Prefect API
    server of its own, on loopback): it succeeds, prints no warning or library chatter, and
    nothing of its process group (that server included) outlives it, also when it fails."""
    import re

    import yaml
    from helpers import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "name": "quiet"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_LOGGING"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    varmerge = str(Path(sys.executable).with_name("varmerge"))
    cmd = [varmerge, "run", str(config), "--output", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "registered model varmerge-quiet/1" in " ".join(output.split()), output
    noise = [
        ln for ln in output.splitlines() if re.search(r"warn|^[WE]\d{4}|successfully registered|traceback", ln, re.I)
    ]
    chatter = ["in eval mode", "Failed to validate", "Downloading artifacts", "Starlette", "%|"]
    assert not noise and [c for c in chatter if c in output] == [], output
    with pytest.raises(ProcessLookupError):  # the group is empty: the API server stopped too
        os.killpg(proc.pid, 0)

    # a command that fails (after its API server started: preflight fails) stops the server too
    config.write_text(yaml.safe_dump({**TINY, "name": "quiet", "model": {"name": "mlp", "options": {"depth": 3}}}))
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and output.startswith("error: model.options"), output
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_the_ui_server_runs_without_starlette_s_deprecation_noise(monkeypatch):
    got = []
    monkeypatch.setattr(services, "serve", lambda cmd, env=None: got.append(env) or 0)
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    assert CliRunner().invoke(cli.app, ["ui", "--tracking-uri", "sqlite:///x.db"]).exit_code == 0
    warnings = got[0]["PYTHONWARNINGS"].split(",")
    assert "ignore:starlette.middleware.wsgi is deprecated" in warnings and warnings[-1] == "error::UserWarning"
