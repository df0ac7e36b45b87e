"""SmoothQuant factors against the paper's formula written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from jcompress.errors import UserError
from jcompress.quant import smooth


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    x[:, 3] *= 40.0  # an outlier channel
    x[:, 7] = 0.0  # a dead channel
    ks = [rng.standard_normal((16, n)).astype(np.float32) for n in (8, 12)]
    return x, ks


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_group_scales_formula(alpha):
    x, ks = _data()
    xa = np.abs(x).max(0)
    wa = np.maximum(np.abs(ks[0]).max(1), np.abs(ks[1]).max(1))
    want = np.ones(16)
    ok = (xa > 0) & (wa > 0)
    want[ok] = xa[ok] ** alpha / wa[ok] ** (1 - alpha)
    got = np.asarray(smooth.group_scales(smooth.absmax_rows(x, chunk=7), ks, alpha))
    np.testing.assert_allclose(got, np.clip(want, 1e-5, 1e5), rtol=1e-5)
    assert got[7] == 1.0


def test_smoothing_preserves_the_product_and_flattens_outliers():
    x, ks = _data(1)
    s = smooth.group_scales(smooth.absmax_rows(x), ks, 0.5)
    xs = x / np.asarray(s)[None, :]
    for k in ks:
        np.testing.assert_allclose(
            xs @ np.asarray(smooth.apply_smooth(k, s)), x @ k, rtol=1e-4, atol=1e-4
        )
    ratio = lambda a: np.abs(a).max() / np.median(np.abs(a).max(0)[np.abs(a).max(0) > 0])  # noqa: E731
    assert ratio(xs) < ratio(x) / 3


def test_absmax_rows_chunks_match():
    x = np.random.default_rng(2).standard_normal((37, 5)).astype(np.float32)
    for c in (1, 4, 37, 100):
        np.testing.assert_array_equal(np.asarray(smooth.absmax_rows(x, chunk=c)), np.abs(x).max(0))


def test_errors():
    with pytest.raises(UserError, match=r"--alpha: must be in \[0, 1\]"):
        smooth.group_scales(np.ones(3), [np.ones((3, 2))], 1.5)
    with pytest.raises(UserError, match="missing for layer model.layers.0.mlp.up_proj"):
        smooth.require_factor({}, "model.layers.0.mlp.up_proj", 4)
    with pytest.raises(UserError, match="expected \\[4\\]"):
        smooth.require_factor({"a": np.ones(3)}, "a", 4)
    with pytest.raises(UserError, match="non-finite"):
        smooth.require_factor({"a": np.array([1, 0, 1, 1.0])}, "a", 4)
    np.testing.assert_array_equal(np.asarray(smooth.require_factor({"a": 2.0}, "a", 3)), 2.0)


def test_search_alpha_scores_match_numpy():
    from jcompress.quant.formats import fake_quant, parse_spec

    x, ks = _data(3)
    spec = parse_spec("nvfp4")
    best, errs = smooth.search_alpha(x, ks, spec, (0.0, 0.5, 0.9))
    xa = np.abs(x).max(0).astype(np.float64)
    wa = np.maximum(np.abs(ks[0]).max(1), np.abs(ks[1]).max(1)).astype(np.float64)
    for a, e in errs.items():
        ok = (xa > 0) & (wa > 0)
        s = np.ones(16)
        s[ok] = xa[ok] ** a / wa[ok] ** (1 - a)
        num = den = 0.0
        for k in ks:
            y = x.astype(np.float64) @ k
            kq = np.asarray(fake_quant(np.asarray(s[:, None] * k, np.float32), spec), np.float64)
            num += (((x / s) @ kq - y) ** 2).sum()
            den += (y**2).sum()
        assert e == pytest.approx(num / den, rel=1e-3)
    assert best == min(errs, key=errs.get)
