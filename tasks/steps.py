"""The Prefect tasks of a front estimation, over the run store (:mod:`varmerge.store`).

Every task takes and returns small references — ``{"path", "sha256"}`` dicts with paths relative
to the run folder, α lists, run ids — never tensors. Each output is a file of the run store whose
name carries a content key of the task's inputs and of the code that computes it (the ``varmerge``
package and this package). A task first asks the store: a finished file is reused, a missing one
is computed under the key's lock (so two runs of one config at the same time do each piece of work
once), and a damaged one stops the run with a message naming it. Files are written atomically, so
a killed flow resumes from what was complete. Caching is the store's, not Prefect's: the tasks use
no Prefect cache and persist no Prefect results.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks as _tasks_package
from tasks import progress, tracking
from tasks.tracking import Parent
from varmerge import data as vdata
from varmerge import io, models, pipeline, sequence
from varmerge.config import ExperimentConfig, parse_config
from varmerge.grid import simplex_grid
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


def _cfg(cfg_json: str) -> ExperimentConfig:
    return parse_config(json.loads(cfg_json), "<flow config>")


def _say(msg: str, *args) -> None:
    try:
        get_run_logger().info(msg, *args)
    except Exception:  # noqa: BLE001 - outside a Prefect run (library use of these functions)
        pass


# ----------------------------------------------------------------------------------------- data
def _data_key(store: RunStore, cfg: ExperimentConfig, data_dir: str | None) -> str:
    """The prepared data's key: the data section, the model (its tokenizer), and the content of
    a prepared folder or of the user's own files (an edited CSV is new data)."""
    if data_dir is not None:
        source = folder_hash(data_dir)
    else:
        source = [folder_hash(f) for f in vdata.source_files(cfg.data.source, cfg.data.options) if f.is_file()]
    return store.key(
        "data", cfg.data.model_dump(mode="json"), cfg.model.name, cfg.model.options.get("model_path"), source or None
    )


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(cfg_json: str, run_dir: str, data_dir: str | None = None) -> dict:
    """The per-task train/test tensors, prepared once per run (loaded, split, tokenised) from the
    configured offline source or from ``data_dir``, a saved dataset (e.g. DVC's ``data/dvc``).
    ``version`` is the DVC hash when the folder is DVC-tracked, else the file's content hash."""
    from tasks.dvc_version import data_version

    cfg, store = _cfg(cfg_json), store_for(run_dir)

    def make(path: Path) -> str:
        ds = vdata.load_saved(data_dir) if data_dir is not None else pipeline.load_dataset(cfg)
        tensors, header = pipeline.tasks_to_tensors(*pipeline.prepare_tasks(cfg, dataset=ds))
        return io.save_tensors(path, tensors, header)

    ref, _ = store.compute("data", _data_key(store, cfg, data_dir), make, name="tasks")
    version = data_version(Path(data_dir)) if data_dir is not None else None
    return {**ref, "version": version or ref["sha256"][:16]}


def load_tasks(run_dir: str, data_ref: dict):
    """``(tasks, num_classes)`` of a prepared-data reference (read and hashed once per process)."""
    return pipeline.tasks_from_tensors(*store_for(run_dir).load(data_ref))


# ----------------------------------------------------------------------------------------- θ0
def _checkpoint_hash(cfg: ExperimentConfig) -> str | None:
    if cfg.base is None:
        return None
    return folder_hash(cfg.base.checkpoint)


def pretrained_store(run_dir: str | Path) -> RunStore:
    """The pretrained θ0 of every config under one output folder (``<output>/pretrained/``): a
    config naming the same ``pretrain`` section, model and init reuses them."""
    return store_for(Path(run_dir).resolve().parent / "pretrained")


def _relative(run_dir: str, store: RunStore, ref: dict) -> dict:
    """A reference of another store, relative to ``run_dir`` (how every step resolves it)."""
    return {**ref, "path": os.path.relpath(store.resolve(ref), Path(run_dir).resolve())}


