"""The gate before money is spent (varmerge/learned.py): a finetune that did not learn stops the
run with one line naming the task, its score and what to change, before any sweep or multitask
finetune; ``gate.stop: false`` says so and goes on; a pretraining that did not learn stops before
θ0 is used. (Through ``varmerge run``: ``tests/test_own_data.py``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY

from varmerge import pipeline
from varmerge.config import parse_config
from varmerge.learned import NotLearned, chance, finetune_message, finetune_report
from varmerge.plan import make_plan
from varmerge.sequence import LocalRunner, estimate_front


def test_chance_is_the_most_common_label_and_the_report_names_what_failed_and_why():
    assert chance(torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError, match="empty"):
        chance(torch.tensor([], dtype=torch.long))
    report = finetune_report(["a", "b", "c"], [0.95, 0.51, 0.70], [0.10, 0.10, 0.90], [0.5, 0.5, 0.5], 0.02)
    assert [n for n, t in report["tasks"].items() if t["learned"]] == ["a"]
    assert report["failed"] == {"b": "not 2 points above chance (50.0 %)", "c": "below θ0's 90.0 %"}
    msg = finetune_message(report, lr=0.001, steps=20, stop=True)
    assert "\n" not in msg and "task 'b': its finetune scores 51.0 % on its own test set, not 2 points above" in msg
    assert "task 'c': its finetune scores 70.0 % on its own test set, below θ0's 90.0 %" in msg
    assert "raise posterior.lr (now 0.001) or posterior.steps (now 20)" in msg and "gate.stop: false" in msg


class Counting(LocalRunner):
    """The local runner, counting the sweeps and multitask finetunes it was asked for."""

    calls: list[str]

    def sweeps(self, *args):
        self.calls = [*getattr(self, "calls", []), "sweeps"]
        return super().sweeps(*args)

    def multitasks(self, *args):
        self.calls = [*getattr(self, "calls", []), "multitasks"]
        return super().multitasks(*args)


def _cfg(**changes) -> dict:
    raw = copy.deepcopy(TINY)
    raw["posterior"] = {**raw["posterior"], "steps": 2, "lr": 1e-7}  # learns nothing
    raw["merge"] = {"methods": ["simple"], "spacing": 0.5}
    raw["selection"] = {"method": "simple"}
    raw["multitask_steps"] = 2
    return {**raw, **changes}


def test_a_finetune_that_learned_nothing_stops_the_run_before_any_sweep():
    runner = Counting(make_plan(parse_config(_cfg())))
    with pytest.raises(NotLearned) as err:
        estimate_front(runner)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("the finetunes did not learn — task 'a': its finetune scores")
    assert "not 2 points above chance (50.0 %)" in msg and "raise posterior.lr (now 1e-07)" in msg
    assert getattr(runner, "calls", []) == []  # no sweep, no multitask finetune
    # an expert goes on: the run finishes and its summary says which finetunes did not learn
    res = estimate_front(LocalRunner(make_plan(parse_config(_cfg(gate={"stop": False})))))
    learning = res.summary()["learning"]
    assert set(learning["failed"]) == {"a", "b", "c"} and learning["message"].endswith("going on (gate.stop: false)")
    assert learning["tasks"]["a"]["chance"] == 0.5


def test_a_run_that_learns_passes_the_gate_and_reports_it():
    raw = copy.deepcopy(TINY)
    raw["merge"] = {"methods": ["simple"], "spacing": 0.5}
    raw["selection"] = {"method": "simple"}
    res = estimate_front(LocalRunner(make_plan(parse_config(raw))))
    learning = res.summary()["learning"]
    assert learning["failed"] == {}
    for t in learning["tasks"].values():
        assert t["learned"] and t["accuracy"] > t["chance"] + 0.02 and t["accuracy"] > t["theta0"]


def test_a_pretraining_that_learned_nothing_stops_before_theta0_is_used():
    pretrain = {"data": {"offset": 2000, "max_examples": 400}, "steps": 2, "batch_size": 64, "lr": 1e-7}
    plan = make_plan(parse_config({**copy.deepcopy(TINY), "pretrain": pretrain}))
    with pytest.raises(NotLearned, match=r"pretraining did not learn: θ0 scores .* raise pretrain.lr \(now 1e-07\)"):
        pipeline.theta0(plan, 10)
    off = make_plan(parse_config({**copy.deepcopy(TINY), "pretrain": pretrain, "gate": {"stop": False}}))
    model, prior = pipeline.theta0(off, 10)
    assert prior is not None
