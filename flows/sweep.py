"""Ground truth: real multitask finetunes over a (coarser) α grid, and front-quality indicators
(hypervolume, IGD+) of every merge method's estimated front against it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.front import resolve_config
from tasks import steps, tracking
from tasks.runner import Pool, PrefectRunner, task_pool
from varmerge import io, pareto, plots
from varmerge.grid import simplex_grid


@flow(name="varmerge-ground-truth", task_runner=ThreadPoolTaskRunner(max_workers=1))
def ground_truth_flow(
    config: str | dict,
    spacing: float = 0.1,
    tracking_uri: str | None = None,
    output_dir: str | None = None,
    reference_point: float = 0.0,
    runner: dict | None = None,
) -> dict:
    """Multitask finetunes at every α of a ``spacing`` grid; compares the merged fronts with it.

    Finetunes already done (by this flow or as the main flow's top-k) are reused. Where the main
    flow's sweeps exist for the same inputs (found by their content keys), each method gets
    hypervolume (reference point ``reference_point`` in every task) and IGD+ against the
    ground-truth front. ``runner`` replaces the config's ``runner`` section.
    """
    cfg = resolve_config(config, runner)
    with task_pool(cfg.runner) as pool:
        return _ground_truth(cfg, pool, spacing, tracking_uri, output_dir, reference_point)


def _ground_truth(cfg, pool: Pool, spacing: float, tracking_uri, output_dir, reference_point: float) -> dict:
    logger = get_run_logger()
    run_dir = Path(output_dir or cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in cfg.data.tasks]
    alpha = simplex_grid(len(names), spacing)
    runner = PrefectRunner(cfg, str(run_dir), pool)
    data_ref = runner.data()
    base_ref = runner.base(data_ref)
    logger.info("ground truth: %d multitask finetunes (spacing %s)", len(alpha), spacing)
    acc = torch.stack(runner.multitasks(data_ref, base_ref, alpha))
    mask = pareto.pareto_mask(acc)
    ref_point = [reference_point] * len(names)
    out = {
        "tasks": names,
        "spacing": spacing,
        "alpha": alpha.tolist(),
        "accuracy": acc.tolist(),
        "seconds": sum(r["seconds"] for r in runner.multitask_refs),
        "reference_point": ref_point,
        "hypervolume": pareto.hypervolume(acc, ref_point),
        "max_mean_accuracy": float(acc.mean(1).max()),
        "methods": {},
    }
    # the main flow's posteriors, if it ran: their references (finished files only, nothing trained)
    post_refs = [
        steps.find_posterior(runner.cfg_json, runner.run_dir, data_ref, base_ref, i) for i in range(len(names))
    ]
    sweeps = {}
    for m in cfg.merge.methods if all(post_refs) else []:
        found = steps.find_sweep(runner.cfg_json, runner.run_dir, m, data_ref, base_ref, post_refs)
        if found is not None:
            sweeps[m] = sw = steps.load_sweep(runner.run_dir, found)
            out["methods"][m] = {
                "hypervolume": pareto.hypervolume(sw["accuracy"], ref_point),
                "igd_plus": pareto.igd_plus(sw["accuracy"], acc[mask]),
                "max_mean_accuracy": float(sw["accuracy"].mean(1).max()),
            }
            try:  # at the same α: needs every ground-truth α on the merge grid
                out["methods"][m]["alpha_map_error"] = pareto.alpha_map_error(sw["alpha"], sw["accuracy"], alpha, acc)
            except ValueError as exc:
                logger.info("no α-map error for %s: %s", m, exc)
    _score_main_run(run_dir, out, acc, tracking_uri or cfg.tracking.uri or tracking.default_uri(run_dir))
    path = run_dir / f"ground_truth_{spacing}.json"
    io.write_text_atomic(path, json.dumps(out, indent=2))
    if sweeps:
        plots.front_projections(
            sweeps,
            names,
            run_dir / "front_vs_ground_truth.png",
            multitask=acc[mask].tolist(),
            title=f"{cfg.name}: merged fronts vs multitask",
        )
    uri = tracking_uri or cfg.tracking.uri or tracking.default_uri(run_dir)
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, tracking.artifact_root(run_dir))
    run = tracking.client(uri).create_run(
        exp_id,
        run_name=f"{cfg.name}/ground-truth",
        tags={
            "varmerge.config": cfg.name,
            "varmerge.stage": "ground_truth",
            "varmerge.data_version": data_ref["version"],
        },
    )
    rid = run.info.run_id
    tracking.log_metrics(
        uri,
        rid,
        {
            "hypervolume": out["hypervolume"],
            "max_mean_accuracy": out["max_mean_accuracy"],
            **{f"{m}/{k}": v for m, d in out["methods"].items() for k, v in d.items()},
        },
    )
    tracking.log_artifact(uri, rid, path, "ground_truth")
    tracking.finish(uri, rid)
    return out


def _score_main_run(run_dir: Path, out: dict, acc: torch.Tensor, uri: str) -> None:
    """The main flow's front.json (if it finished) gets the selection regret of its chosen α and
    every method's α-map error; its MLflow parent run gets them as metrics."""
    front_json = run_dir / "front.json"
    if not front_json.exists():
        return
    front = json.loads(front_json.read_text())
    scores = {m: {"alpha_map_error": d["alpha_map_error"]} for m, d in out["methods"].items() if "alpha_map_error" in d}
    if front.get("chosen") and front["chosen"].get("realised"):
        regret = pareto.selection_regret(acc, front["chosen"]["realised"])
        scores.setdefault(front["chosen"]["method"], {})["selection_regret"] = regret
        out["selection_regret"] = {"method": front["chosen"]["method"], **regret}
    for m, sc in scores.items():
        if m in front["methods"]:
            front["methods"][m].update(sc)
    front["ground_truth"] = {"spacing": out["spacing"], "max_mean_accuracy": out["max_mean_accuracy"]}
    io.write_text_atomic(front_json, json.dumps(front, indent=2))
    metrics = {f"{m}/alpha_map_error": sc["alpha_map_error"] for m, sc in scores.items() if "alpha_map_error" in sc}
    if "selection_regret" in out:
        metrics |= {f"chosen/selection_regret_{k}": v for k, v in out["selection_regret"].items() if k != "method"}
    if front.get("mlflow_run_id") and metrics:
        tracking.log_metrics(uri, front["mlflow_run_id"], metrics)
        tracking.log_artifact(uri, front["mlflow_run_id"], front_json, "front")
