"""Attention implementations (jcompress.models.attention) against an independent oracle and
against each other, alone and inside every family's forward / KV-cache decode."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import ATTENTION_NAMES, SEQ, batch, make_model, real, save_model

import jcompress
from jcompress.errors import UserError
from jcompress.models import attention as A

# dtype -> (rtol-ish absolute tolerance on O(1) outputs)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

IMPLS = {
    "dense": A.Dense(),
    "chunked": A.Chunked(),
    "chunked_small_blocks": A.Chunked(block_q=4, block_k=3),
    "chunked_uneven": A.Chunked(block_q=5, block_k=8),
    # with row_blocks=0 an uncached causal call skips the row-block path (_causal_rows):
    # square blocks take the paired tiles (_causal_pairs), others the one-block loop
    "chunked_square": A.Chunked(block_q=4, block_k=4, row_blocks=0),
    "chunked_loop": A.Chunked(block_q=5, block_k=8, row_blocks=0),
}


def oracle(q, k, v, k_valid, q_offset=0, q_pos=None, k_pos=None, slopes=None, scale=None):
    """Plain numpy attention in float64: K/V repeated per query head, an explicit [B, T, S]
    mask (written without the module's helpers)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hk, axis=2)
    v = np.repeat(v, hq // hk, axis=2)
    scale = d**-0.5 if scale is None else scale
    sc = np.einsum("bthd,bshd->bhts", q, k) * scale
    if slopes is not None:
        rel = np.asarray(k_pos)[:, None, :] - np.asarray(q_pos)[:, :, None]  # [B, T, S]
        sc = sc + np.asarray(slopes)[None, :, None, None] * rel[:, None]
    allowed = (np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None])[None] & np.asarray(
        k_valid
    )[:, None, :]
    sc = np.where(allowed[:, None], sc, -np.inf)
    with np.errstate(invalid="ignore"):  # rows with no visible key: NaN, never compared
        sc = sc - sc.max(-1, keepdims=True)
        p = np.exp(sc)
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(b, t, s, hq, hk, d, dv=None, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hk, dv or d), dtype)
    return q, k, v


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "shape",
    [
        (2, 13, 13, 4, 4, 8, 8),  # MHA, length not a block multiple
        (2, 16, 16, 8, 2, 16, 16),  # GQA 4:1
        (1, 11, 11, 4, 1, 8, 5),  # MQA, Dv != D (EigenAttention's rank-r values)
    ],
)
def test_matches_oracle_with_padding(impl, shape):
    b, t, s, hq, hk, d, dv = shape
    q, k, v = _qkv(b, t, s, hq, hk, d, dv)
    valid = np.ones((b, s), bool)
    valid[-1, :3] = False  # left padding in the last row
    if b > 1:
        valid[0, -2:] = False  # right padding in the first row
    # jitted as the forward pass runs it (one compile per case, not one per eager op), the
    # mask built inside so its causal offset stays a static 0 (chunked_square: paired tiles)
    f = jax.jit(lambda q, k, v, valid: IMPLS[impl](q, k, v, A.causal_mask(valid), scale=d**-0.5))
    out = f(q, k, v, jnp.asarray(valid))
    ref = oracle(q, k, v, valid)
    rows = np.ones((b, t), bool)
    rows[-1, :3] = False  # queries with no visible key carry no meaning
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=TOL[jnp.float32])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_with_offset_alibi(impl):
    # 3 new queries written at cache slot 9 of a 16-slot cache; ALiBi over positions.
    b, t, s, hq, hk, d = 2, 3, 16, 4, 2, 8
    q, k, v = _qkv(b, t, s, hq, hk, d, seed=1)
    valid = np.zeros((b, s), bool)
    valid[:, :12] = True
    valid[1, :2] = False
    k_pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    q_pos = k_pos[:, 9:12]
    slopes = np.asarray([0.5, 0.25, 0.125, 0.0625], np.float32)
    mask = A.AttentionMask(
        k_valid=jnp.asarray(valid),
        q_offset=jnp.int32(9),
        q_pos=jnp.asarray(q_pos),
        k_pos=jnp.asarray(k_pos),
        alibi_slopes=jnp.asarray(slopes),
    )
    out = jax.jit(lambda q, k, v, m: IMPLS[impl](q, k, v, m, scale=0.3))(q, k, v, mask)
    ref = oracle(q, k, v, valid, 9, q_pos, k_pos, slopes, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL[jnp.float32])


