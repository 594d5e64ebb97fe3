"""Does α matter, and does varmerge find it? Regret of the free defaults and of the product's α
against a ground truth of real multitask finetunes, with seed noise.

    python -m benchmarks.value [--only imbalanced_hard] [--seeds 3] [--budget 5] [--workers 2]

Columns (committed configs, settings fixed before any score was seen: see each config's header):

- ``imbalanced_hard`` (configs/value/imbalanced_hard.yaml): Fashion-MNIST, the third task 100x
  smaller than the others and hard (coat vs shirt), logistic regression.
- ``noisy_task`` (configs/value/noisy_task.yaml): MNIST, the third task's training labels 40 %
  wrong, logistic regression.
- the six Table 1 columns, **rescored** from their committed ground truth
  (``results/table1.json``; nothing is rerun): each default at its nearest ground-truth α, the
  product's top-1 α (chosen by mean accuracy, as Table 1 ran) at its nearest ground-truth α.
  No seeds were run there, so no noise floor.

Per new column: θ0, the per-task finetunes, every merge method's front over the plan's α grid
(spacing 0.1 and the default α as exact rows) through :class:`varmerge.sequence.LocalRunner`;
then the ground truth: the real multitask finetune at **every** α of that grid, and ``--seeds``
seeds (the finetune's seed: batch order and IVON's noise; θ0 and the data stay) at the best α of
each objective, at pooled and at uniform α; their standard deviation is the noise floor. For the
``mean`` and ``worst_task`` objectives, the regret (best ground-truth objective − the objective
realised at the α, in points) of pooled, uniform and temperature (τ = 0.5) α, of each merge
method's top-1 α by that objective, and of the closed-loop search (started at pooled and uniform α
as ``selection.start`` says by default, stopped by
the verdict's margin, replayed on the ground truth) after B = 1 … ``--budget`` finetunes; and the
verdict of the merged fronts. The targets of the issue are checked per column and objective:

- where best − pooled ≥ max(1 point, 2 × seed std): the product's α (top-1 of the default
  selection method, or the closed loop within 3 finetunes) recovers ≥ 80 % of best − pooled;
- where it is smaller: the closed loop stops after ≤ 2 finetunes and its verdict (the realised
  finetunes and the fronts they calibrate: :func:`varmerge.objective.realised_verdict`) says
  "α matters little here". The merged fronts' own verdict is reported beside it.

Results go into ``results/table1.json`` (``value``), ``docs/RESULTS.md`` is rewritten and the
plot is ``docs/figures/value_regret.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from benchmarks.closed_loop import calibration, replay
from benchmarks.table1 import DEFAULT_OUTPUT, ROOT, MultitaskRuns, generated, load_results, save_with_report
from varmerge import pareto
from varmerge.config import load_config
from varmerge.objective import Objective, default_alphas, default_rows, realised_verdict, verdict
from varmerge.plan import make_plan
from varmerge.search import ClosedLoop, SearchSettings
from varmerge.sequence import LocalRunner

COLUMNS = {"imbalanced_hard": "configs/value/imbalanced_hard.yaml", "noisy_task": "configs/value/noisy_task.yaml"}
OBJECTIVES = {"mean": Objective(), "worst_task": Objective("worst_task")}
TABLE1_COLUMNS = [
    "mnist_imbalanced",
    "mnist_balanced",
    "fashion_imbalanced",
    "fashion_balanced",
    "cnn_fashion",
    "lora_tweets",
]
FIGURE = ROOT / "docs" / "figures" / "value_regret.png"
RECOVER = 0.8  # the share of best − pooled the product's α must recover where α matters


def _pts(x: float) -> float:
    return round(100 * float(x), 3)


def fronts(name: str, say) -> tuple:
    """The plan (sized), the runner's pieces and every method's merged front over the plan's grid."""
    plan = make_plan(load_config(ROOT / COLUMNS[name]))
    runner = LocalRunner(plan)
    data = runner.data()
    plan = runner.plan
    say(f"{name}: θ0 and {len(plan.tasks)} finetunes ({plan.cfg.posterior.method})")
    theta0 = runner.theta0(data)
    posteriors = runner.finetunes(data, theta0)
    say(f"{name}: merged fronts ({', '.join(plan.method_names)})")
    sweeps = runner.sweeps(data, theta0, posteriors, plan.method_names)
    return plan, runner, data, theta0, sweeps


def with_seed(plan, offset: int):
    """The plan with the multitask finetune's seed moved by ``offset``."""
    return dataclasses.replace(plan, multitask=dataclasses.replace(plan.multitask, seed=plan.multitask.seed + offset))


