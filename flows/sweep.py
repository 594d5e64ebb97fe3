"""Ground truth: real multitask finetunes over a (coarser) α grid, and front-quality indicators
(hypervolume, IGD+) of every merge method's estimated front against it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.front import resolve_plan
from tasks import steps, tracking
from tasks.runner import PrefectRunner, task_pool
from varmerge import files, pareto, plots
from varmerge.grid import simplex_grid
from varmerge.plan import RunPlan


@flow(name="varmerge-ground-truth", task_runner=ThreadPoolTaskRunner(max_workers=1))
def ground_truth_flow(
    config: str | dict | RunPlan,
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
    ground-truth front. ``config``: a run plan, or a config to resolve one from (with
    ``tracking_uri``, ``output_dir`` and ``runner``, as :func:`flows.front.resolve_plan` does).
    """
    plan = resolve_plan(config, runner, tracking_uri=tracking_uri, output_dir=output_dir)
    with task_pool(plan.cfg.runner) as pool:
        runner_ = PrefectRunner(plan, pool)
        data_ref = runner_.data()
        theta0_ref = runner_.theta0(data_ref)
        alpha = simplex_grid(len(plan.tasks), spacing)
        get_run_logger().info("ground truth: %d multitask finetunes (spacing %s)", len(alpha), spacing)
        acc = torch.stack(runner_.multitasks(data_ref, theta0_ref, alpha))
    seconds = sum(r["seconds"] for r in runner_.multitask_refs.values())
    out = {"tasks": plan.task_names, "spacing": spacing, "alpha": alpha.tolist(), "accuracy": acc.tolist()}
    truth = pareto.front_summary(alpha, acc, reference=reference_point)
    out |= {"seconds": seconds, "reference_point": [reference_point] * len(plan.tasks)}
    out |= {"hypervolume": truth["hypervolume"], "max_mean_accuracy": truth["max_mean_accuracy"]}
    sweeps = main_run_sweeps(plan, data_ref, theta0_ref)
    out["methods"] = {m: compare(sw, alpha, acc, reference_point) for m, sw in sweeps.items()}
    _score_main_run(plan, out, acc)
    path = plan.run_dir / f"ground_truth_{spacing}.json"
    files.write_text_atomic(path, json.dumps(out, indent=2))
    if sweeps:
        title = f"{plan.cfg.name}: merged fronts vs multitask"
        front = pareto.pareto_mask(acc)
        plots.front_projections(
            sweeps,
            plan.task_names,
            plan.run_dir / "front_vs_ground_truth.png",
            multitask=acc[front].tolist(),
            title=title,
        )
    _log_ground_truth(plan, data_ref, out, path)
    return out


def main_run_sweeps(plan: RunPlan, data_ref: dict, theta0_ref: dict) -> dict[str, dict]:
    """The main flow's sweeps for the same inputs, if it ran (found by their keys: nothing trained)."""
    post_refs = [steps.find_posterior(plan, data_ref, theta0_ref, i) for i in range(len(plan.tasks))]
    if not all(post_refs):
        return {}
    found = {m: steps.find_sweep(plan, m, data_ref, theta0_ref, post_refs) for m in plan.method_names}
    return {m: steps.load_sweep(plan, ref) for m, ref in found.items() if ref is not None}


def compare(sweep: dict, alpha: torch.Tensor, acc: torch.Tensor, reference_point: float) -> dict:
    """A merged front against the ground truth: hypervolume, IGD+, max mean accuracy and, when
    every ground-truth α is on the merge grid, the α-map error (per-task error at the same α)."""
    truth_front = acc[pareto.pareto_mask(acc)]
    s = pareto.front_summary(sweep["alpha"], sweep["accuracy"], reference=reference_point, reference_front=truth_front)
    out = {k: s[k] for k in ("hypervolume", "igd_plus", "max_mean_accuracy")}
    try:  # at the same α: needs every ground-truth α on the merge grid
        out["alpha_map_error"] = pareto.alpha_map_error(sweep["alpha"], sweep["accuracy"], alpha, acc)
    except ValueError as exc:
        get_run_logger().info("no α-map error for %s: %s", sweep["method"], exc)
    return out


def _log_ground_truth(plan: RunPlan, data_ref: dict, out: dict, path: Path) -> None:
    uri, cfg = plan.tracking_uri, plan.cfg
    exp_id = tracking.experiment_id(uri, cfg.tracking.experiment, tracking.artifact_root(plan.run_dir))
    tags = {"varmerge.config": cfg.name, "varmerge.stage": "ground_truth", "varmerge.data_version": data_ref["version"]}
    run_id = tracking.client(uri).create_run(exp_id, run_name=f"{cfg.name}/ground-truth", tags=tags).info.run_id
    metrics = {"hypervolume": out["hypervolume"], "max_mean_accuracy": out["max_mean_accuracy"]}
    metrics |= {f"{m}/{k}": v for m, d in out["methods"].items() for k, v in d.items()}
    tracking.log_metrics(uri, run_id, metrics)
    tracking.log_artifact(uri, run_id, path, "ground_truth")
    tracking.finish(uri, run_id)


def _score_main_run(plan: RunPlan, out: dict, acc: torch.Tensor) -> None:
    """The main flow's front.json (if it finished) gets the selection regret of its chosen α and
    every method's α-map error; its MLflow parent run gets them as metrics."""
    front_json = plan.run_dir / "front.json"
    if not front_json.exists():
        return
    front = json.loads(front_json.read_text())
    scores = {m: {"alpha_map_error": d["alpha_map_error"]} for m, d in out["methods"].items() if "alpha_map_error" in d}
    if front.get("chosen") and front["chosen"].get("realised"):
        regret = pareto.selection_regret(acc, front["chosen"]["realised"], plan.objective)
        scores.setdefault(front["chosen"]["method"], {})["selection_regret"] = regret
        out["selection_regret"] = {"method": front["chosen"]["method"], **regret}
    for m, sc in scores.items():
        if m in front["methods"]:
            front["methods"][m].update(sc)
    front["ground_truth"] = {"spacing": out["spacing"], "max_mean_accuracy": out["max_mean_accuracy"]}
    files.write_text_atomic(front_json, json.dumps(front, indent=2))
    metrics = {f"{m}/alpha_map_error": sc["alpha_map_error"] for m, sc in scores.items() if "alpha_map_error" in sc}
    if "selection_regret" in out:
        metrics |= {f"chosen/selection_regret_{k}": v for k, v in out["selection_regret"].items() if k != "method"}
    if front.get("mlflow_run_id") and metrics:
        tracking.log_metrics(plan.tracking_uri, front["mlflow_run_id"], metrics)
        tracking.log_artifact(plan.tracking_uri, front["mlflow_run_id"], front_json, "front")
