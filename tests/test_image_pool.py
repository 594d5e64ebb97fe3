"""data.image_pool: pooled inputs, a model sized for them, and θ0 files that load back."""

import copy

import pytest
import torch
from helpers import TINY

from varmerge import files, pipeline
from varmerge.config import ConfigError, parse_config
from varmerge.plan import make_plan


def _cfg(pool):
    d = copy.deepcopy(TINY)
    d["data"]["image_pool"] = pool
    return parse_config(d)


def test_pooled_tasks_and_model_agree_and_the_base_file_loads_back(tmp_path):
    from tasks import steps

    cfg = _cfg(2)
    tasks, n_classes = pipeline.prepare_tasks(cfg)
    assert tasks[0].train[0].shape[1:] == (1, 14, 14)
    full, _ = pipeline.prepare_tasks(_cfg(1))
    assert torch.allclose(tasks[0].train[0][0, 0], full[0].train[0][0, 0].reshape(14, 2, 14, 2).mean((1, 3)))
    base = pipeline.seeded_model(cfg, n_classes)
    assert base.in_features == 196
    base(tasks[0].test[0][:4])  # the model takes the pooled images
    plan = make_plan(cfg, output_dir=tmp_path)
    path = plan.run_dir / "base" / "base.safetensors"
    sha = files.save_state_dict(path, base.state_dict(), {"num_classes": n_classes, "model": cfg.model.name})
    loaded = steps.load_theta0(plan, {"path": "base/base.safetensors", "sha256": sha})  # as the flows do
    for k, v in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_pool_must_be_in_range():
    with pytest.raises(ConfigError, match="image_pool"):
        _cfg(0)