@task(name="base-model", cache_policy=NO_CACHE)
def base_model(cfg_json: str, run_dir: str, data_ref: dict, parent: Parent | None = None) -> dict:
    """θ0, the shared starting point, as a full state dict file, and its posterior (``prior``,
    None without one): a seeded init, the user's ``base`` checkpoint, or the IVON ``pretrain``
    run on its own data (a nested MLflow run ``pretrain``, cached in ``<output>/pretrained``)."""
    cfg = _cfg(cfg_json)
    _, n_classes = load_tasks(run_dir, data_ref)
    header = {"num_classes": n_classes, "model": cfg.model.name}
    if cfg.pretrain is None:
        store = store_for(run_dir)
        inputs = [cfg.model.model_dump(mode="json"), cfg.posterior.seed, n_classes]
        key = store.key("base", *inputs, cfg.base and cfg.base.model_dump(mode="json"), _checkpoint_hash(cfg))
    else:
        store = pretrained_store(run_dir)
        key = store.key(
            "pretrain",
            cfg.model.model_dump(mode="json"),
            cfg.posterior.seed,
            n_classes,
            cfg.base and cfg.base.model_dump(mode="json"),
            _checkpoint_hash(cfg),
            cfg.pretrain.model_dump(mode="json"),
            pipeline.pretrain_source(cfg),
            [cfg.data.image_pool, cfg.data.max_length],
            cfg.accelerator,
        )
    prior_path = store.path("base", key, "prior")

    def make(path: Path) -> str:
        child = None
        if parent and cfg.pretrain is not None:
            child = tracking.start_child(parent.uri, parent.run_id, "pretrain", {"varmerge.stage": "pretrain"})
            tracking.log_params(parent.uri, child, cfg.pretrain.model_dump(mode="json"))
        t0 = time.perf_counter()
        logger = tracking.lightning_logger(parent.uri, child) if child else None
        with progress.step("pretraining θ0" if cfg.pretrain is not None else "building θ0") as report:
            model, prior = pipeline.start_point(cfg, n_classes, logger=logger, report=report)
        seconds = time.perf_counter() - t0
        if prior is not None:
            prior.save(prior_path)  # before θ0: θ0's file marks the pair complete
        if child:
            tasks_, _ = load_tasks(run_dir, data_ref)
            _log_scores(parent, child, seconds, model, models.trainable_state_dict(model), tasks_)
            tracking.log_artifact(parent.uri, child, prior_path, "prior")
            tracking.finish(parent.uri, child)
        if cfg.pretrain is not None:
            _say("pretrained θ0 in %.1f s -> %s", seconds, path.name)
        return io.save_state_dict(path, model.state_dict(), header)

    ref = store.compute("base", key, make, name="theta0")[0]
    prior = store.find("base", key, "prior")
    wants_prior = cfg.pretrain is not None or (
        cfg.base is not None and bool(cfg.base.prior_precision or cfg.base.prior_data)
    )
    if wants_prior and prior is None:
        raise ValueError(
            f"{prior_path}: θ0's prior is missing beside {store.resolve(ref)}; delete θ0 to recompute both"
        )
    if store is not store_for(run_dir):
        ref, prior = _relative(run_dir, store, ref), prior and _relative(run_dir, store, prior)
    return {**ref, "prior": prior}


def _log_scores(parent: Parent, child: str, seconds: float, model, weights: dict, tasks_) -> None:
    """``seconds`` and the test accuracy per task of ``model`` with trainable ``weights``."""
    s = pipeline.score_sweep(model, {k: v.unsqueeze(0) for k, v in weights.items()}, tasks_)
    accuracy = {f"test/{t.name}/accuracy": float(a) for t, a in zip(tasks_, s["accuracy"][0], strict=True)}
    tracking.log_metrics(parent.uri, child, {"seconds": seconds, **accuracy})


def load_base(cfg: ExperimentConfig, run_dir: str, base_ref: dict):
    """θ0 as a module of the configured architecture."""
    tensors, header = store_for(run_dir).load(base_ref)
    model = pipeline.build_model(cfg, header["num_classes"])
    io.check_matches_model(tensors, model.state_dict(), base_ref["path"])
    model.load_state_dict(tensors)
    return model


def load_prior(cfg: ExperimentConfig, run_dir: str, base_ref: dict):
    """θ0's posterior (the finetunes' prior), or None."""
    ref = base_ref.get("prior")
    if ref is None:
        return None
    expected = models.trainable_state_dict(load_base(cfg, run_dir, base_ref))
    return posterior_from_tensors(*store_for(run_dir).load(ref), expected, ref["path"])


def _start_inputs(cfg: ExperimentConfig, base_ref: dict) -> list:
    """What of θ0 a finetune depends on: its hash and, when IVON starts from it, the prior's."""
    prior = base_ref.get("prior")
    carried = prior is not None and (cfg.pretrain is None or cfg.pretrain.carry_hessian)
    return [base_ref["sha256"], prior["sha256"] if carried else None]


