"""The core library never imports the orchestration stack (no exemptions: the CLI lives in flows/)."""

import pkgutil
import subprocess
import sys

import varmerge

MODULES = sorted(m.name for m in pkgutil.walk_packages(varmerge.__path__, "varmerge."))


def test_core_modules_do_not_import_prefect_mlflow_dvc_flows_or_tasks():
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'mlflow', 'dvc', 'flows', 'tasks'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"varmerge imported {out.stdout.strip()}"
    assert len(MODULES) >= 20 and "varmerge.store" in MODULES and "varmerge.sequence" in MODULES
