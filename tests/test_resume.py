"""Crash and resume at every stage of the main flow.

Each slow test runs ``varmerge run`` in a subprocess (its own session, talking to the session's
Prefect test API), SIGKILLs its process group during one stage, then resumes the flow in-process
with the training/merging functions wrapped to count what really runs, and checks:

* completed work is reused (no finished finetune, IVON run, sweep or multitask finetune runs again);
* the final front equals that of an uninterrupted run of the same config (``reference_run``);
* nothing partial is left registered: every artifact file loads with a valid hash, exactly one
  READY model version exists (created after its model was logged), and no MLflow run of the
  killed flow is left RUNNING (the resume marks them KILLED).

How each stage is killed:
* finetuning — from outside, as soon as the first task's posterior file appears (task 2 is training);
* posterior computation — from outside, as soon as the first MultiIVON run of task 1 is persisted
  (``posteriors/parts/<task>/run-0.safetensors``; its second run is training);
* merge sweep — kill point ``sweep:hessian`` (``tests/fault_launcher.py``): a sweep takes well under a
  second, too short to hit from outside; the flow dies after the ``simple`` sweep was written;
* multitask finetune — kill point ``multitask`` (no file appears when it starts);
* registration — kill point ``register``: after the model is logged, before it is registered.
The later stages start from a copy of the reference run's finished files (same content keys), so
they do not retrain what they do not test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import RESUME, TINY, plan_of

from varmerge import files, pipeline, train
from varmerge.plan import make_plan

pytestmark = pytest.mark.xdist_group("reference")  # the session's reference run: built once per worker

ROOT = Path(__file__).resolve().parents[1]
NAME = RESUME["name"]


# ------------------------------------------------------------------------------------- helpers
def _launch(tmp_path: Path, api_url: str, fault: str | None = None) -> tuple[subprocess.Popen, Path, str]:
    """``varmerge run`` of RESUME in a new session (process group); returns (proc, out, uri)."""
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(RESUME))
    out, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-sub"),
        "PREFECT_API_URL": api_url,
        "PREFECT_LOGGING_LEVEL": "INFO",
    }  # the flow's log (flow.log) explains a failure
    log = open(tmp_path / "flow.log", "wb")  # noqa: SIM115 - closed with the process
    launch = [str(ROOT / "tests" / "fault_launcher.py"), fault] if fault else ["-m", "flows.cli"]
    proc = subprocess.Popen(
        [sys.executable, *launch, "run", str(config), "--output", str(out), "--tracking-uri", uri],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, out, uri


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _kill_when(proc: subprocess.Popen, ready, tmp_path: Path, timeout: float = 300) -> None:
    """Poll (20 ms) until ``ready()``, then SIGKILL the flow's whole process group."""
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the flow ended before it could be killed:\n" + _log(tmp_path)
            assert time.time() < deadline, "timed out waiting for the stage:\n" + _log(tmp_path)
            time.sleep(0.02)
    finally:
        _killpg(proc)


