"""Checks that run before a job writes anything: a bad run fails fast and leaves nothing behind.

:func:`preflight` validates, in order, the accelerator, the selection constraints, the Dask
scheduler of ``runner.address`` (it answers), the output folder, the MLflow tracking URI (a quick
probe, never MLflow's minutes of retries), the data (source installed, options known, class ids
in range, every task with train and test examples) and the model (it builds, LoRA target modules
exist, it takes one example of the data). It creates no file or folder; a failure is a
:class:`PreflightError` with a one-line message.

Pure library code: the tracking URI and the scheduler are checked with the standard library (no
mlflow or distributed import).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from varmerge import data as vdata
from varmerge import models
from varmerge.config import ExperimentConfig
from varmerge.plan import RunPlan, make_plan

PROBE_TIMEOUT_S = 3.0
SQLITE_MAGIC = b"SQLite format 3\x00"


class PreflightError(ValueError):
    """A run that would fail; the message says what to change."""


def preflight(
    cfg: ExperimentConfig,
    tracking_uri: str | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
) -> RunPlan:
    """Everything a run of ``cfg`` (read from ``config_file``, if from a file) needs, checked
    without writing; returns the run's plan, with the number of classes and each task's examples
    filled in."""
    from varmerge.pipeline import check_accelerator

    try:
        check_accelerator(cfg.accelerator)
        where = {"output_dir": output_dir, "tracking_uri": tracking_uri, "data_dir": data_dir}
        plan = make_plan(cfg, **where, config_file=config_file)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    check_run_owner(plan)
    check_constraints(cfg)
    check_runner(cfg)
    check_writable(plan.run_dir, "output folder")
    check_tracking_uri(plan.tracking_uri)
    ds = load_data(cfg, data_dir)
    plan = check_data(plan, ds)
    check_model(cfg, plan.num_classes, ds)
    check_start(cfg, plan.num_classes, ds)
    return plan


# ------------------------------------------------------------------------------------- config
def check_run_owner(plan: RunPlan) -> None:
    """Two config files with the same ``name`` would share a run folder and overwrite each
    other's front.json: the second is refused (an edited config, the same file, is welcome)."""
    front = plan.run_dir / "front.json"
    if plan.config_file is None or not front.is_file():
        return
    try:
        owner = json.loads(front.read_text()).get("config_file")
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge: the run rewrites it
    if owner and (plan.run_dir / owner).resolve() != Path(plan.config_file):  # front.json keeps it relative
        raise PreflightError(
            f"{plan.run_dir} holds the run of {owner}; {plan.config_file} has the same name "
            f"{plan.cfg.name!r}: give it another name (name: ...) or another --output"
        )


def check_constraints(cfg: ExperimentConfig) -> None:
    """Selection constraints that no accuracy in [0, 1] can meet are refused up front."""
    for c in cfg.selection.constraints:
        impossible = (
            (c.op == ">=" and c.value > 1)
            or (c.op == ">" and c.value >= 1)
            or (c.op == "<=" and c.value < 0)
            or (c.op == "<" and c.value <= 0)
        )
        if impossible:
            raise PreflightError(
                f"selection constraint {c.task} {c.op} {c.value} can never hold: accuracies lie in [0, 1]"
            )