# ----------------------------------------------------------------------------------- finetunes
def _posterior_key(store: RunStore, cfg: ExperimentConfig, data_ref: dict, base_ref: dict, task_index: int) -> str:
    return store.key(
        "posterior",
        cfg.posterior.model_dump(mode="json"),
        cfg.data.tasks[task_index].model_dump(mode="json"),
        data_ref["sha256"],
        _start_inputs(cfg, base_ref),
        cfg.accelerator,
    )


@task(name="finetune-task", task_run_name="finetune-{task_index}", cache_policy=NO_CACHE)
def finetune(
    cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, task_index: int, parent: Parent | None = None
) -> dict:
    """One task's finetune; writes its posterior (means + precisions = the Hessian) and logs it.

    Finished MultiIVON/SoupIVON runs and AdamW-trained weights go to ``posteriors/parts/<name>/``
    as they complete (reused after a crash) and are removed once the posterior file is written.
    """
    cfg, store = _cfg(cfg_json), store_for(run_dir)
    name = cfg.data.tasks[task_index].name
    key = _posterior_key(store, cfg, data_ref, base_ref, task_index)
    parts = store.path("posterior", key, name).parent / "parts" / f"{name}-{key}"

    def make(path: Path) -> str:
        tasks_, _ = load_tasks(run_dir, data_ref)
        t = tasks_[task_index]
        base = load_base(cfg, run_dir, base_ref)
        child = None
        if parent:
            child = tracking.start_child(
                parent.uri, parent.run_id, f"finetune/{t.name}", {"varmerge.stage": "finetune", "varmerge.task": t.name}
            )
            tracking.log_params(
                parent.uri,
                child,
                {
                    "task": t.name,
                    "classes": list(t.classes),
                    "train_examples": len(t.train[1]),
                    **cfg.posterior.model_dump(mode="json"),
                },
            )
        t0 = time.perf_counter()
        with progress.step(sequence.finetune_label(cfg, t)) as report:
            post, weights = pipeline.finetune_task(
                cfg,
                base,
                t,
                logger=tracking.lightning_logger(parent.uri, child) if child else None,
                resume_dir=parts,
                prior=load_prior(cfg, run_dir, base_ref),
                report=report,
            )
        seconds = time.perf_counter() - t0
        sha = post.save(path)
        _say("finetuned %s in %.1f s -> %s", t.name, seconds, path.name)
        if child:
            _log_scores(parent, child, seconds, base, weights, tasks_)
            tracking.log_artifact(parent.uri, child, path, "posterior")
            tracking.finish(parent.uri, child)
        return sha

    ref, _ = store.compute("posterior", key, make, name=name)
    shutil.rmtree(parts, ignore_errors=True)  # also after a kill between the save and this cleanup
    return ref


def find_posterior(cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, task_index: int) -> dict | None:
    """The finished posterior of a task for these inputs (found by its key), or None."""
    cfg, store = _cfg(cfg_json), store_for(run_dir)
    key = _posterior_key(store, cfg, data_ref, base_ref, task_index)
    return store.find("posterior", key, cfg.data.tasks[task_index].name)


def load_posteriors(cfg: ExperimentConfig, run_dir: str, base_ref: dict, posterior_refs: list, device=None) -> list:
    """The posteriors of ``posterior_refs``, checked against θ0's parameters, on ``device``."""
    store = store_for(run_dir)
    expected = models.trainable_state_dict(load_base(cfg, run_dir, base_ref))
    return [posterior_from_tensors(*store.load(r), expected, r["path"], device) for r in posterior_refs]


def sweep_inputs(cfg: ExperimentConfig, run_dir: str, base_ref: dict, posterior_refs: list):
    """θ0 and the posteriors of a sweep, on the sweep's device (:func:`pipeline.sweep_device`)."""
    device = pipeline.sweep_device(cfg)
    return load_base(cfg, run_dir, base_ref).to(device), load_posteriors(cfg, run_dir, base_ref, posterior_refs, device)


# ----------------------------------------------------------------------------------- α sweeps
def sweep_key(cfg_json: str, run_dir: str, method: str, data_ref: dict, base_ref: dict, posterior_refs: list) -> str:
    """The content key of one method's sweep (how the ground-truth flow finds it)."""
    cfg = _cfg(cfg_json)
    return store_for(run_dir).key(
        "sweep",
        method,
        cfg.merge.model_dump(mode="json"),
        data_ref["sha256"],
        base_ref["sha256"],
        [r["sha256"] for r in posterior_refs],
    )


