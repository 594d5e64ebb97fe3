"""Offline, loopback-only defaults for the services the project starts (Prefect, MLflow, DVC, HF).

:func:`apply_service_env` sets each variable of :data:`SERVICE_ENV` unless the environment
already has it (a user's explicit choice wins). The ``varmerge`` CLI applies it at start-up and
so do ``tasks/`` (imported by Prefect workers running the deployments).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

LOOPBACK = "127.0.0.1"

SERVICE_ENV: dict[str, str] = {
    # no telemetry / analytics calls (they can hang or leak on an offline machine)
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # never contact the Hugging Face hub: weights and tokenizers are read from local folders
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # nor transformers' "Loading weights" / "Writing model shards" bars (a registered model's save)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # MLflow's "Downloading artifacts" bars for reading a front.json or a model: noise, not progress
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # a Prefect server started from this environment listens on loopback only
    "PREFECT_SERVER_API_HOST": LOOPBACK,
}


def cache_dir() -> Path:
    """The user's cache folder of varmerge (``$XDG_CACHE_HOME/varmerge``, default
    ``~/.cache/varmerge``): what is slow to make and the same every time (an empty MLflow store,
    the digests of source files)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "varmerge"


def apply_service_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """``setdefault`` every :data:`SERVICE_ENV` entry; returns the values now in effect."""
    env = os.environ if environ is None else environ
    for key, value in SERVICE_ENV.items():
        env.setdefault(key, value)
    return {k: env[k] for k in SERVICE_ENV}