def _wait_self_kill(proc: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> None:
    """The flow SIGKILLs itself at its fault point; then clean up anything left in its group."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _killpg(proc)
    assert rc == -signal.SIGKILL, f"exit {rc}, expected SIGKILL at the fault point:\n" + _log(tmp_path)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "flow.log").read_text(errors="replace")[-3000:]


def _seed_from(reference: dict, out: Path, parts: tuple[str, ...]) -> None:
    """Copy finished files of the reference run (same config, same content keys) into ``out``."""
    for part in parts:
        shutil.copytree(reference["run_dir"] / part, out / NAME / part, ignore=shutil.ignore_patterns("parts"))


class Calls:
    """Wraps the library calls the tasks make, recording what really runs (or forbidding it)."""

    def __init__(self, monkeypatch, forbid: tuple[str, ...] = ()):
        self.finetunes, self.ivon_seeds, self.sweeps, self.multitasks = [], [], [], []
        self._wrap(monkeypatch, pipeline, "finetune_task", lambda a, k: self.finetunes.append(a[2].name), forbid)
        self._wrap(monkeypatch, train, "fit", lambda a, k: self.ivon_seeds.append(k.get("seed")), forbid)
        self._wrap(monkeypatch, pipeline, "sweep_and_score", lambda a, k: self.sweeps.append(a[1]), forbid)
        self._wrap(monkeypatch, pipeline, "multitask_finetune", lambda a, k: self.multitasks.append(a[3]), forbid)

    @staticmethod
    def _wrap(monkeypatch, module, name, record, forbid):
        real = getattr(module, name)

        def wrapper(*a, **k):
            if name in forbid:
                raise AssertionError(f"{name} ran again on resume")
            record(a, k)
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapper)


def _resume(tmp_path: Path, out: Path, uri: str) -> dict:
    from flows.front import front_flow

    return front_flow(str(tmp_path / "resume.yaml"), tracking_uri=uri, output_dir=str(out))


def _close(got, want, tol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0, atol=tol
    )


def _assert_same_front(summary: dict, reference: dict) -> None:
    """Same chosen α and fronts as the uninterrupted run; metrics equal within 1e-6."""
    ref = reference["summary"]
    assert summary["chosen"]["alpha"] == ref["chosen"]["alpha"]
    assert summary["chosen"]["method"] == ref["chosen"]["method"]
    _close(summary["chosen"]["predicted"], ref["chosen"]["predicted"])
    _close(summary["chosen"]["realised"], ref["chosen"]["realised"])
    assert summary["methods"].keys() == ref["methods"].keys()
    for m, r in ref["methods"].items():
        got = summary["methods"][m]
        assert got["best_alpha"] == r["best_alpha"] and got["front"]["alpha"] == r["front"]["alpha"], m
        _close(got["front"]["accuracy"], r["front"]["accuracy"])
    saved = json.loads(Path(summary["run_dir"], "front.json").read_text())
    assert saved["chosen"] == summary["chosen"]


def _assert_nothing_partial(out: Path, uri: str, killed: int = 1) -> None:
    """Every artifact file is complete; one READY registered version; no run left RUNNING."""
    from mlflow.tracking import MlflowClient

    run_dir = out / NAME
    for f in run_dir.rglob("*.safetensors"):
        files.load_tensors(f)  # a partial or damaged file raises
    assert not list((run_dir / "posteriors").glob("parts/*/*")), "finished posteriors leave no parts behind"
    client = MlflowClient(uri)
    versions = client.search_model_versions(f"name='varmerge-{NAME}'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    v = versions[0]
    assert v.status == "READY"
    chosen = json.loads(Path(run_dir, "front.json").read_text())["chosen"]
    assert v.tags["alpha"] == json.dumps(chosen["alpha"][0])
    exp = client.get_experiment_by_name("varmerge")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == sorted(["FINISHED"] + ["KILLED"] * killed)
    # the killed flow's Prefect run is Crashed too, not left Running
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        states = [
            (r.info.status, prefect.read_flow_run(UUID(r.data.tags["varmerge.flow_run_id"])).state.type.value)
            for r in parents
        ]
    want = {"KILLED": "CRASHED", "FINISHED": "COMPLETED"}
    assert all(state == want[status] for status, state in states), states


def _posteriors(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / NAME / "posteriors").glob("*.safetensors")}


# ------------------------------------------------------------------------------ crash + resume
@pytest.mark.slow
def test_killed_during_finetunes_resumes_without_retraining(reference_run, prefect_server, tmp_path, monkeypatch):
    proc, out, uri = _launch(tmp_path, prefect_server)
    _kill_when(proc, lambda: len(_posteriors(out)) >= 1, tmp_path)
    done = _posteriors(out)
    assert 1 <= len(done) < 3, done
    assert not (out / NAME / "front.json").exists()

    calls = Calls(monkeypatch)
    summary = _resume(tmp_path, out, uri)
    assert len(calls.finetunes) == 3 - len(done), calls.finetunes
    for name, mtime in done.items():
        assert _posteriors(out)[name] == mtime  # reused as they were
    assert len(_posteriors(out)) == 3
    _assert_same_front(summary, reference_run)
    _assert_nothing_partial(out, uri)


@pytest.mark.slow
def test_killed_during_posterior_computation_reuses_finished_ivon_runs(
    reference_run, prefect_server, tmp_path, monkeypatch
):
    proc, out, uri = _launch(tmp_path, prefect_server)
    parts = out / NAME / "posteriors" / "parts"
    _kill_when(proc, lambda: any(parts.glob("a-*/run-0.safetensors")), tmp_path)
    assert not _posteriors(out), "killed before task a's posterior was complete"
    [run0] = parts.glob("a-*/run-0.safetensors")
    assert not (run0.parent / "run-1.safetensors").exists()

    calls = Calls(monkeypatch)
    summary = _resume(tmp_path, out, uri)
    # a: only its second IVON run (seed 1); b and c: both runs. Never task a's run 0 again.
    assert calls.finetunes == ["a", "b", "c"]
    assert calls.ivon_seeds == [1, 0, 1, 0, 1], calls.ivon_seeds
    assert not run0.exists()  # superseded by the posterior file, then removed
    _assert_same_front(summary, reference_run)
    _assert_nothing_partial(out, uri)


@pytest.mark.slow
def test_killed_during_merge_sweep_resumes_the_remaining_methods(reference_run, prefect_server, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    _seed_from(reference_run, out, ("data", "base", "posteriors"))
    proc, out, uri = _launch(tmp_path, prefect_server, fault="sweep:hessian")
    _wait_self_kill(proc, tmp_path)
    sweeps = out / NAME / "sweeps"
    assert [p.name.split("-")[0] for p in sweeps.glob("*.safetensors")] == ["simple"]
    assert not (out / NAME / "front.json").exists()

    calls = Calls(monkeypatch, forbid=("finetune_task", "fit"))
    summary = _resume(tmp_path, out, uri)
    assert calls.sweeps == ["hessian", "mixture"]
    assert len(calls.multitasks) == 1
    _assert_same_front(summary, reference_run)
    _assert_nothing_partial(out, uri)


@pytest.mark.slow
def test_killed_during_multitask_finetune_resumes_it_alone(reference_run, prefect_server, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    _seed_from(reference_run, out, ("data", "base", "posteriors", "sweeps"))
    proc, out, uri = _launch(tmp_path, prefect_server, fault="multitask")
    _wait_self_kill(proc, tmp_path)
    assert not list((out / NAME).glob("multitask/*.safetensors"))
    assert not (out / NAME / "front.json").exists()

    calls = Calls(monkeypatch, forbid=("finetune_task", "fit", "sweep_and_score"))
    summary = _resume(tmp_path, out, uri)
    assert len(calls.multitasks) == 1
    _assert_same_front(summary, reference_run)
    _assert_nothing_partial(out, uri)


@pytest.mark.slow
def test_killed_before_registration_registers_once(reference_run, prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    _seed_from(reference_run, out, ("data", "base", "posteriors", "sweeps", "multitask"))
    proc, out, uri = _launch(tmp_path, prefect_server, fault="register")
    _wait_self_kill(proc, tmp_path)
    client = MlflowClient(uri)
    assert client.search_model_versions(f"name='varmerge-{NAME}'") == []  # logged, never registered
    assert not (out / NAME / "front.json").exists()  # written only after registration

    Calls(monkeypatch, forbid=("finetune_task", "fit", "sweep_and_score", "multitask_finetune"))
    summary = _resume(tmp_path, out, uri)
    _assert_same_front(summary, reference_run)
    _assert_nothing_partial(out, uri)
    # a second run of the same config reuses the registered version instead of adding one
    again = _resume(tmp_path, out, uri)
    assert again["registered_model"] == summary["registered_model"] == f"varmerge-{NAME}/1"
    assert len(client.search_model_versions(f"name='varmerge-{NAME}'")) == 1


@pytest.mark.slow
def test_tampered_posterior_stops_the_cli_with_one_line(reference_run, prefect_server, tmp_path, restore_env):
    """A finished run whose posterior file had one byte flipped: `varmerge run` refuses it."""
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "runs"
    _seed_from(reference_run, out, ("data", "base", "posteriors", "sweeps", "multitask"))
    victim = sorted((out / NAME / "posteriors").glob("b-*.safetensors"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x01
    victim.write_bytes(bytes(raw))
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(RESUME))
    result = CliRunner().invoke(
        app, ["run", str(config), "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    )
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"{victim}: content hash mismatch" in lines[0] and "delete it to recompute" in lines[0]
    assert victim.read_bytes() == bytes(raw)  # not silently overwritten
    assert not (out / NAME / "front.json").exists()


# ---------------------------------------------------------- the persisted pieces of a posterior
def _tiny_task(method: str, **posterior):
    from varmerge.config import parse_config

    cfg = copy.deepcopy(TINY)
    cfg["posterior"] = {**cfg["posterior"], "method": method, "steps": 10, **posterior}
    cfg["data"]["max_train_per_task"] = 100
    if method != "multi_ivon":
        cfg["merge"]["methods"] = ["simple", "hessian"]
        cfg["selection"]["method"] = "hessian"
    cfg = parse_config(cfg)
    tasks, n = pipeline.prepare_tasks(cfg)
    return cfg, pipeline.seeded_model(cfg, n), tasks[0]


def _same_posterior(a, b) -> None:
    ta = (
        a.tensors()
        if hasattr(a, "tensors")
        else {f"c{i}/{k}": v for i, c in enumerate(a.components) for k, v in c.tensors().items()}
    )
    tb = (
        b.tensors()
        if hasattr(b, "tensors")
        else {f"c{i}/{k}": v for i, c in enumerate(b.components) for k, v in c.tensors().items()}
    )
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


def test_multi_ivon_runs_are_persisted_and_reused(tmp_path, monkeypatch):
    cfg, base, task = _tiny_task("multi_ivon")
    whole, _ = pipeline.finetune_task(make_plan(cfg), base, task)
    real, seeds = train.fit, []

    def second_run_dies(*a, **k):  # a crash after run 0 finished
        if k["seed"] == 1:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(train, "fit", second_run_dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.finetune_task(make_plan(cfg), base, task, resume_dir=tmp_path / "parts")
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["run-0.safetensors"]
    monkeypatch.setattr(train, "fit", lambda *a, **k: seeds.append(k["seed"]) or real(*a, **k))
    resumed, weights = pipeline.finetune_task(make_plan(cfg), base, task, resume_dir=tmp_path / "parts")
    assert seeds == [1]  # run 0 came from its file
    _same_posterior(resumed, whole)
    assert resumed.meta == whole.meta and [c.meta for c in resumed.components] == [c.meta for c in whole.components]


def test_adamw_sg_trained_weights_are_persisted_and_reused(tmp_path, monkeypatch):
    cfg, base, task = _tiny_task("adamw_sg", lr=0.01)
    whole, whole_weights = pipeline.finetune_task(make_plan(cfg), base, task)
    real_sg = train.trained_sg_posterior

    def sg_dies(*a, **k):  # killed during the squared-gradient pass, after training
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train, "trained_sg_posterior", sg_dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.finetune_task(make_plan(cfg), base, task, resume_dir=tmp_path / "parts")
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["trained.safetensors"]
    monkeypatch.setattr(train, "trained_sg_posterior", real_sg)
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained again"))
    resumed, weights = pipeline.finetune_task(make_plan(cfg), base, task, resume_dir=tmp_path / "parts")
    _same_posterior(resumed, whole)
    assert resumed.meta == whole.meta
    for k in whole_weights:
        torch.testing.assert_close(weights[k], whole_weights[k], rtol=0, atol=0)


def test_parts_left_by_a_kill_right_after_the_posterior_are_cleaned_up(tmp_path):
    """Killed between writing a posterior and removing its parts: the next run removes them."""
    from tasks import steps
    from varmerge.models import trainable_state_dict
    from varmerge.posterior import DiagonalGaussian, MixtureGaussian

    plan = plan_of(RESUME, tmp_path / "out")
    store = steps.store_for(plan.run_dir)
    data_ref = steps.prepare_data.fn(plan)
    theta0_ref = steps.theta0.fn(plan, data_ref)
    path = store.path("posterior", steps.posterior_key(plan, data_ref, theta0_ref, 0), "a")
    theta = trainable_state_dict(steps.load_theta0(plan, theta0_ref))
    post = DiagonalGaussian(theta, {k: torch.ones_like(v) for k, v in theta.items()})
    sha = MixtureGaussian([post, post]).save(path)
    parts = path.parent / "parts" / path.stem
    MixtureGaussian([post]).save(parts / "run-0.safetensors")
    assert steps.finetune.fn(plan, data_ref, theta0_ref, 0) == store.ref(path, sha)
    assert not parts.exists()