@pytest.mark.parametrize("impl", ["chunked", "chunked_small_blocks"])
def test_bf16_matches_dense(impl):
    q, k, v = _qkv(2, 16, 16, 8, 2, 16, dtype=jnp.bfloat16, seed=3)
    mask = A.causal_mask(jnp.ones((2, 16), bool))
    out = IMPLS[impl](q, k, v, mask, scale=0.25)
    ref = A.Dense()(q, k, v, mask, scale=0.25)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[jnp.bfloat16]
    )


def test_chunked_long_sequence_small_memory():
    """4K tokens: chunked == dense, and its compiled temporaries are a small fraction of the
    dense [B, Hq, T, S] score tensor (XLA's own memory accounting, not wall time)."""
    b, t, hq, hk, d = 1, 4096, 2, 1, 8
    q, k, v = _qkv(b, t, t, hq, hk, d, seed=4)
    mask = A.causal_mask(jnp.ones((b, t), bool))

    def run(impl):
        f = jax.jit(lambda q, k, v: impl(q, k, v, mask, scale=d**-0.5))
        return f, f.lower(q, k, v).compile().memory_analysis()

    f_chunked, mem_chunked = run(A.Chunked())
    scores_bytes = b * hq * t * t * 4
    if mem_chunked is not None:  # backends without memory analysis skip the bound
        assert mem_chunked.temp_size_in_bytes < scores_bytes / 16
    # correctness on a strided subset of query rows (the oracle at 4K x 4K in fp64 is big)
    out = np.asarray(f_chunked(q, k, v))
    rows = np.arange(0, t, 257)
    ref = oracle(q[:, rows], k, v, np.ones((b, t), bool), scale=d**-0.5)
    # the oracle above treats row i as query index i: shift by using q_offset per row instead
    for j, r in enumerate(rows):
        one = oracle(q[:, r : r + 1], k, v, np.ones((b, t), bool), q_offset=int(r), scale=d**-0.5)
        ref[:, j] = one[:, 0]
    np.testing.assert_allclose(out[:, rows], ref, atol=TOL[jnp.float32])


def test_resolve_and_registry():
    assert isinstance(A.resolve("dense"), A.Dense)
    assert A.resolve(A.Chunked(block_q=8)) == A.Chunked(block_q=8)
    with pytest.raises(UserError, match=r"attention: unknown implementation 'flash'.*chunked"):
        A.resolve("flash")
    with pytest.raises(UserError, match="block_k: must be a positive integer"):
        A.Chunked(block_k=0)
    with pytest.raises(UserError, match="row_blocks: must be a non-negative integer"):
        A.Chunked(row_blocks=-1)

    @dataclasses.dataclass(frozen=True)
    class Other:
        def __call__(self, q, k, v, mask, *, scale, layer=None, state=None):
            return A.Dense()(q, k, v, mask, scale=scale)

    with pytest.raises(ValueError, match="already registered"):
        A.register_attention("dense")(Other)


