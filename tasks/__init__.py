"""Prefect tasks: thin wrappers around ``varmerge`` that pass references (paths, hashes), never
tensors, persist their outputs as files, log to MLflow and cache by content."""

import logging as _logging

# Prefect workers import tasks/ without the CLI: the same offline, loopback-only defaults, set
# before datasets / transformers / mlflow read them at import.
from varmerge.services import apply_service_env as _apply_service_env

_apply_service_env()

# Prefect shows library logs; keep Lightning's per-fit banners out of the flow's output
# (training progress is reported per task by the flow itself). The datasets progress bars are
# off through the environment (HF_DATASETS_DISABLE_PROGRESS_BARS, set above).
for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    _logging.getLogger(_name).setLevel(_logging.WARNING)
