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
from tasks.runner import PrefectRunner
from varmerge import io, pareto, plots
from varmerge.grid import simplex_grid


@flow(name="varmerge-ground-truth", task_runner=ThreadPoolTaskRunner(max_workers=1))
def ground_truth_flow(
    config: str | dict,
    spacing: float = 0.1,
    tracking_uri: str | None = None,
    output_dir: str | None = None,
    reference_point: float = 0.0,
) -> dict:
    """Multitask finetunes at every α of a ``spacing`` grid; compares the merged fronts with it.

    Finetunes already done (by this flow or as the main flow's top-k) are reused. Where the main
    flow's sweeps exist for the same inputs (found by their content keys), each method gets
    hypervolume (reference point ``reference_point`` in every task) and IGD+ against the
    ground-truth front.
    """
    cfg = resolve_config(config)
    logger = get_run_logger()
    run_dir = Path(output_dir or cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in cfg.data.tasks]
    alpha = simplex_grid(len(names), spacing)
    runner = PrefectRunner(cfg, str(run_dir))
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
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, run_dir.parent / "mlartifacts")
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