def test_third_party_implementation_plugs_into_forward(llama_dir):
    """A new implementation registers by name and runs the whole model without edits to the
    decoder (the seam SpargeAttn uses), reading per-layer traced state by layer index."""
    calls = []

    @A.register_attention("test_scaled_dense")
    @dataclasses.dataclass(frozen=True)
    class ScaledDense:
        def __call__(self, q, k, v, mask, *, scale, layer=None, state=None):
            calls.append(layer)
            return A.Dense()(q, k, v, mask, scale=scale) * state["gain"][layer]

    try:
        cfg, params = jcompress.load_hf(llama_dir)
        ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
        ones = {"gain": jnp.ones((cfg.num_layers,))}
        out = jcompress.forward(
            cfg, params, ids, attention="test_scaled_dense", attention_state=ones
        )
        ref = jcompress.forward(cfg, params, ids, attention="dense")
        assert calls == list(range(cfg.num_layers))  # traced once per layer, with its index
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
        # the state is traced (no recompilation) and really reaches each layer
        zero_last = {"gain": ones["gain"].at[-1].set(0.0)}
        out2 = jcompress.forward(
            cfg, params, ids, attention="test_scaled_dense", attention_state=zero_last
        )
        assert len(calls) == cfg.num_layers
        assert not np.allclose(np.asarray(out2), np.asarray(ref), atol=1e-3)
        # the same through the KV-cache path
        kw = dict(max_new_tokens=3, eos_token_id=None)
        a = jcompress.generate(cfg, params, ids, attention="test_scaled_dense",
                               attention_state=ones, **kw)  # fmt: skip
        np.testing.assert_array_equal(
            np.asarray(a), np.asarray(jcompress.generate(cfg, params, ids, attention="dense", **kw))
        )
    finally:
        A.IMPLEMENTATIONS.pop("test_scaled_dense", None)


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module", params=ATTENTION_NAMES)
def tiny(request, tmp_path_factory):
    name = request.param
    d = save_model(make_model(name), tmp_path_factory.mktemp(name) / "m")
    cfg, params = jcompress.load_hf(d)
    return name, cfg, params


# The default "chunked" (one block at SEQ tokens) is what every family's forward runs in
# test_families / test_hf_io; here the multi-block loop and the paired-tiles path.
@pytest.mark.parametrize("impl", ["chunked_small_blocks", "chunked_square"])
def test_family_forward_equals_dense(tiny, impl):
    _, cfg, params = tiny
    ids, mask = batch()
    ref = np.asarray(jcompress.forward(cfg, params, ids, mask, attention="dense"))
    out = np.asarray(jcompress.forward(cfg, params, ids, mask, attention=IMPLS[impl]))
    for row in range(ids.shape[0]):
        np.testing.assert_allclose(real(out, mask, row), real(ref, mask, row), atol=5e-5)


