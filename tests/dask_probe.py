"""A Dask worker plugin for tests/test_dask.py: on every worker (also one that joins later, e.g. a
restart after a kill) it wraps the library calls the tasks make and appends one JSON line per call
to a file: which process trained which task and IVON seed, and which sweeps it merged. The
workers import this module (the test puts ``tests/`` on their PYTHONPATH); production code has no
hook for it."""

from __future__ import annotations

import json
import os

from distributed.diagnostics.plugin import WorkerPlugin


class RecordCalls(WorkerPlugin):
    def __init__(self, path: str):
        self.path = path

    def setup(self, worker):
        from varmerge import pipeline, train

        def record(entry: dict) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "worker": worker.name, **entry}) + "\n")

        def wrap(module, name, describe):
            real = getattr(module, name)

            def wrapper(*a, **k):
                record({"call": name, **describe(a, k)})
                return real(*a, **k)

            setattr(module, name, wrapper)

        wrap(train, "fit", lambda a, k: {"task": k.get("task"), "seed": k.get("seed")})
        wrap(
            pipeline,
            "sweep_and_score",
            lambda a, k: {"method": a[1], "rows": len(a[5]) if len(a) > 5 and a[5] is not None else None},
        )
        wrap(pipeline, "multitask_finetune", lambda a, k: {"alpha": [float(v) for v in a[3]]})


def executing(dask_worker) -> list:
    """The Prefect task parameters of what ``dask_worker`` is running now (run by ``Client.run``)."""
    out = []
    for ts in dask_worker.state.executing:
        kwargs = getattr(ts.run_spec, "kwargs", None) or {}
        params = kwargs.get("parameters") or {}
        out.append({k: v for k, v in params.items() if k in ("task_index", "method", "alpha")})
    return out
