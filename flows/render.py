"""What the ``varmerge`` commands print: the fronts, the chosen α (predicted against realised) and
the closed-loop search, as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def print_front(summary: dict, spacing: float) -> None:
    """The per-method table and predicted vs realised at the chosen α."""
    table = Table(title=f"estimated fronts ({summary['grid_size']} α, spacing {spacing})")
    for col in ("method", "max mean acc", "best α", "front size", "sweep s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, r in summary["methods"].items():
        table.add_row(
            m,
            f"{100 * r['max_mean_accuracy']:.1f}",
            str([round(v, 2) for v in r["best_alpha"]]),
            str(r["front_size"]),
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    if summary.get("search"):
        print_search(summary["search"])
    ch = summary["chosen"]
    if summary.get("search"):  # the incumbent only: the other finetunes are in the search table
        ch = {**ch, **{k: ch[k][:1] for k in ("alpha", "predicted", "realised")}}
    for a, pred, real in zip(ch["alpha"], ch["predicted"], ch["realised"], strict=True):
        cmp = Table(title=f"α {[round(v, 2) for v in a]} chosen by '{ch['method']}': predicted vs realised")
        for col in ("task", "predicted (merged)", "realised (multitask finetune)"):
            cmp.add_column(col, justify="left" if col == "task" else "right")
        for n, p, r in zip(summary["tasks"], pred, real, strict=True):
            cmp.add_row(n, f"{100 * p:.1f}", f"{100 * r:.1f}")
        cmp.add_row("mean", f"{100 * sum(pred) / len(pred):.1f}", f"{100 * sum(real) / len(real):.1f}")
        console.print(cmp)


def print_search(search: list[dict]) -> None:
    """The closed-loop search, one row per finetune: where, predicted, realised, incumbent."""
    table = Table(title=f"closed-loop search: {sum(len(it['alpha']) for it in search)} multitask finetunes")
    for col in ("iteration", "α", "predicted mean", "expected gain", "realised mean", "incumbent"):
        table.add_column(col, justify="right")
    for i, it in enumerate(search, start=1):
        for a, p, g, r in zip(it["alpha"], it["predicted_mean"], it["expected_improvement"], it["realised"]):
            gain = "prior's best" if g is None else f"{100 * g:.2f}"
            inc = "-" if it["incumbent_mean"] is None else f"{100 * it['incumbent_mean']:.1f}"
            real = f"{100 * sum(r) / len(r):.1f}"
            table.add_row(str(i), str([round(v, 2) for v in a]), f"{100 * p:.1f}", gain, real, inc)
    console.print(table)


def print_plan(plan, title: str) -> None:
    """What a run of ``plan`` would do (``varmerge validate``)."""
    from varmerge.grid import grid_size

    cfg = plan.cfg
    table = Table(title=title, show_header=False)
    table.add_row("tasks", ", ".join(f"{t.name} {t.classes or t.domain}" for t in cfg.data.tasks))
    table.add_row("data", f"{cfg.data.source} (seed {cfg.data.seed}, test {cfg.data.test_fraction})")
    table.add_row("model", cfg.model.name)
    table.add_row("posterior", f"{cfg.posterior.method} ({cfg.posterior.steps} steps)")
    table.add_row("merges", ", ".join(plan.method_names))
    table.add_row("α grid", f"spacing {cfg.merge.spacing}: {grid_size(len(plan.tasks), cfg.merge.spacing)} points")
    sel = cfg.selection
    if sel.strategy == "closed_loop":
        priors = ", ".join(plan.prior_methods)
        how = f"closed loop: up to {sel.budget} multitask finetunes, {sel.batch} at a time (prior {priors})"
    else:
        how = f"top {sel.top_k} α of {plan.selection_method}'s front"
    table.add_row("selection", how)
    rc = cfg.runner
    local = f"a local Dask cluster of {rc.local_workers} workers"
    table.add_row("runner", "the flow's thread" if rc.kind == "thread" else rc.address or local)
    if plan.num_classes is not None:
        sizes = ", ".join(f"{t.name} {t.train_examples}/{t.test_examples}" for t in plan.tasks)
        table.add_row("examples", f"{sizes} (train/test)")
    console.print(table)


def print_fronts(summary: dict) -> None:
    """Each method's Pareto front, one row per point (``varmerge front``)."""
    for m, d in summary["methods"].items():
        t = Table(title=f"{m}: Pareto front ({d['front_size']} points)")
        for n in ["α", *summary["tasks"]]:
            t.add_column(n, justify="right")
        for a, acc in zip(d["front"]["alpha"], d["front"]["accuracy"], strict=True):
            t.add_row(str([round(v, 2) for v in a]), *[f"{100 * v:.1f}" for v in acc])
        console.print(t)


def print_ground_truth(out: dict) -> None:
    """The ground truth's table: every method's front quality against the real finetunes."""
    n = len(out["alpha"])
    table = Table(title=f"ground truth: {n} multitask finetunes, max mean acc {100 * out['max_mean_accuracy']:.1f}")
    for col in ("method", "max mean acc", "hypervolume", "IGD+"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("multitask (truth)", f"{100 * out['max_mean_accuracy']:.1f}", f"{out['hypervolume']:.4f}", "0")
    for m, d in out["methods"].items():
        table.add_row(m, f"{100 * d['max_mean_accuracy']:.1f}", f"{d['hypervolume']:.4f}", f"{d['igd_plus']:.4f}")
    console.print(table)
