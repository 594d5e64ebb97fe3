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
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import steps, tracking
from tasks.runner import PrefectRunner, task_pool
from varmerge import files, pareto, plots
from varmerge.config import load_config, parse_config, with_runner
from varmerge.plan import RunPlan
from varmerge.search import Calibrated
from varmerge.sequence import FrontResult, estimate_front

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def resolve_plan(config: str | dict | RunPlan, runner: dict | None = None, **where: str | None) -> RunPlan:
    """The plan a flow runs. A :class:`RunPlan` (``varmerge run`` resolved it) is used as is; a
    config path or mapping (a deployment's parameter) is read and validated once, its ``runner``
    section replaced by ``runner`` if given, and checked by preflight with ``where`` (its
    ``tracking_uri``, ``output_dir`` and ``data_dir``), so a run that would fail (bad data, model,
    tracking store, ...) writes nothing."""
    from varmerge.preflight import preflight

    given = [k for k, v in where.items() if v is not None] + (["runner"] if runner is not None else [])
    if isinstance(config, RunPlan):
        if given:
            raise ValueError(f"{given[0]} is part of the run plan: pass a config to change it")
        return config
    cfg = parse_config(config, "<flow parameter>") if isinstance(config, dict) else load_config(config)
    if runner is not None:
        cfg = with_runner(cfg, runner, "<runner parameter>")
    return preflight(cfg, **where, config_file=None if isinstance(config, dict) else config)


