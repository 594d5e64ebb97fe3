"""The Prefect tasks of a front estimation.

Every task takes and returns small references — ``{"path": ..., "sha256": ...}`` dicts, α lists,
run ids — never tensors. Outputs are files whose names carry a content key computed from the
task's inputs (config section, upstream hashes, the task's source); a task whose output file
already exists and loads with a valid hash is not re-run (Prefect's ``cache_key_fn`` returns the
same key, and a missing file invalidates it). Files are written atomically, so a killed flow
resumes from what was complete; a file that is there but fails its hash check (modified or
corrupted on disk) stops the flow with a message naming it, and is never silently overwritten.
Prefect persists the tasks' small results as JSON (never pickle). ``tasks.faults`` holds the
test-only fault-injection points.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from tasks import tracking
from tasks.faults import fault_point
from varmerge import data as vdata
from varmerge import io, models, pipeline
from varmerge.config import ExperimentConfig, parse_config
from varmerge.posterior import load_posterior

_SOURCE = hashlib.sha256(
    (inspect.getsource(pipeline) + Path(__file__).read_text()).encode()
).hexdigest()[:16]


def _cfg(cfg_json: str) -> ExperimentConfig:
    return parse_config(json.loads(cfg_json), "<flow config>")


def content_key(kind: str, *parts) -> str:
    payload = json.dumps([kind, _SOURCE, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _done(path: Path) -> bool:
    """Whether the output ``path`` is complete: False if absent, True if it loads with a valid
    hash. A file that is there but fails the check was modified or corrupted after it was written
    (writes are atomic and fsynced): that is an error naming the file, never a silent redo."""
    if not Path(path).exists():
        return False
    try:
        io.load_tensors(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; delete it to recompute it") from None
    return True


def _file_cache_key(kind: str, path_of):
    """A Prefect cache_key_fn: the content key and the output folder, or a fresh key when the
    output file is missing or damaged (the task then runs and reports a damaged file)."""

    def key_fn(context: TaskRunContext, parameters: dict) -> str:
        key, path = path_of(**parameters)
        where = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
        try:
            done = _done(path)
        except ValueError:
            done = False
        if not done:
            return f"{kind}-{key}-{where}-missing-{time.time_ns()}"
        return f"{kind}-{key}-{where}"

    return key_fn


def _check_ref(r: dict, what: str) -> None:
    """The file a reference names still holds what the flow recorded (its stored hash)."""
    stored = io.read_header(r["path"]).get("sha256")
    if stored != r["sha256"]:
        raise ValueError(
            f"{r['path']}: this {what} file changed since the flow recorded it "
            f"(sha256 {str(stored)[:12]}… != {r['sha256'][:12]}…); re-run the flow to recompute"
        )


def ref(path: Path, sha: str) -> dict:
    return {"path": str(path), "sha256": sha}


# ----------------------------------------------------------------------------------------- data
def _data_path(cfg_json: str, run_dir: str, data_dir: str | None = None):
    if data_dir is not None:  # a prepared (e.g. DVC-tracked) dataset folder: keyed by its content
        return dataset_hash(Path(data_dir))[:20], Path(data_dir)
    cfg = _cfg(cfg_json)
    key = content_key("data", cfg.data.model_dump(mode="json"))
    return key, Path(run_dir) / "data" / key


def dataset_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@task(name="prepare-data", cache_key_fn=_file_cache_key("data", _data_path), persist_result=True,
      result_serializer="json")
def prepare_data(cfg_json: str, run_dir: str, data_dir: str | None = None) -> dict:
    """The dataset as HF datasets on disk: ``data_dir`` if given (e.g. DVC's ``data/dvc``), else
    the configured offline source saved under the run folder. ``version`` is the DVC hash when
    the folder is DVC-tracked, else the first 16 hex digits of its content hash."""
    from tasks.dvc_version import data_version

    key, path = _data_path(cfg_json, run_dir, data_dir)
    if data_dir is not None:
        vdata.load_saved(path)  # a clear error if it is not a saved dataset
    elif not path.exists():
        vdata.save_dataset(pipeline.load_dataset(_cfg(cfg_json)), path)
    sha = dataset_hash(path)
    version = data_version(path) if data_dir is not None else None
    return {**ref(path, sha), "version": version or sha[:16]}


def _load_tasks(cfg: ExperimentConfig, data_ref: dict):
    return pipeline.prepare_tasks(cfg, dataset=vdata.load_saved(data_ref["path"]))


# ----------------------------------------------------------------------------------------- θ0
def _base_path(cfg_json: str, run_dir: str, data_ref: dict):
    cfg = _cfg(cfg_json)
    key = content_key("base", cfg.model.model_dump(mode="json"), cfg.posterior.seed, data_ref["sha256"])
    return key, Path(run_dir) / "base" / f"theta0-{key}.safetensors"


@task(name="base-model", cache_key_fn=_file_cache_key("base", _base_path), persist_result=True,
      result_serializer="json")
def base_model(cfg_json: str, run_dir: str, data_ref: dict) -> dict:
    """θ0, the shared starting point, as a full state dict file."""
    key, path = _base_path(cfg_json, run_dir, data_ref)
    if not _done(path):
        cfg = _cfg(cfg_json)
        _, n_classes = _load_tasks(cfg, data_ref)
        model = pipeline.base_model(cfg, n_classes)
        sha = io.save_state_dict(path, model.state_dict(), {"num_classes": n_classes, "model": cfg.model.name})
    else:
        sha = io.load_tensors(path)[1]["sha256"]
    return ref(path, sha)


def load_base(cfg: ExperimentConfig, base_ref: dict):
    tensors, header = io.load_tensors(base_ref["path"])
    if header["sha256"] != base_ref["sha256"]:
        raise ValueError(f"{base_ref['path']}: θ0 file changed since the flow recorded it")
    model = pipeline.build_model(cfg, header["num_classes"])
    io.check_matches_model(tensors, model.state_dict(), base_ref["path"])
    model.load_state_dict(tensors)
    return model


# ----------------------------------------------------------------------------------- finetunes
def _finetune_path(cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, task_index: int, **_):
    cfg = _cfg(cfg_json)
    t = cfg.data.tasks[task_index]
    key = content_key("posterior", cfg.posterior.model_dump(mode="json"), t.model_dump(mode="json"),
                      data_ref["sha256"], base_ref["sha256"], cfg.accelerator)
    return key, Path(run_dir) / "posteriors" / f"{t.name}-{key}.safetensors"


@task(name="finetune-task", task_run_name="finetune-{task_index}",
      cache_key_fn=_file_cache_key("posterior", _finetune_path), persist_result=True, result_serializer="json")
def finetune(cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, task_index: int,
             tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """One task's finetune; writes its posterior (means + precisions = the Hessian) and logs it.

    Finished MultiIVON/SoupIVON runs and AdamW-trained weights go to ``posteriors/parts/<name>/``
    as they complete (reused after a crash) and are removed once the posterior file is written.
    """
    key, path = _finetune_path(cfg_json, run_dir, data_ref, base_ref, task_index)
    cfg = _cfg(cfg_json)
    parts = path.parent / "parts" / path.stem
    if _done(path):
        shutil.rmtree(parts, ignore_errors=True)  # a kill between saving the posterior and this cleanup
        return ref(path, io.load_tensors(path)[1]["sha256"])
    tasks_, _ = _load_tasks(cfg, data_ref)
    t = tasks_[task_index]
    fault_point("finetune", t.name)
    base = load_base(cfg, base_ref)
    child = None
    if tracking_uri and parent_run_id:
        child = tracking.start_child(tracking_uri, parent_run_id, f"finetune/{t.name}",
                                     {"varmerge.stage": "finetune", "varmerge.task": t.name})
        tracking.log_params(tracking_uri, child, {"task": t.name, "classes": list(t.classes),
                                                  "train_examples": len(t.train[1]),
                                                  **cfg.posterior.model_dump(mode="json")})
    t0 = time.perf_counter()
    post, weights = pipeline.finetune_task(cfg, base, t, logger=tracking.lightning_logger(tracking_uri, child),
                                           resume_dir=parts)
    seconds = time.perf_counter() - t0
    sha = post.save(path)
    shutil.rmtree(parts, ignore_errors=True)
    get_run_logger().info("finetuned %s in %.1f s -> %s", t.name, seconds, path)
    if child:
        model = load_base(cfg, base_ref)
        models.load_trainable(model, weights)
        s = pipeline.score_sweep(model, {k: v.unsqueeze(0) for k, v in weights.items()}, tasks_)
        tracking.log_metrics(tracking_uri, child, {
            "seconds": seconds,
            **{f"test/{n.name}/accuracy": float(a) for n, a in zip(tasks_, s["accuracy"][0], strict=True)},
        })
        tracking.log_artifact(tracking_uri, child, path, "posterior")
        tracking.finish(tracking_uri, child)
    return ref(path, sha)


# ----------------------------------------------------------------------------------- α sweeps
def _sweep_path(cfg_json: str, run_dir: str, method: str, data_ref: dict, base_ref: dict, posterior_refs: list, **_):
    cfg = _cfg(cfg_json)
    key = content_key("sweep", method, cfg.merge.model_dump(mode="json"), data_ref["sha256"], base_ref["sha256"],
                      [r["sha256"] for r in posterior_refs])
    return key, Path(run_dir) / "sweeps" / f"{method}-{key}.safetensors"


@task(name="merge-sweep", task_run_name="sweep-{method}",
      cache_key_fn=_file_cache_key("sweep", _sweep_path), persist_result=True, result_serializer="json")
def sweep(cfg_json: str, run_dir: str, method: str, data_ref: dict, base_ref: dict, posterior_refs: list,
          tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """Merge with one method over the whole α grid and score every merged model on every task."""
    key, path = _sweep_path(cfg_json, run_dir, method, data_ref, base_ref, posterior_refs)
    cfg = _cfg(cfg_json)
    if not _done(path):
        fault_point("sweep", method)
        tasks_, _ = _load_tasks(cfg, data_ref)
        base = load_base(cfg, base_ref)
        expected = models.trainable_state_dict(base)
        for r in posterior_refs:
            _check_ref(r, "posterior")
        posts = [load_posterior(r["path"], expected=expected) for r in posterior_refs]
        t0 = time.perf_counter()
        res = pipeline.sweep_and_score(cfg, method, posts, base, tasks_)
        seconds = time.perf_counter() - t0
        io.save_tensors(path, {"alpha": res["alpha"], "accuracy": res["accuracy"], "loss": res["loss"]},
                        {"kind": "sweep", "method": method, "tasks": [t.name for t in tasks_], "seconds": seconds})
        if tracking_uri and parent_run_id:
            child = tracking.start_child(tracking_uri, parent_run_id, f"merge/{method}",
                                         {"varmerge.stage": "merge", "varmerge.method": method})
            mean = res["accuracy"].mean(1)
            b = int(mean.argmax())
            tracking.log_params(tracking_uri, child, {"method": method, "grid_size": len(res["alpha"]),
                                                      **cfg.merge.model_dump(mode="json")})
            tracking.log_metrics(tracking_uri, child, {"max_mean_accuracy": float(mean[b]), "seconds": seconds,
                                                       **{f"best_alpha/{t.name}": float(a) for t, a in
                                                          zip(tasks_, res["alpha"][b], strict=True)}})
            table = path.with_suffix(".json")
            io.write_text_atomic(table, json.dumps({"tasks": [t.name for t in tasks_], "alpha": res["alpha"].tolist(),
                                                    "accuracy": res["accuracy"].tolist(), "loss": res["loss"].tolist()}))
            tracking.log_artifact(tracking_uri, child, table, "sweep")
            tracking.finish(tracking_uri, child)
    return ref(path, io.load_tensors(path)[1]["sha256"])


def load_sweep(sweep_ref: dict) -> dict:
    if "sha256" in sweep_ref:
        _check_ref(sweep_ref, "sweep")
    tensors, header = io.load_tensors(sweep_ref["path"])
    return {**tensors, "tasks": header["tasks"], "method": header["method"], "seconds": header["seconds"]}


# ----------------------------------------------------------------------------------- multitask
def _multitask_path(cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, alpha: list, **_):
    cfg = _cfg(cfg_json)
    a = [round(float(v), 9) for v in alpha]
    key = content_key("multitask", cfg.posterior.model_dump(mode="json"), cfg.multitask_steps, a,
                      data_ref["sha256"], base_ref["sha256"], cfg.accelerator)
    return key, Path(run_dir) / "multitask" / f"alpha-{key}.safetensors"


@task(name="multitask-finetune", cache_key_fn=_file_cache_key("multitask", _multitask_path), persist_result=True,
      result_serializer="json")
def multitask(cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, alpha: list,
              tracking_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """The real multitask finetune at α; returns its file and realised per-task accuracies."""
    key, path = _multitask_path(cfg_json, run_dir, data_ref, base_ref, alpha)
    cfg = _cfg(cfg_json)
    if not _done(path):
        fault_point("multitask")
        tasks_, _ = _load_tasks(cfg, data_ref)
        base = load_base(cfg, base_ref)
        t0 = time.perf_counter()
        child = None
        if tracking_uri and parent_run_id:
            child = tracking.start_child(tracking_uri, parent_run_id, f"multitask/alpha={[round(a, 3) for a in alpha]}",
                                         {"varmerge.stage": "multitask_finetune", "varmerge.alpha": json.dumps(alpha)})
        model, acc = pipeline.multitask_finetune(cfg, base, tasks_, alpha,
                                                 logger=tracking.lightning_logger(tracking_uri, child))
        seconds = time.perf_counter() - t0
        if child:
            tracking.log_metrics(tracking_uri, child, {"seconds": seconds, **{
                f"test/{t.name}/accuracy": float(a) for t, a in zip(tasks_, acc, strict=True)}})
            tracking.finish(tracking_uri, child)
        io.save_state_dict(path, model.state_dict(), {"alpha": list(alpha), "accuracy": acc.tolist(),
                                                      "tasks": [t.name for t in tasks_], "seconds": seconds})
    tensors, header = io.load_tensors(path)
    return {**ref(path, header["sha256"]), "alpha": header["alpha"], "accuracy": header["accuracy"],
            "seconds": header["seconds"]}


def example_input(cfg: ExperimentConfig, data_ref: dict):
    """One test input (numpy) for MLflow's model signature; None for dict (text) inputs."""
    tasks_, _ = _load_tasks(cfg, data_ref)
    x = tasks_[0].test[0]
    return None if isinstance(x, dict) else x[:1].numpy()


def multitask_model(cfg: ExperimentConfig, mt_ref: dict, base_ref: dict):
    _check_ref(mt_ref, "multitask model")
    model = load_base(cfg, base_ref)
    model.load_state_dict(io.load_state_dict(mt_ref["path"], expected=model.state_dict()))
    return model


__all__ = ["prepare_data", "base_model", "finetune", "sweep", "multitask", "load_sweep", "load_base",
           "content_key", "torch"]
