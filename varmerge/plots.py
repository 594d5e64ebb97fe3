"""Figures of estimated fronts (matplotlib; mpltern for 3-task ternary maps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from varmerge.pareto import pareto_mask  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    from varmerge.files import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))  # no half-written figure
    finally:
        plt.close(fig)
    return path


MARKERS = {"simple": "^", "task_arithmetic": "v", "hessian": "s", "hessian_full": "D", "mixture": "d"}
#: The free default α: marker and colour, on every figure.
DEFAULT_STYLE = {"pooled": ("P", "tab:red"), "uniform": ("X", "tab:purple"), "temperature": ("p", "tab:brown")}


def front_projections(
    sweeps: Mapping[str, Mapping[str, torch.Tensor]],
    task_names: Sequence[str],
    path: str | Path,
    *,
    multitask: Sequence[Sequence[float]] = (),
    defaults: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """Per-task accuracy vs accuracy for every task pair: each method's front as markers,
    multitask finetunes as circles, and the ``defaults`` (name -> predicted scores, e.g. at
    pooled α) as large labelled markers."""
    T = len(task_names)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for name, sw in sweeps.items():
            acc = torch.as_tensor(sw["accuracy"])
            mask = pareto_mask(acc[:, [i, j]])
            ax.scatter(acc[mask, i], acc[mask, j], marker=MARKERS.get(name, "x"), s=22, label=name, alpha=0.8)
        for k, s in enumerate(multitask):
            ax.scatter(
                [s[i]],
                [s[j]],
                marker="o",
                facecolors="none",
                edgecolors="k",
                s=60,
                label="multitask finetune" if k == 0 else None,
            )
        for name, sc in (defaults or {}).items():
            marker, colour = DEFAULT_STYLE.get(name, ("o", "grey"))
            ax.scatter([sc[i]], [sc[j]], marker=marker, c=colour, s=90, edgecolors="k", label=f"{name} α (merged)")
        ax.set_xlabel(f"{task_names[i]} accuracy")
        ax.set_ylabel(f"{task_names[j]} accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "estimated Pareto fronts (2-D projections)")
    fig.tight_layout()
    return _save(fig, path)


def ternary_mean_accuracy(
    sweeps: Mapping[str, Mapping[str, torch.Tensor]],
    task_names: Sequence[str],
    path: str | Path,
    *,
    objective=None,
    label: str = "mean accuracy",
    defaults: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """The objective (default: mean accuracy; ``objective`` maps (G, T) scores to (G,)) over α
    on the simplex, one ternary panel per method (3 tasks only), its best α as a star and the
    ``defaults`` (name -> α) as labelled markers."""
    import mpltern  # noqa: F401  (registers the 'ternary' projection)

    if len(task_names) != 3:
        raise ValueError(f"a ternary map needs exactly 3 tasks, got {len(task_names)}")
    score = objective or (lambda acc: torch.as_tensor(acc).mean(1))
    values = {name: torch.as_tensor(score(torch.as_tensor(sw["accuracy"]))).numpy() for name, sw in sweeps.items()}
    fig = plt.figure(figsize=(5.0 * len(sweeps), 4.6))
    fig.subplots_adjust(wspace=0.55)
    vmin = min(float(v.min()) for v in values.values())
    vmax = max(float(v.max()) for v in values.values())
    for k, (name, sw) in enumerate(sweeps.items()):
        ax = fig.add_subplot(1, len(sweeps), k + 1, projection="ternary")
        a = torch.as_tensor(sw["alpha"]).numpy()
        mean = values[name]
        pc = ax.scatter(a[:, 0], a[:, 1], a[:, 2], c=mean, vmin=vmin, vmax=vmax, cmap="viridis", s=14)
        b = mean.argmax()
        ax.scatter([a[b, 0]], [a[b, 1]], [a[b, 2]], marker="*", c="red", s=120)
        for d, da in (defaults or {}).items():
            marker, colour = DEFAULT_STYLE.get(d, ("o", "grey"))
            ax.scatter([da[0]], [da[1]], [da[2]], marker=marker, c=colour, s=70, edgecolors="k", label=d)
        if defaults and k == 0:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.35, 1.1))
        ax.set_tlabel(task_names[0])
        ax.set_llabel(task_names[1])
        ax.set_rlabel(task_names[2])
        # a fixed title position: mpltern's automatic one costs a second per figure
        ax.set_title(f"{name}: max {100 * mean[b]:.1f}%", y=1.3)
    fig.colorbar(pc, ax=fig.axes, shrink=0.6, label=label)
    return _save(fig, path)


def predicted_vs_realised(
    task_names: Sequence[str],
    predicted: Sequence[float],
    realised: Sequence[float],
    path: str | Path,
    title: str = "",
    defaults: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Bar chart: merged-model prediction vs the real multitask finetune at the chosen α, and the
    realised scores at the ``defaults`` (name -> scores of a real finetune there) beside them."""
    import numpy as np

    x = np.arange(len(task_names))
    groups = [("predicted (merged)", predicted, None), ("realised (multitask finetune)", realised, None)]
    groups += [
        (f"realised at {n} α", sc, DEFAULT_STYLE.get(n, (None, "grey"))[1]) for n, sc in (defaults or {}).items()
    ]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 * len(task_names) + 2, 3.6))
    for g, (label, values, colour) in enumerate(groups):
        ax.bar(x - 0.4 + width * (g + 0.5), values, width, label=label, color=colour)
    ax.set_xticks(x, task_names)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title or "predicted vs realised at the chosen α")
    fig.tight_layout()
    return _save(fig, path)


