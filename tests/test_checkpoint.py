"""Orbax checkpoints of (compressed) param pytrees: exact round trips, atomic writes, errors."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress import LowRank, UserError, atomic, checkpoint
from jcompress.leaves import LEAF_TYPES, CompressedLeaf, Residual, _register, register_leaf
from jcompress.models.convert import flatten, unflatten


@_register
class _ScaledTestLeaf(CompressedLeaf):
    """A test-only leaf with static fields of awkward JSON types: ``W = scale * w``."""

    w: Any
    scale: float = 1.0
    block: tuple = (1, 1)
    tag: str = ""
    dt: Any = None
    array_fields: ClassVar[tuple[str, ...]] = ("w",)

    @property
    def shape(self):
        return tuple(self.w.shape)

    def materialize(self):
        return self.scale * self.w

    def apply(self, x):
        return self.scale * (x @ self.w)


class _Fmt(enum.Enum):
    INT8 = "int8"


@dataclasses.dataclass(frozen=True)
class _Spec:
    fmt: _Fmt = _Fmt.INT8
    dtype: Any = np.dtype(np.int8)
    tile: tuple = (1, 1)


@register_leaf
class _QuantTestLeaf(CompressedLeaf):
    """A third-party leaf with a dataclass static holding an enum and a dtype:
    ``W = q * scale[None, :]`` (``q: [in, out]`` int8, ``scale: [out]``)."""

    q: Any
    scale: Any
    spec: _Spec = _Spec()
    array_fields: ClassVar[tuple[str, ...]] = ("q", "scale")

    @classmethod
    def quantize(cls, w):
        scale = jnp.max(jnp.abs(w), axis=0) / 127
        return cls(jnp.round(w / scale).astype(jnp.int8), scale)

    @property
    def shape(self):
        return tuple(self.q.shape)

    def materialize(self):
        return self.q.astype(self.scale.dtype) * self.scale

    def apply(self, x):
        return (x @ self.q.astype(x.dtype)) * self.scale


@pytest.fixture(scope="module")
def llama(llama_dir):
    return jcompress.load_hf(llama_dir)


@pytest.fixture(scope="module")
def ids():
    # the shape test_forward_features uses, so the dense forward compiles once per session
    return jnp.asarray(np.random.default_rng(0).integers(1, 2048, (2, 12)), jnp.int32)


def _compressed(cfg, params):
    """LowRank q/k kernels (bf16 factors in layer 0, f32 in layer 1), a bf16 MLP kernel, and a
    test leaf with static fields."""
    flat = flatten(params)
    for i, dt in ((0, jnp.bfloat16), (1, jnp.float32)):
        for role in ("q_proj", "k_proj"):
            path = f"model/layers/{i}/self_attn/{role}/kernel"
            w = flat[path]
            a = w[:, :8] + 0.01  # any rank-8 factorisation will do here
            b = jnp.eye(8, w.shape[1], dtype=w.dtype)
            flat[path] = LowRank(a.astype(dt), b.astype(dt))
    flat["model/layers/2/mlp/up_proj/kernel"] = flat["model/layers/2/mlp/up_proj/kernel"].astype(
        jnp.bfloat16
    )
    flat["model/layers/3/mlp/down_proj/kernel"] = _ScaledTestLeaf(
        flat["model/layers/3/mlp/down_proj/kernel"] * 2,
        scale=0.5,
        block=(4, (2, 3)),
        tag="x/y",
        dt=jnp.dtype(jnp.bfloat16),
    )
    return unflatten(flat)


def _assert_same_tree(got, want):
    g = flatten(got)
    w = flatten(want)
    assert set(g) == set(w)
    for path in w:
        assert type(g[path]) is type(w[path]) or (
            isinstance(g[path], jax.Array) and isinstance(w[path], jax.Array)
        ), path
        if isinstance(w[path], CompressedLeaf):
            assert g[path].static() == w[path].static(), path
            pairs = [(g[path].arrays()[f], w[path].arrays()[f]) for f in w[path].array_fields]
        else:
            pairs = [(g[path], w[path])]
        for x, y in pairs:
            assert isinstance(x, jax.Array), path
            assert x.dtype == y.dtype and x.shape == y.shape, path
            assert len(x.devices()) == 1, path
            # bit-exact (compare raw bytes; NaN-safe and exact for bf16)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


def test_round_trip_real_llama(llama, ids, tmp_path):
    cfg, params = llama
    out = checkpoint.save(tmp_path / "ckpt", cfg, params)
    assert out == tmp_path / "ckpt" and checkpoint.is_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary dirs left
    cfg2, params2 = checkpoint.restore(out)
    assert cfg2 == cfg and dict(cfg2.hf_config) == dict(cfg.hf_config)
    _assert_same_tree(params2, params)
    # like load_hf: default device, uncommitted (so both share jit compilations)
    assert not any(x.committed for x in jax.tree.leaves(params2))
    np.testing.assert_array_equal(
        jcompress.forward(cfg2, params2, ids), jcompress.forward(cfg, params, ids)
    )
    dev = jax.devices()[-1]
    _, on_dev = checkpoint.restore(out, device=dev)
    assert all(x.committed and x.devices() == {dev} for x in jax.tree.leaves(on_dev))
    _assert_same_tree(on_dev, params)


def test_round_trip_compressed_tree(llama, ids, tmp_path):
    cfg, params = llama
    comp = _compressed(cfg, params)
    checkpoint.save(tmp_path / "c", cfg, comp)
    meta = json.loads((tmp_path / "c" / checkpoint.SIDECAR).read_text())
    assert sorted(e["type"] for e in meta["leaves"]) == ["jcompress.leaves.LowRank"] * 4 + [
        f"{_ScaledTestLeaf.__module__}._ScaledTestLeaf"
    ]
    cfg2, comp2 = checkpoint.restore(tmp_path / "c")
    assert cfg2 == cfg
    _assert_same_tree(comp2, comp)
    k0 = comp2["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(k0, LowRank) and k0.a.dtype == jnp.bfloat16 and k0.rank == 8
    leaf = comp2["model"]["layers"]["3"]["mlp"]["down_proj"]["kernel"]
    assert leaf.block == (4, (2, 3)) and isinstance(leaf.block[1], tuple)
    assert leaf.scale == 0.5 and leaf.tag == "x/y" and leaf.dt == jnp.bfloat16
    before = jcompress.forward(cfg, comp, ids)
    after = jcompress.forward(cfg2, comp2, ids)
    np.testing.assert_array_equal(after, before)
    assert not np.allclose(before, jcompress.forward(cfg, params, ids), atol=1e-3)


def test_equal_leaf_arrays_stored_once_and_relinked(llama, tmp_path):
    """A leaf array equal to an earlier leaf's (EigenAttention's V basis and o_proj's folded
    copy, here two objects) is stored once and linked (version 2); restore relinks it to one
    array, bit-exact. Without equal arrays the file stays version 1."""
    from jcompress.leaves import HeadFoldedOut, HeadLowRank

    cfg, params = llama
    flat = flatten(params)
    att = "model/layers/1/self_attn"
    wv, wo = flat[f"{att}/v_proj/kernel"], flat[f"{att}/o_proj/kernel"]
    u = jnp.linalg.svd(wv.reshape(128, 4, 16).transpose(1, 0, 2))[2][:, :5]  # [4, 5, 16]
    a = jnp.einsum("ihd,hrd->ihr", wv.reshape(128, 4, 16), u).reshape(128, 20)
    folded = jnp.einsum("hrd,hdo->hro", jnp.repeat(u, 2, axis=0), wo.reshape(8, 16, 128))
    flat[f"{att}/v_proj/kernel"] = HeadLowRank(a, u, basis="t")
    flat[f"{att}/o_proj/kernel"] = HeadFoldedOut(folded.reshape(40, 128), jnp.array(u, copy=True))
    comp = unflatten(flat)
    checkpoint.save(tmp_path / "c", cfg, comp)
    meta = json.loads((tmp_path / "c" / checkpoint.SIDECAR).read_text())
    assert meta["version"] == 2
    links = {"/".join(e["path"]): e.get("links") for e in meta["leaves"]}
    assert links == {
        f"{att}/v_proj/kernel": None,
        f"{att}/o_proj/kernel": {"ut": {"path": f"{att}/v_proj/kernel".split("/"), "field": "b"}},
    }
    _, back = checkpoint.restore(tmp_path / "c")
    _assert_same_tree(back, comp)
    fb = flatten(back)
    assert fb[f"{att}/o_proj/kernel"].ut is fb[f"{att}/v_proj/kernel"].b
    assert fb[f"{att}/v_proj/kernel"].basis == "t"
    checkpoint.save(tmp_path / "d", cfg, params)  # nothing to link: version 1 as before
    assert json.loads((tmp_path / "d" / checkpoint.SIDECAR).read_text())["version"] == 1


def test_reads_checkpoints_with_bare_type_names(llama, tmp_path):
    # sidecars written before qualified names: "LowRank", "_ScaledTestLeaf"
    cfg, params = llama
    comp = _compressed(cfg, params)
    checkpoint.save(tmp_path / "c", cfg, comp)
    sidecar = tmp_path / "c" / checkpoint.SIDECAR
    meta = json.loads(sidecar.read_text())
    for e in meta["leaves"]:
        e["type"] = e["type"].rsplit(".", 1)[-1]
    sidecar.write_text(json.dumps(meta))
    _, comp2 = checkpoint.restore(tmp_path / "c")
    _assert_same_tree(comp2, comp)


def test_round_trip_third_party_and_nested_leaves(llama, ids, tmp_path):
    cfg, params = llama
    flat = flatten(params)
    gate = "model/layers/0/mlp/gate_proj/kernel"
    w = flat[gate]
    # LowRank base whose b is a quantized leaf, plus a quantized residual
    base = LowRank(w[:, :6], _QuantTestLeaf.quantize(w[:6]))
    flat[gate] = Residual(base, _QuantTestLeaf.quantize(w - base.materialize()))
    flat["model/layers/1/mlp/up_proj/kernel"] = _QuantTestLeaf.quantize(
        flat["model/layers/1/mlp/up_proj/kernel"]
    )
    emb = flat["model/embed_tokens/embedding"]
    flat["model/embed_tokens/embedding"] = LowRank(emb[:, :16], jnp.eye(16, emb.shape[1]))
    comp = unflatten(flat)
    checkpoint.save(tmp_path / "c", cfg, comp)
    meta = json.loads((tmp_path / "c" / checkpoint.SIDECAR).read_text())
    entry = next(e for e in meta["leaves"] if e["path"][-2] == "gate_proj")
    assert entry["type"] == "jcompress.leaves.Residual"
    assert entry["children"]["base"]["children"]["b"]["type"].endswith("._QuantTestLeaf")
    _, comp2 = checkpoint.restore(tmp_path / "c")
    chex.assert_trees_all_equal(comp2, comp)
    chex.assert_trees_all_equal_dtypes(comp2, comp)
    back = flatten(comp2)
    assert isinstance(back[gate].base.b, _QuantTestLeaf) and back[gate].base.b.spec == _Spec()
    assert isinstance(back[gate].base.b.spec.fmt, _Fmt)
    np.testing.assert_array_equal(
        jcompress.forward(cfg, comp2, ids), jcompress.forward(cfg, comp, ids)
    )


def test_edited_config_round_trips(llama, tmp_path):
    cfg, params = llama
    edited = dataclasses.replace(
        cfg, norm_eps=1e-3, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))
    )
    checkpoint.save(tmp_path / "c", edited, params)
    cfg2, _ = checkpoint.restore(tmp_path / "c")
    assert cfg2 == edited and cfg2 != cfg
    assert cfg2.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))


def test_save_refuses_existing_path_without_overwrite(llama, tmp_path):
    cfg, params = llama
    small = {"model": {"embed_tokens": params["model"]["embed_tokens"]}}
    dest = tmp_path / "c"
    checkpoint.save(dest, cfg, small)
    before = sorted(p.name for p in dest.rglob("*"))
    with pytest.raises(UserError, match="already exists") as e:
        checkpoint.save(dest, cfg, params)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in dest.rglob("*")) == before
    _, got = checkpoint.restore(dest)
    assert set(flatten(got)) == {"model/embed_tokens/embedding"}
    # overwrite=True replaces it
    checkpoint.save(dest, cfg, params, overwrite=True)
    _, got = checkpoint.restore(dest)
    assert set(flatten(got)) == set(flatten(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_overwrite_refuses_non_checkpoint(llama, tmp_path):
    cfg, params = llama
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a jcompress checkpoint"):
        checkpoint.save(tmp_path / "d", cfg, params, overwrite=True)
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        checkpoint.save(tmp_path / "f", cfg, params)


def test_failed_save_leaves_nothing(llama, tmp_path, monkeypatch):
    cfg, params = llama
    small = {"model": {"norm": params["model"]["norm"]}}

    def boom(tmp, dest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(atomic, "replace_dir", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(tmp_path / "c", cfg, small)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a failed overwrite keeps the old checkpoint intact
    checkpoint.save(tmp_path / "c", cfg, small)
    monkeypatch.setattr(atomic, "replace_dir", boom)
    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path / "c", cfg, params, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.undo()
    _, got = checkpoint.restore(tmp_path / "c")
    assert set(flatten(got)) == {"model/norm/scale"}


def test_unsupported_params_are_refused_before_writing(llama, tmp_path):
    cfg, params = llama
    for bad, match in (
        ({"a": "text"}, "cannot save a str"),
        ({"a": [jnp.ones(2)]}, "cannot save a list"),
        ({1: jnp.ones(2)}, "keys must be non-empty strings"),
        ({"a": {}}, "no arrays"),
        ([jnp.ones(2)], "expected a nested dict"),
    ):
        with pytest.raises(UserError, match=match):
            checkpoint.save(tmp_path / "c", cfg, bad)
    with pytest.raises(UserError, match="cfg"):
        checkpoint.save(tmp_path / "c", "not a config", params)
    assert list(tmp_path.iterdir()) == []


def test_restore_errors(llama, tmp_path):
    cfg, params = llama
    with pytest.raises(UserError, match="does not exist") as e:
        checkpoint.restore(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a jcompress checkpoint"):
        checkpoint.restore(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a jcompress checkpoint"):
        checkpoint.restore(tmp_path / "file")

    small = {"model": {"norm": params["model"]["norm"]}}
    good = checkpoint.save(tmp_path / "good", cfg, small)
    sidecar = good / checkpoint.SIDECAR
    meta = json.loads(sidecar.read_text())

    sidecar.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        checkpoint.restore(good)
    sidecar.write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(UserError, match="not a jcompress checkpoint"):
        checkpoint.restore(good)
    sidecar.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        checkpoint.restore(good)
    entry = {"path": ["model", "norm", "scale"], "type": "NoSuchLeaf", "static": {}, "children": {}}
    sidecar.write_text(json.dumps({**meta, "leaves": [entry]}))
    with pytest.raises(UserError, match="unknown leaf type 'NoSuchLeaf'"):
        checkpoint.restore(good)
    entry = {"path": ["model", "nope"], "type": "LowRank", "static": {}, "children": {}}
    sidecar.write_text(json.dumps({**meta, "leaves": [entry]}))
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.restore(good)
    sidecar.write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(good / "arrays")
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.restore(good)


def test_test_leaf_registered():
    assert LEAF_TYPES["_ScaledTestLeaf"] is _ScaledTestLeaf