def check_runner(cfg: ExperimentConfig, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A Dask scheduler named by ``runner.address`` accepts a TCP connection."""
    address = cfg.runner.address
    if address is None or not address.startswith(("tcp://", "tls://")):
        return
    parsed = urllib.parse.urlparse(address)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 8786), timeout=timeout):
            pass
    except OSError as exc:
        raise PreflightError(
            f"runner.address {address}: no Dask scheduler answers ({exc or type(exc).__name__}); "
            f"start one with `dask scheduler` and its workers with `dask worker {address}`"
        ) from None


# ------------------------------------------------------------------------------------- files
def check_writable(path: Path, what: str) -> None:
    """``path`` is a folder or can become one: its nearest existing ancestor is a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{what} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(f"{what} {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{what} {path} cannot be written: {probe} is not writable")


# ---------------------------------------------------------------------------------- tracking
def check_tracking_uri(uri: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A usable MLflow tracking URI, probed quickly (no retries).

    ``sqlite:///PATH``: the folder can be created and an existing file is an SQLite database.
    ``http(s)://``: the server answers within ``timeout`` seconds (any HTTP status counts).
    Other database URIs (``postgresql://host:port/...``): the host accepts a TCP connection.
    Plain folders (``file:``, a path) are refused as MLflow 3 refuses them, unless
    ``MLFLOW_ALLOW_FILE_STORE=true``.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _probe_http(uri, timeout)
    elif scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise PreflightError(
                f"tracking URI {uri!r} is a plain folder store, which MLflow 3 refuses; "
                "use sqlite:///PATH/mlflow.db (the default) or an http:// tracking server"
            )
    elif parsed.hostname:
        port = parsed.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(scheme.split("+")[0])
        if port:
            _probe_tcp(uri, parsed.hostname, port, timeout)


def _check_sqlite(uri: str) -> None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        raise PreflightError(f"tracking URI {uri!r}: write sqlite stores as sqlite:///PATH/mlflow.db")
    path = Path(uri[len(prefix) :])
    if str(path) in ("", ":memory:"):
        raise PreflightError(f"tracking URI {uri!r}: an in-memory store keeps nothing; give a file path")
    if path.exists():
        if path.is_dir():
            raise PreflightError(f"tracking URI {uri!r}: {path} is a folder, not an SQLite file")
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise PreflightError(f"tracking URI {uri!r}: {path} exists but is not an SQLite database")
        if not os.access(path, os.W_OK):
            raise PreflightError(f"tracking URI {uri!r}: {path} is not writable")
    else:
        check_writable(path.parent, f"tracking store folder of {uri!r}:")


def _unreachable(uri: str, why: str) -> PreflightError:
    return PreflightError(
        f"MLflow tracking server {uri} is not reachable ({why}); start it, fix --tracking-uri, "
        "or leave --tracking-uri out to use the local SQLite store in the output folder"
    )


def _probe_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered: reachable (auth or routing is MLflow's business)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _unreachable(uri, str(reason) or type(reason).__name__) from None


def _probe_tcp(uri: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise _unreachable(uri, str(exc) or type(exc).__name__) from None


# -------------------------------------------------------------------------------------- data
def load_data(cfg: ExperimentConfig, data_dir: str | os.PathLike | None = None):
    """The run's dataset: a prepared folder, else the configured source (nothing is written)."""
    from varmerge.pipeline import load_dataset

    try:
        if data_dir is not None:
            return vdata.load_saved(data_dir)
        return load_dataset(cfg)
    except vdata.DataSourceMissing as exc:
        raise PreflightError(f"data source {cfg.data.source!r} is not available here: {exc}") from None
    except FileNotFoundError as exc:
        raise PreflightError(str(exc)) from None
    except ValueError as exc:
        msg = str(exc)
        raise PreflightError(msg if "data source" in msg else f"data ({cfg.data.source}): {msg}") from None


def check_data(plan: RunPlan, ds) -> RunPlan:
    """Class ids in range, and every task has train and test examples (after the caps); returns
    ``plan`` with the number of classes and each task's examples."""
    cfg = plan.cfg
    if not hasattr(ds, "items") or not {"train", "test"} <= set(ds):
        have = list(ds) if hasattr(ds, "keys") else type(ds).__name__
        raise PreflightError(f"data: need a 'train' and a 'test' split, got {have}")
    n_classes = vdata.num_classes(ds)
    tasks = cfg.data.tasks
    by_domain = [t.domain is not None for t in tasks]
    if any(by_domain) and not all(by_domain):
        raise PreflightError("data.tasks: either every task names a 'domain' or none does")
    sizes = {}
    for t in tasks:
        bad = [c for c in t.classes if c >= n_classes]
        if bad:
            raise PreflightError(
                f"task {t.name!r}: class ids {bad} out of range: {cfg.data.source} has "
                f"{n_classes} classes (0..{n_classes - 1})"
            )
    for split in ("train", "test"):
        part = ds[split]
        if all(by_domain):
            if "domain" not in part.column_names:
                raise PreflightError(f"data: tasks name domains but {cfg.data.source} has no 'domain' column")
            col = part.select_columns(["domain"]).with_format("arrow")[:]["domain"].to_pylist()
            counts = {t.name: sum(1 for d in col if d == t.domain) for t in tasks}
        else:
            labels = vdata._labels(part)
            counts = {t.name: int(sum((labels == c).sum() for c in t.classes)) for t in tasks}
        for t in tasks:
            if counts[t.name] == 0:
                what = f"domain {t.domain!r}" if t.domain is not None else f"classes {list(t.classes)}"
                raise PreflightError(
                    f"task {t.name!r} has no {split} examples ({what} absent from the {split} split "
                    f"of {cfg.data.source}; check the task, data.options and data.test_fraction)"
                )
        cap = cfg.data.max_train_per_task if split == "train" else cfg.data.max_test_per_task
        sizes[split] = {k: min(v, cap) if cap else v for k, v in counts.items()}
    for t in cfg.data.tasks:  # the per-task cap (check_model prepares the tasks: a class it empties fails there)
        if t.max_train is not None:
            sizes["train"][t.name] = min(sizes["train"][t.name], t.max_train)
    return plan.with_sizes(n_classes, sizes["train"], sizes["test"])


# ------------------------------------------------------------------------------------- model
def check_model(cfg: ExperimentConfig, num_classes: int, ds=None) -> None:
    """θ0 builds as the run builds it (LoRA target modules exist) and, given the data, the
    run's own task preparation succeeds and the model takes two training examples."""
    from varmerge import pipeline

    with torch.random.fork_rng():  # seeded_model seeds torch; leave the caller's RNG alone
        try:
            model = pipeline.seeded_model(cfg, num_classes)
        except TypeError as exc:
            raise PreflightError(f"model.options: {exc}") from None
        except (ValueError, ImportError, OSError) as exc:
            raise PreflightError(f"model {cfg.model.name!r}: {exc}") from None
    if ds is None:
        return
    try:
        tasks, _ = pipeline.prepare_tasks(cfg, dataset=ds)
    except (ValueError, RuntimeError, OSError) as exc:
        raise PreflightError(f"data: {exc}") from None
    x = tasks[0].train[0]
    x = {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2]
    try:
        model.eval()
        with torch.no_grad():
            logits = models.forward(model, x)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot take this data
        raise PreflightError(
            f"model {cfg.model.name!r} cannot take the data of {cfg.data.source!r}: {type(exc).__name__}: {exc}"
        ) from None
    if logits.shape[-1] < num_classes:
        raise PreflightError(
            f"model {cfg.model.name!r} has {logits.shape[-1]} outputs but the data has {num_classes} classes"
        )


# ----------------------------------------------------------------------------- θ0 and pretraining
def _row_digests(x) -> set[bytes]:
    """One digest per example of (N, ...) image tensors or a dict of token tensors."""
    import hashlib

    parts = [x[k] for k in sorted(x)] if isinstance(x, dict) else [x]
    rows = [p.reshape(len(p), -1).contiguous().numpy() for p in parts]
    return {hashlib.sha1(b"".join(r[i].tobytes() for r in rows)).digest() for i in range(len(rows[0]))}


def check_start(cfg: ExperimentConfig, num_classes: int, ds=None) -> None:
    """``base.checkpoint`` exists and fits the model; ``pretrain.data`` yields examples, none of
    which is in a task's test set."""
    from varmerge import pipeline

    if cfg.base is not None:
        path = Path(cfg.base.checkpoint)
        if not path.exists():
            raise PreflightError(f"base.checkpoint {path}: no such file or folder")
        if path.is_dir() and cfg.model.name not in ("lora_text", "hf_text"):
            raise PreflightError(
                f"base.checkpoint {path} is a folder (a Hugging Face model); model {cfg.model.name!r} "
                "takes a safetensors state dict file"
            )
        with torch.random.fork_rng():
            try:
                pipeline.initial_model(cfg, num_classes)
            except (ValueError, OSError) as exc:
                raise PreflightError(str(exc)) from None
    slices = [
        ("pretrain.data", cfg.pretrain and cfg.pretrain.data),
        ("base.prior_data", cfg.base and cfg.base.prior_data),
    ]
    for where, pd in slices:
        if pd is not None:
            _check_slice(cfg, where, pd, ds)


def _check_slice(cfg: ExperimentConfig, where: str, pd, ds) -> None:
    from varmerge import pipeline

    try:
        x, _ = pipeline.prepare_pretrain(cfg, pd=pd)
    except vdata.DataSourceMissing as exc:
        raise PreflightError(f"{where}: source not available here: {exc}") from None
    except (ValueError, KeyError, OSError) as exc:
        raise PreflightError(f"{where}: {exc}") from None
    if ds is None:
        return
    seen = _row_digests(x)
    tasks, _ = pipeline.prepare_tasks(cfg, dataset=ds)
    for t in tasks:
        shared = len(seen & _row_digests(t.test[0]))
        if shared:
            raise PreflightError(
                f"{where} shares {shared} examples with task {t.name!r}'s test set: use "
                "examples no task is tested on (another offset, source or test_fraction)"
            )
