import os

import pytest
import torch

# Keep every service offline and quiet in tests.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_models(T, seed=0, dtype=torch.float64, shapes=None):
    """T state dicts with random means and positive precisions (a test helper)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layer.weight": (4, 3), "layer.bias": (4,), "head": (5,)}
    means = [{k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()} for _ in range(T)]
    precs = [
        {k: torch.rand(s, generator=g, dtype=dtype) * 3 + 0.05 for k, s in shapes.items()}
        for _ in range(T)
    ]
    return means, precs
