"""The Prefect tasks of a front estimation, over the run store (:mod:`varmerge.store`).

Every task takes the run plan (:class:`varmerge.plan.RunPlan`, resolved once before the flow
starts: nothing here parses a config) and small references — ``{"path", "sha256"}`` dicts with
paths relative to the run folder, α lists, MLflow parents — never tensors. Each output is a file
of the run store whose name carries a content key of the task's inputs and of the code that
computes it (the ``varmerge`` package and this package). A task first asks the store: a finished
file is reused, a missing one is computed under the key's lock (so two runs of one config at the
same time do each piece of work once), and a damaged one stops the run with a message naming it.
Files are written atomically, so a killed flow resumes from what was complete. Caching is the
store's, not Prefect's: the tasks use no Prefect cache and persist no Prefect results.

Each task is a few lines: its key, the store step, and one ``_make_*`` function that loads the
inputs, computes, logs to an MLflow child run (:func:`tasks.tracking.child_run`, always closed)
and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks as _tasks_package
from tasks import progress, tracking
from tasks.logger import lightning_logger
from tasks.tracking import Parent
from varmerge import data as vdata
from varmerge import files, models, pipeline, sequence
from varmerge.plan import RunPlan
from varmerge.posterior import posterior_from_tensors
from varmerge.store import RunStore, folder_hash, source_digest

_STORES: dict[str, RunStore] = {}
# The code's syntax trees are digested once, here at import (on a Dask worker: when its first task
# arrives, before any task runs), so that no task parses source while other threads may too.
source_digest([_tasks_package])


def store_for(run_dir: str | Path) -> RunStore:
    """The run store of ``run_dir``, one per process (its in-memory loads are shared by tasks)."""
    root = str(Path(run_dir).resolve())
    if root not in _STORES:
        _STORES[root] = RunStore(root, code=[_tasks_package])
    return _STORES[root]


def _say(msg: str, *args) -> None:
    try:
        get_run_logger().info(msg, *args)
    except Exception:  # noqa: BLE001 - outside a Prefect run (library use of these functions)
        pass


def _timed(label: str, fn: Callable[..., tuple]) -> tuple:
    """``fn(report)`` under the progress of step ``label``; returns its result and the seconds."""
    t0 = time.perf_counter()
    with progress.step(label) as report:
        out = fn(report)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- data
def data_key(plan: RunPlan) -> str:
    """The prepared data's key: the data section, the model (its tokenizer), and the content of
    a prepared folder or of the user's own files (an edited CSV is new data)."""
    cfg = plan.cfg
    if plan.data_dir is not None:
        source = folder_hash(plan.data_dir)
    else:
        source = [folder_hash(f) for f in vdata.source_files(cfg.data.source, cfg.data.options) if f.is_file()]
    inputs = [cfg.data.model_dump(mode="json"), cfg.model.name, cfg.model.options.get("model_path"), source or None]
    return store_for(plan.run_dir).key("data", *inputs)


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(plan: RunPlan) -> dict:
    """The per-task train/test tensors, prepared once per run (loaded, split, tokenised) from the
    configured offline source or from ``plan.data_dir``, a saved dataset (e.g. DVC's ``data/dvc``).
    ``version`` is the DVC hash when the folder is DVC-tracked, else the file's content hash."""
    from tasks.dvc_version import data_version

    def make(path: Path) -> str:
        ds = vdata.load_saved(plan.data_dir) if plan.data_dir is not None else pipeline.load_dataset(plan.cfg)
        tensors, header = pipeline.tasks_to_tensors(*pipeline.prepare_tasks(plan.cfg, dataset=ds))
        return files.save_tensors(path, tensors, {**header, "class_names": vdata.class_names(ds)})

    ref, _ = store_for(plan.run_dir).compute("data", data_key(plan), make, name="tasks")
    version = data_version(Path(plan.data_dir)) if plan.data_dir is not None else None
    return {**ref, "version": version or ref["sha256"][:16]}


def load_tasks(plan: RunPlan, data_ref: dict):
    """``(task data, num_classes)`` of a prepared-data reference (read and hashed once per process)."""
    return pipeline.tasks_from_tensors(*store_for(plan.run_dir).load(data_ref))


