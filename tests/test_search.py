"""The closed-loop α search (varmerge/search.py) on synthetic fronts whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from varmerge.grid import simplex_grid
from varmerge.search import DEFAULTS_AGREE, NO_GAIN, ClosedLoop, SearchSettings

ALPHA = simplex_grid(3, 0.05).numpy()  # 231 α


def truth(alpha: np.ndarray, peak=(0.5, 0.3, 0.2)) -> np.ndarray:
    """Per-task accuracies: smooth, each task best where it is weighted most; the mean peaks
    near ``peak``."""
    d = ((alpha - np.asarray(peak)) ** 2).sum(-1, keepdims=True)
    return 0.9 - 0.4 * d + 0.1 * (alpha - alpha.mean(-1, keepdims=True))


def run(search: ClosedLoop, realise) -> list[int]:
    while (step := search.propose()) is not None:
        for r in step.rows:
            search.observe(ALPHA[r], realise(ALPHA[r]))
    return search.rows


def regret(rows: list[int]) -> float:
    mean = truth(ALPHA).mean(1)
    return float(mean.max() - mean[rows].max())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        SearchSettings(budget=0)
    with pytest.raises(ValueError, match="batch must be between 1 and the budget"):
        SearchSettings(budget=2, batch=3)
    with pytest.raises(ValueError, match="length_scale must be > 0"):
        SearchSettings(budget=2, length_scale=0)
    search = ClosedLoop(ALPHA, {"m": truth(ALPHA)}, SearchSettings(budget=2))
    with pytest.raises(ValueError, match="is not a point of the search's grid"):
        search.observe([0.333, 0.333, 0.334], [0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="predictions of 'm' have shape"):
        ClosedLoop(ALPHA, {"m": truth(ALPHA)[:5]}, SearchSettings(budget=2))


def test_the_first_finetune_goes_where_the_merge_predicts_the_best():
    predicted = truth(ALPHA, peak=(0.2, 0.3, 0.5))
    step = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=3)).propose()
    assert step.rows == [int(predicted.mean(1).argmax())] and step.incumbent is None
    # under a constraint: the best predicted α that meets it
    # task 2 above its value at the unconstrained pick: that pick misses it, a few α meet it
    threshold = float(predicted[step.rows[0], 2] + predicted[:, 2].max()) / 2
    constrained = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=3), constraints=[(2, ">=", threshold)])
    [row] = constrained.propose().rows
    ok = predicted[:, 2] >= threshold
    assert ok[row] and predicted.mean(1)[row] == predicted.mean(1)[ok].max()


def test_where_the_merge_predicts_no_alpha_meets_a_constraint_the_nearest_miss_goes_first():
    predicted = truth(ALPHA)
    top = float(predicted[:, 0].max())
    [row] = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=2), [(0, ">=", top + 0.05)]).propose().rows
    assert predicted[row, 0] == top


def test_a_shifted_prediction_is_corrected_by_the_finetunes_and_beats_top_k():
    predicted = truth(ALPHA, peak=(0.2, 0.2, 0.6)) - 0.03  # the merge misplaces the peak and is low
    rows = run(ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=6, epsilon=0)), truth)
    top_k = list(np.argsort(-predicted.mean(1), kind="stable")[:6])
    assert len(rows) == 6 and len(set(rows)) == 6
    # top_k stays at the predicted peak (7.8 points short); the search walks to the true one
    assert regret(rows) < 0.01 and regret(rows) < regret(top_k) / 5, (regret(rows), regret(top_k))
    again = run(ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=6, epsilon=0)), truth)
    assert again == rows  # deterministic: a resumed search proposes what the killed one would


def test_batches_propose_distinct_rows_and_respect_the_budget():
    predicted = truth(ALPHA, peak=(0.3, 0.4, 0.3))
    search = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=5, batch=2, epsilon=0))
    sizes = []
    while (step := search.propose()) is not None:
        sizes.append(len(step.rows))
        for r in step.rows:
            search.observe(ALPHA[r], truth(ALPHA[r]))
    assert sizes == [2, 2, 1] and len(set(search.rows)) == 5
    # the first batch: the prior's two best α (no finetune has said anything yet)
    assert search.rows[:2] == [int(i) for i in np.argsort(-predicted.mean(1), kind="stable")[:2]]


def test_it_stops_early_when_nothing_is_expected_to_improve():
    exact = truth(ALPHA)
    rows = run(ClosedLoop(ALPHA, {"m": exact}, SearchSettings(budget=8, epsilon=1e-3)), truth)
    assert 1 <= len(rows) < 8 and regret(rows) == 0.0


def test_several_methods_the_one_that_predicts_the_finetunes_gets_the_weight():
    good, bad = truth(ALPHA) - 0.01, truth(ALPHA, peak=(0.1, 0.1, 0.8)) - 0.2
    search = ClosedLoop(ALPHA, {"good": good, "bad": bad}, SearchSettings(budget=3, epsilon=0))
    first = search.propose()
    assert first.method_weights == {"good": 0.5, "bad": 0.5}
    run(search, truth)
    assert search.method_weights(search.rows, search.realised)["good"] > 0.99


def test_a_constraint_is_met_by_the_incumbent():
    predicted = truth(ALPHA, peak=(0.1, 0.6, 0.3)) - 0.02  # misplaced: it predicts task 2 too high
    real = truth(ALPHA)
    threshold = float(np.quantile(real[:, 2], 0.75))  # a quarter of the grid meets it
    cons = [(2, ">=", threshold)]
    search = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=6, epsilon=0), constraints=cons)
    run(search, truth)
    row, mean = search.incumbent()
    assert real[row, 2] >= threshold
    best_feasible = real.mean(1)[real[:, 2] >= threshold].max()
    assert best_feasible - mean < 0.01
    # the prior alone would not get there: none of its 6 best α predicted feasible is feasible
    top = np.argsort(-np.where(predicted[:, 2] >= threshold, predicted.mean(1), -1), kind="stable")[:6]
    assert not (real[top, 2] >= threshold).any()


def test_the_search_starts_at_pooled_alpha_and_stops_when_alpha_matters_little():
    pooled = int(np.abs(ALPHA - np.array([0.5, 0.3, 0.2])).max(1).argmin())
    flat = np.full_like(ALPHA, 0.8) + 0.001 * ALPHA  # every α within 0.1 points of every other
    search = ClosedLoop(ALPHA, {"m": flat}, SearchSettings(budget=5, start=(pooled,), margin=0.005))
    first = search.propose()
    assert first.rows == [pooled] and first.expected_improvement == [None]
    search.observe(ALPHA[pooled], flat[pooled])
    assert search.propose() is None and search.settled == NO_GAIN  # no α is expected to beat pooled by half a point
    # where α matters, the same settings go on searching
    steep = truth(ALPHA)
    search = ClosedLoop(ALPHA, {"m": steep}, SearchSettings(budget=5, start=(0,), margin=0.005))
    rows = run(search, truth)
    assert rows[0] == 0 and len(rows) > 1 and regret(rows) < 0.005
    with pytest.raises(ValueError, match="start rows"):
        ClosedLoop(ALPHA, {"m": steep}, SearchSettings(budget=2, start=(10**6,)))


def test_when_pooled_and_uniform_agree_the_search_stops_there_even_if_the_merge_promises_more():
    pooled = int(np.abs(ALPHA - np.array([0.5, 0.3, 0.2])).max(1).argmin())
    uniform = int(np.abs(ALPHA - 1 / 3).max(1).argmin())
    promising = truth(ALPHA, peak=(0.1, 0.1, 0.8))  # the merge predicts a peak far from both

    def flat(alpha):  # the real finetunes: α matters little anywhere
        return np.full(3, 0.8) + 0.002 * np.asarray(alpha)

    settings = SearchSettings(budget=5, start=(pooled, uniform), margin=0.005)
    search = ClosedLoop(ALPHA, {"m": promising}, settings)
    assert run(search, flat) == [pooled, uniform] and search.settled == DEFAULTS_AGREE
    # where they disagree by the margin or more, it goes on (and is not settled at its budget)
    steep = ClosedLoop(ALPHA, {"m": promising}, settings)
    rows = run(steep, truth)
    assert rows[:2] == [pooled, uniform] and len(rows) == 5 and not steep.settled
    # the rule needs two start rows: one start row alone is judged by the expected improvement
    one = ClosedLoop(ALPHA, {"m": promising}, SearchSettings(budget=5, start=(pooled,), margin=0.005))
    assert len(run(one, flat)) > 1


def test_the_worst_task_objective_finds_the_balanced_alpha():
    from varmerge.objective import Objective

    def realise(alpha):  # each task's accuracy grows with its own weight: the worst task peaks at uniform
        return 0.5 + 0.4 * np.sqrt(np.asarray(alpha))

    predicted = realise(ALPHA)
    search = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=3, epsilon=0), objective=Objective("worst_task"))
    rows = run(search, realise)
    found = max(realise(ALPHA[r]).min() for r in rows)
    assert found == realise(ALPHA).min(1).max()  # the best worst task of the grid (smallest weight 0.3)
    again = ClosedLoop(ALPHA, {"m": predicted}, SearchSettings(budget=3, epsilon=0), objective=Objective("worst_task"))
    assert run(again, realise) == rows  # the draws are fixed: deterministic


def test_a_calibrated_front_says_where_the_merge_is_wrong_and_learns_from_the_finetunes():
    from varmerge.search import INTERVAL, calibrate

    real = truth(ALPHA)
    merged = truth(ALPHA, peak=(0.2, 0.2, 0.6)) - 0.08  # low and with its peak misplaced
    other = truth(ALPHA, peak=(0.3, 0.3, 0.4)) - 0.02
    # before any finetune: the methods' average, and their spread as the interval
    before = calibrate(ALPHA, {"a": merged, "b": other}, {})
    assert before.finetunes == 0 and "spread between the merge methods a, b" in before.source
    np.testing.assert_allclose(before.mean, (merged + other) / 2)
    assert (before.lower <= before.mean).all() and (before.upper >= before.mean).all()
    alone = calibrate(ALPHA, {"a": merged}, {})
    assert (alone.lower == alone.upper).all() and "no interval" in alone.source
    # after finetunes: the residual model; the front moves toward the truth and its intervals cover it
    rows = [int(np.abs(ALPHA - np.asarray(a)).sum(1).argmin()) for a in [(1 / 3, 1 / 3, 1 / 3), (0.6, 0.2, 0.2)]]
    rows.append(int(np.abs(ALPHA - np.asarray((0.2, 0.6, 0.2))).sum(1).argmin()))
    after = calibrate(ALPHA, {"a": merged}, {r: real[r] for r in rows})
    assert after.finetunes == 3 and "residual GP on 3 real finetunes" in after.source
    error = lambda front: float(np.abs(front - real).mean())  # noqa: E731 - the α-map error
    assert error(after.mean) < error(merged) / 2, (error(after.mean), error(merged))
    for r in rows:  # where a finetune ran, the front is that finetune (within the noise)
        assert np.abs(after.mean[r] - real[r]).max() < 0.01
    covered = float(((real >= after.lower) & (real <= after.upper)).mean())
    assert INTERVAL == 0.8 and covered >= 0.7, covered