@task(name="merge-sweep", task_run_name="sweep-{method}", cache_policy=NO_CACHE)
def sweep(
    cfg_json: str,
    run_dir: str,
    method: str,
    data_ref: dict,
    base_ref: dict,
    posterior_refs: list,
    parent: Parent | None = None,
    blocks: list[dict] | None = None,
) -> dict:
    """Merge with one method over the whole α grid and score every merged model on every task;
    or, given ``blocks`` (the :func:`sweep_block` results covering the grid in order), join them
    into the same file a whole sweep writes."""
    cfg, store = _cfg(cfg_json), store_for(run_dir)
    key = sweep_key(cfg_json, run_dir, method, data_ref, base_ref, posterior_refs)

    def make(path: Path) -> str:
        tasks_, _ = load_tasks(run_dir, data_ref)
        names = [t.name for t in tasks_]
        if blocks:
            parts = [load_sweep(run_dir, b) for b in blocks]
            res = {k: torch.cat([p[k] for p in parts]) for k in ("alpha", "accuracy", "loss")}
            seconds = sum(p["seconds"] for p in parts)
            if not torch.equal(res["alpha"], grid(cfg, len(tasks_))):
                raise ValueError(f"sweep {method}: its blocks do not cover the α grid in order")
        else:
            base, posts = sweep_inputs(cfg, run_dir, base_ref, posterior_refs)
            t0 = time.perf_counter()
            with progress.step(sequence.sweep_label(method)) as report:
                res = pipeline.sweep_and_score(cfg, method, posts, base, tasks_, report=report)
            seconds = time.perf_counter() - t0
        sha = _save_sweep(path, method, names, res, seconds)
        _say("swept %s over %d α in %.1f s", method, len(res["alpha"]), seconds)
        if parent:
            _log_sweep(cfg, parent, method, names, res, seconds, path)
        return sha

    ref = store.compute("sweep", key, make, name=method)[0]
    for b in blocks or []:  # joined (now or by an earlier run): the blocks are not needed again
        store.resolve(b).unlink(missing_ok=True)
    return ref


@task(name="merge-sweep-block", task_run_name="sweep-{method}-{rows}", cache_policy=NO_CACHE)
def sweep_block(
    cfg_json: str,
    run_dir: str,
    method: str,
    data_ref: dict,
    base_ref: dict,
    posterior_refs: list,
    rows: list[int],
    parent: Parent | None = None,
) -> dict:
    """Rows ``[lo, hi)`` of one merge rule's sweep over the α grid (one worker's share); ``parent``
    is unused (the joined sweep is what gets logged) and taken so that blocks and sweeps share
    their arguments."""
    cfg, store = _cfg(cfg_json), store_for(run_dir)
    lo, hi = rows
    key = store.key("sweep-block", sweep_key(cfg_json, run_dir, method, data_ref, base_ref, posterior_refs), lo, hi)

    def make(path: Path) -> str:
        tasks_, _ = load_tasks(run_dir, data_ref)
        base, posts = sweep_inputs(cfg, run_dir, base_ref, posterior_refs)
        alpha = grid(cfg, len(tasks_))[lo:hi]
        t0 = time.perf_counter()
        with progress.step(f"{sequence.sweep_label(method)} α {lo}–{hi}") as report:
            res = pipeline.sweep_and_score(cfg, method, posts, base, tasks_, alpha, report=report)
        return _save_sweep(path, method, [t.name for t in tasks_], res, time.perf_counter() - t0)

    return store.compute("sweep", key, make, name=f"{method}-{lo}-{hi}")[0]


def grid(cfg: ExperimentConfig, num_tasks: int) -> torch.Tensor:
    return simplex_grid(num_tasks, cfg.merge.spacing)


def _save_sweep(path: Path, method: str, names: list[str], res: dict, seconds: float) -> str:
    return io.save_tensors(
        path,
        {"alpha": res["alpha"], "accuracy": res["accuracy"], "loss": res["loss"]},
        {"kind": "sweep", "method": method, "tasks": names, "seconds": seconds},
    )


def _log_sweep(cfg, parent: Parent, method, names, res, seconds, path: Path) -> None:
    uri = parent.uri
    child = tracking.start_child(
        uri, parent.run_id, f"merge/{method}", {"varmerge.stage": "merge", "varmerge.method": method}
    )
    mean = res["accuracy"].mean(1)
    b = int(mean.argmax())
    tracking.log_params(
        uri, child, {"method": method, "grid_size": len(res["alpha"]), **cfg.merge.model_dump(mode="json")}
    )
    tracking.log_metrics(
        uri,
        child,
        {
            "max_mean_accuracy": float(mean[b]),
            "seconds": seconds,
            **{f"best_alpha/{n}": float(a) for n, a in zip(names, res["alpha"][b], strict=True)},
        },
    )
    table = path.with_suffix(".json")
    io.write_text_atomic(
        table,
        json.dumps(
            {
                "tasks": names,
                "alpha": res["alpha"].tolist(),
                "accuracy": res["accuracy"].tolist(),
                "loss": res["loss"].tolist(),
            }
        ),
    )
    tracking.log_artifact(uri, child, table, "sweep")
    tracking.finish(uri, child)