# ----------------------------------------------------------------------------------------- θ0
def pretrained_store(run_dir: str | Path) -> RunStore:
    """The pretrained θ0 of every config under one output folder (``<output>/pretrained/``): a
    config naming the same ``pretrain`` section, model and init reuses them."""
    return store_for(Path(run_dir).resolve().parent / "pretrained")


def _theta0_store_key(plan: RunPlan, num_classes: int) -> tuple[RunStore, str]:
    """θ0's store (the run's, or the shared pretrained one) and key."""
    cfg = plan.cfg
    start = [cfg.model.model_dump(mode="json"), cfg.posterior.seed, num_classes]
    start += [cfg.base and cfg.base.model_dump(mode="json"), cfg.base and folder_hash(cfg.base.checkpoint)]
    if cfg.pretrain is None:
        store = store_for(plan.run_dir)
        return store, store.key("base", *start)
    store = pretrained_store(plan.run_dir)
    pretrain = [cfg.pretrain.model_dump(mode="json"), pipeline.pretrain_source(cfg)]
    return store, store.key("pretrain", *start, *pretrain, [cfg.data.image_pool, cfg.data.max_length], cfg.accelerator)


def _relative(plan: RunPlan, store: RunStore, ref: dict | None) -> dict | None:
    """A reference of another store, relative to the run folder (how every step resolves it)."""
    if ref is None:
        return None
    return {**ref, "path": os.path.relpath(store.resolve(ref), plan.run_dir)}


@task(name="theta0", cache_policy=NO_CACHE)
def theta0(plan: RunPlan, data_ref: dict, parent: Parent | None = None) -> dict:
    """θ0, the shared starting point, as a full state dict file, and its posterior (``prior``,
    None without one): a seeded init, the user's ``base`` checkpoint, or the IVON ``pretrain``
    run on its own data (a nested MLflow run ``pretrain``, cached in ``<output>/pretrained``)."""
    _, num_classes = load_tasks(plan, data_ref)
    store, key = _theta0_store_key(plan, num_classes)
    prior_path = store.path("base", key, "prior")
    make = partial(_make_theta0, plan, data_ref, parent, num_classes, prior_path)
    ref = store.compute("base", key, make, name="theta0")[0]
    prior = store.find("base", key, "prior")
    if pipeline.has_prior(plan.cfg) and prior is None:
        raise ValueError(
            f"{prior_path}: θ0's prior is missing beside {store.resolve(ref)}; delete θ0 to recompute both"
        )
    if store is not store_for(plan.run_dir):
        ref, prior = _relative(plan, store, ref), _relative(plan, store, prior)
    return {**ref, "prior": prior}


def _make_theta0(plan: RunPlan, data_ref: dict, parent, num_classes: int, prior_path: Path, path: Path) -> str:
    cfg = plan.cfg
    pretraining = cfg.pretrain is not None
    with tracking.child_run(parent if pretraining else None, "pretrain", {"varmerge.stage": "pretrain"}) as child:
        if child:
            tracking.log_params(parent.uri, child, cfg.pretrain.model_dump(mode="json"))
        logger = lightning_logger(parent and parent.uri, child)
        label = "pretraining θ0" if pretraining else "building θ0"
        (model, prior), seconds = _timed(label, lambda r: pipeline.theta0(plan, num_classes, logger=logger, report=r))
        if prior is not None:
            prior.save(prior_path)  # before θ0: θ0's file marks the pair complete
        if child:
            _log_scores(plan, parent, child, seconds, model, models.trainable_state_dict(model), data_ref)
            tracking.log_artifact(parent.uri, child, prior_path, "prior")
    if pretraining:
        _say("pretrained θ0 in %.1f s -> %s", seconds, path.name)
    return files.save_state_dict(path, model.state_dict(), {"num_classes": num_classes, "model": cfg.model.name})


