"""Where a flow step's progress goes: a Prefect progress artifact of its task run (the Prefect UI
shows it on the task run's page, as a percentage with the step count), and the terminal's bars
when the process running the flow shows them (``varmerge run`` registers its display with
:func:`show_in`; a Prefect worker has none)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from varmerge.progress import Report

_DISPLAYS: list[Any] = []  # displays with a ``step(label)`` context manager, innermost last


@contextlib.contextmanager
def show_in(display) -> Iterator[None]:
    """Show the steps' progress of the flows this process runs in ``display`` (e.g. the CLI's
    :class:`flows.bars.Bars`) for the duration of the block."""
    _DISPLAYS.append(display)
    try:
        yield
    finally:
        _DISPLAYS.remove(display)


@contextlib.contextmanager
def step(label: str) -> Iterator[Report]:
    """The :class:`~varmerge.progress.Report` of one step: to a progress artifact when in a Prefect
    task run, and to the process's display if one is shown."""
    from prefect.context import TaskRunContext

    artifact = ArtifactProgress(label) if TaskRunContext.get() else None
    with contextlib.ExitStack() as stack:
        reports = [r for r in (artifact,) if r is not None]
        if _DISPLAYS:
            reports.append(stack.enter_context(_DISPLAYS[-1].step(label)))

        def report(done: int, total: int, note: str = "") -> None:
            for r in reports:
                r(done, total, note)

        yield report
        if artifact is not None:
            artifact.finish()


class ArtifactProgress:
    """A Prefect progress artifact of the current task run, created at the first report and
    updated at most every ``interval`` seconds (each update is an API call), and at the end."""

    def __init__(self, label: str, interval: float = 1.0):
        self.label, self.interval = label, interval
        self.artifact_id = None
        self.last = (0, 0, "")
        self.pending = False  # a state reported and not sent
        self.sent_at = float("-inf")

    def __call__(self, done: int, total: int, note: str = "") -> None:
        self.last, self.pending = (done, total, note), True
        if time.monotonic() - self.sent_at >= self.interval or (total and done >= total):
            self._send()

    def finish(self) -> None:
        if self.pending:
            self._send()

    def _send(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        done, total, note = self.last
        percent = min(100.0, 100.0 * done / total) if total else 0.0
        description = f"{self.label}: {done}/{total}" + (f" ({note})" if note else "")
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)
        self.pending, self.sent_at = False, time.monotonic()
