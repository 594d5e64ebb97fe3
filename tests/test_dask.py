"""The front flow on a real Dask cluster, all on 127.0.0.1: a ``dask scheduler`` and two
``dask worker`` processes (each with its nanny, one thread, one torch thread), reached by address
as a user's cluster would be.

* Same bits as the thread runner: every file of the run store (θ0, posteriors, sweeps, the
  multitask model) holds the same tensors under the same content keys, when both run torch on one
  thread (the workers' default; on two threads float reductions are ordered differently). The
  tasks did run on the workers, and a sweep of more than one batch of α was split between them.
* A worker SIGKILLed in the middle of a finetune: Dask reschedules the task, the flow completes,
  and nothing that had finished is trained again (the task's first IVON run, persisted before the
  kill, is reused; the other tasks train once).

What runs where is recorded by a worker plugin (``tests/dask_probe.py``).
"""

from __future__ import annotations

import contextvars
import copy
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import RESUME, TINY
from servers import Procs, free_port, tail

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dask")]  # one cluster for the module
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def dask_cluster(prefect_server, tmp_path_factory):
    """One scheduler and two worker processes for the module's tests (a killed worker's nanny
    starts a new one), on the session's Prefect server."""
    distributed = pytest.importorskip("distributed")
    from dask_probe import RecordCalls

    root = tmp_path_factory.mktemp("dask")
    logs = root / "logs"
    logs.mkdir()
    procs = Procs(logs)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["PREFECT_API_URL"] = prefect_server
    dask = str(Path(sys.executable).with_name("dask"))
    procs.start("scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env=env)
    for i in range(2):
        args = [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"]
        procs.start(f"worker{i}", args, env=env)
    client = None
    try:
        client = distributed.Client(address, timeout=60)
        client.wait_for_workers(2, timeout=120)
        calls = root / "calls.jsonl"
        client.register_plugin(RecordCalls(str(calls)))
        yield SimpleNamespace(address=address, client=client, calls=calls, logs=logs)
    finally:
        if client is not None:
            client.close()
        procs.stop_all()
        assert not procs.alive(), procs.stopped


@pytest.fixture
def cluster(dask_cluster):
    """The module's cluster, its record of calls emptied for this test."""
    dask_cluster.calls.write_text("")
    return dask_cluster


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a run store by its path (the key included), as tensors."""
    from safetensors.torch import load_file

    return {str(f.relative_to(run_dir)): load_file(f) for f in sorted(run_dir.rglob("*.safetensors"))}


def _run(config: dict, out: Path, runner: dict | None = None) -> dict:
    from flows.front import front_flow

    return front_flow(config, tracking_uri=f"sqlite:///{out / 'mlflow.db'}", output_dir=str(out), runner=runner)


def test_the_flow_on_a_dask_cluster_gives_the_thread_runners_bits(cluster, prefect_server, tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["merge"]["spacing"] = 0.04  # 351 α: two batches of 256, one per worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = _run(cfg, tmp_path / "thread")
    finally:
        torch.set_num_threads(threads)
    remote = _run(cfg, tmp_path / "dask", {"kind": "dask", "address": cluster.address})

    want, got = _tensors(tmp_path / "thread" / "tiny"), _tensors(tmp_path / "dask" / "tiny")
    assert sorted(got) == sorted(want)  # same content keys
    for name, tensors in want.items():
        assert tensors.keys() == got[name].keys(), name
        for k, v in tensors.items():
            assert torch.equal(v, got[name][k]), f"{name}: {k}"
    assert remote["chosen"] == local["chosen"] and remote["methods"].keys() == local["methods"].keys()
    for m, d in local["methods"].items():
        assert remote["methods"][m]["front"] == d["front"], m

    calls = _calls(cluster.calls)
    assert {c["pid"] for c in calls}.isdisjoint({os.getpid()})
    assert len({c["worker"] for c in calls}) == 2, "both workers ran tasks"
    fits = Counter((c["task"], c["seed"]) for c in calls if c["call"] == "fit")
    assert fits == Counter({(t, s): 1 for t in "abc" for s in (0, 1)}), fits
    sweeps = sorted((c["method"], c["rows"]) for c in calls if c["call"] == "sweep_and_score")
    # merge rules in two blocks (one per worker); rows=None: a whole sweep
    # 352 α (spacing 0.05 and (1/3, 1/3, 1/3), the tasks' equal-size pooled and uniform α)
    assert sweeps == sorted([(m, n) for m in cfg["merge"]["methods"] for n in (256, 96)]), sweeps
    assert not list((tmp_path / "dask" / "tiny" / "sweeps").glob("*-*-*-*")), "the blocks are removed once joined"
    assert [c["alpha"] for c in calls if c["call"] == "multitask_finetune"] == local["chosen"]["alpha"]


def test_a_worker_killed_mid_finetune_is_rescheduled_and_nothing_finished_is_retrained(
    cluster, prefect_server, tmp_path
):
    from dask_probe import executing
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    run_dir = out / RESUME["name"]
    killed: dict = {}

    def kill_mid_finetune() -> None:
        """When task a's first IVON run is persisted (its second is training), SIGKILL its worker."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list(run_dir.glob("posteriors/parts/a-*/run-0.safetensors")):
                for address, running in cluster.client.run(executing).items():
                    if any(r.get("task_index") == 0 for r in running):
                        pid = cluster.client.run(os.getpid, workers=[address])[address]
                        killed.update(pid=pid, done={p.name for p in run_dir.glob("posteriors/*.safetensors")})
                        os.kill(pid, signal.SIGKILL)
                        return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_mid_finetune, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(1) as pool:
        # the flow's thread sees this one's Prefect settings (the session server's API URL)
        run = contextvars.copy_context().run
        flow = pool.submit(run, _run, RESUME, out, {"kind": "dask", "address": cluster.address})
        try:
            summary = flow.result(timeout=600)
        except Exception as exc:
            logs = "\n".join(tail(p, 2000) for p in sorted(cluster.logs.glob("*.log")))
            raise AssertionError(f"the flow failed ({type(exc).__name__}: {exc}); cluster logs:\n{logs}") from exc
    watcher.join(5)
    assert killed, "task a's finetune was never seen mid-way on a worker"
    assert not any(name.startswith("a-") for name in killed["done"]), "killed before task a's posterior existed"

    calls = _calls(cluster.calls)
    fits = Counter((c["task"], c["seed"]) for c in calls if c["call"] == "fit")
    # a's run 0 finished before the kill and is reused; its run 1 was cut short and runs again
    assert fits.pop(("a", 1)) == 2 and [c["pid"] for c in calls if c.get("task") == "a"][:2] == [killed["pid"]] * 2
    assert fits == Counter({("a", 0): 1, ("b", 0): 1, ("b", 1): 1, ("c", 0): 1, ("c", 1): 1}), fits
    assert len([c for c in calls if c["call"] == "multitask_finetune"]) == 1
    assert summary["chosen"] is not None and (run_dir / "front.json").exists()
    assert len(list(run_dir.glob("posteriors/*.safetensors"))) == 3
    assert not list(run_dir.glob("posteriors/parts/*/*")), "the finished posterior replaced its parts"

    # the killed attempt's MLflow run is KILLED, its rerun FINISHED; nothing left RUNNING
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("varmerge").experiment_id], max_results=1000)
    status = Counter((r.info.run_name, r.info.status) for r in runs)
    assert status[("finetune/a", "KILLED")] == 1 and status[("finetune/a", "FINISHED")] == 1, status
    assert not [k for k in status if k[1] == "RUNNING"], status