def _log_scores(plan: RunPlan, parent: Parent, child: str, seconds: float, model, weights: dict, data_ref) -> None:
    """``seconds`` and the test accuracy per task of ``model`` with trainable ``weights``."""
    task_data, _ = load_tasks(plan, data_ref)
    s = pipeline.score_sweep(model, {k: v.unsqueeze(0) for k, v in weights.items()}, task_data)
    accuracy = {f"test/{t.name}/accuracy": float(a) for t, a in zip(task_data, s["accuracy"][0], strict=True)}
    tracking.log_metrics(parent.uri, child, {"seconds": seconds, **accuracy})


def load_theta0(plan: RunPlan, theta0_ref: dict):
    """θ0 as a module of the configured architecture."""
    tensors, header = store_for(plan.run_dir).load(theta0_ref)
    model = pipeline.build_architecture(plan.cfg, header["num_classes"])
    files.check_matches_model(tensors, model.state_dict(), theta0_ref["path"])
    model.load_state_dict(tensors)
    return model


def load_prior(plan: RunPlan, theta0_ref: dict):
    """θ0's posterior (the finetunes' prior), or None."""
    ref = theta0_ref.get("prior")
    if ref is None:
        return None
    expected = models.trainable_state_dict(load_theta0(plan, theta0_ref))
    return posterior_from_tensors(*store_for(plan.run_dir).load(ref), expected, ref["path"])


def _start_inputs(plan: RunPlan, theta0_ref: dict) -> list:
    """What of θ0 a finetune depends on: its hash and, when IVON starts from it, the prior's."""
    prior = theta0_ref.get("prior")
    carried = prior is not None and (plan.cfg.pretrain is None or plan.cfg.pretrain.carry_hessian)
    return [theta0_ref["sha256"], prior["sha256"] if carried else None]


# ----------------------------------------------------------------------------------- finetunes
def posterior_key(plan: RunPlan, data_ref: dict, theta0_ref: dict, task_index: int) -> str:
    """What a task's posterior depends on: the method, its training and its own options (nothing
    else of the ``posterior`` section), the task, the data and θ0."""
    method = [plan.cfg.posterior.method, plan.finetune.key(), plan.posterior_options.key()]
    task_section = plan.cfg.data.tasks[task_index].model_dump(mode="json")
    inputs = [task_section, data_ref["sha256"], _start_inputs(plan, theta0_ref)]
    return store_for(plan.run_dir).key("posterior", *method, *inputs)


@task(name="finetune-task", task_run_name="finetune-{task_index}", cache_policy=NO_CACHE)
def finetune(plan: RunPlan, data_ref: dict, theta0_ref: dict, task_index: int, parent: Parent | None = None) -> dict:
    """One task's finetune; writes its posterior (means + precisions = the Hessian) and logs it.

    Finished MultiIVON/SoupIVON runs and AdamW-trained weights go to ``posteriors/parts/<name>/``
    as they complete (reused after a crash) and are removed once the posterior file is written.
    """
    store, name = store_for(plan.run_dir), plan.tasks[task_index].name
    key = posterior_key(plan, data_ref, theta0_ref, task_index)
    parts = store.path("posterior", key, name).parent / "parts" / f"{name}-{key}"
    make = partial(_make_posterior, plan, data_ref, theta0_ref, task_index, parent, parts)
    ref, _ = store.compute("posterior", key, make, name=name)
    shutil.rmtree(parts, ignore_errors=True)  # also after a kill between the save and this cleanup
    return ref


def _make_posterior(plan: RunPlan, data_ref, theta0_ref, task_index: int, parent, parts: Path, path: Path) -> str:
    task_data, _ = load_tasks(plan, data_ref)
    t, base = task_data[task_index], load_theta0(plan, theta0_ref)
    tags = {"varmerge.stage": "finetune", "varmerge.task": t.name}
    with tracking.child_run(parent, f"finetune/{t.name}", tags) as child:
        if child:
            params = {"task": t.name, "classes": list(t.classes), "train_examples": len(t.train[1])}
            tracking.log_params(parent.uri, child, {**params, **plan.cfg.posterior.model_dump(mode="json")})
        logger, prior = lightning_logger(parent and parent.uri, child), load_prior(plan, theta0_ref)

        def fit(report):
            return pipeline.finetune_task(plan, base, t, logger=logger, resume_dir=parts, prior=prior, report=report)

        (post, weights), seconds = _timed(sequence.finetune_label(plan, t), fit)
        sha = post.save(path)
        _say("finetuned %s in %.1f s -> %s", t.name, seconds, path.name)
        if child:
            _log_scores(plan, parent, child, seconds, base, weights, data_ref)
            tracking.log_artifact(parent.uri, child, path, "posterior")
    return sha


