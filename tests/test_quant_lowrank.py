"""Low-rank side path of ``W ~ L + Q(W - L)``: SVD and 2-core MPO against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest

from jcompress.errors import UserError
from jcompress.quant import lowrank as lr


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_trunc(w, r):
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _np_mpo(w, r, i0, i1, o0, o1):
    # independent oracle: R[(a, c), (b, d)] = W[(a, b), (c, d)], truncated SVD, back
    w4 = w.astype(np.float64).reshape(i0, i1, o0, o1)
    rm = np.einsum("abcd->acbd", w4).reshape(i0 * o0, i1 * o1)
    rt = _np_trunc(rm, r).reshape(i0, o0, i1, o1)
    return np.einsum("acbd->abcd", rt).reshape(i0 * i1, o0 * o1)


@pytest.mark.parametrize("r", [1, 3, 7])
def test_svd_matches_numpy_truncation(r):
    w = _rand((24, 40))
    got = np.asarray(lr.lowrank(w, r, method="svd"))
    np.testing.assert_allclose(got, _np_trunc(w, r), atol=2e-5)


def test_rank_zero_and_exact_and_bad_ranks():
    w = _rand((12, 20))
    np.testing.assert_array_equal(np.asarray(lr.lowrank(w, 0)), 0.0)
    np.testing.assert_array_equal(np.asarray(lr.lowrank(w, 12)), w)
    np.testing.assert_array_equal(np.asarray(lr.lowrank(w, 12, method="mpo")), w)
    with pytest.raises(UserError, match=r"13 is out of range .*0\.\.12"):
        lr.lowrank(w, 13)
    with pytest.raises(UserError, match="out of range"):
        lr.svdq_grid(w, [4, -1], None)
    with pytest.raises(UserError, match="must be an integer"):
        lr.lowrank(w, 2.5)
    with pytest.raises(UserError, match="--method: must be one of svd, mpo"):
        lr.lowrank(w, 2, method="tucker")


def test_randomized_branch_recovers_a_low_rank_matrix():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 5)) @ rng.standard_normal((5, 48))).astype(np.float32)
    w += 1e-4 * rng.standard_normal(w.shape).astype(np.float32)
    got = np.asarray(lr.lowrank(w, 5, exact_threshold=0, oversample=8, niter=2))
    np.testing.assert_allclose(got, _np_trunc(w, 5), atol=1e-3)
    # and a generic matrix: within a few percent of the optimal rank-r error
    g = _rand((64, 48), 2)
    e_rand = np.linalg.norm(np.asarray(lr.lowrank(g, 8, exact_threshold=0)) - g)
    e_opt = np.linalg.norm(_np_trunc(g, 8) - g)
    assert e_opt <= e_rand <= 1.05 * e_opt


def test_mpo_modes_follow_the_authors_splits():
    assert lr.mpo_modes((4096, 12288)) == ((64, 64), (128, 96))
    assert lr.mpo_modes((12288, 1024)) == ((96, 128), (32, 32))
    assert lr.mpo_modes((48, 30)) == ((6, 8), (5, 6))
    assert lr.mpo_modes((7, 16)) == ((1, 7), (4, 4))


def test_mpo_recovers_a_hand_built_kronecker_sum():
    rng = np.random.default_rng(3)
    (i0, i1), (o0, o1) = lr.mpo_modes((48, 30))
    w = sum(np.kron(rng.standard_normal((i0, o0)), rng.standard_normal((i1, o1))) for _ in range(3))
    w = w.astype(np.float32)
    assert w.shape == (48, 30)
    np.testing.assert_allclose(np.asarray(lr.lowrank(w, 3, method="mpo")), w, atol=1e-4)
    # a plain SVD of rank 3 cannot represent it (the Kronecker sum has full matrix rank)
    assert np.linalg.norm(np.asarray(lr.lowrank(w, 3)) - w) > 0.1 * np.linalg.norm(w)


@pytest.mark.parametrize("r", [1, 4])
def test_mpo_matches_numpy_rearranged_svd(r):
    w = _rand((48, 30), 4)
    got = np.asarray(lr.lowrank(w, r, method="mpo"))
    np.testing.assert_allclose(got, _np_mpo(w, r, 6, 8, 5, 6), atol=2e-5)


@pytest.mark.parametrize("method", ["svd", "mpo"])
def test_grid_equals_rank_by_rank(method):
    w = _rand((24, 30), 5)
    ranks = [0, 2, 5, 24]
    grid = np.asarray(lr.svdq_grid(w, ranks, None, method=method))
    for k, r in enumerate(ranks):
        np.testing.assert_allclose(grid[k], np.asarray(lr.lowrank(w, r, method=method)), atol=2e-5)
    np.testing.assert_array_equal(grid[-1], w)


def test_svdq_needs_rank_or_spec():
    with pytest.raises(UserError, match="give a rank"):
        lr.svdq(_rand((4, 4)), None, None)


@pytest.mark.parametrize("method", ["svd", "mpo"])
def test_svdq_quantizes_the_residual(method):
    from jcompress.quant.formats import fake_quant, parse_spec

    w = _rand((48, 32), 6)
    spec = parse_spec("fp4@in")
    r = 4
    lo = _np_trunc(w, r) if method == "svd" else _np_mpo(w, r, 6, 8, 4, 8)
    want = lo + np.asarray(fake_quant(np.asarray(w - lo, np.float32), spec), np.float64)
    got = np.asarray(lr.svdq(w, r, spec, method=method))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # rank 0: plain quantization; rank = min(dims): exact (nothing left to quantize)
    np.testing.assert_array_equal(np.asarray(lr.svdq(w, 0, spec)), np.asarray(fake_quant(w, spec)))
    np.testing.assert_array_equal(np.asarray(lr.svdq(w, 32, spec)), w)
    grid = np.asarray(lr.svdq_grid(w, [0, r, 32], spec, method=method))
    np.testing.assert_allclose(grid[1], want, atol=1e-4)
    np.testing.assert_allclose(grid[0], np.asarray(fake_quant(w, spec)), atol=1e-6)
    np.testing.assert_array_equal(grid[2], w)
    # the low-rank branch absorbs an outlier direction: less error than plain quantization
    wo = w.copy()
    wo += 30 * np.outer(_rand((48,), 7), _rand((32,), 8))
    e0 = np.linalg.norm(np.asarray(lr.svdq(wo, 0, spec)) - wo)
    e1 = np.linalg.norm(np.asarray(lr.svdq(wo, 1, spec)) - wo)
    assert e1 < 0.5 * e0


def test_bad_weights_and_ranks_fail_before_the_factorization():
    w = _rand((17, 5))
    for bad in (np.inf, np.nan):
        wb = w.copy()
        wb[0, 0] = bad
        for fn, args in (
            (lr.lowrank, (1,)),
            (lr.svdq, (2, None)),
            (lr.svdq_grid, ([0, 2], "nvfp4")),
            (lr.svdq_grid_split, ([0, 2], "nvfp4")),
        ):  # an SVD of a non-finite matrix may never return: checked first
            with pytest.raises(UserError, match="non-finite"):
                fn(wb, *args)
    with pytest.raises(UserError, match="float32's range"):  # finite in float64 only
        lr.svdq_grid(np.full((4, 4), 1e39), [0], "int8")
    with pytest.raises(UserError, match="2-D"):
        lr.lowrank(w[0], 1)
    with pytest.raises(UserError, match="2-D"):
        lr.svdq_grid(w[None], [1], "nvfp4")
    for ranks in ([2.7], ["2"], [True], [None]):
        with pytest.raises(UserError, match="integer"):
            lr.svdq_grid(w, ranks, "nvfp4")
        with pytest.raises(UserError, match="integer"):
            lr.svdq_grid_split(w, ranks, "nvfp4")
    with pytest.raises(UserError, match="integer"):
        lr.lowrank(w, None)
    np.testing.assert_allclose(lr.lowrank(w, np.int64(2)), _np_trunc(w, 2), atol=1e-5)
    with pytest.raises(ValueError, match="scales along the input dimension"):
        lr.svdq_grid_split(w, [1], "fp4@in")
