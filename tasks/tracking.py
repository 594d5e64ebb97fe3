"""MLflow bookkeeping: one parent run per flow run, nested runs created explicitly by id.

A local SQLite store (``sqlite:///<run folder>/mlflow.db``) with a local artifact folder is the
default, so nothing needs starting. Runs are created with ``MlflowClient`` and the parent id as
the ``mlflow.parentRunId`` tag, which is thread-safe (Prefect runs tasks in threads).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.tracking import MlflowClient

from varmerge.services import cache_dir

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@dataclass(frozen=True)
class Parent:
    """The MLflow run a flow's tasks nest their runs under: its tracking store and its id."""

    uri: str
    run_id: str


def artifact_root(run_dir: Path) -> Path:
    """Where the runs of a new experiment keep their artifacts: beside the run folders."""
    return Path(run_dir).parent / "mlartifacts"


_READY: set[str] = set()


def client(uri: str) -> MlflowClient:
    """An MLflow client. A new SQLite store is a copy of an empty migrated one (:func:`empty_store`),
    made under a file lock, so two runs starting at once on a new store do not race."""
    if uri.startswith("sqlite:///") and uri not in _READY:
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db) + ".lock"):
            if not db.exists():
                _copy_atomic(empty_store(), db)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # migrates an older store
        _READY.add(uri)
    return MlflowClient(tracking_uri=uri)


def empty_store() -> Path:
    """An empty SQLite tracking store with MLflow's schema, made once per MLflow version in the
    user's cache folder (``$XDG_CACHE_HOME/varmerge``, default ``~/.cache/varmerge``): creating a
    store runs MLflow's schema migrations, seconds of work a copy of this file skips. Its
    ``Default`` experiment keeps MLflow's own default artifact folder, as a new store would."""
    cache = cache_dir()
    path = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
                MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
                os.replace(tmp, path)
    return path


def _copy_atomic(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` (whole or not at all), with the Default experiment's artifact
    folder set as MLflow sets it for a store created here."""
    import shutil
    import sqlite3

    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    default = append_to_uri_path(resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH), "0")
    with contextlib.closing(sqlite3.connect(tmp)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (default,))
    os.replace(tmp, dst)


#: MLflow 3's UI opens an experiment with this tag in its model-training view (runs, metrics,
#: models), not in the GenAI one (traces, judges, prompts).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(uri: str, name: str, artifact_root: Path) -> str:
    """The experiment ``name`` (created with ``artifact_root`` if new), tagged as model training."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        exp = c.get_experiment(c.create_experiment(name, artifact_location=artifact_root.resolve().as_uri()))
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # a kind the user set is theirs
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def process_tag() -> str:
    """``host:pid`` of this process: the ``varmerge.process`` tag of the runs it opens."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_runs(uri: str, experiment_id: str, config_name: str) -> list[tuple[str, str | None]]:
    """Mark KILLED the runs of ``config_name`` left RUNNING by a process of this machine that is
    gone (a killed flow: nothing in it got to finish its runs). Runs of live processes, or of
    other machines, are left alone. Returns ``(run id, Prefect flow-run id or None)`` of each run
    closed (the flow-run id from the run's ``varmerge.flow_run_id`` tag)."""
    if "'" in config_name:
        return []
    c = client(uri)
    runs = c.search_runs(
        [experiment_id], f"tags.`varmerge.config` = '{config_name}' and attributes.status = 'RUNNING'", max_results=1000
    )
    host, closed = socket.gethostname(), []
    for r in runs:
        h, _, pid = r.data.tags.get("varmerge.process", "").rpartition(":")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            c.set_terminated(r.info.run_id, status="KILLED")
            closed.append((r.info.run_id, r.data.tags.get("varmerge.flow_run_id")))
    return closed


def find_model_version(uri: str, name: str, sha256: str):
    """The READY registered version of ``name`` whose ``varmerge.sha256`` tag is ``sha256``, or None."""
    c = client(uri)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version)):
        if v.tags.get("varmerge.sha256") == sha256 and v.status == "READY":
            return v
    return None


def start_child(uri: str, parent_id: str, name: str, tags: dict | None = None) -> str:
    """A nested run ``name`` under ``parent_id``. A RUNNING one of the same name there is an
    earlier attempt of this step whose process died (a Dask worker lost mid-task, the task then
    rescheduled): it is marked KILLED, so no run is left RUNNING by a finished flow."""
    c = client(uri)
    parent = c.get_run(parent_id)
    if "'" not in name:
        earlier = c.search_runs(
            [parent.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent_id}' and attributes.run_name = '{name}' "
            "and attributes.status = 'RUNNING'",
        )
        for r in earlier:
            c.set_terminated(r.info.run_id, status="KILLED")
    t = {"mlflow.parentRunId": parent_id, "mlflow.runName": name, **(tags or {})}
    t.update({k: v for k, v in parent.data.tags.items() if k.startswith("varmerge.")})
    run = c.create_run(parent.info.experiment_id, tags=t, run_name=name)
    return run.info.run_id


def finish(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def child_run(parent: Parent | None, name: str, tags: dict | None = None) -> Iterator[str | None]:
    """A nested run ``name`` under ``parent`` for the block: FINISHED when the block ends, FAILED
    (and the error raised on) when it fails, never left RUNNING. Yields its id, or None (and logs
    nothing) without a parent."""
    if parent is None:
        yield None
        return
    run_id = start_child(parent.uri, parent.run_id, name, tags)
    try:
        yield run_id
    except BaseException:
        finish(parent.uri, run_id, "FAILED")
        raise
    finish(parent.uri, run_id)


def log_params(uri: str, run_id: str, params: dict) -> None:
    _log_batch(uri, run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])


def log_metrics(uri: str, run_id: str, metrics: dict, step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    _log_batch(uri, run_id, metrics=batch)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    _log_batch(uri, run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def _log_batch(uri: str, run_id: str, metrics=(), params=(), tags=()) -> None:
    """One write (one SQLite transaction) per chunk within MLflow's per-request limits, instead of
    one per value: a flow logs a few hundred values, and each commit of a local store is a sync."""
    c = client(uri)
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        c.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
        metrics, params, tags = metrics[1000:], params[100:], tags[100:]


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table (column name -> values) the MLflow UI shows and compares across runs."""
    client(uri).log_table(run_id, columns, artifact_file)


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def read_json_artifact(uri: str, run_id: str, artifact: str) -> dict:
    """A JSON artifact of a run (e.g. ``front/front.json``), parsed."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = client(uri).download_artifacts(run_id, artifact, tmp)
        return json.loads(Path(local).read_text())


__all__ = [
    "Parent",
    "mlflow",
    "child_run",
    "client",
    "experiment_id",
    "start_child",
    "finish",
    "log_params",
    "log_metrics",
    "log_artifact",
    "process_tag",
    "close_stale_runs",
    "log_table",
    "set_tags",
    "find_model_version",
]
