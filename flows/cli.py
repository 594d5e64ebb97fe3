"""The ``varmerge`` command line (typer + rich). It lives with the flows it runs; the library
(``varmerge/``) stays free of Prefect and MLflow. The services a command starts are in
:mod:`flows.services`, what it prints in :mod:`flows.render`.

Errors a user can act on (bad config, missing data, α off the simplex, ...) print one line;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer
from rich.markup import escape

from flows import services
from flows.render import console, print_front, print_fronts, print_ground_truth, print_plan
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
_STATE = {"debug": False}

apply_service_env()  # offline, no telemetry, loopback only (varmerge/services.py)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """varmerge: Pareto fronts of multitask finetuning by variational model merging."""
    _STATE["debug"] = debug
    apply_service_env()  # again per command: a process that imported this module earlier may have changed them


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


def _with_runner(cfg, kind: str | None, address: str | None, workers: int | None):
    """The config with the command line's runner options (itself when none was given)."""
    from varmerge.config import with_runner

    if kind is None and address is None and workers is None:
        return cfg
    section = {"kind": kind or ("dask" if address or workers else cfg.runner.kind)}
    section |= {k: v for k, v in (("address", address), ("workers", workers)) if v is not None}
    try:
        return with_runner(cfg, section, "command line")
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


def _read(config: Path) -> dict:
    """The config as read (not validated), its own files checked: pandas only, no torch, so a
    common mistake answers in about a second."""
    from varmerge.config import read_config
    from varmerge.userfiles import check_config

    try:
        raw = read_config(config)
        check_config(raw)
        return raw
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)


def _load(config: Path, check_device: bool = True, raw: dict | None = None):
    """The config (``raw``, if already :func:`_read`), validated (this imports the merge rules
    and torch); with ``check_device``, the accelerator."""
    from varmerge.config import parse_config

    raw = _read(config) if raw is None else raw
    try:
        cfg = parse_config(raw, str(config))
        if check_device:
            from varmerge.pipeline import check_accelerator

            check_accelerator(cfg.accelerator)
        return cfg
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)


@contextmanager
def _flow_command(config: Path, runner: tuple, quiet: bool, **where):
    """What ``run`` and ``sweep`` share: the command's own Prefect API (started first), the config
    read and validated once, preflight (the run plan: nothing is written before it passes), the
    MLflow store created while the flow module imports, then progress bars for the block, which
    gets the plan. Errors end the command with one line."""
    raw = _read(config)  # the quick checks, before Prefect's API starts
    with services.prefect_api(_STATE["debug"]) as api:  # the server boots while the rest imports
        from varmerge.preflight import preflight

        cfg = _with_runner(_load(config, raw=raw), *runner)
        with _user_errors(PREFLIGHT_STATUS):
            plan = preflight(cfg, **where, config_file=config)
        with _user_errors("starting Prefect's API and the MLflow store"), services.start_services(plan, api):
            import flows.front  # noqa: F401 - Prefect's and MLflow's imports, while the store is created

        _say_where(cfg, quiet)
        with _user_errors(), _progress(quiet):
            yield plan


@app.command()
def validate(
    config: Path = typer.Argument(..., help="experiment YAML"),
    schema_only: bool = typer.Option(False, "--schema-only", help="skip the data and model checks"),
) -> None:
    """Check a config (schema, data, model) and print what it would run; writes nothing."""
    cfg = _load(config, check_device=False)
    from varmerge import preflight as pf
    from varmerge.pipeline import check_accelerator
    from varmerge.plan import make_plan

    try:
        check_accelerator(cfg.accelerator)
    except ValueError as exc:
        console.print(
            f"[yellow]note:[/] {escape(str(exc))} (fine for a config meant for another machine)", soft_wrap=True
        )
    with _user_errors():
        plan = make_plan(cfg)
        pf.check_constraints(cfg)
        if not schema_only:
            pf.check_runner(cfg)
            ds = pf.load_data(cfg)
            plan = pf.check_data(plan, ds)
            pf.check_model(cfg, plan.num_classes, ds)
    print_plan(plan, f"{config} is valid")


