"""The objective, the free default α, the grid that holds them, and the verdict."""

import pytest
import torch

from varmerge.grid import simplex_grid
from varmerge.objective import Objective, default_alphas, default_rows, row_of, verdict, with_defaults

SCORES = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.4, 0.45]], dtype=torch.float64)


def test_objectives_rank_alpha_differently():
    assert Objective()(SCORES).tolist() == pytest.approx([0.5, 0.55, 0.425])
    assert Objective("worst_task")(SCORES).tolist() == pytest.approx([0.1, 0.5, 0.4])
    assert Objective("weighted", (0.9, 0.1))(SCORES).tolist() == pytest.approx([0.82, 0.59, 0.405])
    assert Objective("worst_task").label == "worst-task accuracy"


@pytest.mark.parametrize(
    ("kind", "weights", "message"),
    [
        ("median", None, "unknown objective"),
        ("weighted", None, "needs task weights"),
        ("mean", (0.5, 0.5), "only it takes them"),
        ("weighted", (0.7, 0.7), "sum to 1"),
        ("weighted", (1.5, -0.5), "sum to 1"),
    ],
)
def test_bad_objectives_say_why(kind, weights, message):
    with pytest.raises(ValueError, match=message):
        Objective(kind, weights)


def test_default_alphas_follow_the_task_sizes():
    d = default_alphas([100, 300, 600], temperature=0.5)
    assert d["pooled"].tolist() == pytest.approx([0.1, 0.3, 0.6])
    assert d["uniform"].tolist() == pytest.approx([1 / 3] * 3)
    t = torch.tensor([10.0, 300**0.5, 600**0.5])
    assert d["temperature"].tolist() == pytest.approx((t / t.sum()).tolist())
    assert default_alphas([1, 99], temperature=0)["temperature"].tolist() == pytest.approx([0.5, 0.5])
    assert default_alphas([1, 99], temperature=1)["temperature"].tolist() == pytest.approx([0.01, 0.99])
    with pytest.raises(ValueError, match="training examples"):
        default_alphas([10, 0])
    with pytest.raises(ValueError, match="temperature"):
        default_alphas([10, 20], temperature=1.5)


def test_the_grid_holds_each_default_once_as_an_exact_row():
    base = simplex_grid(3, 0.1)
    d = default_alphas([200, 300, 500])  # pooled (0.2, 0.3, 0.5) is on the 0.1 grid already
    grid = with_defaults(base, d)
    assert len(grid) == len(base) + 2 and torch.equal(grid[: len(base)], base)
    rows = default_rows(grid, d)
    assert rows["pooled"] < len(base) and {rows["uniform"], rows["temperature"]} == {len(base), len(base) + 1}
    for name, r in rows.items():
        assert torch.allclose(grid[r], d[name], atol=1e-12, rtol=0)
    assert row_of(base, [1 / 3, 1 / 3, 1 / 3]) is None
    with pytest.raises(ValueError, match="uniform α"):
        default_rows(base, {"uniform": d["uniform"]})


def test_the_verdict_needs_every_method_to_agree():
    flat = torch.tensor([[0.80, 0.80], [0.802, 0.801], [0.79, 0.80]], dtype=torch.float64)
    steep = torch.tensor([[0.50, 0.40], [0.80, 0.85], [0.60, 0.60]])
    little = verdict(Objective(), {"a": flat, "b": flat}, pooled_row=0, margin=0.005)
    assert little.matters is False and "α matters little" in little.message
    assert little.gains["a"] == pytest.approx(0.0015)
    big = verdict(Objective(), {"a": steep}, pooled_row=0, margin=0.005)
    assert big.matters is True and big.gains["a"] == pytest.approx(0.375) and "37.5 points" in big.message
    mixed = verdict(Objective(), {"a": flat, "b": steep}, pooled_row=0, margin=0.005)
    assert mixed.matters is None and "disagree" in mixed.message
    # the worst task: a front flat in the mean can still matter for the worst task
    worst = verdict(Objective("worst_task"), {"a": torch.tensor([[0.9, 0.5], [0.7, 0.7]])}, 0, 0.005)
    assert worst.matters is True and worst.gains["a"] == pytest.approx(0.2)


