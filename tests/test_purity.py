"""The core library never imports the orchestration stack."""

import subprocess
import sys
from pathlib import Path

import varmerge

MODULES = sorted(
    f"varmerge.{p.stem}" for p in Path(varmerge.__file__).parent.glob("*.py") if p.stem not in ("__init__", "cli")
)


def test_core_modules_do_not_import_prefect_mlflow_dvc():
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow', 'dvc'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"varmerge imported {out.stdout.strip()}"
    assert len(MODULES) >= 6
