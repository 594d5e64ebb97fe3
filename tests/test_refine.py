"""Adaptive α refinement finds the fine grid's best α with fewer evaluations."""

import pytest
import torch

from varmerge.grid import simplex_grid
from varmerge.refine import refine_alpha


def _peaked(centre):
    c = torch.tensor(centre, dtype=torch.float64)

    def score(a):
        calls.append(len(a))
        # smooth unimodal per-task scores whose mean peaks at ``centre``
        d = ((a - c) ** 2).sum(1, keepdim=True)
        return torch.exp(-8 * d).expand(-1, a.shape[1]) + 0.01 * a

    calls: list[int] = []
    return score, calls


@pytest.mark.parametrize("centre", [(0.46, 0.34, 0.2), (0.9, 0.06, 0.04), (0.0, 0.5, 0.5)])
def test_reaches_the_fine_grid_optimum_with_fewer_evaluations(centre):
    fn, calls = _peaked(centre)
    full = simplex_grid(3, 0.02)
    s = fn(full)
    best = full[s.mean(1).argmax()]
    calls.clear()
    r = refine_alpha(fn, 3, coarse=0.1, fine=0.02)
    assert torch.equal(r.best_alpha, best)
    assert r.evaluations == sum(calls) < len(full) / 2
    assert len({tuple(a.tolist()) for a in r.alpha}) == r.evaluations  # each point scored once


def test_grows_the_region_when_the_best_is_on_its_edge():
    # the coarse top-1 is far from the true optimum region's centre: one round is not enough
    fn, _ = _peaked((0.6, 0.24, 0.16))
    r = refine_alpha(fn, 3, coarse=0.2, fine=0.02, top=1, radius=0.02)
    full = simplex_grid(3, 0.02)
    assert torch.equal(r.best_alpha, full[fn(full).mean(1).argmax()])
    assert r.rounds > 1


@pytest.mark.parametrize(
    "kw, msg", [({"coarse": 0.1, "fine": 0.03}, "multiple"), ({"top": 0}, "top"), ({"radius": 0.001}, "radius")]
)
def test_bad_settings(kw, msg):
    fn, _ = _peaked((0.3, 0.3, 0.4))
    with pytest.raises(ValueError, match=msg):
        refine_alpha(fn, 3, **kw)


def test_score_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        refine_alpha(lambda a: torch.zeros(len(a), 2), 3)
