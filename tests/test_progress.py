"""Progress of the long steps: what the steps report, the terminal's bars, Prefect's artifacts."""

from __future__ import annotations

import io

import pytest
from helpers import TINY
from rich.console import Console

from flows.bars import Bars
from varmerge import pipeline
from varmerge.config import parse_config
from varmerge.plan import make_plan
from varmerge.sequence import LocalRunner, estimate_front


def _cfg(methods=TINY["merge"]["methods"], **posterior):
    merge = {**TINY["merge"], "methods": methods}
    d = {
        **TINY,
        "posterior": {**TINY["posterior"], **posterior},
        "merge": merge,
        "selection": {"strategy": "top_k", "method": methods[0]},
    }
    return parse_config(d, "tiny")


def test_each_step_reports_its_steps_up_to_the_total():
    """Finetunes report optimiser steps per run (the second run of MultiIVON says so), sweeps the
    α done, multitask finetunes their steps; every report ends at its total."""
    seen: dict[str, list] = {}

    def steps(label):
        import contextlib

        seen[label] = []

        @contextlib.contextmanager
        def step():
            yield lambda done, total, note="": seen[label].append((done, total, note))

        return step()

    plan = make_plan(_cfg())
    res = estimate_front(LocalRunner(plan, steps=steps))
    assert res.error is None
    n = TINY["posterior"]["steps"]
    ft = seen["finetune a (multi_ivon × 2)"]
    assert ft[0] == (0, n, "") and ft[-1] == (n, n, "run 2") and (n, n, "") in ft
    assert [d for d, _, note in ft if note == ""] == list(range(n + 1))  # every step of run 1, in order
    for m in TINY["merge"]["methods"]:
        assert seen[f"merge + evaluate {m}"] == [(0, 16, ""), (16, 16, "")]  # 15 of spacing 0.25 and the uniform α
    [mt] = [k for k in seen if k.startswith("multitask α=")]
    assert seen[mt][-1] == (TINY["multitask_steps"],) * 2 + ("",)
    assert seen["loading data"] == [] and seen["building θ0"] == []  # no steps to count


def _render(console_kwargs: dict, quiet: bool = False) -> str:
    out = io.StringIO()
    console = Console(file=out, width=120, **console_kwargs)
    with Bars(console, quiet=quiet) as bars:
        with bars.step("finetune a") as report:
            for k in range(0, 11):
                report(k, 10)
        with bars.step("loading data"):
            pass
    return out.getvalue()


def test_bars_show_steps_on_a_terminal_and_nothing_when_quiet_or_piped():
    shown = _render({"force_terminal": True})
    assert "finetune a" in shown and "10/10" in shown and "loading data" in shown and "1/1" in shown
    assert _render({"force_terminal": True}, quiet=True) == ""
    assert _render({"force_terminal": False}) == ""  # a CI log or a pipe: no redraws


def test_artifact_progress_is_throttled_and_ends_at_the_last_state(monkeypatch):
    """One API call at the first report, none within the interval, one for the total; a step that
    ends between sends still sends its last state."""
    import prefect.artifacts

    from tasks.progress import ArtifactProgress

    calls = []
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda p, description: calls.append(p) or "id")
    monkeypatch.setattr(
        prefect.artifacts, "update_progress_artifact", lambda i, p, description: calls.append((i, p, description))
    )
    art = ArtifactProgress("finetune a", interval=3600)
    for k in range(0, 51):
        art(k, 50)
    art.finish()
    assert calls == [0.0, ("id", 100.0, "finetune a: 50/50")]
    calls.clear()
    stopped = ArtifactProgress("sweep", interval=3600)
    stopped(0, 10)
    stopped(4, 10, "run 2")
    stopped.finish()
    assert calls == [0.0, ("id", 40.0, "sweep: 4/10 (run 2)")]
    calls.clear()
    ArtifactProgress("nothing").finish()
    assert calls == []


@pytest.mark.parametrize("method", ["ivon", "adamw_sg"])
def test_single_run_finetunes_report_without_a_run_note(method):
    cfg = _cfg(methods=["simple"], method=method, components=1)
    tasks, n_classes = pipeline.prepare_tasks(cfg)
    plan = make_plan(cfg)
    base, prior = pipeline.theta0(plan, n_classes)
    seen = []
    pipeline.finetune_task(plan, base, tasks[0], prior=prior, report=lambda d, t, note="": seen.append((d, t, note)))
    n = TINY["posterior"]["steps"]
    assert seen[0] == (0, n, "") and seen[-1] == (n, n, "")