@task(name="check-finetunes", cache_policy=NO_CACHE)
def learning_scores(plan: RunPlan, data_ref: dict, theta0_ref: dict, posterior_refs: list) -> dict:
    """θ0's and each finetune's accuracy on each task's own test set, and chance there (the gate)."""
    task_data, _ = load_tasks(plan, data_ref)
    base, posteriors = load_theta0(plan, theta0_ref), load_posteriors(plan, theta0_ref, posterior_refs)
    with progress.step("checking the finetunes learned"):
        return pipeline.learning_scores(base, posteriors, task_data)


def find_posterior(plan: RunPlan, data_ref: dict, theta0_ref: dict, task_index: int) -> dict | None:
    """The finished posterior of a task for these inputs (found by its key), or None."""
    key = posterior_key(plan, data_ref, theta0_ref, task_index)
    return store_for(plan.run_dir).find("posterior", key, plan.tasks[task_index].name)


def load_posteriors(plan: RunPlan, theta0_ref: dict, posterior_refs: list, device=None) -> list:
    """The posteriors of ``posterior_refs``, checked against θ0's parameters, on ``device``."""
    store = store_for(plan.run_dir)
    expected = models.trainable_state_dict(load_theta0(plan, theta0_ref))
    return [posterior_from_tensors(*store.load(r), expected, r["path"], device) for r in posterior_refs]


# ----------------------------------------------------------------------------------- α sweeps
def sweep_key(plan: RunPlan, method: str, data_ref: dict, theta0_ref: dict, posterior_refs: list) -> str:
    """The content key of one method's sweep (how the ground-truth flow finds it): the α grid (its
    spacing and the default α appended to it, which follow the tasks' sizes and
    ``selection.temperature``), the method's options (and task arithmetic's, which MAP
    evaluates), the data, θ0 and posteriors."""
    step = plan.merge_step(method)
    rules = [method, "task_arithmetic"] if step.spec.kind == "estimator" else [method]
    options = {m: plan.merge_step(m).options.model_dump(mode="json") for m in rules}
    upstream = [data_ref["sha256"], theta0_ref["sha256"], [r["sha256"] for r in posterior_refs]]
    grid = hashlib.sha256(plan.grid().numpy().tobytes()).hexdigest()
    return store_for(plan.run_dir).key("sweep", method, plan.cfg.merge.spacing, grid, options, *upstream)


@task(name="merge-sweep", task_run_name="sweep-{method}", cache_policy=NO_CACHE)
def sweep(
    plan: RunPlan, method: str, inputs: dict, parent: Parent | None = None, blocks: list[dict] | None = None
) -> dict:
    """Merge with one method over the whole α grid and score every merged model on every task;
    or, given ``blocks`` (the :func:`sweep_block` results covering the grid in order), join them
    into the same file a whole sweep writes. ``inputs``: the ``data``, ``theta0`` and
    ``posteriors`` references."""
    store = store_for(plan.run_dir)
    key = sweep_key(plan, method, inputs["data"], inputs["theta0"], inputs["posteriors"])
    make = partial(_make_sweep, plan, method, inputs, parent, blocks)
    ref = store.compute("sweep", key, make, name=method)[0]
    for b in blocks or []:  # joined (now or by an earlier run): the blocks are not needed again
        store.resolve(b).unlink(missing_ok=True)
    return ref


def _make_sweep(plan: RunPlan, method: str, inputs: dict, parent, blocks, path: Path) -> str:
    if blocks:
        parts = [load_sweep(plan, b) for b in blocks]
        res = {k: torch.cat([p[k] for p in parts]) for k in ("alpha", "accuracy", "loss")}
        seconds = sum(p["seconds"] for p in parts)
        if not torch.equal(res["alpha"], plan.grid()):
            raise ValueError(f"sweep {method}: its blocks do not cover the α grid in order")
    else:
        res, seconds = _sweep_rows(plan, method, inputs, None, sequence.sweep_label(method))
    sha = _save_sweep(plan, path, method, res, seconds)
    _say("swept %s over %d α in %.1f s", method, len(res["alpha"]), seconds)
    _log_sweep(plan, parent, method, res, seconds, path)
    return sha


