"""The terminal's progress bars: one per step (θ0, each finetune, each sweep, each multitask
finetune) with its steps done of total, the time elapsed and the time left. Shown only on a
terminal and not under ``--quiet``: a CI log or a pipe gets the results, not redraws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from varmerge.progress import Report


class Bars:
    def __init__(self, console: Console, *, quiet: bool = False):
        self.enabled = console.is_terminal and not quiet
        self.progress = Progress(
            SpinnerColumn(finished_text="✓"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[Report]:
        """A bar for one step; the step reports ``(done, total, note)``; it ends full when the step
        ends (a step that reports nothing, e.g. loading data, shows a spinner until then)."""
        task = self.progress.add_task(label, total=None)
        seen = {"total": 1}

        def report(done: int, total: int, note: str = "") -> None:
            seen["total"] = total or 1
            description = f"{label} · {note}" if note else label
            self.progress.update(task, completed=done, total=total or None, description=description)

        yield report  # a step that fails leaves its bar where it stopped
        self.progress.update(task, total=seen["total"], completed=seen["total"])
