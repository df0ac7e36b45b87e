"""EigenAttention's rank rule and rank searches on hand-made inputs (no model).

* the rank rule in float64 with an explicit tolerance: threshold 1.0 and exact boundaries are
  never decided by float32 rounding;
* the threshold walk (default and the reference's stop rule) and the bisection on ranks,
  driven by synthetic spectra / error tables whose expected outcomes are derived by hand or
  by brute force here.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jcompress.eigen_attention import eigen_core as core
from jcompress.eigen_attention.compress import bisect_ranks, threshold_grid, threshold_walk

# --------------------------------------------------------------------------- the rank rule


def test_threshold_one_is_not_decided_by_rounding():
    """Spectra whose float32 cumulative fraction ends at 1 +- ulp: at threshold 1.0 every head
    counts D - 1 components (the last one reaches 1 exactly), whatever the scale."""
    rng = np.random.default_rng(0)
    d = 16
    seen_off = 0
    for _ in range(40):
        s = np.sort(rng.uniform(0.01, 1.0, (4, d)).astype(np.float32), axis=1)[:, ::-1]
        f32 = np.cumsum(s / s.sum(1, keepdims=True, dtype=np.float32), axis=1, dtype=np.float32)
        seen_off += int(np.any(f32[:, -1] != 1.0))
        for scale in (1.0, 3.0, 1e-3):
            counts = core.head_counts_below(s * np.float32(scale), 1.0)
            np.testing.assert_array_equal(counts, [d - 1] * 4)
            assert core.rank_for_threshold(s * np.float32(scale), 1.0) == d - 1
    assert seen_off > 0  # float32 sums do land off 1.0: the old rule was noisy here


def test_rank_rule_boundaries_by_hand():
    # cumulative fractions 0.5, 0.75, 1.0 (exact): strictly below, with a 1e-9 tolerance
    s = np.asarray([[2.0, 1.0, 1.0]])
    assert core.rank_for_threshold(s, 0.75) == 1  # 0.75 reaches 0.75: not below
    assert core.rank_for_threshold(s, 0.75 + 5e-10) == 1  # within the tolerance
    assert core.rank_for_threshold(s, 0.75 + 5e-9) == 2
    assert core.rank_for_threshold(s, 1.0) == 2
    assert core.rank_for_threshold(s, 1.02) == 3  # above 1: every component
    assert core.rank_for_threshold(s, 0.1) == 1  # at least 1
    # a zero tail reaches 1.0 early: those components never count below 1.0
    assert core.rank_for_threshold(np.asarray([[1.0, 1.0, 0.0, 0.0]]), 1.0) == 1
    # fractions or singular values give the same ranks (rows renormalised in float64)
    f = s / s.sum()
    assert core.rank_for_threshold(f, 0.8) == core.rank_for_threshold(s, 0.8) == 2
    # max over heads
    two = np.asarray([[8.0, 4.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]])  # cums .5 .75 .875 1 / .25..
    assert core.rank_for_threshold(two, 0.8) == 3
    cum = core.cumulative_fractions(two)
    assert cum.dtype == np.float64 and np.all(cum[:, -1] == 1.0)
    np.testing.assert_array_equal(core.cumulative_fractions(np.zeros((1, 3))), [[0, 0, 0]])


def test_threshold_grid_has_no_drift():
    grid = list(threshold_grid(1.0, 0.02, 0.0))
    assert len(grid) == 50 and grid[0] == 1.0 and grid[-1] == 0.02
    assert grid[3] == 0.94 and grid[12] == 0.76  # exactly, unlike 1.0 - 0.02 - 0.02 - 0.02
    assert list(threshold_grid(0.98, 0.02, 0.3))[-1] == 0.32


# --------------------------------------------------------------------------- threshold walk

D = 16


def _ranks(t: float) -> tuple[int, int]:
    """A synthetic spectrum: rank = ceil(16 t) - 1 for K, one more for V (capped)."""
    r = max(math.ceil(round(D * t, 9)) - 1, 1)
    return min(r, D), min(r + 1, D)


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, rk, rv):
        self.calls.append((rk, rv))
        return self.fn(rk, rv)


def _err(rk, rv):  # decreasing in each rank; under 0.05 from (9, 10) up
    return 0.0 if (rk, rv) == (D, D) else 0.05 * (2 * D - rk - rv + 1) / (2 * D - 9 - 10 + 1)


def test_walk_default_keeps_last_passing_threshold():
    ev = Counted(_err)
    t, rk, rv, e = threshold_walk(
        _ranks, ev, start=1.0, step=0.0625, min_threshold=0.0,
        bounds_ok=lambda a, b: True, budget=0.05,
    )  # fmt: skip
    # thresholds 1, .9375, ... ranks (15,16), (14,15), ... ; (9,10) at t = 10/16 gives exactly
    # 0.05 (not under budget), so the last passing is t = 11/16 -> (10, 11)
    assert (t, rk, rv) == (0.6875, 10, 11) and e == pytest.approx(_err(10, 11))
    assert ev.calls[-1] == (9, 10) and len(ev.calls) == 7


def test_walk_reference_stop_rule():
    kw = dict(start=1.0, step=0.0625, min_threshold=0.0, budget=0.05, reference=True)
    # error stop: the last evaluated threshold failed, one step back is the last passing one
    t, rk, rv, _ = threshold_walk(_ranks, Counted(_err), bounds_ok=lambda a, b: True, **kw)
    assert (t, rk, rv) == (0.6875, 10, 11)
    # bound stop, checked before evaluating (OPT): ranks must stay above 12 per head; the
    # walk evaluates down to t = 14/16 (13, 14), skips t = 13/16 (12, 13), and steps back to
    # one above the last passing: 15/16 -> (14, 15), where the default keeps 14/16
    ok = lambda a, b: a > 12  # noqa: E731
    t, rk, rv, _ = threshold_walk(_ranks, Counted(_err), bounds_ok=ok, **kw)
    assert (t, rk, rv) == (0.9375, 14, 15)
    d = threshold_walk(_ranks, Counted(_err), bounds_ok=ok, **{**kw, "reference": False})
    assert d[:3] == (0.875, 13, 14)
    # bound checked after evaluating (Llama): (12, 13) is evaluated, passes, then the bound
    # ends the walk and the threshold steps back to 14/16
    ev = Counted(_err)
    t, rk, rv, _ = threshold_walk(_ranks, ev, bounds_ok=ok, bound_after=True, **kw)
    assert (t, rk, rv) == (0.875, 13, 14) and (12, 13) in ev.calls
    # the first threshold fails: start + step, full ranks (dense)
    t, rk, rv, e = threshold_walk(_ranks, Counted(lambda a, b: 1.0 if a < D else 0.0),
                                  bounds_ok=lambda a, b: True, **kw)  # fmt: skip
    assert (t, rk, rv, e) == (1.0625, D, D, 0.0)


# --------------------------------------------------------------------------- bisection


def _table(seed: int, d: int):
    """A random error table, non-increasing in each rank, 0 at (d, d)."""
    rng = np.random.default_rng(seed)
    a = np.cumsum(rng.uniform(0, 1, d + 1)[::-1])[::-1]  # decreasing in r_k
    b = np.cumsum(rng.uniform(0, 1, d + 1)[::-1])[::-1]
    w = rng.uniform(0.2, 1.0)
    e = w * (a[:, None] - a[d]) + (1 - w) * (b[None, :] - b[d])
    return e / e.max()


@pytest.mark.parametrize("seed,d,budget,floors", [
    (0, 16, 0.1, (1, 1)), (1, 16, 0.3, (1, 1)), (2, 64, 0.05, (1, 1)), (3, 16, 0.2, (8, 8)),
    (4, 13, 0.15, (1, 3)), (5, 16, 1e-9, (1, 1)),
])  # fmt: skip
def test_bisect_finds_minimal_pair_in_log_evaluations(seed, d, budget, floors):
    e = _table(seed, d)
    ev = Counted(lambda rk, rv: float(e[rk, rv]))
    t, rk, rv, err = bisect_ranks(ev, d_k=d, d_v=d, floor_kq=floors[0], floor_v=floors[1],
                                  budget=budget)  # fmt: skip
    assert t is None and err == e[rk, rv]
    assert len(set(ev.calls)) <= 3 * math.ceil(math.log2(d)) + 1
    if (rk, rv) == (d, d):  # nothing smaller passes with a shared rank
        shared = [r for r in range(max(floors), d) if e[r, r] < budget]
        assert not shared
        return
    assert e[rk, rv] < budget and rk >= floors[0] and rv >= floors[1]
    # brute force: the shared rank is the smallest passing one ...
    r = min(r for r in range(max(floors), d + 1) if e[r, r] < budget or r == d)
    # ... K the smallest passing with V at r, V the smallest passing with K at rk
    assert rk == min(x for x in range(floors[0], r + 1) if e[x, r] < budget)
    assert rv == min(x for x in range(floors[1], r + 1) if e[rk, x] < budget)
    # locally minimal: one less in either rank breaks the budget (or a floor)
    assert rk == floors[0] or e[rk - 1, rv] >= budget
    assert rv == floors[1] or e[rk, rv - 1] >= budget


def test_bisect_floors_at_full_width_stay_dense():
    ev = Counted(lambda a, b: 0.0)
    assert bisect_ranks(ev, d_k=8, d_v=8, floor_kq=8, floor_v=1, budget=0.1) == (None, 8, 8, 0.0)
    assert ev.calls == []
    # everything passes: rank 1 found in log2(8) + 2 * log2(1) evaluations
    assert bisect_ranks(ev, d_k=8, d_v=8, floor_kq=1, floor_v=1, budget=0.1)[1:3] == (1, 1)
    assert len(set(ev.calls)) == 3 and set(itertools.chain(*ev.calls)) <= set(range(1, 9))
