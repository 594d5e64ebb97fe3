"""On a CUDA device: training, the merge sweep and its evaluation run there and agree with the CPU.

Every test is marked ``gpu``: where no CUDA device is visible they skip with that reason (see
``conftest.py``). ``scripts/gpu_check.sh`` runs them and times one LoRA front on the device.

The CPU and the GPU do not give the same bits (other kernels, and IVON's weight noise comes from
the device's random stream), so the checks compare what a user compares: accuracies, within a
few test examples, and merged weights within float32 rounding for the same posteriors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY

from varmerge import pipeline
from varmerge.config import parse_config
from varmerge.plan import make_plan
from varmerge.posterior import load_posterior

pytestmark = pytest.mark.gpu


def _cfg(**changes) -> object:
    cfg = copy.deepcopy(TINY)
    cfg["posterior"] = {**cfg["posterior"], "method": "ivon", "steps": 60}
    cfg["merge"] = {"methods": ["simple", "hessian"], "spacing": 0.25}
    cfg["selection"] = {"method": "hessian"}
    for k, v in changes.items():
        cfg[k] = v
    return parse_config(cfg)


def _finetune(cfg, task_index: int = 0):
    tasks, n = pipeline.prepare_tasks(cfg)
    base = pipeline.seeded_model(cfg, n)
    post, weights = pipeline.finetune_task(make_plan(cfg), base, tasks[task_index])
    acc = pipeline.score_sweep(base, {k: v.unsqueeze(0).cpu() for k, v in weights.items()}, tasks)["accuracy"][0]
    return post, acc, tasks, base


def test_a_finetune_on_cuda_scores_as_the_cpu_one():
    post_gpu, acc_gpu, tasks, _ = _finetune(_cfg(accelerator="gpu"))
    _, acc_cpu, _, _ = _finetune(_cfg(accelerator="cpu"))
    n_test = len(tasks[0].test[1])
    assert abs(float(acc_gpu[0] - acc_cpu[0])) <= max(0.03, 3 / n_test), (acc_gpu, acc_cpu)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in post_gpu.diagonal().precision.values())


def test_bf16_mixed_training_on_cuda_gives_a_usable_posterior():
    cfg = _cfg(accelerator="gpu")
    posterior = {**cfg.posterior.model_dump(), "precision": "bf16-mixed"}
    cfg = parse_config({**cfg.model_dump(mode="json"), "posterior": posterior})
    post, acc, tasks, _ = _finetune(cfg)
    assert float(acc[0]) > 0.8, acc  # task a is two digit classes: well above chance
    assert all(torch.isfinite(v).all() for v in post.diagonal().mean.values())


def test_the_sweep_on_cuda_matches_the_cpu_sweep(tmp_path):
    cfg = _cfg(accelerator="cpu")
    tasks, n = pipeline.prepare_tasks(cfg)
    base = pipeline.seeded_model(cfg, n)
    paths = [tmp_path / f"{t.name}.safetensors" for t in tasks]
    for t, path in zip(tasks, paths):
        pipeline.finetune_task(make_plan(cfg), base, t)[0].save(path)
    for method in cfg.merge.methods:
        cpu = pipeline.sweep_and_score(make_plan(cfg), method, [load_posterior(p) for p in paths], base, tasks)
        gpu_base = copy.deepcopy(base).to("cuda")
        posts = [load_posterior(p, device="cuda") for p in paths]
        gpu = pipeline.sweep_and_score(make_plan(cfg), method, posts, gpu_base, tasks)
        assert gpu["accuracy"].device.type == "cpu"  # results come back as the store saves them
        n_test = min(len(t.test[1]) for t in tasks)
        assert (gpu["accuracy"] - cpu["accuracy"]).abs().max() <= 2 / n_test, method
        merged_cpu = pipeline.merge_sweep(method, [load_posterior(p) for p in paths], _weights(base), cpu["alpha"])
        merged_gpu = pipeline.merge_sweep(method, posts, _weights(gpu_base), cpu["alpha"].cuda())
        for k, v in merged_cpu.items():
            torch.testing.assert_close(merged_gpu[k].cpu(), v, rtol=1e-4, atol=1e-5)


def test_the_sweep_device_follows_the_accelerator():
    assert pipeline.sweep_device(_cfg(accelerator="auto")).type == "cuda"
    assert pipeline.sweep_device(_cfg(accelerator="cpu")).type == "cpu"


def _weights(model):
    from varmerge import models

    return models.trainable_state_dict(model)
