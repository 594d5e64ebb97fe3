"""The ``varmerge`` command line (typer + rich). It lives with the flows it runs; the library
(``varmerge/``) stays free of Prefect and MLflow.

Errors a user can act on (bad config, missing data, α off the simplex, ...) print one line;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from varmerge.services import LOOPBACK, apply_service_env

#: Help is plain text (click's layout): typer's rich layout prints a ``<bool>`` type beside every flag.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    help="varmerge: Pareto fronts of multitask finetuning by variational model merging. Errors a user can act "
    "on (bad config, missing data, α off the simplex) print one line; --debug shows the traceback.",
)
console = Console()
_STATE = {"debug": False}

apply_service_env()  # offline, no telemetry, loopback only (varmerge/services.py)


def _prefect_env() -> None:
    """Prefect's home in the project folder, a patient API start-up, quiet logs."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", LOOPBACK)
    # A failure reaches the user as one `error:` line; Prefect's and MLflow's own logs (Prefect
    # logs a failed run with its traceback) only with --debug or when the variables are set.
    debug = _STATE["debug"]
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if debug else "CRITICAL")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if debug else "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """varmerge: Pareto fronts of multitask finetuning by variational model merging."""
    _STATE["debug"] = debug


# Errors whose message is meant for the user as is; anything else is reported as unexpected.
USER_ERRORS = (ValueError, RuntimeError, OSError)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(exc: BaseException) -> None:
    """Print ``error: <one line>`` and exit 2; ``--debug`` re-raises (the traceback)."""
    if _STATE["debug"]:
        raise exc
    msg = _one_line(exc)
    if not isinstance(exc, USER_ERRORS):
        msg = f"unexpected {type(exc).__name__}: {msg} (rerun with --debug for the traceback)"
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


PREFLIGHT_STATUS = "checking the config, data, model and tracking store"
QUIET = typer.Option(False, "--quiet", "-q", help="no progress bars (there are none either when not on a terminal)")
RUNNER = typer.Option(None, "--runner", help="where the tasks run: thread | dask (default: the config's runner.kind)")
ADDRESS = typer.Option(None, "--address", help="a running Dask scheduler, tcp://HOST:PORT (implies --runner dask)")
WORKERS = typer.Option(None, "--workers", help="worker processes of a local Dask cluster (implies --runner dask)")


def _runner_section(cfg, kind: str | None, address: str | None, workers: int | None):
    """``(cfg, section)``: the config with the command line's runner options, and the ``runner``
    section for the flow (None when no option was given: the flow reads the config's)."""
    from varmerge.config import with_runner

    if kind is None and address is None and workers is None:
        return cfg, None
    section = {"kind": kind or ("dask" if address or workers else cfg.runner.kind)}
    section |= {k: v for k, v in (("address", address), ("workers", workers)) if v is not None}
    try:
        return with_runner(cfg, section, "command line"), section
    except ValueError as exc:
        _fail(exc)


def _say_where(cfg, quiet: bool) -> None:
    """On Dask the tasks run in the workers' processes: their progress is not drawn here."""
    if cfg.runner.kind == "dask" and not quiet:
        where = cfg.runner.address or f"a local cluster of {cfg.runner.local_workers} worker processes"
        console.print(f"tasks run on Dask ({where}); their progress is in each task run's artifacts in the Prefect UI")


@contextmanager
def _progress(quiet: bool):
    """The flow's steps report to progress bars in this terminal (and to Prefect artifacts)."""
    from flows.bars import Bars
    from tasks.progress import show_in

    with Bars(console, quiet=quiet) as bars, show_in(bars):
        yield


@contextmanager
def _user_errors(status: str | None = None):
    """Run the block (under a console ``status`` line if given); an exception ends the command
    through :func:`_fail`."""
    try:
        with console.status(status) if status else nullcontext():
            yield
    except Exception as exc:  # noqa: BLE001 - _fail tells user errors from unexpected ones
        _fail(exc)


def _load(config: Path, check_device: bool = True):
    from varmerge.config import load_config
    from varmerge.pipeline import check_accelerator

    try:
        cfg = load_config(config)
        if check_device:
            check_accelerator(cfg.accelerator)
        return cfg
    except ValueError as exc:
        _fail(exc)


@app.command()
def validate(
    config: Path = typer.Argument(..., help="experiment YAML"),
    schema_only: bool = typer.Option(False, "--schema-only", help="skip the data and model checks"),
) -> None:
    """Check a config (schema, data, model) and print what it would run; writes nothing."""
    from varmerge import preflight as pf
    from varmerge.grid import grid_size
    from varmerge.pipeline import check_accelerator
    from varmerge.sequence import prior_methods, selection_method

    cfg = _load(config, check_device=False)
    try:
        check_accelerator(cfg.accelerator)
    except ValueError as exc:
        console.print(
            f"[yellow]note:[/] {escape(str(exc))} (fine for a config meant for another machine)", soft_wrap=True
        )
    report = None
    with _user_errors():
        pf.check_constraints(cfg)
        if not schema_only:
            pf.check_runner(cfg)
            ds = pf.load_data(cfg)
            report = pf.check_data(cfg, ds)
            pf.check_model(cfg, report.num_classes, ds)
    table = Table(title=f"{config} is valid", show_header=False)
    table.add_row("tasks", ", ".join(f"{t.name} {t.classes or t.domain}" for t in cfg.data.tasks))
    table.add_row("data", f"{cfg.data.source} (seed {cfg.data.seed}, test {cfg.data.test_fraction})")
    table.add_row("model", cfg.model.name)
    table.add_row("posterior", f"{cfg.posterior.method} ({cfg.posterior.steps} steps)")
    table.add_row("merges", ", ".join(cfg.merge.methods))
    table.add_row("α grid", f"spacing {cfg.merge.spacing}: {grid_size(len(cfg.data.tasks), cfg.merge.spacing)} points")
    sel, method = cfg.selection, selection_method(cfg)
    if sel.strategy == "closed_loop":
        priors = ", ".join(prior_methods(cfg))
        how = f"closed loop: up to {sel.budget} multitask finetunes, {sel.batch} at a time (prior {priors})"
    else:
        how = f"top {sel.top_k} α of {method}'s front"
    table.add_row("selection", how)
    rc = cfg.runner
    local = f"a local Dask cluster of {rc.local_workers} workers"
    table.add_row("runner", "the flow's thread" if rc.kind == "thread" else rc.address or local)
    if report is not None:
        table.add_row(
            "examples",
            ", ".join(f"{n} {report.train_examples[n]}/{report.test_examples[n]}" for n in report.train_examples)
            + " (train/test)",
        )
    console.print(table)


@app.command()
def demo(
    config: Path = typer.Argument(Path("configs/smoke.yaml"), help="experiment YAML"),
    output: Path = typer.Option(Path("runs/demo"), help="where the front table goes"),
    quiet: bool = QUIET,
) -> None:
    """Estimate a front with the library alone (no Prefect, no MLflow) and print it."""
    from flows.bars import Bars
    from varmerge.sequence import LocalRunner, estimate_front

    cfg = _load(config)
    t0 = time.perf_counter()
    with _user_errors(), Bars(console, quiet=quiet) as bars:
        res = estimate_front(cfg, LocalRunner(cfg, steps=bars.step))
        if res.error is not None:
            raise ValueError(res.error)
    summary = res.summary()
    summary["seconds"]["total"] = time.perf_counter() - t0
    print_front(summary, cfg.merge.spacing)
    output.mkdir(parents=True, exist_ok=True)
    (output / "front.json").write_text(json.dumps({"config": cfg.name, **summary}, indent=2))
    console.print(f"total {summary['seconds']['total']:.0f} s; summary in {output / 'front.json'}")


@app.command("prepare-data")
def prepare_data(
    config: Path = typer.Argument(..., help="experiment YAML (or params.yaml)"),
    out: Path = typer.Argument(..., help="folder for the HF dataset (save_to_disk)"),
) -> None:
    """Load the config's offline source and save it to OUT (a DVC stage output)."""
    from varmerge import data as vdata
    from varmerge import pipeline

    cfg = _load(config)
    with _user_errors():
        ds = pipeline.load_dataset(cfg)
        vdata.save_dataset(ds, out)
    console.print(f"saved {cfg.data.source} ({', '.join(f'{k}: {len(v)}' for k, v in ds.items())}) to {out}")


@contextmanager
def prefect_api():
    """A Prefect API server of this command's own, for the flows it runs, started first thing: it
    boots in its own process (``prefect server start --no-services --no-ui`` on a free loopback
    port; 3.9 s to answer on an idle 2-core machine) while this one imports torch and checks the
    inputs, where Prefect's ephemeral server would start only at the flow's first API call, after
    importing the server's code here too. Like that server, it lives as long as the command: stopped on the way out, and
    it gets SIGTERM if this process dies (Linux). Yields the :class:`OwnPrefectAPI`, or None when
    ``PREFECT_API_URL`` names a server (in the environment, or in Prefect's settings once Prefect
    is imported: tests)."""
    _prefect_env()
    if os.environ.get("PREFECT_API_URL") or _prefect_api_in_settings():
        yield None
        return
    api = OwnPrefectAPI()
    os.environ["PREFECT_API_URL"] = api.url
    try:
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        api.stop()


class OwnPrefectAPI:
    def __init__(self):
        import socket
        import subprocess
        import tempfile

        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{port}/api"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port)]
            + ["--no-services", "--no-ui"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def wait(self, timeout: float) -> None:
        """Return once the server answers; its last output in the error if it exits or times out."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        self.log.seek(0)
        output = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
        rc = self.proc.poll()
        what = f"exited with code {rc}" if rc is not None else f"did not answer within {timeout:.0f} s"
        raise RuntimeError(f"the Prefect API server {what}: {' | '.join(output)}")

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prefect_api_in_settings() -> bool:
    if "prefect.settings" not in sys.modules:  # not imported yet: only the environment can say
        return False
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextmanager
def start_services(report, experiment: str, api: OwnPrefectAPI | None):
    """While the block imports the flow (the imports of Prefect and MLflow take seconds): create
    the MLflow store and the experiment in a thread (a new SQLite store runs its schema
    migrations); then wait for ``api``, the server of :func:`prefect_api` if any. An error ends the
    command with one line. Called after preflight: a run that fails its checks creates no store."""
    from concurrent.futures import ThreadPoolExecutor

    def mlflow_store() -> None:
        from tasks import tracking

        tracking.experiment_id(report.tracking_uri, experiment, tracking.artifact_root(report.run_dir))

    with _user_errors("starting Prefect's API and the MLflow store"):
        with ThreadPoolExecutor(1, thread_name_prefix="varmerge-mlflow") as pool:
            store = pool.submit(mlflow_store)
            yield
            store.result()
        if api is not None:
            api.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))


@app.command("run")
def run_flow(
    config: Path = typer.Argument(..., help="experiment YAML"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: sqlite in the output folder)"),
    output: Path = typer.Option(None, help="output folder (default: the config's output_dir)"),
    data: Path = typer.Option(None, help="a prepared dataset folder (e.g. DVC's data/dvc) instead of the source"),
    runner: str = RUNNER,
    address: str = ADDRESS,
    workers: int = WORKERS,
    quiet: bool = QUIET,
) -> None:
    """The main job as a Prefect flow: finetunes, posteriors, α sweeps, front, multitask finetune.

    Config, accelerator, output folder, tracking store, data, model and the Dask scheduler (with
    --address) are checked first: a run that would fail stops there and writes nothing.
    """
    from varmerge.preflight import preflight

    with prefect_api() as api:
        cfg, section = _runner_section(_load(config), runner, address, workers)
        with _user_errors(PREFLIGHT_STATUS):
            report = preflight(cfg, tracking_uri, output_dir=output, data_dir=data)
        with start_services(report, cfg.tracking.experiment, api):
            from flows.front import front_flow

        t0 = time.perf_counter()
        _say_where(cfg, quiet)
        with _user_errors(), _progress(quiet):
            summary = front_flow(
                str(config),
                tracking_uri=tracking_uri,
                output_dir=str(output) if output else None,
                data_dir=str(data) if data else None,
                check_inputs=False,
                runner=section,
            )
    print_front(summary, cfg.merge.spacing)
    console.print(
        f"done in {time.perf_counter() - t0:.0f} s. Front, plots: {summary['run_dir']}/ "
        f"(front.json, front.png); MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}; "
        f"registered model {summary.get('registered_model')}. "
        f"Browse with: varmerge ui --tracking-uri {summary['tracking_uri']}"
    )


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="experiment YAML"),
    spacing: float = typer.Option(0.1, help="α grid spacing of the ground truth (coarser than the merges)"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI"),
    output: Path = typer.Option(None, help="output folder (default: the config's output_dir)"),
    runner: str = RUNNER,
    address: str = ADDRESS,
    workers: int = WORKERS,
    quiet: bool = QUIET,
) -> None:
    """Ground truth: real multitask finetunes over an α grid; front quality of every merge method."""
    from varmerge.grid import grid_size
    from varmerge.preflight import preflight

    with prefect_api() as api:
        cfg, section = _runner_section(_load(config), runner, address, workers)
        with _user_errors(PREFLIGHT_STATUS):
            n = grid_size(len(cfg.data.tasks), spacing)
            report = preflight(cfg, tracking_uri, output_dir=output)
        with start_services(report, cfg.tracking.experiment, api):
            from flows.sweep import ground_truth_flow

        t0 = time.perf_counter()
        _say_where(cfg, quiet)
        with _user_errors(), _progress(quiet):
            out = ground_truth_flow(
                str(config),
                spacing=spacing,
                tracking_uri=tracking_uri,
                output_dir=str(output) if output else None,
                runner=section,
            )
    table = Table(title=f"ground truth: {n} multitask finetunes, max mean acc {100 * out['max_mean_accuracy']:.1f}")
    for col in ("method", "max mean acc", "hypervolume", "IGD+"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("multitask (truth)", f"{100 * out['max_mean_accuracy']:.1f}", f"{out['hypervolume']:.4f}", "0")
    for m, d in out["methods"].items():
        table.add_row(m, f"{100 * d['max_mean_accuracy']:.1f}", f"{d['hypervolume']:.4f}", f"{d['igd_plus']:.4f}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s (reference point {out['reference_point']})")


@app.command()
def front(
    run_id: str = typer.Argument(..., help="MLflow run id of a front flow (the parent run)"),
    tracking_uri: str = typer.Option("sqlite:///runs/mlflow.db", help="MLflow tracking URI"),
) -> None:
    """Print the front table and the chosen α of a finished run."""
    from tasks.tracking import read_json_artifact

    try:
        summary = read_json_artifact(tracking_uri, run_id, "front/front.json")
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the message is what matters
        _fail(ValueError(f"cannot read the front of run {run_id!r} from {tracking_uri}: {exc}"))
    print_front(summary, summary.get("spacing", float("nan")))
    for m, d in summary["methods"].items():
        t = Table(title=f"{m}: Pareto front ({d['front_size']} points)")
        for n in ["α", *summary["tasks"]]:
            t.add_column(n, justify="right")
        for a, acc in zip(d["front"]["alpha"], d["front"]["accuracy"], strict=True):
            t.add_row(str([round(v, 2) for v in a]), *[f"{100 * v:.1f}" for v in acc])
        console.print(t)


@app.command()
def ui(
    tracking_uri: str = typer.Option("sqlite:///runs/mlflow.db", help="MLflow backend store"),
    port: int = typer.Option(5000),
    host: str = typer.Option(LOOPBACK, help="bind address (loopback by default; 0.0.0.0 exposes it to the network)"),
) -> None:
    """Start the MLflow UI on 127.0.0.1 (other hosts only when asked with --host)."""
    if host not in (LOOPBACK, "localhost", "::1"):
        console.print(
            f"[yellow]note:[/] the MLflow UI will listen on {host}, not only on this machine; it has no authentication",
            soft_wrap=True,
        )
    console.print(f"MLflow UI on http://{host}:{port} ({tracking_uri}); Ctrl-C stops it")
    for name, url in experiment_links(tracking_uri, f"http://{host}:{port}"):
        console.print(f"  {name}: {url}", soft_wrap=True, highlight=False)
    raise typer.Exit(serve(ui_command(tracking_uri, host, port)))


def experiment_links(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """(name, link) of each experiment of the store, in the UI's model-training view: MLflow 3.17's
    UI opens every experiment in its GenAI view (traces, judges) unless the link or the user's
    toggle says otherwise. None for a SQLite store that does not exist yet (nothing is created)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []
    from tasks import tracking

    experiments = tracking.client(tracking_uri).search_experiments()
    view = "workflowType=machine_learning"
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?{view}") for e in experiments if e.name != "Default"]


def serve(cmd: list[str], grace_seconds: float = 10.0) -> int:
    """Run a server command in its own process group until it exits; SIGINT, SIGTERM or SIGHUP to
    this process stop the whole group (``mlflow ui`` forks gunicorn / uvicorn workers), with
    SIGKILL after ``grace_seconds``, so nothing outlives the command. Returns its exit code."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, start_new_session=True)
    stopping: list[float] = []

    def stop(signum, _frame) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > grace_seconds:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # workers the server left behind
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else rc


def ui_command(tracking_uri: str, host: str = LOOPBACK, port: int = 5000) -> list[str]:
    """The ``mlflow ui`` command line that ``varmerge ui`` runs."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
    ]


def print_front(summary: dict, spacing: float) -> None:
    """The per-method table and predicted vs realised at the chosen α."""
    table = Table(title=f"estimated fronts ({summary['grid_size']} α, spacing {spacing})")
    for col in ("method", "max mean acc", "best α", "front size", "sweep s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, r in summary["methods"].items():
        table.add_row(
            m,
            f"{100 * r['max_mean_accuracy']:.1f}",
            str([round(v, 2) for v in r["best_alpha"]]),
            str(r["front_size"]),
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    if summary.get("search"):
        print_search(summary["search"])
    ch = summary["chosen"]
    if summary.get("search"):  # the incumbent only: the other finetunes are in the search table
        ch = {**ch, **{k: ch[k][:1] for k in ("alpha", "predicted", "realised")}}
    for a, pred, real in zip(ch["alpha"], ch["predicted"], ch["realised"], strict=True):
        cmp = Table(title=f"α {[round(v, 2) for v in a]} chosen by '{ch['method']}': predicted vs realised")
        for col in ("task", "predicted (merged)", "realised (multitask finetune)"):
            cmp.add_column(col, justify="left" if col == "task" else "right")
        for n, p, r in zip(summary["tasks"], pred, real, strict=True):
            cmp.add_row(n, f"{100 * p:.1f}", f"{100 * r:.1f}")
        cmp.add_row("mean", f"{100 * sum(pred) / len(pred):.1f}", f"{100 * sum(real) / len(real):.1f}")
        console.print(cmp)


def print_search(search: list[dict]) -> None:
    """The closed-loop search, one row per finetune: where, predicted, realised, incumbent."""
    table = Table(title=f"closed-loop search: {sum(len(it['alpha']) for it in search)} multitask finetunes")
    for col in ("iteration", "α", "predicted mean", "expected gain", "realised mean", "incumbent"):
        table.add_column(col, justify="right")
    for i, it in enumerate(search, start=1):
        for a, p, g, r in zip(it["alpha"], it["predicted_mean"], it["expected_improvement"], it["realised"]):
            gain = "prior's best" if g is None else f"{100 * g:.2f}"
            inc = "-" if it["incumbent_mean"] is None else f"{100 * it['incumbent_mean']:.1f}"
            real = f"{100 * sum(r) / len(r):.1f}"
            table.add_row(str(i), str([round(v, 2) for v in a]), f"{100 * p:.1f}", gain, real, inc)
    console.print(table)


def run() -> None:  # pragma: no cover - console-script shim
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app()
