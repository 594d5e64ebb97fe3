"""The main flow: per-task finetunes → posteriors → α sweeps per merge method → front → α →
multitask finetune at the top-k α, with everything logged to MLflow.

The sequence is :func:`varmerge.sequence.estimate_front`, the same one ``varmerge demo`` and
``benchmarks.table1`` run; here its steps are Prefect tasks over the run store
(:class:`tasks.runner.PrefectRunner`). Run it with ``varmerge run CONFIG`` (a local Prefect API
server the command starts, MLflow in a local SQLite store) or as the ``front`` deployment of
``prefect.yaml``.
"""

from __future__ import annotations

import contextlib
import io as io_
import json
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import steps, tracking
from tasks.runner import Pool, PrefectRunner, task_pool
from varmerge import io, pareto, plots
from varmerge.config import ExperimentConfig, load_config, parse_config, with_runner
from varmerge.sequence import estimate_front

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def resolve_config(config: str | dict | ExperimentConfig, runner: dict | None = None) -> ExperimentConfig:
    """The config a flow runs; ``runner`` (a ``runner:`` section) replaces the config's own."""
    if isinstance(config, dict):
        config = parse_config(config, "<flow parameter>")
    elif not isinstance(config, ExperimentConfig):
        config = load_config(config)
    return config if runner is None else with_runner(config, runner, "<runner parameter>")


