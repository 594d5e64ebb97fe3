"""The main flow end to end under Prefect's test harness, MLflow in a temp folder."""

import json

import pytest
import torch
import yaml

pytest.importorskip("prefect")

from helpers import TINY, plan_of  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.xdist_group("reference")  # the session's reference run: built once per worker


@pytest.fixture(scope="module")
def harness(prefect_server):  # the session's Prefect test API (tests/conftest.py)
    yield


@pytest.mark.slow
def test_front_flow_end_to_end_and_rerun_reuses_everything(harness, tmp_path, monkeypatch, restore_env):
    from flows.front import front_flow
    from varmerge import pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = front_flow(TINY, tracking_uri=uri, output_dir=str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "front.json").exists() and (run_dir / "front.png").exists()
    assert (run_dir / "ternary.png").exists()
    assert len(list((run_dir / "posteriors").glob("*.safetensors"))) == 3
    assert set(summary["methods"]) == {"simple", "hessian", "mixture"}
    assert summary["grid_size"] == 16  # 15 of spacing 0.25 and (1/3, 1/3, 1/3): pooled = uniform, equal tasks
    for m in summary["methods"].values():
        assert 0 < m["max_mean_accuracy"] <= 1
    assert len(summary["chosen"]["realised"][0]) == 3
    # the free defaults beside the chosen α, the verdict, and the gain over pooled
    assert set(summary["defaults"]) == {"pooled", "uniform", "temperature"}
    assert summary["defaults"]["pooled"]["alpha"] == pytest.approx([1 / 3] * 3)
    assert set(summary["defaults"]["pooled"]["predicted"]) == set(summary["methods"])
    assert summary["verdict"]["message"].startswith("α ") and summary["objective"]["kind"] == "mean"
    gain = summary["chosen"]["gain_over_pooled"]["predicted"]
    assert gain["objective"] == pytest.approx(
        summary["chosen"]["predicted_objective"][0] - summary["defaults"]["pooled"]["predicted"]["mixture"]["objective"]
    )

    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["varmerge.flow_run_id"]
    assert parent.data.tags["varmerge.data_version"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert names[:7] == [
        "finetune/a",
        "finetune/b",
        "finetune/c",
        "merge/hessian",
        "merge/mixture",
        "merge/simple",
        "multitask/alpha=" + str([round(a, 3) for a in summary["chosen"]["alpha"][0]]),
    ]
    assert names[7:] == ["multitask/final"]
    # Lightning logged its training curves into the finetune's own run (no extra runs)
    ft = next(r for r in children if r.info.run_name == "finetune/a")
    assert any(k.startswith("train") for k in ft.data.metrics), ft.data.metrics.keys()
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "front")]
    assert "front/front.json" in arts and "front/front.png" in arts and "front/calibrated.png" in arts
    # the calibrated front: per α and task a prediction and its 80 % interval, corrected by the finetune
    cal = summary["calibrated"]
    assert cal["interval"] == 0.8 and cal["finetunes"] == 1 and "residual GP on 1 real finetune" in cal["source"]
    assert len(cal["mean"]) == summary["grid_size"] and all(len(row) == 3 for row in cal["lower"])
    at = summary["chosen"]["calibrated"]
    assert all(lo <= m <= hi for lo, m, hi in zip(at["lower"], at["mean"], at["upper"], strict=True))
    for n, m in zip(summary["tasks"], at["mean"], strict=True):  # at the finetuned α: its realised score
        assert parent.data.metrics[f"calibrated/{n}/mean"] == pytest.approx(m)
    assert at["mean"] == pytest.approx(summary["chosen"]["realised"][0], abs=0.01)
    # the UI's model-training view, a front table it can show and compare, per-method metrics
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)
    table = mlflow.load_table("front/front_table.json", run_ids=[parent.info.run_id])
    assert len(table) == 3 * summary["grid_size"] and set(table["method"]) == set(summary["methods"])
    rows = table[table["method"] == "mixture"]
    assert rows["mean_accuracy"].max() == pytest.approx(summary["methods"]["mixture"]["max_mean_accuracy"])
    assert int(rows["pareto"].sum()) == summary["methods"]["mixture"]["front_size"]
    assert json.loads(parent.data.tags["varmerge.chosen.alpha"]) == [round(a, 6) for a in summary["chosen"]["alpha"][0]]
    assert parent.data.tags["varmerge.chosen.method"] == "mixture"
    assert parent.data.tags["varmerge.verdict"] == summary["verdict"]["message"]
    assert json.loads(parent.data.tags["varmerge.defaults.pooled.alpha"]) == pytest.approx([1 / 3] * 3, abs=1e-6)
    pooled = summary["defaults"]["pooled"]["predicted"]["mixture"]["objective"]
    assert parent.data.metrics["defaults/pooled/predicted_objective"] == pytest.approx(pooled)
    for m, s in summary["methods"].items():
        assert parent.data.metrics[f"{m}/hypervolume"] == pytest.approx(s["hypervolume"]) and 0 < s["hypervolume"] < 1
    versions = client.search_model_versions("name='varmerge-tiny'")
    assert len(versions) == 1 and json.loads(versions[0].tags["alpha"]) == summary["chosen"]["alpha"][0]
    # the registered model loads from its registry URI and predicts a batch of any size: its
    # accuracy on every task's whole test set is the multitask finetune's logged accuracy
    from varmerge import files

    loaded = mlflow.pyfunc.load_model(f"models:/varmerge-tiny/{versions[0].version}")
    task_data, n_classes = pipeline.tasks_from_tensors(
        *files.load_tensors(next((run_dir / "data").glob("tasks-*.safetensors")))
    )
    final = next(r for r in children if r.info.run_name == "multitask/final")
    for t in task_data:
        x, y = t.test
        logits = loaded.predict(x.numpy())
        accuracy = float((torch.as_tensor(logits).argmax(1) == y).double().mean())
        assert accuracy == pytest.approx(final.data.metrics[f"test/{t.name}/accuracy"], abs=1e-9), t.name
    assert torch.as_tensor(loaded.predict(task_data[0].test[0][:3].numpy())).shape == (3, n_classes)

    # `varmerge front RUN_ID` reads the front back from MLflow
    from typer.testing import CliRunner

    from flows.cli import app

    shown = CliRunner().invoke(app, ["front", summary["mlflow_run_id"], "--tracking-uri", uri], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "mixture: Pareto front" in shown.output and "predicted (merged) → realised" in shown.output
    assert "calibrated at the chosen α (80 % interval)" in " ".join(shown.output.split())
    assert summary["verdict"]["message"][:40] in " ".join(shown.output.split())
    missing = CliRunner().invoke(app, ["front", "0" * 32, "--tracking-uri", uri])
    assert missing.exit_code == 2 and "cannot read the front" in missing.output
    # ... and from the run folder, wherever it is run (no store to name)
    monkeypatch.chdir(tmp_path.parent)
    folder = CliRunner().invoke(app, ["front", summary["run_dir"]], terminal_width=200)
    assert folder.exit_code == 0 and folder.output == shown.output, folder.output
    lost = CliRunner().invoke(app, ["front", "0" * 32])
    assert lost.exit_code == 2 and "give the run folder (varmerge front runs/NAME)" in lost.output

    # ground truth on a coarse grid, and front quality of every method against it
    from flows.sweep import ground_truth_flow

    gt = ground_truth_flow(TINY, spacing=0.25, tracking_uri=uri, output_dir=str(tmp_path / "runs"))
    assert len(gt["alpha"]) == 15 and len(gt["accuracy"]) == 15
    assert gt["hypervolume"] > 0
    for m in ("simple", "hessian", "mixture"):
        q = gt["methods"][m]
        assert q["hypervolume"] > 0 and q["igd_plus"] >= 0
        assert 0 <= q["alpha_map_error"] <= 1  # the ground-truth grid is the merge grid here
    assert (run_dir / "ground_truth_0.25.json").exists()
    # the main run's front.json and MLflow parent run now carry the scores for trusting α
    front = json.loads((run_dir / "front.json").read_text())
    assert str(tmp_path) not in json.dumps(front)  # paths relative to the run folder
    assert front["tracking_uri"] == "sqlite:///../../mlflow.db"
    regret = front["methods"]["mixture"]["selection_regret"]  # mixture picks α in TINY
    assert regret["top1"] == gt["selection_regret"]["top1"] and regret["best_of_k"] <= regret["top1"]
    assert front["methods"]["simple"]["alpha_map_error"] == gt["methods"]["simple"]["alpha_map_error"]
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert "mixture/alpha_map_error" in metrics and "chosen/selection_regret_top1" in metrics
    assert {f"chosen/realised/{t}" for t in "abc"} <= metrics.keys()

    # a re-run with `varmerge run` trains nothing (every finetune, sweep and multitask finetune is
    # reused) and validates the config once: the flow and its tasks get the resolved run plan
    def boom(*a, **k):
        raise AssertionError("a finetune ran again")

    monkeypatch.setattr(pipeline, "finetune_task", boom)
    monkeypatch.setattr(pipeline, "multitask_finetune", boom)
    validations = _count_validations(monkeypatch)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    rerun = ["run", str(config), "--tracking-uri", uri, "--output", str(tmp_path / "runs"), "--quiet"]
    result = CliRunner().invoke(app, rerun, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert validations == [1]
    again = json.loads((run_dir / "front.json").read_text())
    assert again["methods"] == summary["methods"]
    assert again["chosen"] == summary["chosen"]


def _count_validations(monkeypatch) -> list[int]:
    """A one-element list counting every validation of an experiment config from now on."""
    from varmerge.config import ExperimentConfig

    count, real = [0], ExperimentConfig.__pydantic_validator__

    class Counting:
        def validate_python(self, *args, **kwargs):
            count[0] += 1
            return real.validate_python(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(ExperimentConfig, "__pydantic_validator__", Counting())
    return count


def test_prepare_data_from_a_prepared_folder(tmp_path):
    from tasks import steps
    from varmerge import data as vdata

    ds = vdata.mnist5k(seed=0)
    vdata.save_dataset(ds, tmp_path / "data")
    plan = plan_of(TINY, tmp_path / "out", data_dir=tmp_path / "data")
    r = steps.prepare_data.fn(plan)
    assert r["path"].startswith("data/tasks-")  # the per-task tensors, prepared once
    assert r["version"] == r["sha256"][:16]  # not DVC-tracked: the content hash
    tasks, _ = steps.load_tasks(plan, r)
    assert [t.name for t in tasks] == ["a", "b", "c"] and len(tasks[0].train[1]) == 300
    with pytest.raises((FileNotFoundError, ValueError)):
        steps.prepare_data.fn(plan_of(TINY, tmp_path / "out", data_dir=tmp_path / "nope"))


@pytest.mark.slow
def test_every_step_reports_progress_to_a_prefect_artifact(reference_run):
    """The Prefect UI shows each finetune, sweep and multitask finetune of a flow run as a progress
    artifact of its task run, at 100 % once the run is over."""
    from uuid import UUID

    from helpers import RESUME
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    summary = reference_run["summary"]
    tags = MlflowClient(reference_run["uri"]).get_run(summary["mlflow_run_id"]).data.tags
    flow_run = UUID(tags["varmerge.flow_run_id"])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])
            )
        )
    steps = sorted(a.description.split(":")[0] for a in found)
    methods = RESUME["merge"]["methods"]
    assert steps == sorted(
        [f"finetune {t['name']} (multi_ivon × 2)" for t in RESUME["data"]["tasks"]]
        + [f"merge + evaluate {m}" for m in methods]
        + [f"multitask α={[round(a, 2) for a in summary['chosen']['alpha'][0]]}"]
    ), " | ".join(steps)
    assert all(a.data == 100 and a.task_run_id is not None for a in found), [(a.description, a.data) for a in found]
    steps_done = [a.description for a in found if a.description.startswith("finetune a ")]
    assert steps_done == [f"finetune a (multi_ivon × 2): {RESUME['posterior']['steps']}/300 (run 2)"], steps_done