def _sweep_rows(plan: RunPlan, method: str, inputs: dict, rows: list[int] | None, label: str) -> tuple[dict, float]:
    """Merge and score ``method`` at the grid's ``rows`` ``[lo, hi)`` (None: all), on the sweep's device."""
    task_data, _ = load_tasks(plan, inputs["data"])
    device = pipeline.sweep_device(plan.cfg)
    base = load_theta0(plan, inputs["theta0"]).to(device)
    posts = load_posteriors(plan, inputs["theta0"], inputs["posteriors"], device)
    alpha = None if rows is None else plan.grid()[rows[0] : rows[1]]
    return _timed(label, lambda r: pipeline.sweep_and_score(plan, method, posts, base, task_data, alpha, report=r))


@task(name="merge-sweep-block", task_run_name="sweep-{method}-{rows}", cache_policy=NO_CACHE)
def sweep_block(plan: RunPlan, method: str, inputs: dict, rows: list[int]) -> dict:
    """Rows ``[lo, hi)`` of one merge rule's sweep over the α grid (one worker's share)."""
    lo, hi = rows
    store = store_for(plan.run_dir)
    whole = sweep_key(plan, method, inputs["data"], inputs["theta0"], inputs["posteriors"])

    def make(path: Path) -> str:
        res, seconds = _sweep_rows(plan, method, inputs, rows, f"{sequence.sweep_label(method)} α {lo}–{hi}")
        return _save_sweep(plan, path, method, res, seconds)

    return store.compute("sweep", store.key("sweep-block", whole, lo, hi), make, name=f"{method}-{lo}-{hi}")[0]


def _save_sweep(plan: RunPlan, path: Path, method: str, res: dict, seconds: float) -> str:
    tensors = {"alpha": res["alpha"], "accuracy": res["accuracy"], "loss": res["loss"]}
    return files.save_tensors(
        path, tensors, {"kind": "sweep", "method": method, "tasks": plan.task_names, "seconds": seconds}
    )


def _log_sweep(plan: RunPlan, parent: Parent | None, method: str, res: dict, seconds: float, path: Path) -> None:
    """A child run ``merge/<method>``: the sweep's summary as metrics, its table as an artifact."""
    from varmerge.pareto import front_summary

    tags = {"varmerge.stage": "merge", "varmerge.method": method}
    with tracking.child_run(parent, f"merge/{method}", tags) as child:
        if child is None:
            return
        s = front_summary(res["alpha"], res["accuracy"])
        params = {"method": method, "grid_size": len(res["alpha"]), **plan.cfg.merge.model_dump(mode="json")}
        tracking.log_params(parent.uri, child, params)
        best = {f"best_alpha/{n}": float(a) for n, a in zip(plan.task_names, s["best_alpha"], strict=True)}
        tracking.log_metrics(
            parent.uri, child, {"max_mean_accuracy": s["max_mean_accuracy"], "seconds": seconds, **best}
        )
        table = {"tasks": plan.task_names, **{k: res[k].tolist() for k in ("alpha", "accuracy", "loss")}}
        files.write_text_atomic(path.with_suffix(".json"), json.dumps(table))
        tracking.log_artifact(parent.uri, child, path.with_suffix(".json"), "sweep")


def load_sweep(plan: RunPlan, sweep_ref: dict) -> dict:
    tensors, header = store_for(plan.run_dir).load(sweep_ref)
    return {**tensors, "tasks": header["tasks"], "method": header["method"], "seconds": header["seconds"]}


def find_sweep(plan: RunPlan, method: str, data_ref: dict, theta0_ref: dict, posterior_refs: list) -> dict | None:
    """The finished sweep of ``method`` for these inputs (found by its key), or None."""
    key = sweep_key(plan, method, data_ref, theta0_ref, posterior_refs)
    return store_for(plan.run_dir).find("sweep", key, method)