def load_sweep(run_dir: str, sweep_ref: dict) -> dict:
    tensors, header = store_for(run_dir).load(sweep_ref)
    return {**tensors, "tasks": header["tasks"], "method": header["method"], "seconds": header["seconds"]}


def find_sweep(
    cfg_json: str, run_dir: str, method: str, data_ref: dict, base_ref: dict, posterior_refs: list
) -> dict | None:
    """The finished sweep of ``method`` for these inputs (found by its key), or None."""
    key = sweep_key(cfg_json, run_dir, method, data_ref, base_ref, posterior_refs)
    return store_for(run_dir).find("sweep", key, method)


# ----------------------------------------------------------------------------------- multitask
@task(name="multitask-finetune", cache_policy=NO_CACHE)
def multitask(
    cfg_json: str, run_dir: str, data_ref: dict, base_ref: dict, alpha: list, parent: Parent | None = None
) -> dict:
    """The real multitask finetune at α; returns its file and realised per-task accuracies."""
    cfg, store = _cfg(cfg_json), store_for(run_dir)
    a = [round(float(v), 9) for v in alpha]
    key = store.key(
        "multitask",
        cfg.posterior.model_dump(mode="json"),
        cfg.multitask_steps,
        a,
        data_ref["sha256"],
        _start_inputs(cfg, base_ref),
        cfg.accelerator,
    )

    def make(path: Path) -> str:
        tasks_, _ = load_tasks(run_dir, data_ref)
        base = load_base(cfg, run_dir, base_ref)
        t0 = time.perf_counter()
        child = None
        if parent:
            child = tracking.start_child(
                parent.uri,
                parent.run_id,
                f"multitask/alpha={[round(v, 3) for v in alpha]}",
                {"varmerge.stage": "multitask_finetune", "varmerge.alpha": json.dumps(alpha)},
            )
        with progress.step(sequence.multitask_label(alpha)) as report:
            model, acc = pipeline.multitask_finetune(
                cfg,
                base,
                tasks_,
                alpha,
                logger=tracking.lightning_logger(parent.uri, child) if child else None,
                prior=load_prior(cfg, run_dir, base_ref),
                report=report,
            )
        seconds = time.perf_counter() - t0
        _say("multitask finetune at α=%s in %.1f s", [round(v, 3) for v in alpha], seconds)
        if child:
            tracking.log_metrics(
                parent.uri,
                child,
                {"seconds": seconds, **{f"test/{t.name}/accuracy": float(v) for t, v in zip(tasks_, acc, strict=True)}},
            )
            tracking.finish(parent.uri, child)
        return io.save_state_dict(
            path,
            model.state_dict(),
            {"alpha": list(alpha), "accuracy": acc.tolist(), "tasks": [t.name for t in tasks_], "seconds": seconds},
        )

    ref, _ = store.compute("multitask", key, make, name="alpha")
    header = io.read_header(store.resolve(ref))
    return {**ref, "alpha": header["alpha"], "accuracy": header["accuracy"], "seconds": header["seconds"]}


def example_input(run_dir: str, data_ref: dict):
    """Two test inputs (numpy) for MLflow's model signature (two, so that torch.export keeps the
    batch dimension dynamic: one would fix it to 1); None for dict (text) inputs."""
    tasks_, _ = load_tasks(run_dir, data_ref)
    x = tasks_[0].test[0]
    return None if isinstance(x, dict) else x[:2].numpy()


def example_text(cfg: ExperimentConfig, task) -> str:
    """A test text of ``task`` (decoded from its tokens), for a text model's input example."""
    ids = task.test[0]["input_ids"][0]
    return models.text_tokenizer(pipeline.model_path(cfg)).decode(ids, skip_special_tokens=True)


def multitask_model(cfg: ExperimentConfig, run_dir: str, mt_ref: dict, base_ref: dict):
    model = load_base(cfg, run_dir, base_ref)
    tensors, _ = store_for(run_dir).load(mt_ref)
    io.check_matches_model(tensors, model.state_dict(), mt_ref["path"])
    model.load_state_dict(tensors)
    return model