def score(plan, sweeps: dict, alpha: torch.Tensor, truth: torch.Tensor, noise: dict, budget: int, name: str) -> dict:
    """One objective's regrets, verdict, closed loop and targets (see the module docstring)."""
    rows = default_rows(alpha, plan.defaults())
    obj = OBJECTIVES[name]
    value = obj(truth)
    best = float(value.max())
    regret = {d: _pts(best - value[r]) for d, r in rows.items()}
    top1 = {}
    for m, sw in sweeps.items():
        idx, _ = pareto.best_alpha(alpha, sw["accuracy"], objective=obj)
        top1[m] = {"alpha": alpha[int(idx[0])].tolist(), "regret": _pts(best - value[int(idx[0])])}
    margin = plan.cfg.selection.margin
    priors = {m: sweeps[m]["accuracy"] for m in plan.prior_methods}
    v = verdict(obj, priors, rows["pooled"], margin)
    start = tuple(dict.fromkeys(rows[d] for d in plan.cfg.selection.start))
    settings = SearchSettings(budget, start=start, margin=margin)
    search = ClosedLoop(alpha, priors, settings, objective=obj)
    path = replay(search, truth.numpy())
    curve = [_pts(best - float(value[path[: b + 1]].max())) for b in range(len(path))]
    final = realised_verdict(obj, truth[path], truth[rows["pooled"]], margin, settled=search.settled)
    gap = best - float(value[rows["pooled"]])
    std = float(np.mean(list(noise[name].values())))
    matters = gap >= max(0.01, 2 * std)
    chosen = top1[plan.selection_method]["regret"] / 100
    within3 = min(curve[:3]) / 100
    if matters:
        recovered = {"top1": round((gap - chosen) / gap, 3), "closed_loop_3": round((gap - within3) / gap, 3)}
        met = max(recovered.values()) >= RECOVER
    else:  # the run's last word: the closed loop's verdict (the fronts' one is reported beside it)
        recovered = None
        met = final["matters"] is False and final["settled"] and len(path) <= 2
    return {
        "best": _pts(best),
        "best_alpha": alpha[int(value.argmax())].tolist(),
        "best_minus_pooled": _pts(gap),
        "seed_std": {k: _pts(s) for k, s in noise[name].items()},
        "alpha_matters": bool(matters),
        "regret": regret,
        "top1": top1,
        "verdict": v.as_dict(),
        "closed_loop": {"regret_after": curve, "finetunes": len(path), "alpha": alpha[path].tolist(), "verdict": final},
        "recovered": recovered,
        "target_met": bool(met),
    }


