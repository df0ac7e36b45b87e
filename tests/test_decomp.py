"""jcompress.decomp: Tucker (HOSVD / HOOI), TT-SVD and TT-matrices.

Oracles: TensorLy (numpy backend) for HOOI and TT-SVD errors at equal ranks, numpy SVDs for the
2-core MPO, tensors of known low rank for exact recovery, dense matmuls for ``TTMatrix.apply``.
Accuracy tests run in float64 (the ``x64`` fixture, scoped to each test); the rest run in the
suite's float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.decomp import (
    TensorTrain,
    TTMatrix,
    Tucker,
    factorize,
    hooi,
    hooi_core,
    hosvd,
    tensor_train,
    tt_matrix,
    tt_svd_ranks,
)
from jcompress.errors import UserError

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import tensor_train as tl_tensor_train  # noqa: E402
from tensorly.decomposition import tucker as tl_tucker  # noqa: E402


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orth(rng, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def _low_rank_tucker(rng, shape, ranks, noise=0.0) -> np.ndarray:
    core = rng.standard_normal(ranks)
    x = core
    for m, (n, r) in enumerate(zip(shape, ranks, strict=True)):
        x = np.moveaxis(np.tensordot(x, _orth(rng, n, r), axes=([m], [1])), -1, m)
    return x + noise * rng.standard_normal(shape)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _tl_tucker_error(x: np.ndarray, ranks) -> float:
    tl.set_backend("numpy")
    core, factors = tl_tucker(x, rank=list(ranks), init="svd", tol=1e-4, n_iter_max=100)
    return _rel(x, tl.tucker_to_tensor((core, factors)))


def _opt_k_proj(opt_dir) -> np.ndarray:
    """The k_proj weights of all opt-1m layers stacked: ``[layers, 128, 128]``."""
    from safetensors.numpy import load_file

    sd = load_file(str(opt_dir / "model.safetensors"))
    names = sorted(
        (k for k in sd if k.endswith("self_attn.k_proj.weight")),
        key=lambda k: int(k.split(".layers.")[1].split(".")[0]),
    )
    assert len(names) == 4
    return np.stack([sd[k] for k in names]).astype(np.float64)


# --------------------------------------------------------------------------- Tucker / HOOI


@pytest.mark.parametrize(
    "shape, ranks, noise",
    [
        ((12, 10, 14), (3, 4, 5), 0.0),  # pure noise
        ((16, 12, 20), (4, 3, 5), 0.3),  # low multilinear rank + noise
        ((6, 7, 8, 5), (2, 3, 3, 2), 0.2),  # order 4
        ((9, 30), (4, 4), 0.1),  # a matrix
    ],
)
def test_hooi_error_at_most_tensorly(x64, shape, ranks, noise):
    rng = _rng(1)
    x = rng.standard_normal(shape) if noise == 0 else _low_rank_tucker(rng, shape, ranks, noise)
    t = hooi(x, ranks)
    ours = float(t.relative_error(x))
    ref = _tl_tucker_error(x, ranks)
    assert ours <= ref * (1 + 1e-3), (ours, ref)
    assert t.core.dtype == jnp.float64


def test_hooi_error_at_most_tensorly_opt_k_proj(x64, opt_dir):
    x = _opt_k_proj(opt_dir)  # [4, 128, 128]
    for shape, ranks in [((32, 16, 128), (6, 6, 16))]:
        y = x.reshape(shape)
        ours = float(hooi(y, ranks).relative_error(y))
        ref = _tl_tucker_error(y, ranks)
        assert ours <= ref * (1 + 1e-3), (shape, ours, ref)
        assert ours < 1.0


def test_hooi_factors_orthonormal_and_signs(x64):
    # the shape and ranks of test_hooi_error_at_most_tensorly's first case: one compilation
    x = _low_rank_tucker(_rng(2), (12, 10, 14), (3, 4, 5), 0.1)
    t = hooi(x, (3, 4, 5))
    for u in t.factors:
        u = np.asarray(u)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
        cols = np.arange(u.shape[1])
        assert np.all(u[np.argmax(np.abs(u), axis=0), cols] > 0)  # svd_flip convention
    assert t.rank == (3, 4, 5) and t.shape == (12, 10, 14)
    assert t.num_params == 3 * 4 * 5 + 12 * 3 + 10 * 4 + 14 * 5


def test_hooi_exact_recovery_known_multilinear_rank(x64):
    # the order-4 shape and ranks of test_hooi_error_at_most_tensorly: one compilation
    x = _low_rank_tucker(_rng(3), (6, 7, 8, 5), (2, 3, 3, 2))
    t, info = hooi_core(x, (2, 3, 3, 2))
    np.testing.assert_allclose(np.asarray(t.materialize()), x, atol=1e-10 * np.abs(x).max())
    assert float(info.rel_error) < 1e-6  # sqrt of a cancelling difference: ~sqrt(machine eps)
    assert int(info.n_iter) == 2  # at least two sweeps, then the error no longer moves
    h = hosvd(x, (2, 3, 3, 2))  # HOSVD alone is exact here too
    assert _rel(x, h.materialize()) < 1e-10


def test_hooi_stopping_rule(x64):
    # the shape and ranks of test_hooi_error_at_most_tensorly's first case: one compilation
    x = _rng(4).standard_normal((12, 10, 14))
    _, info = hooi_core(x, (3, 4, 5), tol=0.0, n_iter_max=7)
    assert int(info.n_iter) == 7
    _, info = hooi_core(x, (3, 4, 5), tol=1e-2, n_iter_max=50)
    assert 2 <= int(info.n_iter) < 50
    t0, info0 = hooi_core(x, (3, 4, 5), n_iter_max=0)
    assert int(info0.n_iter) == 0
    assert _rel(x, t0.materialize()) == pytest.approx(float(info0.rel_error), rel=1e-8)
    # warm start from a finished run: the error does not get worse
    t1, info1 = hooi_core(x, (3, 4, 5))
    t2, info2 = hooi_core(x, (3, 4, 5), init=t1)
    assert float(info2.rel_error) <= float(info1.rel_error) + 1e-12


def test_hooi_float32_and_dtypes():
    # the shape and ranks of test_hooi_jit_and_vmap: one compilation of the float32 HOOI
    x = _low_rank_tucker(_rng(5), (10, 12, 14), (3, 3, 3), 0.005).astype(np.float32)
    t = hooi(x, 3)
    assert t.core.dtype == jnp.float32 and all(f.dtype == jnp.float32 for f in t.factors)
    assert float(t.relative_error(x)) < 0.1
    tb = hooi(jnp.asarray(x, jnp.bfloat16), 3)  # narrow floats are computed in float32
    assert tb.core.dtype == jnp.float32


def test_hooi_jit_and_vmap():
    rng = _rng(6)
    # the shape and ranks of test_hooi_float32_and_dtypes: the eager HOOI is compiled once
    xs = np.stack([_low_rank_tucker(rng, (10, 12, 14), (3, 3, 3), 0.1) for _ in range(3)])
    xs = xs.astype(np.float32)
    ranks = (3, 3, 3)
    jitted = jax.jit(lambda x: hooi(x, ranks))(xs[0])
    eager = hooi(xs[0], ranks)
    np.testing.assert_allclose(jitted.core, eager.core, rtol=1e-5, atol=1e-5)
    batch = jax.vmap(lambda x: hooi(x, ranks))(xs)
    assert isinstance(batch, Tucker) and batch.core.shape == (3, 3, 3, 3)
    assert batch.batch_ndim == 1 and batch.rank == ranks and batch.shape == (10, 12, 14)
    assert batch.materialize().shape == xs.shape
    errs = batch.relative_error(xs)
    assert errs.shape == (3,)
    cores, errs = np.asarray(batch.core), np.asarray(errs)  # indexed on the host
    for i in range(3):
        one = hooi(xs[i], ranks)
        np.testing.assert_allclose(cores[i], one.core, rtol=1e-4, atol=1e-4)
        assert float(errs[i]) == pytest.approx(float(one.relative_error(xs[i])), rel=1e-4)
    # a pytree: tree.map keeps the type (under jit: one program, not one per leaf)
    doubled = jax.jit(lambda t: jax.tree.map(lambda a: 2 * a, t))(eager)
    assert isinstance(doubled, Tucker)
    np.testing.assert_allclose(doubled.core, 2 * np.asarray(eager.core))


@pytest.mark.parametrize(
    "ranks, message",
    [
        ((2, 3, 9), "ranks[2]: 9 exceeds mode size 8"),
        ((2, 0, 3), "ranks[1]: 0 is below 1"),
        ((2, 3), "expected 3 ranks, got 2"),
        (9, "ranks[0]: 9 exceeds mode size 6"),
        ("3", "expected an int or a sequence"),
        ((2, 2.5, 2), "ranks[1]: expected an integer"),
    ],
)
def test_hooi_bad_ranks(ranks, message):
    x = np.zeros((6, 7, 8), np.float32)
    with pytest.raises(UserError) as e:
        hooi(x, ranks)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_hooi_bad_options():
    x = np.ones((4, 5, 6), np.float32)
    with pytest.raises(UserError, match="init"):
        hooi(x, 2, init="random")
    with pytest.raises(UserError, match="n_iter_max"):
        hooi(x, 2, n_iter_max=-1)
    with pytest.raises(UserError, match="tol"):
        hooi(x, 2, tol=-1.0)
    # a Tucker of another rank (built by hand: the check needs no decomposition)
    other = Tucker(
        np.zeros((3, 3, 3), np.float32), tuple(np.eye(n, 3, dtype=np.float32) for n in x.shape)
    )
    with pytest.raises(UserError, match="init"):
        hooi(x, 2, init=other)


# --------------------------------------------------------------------------- TT-SVD


def _tt_tensor(rng, shape, ranks, noise=0.0) -> np.ndarray:
    rs = (1, *ranks, 1)
    cores = [rng.standard_normal((rs[k], n, rs[k + 1])) for k, n in enumerate(shape)]
    x = np.asarray(TensorTrain(tuple(jnp.asarray(c) for c in cores)).materialize())
    return x / np.linalg.norm(x) + noise * rng.standard_normal(shape) / math.sqrt(x.size)


def test_tt_eps_one_is_exact(x64):
    rng = _rng(7)
    x = rng.standard_normal((4, 5, 6, 3))
    tt = tensor_train(x, eps=1.0)
    assert tt.ranks == (1, 4, 18, 3, 1)  # full ranks: random data has no small singular values
    assert _rel(x, tt.materialize()) < 1e-12
    # exactly TT-low-rank data: eps = 1 finds the true ranks (rounding-level tails dropped)
    y = _tt_tensor(rng, (4, 5, 6, 3), (2, 3, 2))
    tty = tensor_train(y, eps=1.0)
    assert tty.ranks == (1, 2, 3, 2, 1)
    assert _rel(y, tty.materialize()) < 1e-12


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99, 0.999, 1 - 1e-12])
def test_tt_energy_bound(x64, eps):
    """The bound implemented: ``||A - A_tt||^2 <= (d - 1) (1 - eps) ||A||^2`` (each of the d - 1
    truncations drops at most (1 - eps) of an energy that is at most ||A||^2)."""
    rng = _rng(8)
    x = _tt_tensor(rng, (5, 6, 4, 7), (3, 4, 3), noise=0.3)
    tt = tensor_train(x, eps=eps)
    d = x.ndim
    err2 = _rel(x, tt.materialize()) ** 2
    assert err2 <= (d - 1) * (1 - eps) + 1e-12
    # smaller eps never needs larger ranks
    tight = tensor_train(x, eps=min(1.0, eps + (1 - eps) / 2))
    assert all(a <= b for a, b in zip(tt.ranks, tight.ranks, strict=True))


def test_tt_energy_rule_boundary(x64):
    """The reference rule picks the smallest r whose cumulative s^2 reaches eps of the total;
    here s^2 is built so that cumulative fractions hit 0.5, 0.75, ... exactly."""
    rng = _rng(9)
    s = np.sqrt([8.0, 4.0, 2.0, 1.0, 1.0])  # energies 8/16, 4/16, 2/16, 1/16, 1/16
    u, v = _orth(rng, 5, 5), _orth(rng, 6, 5)
    a = (u * s) @ v.T
    for eps, r in [(0.5, 1), (0.5 + 1e-9, 2), (0.75, 2), (0.875, 3), (15 / 16, 4), (1.0, 5)]:
        assert tensor_train(a, eps=eps).ranks == (1, r, 1), eps


def test_tt_rel_error_delta_truncation(x64):
    x = _tt_tensor(_rng(10), (6, 5, 4, 6), (3, 4, 3), noise=0.2)
    for rel in (0.05, 0.2, 0.5):
        tt = tensor_train(x, rel_error=rel)
        assert _rel(x, tt.materialize()) <= rel + 1e-12
    assert _rel(x, tensor_train(x, rel_error=0.0).materialize()) < 1e-12


@pytest.mark.parametrize(
    "shape, ranks", [((5, 6, 7), (3, 4)), ((4, 4, 4, 4, 4), (2, 5, 5, 3)), ((8, 9), (4,))]
)
def test_tt_error_at_most_tensorly(x64, shape, ranks):
    x = _tt_tensor(_rng(11), shape, ranks, noise=0.5)
    tt = tensor_train(x, ranks=ranks)
    assert tt.ranks == (1, *ranks, 1)
    tl.set_backend("numpy")
    ref = tl_tensor_train(x, [1, *ranks, 1])
    ref_err = _rel(x, tl.tt_to_tensor(ref))
    assert _rel(x, tt.materialize()) <= ref_err * (1 + 1e-9) + 1e-12
    # the tensorly-style rank list (1 at both ends) is accepted too
    assert tensor_train(x, ranks=[1, *ranks, 1]).ranks == tt.ranks


def test_tt_cores_left_orthonormal_and_counts(x64):
    x = _rng(12).standard_normal((4, 5, 6))
    tt = tensor_train(x, ranks=(3, 4))
    for c in tt.cores[:-1]:
        m = np.asarray(c).reshape(-1, c.shape[-1])
        np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-12)
    assert tt.shape == (4, 5, 6)
    assert tt.num_params == 1 * 4 * 3 + 3 * 5 * 4 + 4 * 6 * 1


def test_tt_jit_and_vmap():
    rng = _rng(13)
    xs = np.stack([_tt_tensor(rng, (4, 5, 6), (2, 3), 0.1) for _ in range(3)]).astype(np.float32)
    f = jax.jit(lambda x: tensor_train(x, ranks=(2, 3)))
    one = f(xs[0])
    assert isinstance(one, TensorTrain) and one.ranks == (1, 2, 3, 1)
    batch = jax.vmap(lambda x: tensor_train(x, ranks=(2, 3)))(xs)
    assert batch.batch_ndim == 1 and batch.ranks == (1, 2, 3, 1)
    dense = np.asarray(batch.materialize())  # indexed on the host
    np.testing.assert_allclose(dense, xs, atol=0.05)
    for i in range(3):
        np.testing.assert_allclose(
            dense[i], tensor_train(xs[i], ranks=(2, 3)).materialize(), atol=1e-5
        )
    with pytest.raises(UserError, match="ranks="):
        jax.jit(lambda x: tensor_train(x, eps=0.9))(xs[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=0.0), "eps: 0.0 is outside (0, 1.0]"),
        (dict(eps=1.5), "eps: 1.5 is outside"),
        (dict(eps=float("nan")), "eps: expected a number"),
        (dict(rel_error=1.0), "rel_error: 1.0 is outside"),
        (dict(), "give exactly one of"),
        (dict(eps=0.9, ranks=2), "got ranks, eps"),
        (dict(ranks=(2, 3, 4)), "expected 2 ranks, got 3"),
        (dict(ranks=(2, 9)), "ranks[1]: 9 exceeds the largest bond possible there"),
        (dict(ranks=(5, 2)), "ranks[0]: 5 exceeds"),
        (dict(ranks=[2, 2, 2, 2]), "must start and end in 1"),
    ],
)
def test_tt_bad_arguments(kwargs, message):
    x = np.ones((4, 5, 6), np.float32)
    with pytest.raises(UserError) as e:
        tensor_train(x, **kwargs)
    assert message in str(e.value)


def test_tt_int_rank_is_clipped_and_order():
    assert tt_svd_ranks((4, 5, 6), 100) == (4, 6)
    with pytest.raises(UserError, match="order >= 2"):
        tensor_train(np.ones(5, np.float32), eps=0.9)


# --------------------------------------------------------------------------- TT-matrix


def test_factorize():
    assert factorize(768, 3) == (12, 8, 8)
    assert factorize(64, 2) == (8, 8)
    assert factorize(128, 3) == (8, 4, 4)
    assert factorize(127, 3) == (127, 1, 1)  # a prime: the size itself and ones
    assert factorize(6, 3) == (3, 2, 1)
    assert factorize(1, 2) == (1, 1)
    assert factorize(35, 1) == (35,)
    for n, d in [(768, 3), (3072, 4), (1000, 3), (97, 2), (360, 5)]:
        f = factorize(n, d)
        assert math.prod(f) == n and len(f) == d and list(f) == sorted(f, reverse=True)
    with pytest.raises(UserError):
        factorize(0, 3)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((768, 768), dict(ranks=8)),
        ((128, 64), dict(ranks=(6, 5))),  # a GQA K/V projection
        ((35, 21), dict(eps=0.95)),  # odd sizes
        ((127, 64), dict(ranks=4, n_cores=2)),  # a prime input size
        ((24, 30), dict(in_modes=(2, 3, 4), out_modes=(5, 3, 2), rel_error=0.3)),
    ],
)
def test_tt_matrix_apply_matches_dense(x64, shape, kwargs):
    rng = _rng(14)
    w = rng.standard_normal(shape)
    m = tt_matrix(w, **kwargs)
    assert isinstance(m, TTMatrix) and m.shape == shape
    dense = np.asarray(m.materialize())
    assert dense.shape == shape
    x = rng.standard_normal((2, 3, shape[0]))
    np.testing.assert_allclose(np.asarray(m.apply(x)), x @ dense, atol=1e-10 * np.abs(dense).max())
    assert m.num_params == sum(int(np.prod(c.shape)) for c in m.cores)
    for c, mk, nk in zip(m.cores, m.in_modes, m.out_modes, strict=True):
        assert c.shape[1:3] == (mk, nk)


def _compiled_flops(f, *args) -> float:
    ca = jax.jit(f).lower(*args).compile().cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]


@pytest.mark.parametrize(
    "shape, kwargs, rows",
    [
        ((64, 48), dict(eps=1.0), 256),  # bonds at full rank: the chain would cost ~18x x @ W
        ((768, 768), dict(ranks=8), 64),  # low bonds: the chain is the cheaper route
    ],
)
def test_tt_matrix_apply_never_costs_more_than_building_w(x64, shape, kwargs, rows):
    """``apply`` takes the cheaper of the core-by-core chain and ``x @ materialize()``: XLA's
    own count of the compiled program's flops (an oracle independent of the code's cost
    model) is never above that of building ``W`` and multiplying, and the values agree.
    float64 like test_tt_matrix_apply_matches_dense (its (768, 768) factorization programs)."""
    rng = _rng(16)
    m = tt_matrix(rng.standard_normal(shape), **kwargs)
    x = jnp.asarray(rng.standard_normal((rows, shape[0])))
    dense = _compiled_flops(lambda x: x @ m.materialize(), x)
    assert _compiled_flops(m.apply, x) <= 1.01 * dense
    np.testing.assert_allclose(
        np.asarray(m.apply(x)), np.asarray(x) @ np.asarray(m.materialize()), rtol=2e-4, atol=2e-4
    )


def test_tt_matrix_exact_and_layout(x64):
    rng = _rng(15)
    w = rng.standard_normal((12, 20))
    m = tt_matrix(w, in_modes=(3, 4), out_modes=(5, 4), eps=1.0)
    assert _rel(w, m.materialize()) < 1e-12
    # the layout: W[(i1, i2), (j1, j2)] = G1[0, i1, j1, :] @ G2[:, i2, j2, 0]
    g1, g2 = (np.asarray(c) for c in m.cores)
    i1, i2, j1, j2 = 2, 1, 3, 2
    assert w[i1 * 4 + i2, j1 * 4 + j2] == pytest.approx(g1[0, i1, j1] @ g2[:, i2, j2, 0])


def test_tt_matrix_two_cores_is_kronecker_svd(x64):
    """A 2-core MPO with bond r = the rank-r SVD of the rearranged matrix R[(i1, j1), (i2, j2)]
    (sum of r Kronecker products); with in_modes=(in, 1), out_modes=(1, out), of W itself."""
    rng = _rng(16)
    w = rng.standard_normal((12, 20))
    m1, m2, n1, n2 = 3, 4, 5, 4
    r = 4
    mpo = tt_matrix(w, in_modes=(m1, m2), out_modes=(n1, n2), ranks=(r,))
    rearranged = w.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    u, s, vt = np.linalg.svd(rearranged)
    best = ((u[:, :r] * s[:r]) @ vt[:r]).reshape(m1, n1, m2, n2).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(mpo.materialize()), best.reshape(12, 20), atol=1e-12)
    low = tt_matrix(w, in_modes=(12, 1), out_modes=(1, 20), ranks=(r,))
    u, s, vt = np.linalg.svd(w)
    np.testing.assert_allclose(
        np.asarray(low.materialize()), (u[:, :r] * s[:r]) @ vt[:r], atol=1e-12
    )
    assert tt_matrix(w, n_cores=2, ranks=(r,)).ranks == (1, r, 1)


def test_tt_matrix_jit_vmap_pytree():
    rng = _rng(17)
    ws = rng.standard_normal((3, 128, 64)).astype(np.float32)
    f = jax.jit(lambda w: tt_matrix(w, ranks=(6, 6)))
    one = f(ws[0])
    assert one.ranks == (1, 6, 6, 1) and one.shape == (128, 64)
    batch = jax.vmap(lambda w: tt_matrix(w, ranks=(6, 6)))(ws)
    dense = np.asarray(batch.materialize())  # indexed on the host
    assert batch.batch_ndim == 1 and dense.shape == (3, 128, 64)
    np.testing.assert_allclose(dense[0], one.materialize(), atol=1e-5)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    y = jax.vmap(lambda m: m.apply(x))(batch)
    np.testing.assert_allclose(y, np.einsum("ti,bio->bto", x, dense), atol=1e-4)
    halves = jax.jit(lambda t: jax.tree.map(lambda c: c / 2, t))(one)  # one program
    assert isinstance(halves, TTMatrix)
    np.testing.assert_allclose(halves.cores[0], np.asarray(one.cores[0]) / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_modes=(4, 4), out_modes=(4, 4), ranks=2), "in_modes: (4, 4) multiply to 16"),
        (dict(in_modes=(8, 4), out_modes=(4, 2, 2), ranks=2), "out_modes: 3 modes"),
        (dict(in_modes=(8, 4), n_cores=3, ranks=2), "n_cores: 3 disagrees"),
        (dict(n_cores=2, ranks=(2, 2)), "expected 1 ranks, got 2"),
        (dict(n_cores=2, ranks=(999,)), "ranks[0]: 999 exceeds"),
        (dict(ranks=2, eps=0.5), "give exactly one of"),
        (dict(in_modes=(8, 0, 4), ranks=2), "in_modes[1]: 0 is below 1"),
    ],
)
def test_tt_matrix_bad_arguments(kwargs, message):
    w = np.ones((32, 16), np.float32)
    with pytest.raises(UserError) as e:
        tt_matrix(w, **kwargs)
    assert message in str(e.value)
    with pytest.raises(UserError, match=r"\[in, out\]"):
        tt_matrix(np.ones((2, 3, 4), np.float32), ranks=2)
