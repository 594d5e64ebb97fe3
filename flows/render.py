"""What the ``varmerge`` commands print: the fronts, the chosen α (predicted against realised) and
the closed-loop search, as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def print_front(summary: dict, spacing: float) -> None:
    """The per-method table, the chosen α beside the free defaults (predicted and realised), the
    gain over pooled data and the verdict."""
    label = summary["objective"]["label"]
    table = Table(title=f"estimated fronts ({summary['grid_size']} α, spacing {spacing})")
    for col in ("method", f"best {label}", "at pooled α", "best α", "front size", "sweep s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    pooled = summary["defaults"]["pooled"]["predicted"]
    for m, r in summary["methods"].items():
        table.add_row(
            m,
            f"{100 * r['max_objective']:.1f}",
            f"{100 * pooled[m]['objective']:.1f}",
            _alpha(r["best_alpha"]),
            str(r["front_size"]),
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    if summary.get("search"):
        print_search(summary["search"], label)
    if summary.get("chosen"):
        print_choice(summary)
    if (summary.get("learning") or {}).get("failed"):
        console.print(f"[yellow]warning:[/] {escape(summary['learning']['message'])}", soft_wrap=True)
    console.print(summary["verdict"]["message"])
    if "realised_verdict" in summary:
        console.print(summary["realised_verdict"]["message"])


def _alpha(a) -> str:
    return " ".join(f"{v:.2f}" for v in a)


def _cell(predicted: float, realised: float | None) -> str:
    return f"{100 * predicted:.1f}" + ("" if realised is None else f" → {100 * realised:.1f}")


def print_choice(summary: dict) -> None:
    """The chosen α (the incumbent, for a closed loop) and the defaults: the selection method's
    predicted scores → the real multitask finetune's, where one ran."""
    ch, names, label = summary["chosen"], summary["tasks"], summary["objective"]["label"]
    method = ch["method"]
    table = Table(title=f"chosen α ('{method}') and the defaults: predicted (merged) → realised (multitask finetune)")
    for col in ("candidate", "α", *names, label):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    k = 1 if summary.get("search") else len(ch["alpha"])  # a search's other finetunes are in its table
    realised = ch["realised"] or [None] * k
    for i in range(k):
        real = realised[i]
        cells = [_cell(p, None if real is None else r) for p, r in zip(ch["predicted"][i], real or ch["predicted"][i])]
        obj = _cell(ch["predicted_objective"][i], None if real is None else ch["realised_objective"][i])
        table.add_row("chosen" if k == 1 else f"chosen #{i + 1}", _alpha(ch["alpha"][i]), *cells, obj)
    for name, d in summary["defaults"].items():
        pred, real = d["predicted"][method], d.get("realised")
        cells = [_cell(p, None if real is None else r) for p, r in zip(pred["accuracy"], (real or pred)["accuracy"])]
        obj = _cell(pred["objective"], None if real is None else real["objective"])
        table.add_row(name, _alpha(d["alpha"]), *cells, obj)
    console.print(table)
    if ch["realised"]:
        off = sum(abs(p - r) for p, r in zip(ch["predicted"][0], ch["realised"][0], strict=True)) / len(names)
        line = f"the merged front's prediction at the chosen α is off by {100 * off:.1f} points per task"
        if off > 0.03:
            pairs = list(zip(names, ch["predicted"][0], ch["realised"][0], strict=True))
            n, p, r = max(pairs, key=lambda x: abs(x[1] - x[2]))
            line += (
                f", most on {n} (predicted {100 * p:.1f}, realised {100 * r:.1f}): more than 3, so read the front as "
                "a ranking of α, not as scores; the realised finetunes are the result"
            )
        console.print(line)
    cal = ch.get("calibrated")
    if cal:
        how = summary.get("calibrated", {})
        level = round(100 * how.get("interval", 0.8))
        cells = ", ".join(
            f"{n} {100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            for n, m, lo, hi in zip(names, cal["mean"], cal["lower"], cal["upper"], strict=True)
        )
        console.print(f"calibrated at the chosen α ({level} % interval): {cells} — from {how.get('source', '?')}")
    for kind, g in ch["gain_over_pooled"].items():
        per_task = ", ".join(f"{n} {100 * v:+.1f}" for n, v in zip(names, g["per_task"], strict=True))
        console.print(
            f"{kind} gain of the chosen α over pooled data: {label} {100 * g['objective']:+.1f} points ({per_task})"
        )


def print_search(search: list[dict], label: str = "mean accuracy") -> None:
    """The closed-loop search, one row per finetune: where, predicted, realised, incumbent."""
    table = Table(title=f"closed-loop search: {sum(len(it['alpha']) for it in search)} multitask finetunes")
    for col in ("iteration", "α", f"predicted {label}", "expected gain", "realised per task", "incumbent"):
        table.add_column(col, justify="right")
    for i, it in enumerate(search, start=1):
        for a, p, g, r in zip(it["alpha"], it["predicted_objective"], it["expected_improvement"], it["realised"]):
            gain = "start (default α)" if g is None and i == 1 else "prior's best" if g is None else f"{100 * g:.2f}"
            inc = "-" if it["incumbent_objective"] is None else f"{100 * it['incumbent_objective']:.1f}"
            real = " ".join(f"{100 * v:.1f}" for v in r)
            table.add_row(str(i), _alpha(a), f"{100 * p:.1f}", gain, real, inc)
    console.print(table)


def print_plan(plan, title: str) -> None:
    """What a run of ``plan`` would do (``varmerge validate``)."""
    cfg = plan.cfg
    table = Table(title=title, show_header=False)
    table.add_row("tasks", ", ".join(f"{t.name} {t.classes or t.domain}" for t in cfg.data.tasks))
    table.add_row("data", f"{cfg.data.source} (seed {cfg.data.seed}, test {cfg.data.test_fraction})")
    table.add_row("model", cfg.model.name)
    table.add_row("posterior", f"{cfg.posterior.method} ({cfg.posterior.steps} steps)")
    table.add_row("merges", ", ".join(plan.method_names))
    if plan.sized:  # the grid holds the default α, which need the tasks' sizes
        table.add_row("α grid", f"spacing {cfg.merge.spacing} and the default α: {len(plan.grid())} points")
    sel = cfg.selection
    if sel.strategy == "closed_loop":
        priors = ", ".join(plan.prior_methods)
        how = (
            f"closed loop: up to {sel.budget} multitask finetunes, first at {' and '.join(sel.start)} α, then "
            f"{sel.batch} at a time where the merged fronts ({priors}), corrected by the finetunes, expect the most"
        )
        if "strategy" not in sel.model_fields_set:
            how += (
                " (the default strategy: on the benchmark columns of docs/RESULTS.md a merged front's top-1 α "
                "falls behind the free defaults, the loop from them does not)"
            )
    else:
        how = f"top {sel.top_k} α of {plan.selection_method}'s front"
    why = "selection.method" if sel.method else "the last of merge.methods (selection.method not set)"
    how += f"; selection method {plan.selection_method}: {why}"
    table.add_row("selection", how)
    obj = plan.objective
    weights = "" if obj.weights is None else f" (weights {list(obj.weights)})"
    table.add_row("objective", f"{obj.label}{weights}; verdict margin {100 * sel.margin:.1f} points")
    if plan.sized:
        table.add_row(
            "defaults",
            "; ".join(f"{n} {[round(float(v), 3) for v in a]}" for n, a in plan.defaults().items())
            + f" (τ = {sel.temperature})",
        )
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