@flow(name="varmerge-front", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def front_flow(
    config: str | dict,
    tracking_uri: str | None = None,
    output_dir: str | None = None,
    data_dir: str | None = None,
    check_inputs: bool = True,
    runner: dict | None = None,
) -> dict:
    """Estimate the Pareto front of ``config`` and finetune at the chosen α; returns the summary.

    ``check_inputs`` runs :func:`varmerge.preflight.preflight` first, so a run that would fail
    (bad data, model, tracking store, ...) writes nothing; ``varmerge run`` has already done it.
    ``runner`` replaces the config's ``runner`` section (where the tasks run: thread or Dask).
    """
    cfg = resolve_config(config, runner)
    if check_inputs:
        from varmerge.preflight import preflight

        preflight(cfg, tracking_uri, output_dir=output_dir, data_dir=data_dir)
    with task_pool(cfg.runner) as pool:
        get_run_logger().info("tasks run on %s", pool.description)
        return _front(cfg, pool, tracking_uri, output_dir, data_dir)


def _front(cfg: ExperimentConfig, pool: Pool, tracking_uri, output_dir, data_dir) -> dict:
    logger = get_run_logger()
    run_dir = Path(output_dir or cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or cfg.tracking.uri or tracking.default_uri(run_dir)
    names = [t.name for t in cfg.data.tasks]
    runner = PrefectRunner(cfg, str(run_dir), pool, data_dir=data_dir)

    data_ref = runner.data()
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, tracking.artifact_root(run_dir))
    for stale, flow_run_id in tracking.close_stale_runs(uri, exp_id, cfg.name):
        logger.info("MLflow run %s was left RUNNING by a killed flow: marked KILLED", stale)
        if flow_run_id and mark_crashed(flow_run_id):
            logger.info("Prefect flow run %s of that killed flow: marked Crashed", flow_run_id)
    parent = (
        tracking.client(uri)
        .create_run(
            exp_id,
            run_name=f"{cfg.name}",
            tags={
                "varmerge.flow_run_id": str(get_run_context().flow_run.id),
                "varmerge.data_version": data_ref["version"],
                "varmerge.config": cfg.name,
                "varmerge.process": tracking.process_tag(),
            },
        )
        .info.run_id
    )
    runner.parent = tracking.Parent(uri, parent)
    tracking.log_params(uri, parent, {"config": runner.cfg_json})
    try:
        result = estimate_front(cfg, runner)
        summary = {
            "config": cfg.name,
            **result.summary(),
            "spacing": cfg.merge.spacing,
            "run_dir": str(run_dir),
            "mlflow_run_id": parent,
            "tracking_uri": uri,
        }
        front_json = run_dir / "front.json"
        realised = result.realised.tolist() if result.realised is not None else []
        files = [
            front_json,
            plots.front_projections(result.sweeps, names, run_dir / "front.png", title=cfg.name, multitask=realised),
        ]
        if len(names) == 3:
            files.append(plots.ternary_mean_accuracy(result.sweeps, names, run_dir / "ternary.png"))
        tracking.log_table(uri, parent, front_table(result.sweeps, names), "front/front_table.json")
        if result.error is not None:  # the front is still saved and logged
            io.write_text_atomic(front_json, json.dumps(portable(summary, run_dir), indent=2))
            for p in files:
                tracking.log_artifact(uri, parent, p, "front")
            raise ValueError(f"{result.error} (the estimated front is in {front_json})")
        predicted = result.predicted
        files.append(
            plots.predicted_vs_realised(
                names, predicted[0].tolist(), realised[0], run_dir / "predicted_vs_realised.png"
            )
        )
        # register first, then write front.json (atomically, once): it exists only for a finished run
        summary["registered_model"] = register_model(runner, uri, parent, result.chosen_alpha[0].tolist())
        io.write_text_atomic(front_json, json.dumps(portable(summary, run_dir), indent=2))
        tracking.log_metrics(
            uri,
            parent,
            {
                **{
                    f"{m}/{k}": s[k]
                    for m, s in summary["methods"].items()
                    for k in ("max_mean_accuracy", "hypervolume", "front_size")
                },
                "chosen/predicted_mean": float(predicted[0].mean()),
                "chosen/realised_mean": float(result.realised[0].mean()),
                **{f"chosen/predicted/{n}": float(v) for n, v in zip(names, predicted[0], strict=True)},
                **{f"chosen/realised/{n}": float(v) for n, v in zip(names, result.realised[0], strict=True)},
            },
        )
        for i, it in enumerate(result.search or [], start=1):  # the UI plots the search by step
            point = {"search/best_realised_mean": max(sum(r) / len(r) for r in it["realised"])}
            if it["incumbent_mean"] is not None:
                point["search/incumbent_mean"] = it["incumbent_mean"]
            tracking.log_metrics(uri, parent, point, step=i)
        chosen = {
            "alpha": [round(a, 6) for a in result.chosen_alpha[0].tolist()],
            "predicted": [round(float(v), 6) for v in predicted[0]],
            "realised": [round(float(v), 6) for v in result.realised[0]],
        }
        tags = {f"varmerge.chosen.{k}": json.dumps(v) for k, v in chosen.items()}
        tracking.set_tags(uri, parent, {**tags, "varmerge.chosen.method": result.method})
        for p in files:
            tracking.log_artifact(uri, parent, p, "front")
        tracking.finish(uri, parent)
        logger.info("front written to %s (MLflow run %s)", front_json, parent)
        return summary
    except BaseException:
        tracking.finish(uri, parent, "FAILED")
        raise


def front_table(sweeps: dict[str, dict], names: list[str]) -> dict[str, list]:
    """Every merged model of every method as table columns: method, α and accuracy per task, the
    mean, and whether the point is on that method's estimated Pareto front."""
    cols: dict[str, list] = {"method": [], **{f"alpha/{n}": [] for n in names}, **{f"accuracy/{n}": [] for n in names}}
    cols.update({"mean_accuracy": [], "pareto": []})
    for m, sw in sweeps.items():
        acc, alpha = sw["accuracy"], sw["alpha"]
        cols["method"] += [m] * len(acc)
        for i, n in enumerate(names):
            cols[f"alpha/{n}"] += [round(float(a), 6) for a in alpha[:, i]]
            cols[f"accuracy/{n}"] += [float(a) for a in acc[:, i]]
        cols["mean_accuracy"] += acc.mean(1).tolist()
        cols["pareto"] += pareto.pareto_mask(acc).tolist()
    return cols


def mark_crashed(flow_run_id: str) -> bool:
    """Set a Prefect flow run that a killed process left Running (or Pending) to Crashed, as the
    MLflow run of that flow is marked KILLED; True if it was changed. Prefect's own crash
    detection needs the process alive to report; a SIGKILL leaves the run Running forever."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return False
        if run.state is None or run.state.is_final():
            return False
        message = "its process was killed; marked Crashed by the next run of this config"
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        return True


def log_text_model(config_json: str, num_classes: int, weights: Path, example_text: str):
    """Log a text model in the active MLflow run as the pyfunc of ``tasks/text_model.py``: its code
    (MLflow's models-from-code, no pickle), the weights file (safetensors) and the config. Its
    signature comes from ``predict``'s type hints (a list of texts in, one dict per text out)."""
    import importlib.util

    import mlflow

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=importlib.util.find_spec("tasks.text_model").origin,
        artifacts={"weights": str(weights)},
        model_config={"config": config_json, "num_classes": int(num_classes)},
        input_example=[example_text],
        pip_requirements=["torch", "transformers", "peft", "varmerge"],
    )


def portable(summary: dict, run_dir: Path) -> dict:
    """front.json's content: the summary without machine-specific paths. ``run_dir`` is where the
    file lies, and a SQLite tracking store is given relative to it (``sqlite:///../mlflow.db``), so
    the same run on another machine or folder writes the same file (``dvc metrics diff`` compares
    them across revisions)."""
    out = {k: v for k, v in summary.items() if k != "run_dir"}
    uri = str(summary.get("tracking_uri", ""))
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_absolute():
        out["tracking_uri"] = "sqlite:///" + os.path.relpath(uri.removeprefix("sqlite:///"), run_dir.resolve())
    return out


def register_model(runner: PrefectRunner, uri: str, parent: str, alpha: list) -> str:
    """Log the runner's multitask model at the chosen ``alpha`` in a nested run and register it
    with α as a tag.

    Idempotent: a READY version already registered for the same weights (tag ``varmerge.sha256``,
    the multitask file's content hash) is reused, so a re-run or a resumed run never registers the
    same model twice. A version is created only after its model artifact is fully logged.
    """
    cfg, run_dir, mt_ref = runner.cfg, runner.run_dir, runner.multitask_ref(alpha)
    with steps.store_for(run_dir).lock(f"register-{mt_ref['sha256'][:20]}"):  # one version, also when two runs race
        return _register(runner, uri, parent, alpha, f"varmerge-{cfg.name}")


def _register(runner: PrefectRunner, uri: str, parent: str, alpha: list, name: str) -> str:
    import mlflow
    import mlflow.pytorch

    cfg, run_dir, mt_ref = runner.cfg, runner.run_dir, runner.multitask_ref(alpha)
    existing = tracking.find_model_version(uri, name, mt_ref["sha256"])
    if existing is not None:
        return f"{name}/{existing.version}"
    child = tracking.start_child(
        uri,
        parent,
        "multitask/final",
        {"varmerge.stage": "multitask", "varmerge.alpha": json.dumps([round(a, 6) for a in alpha])},
    )
    model = steps.multitask_model(cfg, run_dir, mt_ref, runner.base_ref)
    example = steps.example_input(run_dir, runner.data_ref)
    tracking.log_metrics(
        uri, child, {f"test/{t.name}/accuracy": a for t, a in zip(cfg.data.tasks, mt_ref["accuracy"], strict=True)}
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=child):
        if example is None:  # text: a pyfunc over the model and its tokenizer, logged as code
            tasks_, n = steps.load_tasks(run_dir, runner.data_ref)
            text = steps.example_text(cfg, tasks_[0])
            info = log_text_model(runner.cfg_json, n, steps.store_for(run_dir).resolve(mt_ref), text)
        else:  # pt2 (torch.export), never pickle: also where MLflow would default to pickle (Databricks)
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example,
                serialization_format="pt2",
                pip_requirements=["torch", "varmerge"],
            )
    tags = {"alpha": json.dumps(alpha), "varmerge.sha256": mt_ref["sha256"]}
    with contextlib.redirect_stderr(io_.StringIO()):  # MLflow prints "Successfully registered ..."
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    tracking.finish(uri, child)
    return f"{name}/{version.version}"
