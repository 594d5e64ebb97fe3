"""Two fresh runs of the same config give the same results: sweeps bitwise on CPU, posterior
means within tolerance, the same chosen α."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import RESUME

from varmerge import files
from varmerge.posterior import load_posterior

pytestmark = pytest.mark.xdist_group("reference")  # the session's reference run: built once per worker


def _by_prefix(folder, pattern):
    return {p.name.split("-")[0]: p for p in sorted(folder.glob(pattern))}


@pytest.mark.slow
def test_two_fresh_runs_agree(reference_run, tmp_path):
    from flows.front import front_flow

    if torch.cuda.is_available():
        pytest.skip("bitwise comparison is for CPU runs")
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(RESUME))
    second = front_flow(
        str(config), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", output_dir=str(tmp_path / "runs")
    )
    first = reference_run["summary"]
    a_dir, b_dir = reference_run["run_dir"], tmp_path / "runs" / RESUME["name"]
    assert a_dir != b_dir

    # training: the posteriors of each task (means and precisions) agree within tolerance
    a_posts, b_posts = (
        _by_prefix(a_dir / "posteriors", "*.safetensors"),
        _by_prefix(b_dir / "posteriors", "*.safetensors"),
    )
    assert a_posts.keys() == b_posts.keys() == {"a", "b", "c"}
    for task in a_posts:
        pa, pb = load_posterior(a_posts[task]), load_posterior(b_posts[task])
        for ca, cb in zip(pa.components, pb.components, strict=True):
            for k in ca.mean:
                torch.testing.assert_close(cb.mean[k], ca.mean[k], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(cb.precision[k], ca.precision[k], rtol=1e-5, atol=1e-6)

    # merge sweeps: every merged model's accuracies bitwise equal
    a_sw, b_sw = _by_prefix(a_dir / "sweeps", "*.safetensors"), _by_prefix(b_dir / "sweeps", "*.safetensors")
    assert a_sw.keys() == b_sw.keys() == {"simple", "hessian", "mixture"}
    for m in a_sw:
        sa, sb = (files.load_tensors(f)[0] for f in (a_sw[m], b_sw[m]))
        assert torch.equal(sa["alpha"], sb["alpha"]), m
        assert torch.equal(sa["accuracy"], sb["accuracy"]), m
        assert torch.equal(sa["loss"], sb["loss"]), m

    # the same chosen α, predicted and realised accuracies
    assert second["chosen"]["alpha"] == first["chosen"]["alpha"]
    assert second["chosen"]["predicted"] == first["chosen"]["predicted"]
    torch.testing.assert_close(
        torch.tensor(second["chosen"]["realised"]), torch.tensor(first["chosen"]["realised"]), rtol=0, atol=1e-6
    )
    fa, fb = (json.loads((d / "front.json").read_text()) for d in (a_dir, b_dir))
    for m in fa["methods"]:
        assert fa["methods"][m]["front"] == fb["methods"][m]["front"], m
    # the multitask weights: equal within tolerance
    [ma], [mb] = (sorted((d / "multitask").glob("*.safetensors")) for d in (a_dir, b_dir))
    ta, tb = files.load_tensors(ma)[0], files.load_tensors(mb)[0]
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6)