def test_a_flat_front_gives_no_verdict():
    # the worst task when one task is served by no merged model: 0 at every α, whatever α does
    never = torch.tensor([[0.9, 0.0], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    v = verdict(Objective("worst_task"), {"a": never}, pooled_row=0, margin=0.005)
    assert v.matters is None and v.flat and "cannot tell" in v.message
    assert verdict(Objective(), {"a": never}, pooled_row=0, margin=0.005).matters is False


def test_selection_by_objective_and_a_floor_below_pooled():
    from helpers import TINY

    from varmerge import pipeline
    from varmerge.config import parse_config
    from varmerge.plan import make_plan

    raw = {**TINY, "selection": {"method": "mixture", "objective": "worst_task", "max_drop_vs_pooled": 0.05}}
    plan = make_plan(parse_config(raw)).with_sizes(10, {"a": 100, "b": 100, "c": 200}, {"a": 1, "b": 1, "c": 1})
    alpha = plan.grid()
    pooled = plan.defaults()["pooled"]
    assert pooled.tolist() == pytest.approx([0.25, 0.25, 0.5])
    # task a is best at α near its vertex; c falls there; the worst task peaks in between
    acc = torch.stack([0.5 + 0.4 * alpha[:, 0], 0.8 + 0.0 * alpha[:, 1], 0.9 - 0.5 * alpha[:, 0]], 1)
    row = int((alpha - pooled).abs().sum(1).argmin())
    cons = pipeline.constraints(plan, acc[row])
    assert cons == [(t, ">=", pytest.approx(float(acc[row, t]) - 0.05)) for t in range(3)]
    idx, chosen = pipeline.select(plan, alpha, acc)
    worst = acc.min(1).values
    ok = (acc >= acc[row] - 0.05).all(1)
    assert worst[idx[0]] == worst[ok].max() and ok[idx[0]]
    # without the floor the worst task alone decides
    plain = make_plan(parse_config({**raw, "selection": {"method": "mixture", "objective": "worst_task"}}))
    plain = plain.with_sizes(10, {"a": 100, "b": 100, "c": 200}, {"a": 1, "b": 1, "c": 1})
    idx2, _ = pipeline.select(plain, alpha, acc)
    assert worst[idx2[0]] == worst.max()


def test_a_run_scores_the_defaults_and_finetunes_those_asked_for():
    from helpers import TINY

    from varmerge.config import parse_config
    from varmerge.plan import make_plan
    from varmerge.sequence import LocalRunner, estimate_front

    raw = {**TINY, "posterior": {**TINY["posterior"], "steps": 5}, "multitask_steps": 5}
    raw["data"] = {**TINY["data"], "tasks": [dict(t) for t in TINY["data"]["tasks"]]}
    raw["data"]["tasks"][0]["max_train"] = 30  # pooled α differs from uniform
    raw["selection"] = {"method": "mixture", "finetune_defaults": ["pooled", "uniform"]}
    res = estimate_front(LocalRunner(make_plan(parse_config(raw))))
    s = res.summary()
    assert s["defaults"]["pooled"]["alpha"] == pytest.approx([30 / 630, 300 / 630, 300 / 630])
    assert set(res.realised_defaults) == {"pooled", "uniform"}
    for name in ("pooled", "uniform"):
        d = s["defaults"][name]
        assert len(d["realised"]["accuracy"]) == 3 and d["predicted"]["mixture"]["objective"] == pytest.approx(
            sum(d["predicted"]["mixture"]["accuracy"]) / 3
        )
    gain = s["chosen"]["gain_over_pooled"]
    assert set(gain) == {"predicted", "realised"}
    assert gain["realised"]["objective"] == pytest.approx(
        s["chosen"]["realised_objective"][0] - s["defaults"]["pooled"]["realised"]["objective"]
    )
    assert s["realised_verdict"]["finetunes"] == len(
        {tuple(a) for a in [*s["chosen"]["alpha"]]} | {tuple(s["defaults"][d]["alpha"]) for d in ("pooled", "uniform")}
    )


def test_the_verdict_of_real_finetunes_says_whether_the_search_settled_it():
    from varmerge.objective import Objective, realised_verdict

    pooled = [0.80, 0.90]
    realised = [[0.80, 0.90], [0.81, 0.90]]  # the best is 0.5 points of mean accuracy above pooled
    little = realised_verdict(Objective(), realised, pooled, margin=0.01, settled="the defaults agree")
    assert little["matters"] is False and little["settled"] and little["gain"] == pytest.approx(0.005)
    assert little["message"].startswith("α matters little here: after 2 real finetunes the best is 0.5 points")
    assert little["message"].endswith("; the defaults agree, so the search stopped early")
    so_far = realised_verdict(Objective(), realised, pooled, margin=0.01)
    assert so_far["message"].startswith("α matters little so far") and "not tried may differ" in so_far["message"]
    matters = realised_verdict(Objective("worst_task"), [[0.85, 0.95]], pooled, margin=0.01, settled="x")
    assert matters["matters"] and matters["message"].startswith("α matters by the 1 real finetune: the best is 5.0")