# ----------------------------------------------------------------------------------- multitask
def multitask_key(plan: RunPlan, data_ref: dict, theta0_ref: dict, alpha: tuple[float, ...]) -> str:
    """The key of the multitask finetune at ``alpha``: its exact floats (JSON writes a float's
    shortest round-tripping form, so the same α gives the same key wherever it comes from)."""
    inputs = [list(alpha), data_ref["sha256"], _start_inputs(plan, theta0_ref)]
    return store_for(plan.run_dir).key("multitask", plan.multitask.key(), *inputs)


@task(name="multitask-finetune", cache_policy=NO_CACHE)
def multitask(plan: RunPlan, data_ref: dict, theta0_ref: dict, alpha: tuple, parent: Parent | None = None) -> dict:
    """The real multitask finetune at α; returns its file and realised per-task accuracies."""
    alpha = tuple(float(a) for a in alpha)
    store = store_for(plan.run_dir)
    make = partial(_make_multitask, plan, data_ref, theta0_ref, alpha, parent)
    ref, _ = store.compute("multitask", multitask_key(plan, data_ref, theta0_ref, alpha), make, name="alpha")
    header = files.read_header(store.resolve(ref))
    return {**ref, "alpha": alpha, "accuracy": header["accuracy"], "seconds": header["seconds"]}


def _make_multitask(plan: RunPlan, data_ref, theta0_ref, alpha: tuple, parent, path: Path) -> str:
    task_data, _ = load_tasks(plan, data_ref)
    base, shown = load_theta0(plan, theta0_ref), [round(v, 3) for v in alpha]
    tags = {"varmerge.stage": "multitask_finetune", "varmerge.alpha": json.dumps(list(alpha))}
    with tracking.child_run(parent, f"multitask/alpha={shown}", tags) as child:
        logger, prior = lightning_logger(parent and parent.uri, child), load_prior(plan, theta0_ref)

        def fit(report):
            return pipeline.multitask_finetune(plan, base, task_data, alpha, logger=logger, prior=prior, report=report)

        (model, acc), seconds = _timed(sequence.multitask_label(alpha), fit)
        _say("multitask finetune at α=%s in %.1f s", shown, seconds)
        if child:
            metrics = {f"test/{t.name}/accuracy": float(v) for t, v in zip(task_data, acc, strict=True)}
            tracking.log_metrics(parent.uri, child, {"seconds": seconds, **metrics})
    header = {"alpha": list(alpha), "accuracy": acc.tolist(), "tasks": plan.task_names, "seconds": seconds}
    return files.save_state_dict(path, model.state_dict(), header)


def class_names(plan: RunPlan, data_ref: dict) -> list[str]:
    """The names of the classes of the prepared data (the user's label values)."""
    _, header = store_for(plan.run_dir).load(data_ref)
    return header.get("class_names") or [str(i) for i in range(header["num_classes"])]


def multitask_model(plan: RunPlan, mt_ref: dict, theta0_ref: dict):
    model = load_theta0(plan, theta0_ref)
    tensors, _ = store_for(plan.run_dir).load(mt_ref)
    files.check_matches_model(tensors, model.state_dict(), mt_ref["path"])
    model.load_state_dict(tensors)
    return model


def example_input(plan: RunPlan, data_ref: dict):
    """Two test inputs (numpy) for MLflow's model signature (two, so that torch.export keeps the
    batch dimension dynamic: one would fix it to 1); None for dict (text) inputs."""
    task_data, _ = load_tasks(plan, data_ref)
    x = task_data[0].test[0]
    return None if isinstance(x, dict) else x[:2].numpy()


def example_texts(plan: RunPlan, data_ref: dict, n: int = 3) -> list[str]:
    """The first ``n`` test texts of the first task (decoded from their tokens): a text model's
    input example, from the user's own test data."""
    task_data, _ = load_tasks(plan, data_ref)
    ids = task_data[0].test[0]["input_ids"][:n]
    return models.text_tokenizer(pipeline.model_path(plan.cfg)).batch_decode(ids, skip_special_tokens=True)
