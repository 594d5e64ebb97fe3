"""Lightning's MLflow logger for the run a step owns (kept apart from :mod:`tasks.tracking`, which
the commands that only read MLflow import without Lightning)."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class StepLogger(MLFlowLogger):
    """Lightning's MLflow logger for a run a step owns: a successful ``fit`` leaves the run open
    (Lightning's would mark it FINISHED after the first of a MultiIVON finetune's K fits, while
    the next fits still log to it); the step finishes it (:func:`tasks.tracking.child_run`). A failed fit marks it
    FAILED, as Lightning's does."""

    def finalize(self, status: str = "success") -> None:
        if status == "failed":
            super().finalize(status)


def lightning_logger(uri: str | None, run_id: str | None):
    """Lightning's MLflow logger bound to an existing run (one logging path, no extra runs)."""
    if not uri or not run_id:
        return None
    return StepLogger(tracking_uri=uri, run_id=run_id, log_model=False)
