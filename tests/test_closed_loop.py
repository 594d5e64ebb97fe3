"""``selection.strategy: closed_loop`` through the flow: the search's finetunes are tasks and
nested MLflow runs, the parent run gets the incumbent per iteration (with ``step``), front.json
records the path, the registered model is the incumbent's, and a killed search resumes: finished
finetunes are reused and the next α is the one the uninterrupted search chose."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY

from varmerge import pipeline

ROOT = Path(__file__).resolve().parents[1]
CLOSED = copy.deepcopy(TINY)
CLOSED["name"] = "closed"
# margin 0: the search spends its whole budget (the default margin may stop it once α looks flat)
CLOSED["selection"] = {"method": "mixture", "strategy": "closed_loop", "budget": 3, "epsilon": 0.0, "margin": 0.0}


def _flow(config: Path, out: Path) -> dict:
    from flows.front import front_flow

    return front_flow(str(config), tracking_uri=f"sqlite:///{out / 'mlflow.db'}", output_dir=str(out))


@pytest.mark.slow
def test_a_closed_loop_search_runs_logs_and_resumes_after_a_kill(prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    config = tmp_path / "closed.yaml"
    config.write_text(yaml.safe_dump(CLOSED))
    whole = _flow(config, tmp_path / "whole")
    path = whole["search"]
    assert [len(it["alpha"]) for it in path] == [1, 1, 1]
    assert path[0]["expected_improvement"] == [None]  # pooled α first: the finetune a user would run anyway
    assert path[0]["alpha"][0] == whole["defaults"]["pooled"]["alpha"] == pytest.approx([1 / 3] * 3)
    assert whole["defaults"]["pooled"]["realised"]["accuracy"] == path[0]["realised"][0]
    alphas = [it["alpha"][0] for it in path]
    assert len({tuple(a) for a in alphas}) == 3
    means = [sum(it["realised"][0]) / 3 for it in path]
    assert whole["chosen"]["alpha"][0] == alphas[means.index(max(means))]  # the incumbent comes first
    assert path[-1]["incumbent_objective"] == pytest.approx(max(means))
    saved = json.loads((tmp_path / "whole" / "closed" / "front.json").read_text())
    assert saved["search"] == path

    client = MlflowClient(f"sqlite:///{tmp_path / 'whole' / 'mlflow.db'}")
    history = client.get_metric_history(whole["mlflow_run_id"], "search/incumbent_objective")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([max(means[: i + 1]) for i in range(3)])
    tags = client.get_run(whole["mlflow_run_id"]).data.tags
    assert not whole["realised_verdict"]["settled"]  # margin 0: the budget was spent
    assert tags["varmerge.realised_verdict"] == whole["realised_verdict"]["message"]
    version = client.search_model_versions("name='varmerge-closed'")[0]
    assert json.loads(version.tags["alpha"]) == whole["chosen"]["alpha"][0]

    # killed before its third finetune, then resumed: two reused, one run, the same path
    out = tmp_path / "killed"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-sub")}
    args = [sys.executable, str(ROOT / "tests" / "fault_launcher.py"), "multitask:3", "run", str(config)]
    args += ["--output", str(out), "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "-q"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert len(list((out / "closed" / "multitask").glob("*.safetensors"))) == 2

    calls = []
    real = pipeline.multitask_finetune
    monkeypatch.setattr(pipeline, "multitask_finetune", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    resumed = _flow(config, out)
    assert [list(map(float, a)) for a in calls] == [alphas[2]]
    assert [it["alpha"] for it in resumed["search"]] == [it["alpha"] for it in path]
    assert resumed["chosen"] == whole["chosen"]


def test_closed_loop_settings_are_checked_with_one_line():
    from varmerge.config import ConfigError, parse_config

    for selection, words in [
        ({"top_k": 2}, "selection.top_k needs selection.strategy top_k (the default strategy is closed_loop)"),
        ({"strategy": "closed_loop", "budget": 2, "batch": 3}, "selection.batch 3 is larger than selection.budget 2"),
        ({"strategy": "closed_loop", "budget": 0}, "selection.budget"),
        ({"strategy": "top_k", "budget": 4}, "selection.budget needs selection.strategy closed_loop"),
        ({"strategy": "closed_loop", "budget": 2, "prior_methods": ["ties"]}, "are not among merge.methods"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_config({**TINY, "selection": selection})
    assert parse_config({**TINY, "selection": {}}).selection.budget == 3  # the default: a closed loop of 3


def test_the_default_prior_is_the_selection_method_and_the_variational_rules():
    from varmerge.config import parse_config
    from varmerge.plan import make_plan

    def prior_methods(raw: dict) -> list[str]:
        return list(make_plan(parse_config(raw)).prior_methods)

    methods = ["simple", "task_arithmetic", "hessian", "ties", "mixture"]
    base = {**TINY, "merge": {**TINY["merge"], "methods": methods}}
    sel = {"strategy": "closed_loop", "budget": 2}
    assert prior_methods({**base, "selection": sel}) == ["simple", "hessian", "mixture"]
    assert prior_methods({**base, "selection": {**sel, "method": "ties"}}) == ["simple", "hessian", "ties", "mixture"]
    assert prior_methods({**base, "selection": {**sel, "prior_methods": ["task_arithmetic"]}}) == ["task_arithmetic"]
