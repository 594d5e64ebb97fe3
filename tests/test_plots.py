import pytest
import torch

from varmerge import plots
from varmerge.grid import simplex_grid


def test_plots_write_pngs(tmp_path):
    a = simplex_grid(3, 0.25)
    acc = torch.rand(len(a), 3, generator=torch.Generator().manual_seed(0))
    sweeps = {"simple": {"alpha": a, "accuracy": acc}, "mixture": {"alpha": a, "accuracy": acc.sqrt()}}
    files = [
        plots.front_projections(sweeps, ["a", "b", "c"], tmp_path / "f.png", multitask=[[0.5, 0.5, 0.5]]),
        plots.ternary_mean_accuracy(sweeps, ["a", "b", "c"], tmp_path / "t.png"),
        plots.predicted_vs_realised(["a", "b", "c"], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], tmp_path / "p.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    with pytest.raises(ValueError, match="exactly 3 tasks"):
        plots.ternary_mean_accuracy({"s": {"alpha": a[:, :2], "accuracy": acc[:, :2]}}, ["a", "b"], tmp_path / "x.png")


def test_the_calibrated_front_draws_per_task_bands_and_the_finetunes(tmp_path):
    from varmerge.search import calibrate

    alpha = simplex_grid(3, 0.25).numpy()
    merged = 0.5 + 0.4 * alpha  # each task better with more weight
    cal = calibrate(alpha, {"a": merged, "b": merged - 0.05}, {0: merged[0] + 0.1})
    path = plots.calibrated_front(["x", "y", "z"], alpha, merged, cal, tmp_path / "cal.png", realised={0: merged[0]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