def test_family_cached_steps_equal_full_forward(tiny):
    """Prefill then one token at a time through the KV cache (which holds final, rotated /
    normed / clipped keys behind dense k kernels) gives the logits of one uncached dense
    forward over the whole sequence (unpadded and left-padded rows). Small blocks, so the
    cached queries meet keys in several blocks at a traced offset (what `generate` runs)."""
    from jcompress.models.forward import forward_cached, init_cache

    _, cfg, params = tiny
    ids, mask = batch(seed=2)
    ids, mask = ids[:2, : SEQ - 4], mask[:2, : SEQ - 4]
    ref = np.asarray(jcompress.forward(cfg, params, ids, mask, attention="dense"))
    step = jax.jit(
        lambda p, i, m, c: forward_cached(cfg, p, i, m, c, attention=IMPLS["chunked_small_blocks"]),
    )
    n0 = ids.shape[1] - 3
    cache = init_cache(cfg, params, 2, ids.shape[1])
    logits, cache = step(params, jnp.asarray(ids[:, :n0]), jnp.asarray(mask[:, :n0]), cache)
    got = [np.asarray(logits)]
    for t in range(n0, ids.shape[1]):
        logits, cache = step(params, jnp.asarray(ids[:, t : t + 1]), jnp.ones((2, 1), bool), cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    for row in range(2):
        np.testing.assert_allclose(real(got, mask, row), real(ref, mask, row), atol=5e-5)


@pytest.mark.parametrize("blocks", [(64, 64), (8, 4), (4, 8)])
@pytest.mark.parametrize("t", [1, 2, 20])
def test_chunked_paths_with_cache_offset(blocks, t):
    """Single-pass (few queries) and tiled paths, queries written at a traced cache offset
    with key padding on both sides: blocks that straddle the diagonal, blocks fully visible
    and blocks in the future all occur."""
    b, s, hq, hk, d = 2, 40, 4, 2, 8
    q, k, v = _qkv(b, t, s, hq, hk, d, seed=5)
    off = 13
    valid = np.zeros((b, s), bool)
    valid[:, : off + t] = True
    valid[1, :5] = False  # left padding
    mask = A.causal_mask(jnp.asarray(valid), jnp.int32(off))
    impl = A.Chunked(block_q=blocks[0], block_k=blocks[1])
    out = jax.jit(lambda q, k, v, m: impl(q, k, v, m, scale=0.4))(q, k, v, mask)
    ref = oracle(q, k, v, valid, off, scale=0.4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL[jnp.float32])


@pytest.mark.parametrize(
    "t, blk, hq, hk, dv",
    [
        (16, 4, 4, 2, 8),  # 4 blocks: two pairs
        (13, 4, 4, 4, 8),  # 4 blocks, the last one partly padding
        (11, 4, 2, 1, 5),  # 3 blocks -> 4 (an all-padding block), MQA, Dv != D
        (40, 4, 4, 2, 8),  # 10 blocks: first members finish while second ones run on
        (9, 8, 4, 2, 8),  # 2 blocks: one pair, one step
    ],
)
def test_paired_tiles_path_matches_oracle(monkeypatch, t, blk, hq, hk, dv):
    """The batched diagonal + paired off-diagonal tiles (taken for an uncached causal call
    with square blocks) equal the float64 oracle with left and right key padding."""
    taken = []
    real_pairs = A._causal_pairs
    monkeypatch.setattr(A, "_causal_pairs", lambda *a: taken.append(a[-1]) or real_pairs(*a))
    b, d = 2, 8
    q, k, v = _qkv(b, t, t, hq, hk, d, dv, seed=t)
    valid = np.ones((b, t), bool)
    valid[0, -3:] = False  # right padding
    valid[1, :5] = False  # left padding: a whole first block of row 1 is padding
    impl = A.Chunked(block_q=blk, block_k=blk, row_blocks=0)
    out = jax.jit(lambda q, k, v, valid: impl(q, k, v, A.causal_mask(valid), scale=0.3))(
        q, k, v, jnp.asarray(valid)
    )
    assert taken == [blk]  # traced once, on the paired path
    ref = oracle(q, k, v, valid, scale=0.3)
    rows = np.ones((b, t), bool)
    rows[1, :5] = False  # queries with no visible key carry no meaning
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=TOL[jnp.float32])


def test_paired_tiles_path_bf16_and_other_paths_unchanged(monkeypatch):
    """bf16 on the paired path matches dense; a cache offset, ALiBi or non-square blocks keep
    the one-block-at-a-time loop (the paired path is never called for them)."""
    q, k, v = _qkv(2, 24, 24, 4, 2, 16, dtype=jnp.bfloat16, seed=7)
    mask = A.causal_mask(jnp.ones((2, 24), bool))
    out = A.Chunked(block_q=8, block_k=8, row_blocks=0)(q, k, v, mask, scale=0.25)
    ref = A.Dense()(q, k, v, mask, scale=0.25)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[jnp.bfloat16]
    )

    def boom(*a):
        raise AssertionError("paired path taken")

    monkeypatch.setattr(A, "_causal_pairs", boom)
    q, k, v = _qkv(1, 24, 24, 4, 2, 8, seed=8)
    ones = jnp.ones((1, 24), bool)
    A.Chunked(block_q=8, block_k=4, row_blocks=0)(q, k, v, A.causal_mask(ones), scale=0.3)
    A.Chunked(block_q=8, block_k=8)(q, k, v, A.causal_mask(ones, jnp.int32(0)), scale=0.3)
    pos = jnp.arange(24, dtype=jnp.int32)[None]
    alibi = A.AttentionMask(ones, 0, pos, pos, jnp.asarray([0.5, 0.25, 0.125, 0.0625]))
    A.Chunked(block_q=8, block_k=8, row_blocks=0)(q, k, v, alibi, scale=0.3)


