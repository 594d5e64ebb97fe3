"""The main flow: per-task finetunes → posteriors → α sweeps per merge method → front → α →
multitask finetune at the top-k α, with everything logged to MLflow.

Run it with ``varmerge run CONFIG`` (Prefect's ephemeral API, MLflow in a local SQLite store) or
as the ``front`` deployment of ``prefect.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import steps, tracking
from tasks.faults import fault_point
from varmerge import io, pareto, plots
from varmerge.config import ExperimentConfig, load_config, parse_config

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _resolve(config: str | dict | ExperimentConfig) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config, "<flow parameter>")
    return load_config(config)


@flow(name="varmerge-front", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def front_flow(config: str | dict, tracking_uri: str | None = None, output_dir: str | None = None,
               data_dir: str | None = None, check_inputs: bool = True) -> dict:
    """Estimate the Pareto front of ``config`` and finetune at the chosen α; returns the summary.

    ``check_inputs`` runs :func:`varmerge.preflight.preflight` first, so a run that would fail
    (bad data, model, tracking store, ...) writes nothing; ``varmerge run`` has already done it.
    """
    cfg = _resolve(config)
    logger = get_run_logger()
    if check_inputs:
        from varmerge.preflight import preflight

        preflight(cfg, tracking_uri, output_dir=output_dir, data_dir=data_dir)
    run_dir = Path(output_dir or cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    uri = tracking_uri or cfg.tracking.uri or tracking.default_uri(run_dir)
    names = [t.name for t in cfg.data.tasks]

    data_ref = steps.prepare_data(cfg_json, str(run_dir), data_dir)
    flow_run_id = str(get_run_context().flow_run.id)
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, run_dir.parent / "mlartifacts")
    for stale in tracking.close_stale_runs(uri, exp_id, cfg.name):
        logger.info("MLflow run %s was left RUNNING by a killed flow: marked KILLED", stale)
    parent = tracking.client(uri).create_run(exp_id, run_name=f"{cfg.name}", tags={
        "varmerge.flow_run_id": flow_run_id, "varmerge.data_version": data_ref.get("version", data_ref["sha256"][:16]),
        "varmerge.config": cfg.name, "varmerge.process": tracking.process_tag(),
    }).info.run_id
    tracking.log_params(uri, parent, {"config": cfg_json})
    try:
        base_ref = steps.base_model(cfg_json, str(run_dir), data_ref)
        post_refs = steps.finetune.map(
            unmapped(cfg_json), unmapped(str(run_dir)), unmapped(data_ref), unmapped(base_ref),
            list(range(len(names))), tracking_uri=unmapped(uri), parent_run_id=unmapped(parent),
        ).result()
        sweep_futs = {m: steps.sweep.submit(cfg_json, str(run_dir), m, data_ref, base_ref, post_refs,
                                            tracking_uri=uri, parent_run_id=parent)
                      for m in cfg.merge.methods}
        sweeps = {m: steps.load_sweep(f.result()) for m, f in sweep_futs.items()}

        method = cfg.selection.method or cfg.merge.methods[-1]
        alpha = sweeps[method]["alpha"]
        front_files = {
            "fronts": plots.front_projections(sweeps, names, run_dir / "front.png", title=cfg.name),
        }
        if len(names) == 3:
            front_files["ternary"] = plots.ternary_mean_accuracy(sweeps, names, run_dir / "ternary.png")
        cons = [(names.index(c.task), c.op, c.value) for c in cfg.selection.constraints]
        try:
            idx, chosen = pareto.select_alpha(alpha, sweeps[method]["accuracy"], k=cfg.selection.top_k,
                                              constraints=cons, task_names=names)
        except ValueError as exc:  # the front is still saved and logged
            front_json = run_dir / "front.json"
            io.write_text_atomic(front_json, json.dumps(
                _summary(cfg, names, sweeps, run_dir, parent, uri, method, chosen=None) | {"error": str(exc)},
                indent=2))
            for p in [front_json, *front_files.values()]:
                tracking.log_artifact(uri, parent, p, "front")
            raise ValueError(f"{exc} (the estimated front is in {front_json})") from None

        mt_refs = steps.multitask.map(
            unmapped(cfg_json), unmapped(str(run_dir)), unmapped(data_ref), unmapped(base_ref),
            [a.tolist() for a in chosen], tracking_uri=unmapped(uri), parent_run_id=unmapped(parent),
        ).result()
        predicted = sweeps[method]["accuracy"][idx].tolist()
        realised = [r["accuracy"] for r in mt_refs]
        front_files["fronts"] = plots.front_projections(sweeps, names, run_dir / "front.png", title=cfg.name,
                                                        multitask=realised)
        front_files["predicted_vs_realised"] = plots.predicted_vs_realised(
            names, predicted[0], realised[0], run_dir / "predicted_vs_realised.png")

        summary = _summary(cfg, names, sweeps, run_dir, parent, uri, method, chosen={
            "method": method, "alpha": chosen.tolist(), "predicted": predicted, "realised": realised})
        # register first, then write front.json (atomically, once): it exists only for a finished run
        summary["registered_model"] = _register(cfg, uri, parent, mt_refs[0], base_ref, data_ref,
                                                chosen[0].tolist())
        front_json = run_dir / "front.json"
        io.write_text_atomic(front_json, json.dumps(summary, indent=2))
        tracking.log_metrics(uri, parent, {
            **{f"{m}/max_mean_accuracy": s["max_mean_accuracy"] for m, s in summary["methods"].items()},
            "chosen/predicted_mean": sum(predicted[0]) / len(names),
            "chosen/realised_mean": sum(realised[0]) / len(names),
        })
        for p in [front_json, *front_files.values()]:
            tracking.log_artifact(uri, parent, p, "front")
        tracking.finish(uri, parent)
        logger.info("front written to %s (MLflow run %s)", front_json, parent)
        return summary
    except BaseException:
        tracking.finish(uri, parent, "FAILED")
        raise


def _summary(cfg: ExperimentConfig, names: list, sweeps: dict, run_dir: Path, parent: str, uri: str, method: str,
             chosen: dict | None) -> dict:
    """front.json: per-method fronts and the chosen α (None when no α met the constraints)."""
    summary = {"config": cfg.name, "tasks": names, "grid_size": len(sweeps[method]["alpha"]),
               "spacing": cfg.merge.spacing, "run_dir": str(run_dir), "mlflow_run_id": parent, "tracking_uri": uri,
               "methods": {}, "chosen": chosen}
    for m, sw in sweeps.items():
        mean = sw["accuracy"].mean(1)
        b = int(mean.argmax())
        mask = pareto.pareto_mask(sw["accuracy"])
        summary["methods"][m] = {
            "max_mean_accuracy": float(mean[b]), "best_alpha": sw["alpha"][b].tolist(),
            "front_size": int(mask.sum()), "seconds": sw["seconds"],
            "front": {"alpha": sw["alpha"][mask].tolist(), "accuracy": sw["accuracy"][mask].tolist()},
        }
    return summary


def _register(cfg: ExperimentConfig, uri: str, parent: str, mt_ref: dict, base_ref: dict, data_ref: dict,
              alpha: list) -> str:
    """Log the multitask model in a nested run and register it with α as a tag.

    Idempotent: a READY version already registered for the same weights (tag ``varmerge.sha256``,
    the multitask file's content hash) is reused, so a re-run or a resumed run never registers the
    same model twice. A version is created only after its model artifact is fully logged.
    """
    import mlflow
    import mlflow.pytorch

    name = f"varmerge-{cfg.name}"
    existing = tracking.find_model_version(uri, name, mt_ref["sha256"])
    if existing is not None:
        return f"{name}/{existing.version}"
    child = tracking.start_child(uri, parent, "multitask/final", {
        "varmerge.stage": "multitask", "varmerge.alpha": json.dumps([round(a, 6) for a in alpha])})
    model = steps.multitask_model(cfg, mt_ref, base_ref)
    example = steps.example_input(cfg, data_ref)
    tracking.log_metrics(uri, child, {f"test/{t.name}/accuracy": a
                                      for t, a in zip(cfg.data.tasks, mt_ref["accuracy"], strict=True)})
    if example is None:  # text models: the weights file is the artifact; no registry entry yet
        tracking.log_artifact(uri, child, Path(mt_ref["path"]), "model")
        tracking.finish(uri, child)
        return f"(not registered: text model; weights logged in run {child})"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=child):
        # pt2 (torch.export), never pickle: also where MLflow would default to pickle (Databricks)
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                        pip_requirements=["torch", "varmerge"])
    fault_point("register")
    version = mlflow.register_model(info.model_uri, name, tags={"alpha": json.dumps(alpha),
                                                                 "varmerge.sha256": mt_ref["sha256"]})
    tracking.finish(uri, child)
    return f"{name}/{version.version}"