def new_column(name: str, seeds: int, budget: int, workers: int, say) -> dict:
    t0 = time.perf_counter()
    plan, runner, data, theta0, sweeps = fronts(name, say)
    alpha = plan.grid()
    gt = MultitaskRuns(plan, theta0, data[0], say, workers=workers, prior=runner.prior)
    gt.run(alpha, f"{name}: ground truth")
    truth = gt(alpha)
    rows = default_rows(alpha, plan.defaults())
    # the noise floor: more seeds at each objective's best α, at pooled and at uniform
    picks = {f"best_{n}": int(o(truth).argmax()) for n, o in OBJECTIVES.items()}
    picks |= {"pooled": rows["pooled"], "uniform": rows["uniform"]}
    picked = sorted(set(picks.values()))
    other_seeds = []  # per seed after the first: {row: (T,) accuracies}
    for s in range(1, seeds):
        runs = MultitaskRuns(with_seed(plan, s), theta0, data[0], say, workers=workers, prior=runner.prior)
        runs.run(alpha[picked], f"{name}: seed {s}")
        other_seeds.append(dict(zip(picked, runs(alpha[picked]), strict=True)))
    noise = {}
    for n, o in OBJECTIVES.items():
        noise[n] = {}
        for label, r in picks.items():
            if label.startswith("best_") and label != f"best_{n}":
                continue
            vals = [float(o(truth[r]))] + [float(o(p[r])) for p in other_seeds]
            noise[n][label.removesuffix(f"_{n}")] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    sizes = [t.train_examples for t in plan.tasks]
    out = {
        "config": COLUMNS[name],
        "tasks": plan.task_names,
        "train_examples": sizes,
        "defaults": {k: [round(float(x), 6) for x in a] for k, a in plan.defaults().items()},
        "grid_size": len(alpha),
        "seeds": seeds,
        "selection_method": plan.selection_method,
        "prior_methods": list(plan.prior_methods),
        "ground_truth": {"alpha": alpha.tolist(), "accuracy": truth.tolist()},
        "objectives": {n: score(plan, sweeps, alpha, truth, noise, budget, n) for n in OBJECTIVES},
        "calibration": calibration(
            alpha.numpy(),
            {m: sweeps[m]["accuracy"].numpy() for m in plan.prior_methods},
            plan.selection_method,
            truth.numpy(),
            tuple(dict.fromkeys(rows[d] for d in ("pooled", "uniform"))),
        ),
        "multitask_seconds_mean": round(float(np.mean(list(gt.seconds.values()))), 3),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    return out


def rescored(results: dict, name: str) -> dict | None:
    """A Table 1 column rescored from its committed ground truth (nearest ground-truth α)."""
    exp = results.get("experiments", {}).get(name)
    gt = (exp or {}).get("multitask", {}).get("ground_truth", {})
    if "accuracy" not in gt:
        return None
    alpha = torch.tensor(gt["alpha"], dtype=torch.float64)
    truth = torch.tensor(gt["accuracy"], dtype=torch.float64)

    def nearest(a) -> int:
        return int((alpha - torch.as_tensor(a, dtype=torch.float64)).abs().sum(1).argmin())

    defaults = default_alphas(exp["train_examples"])
    out = {"tasks": exp["tasks"], "train_examples": exp["train_examples"], "spacing": gt["spacing"], "objectives": {}}
    for n, o in OBJECTIVES.items():
        value = o(truth)
        best = float(value.max())
        entry = {
            "best": _pts(best),
            "regret": {d: _pts(best - value[nearest(a)]) for d, a in defaults.items()},
            "top1_by_mean": {
                m: _pts(best - value[nearest(r["top5_alpha"][0])])
                for m, r in exp["methods"].items()
                if r.get("top5_alpha")
            },
        }
        entry["best_minus_pooled"] = entry["regret"]["pooled"]
        out["objectives"][n] = entry
    return out


def evidence(value: dict) -> dict:
    """Per objective, the mean regret (points) over every column, new and rescored, of each
    default and of each variational rule's top-1 α (the rules every column has); the default
    selection is chosen from this (README, "Selection")."""
    out = {}
    for n in OBJECTIVES:
        rows = [c["objectives"][n] for c in value["columns"].values()]
        rows += [c["objectives"][n] for c in value["rescored"].values()]
        regrets: dict[str, list[float]] = {}
        for r in rows:
            for d, x in r["regret"].items():
                regrets.setdefault(d, []).append(x)
            tops = r.get("top1_by_mean") or {m: t["regret"] for m, t in r["top1"].items()}
            for m in ("simple", "hessian", "mixture"):
                if m in tops:
                    regrets.setdefault(f"top-1 {m}", []).append(tops[m])
        out[n] = {
            "columns": len(rows),
            "mean_regret": {k: round(float(np.mean(v)), 3) for k, v in regrets.items() if len(v) == len(rows)},
        }
    return out


def draw(value: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from varmerge.files import atomic_write

    cols = list(value["columns"])
    fig, axes = plt.subplots(
        len(OBJECTIVES), len(cols), figsize=(5.5 * len(cols), 3.6 * len(OBJECTIVES)), squeeze=False
    )
    for j, c in enumerate(cols):
        col = value["columns"][c]
        for i, n in enumerate(OBJECTIVES):
            r = col["objectives"][n]
            labels = list(r["regret"]) + [f"top-1 {m}" for m in r["top1"]]
            labels += [f"closed loop B={b + 1}" for b in range(len(r["closed_loop"]["regret_after"]))]
            values = list(r["regret"].values()) + [t["regret"] for t in r["top1"].values()]
            values += r["closed_loop"]["regret_after"]
            ax = axes[i][j]
            ax.barh(
                range(len(values)),
                values,
                color=["tab:red", "tab:purple", "tab:brown"] + ["tab:blue"] * (len(values) - 3),
            )
            ax.axvline(2 * max(r["seed_std"].values()), color="k", ls="--", lw=0.8, label="2 × seed std")
            ax.set_yticks(range(len(values)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"regret, {n.replace('_', '-')} accuracy (points)")
            ax.set_title(f"{c}: best {r['best']:.1f}, best − pooled {r['best_minus_pooled']:.1f}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(FIGURE, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=list(COLUMNS), help="a new column (repeatable)")
    ap.add_argument("--seeds", type=int, default=3, help="finetune seeds at the best, pooled and uniform α")
    ap.add_argument("--budget", type=int, default=5, help="closed-loop finetunes at most")
    ap.add_argument("--workers", type=int, default=2, help="processes for the ground-truth finetunes")
    args = ap.parse_args(argv)
    results = load_results(DEFAULT_OUTPUT)
    value = results.setdefault("value", {"columns": {}})
    for name in args.only or list(COLUMNS):
        value["columns"][name] = new_column(name, args.seeds, args.budget, args.workers, lambda m: print(m, flush=True))
        for n, r in value["columns"][name]["objectives"].items():
            print(
                f"{name} {n}: best {r['best']:.2f}, best − pooled {r['best_minus_pooled']:.2f} "
                f"(seed std {r['seed_std']}), regret {r['regret']}, top-1 "
                f"{ {m: t['regret'] for m, t in r['top1'].items()} }, closed loop {r['closed_loop']['regret_after']}; "
                f"{r['verdict']['message']}; target met: {r['target_met']}",
                flush=True,
            )
    value["rescored"] = {c: r for c in TABLE1_COLUMNS if (r := rescored(results, c)) is not None}
    value["evidence"] = evidence(value)
    value["generated"] = generated()
    draw(value)
    value["figure"] = str(FIGURE.relative_to(ROOT / "docs"))  # relative to the report
    print(f"report: {save_with_report(results, DEFAULT_OUTPUT)}")


if __name__ == "__main__":
    main()