@pytest.mark.parametrize(
    "t, blk, hq, hk, dv, alibi",
    [
        (16, 4, 4, 2, 8, False),  # GQA 2:1, 4 query blocks
        (13, 4, 4, 4, 8, True),  # MHA, the last block short, ALiBi
        (11, 4, 2, 1, 5, False),  # MQA, Dv != D
        (9, 8, 8, 2, 8, True),  # GQA 4:1, ALiBi, 2 blocks
    ],
)
def test_row_block_path_matches_oracle(monkeypatch, t, blk, hq, hk, dv, alibi):
    """The row-block path (an uncached causal call with at most ``row_blocks`` query
    blocks, ALiBi allowed) equals the float64 oracle with left and right key padding; longer
    inputs leave it."""
    taken = []
    real_rows = A._causal_rows
    monkeypatch.setattr(A, "_causal_rows", lambda *a: taken.append(a[-1]) or real_rows(*a))
    b, d = 2, 8
    q, k, v = _qkv(b, t, t, hq, hk, d, dv, seed=t + 100)
    valid = np.ones((b, t), bool)
    valid[0, -3:] = False  # right padding
    valid[1, :5] = False  # left padding
    pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    slopes = np.asarray([2.0 ** -(i + 1) for i in range(hq)], np.float32)
    mask = (
        A.AttentionMask(jnp.asarray(valid), 0, jnp.asarray(pos), jnp.asarray(pos),
                        jnp.asarray(slopes))
        if alibi
        else A.causal_mask(jnp.asarray(valid))
    )  # fmt: skip
    impl = A.Chunked(block_q=blk, block_k=blk)
    # the mask closed over, not an argument: its causal offset stays a static 0
    out = jax.jit(lambda q, k, v: impl(q, k, v, mask, scale=0.3))(q, k, v)
    assert taken == [blk]
    ref = oracle(q, k, v, valid, 0, *((pos, pos, slopes) if alibi else ()), scale=0.3)
    rows = np.ones((b, t), bool)
    rows[1, :5] = False  # queries with no visible key carry no meaning
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=TOL[jnp.float32])
    # bf16 on the same path matches dense
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = impl(qb, kb, vb, mask, scale=0.3)
    ref = A.Dense()(qb, kb, vb, mask, scale=0.3)
    assert out.dtype == jnp.bfloat16
    out, ref = (np.asarray(x, np.float32)[rows] for x in (out, ref))
    np.testing.assert_allclose(out, ref, atol=TOL[jnp.bfloat16])
    # more than row_blocks query blocks: another path
    taken.clear()
    A.Chunked(block_q=blk, block_k=blk, row_blocks=math.ceil(t / blk) - 1)(q, k, v, mask, scale=0.3)
    assert taken == []


def test_provider_imported_on_first_use(monkeypatch):
    """``attention="block_sparse"`` works without importing jcompress.sparge first: resolve
    imports the providing package (a stand-in import here, since another test may have
    imported the real one already), and each provider really registers its name."""
    import importlib

    for name, module in A.PROVIDERS.items():
        importlib.import_module(module)
        assert name in A.IMPLEMENTATIONS
    real = A.IMPLEMENTATIONS["block_sparse"]
    monkeypatch.delitem(A.IMPLEMENTATIONS, "block_sparse")
    imported = []

    def fake_import(module):
        imported.append(module)
        A.IMPLEMENTATIONS["block_sparse"] = real

    monkeypatch.setattr(A.importlib, "import_module", fake_import)
    assert isinstance(A.resolve("block_sparse"), real)
    assert imported == ["jcompress.sparge"]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_huge_scores_and_padding_stay_finite(impl):
    """Scores near the float32 range (|q . k| ~ 1e33) with left padding: every output is
    finite (a padding bias that overflowed to -inf would make whole rows NaN)."""
    b, t, hq, hk, d = 2, 12, 4, 2, 8
    q, k, v = _qkv(b, t, t, hq, hk, d, seed=11)
    q, k = jnp.abs(q) * 1e16, -jnp.abs(k) * 1e16  # every score about -1e32
    f = jax.jit(lambda q, k, v, valid: IMPLS[impl](q, k, v, A.causal_mask(valid), scale=0.35))
    for pad in (7, t):  # left padding longer than a small block; a batch row all padding
        valid = np.ones((b, t), bool)
        valid[1, :pad] = False
        out = np.asarray(f(q, k, v, jnp.asarray(valid)))
        assert np.isfinite(out).all(), pad
