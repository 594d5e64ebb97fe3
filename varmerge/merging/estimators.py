"""Front estimators: methods of ``merge.methods`` that predict scores instead of merging.

MAP (:mod:`varmerge.map_front`) scores task arithmetic at a few α and fits quadratic surrogates.
It is registered with ``kind="estimator"`` so that its settings are declared and checked like
every rule's, and the pipeline dispatches on the spec's kind, never on the name; the registry's
:func:`~varmerge.merging.registry.apply` refuses it (it returns no models).
"""

from __future__ import annotations

from varmerge import map_front
from varmerge.merging.registry import Options, register

__all__ = ["MapOptions"]


class MapOptions(Options):
    """MAP's settings (the values are checked by :func:`varmerge.map_front.check_settings`)."""

    n_evaluations: int | None = None  # real task-arithmetic evaluations (default 2T + 3)
    seed: int = 0
    algorithm: str = "nsga2"  # nsga2 | nsga3
    pop_size: int = 100
    n_gen: int = 100


def _check_map(options: MapOptions, num_tasks: int) -> None:
    map_front.check_settings(num_tasks, **options.rule_kwargs())


register("map", kind="estimator", needs_base=True, options=MapOptions, check=_check_map)(map_front.map_front)
