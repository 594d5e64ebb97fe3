"""The results report is generated from results/table1.json: its numbers are the JSON's."""

import json
import re
from pathlib import Path

from benchmarks import table1
from benchmarks.report import render

ROOT = Path(__file__).resolve().parent.parent


def _results():
    return json.loads((ROOT / "results" / "table1.json").read_text())


def test_report_cells_are_the_json_numbers():
    res = _results()
    text = render(res, table1.PAPER, table1.EXPERIMENTS)
    for name, exp in res["experiments"].items():
        section = text.split(f"### {name}\n")[1]  # its front-quality table comes first
        for method, r in exp["methods"].items():
            row = next(
                line
                for line in section.splitlines()
                if line.startswith(f"| {method} | {100 * r['max_mean_accuracy']:.1f} |")
            )
            assert f"| {r['hypervolume']:.4f} | {r['igd_plus']:.4f} |" in row, (name, method, row)
            cell = f"{100 * r['max_mean_accuracy']:.1f} ({100 * r['multitask_at_top5']:.1f})"
            assert cell in text, (name, method, cell)
        assert re.search(rf"\*\*{name}\*\*: ", text)  # the targets line of each experiment


def test_the_solver_table_is_the_json_numbers():
    fs = _results()["full_solvers"]
    text = render(_results(), table1.PAPER, table1.EXPERIMENTS)
    for rule in ("hessian_full", "mixture_full"):
        rows = fs[rule]["rows"]
        ref32 = next(r["seconds"] for r in rows if r["solver"] == "cholesky float32")
        for r in rows:
            cells = f"| {r['solver']} | {r['seconds']:.1f} |"
            line = next(ln for ln in text.splitlines() if ln.startswith(cells) and f"{ref32 / r['seconds']:.1f}×" in ln)
            assert f"| {r['max_abs_dtheta']:.1e} |" in line, line


def test_committed_report_is_up_to_date():
    res = _results()
    assert (ROOT / "docs" / "RESULTS.md").read_text() == render(res, table1.PAPER, table1.EXPERIMENTS)


def test_targets_are_computed_from_the_numbers():
    exp = table1.Experiment("x.yaml", "mnist", max_gap=3.0)
    r = {
        "methods": {
            "simple": {"max_mean_accuracy": 0.70},
            "hessian": {"max_mean_accuracy": 0.80},
            "mixture": {"max_mean_accuracy": 0.86},
        },
        "multitask": {"best_mean_accuracy": 0.90},
    }
    t = table1.check_targets(exp, r)
    assert t["ordering_mixture>hessian>simple"] is True
    assert abs(t["gap_points"] - 4.0) < 1e-9 and t["gap_met"] is False
    r["methods"]["mixture"]["max_mean_accuracy"] = 0.88
    t = table1.check_targets(exp, r)
    assert t["gap_met"] is True
    r["methods"]["hessian"]["max_mean_accuracy"] = 0.60
    assert table1.check_targets(exp, r)["ordering_mixture>hessian>simple"] is False


def test_a_run_told_to_write_elsewhere_leaves_docs_alone(tmp_path):
    import shutil

    import torch

    from varmerge.grid import simplex_grid

    report = ROOT / "docs" / "RESULTS.md"
    before = report.stat().st_mtime_ns
    out = tmp_path / "scratch.json"
    shutil.copy(ROOT / "results" / "table1.json", out)
    table1.main(["--output", str(out), "--report-only"])
    assert (tmp_path / "scratch.md").is_file() and report.stat().st_mtime_ns == before
    alpha = simplex_grid(3, 0.5)
    sweeps = {"mixture": {"alpha": alpha, "accuracy": torch.rand(len(alpha), 3)}}
    figs = table1.draw_figures("x", ["a", "b", "c"], sweeps, torch.rand(4, 3), {"mixture": ([0.5], [0.6])}, tmp_path)
    assert figs and all((tmp_path / p).is_file() and p.startswith("figures/x/") for p in figs.values())
    assert not (ROOT / "docs" / "figures" / "x").exists()
