"""varmerge: Pareto-front estimation for multitask finetuning by variational model merging.

The package is the pure library: tensors and state dicts in, tensors and state dicts out.
It never imports prefect, mlflow or dvc (orchestration lives in ``tasks/`` and ``flows/``), and
importing it imports nothing heavy: each module imports what it needs (torch, Lightning, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

StateDict = Mapping[str, "torch.Tensor"]

__version__ = "0.1.0"
__all__ = ["StateDict", "__version__"]
