"""The run store: keys that follow the code, references, one hash check per load, locks, and two
runs of one config at the same time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, checked_plan_of, plan_of

from varmerge import files
from varmerge.store import RunStore, source_digest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- keys and code
def test_keys_cover_every_module_that_computes_an_artifact():
    """Regression: keys used to hash only pipeline.py and tasks/steps.py, so a fix in train.py,
    merge.py or posterior.py silently reused stale posteriors and sweeps."""
    import tasks
    from tasks import steps

    store = steps.store_for(ROOT / "runs" / "unused")
    files = {p.relative_to(ROOT).as_posix() for p in store.source_files}
    for f in (
        "varmerge/pipeline/finetunes.py",
        "varmerge/posterior.py",
        "varmerge/merge.py",
        "varmerge/evaluate.py",
        "varmerge/models.py",
        "varmerge/data.py",
        "tasks/steps.py",
    ):
        assert f in files, f
    assert any(f.startswith("varmerge/train/") for f in files)
    assert any(f.startswith("varmerge/merging/") for f in files)
    assert store.source == source_digest([tasks])


def test_a_code_change_changes_the_key_a_comment_does_not(tmp_path):
    mod = tmp_path / "stage.py"
    mod.write_text("def f(x):\n    return x + 1\n")
    key = RunStore(tmp_path, code=[mod]).key("posterior", {"lr": 0.1})
    mod.write_text("# a comment\ndef f(x):\n\n    return x + 1  # reformatted\n")
    assert RunStore(tmp_path, code=[mod]).key("posterior", {"lr": 0.1}) == key
    mod.write_text("def f(x):\n    return x + 2\n")
    assert RunStore(tmp_path, code=[mod]).key("posterior", {"lr": 0.1}) != key
    assert RunStore(tmp_path, code=[mod]).key("posterior", {"lr": 0.2}) != key


def test_the_ground_truth_finds_sweeps_by_key_not_by_age(tmp_path):
    """Regression: the ground-truth flow took the newest ``sweeps/<method>-*`` file, so a sweep of
    other posteriors (another config version) written later was compared with this run's front."""
    from tasks import steps

    plan = checked_plan_of(TINY, tmp_path / "out")
    store = steps.store_for(plan.run_dir)
    data_ref = steps.prepare_data.fn(plan)
    theta0_ref = steps.theta0.fn(plan, data_ref)
    refs = [{"path": f"posteriors/{t}.safetensors", "sha256": t * 8} for t in "abc"]
    right = store.path("sweep", steps.sweep_key(plan, "simple", data_ref, theta0_ref, refs), "simple")
    sha = files.save_tensors(right, {"accuracy": torch.ones(2, 3)}, {"kind": "sweep"})
    time.sleep(0.01)
    decoy = store.path("sweep", "0" * 20, "simple")
    files.save_tensors(decoy, {"accuracy": torch.zeros(2, 3)}, {"kind": "sweep"})
    assert decoy.stat().st_mtime_ns > right.stat().st_mtime_ns
    assert steps.find_sweep(plan, "simple", data_ref, theta0_ref, refs) == store.ref(right, sha)
    other = [{**r, "sha256": "f" * 64} for r in refs]  # other posteriors: no sweep of theirs yet
    assert steps.find_sweep(plan, "simple", data_ref, theta0_ref, other) is None


def test_keys_follow_what_each_artifact_reads(tmp_path):
    """A config change recomputes what reads the changed setting, and nothing else."""
    from tasks import steps

    data, theta0 = {"sha256": "d" * 64}, {"sha256": "t" * 64, "prior": None}
    refs = [{"path": f"posteriors/{t}.safetensors", "sha256": t * 8} for t in "abc"]

    def plan(**sections):
        raw = {**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in sections.items()}}
        sizes = {"a": 100, "b": 200, "c": 300}  # the default α (rows of the grid) follow them
        return plan_of(raw, tmp_path).with_sizes(10, sizes, sizes)

    base = plan()
    more_methods = plan(merge={"methods": [*TINY["merge"]["methods"], "ties"]})
    assert steps.sweep_key(base, "simple", data, theta0, refs) == steps.sweep_key(
        more_methods, "simple", data, theta0, refs
    )
    other_mixture = plan(merge={"options": {"mixture": {"iterations": 2}}})
    assert steps.sweep_key(base, "simple", data, theta0, refs) == steps.sweep_key(
        other_mixture, "simple", data, theta0, refs
    )
    assert steps.sweep_key(base, "mixture", data, theta0, refs) != steps.sweep_key(
        other_mixture, "mixture", data, theta0, refs
    )
    hotter = plan(selection={"temperature": 0.7})  # another temperature α: another grid row, every sweep
    assert steps.sweep_key(base, "simple", data, theta0, refs) != steps.sweep_key(hotter, "simple", data, theta0, refs)
    assert steps.posterior_key(base, data, theta0, 0) == steps.posterior_key(hotter, data, theta0, 0)
    unread = plan(posterior={"weights_lr": 1e-3, "init_spread": 0.5})  # mixture_full_von's, not multi_ivon's
    assert steps.posterior_key(base, data, theta0, 0) == steps.posterior_key(unread, data, theta0, 0)
    for changed in (plan(posterior={"lr": 0.05}), plan(posterior={"components": 3})):
        assert steps.posterior_key(base, data, theta0, 0) != steps.posterior_key(changed, data, theta0, 0)
    alpha = (0.25, 0.25, 0.5)
    more_runs = plan(posterior={"components": 3})  # the multitask finetune is one IVON run
    assert steps.multitask_key(base, data, theta0, alpha) == steps.multitask_key(more_runs, data, theta0, alpha)
    assert steps.multitask_key(base, data, theta0, alpha) != steps.multitask_key(base, data, theta0, (0.5, 0.25, 0.25))