@flow(name="varmerge-front", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def front_flow(
    config: str | dict | RunPlan,
    tracking_uri: str | None = None,
    output_dir: str | None = None,
    data_dir: str | None = None,
    runner: dict | None = None,
) -> dict:
    """Estimate the Pareto front of ``config`` (a run plan, or a config to resolve one from: see
    :func:`resolve_plan`) and finetune at the chosen α; returns the summary. ``runner`` replaces
    the config's ``runner`` section (where the tasks run: thread or Dask)."""
    plan = resolve_plan(config, runner, tracking_uri=tracking_uri, output_dir=output_dir, data_dir=data_dir)
    with task_pool(plan.cfg.runner) as pool:
        get_run_logger().info("tasks run on %s", pool.description)
        runner_ = PrefectRunner(plan, pool)
        data_ref = runner_.data()
        with parent_run(plan, data_ref) as parent:
            runner_.parent = parent
            result = estimate_front(runner_)
            return report(plan, runner_, result)


@contextlib.contextmanager
def parent_run(plan: RunPlan, data_ref: dict) -> Iterator[tracking.Parent]:
    """The flow run's MLflow parent run (runs a killed flow left RUNNING are closed first):
    FINISHED when the block ends, FAILED when it raises."""
    logger, uri, cfg = get_run_logger(), plan.tracking_uri, plan.cfg
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, tracking.artifact_root(plan.run_dir))
    for stale, flow_run_id in tracking.close_stale_runs(uri, exp_id, cfg.name):
        logger.info("MLflow run %s was left RUNNING by a killed flow: marked KILLED", stale)
        if flow_run_id and mark_crashed(flow_run_id):
            logger.info("Prefect flow run %s of that killed flow: marked Crashed", flow_run_id)
    tags = {
        "varmerge.flow_run_id": str(get_run_context().flow_run.id),
        "varmerge.data_version": data_ref["version"],
        "varmerge.config": cfg.name,
        "varmerge.process": tracking.process_tag(),
    }
    run_id = tracking.client(uri).create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
    tracking.log_params(uri, run_id, {"config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True)})
    try:
        yield tracking.Parent(uri, run_id)
    except BaseException:
        tracking.finish(uri, run_id, "FAILED")
        raise
    tracking.finish(uri, run_id)


def report(plan: RunPlan, runner: PrefectRunner, result: FrontResult) -> dict:
    """Save and log what the run found: front.json, the plots, the front table and metrics in the
    parent run, and the registered model of the chosen α (registered before front.json is
    written: the file exists only for a finished run). A result without a chosen α (constraints
    nobody meets) still saves and logs the front, then raises."""
    parent, run_dir = runner.parent, plan.run_dir
    cal = result.calibrated()  # once: front.json and the figure
    summary = {
        "config": plan.cfg.name,
        **result.summary(cal),
        "spacing": plan.cfg.merge.spacing,
        "run_dir": str(run_dir),
        "config_file": plan.config_file,
        "mlflow_run_id": parent.run_id,
        "tracking_uri": plan.tracking_uri,
    }
    figures = front_figures(plan, result, cal)
    tracking.log_table(parent.uri, parent.run_id, front_table(result.sweeps, plan.task_names), "front/front_table.json")
    if result.error is not None:
        _save_front(plan, summary, figures)
        raise ValueError(f"{result.error} (the estimated front is in {run_dir / 'front.json'})")
    figures.append(
        plots.predicted_vs_realised(
            plan.task_names,
            result.predicted[0].tolist(),
            result.realised[0].tolist(),
            run_dir / "predicted_vs_realised.png",
            defaults={n: acc.tolist() for n, acc in result.realised_defaults.items()},
        )
    )
    summary["registered_model"] = register_model(plan, runner, result.chosen_alpha[0])
    log_chosen(plan, parent, summary, result)
    _save_front(plan, summary, figures)
    get_run_logger().info("front written to %s (MLflow run %s)", run_dir / "front.json", parent.run_id)
    return summary


def front_figures(plan: RunPlan, result: FrontResult, cal: Calibrated) -> list[Path]:
    """The front's projections (real finetunes as circles, the default α's predicted scores on the
    selection method's front as labelled markers), the calibrated front per task with its
    intervals and the real finetunes, and, for three tasks, the ternary map of the objective with
    the default α marked."""
    names, run_dir = plan.task_names, plan.run_dir
    realised = result.realised.tolist() if result.realised is not None else []
    realised += [acc.tolist() for acc in result.realised_defaults.values()]
    rows, acc = result.default_rows, result.sweeps[result.method]["accuracy"]
    figures = [
        plots.front_projections(
            result.sweeps,
            names,
            run_dir / "front.png",
            title=plan.cfg.name,
            multitask=realised,
            defaults={n: acc[r].tolist() for n, r in rows.items()},
        )
    ]
    figures.append(
        plots.calibrated_front(
            names,
            result.alpha.numpy(),
            result.sweeps[result.method]["accuracy"].numpy(),
            cal,
            run_dir / "calibrated.png",
            realised={r: acc.tolist() for r, acc in result.realised_rows().items()},
            title=f"{plan.cfg.name}: {cal.source}",
        )
    )
    if len(names) == 3:
        figures.append(
            plots.ternary_mean_accuracy(
                result.sweeps,
                names,
                run_dir / "ternary.png",
                objective=plan.objective,
                label=plan.objective.label,
                defaults={n: result.alpha[r].tolist() for n, r in rows.items()},
            )
        )
    return figures


def _save_front(plan: RunPlan, summary: dict, figures: list[Path]) -> None:
    """front.json (atomically) and the figures, written and logged to the parent run."""
    front_json = plan.run_dir / "front.json"
    files.write_text_atomic(front_json, json.dumps(portable(summary, plan.run_dir), indent=2))
    for p in [front_json, *figures]:
        tracking.log_artifact(plan.tracking_uri, summary["mlflow_run_id"], p, "front")


def log_chosen(plan: RunPlan, parent: tracking.Parent, summary: dict, result: FrontResult) -> None:
    """The parent run's metrics (per method; predicted and realised at the chosen α and at the
    default α; the gain over pooled; the verdict's gains; the search's incumbent per step) and
    tags (the chosen method, α, predicted and realised; each default's α; the verdicts of the
    fronts and of the real finetunes)."""
    names, predicted, realised, obj = plan.task_names, result.predicted[0], result.realised[0], plan.objective
    methods = {
        f"{m}/{k}": s[k]
        for m, s in summary["methods"].items()
        for k in ("max_mean_accuracy", "max_objective", "hypervolume", "front_size")
    }
    chosen = {
        "chosen/predicted_mean": float(predicted.mean()),
        "chosen/realised_mean": float(realised.mean()),
        "chosen/predicted_objective": float(obj(predicted)),
        "chosen/realised_objective": float(obj(realised)),
        **{f"chosen/predicted/{n}": float(v) for n, v in zip(names, predicted, strict=True)},
        **{f"chosen/realised/{n}": float(v) for n, v in zip(names, realised, strict=True)},
    }
    for kind, g in summary["chosen"]["gain_over_pooled"].items():
        chosen[f"chosen/{kind}_gain_over_pooled"] = g["objective"]
    defaults = {}
    for name, d in summary["defaults"].items():
        pred = d["predicted"][result.method]
        defaults[f"defaults/{name}/predicted_objective"] = pred["objective"]
        defaults |= {f"defaults/{name}/predicted/{n}": v for n, v in zip(names, pred["accuracy"], strict=True)}
        if "realised" in d:
            defaults[f"defaults/{name}/realised_objective"] = d["realised"]["objective"]
            defaults |= {
                f"defaults/{name}/realised/{n}": v for n, v in zip(names, d["realised"]["accuracy"], strict=True)
            }
    gains = {f"verdict/gain/{m}": g for m, g in summary["verdict"]["gains"].items()}
    metrics = {**methods, **chosen, **defaults, **gains, **_trust_metrics(summary, names)}
    tracking.log_metrics(parent.uri, parent.run_id, metrics)
    for i, it in enumerate(result.search or [], start=1):  # the UI plots the search by step
        point = {"search/best_realised_objective": max(float(obj(torch.tensor(r))) for r in it["realised"])}
        if it["incumbent_objective"] is not None:
            point["search/incumbent_objective"] = it["incumbent_objective"]
        tracking.log_metrics(parent.uri, parent.run_id, point, step=i)
    tags = {
        "alpha": [round(a, 6) for a in result.chosen_alpha[0].tolist()],
        "predicted": [round(float(v), 6) for v in predicted],
        "realised": [round(float(v), 6) for v in realised],
    }
    tags = {f"varmerge.chosen.{k}": json.dumps(v) for k, v in tags.items()}
    tags |= {
        f"varmerge.defaults.{n}.alpha": json.dumps([round(a, 6) for a in d["alpha"]])
        for n, d in summary["defaults"].items()
    }
    verdict = summary["verdict"]
    tags |= {"varmerge.verdict": verdict["message"], "varmerge.verdict.matters": json.dumps(verdict["matters"])}
    if "realised_verdict" in summary:  # the real finetunes' word (and, in a closed loop, whether it settled)
        real = summary["realised_verdict"]
        tags |= {
            "varmerge.realised_verdict": real["message"],
            "varmerge.realised_verdict.matters": json.dumps(real["matters"]),
        }
    tags |= {"varmerge.objective": obj.kind}
    tracking.set_tags(parent.uri, parent.run_id, {**tags, "varmerge.chosen.method": result.method})


LEARNED = ("accuracy", "theta0", "chance")


def _trust_metrics(summary: dict, names: list[str]) -> dict[str, float]:
    """The calibrated prediction at the chosen α and its interval, per task; and the gate's
    scores: each finetune on its own test set, θ0 there, chance."""
    calibrated = {
        f"calibrated/{n}/{k}": v
        for k, values in (summary["chosen"].get("calibrated") or {}).items()
        for n, v in zip(names, values, strict=True)
    }
    learned = {
        f"gate/{n}/{k}": t[k] for n, t in (summary.get("learning") or {}).get("tasks", {}).items() for k in LEARNED
    }
    return calibrated | learned


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


def portable(summary: dict, run_dir: Path) -> dict:
    """front.json's content: the summary without machine-specific paths. ``run_dir`` is where the
    file lies, and a SQLite tracking store and the config file are given relative to it
    (``sqlite:///../mlflow.db``), so
    the same run on another machine or folder writes the same file (``dvc metrics diff`` compares
    them across revisions)."""
    out = {k: v for k, v in summary.items() if k != "run_dir"}
    uri = str(summary.get("tracking_uri", ""))
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_absolute():
        out["tracking_uri"] = "sqlite:///" + os.path.relpath(uri.removeprefix("sqlite:///"), run_dir.resolve())
    if summary.get("config_file"):  # relative too: the run's owner, checked by preflight.check_run_owner
        out["config_file"] = os.path.relpath(summary["config_file"], run_dir.resolve())
    return out


def register_model(plan: RunPlan, runner: PrefectRunner, alpha) -> str:
    """Log the runner's multitask model at the chosen ``alpha`` in a nested run and register it
    with α as a tag.

    Idempotent: a READY version already registered for the same weights (tag ``varmerge.sha256``,
    the multitask file's content hash) is reused, so a re-run or a resumed run never registers the
    same model twice. A version is created only after its model artifact is fully logged.
    """
    mt_ref = runner.multitask_ref(alpha)
    with steps.store_for(plan.run_dir).lock(
        f"register-{mt_ref['sha256'][:20]}"
    ):  # one version, also when two runs race
        return _register(plan, runner, mt_ref, f"varmerge-{plan.cfg.name}")


def _register(plan: RunPlan, runner: PrefectRunner, mt_ref: dict, name: str) -> str:
    import mlflow

    uri, parent = plan.tracking_uri, runner.parent
    existing = tracking.find_model_version(uri, name, mt_ref["sha256"])
    if existing is not None:
        return f"{name}/{existing.version}"
    alpha = list(mt_ref["alpha"])
    tags = {"varmerge.stage": "multitask", "varmerge.alpha": json.dumps([round(a, 6) for a in alpha])}
    with tracking.child_run(parent, "multitask/final", tags) as child:
        accuracy = {f"test/{n}/accuracy": a for n, a in zip(plan.task_names, mt_ref["accuracy"], strict=True)}
        tracking.log_metrics(uri, child, accuracy)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=child):
            info = log_model(plan, runner, mt_ref)
        model_tags = {"alpha": json.dumps(alpha), "varmerge.sha256": mt_ref["sha256"]}
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered ..."
            version = mlflow.register_model(info.model_uri, name, tags=model_tags)
    return f"{name}/{version.version}"


def log_model(plan: RunPlan, runner: PrefectRunner, mt_ref: dict):
    """The multitask model in the active MLflow run: image models as ``pt2`` (torch.export, never
    pickle), text models as the pyfunc of ``tasks/text_model.py`` (:func:`log_text_model`)."""
    import mlflow.pytorch

    example = steps.example_input(plan, runner.data_ref)
    if example is not None:
        model = steps.multitask_model(plan, mt_ref, runner.theta0_ref)
        return mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            serialization_format="pt2",
            pip_requirements=["torch", "varmerge"],
        )
    from varmerge import models, pipeline

    model = steps.multitask_model(plan, mt_ref, runner.theta0_ref)
    tokenizer = models.text_tokenizer(pipeline.model_path(plan.cfg))
    labels = steps.class_names(plan, runner.data_ref)
    examples = steps.example_texts(plan, runner.data_ref)
    return log_text_model(model, tokenizer, labels, plan.cfg.data.max_length, examples)


def log_text_model(model, tokenizer, labels: list[str], max_length: int, examples: list[str]):
    """Log a text classifier in the active MLflow run as the pyfunc of ``tasks/text_model.py``:
    its code (MLflow's models-from-code, no pickle) and the classifier as a plain Hugging Face
    folder (:func:`varmerge.models.export_text_classifier`), so the registered model loads with
    torch and transformers alone (its requirements, pinned to this environment's versions). Its
    signature comes from ``predict``'s type hints (a list of texts in, a label name and
    probabilities by label name out); ``examples`` (texts of the user's test data) is its input
    example."""
    import importlib.metadata
    import importlib.util
    import tempfile

    import mlflow

    from varmerge import models

    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "transformers", "safetensors", "pydantic")]
    with tempfile.TemporaryDirectory() as tmp, models.quiet_transformers():  # MLflow loads it to check the example
        folder = models.export_text_classifier(
            model, tokenizer, labels, Path(tmp) / "classifier", max_length=max_length
        )
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=importlib.util.find_spec("tasks.text_model").origin,
            artifacts={"classifier": str(folder)},
            input_example=list(examples),
            pip_requirements=pins,
        )