@app.command()
def demo(
    config: Path = typer.Argument(Path("configs/smoke.yaml"), help="experiment YAML"),
    output: Path = typer.Option(Path("runs/demo"), help="where the front table goes"),
    quiet: bool = QUIET,
) -> None:
    """Estimate a front with the library alone (no Prefect, no MLflow) and print it."""
    from flows.bars import Bars
    from varmerge.plan import make_plan
    from varmerge.sequence import LocalRunner, estimate_front

    cfg = _load(config)
    t0 = time.perf_counter()
    with _user_errors(), Bars(console, quiet=quiet) as bars:
        plan = make_plan(cfg)
        res = estimate_front(LocalRunner(plan, steps=bars.step))
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
    where = {"tracking_uri": tracking_uri, "output_dir": output, "data_dir": data}
    t0 = time.perf_counter()
    with _flow_command(config, (runner, address, workers), quiet, **where) as plan:
        from flows.front import front_flow

        summary = front_flow(plan)
    print_front(summary, plan.cfg.merge.spacing)
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
    quiet: bool = QUIET,
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI"),
    output: Path = typer.Option(None, help="output folder (default: the config's output_dir)"),
    runner: str = RUNNER,
    address: str = ADDRESS,
    workers: int = WORKERS,
) -> None:
    """Ground truth: real multitask finetunes over an α grid; front quality of every merge method."""
    from varmerge.grid import grid_size

    try:
        grid_size(2, spacing)
    except ValueError as exc:
        _fail(exc)
    t0 = time.perf_counter()
    with _flow_command(config, (runner, address, workers), quiet, tracking_uri=tracking_uri, output_dir=output) as plan:
        from flows.sweep import ground_truth_flow

        out = ground_truth_flow(plan, spacing=spacing)
    print_ground_truth(out)
    console.print(f"done in {time.perf_counter() - t0:.0f} s (reference point {out['reference_point']})")


DEFAULT_STORE = "sqlite:///runs/mlflow.db"


def _front_json(target: str) -> Path | None:
    """``target`` as a run's front.json (a run folder or the file itself), or None."""
    path = Path(target)
    path = path / "front.json" if path.is_dir() else path
    return path if path.is_file() and path.suffix == ".json" else None


def _read_front(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _fail(ValueError(f"{path}: not a readable front.json: {exc}"))
    if not isinstance(summary, dict) or "methods" not in summary:
        _fail(ValueError(f"{path} is not the front.json of a varmerge run"))
    return summary


def _store_of(front_json: Path, uri: str) -> str:
    """A run's tracking URI as front.json keeps it: a SQLite store relative to the run folder
    (``sqlite:///../mlflow.db``) made absolute."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        return "sqlite:///" + str((front_json.parent / uri.removeprefix("sqlite:///")).resolve())
    return uri


@app.command()
def front(
    target: str = typer.Argument(..., help="a run folder (e.g. runs/smoke), its front.json, or an MLflow run id"),
    tracking_uri: str = typer.Option(None, help=f"with a run id: its MLflow store (default {DEFAULT_STORE})"),
) -> None:
    """Print the front table and the chosen α of a finished run, from wherever it is run."""
    from tasks.tracking import read_json_artifact

    path = _front_json(target)
    if path is not None:
        summary = _read_front(path)
    else:
        uri = tracking_uri or DEFAULT_STORE
        try:
            summary = read_json_artifact(uri, target, "front/front.json")
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the message is what matters
            hint = "" if tracking_uri else "; give the run folder (varmerge front runs/NAME) or --tracking-uri"
            _fail(ValueError(f"cannot read the front of run {target!r} from {uri}: {_one_line(exc)}{hint}"))
    print_front(summary, summary.get("spacing", float("nan")))
    print_fronts(summary)


@app.command()
def ui(
    run: str = typer.Argument(None, help="a run folder or its front.json: open that run's MLflow store"),
    tracking_uri: str = typer.Option(None, help=f"MLflow backend store (default: the run's, else {DEFAULT_STORE})"),
    port: int = typer.Option(5000),
    host: str = typer.Option(LOOPBACK, help="bind address (loopback by default; 0.0.0.0 exposes it to the network)"),
    workers: int = typer.Option(1, min=1, help="server worker processes (more for several users at once)"),
) -> None:
    """Start the MLflow UI on 127.0.0.1 (other hosts only when asked with --host)."""
    if run is not None and tracking_uri is None:
        path = _front_json(run)
        if path is None:
            _fail(ValueError(f"{run}: no front.json there (give a run folder, e.g. runs/smoke, or --tracking-uri)"))
        tracking_uri = _store_of(path, _read_front(path).get("tracking_uri") or DEFAULT_STORE)
    tracking_uri = tracking_uri or DEFAULT_STORE
    if host not in (LOOPBACK, "localhost", "::1"):
        console.print(
            f"[yellow]note:[/] the MLflow UI will listen on {host}, not only on this machine; it has no authentication",
            soft_wrap=True,
        )
    console.print(f"MLflow UI on http://{host}:{port} ({tracking_uri}); Ctrl-C stops it")
    for name, url in services.experiment_links(tracking_uri, f"http://{host}:{port}"):
        console.print(f"  {name}: {url}", soft_wrap=True, highlight=False)
    raise typer.Exit(services.serve(services.ui_command(tracking_uri, host, port, workers), env=services.ui_env()))


def run() -> None:  # pragma: no cover - console-script shim
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app()