# ------------------------------------------------------------------------------- references
def test_references_are_relative_and_loads_are_checked_once(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    key = store.key("base", 1)
    ref, computed = store.compute("base", key, lambda p: files.save_tensors(p, {"w": torch.ones(3)}, {}))
    assert computed and ref["path"] == f"base/base-{key}.safetensors"
    calls = []
    real = files.load_tensors
    monkeypatch.setattr(files, "load_tensors", lambda p: calls.append(p) or real(p))
    fresh = RunStore(tmp_path / "run")
    for _ in range(3):
        tensors, _ = fresh.load(ref)
    assert len(calls) == 1 and torch.equal(tensors["w"], torch.ones(3))
    again, computed = fresh.compute("base", key, lambda p: pytest.fail("computed twice"))
    assert again == ref and not computed and len(calls) == 1

    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    assert torch.equal(RunStore(moved).load(ref)[0]["w"], torch.ones(3))  # a run folder can move


def test_a_reference_to_a_replaced_file_is_refused(tmp_path):
    store = RunStore(tmp_path)
    ref, _ = store.compute("base", "k" * 20, lambda p: files.save_tensors(p, {"w": torch.ones(3)}, {}))
    files.save_tensors(store.resolve(ref), {"w": torch.zeros(3)}, {})  # a valid file, other content
    with pytest.raises(ValueError, match="changed since the run recorded it"):
        RunStore(tmp_path).load(ref)


def test_the_lock_makes_a_concurrent_compute_wait_and_reuse(tmp_path):
    made, refs = [], []

    def make(path):
        made.append(threading.current_thread().name)
        time.sleep(0.3)
        return files.save_tensors(path, {"w": torch.ones(2)}, {})

    def worker():
        refs.append(RunStore(tmp_path).compute("posterior", "k" * 20, make, name="a"))

    threads = [threading.Thread(target=worker, name=f"t{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert sorted(c for _, c in refs) == [False, False, True]
    assert len({json.dumps(r, sort_keys=True) for r, _ in refs}) == 1


# ----------------------------------------------------------- two runs of one config, at once
def _work_lines(log: str) -> list[str]:
    """What a run really computed: the tasks log one line per finetune, sweep and multitask."""
    return re.findall(r"(finetuned \w+|swept \w+|multitask finetune at α=\[[^\]]*\])", log)


@pytest.mark.slow
def test_two_runs_of_one_config_at_once_do_each_piece_of_work_once(prefect_server, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "flows.cli",
                        "run",
                        str(config),
                        "--output",
                        str(out),
                        "--tracking-uri",
                        uri,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    for p in procs:
        assert p.wait(timeout=600) == 0, "\n".join(log.read_text()[-3000:] for log in logs)
    work = [w for log in logs for w in _work_lines(log.read_text())]
    assert sorted(w for w in work if w.startswith("finetuned")) == ["finetuned a", "finetuned b", "finetuned c"]
    assert sorted(w for w in work if w.startswith("swept")) == ["swept hessian", "swept mixture", "swept simple"]
    assert len([w for w in work if w.startswith("multitask")]) == 1, work

    run_dir = out / TINY["name"]
    for f in run_dir.rglob("*.safetensors"):
        files.load_tensors(f)  # every file complete, every hash valid
    for kind, n in (("posteriors", 3), ("sweeps", 3), ("multitask", 1), ("data", 1), ("base", 1)):
        assert len(list((run_dir / kind).glob("*.safetensors"))) == n, kind
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(uri).search_model_versions(f"name='varmerge-{TINY['name']}'")
    assert len(versions) == 1 and versions[0].status == "READY"