def calibrated_front(
    task_names: Sequence[str],
    alpha,
    merged,
    calibrated,
    path: str | Path,
    realised: Mapping[int, Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """Per task, over its own weight α_t: the merged front's prediction at every α of the grid, the
    ``calibrated`` prediction (a :class:`varmerge.search.Calibrated`: ``mean``, ``lower``,
    ``upper``, (G, T)) with its interval (a band between the lowest lower and the highest upper
    bound at each α_t, and each α's bar), and the real finetunes (``realised``: grid row ->
    per-task scores) as black circles."""
    import numpy as np

    alpha, merged = np.asarray(alpha), np.asarray(merged)
    mean, lower, upper = (np.asarray(getattr(calibrated, k)) for k in ("mean", "lower", "upper"))
    T = len(task_names)
    fig, axes = plt.subplots(1, T, figsize=(3.6 * T, 3.4), squeeze=False, sharey=True)
    for t, ax in enumerate(axes[0]):
        x = alpha[:, t]
        levels = np.unique(np.round(x, 9))
        lo = [lower[np.isclose(x, v), t].min() for v in levels]
        hi = [upper[np.isclose(x, v), t].max() for v in levels]
        ax.fill_between(levels, lo, hi, color="tab:blue", alpha=0.15, lw=0, label="calibrated interval (all α)")
        jitter = (np.arange(len(x)) % 7 - 3) * 0.004
        ax.errorbar(
            x + jitter,
            mean[:, t],
            yerr=[mean[:, t] - lower[:, t], upper[:, t] - mean[:, t]],
            fmt="o",
            ms=2.5,
            lw=0.5,
            color="tab:blue",
            label="calibrated",
        )
        ax.scatter(x - jitter, merged[:, t], s=6, color="grey", label="merged", zorder=3)
        for k, (r, acc) in enumerate((realised or {}).items()):
            ax.scatter(
                [alpha[r, t]],
                [acc[t]],
                s=40,
                facecolors="none",
                edgecolors="k",
                zorder=4,
                label="real finetune" if k == 0 else None,
            )
        ax.set_title(task_names[t])
        ax.set_xlabel(f"α of {task_names[t]}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "calibrated front: prediction and interval per task")
    fig.tight_layout()
    return _save(fig, path)
