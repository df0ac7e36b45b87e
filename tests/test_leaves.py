"""Typed compressed leaves: the LowRank contract, pytree behaviour, jit / vmap / grad; the
registry, nested leaves, the leaf storage form (leaf_io), take / dot_t and embedding tables."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jcompress
from jcompress import UserError, leaf_io
from jcompress.leaves import (
    LEAF_TYPES,
    CompressedLeaf,
    LowRank,
    Residual,
    dot,
    dot_t,
    is_compressed,
    leaf_name,
    leaf_type,
    materialize,
    register_leaf,
    take,
)


def _rand(seed: int, *shape: int, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture(scope="module")
def lr() -> LowRank:
    return LowRank(_rand(0, 6, 3), _rand(1, 3, 5))


# --------------------------------------------------------------------------- contract


def test_exported_and_registered():
    assert jcompress.LowRank is LowRank
    assert LEAF_TYPES["LowRank"] is LowRank
    assert issubclass(LowRank, CompressedLeaf)


@pytest.mark.parametrize(
    "a_shape, b_shape, match",
    [
        ((6, 3), (4, 5), "inner ranks differ"),
        ((6, 3), (2, 5), r"a\(6, 3\) @ b\(2, 5\)"),
        ((6,), (1, 5), "must be 2-D"),
        ((6, 3), (3,), "must be 2-D"),
        ((2, 6, 3), (3, 5), "must be 2-D"),
        ((6, 3), (2, 3, 5), "must be 2-D"),
        ((), (3, 5), "must be 2-D"),
    ],
)
def test_shape_contract_errors(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        LowRank(jnp.zeros(a_shape), jnp.zeros(b_shape))
    with pytest.raises(ValueError, match=match):  # numpy children are checked too
        LowRank(np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32))


def test_placeholders_are_not_checked():
    # pytree machinery may build leaves around non-arrays; those must not raise
    LowRank(None, None)
    LowRank(object(), object())


def test_properties(lr):
    assert lr.shape == (6, 5)
    assert lr.rank == 3
    assert lr.dtype == jnp.float32
    assert lr.num_params == 6 * 3 + 3 * 5
    assert lr.nbytes == (6 * 3 + 3 * 5) * 4
    assert set(lr.arrays()) == {"a", "b"}
    assert lr.arrays()["a"] is lr.a and lr.arrays()["b"] is lr.b
    assert lr.static() == {}


def test_mixed_dtype_nbytes_and_dtype():
    w = LowRank(_rand(0, 8, 2, dtype=jnp.bfloat16), _rand(1, 2, 4))
    assert w.dtype == jnp.float32  # result type of bf16 and f32
    assert w.nbytes == 8 * 2 * 2 + 2 * 4 * 4
    assert w.num_params == 8 * 2 + 2 * 4
    both = LowRank(_rand(0, 8, 2, dtype=jnp.bfloat16), _rand(1, 2, 4, dtype=jnp.bfloat16))
    assert both.dtype == jnp.bfloat16
    assert both.materialize().dtype == jnp.bfloat16


def test_materialize_and_apply(lr):
    a, b = np.asarray(lr.a, np.float64), np.asarray(lr.b, np.float64)
    np.testing.assert_allclose(lr.materialize(), a @ b, rtol=1e-5, atol=1e-5)
    assert lr.materialize().shape == lr.shape
    x = _rand(2, 2, 4, 6)  # leading batch dims
    y = lr.apply(x)
    assert y.shape == (2, 4, 5)
    np.testing.assert_allclose(y, x @ lr.materialize(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ a @ b, rtol=1e-5, atol=1e-5)


def test_dot_dispatch(lr):
    x = _rand(3, 4, 6)
    dense = lr.materialize()
    np.testing.assert_allclose(dot(x, lr), lr.apply(x), rtol=0, atol=0)
    np.testing.assert_allclose(dot(x, dense), x @ dense, rtol=0, atol=0)
    np.testing.assert_allclose(dot(x, lr), dot(x, dense), rtol=1e-5, atol=1e-5)


def test_materialize_tree(lr):
    tree = {"p": {"kernel": lr, "bias": jnp.ones(5)}, "q": jnp.zeros((2, 2))}
    out = materialize(tree)
    assert not any(is_compressed(v) for v in jax.tree.leaves(out, is_leaf=is_compressed))
    np.testing.assert_array_equal(out["p"]["kernel"], lr.materialize())
    assert out["p"]["bias"] is tree["p"]["bias"] and out["q"] is tree["q"]
    assert is_compressed(lr) and not is_compressed(lr.a)
    assert jcompress.materialize is materialize


# --------------------------------------------------------------------------- pytree / transforms


def test_pytree_children_and_paths(lr):
    leaves, treedef = jax.tree.flatten(lr)
    assert len(leaves) == 2 and leaves[0] is lr.a and leaves[1] is lr.b
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, LowRank) and rebuilt.a is lr.a
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lr)[0]]
    assert paths == [".a", ".b"]


def test_tree_map(lr):
    doubled = jax.tree.map(lambda x: 2 * x, lr)
    assert isinstance(doubled, LowRank)
    np.testing.assert_allclose(doubled.a, 2 * lr.a)
    np.testing.assert_allclose(doubled.materialize(), 4 * lr.materialize(), rtol=1e-5)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), {"w": lr})
    assert cast["w"].dtype == jnp.bfloat16 and isinstance(cast["w"], LowRank)
    # per-array reductions and stacking rebuild leaves whose children break the 2-D contract
    maxes = jax.tree.map(jnp.max, lr)
    assert (
        isinstance(maxes, LowRank) and maxes.a.shape == () and float(maxes.a) == float(lr.a.max())
    )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), lr, doubled)
    assert stacked.a.shape == (2, 6, 3) and stacked.b.shape == (2, 3, 5)


def test_jit(lr):
    x = _rand(4, 3, 6)

    @jax.jit
    def f(w, x):
        return w.apply(x), w.materialize(), w

    y, dense, w2 = f(lr, x)
    np.testing.assert_allclose(y, x @ lr.materialize(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense, lr.materialize(), rtol=1e-6, atol=1e-6)
    assert isinstance(w2, LowRank) and w2.shape == lr.shape
    # a leaf built inside jit is validated at trace time
    with pytest.raises(ValueError, match="inner ranks differ"):
        jax.jit(lambda a, b: LowRank(a, b).materialize())(jnp.zeros((6, 3)), jnp.zeros((2, 5)))


def test_vmap_over_inputs_and_over_stacked_leaves(lr):
    xs = _rand(5, 7, 6)
    ys = jax.vmap(lambda x: dot(x, lr))(xs)
    np.testing.assert_allclose(ys, xs @ lr.materialize(), rtol=1e-5, atol=1e-5)
    # vmap producing leaves (stacked factors), then vmap consuming them
    scales = jnp.arange(1.0, 4.0)
    stacked = jax.vmap(lambda s: LowRank(s * lr.a, lr.b))(scales)
    assert isinstance(stacked, LowRank) and stacked.a.shape == (3, 6, 3)
    x = _rand(6, 6)
    out = jax.vmap(lambda w: w.apply(x))(stacked)
    want = np.stack([np.asarray(x @ (s * lr.a) @ lr.b) for s in np.asarray(scales)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    dense = jax.vmap(lambda w: w.materialize())(stacked)
    assert dense.shape == (3, 6, 5)


def test_grad_is_a_lowrank(lr):
    x = _rand(7, 4, 6)
    g = jax.grad(lambda w: jnp.sum(w.apply(x) ** 2))(lr)
    assert isinstance(g, LowRank)
    a, b = lr.a, lr.b
    ga = jax.grad(lambda a: jnp.sum((x @ a @ b) ** 2))(a)
    gb = jax.grad(lambda b: jnp.sum((x @ a @ b) ** 2))(b)
    np.testing.assert_allclose(g.a, ga, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b, gb, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- property-based


@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(1, 9),
    r=st.integers(1, 6),
    n_out=st.integers(1, 9),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n_in, r, n_out, batch, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_in, r)).astype(np.float32)
    b = rng.standard_normal((r, n_out)).astype(np.float32)
    x = rng.standard_normal((*batch, n_in)).astype(np.float32)
    w = LowRank(jnp.asarray(a), jnp.asarray(b))
    assert w.shape == (n_in, n_out) and w.rank == r
    assert w.num_params == n_in * r + r * n_out
    assert w.nbytes == 4 * w.num_params
    dense = np.asarray(a, np.float64) @ b
    np.testing.assert_allclose(w.materialize(), dense, rtol=1e-5, atol=1e-5)
    y = w.apply(jnp.asarray(x))
    assert y.shape == (*batch, n_out)
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, dot(jnp.asarray(x), w.materialize()), rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 6), r=st.integers(1, 6), r2=st.integers(1, 6), n_out=st.integers(1, 6))
def test_random_mismatched_ranks_raise(n_in, r, r2, n_out):
    a, b = np.zeros((n_in, r), np.float32), np.zeros((r2, n_out), np.float32)
    if r == r2:
        assert LowRank(a, b).shape == (n_in, n_out)
    else:
        with pytest.raises(ValueError, match="inner ranks differ"):
            LowRank(a, b)


# --------------------------------------------------------------------------- HeadLowRank


def _head_low_rank(key, d_in=12, heads=3, r=2, d=4):
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (d_in, heads * r))
    b = jax.random.normal(kb, (heads, r, d))
    return jcompress.HeadLowRank(a, b)


def test_head_low_rank_is_block_diagonal_low_rank():
    leaf = _head_low_rank(jax.random.PRNGKey(0))
    a, b = np.asarray(leaf.a), np.asarray(leaf.b)
    block = np.zeros((3 * 2, 3 * 4))
    for h in range(3):
        block[h * 2 : (h + 1) * 2, h * 4 : (h + 1) * 4] = b[h]
    np.testing.assert_allclose(np.asarray(leaf.materialize()), a @ block, rtol=1e-5, atol=1e-5)
    x = np.random.RandomState(0).randn(2, 5, 12).astype(np.float32)
    np.testing.assert_allclose(np.asarray(leaf.apply(x)), x @ a @ block, rtol=1e-4, atol=1e-4)
    assert leaf.shape == (12, 12) and leaf.rank == 2 and leaf.heads == 3
    assert leaf.latent_width == 6 and leaf.down(x).shape == (2, 5, 6)
    assert leaf.num_params == 12 * 6 + 3 * 2 * 4


@pytest.mark.parametrize(
    "a_shape, b_shape", [((12, 6), (3, 2)), ((12, 5), (3, 2, 4)), ((12, 6, 1), (3, 2, 4))]
)
def test_head_low_rank_shape_contract(a_shape, b_shape):
    with pytest.raises(ValueError, match="HeadLowRank"):
        jcompress.HeadLowRank(jnp.zeros(a_shape), jnp.zeros(b_shape))


# --------------------------------------------------------------------------- HeadFoldedOut


def test_head_folded_out_reconstruction_and_latent_path():
    rng = np.random.RandomState(0)
    hq, hk, d, r, out = 4, 2, 8, 3, 10
    u = np.stack([np.linalg.qr(rng.randn(d, d))[0][:, :r] for _ in range(hk)])  # [hk, d, r]
    wo = rng.randn(hq * d, out)
    g = np.arange(hq) // (hq // hk)
    w = np.concatenate([u[g[h]].T @ wo[h * d : (h + 1) * d] for h in range(hq)])
    leaf = jcompress.leaves.HeadFoldedOut(
        jnp.asarray(w, jnp.float32), jnp.asarray(u.transpose(0, 2, 1), jnp.float32)
    )
    dense = np.concatenate([u[g[h]] @ w[h * r : (h + 1) * r] for h in range(hq)])
    assert leaf.shape == (hq * d, out) and leaf.rank == r and leaf.query_heads == hq
    np.testing.assert_allclose(np.asarray(leaf.materialize()), dense, atol=1e-5)
    x = rng.randn(2, hq * d).astype(np.float32)
    np.testing.assert_allclose(np.asarray(leaf.apply(x)), x @ dense, atol=1e-4)
    z = rng.randn(2, hq * r).astype(np.float32)  # rank-r head outputs
    np.testing.assert_allclose(np.asarray(leaf.apply_latent(z)), z @ w, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(leaf.apply(leaf.widen(z))), np.asarray(leaf.apply_latent(z)), atol=1e-4
    )


@pytest.mark.parametrize("w_shape, ut_shape", [((12, 5), (2, 3)), ((10, 5), (2, 3, 8))])
def test_head_folded_out_shape_contract(w_shape, ut_shape):
    with pytest.raises(ValueError, match="HeadFoldedOut"):
        jcompress.leaves.HeadFoldedOut(jnp.zeros(w_shape), jnp.zeros(ut_shape))


# --------------------------------------------------------------------------- a third-party leaf


class Fmt(enum.Enum):
    INT8 = "int8"
    FP8 = "fp8"


@dataclasses.dataclass(frozen=True)
class QSpec:
    """Static settings of a quantized leaf: an enum format and a storage dtype."""

    fmt: Fmt = Fmt.INT8
    dtype: Any = np.dtype(np.int8)
    tile: tuple[int, int] = (1, 1)
    clip: float = math.inf


@register_leaf
class ColumnQuant(CompressedLeaf):
    """Test leaf, per-column scaled quantized kernel: ``W = q * scale[None, :]``.

    Attributes:
      q: ``[in, out]`` values stored in ``spec.dtype``.
      scale: ``[out]`` float scales.
    """

    q: Any
    scale: Any
    spec: QSpec = QSpec()
    array_fields: ClassVar[tuple[str, ...]] = ("q", "scale")

    def __post_init__(self):
        if hasattr(self.q, "shape") and hasattr(self.scale, "shape"):
            if self.q.ndim != 2 or tuple(self.scale.shape) != (self.q.shape[1],):
                raise ValueError(f"ColumnQuant: q{self.q.shape} and scale{self.scale.shape}")

    @classmethod
    def quantize(cls, w: jax.Array, spec: QSpec = QSpec()) -> ColumnQuant:
        top = 127.0 if spec.fmt is Fmt.INT8 else 448.0
        scale = jnp.max(jnp.abs(w), axis=0) / top
        q = w / scale
        q = (jnp.round(q) if spec.fmt is Fmt.INT8 else q).astype(spec.dtype)
        return cls(q, scale, spec)

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def dtype(self):
        return self.scale.dtype

    def materialize(self):
        return self.q.astype(self.scale.dtype) * self.scale

    def apply(self, x):
        return (x @ self.q.astype(x.dtype)) * self.scale


FP8 = QSpec(Fmt.FP8, np.dtype(ml_dtypes.float8_e4m3fn), (2, 3), math.inf)


def _nested(seed: int = 0) -> Residual:
    """``Residual(LowRank(a, ColumnQuant), dense)``: two levels of nesting."""
    a, w, r = _rand(seed, 6, 3), _rand(seed + 1, 3, 5), _rand(seed + 2, 6, 5)
    return Residual(LowRank(a, ColumnQuant.quantize(w, FP8)), 0.1 * r)


# --------------------------------------------------------------------------- registry


def test_registry_qualified_names_and_aliases():
    assert leaf_name(LowRank) == "jcompress.leaves.LowRank"
    assert leaf_name(ColumnQuant) == f"{__name__}.ColumnQuant"
    for name in ("jcompress.leaves.LowRank", "LowRank"):
        assert LEAF_TYPES[name] is LowRank and leaf_type(name) is LowRank
    assert "jcompress.leaves.Residual" in LEAF_TYPES and "Nope" not in LEAF_TYPES
    assert LEAF_TYPES["ColumnQuant"] is ColumnQuant
    assert all("." in name for name in LEAF_TYPES)  # iteration: qualified names only
    assert register_leaf(LowRank) is LowRank  # decorating twice is harmless


def test_registry_errors():
    with pytest.raises(
        UserError, match=r"unknown leaf type 'Nope' \(known: .*jcompress.leaves.LowRank"
    ):
        leaf_type("Nope")

    class Other(ColumnQuant):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_leaf(Other, name="jcompress.leaves.LowRank")
    assert LEAF_TYPES["jcompress.leaves.LowRank"] is LowRank
    with pytest.raises(UserError, match="Other is not registered"):
        leaf_io.to_arrays(Other(jnp.ones((2, 2)), jnp.ones(2)))
    with pytest.raises(TypeError, match="not a CompressedLeaf"):
        register_leaf(QSpec)
    with pytest.raises(TypeError, match="array_fields"):
        register_leaf(type("NoArrays", (CompressedLeaf,), {"__annotations__": {"w": "Any"}}))


def test_bare_name_shared_by_two_classes_is_ambiguous():
    def make():
        class Twin(CompressedLeaf):
            w: Any
            array_fields: ClassVar[tuple[str, ...]] = ("w",)

        return Twin

    one = register_leaf(make(), name="tests.one.Twin")
    two = register_leaf(make(), name="tests.two.Twin")
    assert leaf_type("tests.one.Twin") is one and leaf_type("tests.two.Twin") is two
    with pytest.raises(UserError, match="ambiguous.*tests.one.Twin, tests.two.Twin"):
        leaf_type("Twin")
    # the library's leaves claim their bare names: old files keep reading
    shadow = register_leaf(type("LowRank", (ColumnQuant,), {}), name="tests.shadow.LowRank")
    assert leaf_type("LowRank") is LowRank and leaf_type("tests.shadow.LowRank") is shadow
    with pytest.raises(ValueError, match="alias 'HeadLowRank' is already taken"):
        register_leaf(type("X", (ColumnQuant,), {}), name="tests.x.X", aliases=("HeadLowRank",))


# --------------------------------------------------------------------------- nested leaves


def test_nested_leaf_reconstruction_and_counts():
    leaf = _nested()
    low, r = leaf.base, leaf.residual
    cq = low.b
    w_b = np.asarray(cq.q.astype(jnp.float32)) * np.asarray(cq.scale)
    dense = np.asarray(low.a) @ w_b + np.asarray(r)
    chex.assert_shape(leaf.materialize(), (6, 5))
    np.testing.assert_allclose(leaf.materialize(), dense, rtol=1e-5, atol=1e-5)
    x = _rand(9, 2, 4, 6)
    np.testing.assert_allclose(leaf.apply(x), np.asarray(x) @ dense, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dot(x, leaf), leaf.apply(x), rtol=0, atol=0)
    assert leaf.shape == (6, 5) and leaf.ndim == 2 and leaf.dtype == jnp.float32
    assert low.shape == (6, 5) and low.rank == 3
    assert leaf.num_params == 6 * 3 + (3 * 5 + 5) + 6 * 5
    assert leaf.nbytes == 6 * 3 * 4 + (3 * 5 * 1 + 5 * 4) + 6 * 5 * 4  # fp8 q: 1 byte
    with pytest.raises(ValueError, match="Residual: base and residual"):
        Residual(low, jnp.zeros((5, 6)))
    with pytest.raises(ValueError, match="inner ranks differ"):
        LowRank(_rand(0, 6, 4), cq)  # a leaf child is shape-checked like an array


def test_nested_leaf_pytree_jit_vmap_grad():
    leaf = _nested()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(leaf)[0]]
    assert paths == [".base.a", ".base.b.q", ".base.b.scale", ".residual"]
    chex.assert_trees_all_equal(
        jax.tree.unflatten(jax.tree.structure(leaf), jax.tree.leaves(leaf)), leaf
    )
    maxes = jax.tree.map(jnp.max, leaf)  # scalars everywhere: no shape check on rebuild
    assert isinstance(maxes.base.b, ColumnQuant) and maxes.base.b.q.shape == ()
    x = _rand(3, 4, 6)
    y = jax.jit(lambda w, x: (w.apply(x), w))(leaf, x)
    np.testing.assert_allclose(y[0], leaf.apply(x), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(y[1], leaf)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), leaf, _nested(10))
    chex.assert_shape(stacked.base.b.q, (2, 3, 5))
    out = jax.vmap(lambda w: w.materialize())(stacked)
    np.testing.assert_allclose(out[1], _nested(10).materialize(), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda w: jnp.sum(w.apply(x) ** 2), allow_int=True)(
        Residual(LowRank(leaf.base.a, leaf.base.b.materialize()), leaf.residual)
    )
    assert isinstance(g, Residual) and isinstance(g.base, LowRank)
    assert jcompress.materialize({"k": leaf})["k"].shape == (6, 5)


# --------------------------------------------------------------------------- take / dot_t


@pytest.mark.parametrize(
    "table",
    [
        LowRank(_rand(0, 7, 3), _rand(1, 3, 5)),
        _nested(),
        jcompress.HeadLowRank(_rand(2, 7, 4), _rand(3, 2, 2, 3)),  # default: via materialize
    ],
    ids=["lowrank", "nested", "headlowrank"],
)
def test_take_and_dot_t_match_the_dense_table(table):
    dense = np.asarray(table.materialize())
    ids = jnp.asarray([[0, 6, 2], [100, -3, 1]])  # out of range: clipped
    got = take(table, ids, mode="clip")
    chex.assert_shape(got, (2, 3, dense.shape[1]))
    np.testing.assert_allclose(got, take(jnp.asarray(dense), ids, mode="clip"), atol=1e-5)
    np.testing.assert_allclose(got[1, 0], dense[-1], atol=1e-5)
    x = _rand(4, 2, 3, dense.shape[1])
    np.testing.assert_allclose(dot_t(x, table), np.asarray(x) @ dense.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dot_t(x, jnp.asarray(dense)), np.asarray(x) @ dense.T, atol=1e-4)


def test_lowrank_take_and_dot_t_use_the_factors():
    lr = LowRank(_rand(0, 7, 3), _rand(1, 3, 5))
    ids = jnp.asarray([4, 0])
    # same math, but jitted vs eager programs may round differently (contraction): 1 ulp
    np.testing.assert_allclose(take(lr, ids), lr.a[ids] @ lr.b, rtol=1e-6, atol=1e-7)
    x = _rand(2, 5)
    np.testing.assert_allclose(dot_t(x, lr), (x @ lr.b.T) @ lr.a.T, rtol=1e-6, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(lambda w, x: dot_t(x, w))(lr, x))
    assert "7,5" not in jaxpr.replace(" ", "")  # no [vocab, width] array is built


@pytest.mark.parametrize("variant", ["opt-350m", "llama"])  # tied head, untied head
def test_lowrank_embedding_table_gives_the_dense_logits(variant):
    from _tiny import batch, hf_config

    from jcompress.models.convert import flatten, unflatten
    from jcompress.models.families import config_from_hf

    cfg = config_from_hf(hf_config(variant).to_dict())
    flat = flatten(jcompress.init_params(cfg, jax.random.PRNGKey(0), std=0.3))
    path = next(p for p in flat if p.endswith("embed_tokens/embedding"))
    vocab, width = flat[path].shape
    flat[path] = LowRank(_rand(5, vocab, 6), _rand(6, 6, width))
    low = unflatten(flat)
    dense = jcompress.materialize(low)
    ids, mask = batch()
    ids[2, -1] = vocab  # an out-of-range id under the mask: clipped, not NaN
    got = jcompress.forward(cfg, low, ids, mask)
    want = jcompress.forward(cfg, dense, ids, mask)
    assert np.isfinite(np.asarray(got)).all() and float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- leaf_io


def test_static_encoding_round_trips():
    same_type = [
        FP8,
        QSpec(),
        Fmt.INT8,
        (1, (2, "x"), None),
        [1.5, -0.0],
        {"k": (1, 2)},
        math.inf,
        -math.inf,
        np.dtype(jnp.bfloat16),
        np.dtype(ml_dtypes.float8_e4m3fn),
        np.dtype(np.int8),
        True,
        None,
    ]
    for v in same_type:
        got = leaf_io.decode_static(leaf_io.encode_static(v))
        assert got == v and type(got) is type(v), v
    assert isinstance(leaf_io.decode_static(leaf_io.encode_static(FP8)).fmt, Fmt)
    assert math.isnan(leaf_io.decode_static(leaf_io.encode_static(float("nan"))))
    # scalar types come back as np.dtype, numpy scalars as Python numbers (all compare equal)
    for v in (jnp.bfloat16, ml_dtypes.float8_e4m3fn, np.float32, np.float32(0.25), np.int64(3)):
        assert leaf_io.decode_static(leaf_io.encode_static(v)) == v, v


def test_static_encoding_errors():
    local = enum.Enum("Local", "A B")
    with pytest.raises(UserError, match="not reachable by its name"):
        leaf_io.encode_static(local.A, "spec")
    with pytest.raises(UserError, match="cannot be a static field"):
        leaf_io.encode_static(LowRank(jnp.ones((2, 1)), jnp.ones((1, 2))))
    with pytest.raises(UserError, match="cannot be saved"):
        leaf_io.encode_static(object())
    with pytest.raises(UserError, match="import nowhere"):
        leaf_io.decode_static({"__enum__": "nowhere:Fmt", "value": "int8"})


def test_to_arrays_from_arrays_nested():
    leaf = _nested()
    flat, desc = leaf_io.to_arrays(leaf)
    assert list(flat) == ["base/a", "base/b/q", "base/b/scale", "residual"]
    assert flat["base/b/q"] is leaf.base.b.q
    assert desc["type"] == "jcompress.leaves.Residual"
    inner = desc["children"]["base"]["children"]["b"]
    assert inner["type"] == f"{__name__}.ColumnQuant" and inner["static"]["spec"]["fields"]
    import json

    desc = json.loads(json.dumps(desc, allow_nan=False))  # what files hold
    back = leaf_io.from_arrays(desc, flat)
    chex.assert_trees_all_equal(back, leaf)
    assert back.base.b.spec == FP8 and back.base.b.q.dtype == ml_dtypes.float8_e4m3fn
    with pytest.raises(UserError, match="array residual of a Residual is missing"):
        leaf_io.from_arrays(desc, {k: v for k, v in flat.items() if k != "residual"})
    with pytest.raises(UserError, match="cannot rebuild ColumnQuant"):
        leaf_io.from_arrays(desc, {**flat, "base/b/scale": jnp.ones(2)})
