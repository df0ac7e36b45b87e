"""SpargeAttn (jcompress.sparge): block selection against a loop-by-loop numpy oracle,
keep-everything == dense, causality, PV skip, prefill == decode through the model, every
family, save/load and errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import ATTENTION_NAMES, SEQ, batch, make_model, real, save_model
from jcompress.kernels.sparse_attention import BlockSizes

import jcompress
from jcompress import sparge
from jcompress.errors import UserError
from jcompress.models import attention as A
from jcompress.models.forward import forward_cached, init_cache

KEEP_ALL = (-1.0, 1.0, math.inf)
_select = jax.jit(sparge.select, static_argnames=("block_q", "block_k", "causal"))


def _qkv(b, t, s, hq, hk, d, dtype=jnp.float32, seed=0, dv=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hk, dv or d), dtype)
    return q, k, v


def dense_oracle(q, k, v, k_valid, q_offset=0, scale=None, causal=True):
    """float64 numpy attention with K/V repeated per query head and an explicit mask."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    k, v = np.repeat(k, hq // hk, axis=2), np.repeat(v, hq // hk, axis=2)
    scale = d**-0.5 if scale is None else scale
    sc = np.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = np.asarray(k_valid, bool)[:, None, :].repeat(t, 1)
    if causal:
        allowed = allowed & (np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None])[None]
    sc = np.where(allowed[:, None], sc, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def selection_oracle(q, k, k_valid, sim_thr, cdf_thr, bk, q_offset=0, scale=None):
    """Token-causal selection written as plain loops (float32 numpy), from the rules:
    key block j centred by the mean of the valid keys of blocks 0..j; similarity = mean cosine
    of the centred keys; candidates = similar blocks before the block of the query's own slot;
    softmax of q_t . mean(k_j) * scale over candidates; fewest blocks reaching cdf; plus
    block 0, the block of the query's own slot, and every fully visible non-similar block."""
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    valid = np.asarray(k_valid, bool)
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    g = hq // hk
    nk = -(-s // bk)
    scale = d**-0.5 if scale is None else scale
    keep = np.zeros((b, hq, t, nk), bool)
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, :, h // g]
            pooled, sim, has = [], [], []
            for j in range(nk):
                sl = slice(j * bk, min((j + 1) * bk, s))
                vk = kh[sl][valid[bi, sl]]
                prefix = kh[: min((j + 1) * bk, s)][valid[bi, : min((j + 1) * bk, s)]]
                has.append(len(vk) > 0)
                pooled.append(vk.mean(0) if len(vk) else np.zeros(d, np.float32))
                if len(vk):
                    c = vk - prefix.mean(0)
                    n = np.linalg.norm(c, axis=1, keepdims=True)
                    u = np.where(n > 1e-12, c / np.maximum(n, 1e-12), 0)
                    gram = u @ u.T
                    sim.append(gram.sum() / len(vk) ** 2)
                else:
                    sim.append(0.0)
            for ti in range(t):
                p = q_offset + ti
                diag = [j * bk <= p < (j + 1) * bk for j in range(nk)]
                full = [(j + 1) * bk - 1 <= p and not diag[j] for j in range(nk)]
                cand = [full[j] and has[j] and sim[j] > sim_thr[h] for j in range(nk)]
                chosen = set()
                cj = [j for j in range(nk) if cand[j]]
                if cj:
                    z = np.array([q[bi, ti, h] @ pooled[j] * scale for j in cj], np.float64)
                    pr = np.exp(z - z.max())
                    pr /= pr.sum()
                    order = np.argsort(-pr, kind="stable")
                    if cdf_thr[h] >= 1:
                        n = len(cj)
                    else:
                        cum = np.cumsum(pr[order])
                        n = min(len(cj), 1 + int(np.sum(cum < cdf_thr[h])))
                    chosen = {cj[o] for o in order[:n]}
                for j in range(nk):
                    vis = (full[j] or diag[j]) and has[j]
                    forced = j == 0 or diag[j] or (full[j] and has[j] and not sim[j] > sim_thr[h])
                    keep[bi, h, ti, j] = vis and (j in chosen or forced)
    return keep


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "shape,bk,offset",
    [((2, 40, 40, 4, 2, 16), 8, 0), ((1, 3, 37, 4, 1, 8), 4, 30)],  # GQA prefill; MQA decode
)
def test_selection_matches_loop_oracle(shape, bk, offset):
    b, t, s, hq, hk, d = shape
    q, k, _ = _qkv(b, t, s, hq, hk, d, seed=5)
    valid = np.ones((b, s), bool)
    valid[-1, :3] = False  # left padding
    valid[:, offset + t :] = False  # empty cache slots (decode)
    sim = np.array([-1.0, 0.0, 0.05, 0.9][:hq], np.float32)
    cdf = np.array([0.5, 0.8, 0.95, 1.0][:hq], np.float32)
    sel = _select(
        q, k, sim, cdf, block_q=16, block_k=bk, causal=True, scale=d**-0.5,
        k_valid=jnp.asarray(valid), q_offset=offset,
    )  # fmt: skip
    want = selection_oracle(q, k, valid, sim, cdf, bk, q_offset=offset)
    got = np.asarray(sel.keep)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert 0.1 < got.mean() < 0.9  # the case is neither trivially dense nor empty


def test_noncausal_block_selection_rules():
    """Upstream's block mode: non-similar query blocks keep every key block, non-similar key
    blocks are kept for every row, block 0 always kept; rows of a query block agree."""
    q, k, _ = _qkv(1, 32, 32, 2, 2, 8, seed=2)
    # query block 1 made of identical rows (similarity 1); block 0 random (low similarity)
    q = q.at[:, 8:16].set(q[:, 8:9])
    # key blocks: one direction per block plus small noise (similar after centring)
    base = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 1, 2, 8))
    k = (jnp.repeat(base, 8, axis=2).reshape(1, 32, 2, 8) + 0.05 * k) * 2.0
    sel = _select(q, k, jnp.array([0.5, 0.5]), jnp.array([0.3, 0.3]), block_q=8,
                        block_k=8, causal=False, scale=8**-0.5)  # fmt: skip
    keep = np.asarray(sel.keep)[0]  # [H, T, nK]
    for blk in range(4):
        rows = keep[:, blk * 8 : (blk + 1) * 8]
        assert (rows == rows[:, :1]).all()
    assert keep[:, :8].all()  # random query block 0: not similar -> dense rows
    assert keep[:, :, 0].all()
    assert not keep[:, 8:16].all()  # the similar block is sparse at cdf 0.3


# ---------------------------------------------------------------------------- dense equality


@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((2, 13, 13, 4, 4, 16), (4, 4)),  # lengths not block multiples
        ((2, 40, 40, 8, 2, 80), (16, 8)),  # GQA 4:1, head_dim 80
        ((1, 20, 20, 2, 1, 256), (8, 16)),  # MQA, head_dim 256
    ],
)
def test_keep_everything_equals_dense(shape, blocks, impl="xla"):
    b, t, s, hq, hk, d = shape
    q, k, v = _qkv(b, t, s, hq, hk, d)
    valid = np.ones((b, s), bool)
    valid[-1, :3] = False
    if b > 1:
        valid[0, -2:] = False
    out, st = sparge.attention(
        q, k, v, KEEP_ALL, block_sizes=BlockSizes(block_q=blocks[0], block_k=blocks[1]),
        implementation=impl, k_valid=jnp.asarray(valid),
    )  # fmt: skip
    ref = dense_oracle(q, k, v, valid)
    rows = np.ones((b, t), bool)
    rows[-1, :3] = False
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(st.kept), 1.0)
    np.testing.assert_allclose(np.asarray(st.pv_skip), 0.0)


def test_noncausal_keep_everything_equals_dense():
    q, k, v = _qkv(1, 19, 23, 4, 2, 16, seed=1)
    out, _ = sparge.attention(q, k, v, KEEP_ALL, causal=False,
                              block_sizes=BlockSizes(block_q=8, block_k=8))  # fmt: skip
    ref = dense_oracle(q, k, v, np.ones((1, 23), bool), causal=False)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


# ---------------------------------------------------------------------------- sparse behaviour


def _sparse_oracle(q, k, v, keep, pv, bk, scale):
    """Online softmax over kept blocks in ascending order, per row, with the PV-skip rule,
    written as loops (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    g = hq // hk
    out = np.zeros((b, t, hq, v.shape[-1]))
    skipped = 0
    for bi in range(b):
        for h in range(hq):
            for ti in range(t):
                m, l_, acc = -np.inf, 0.0, 0.0
                for j in np.nonzero(keep[bi, h, ti])[0]:
                    sl = np.arange(j * bk, min((j + 1) * bk, s))
                    sl = sl[sl <= ti]  # causal, no cache offset here
                    if len(sl) == 0:
                        continue
                    sc = k[bi, sl, h // g] @ q[bi, ti, h] * scale
                    ml = sc.max()
                    skip = np.isfinite(m) and ml < m - pv[h]
                    mn = max(m, ml)
                    corr = np.exp(m - mn) if np.isfinite(m) else 0.0
                    p = np.exp(sc - mn)
                    l_ = l_ * corr + p.sum()
                    acc = acc * corr + (0.0 if skip else p @ v[bi, sl, h // g])
                    skipped += int(skip)
                    m = mn
                out[bi, ti, h] = acc / l_
    return out, skipped


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_sparse_output_and_pv_skip_match_loop_oracle(impl):
    b, t, hq, hk, d, bk = 1, 48, 4, 2, 16, 8
    q, k, v = _qkv(b, t, t, hq, hk, d, seed=7)
    q = q * 3.0  # peaked attention: the PV skip has something to skip
    sim = jnp.array([-1.0, -1.0, 0.0, -1.0])
    cdf = jnp.array([0.5, 0.7, 0.9, 1.0])
    pv = jnp.array([2.0, 4.0, 1.0, math.inf])
    out, st = sparge.attention(q, k, v, (sim, cdf, pv), implementation=impl,
                               block_sizes=BlockSizes(block_q=16, block_k=bk))  # fmt: skip
    keep = np.asarray(
        _select(q, k, sim, cdf, block_q=16, block_k=bk, causal=True, scale=d**-0.5).keep
    )
    ref, n_skip = _sparse_oracle(q, k, v, keep, np.asarray(pv), bk, d**-0.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    st_skip = np.asarray(st.pv_skip) * keep.sum(axis=(0, 2, 3))
    assert n_skip > 0 and round(float(st_skip.sum())) == n_skip
    assert np.asarray(st.kept)[0] < 1.0 and np.asarray(st.pv_skip)[3] == 0.0


def test_outputs_up_to_t_ignore_later_tokens():
    """Changing every token after t (queries, keys, values) leaves outputs <= t unchanged,
    under real sparsity and PV skip (diagonal blocks use the element-wise causal mask; the
    key-gate centring and the pooled scores read only past keys)."""
    b, t, hq, hk, d = 1, 48, 4, 2, 16  # the shape and blocks of the loop-oracle test: no compile
    q, k, v = _qkv(b, t, t, hq, hk, d, seed=3)
    q2, k2, v2 = _qkv(b, t, t, hq, hk, d, seed=4)
    params = (jnp.array([-1.0, 0.0, 0.1, -1.0]), jnp.array([0.6, 0.8, 0.9, 0.7]),
              jnp.array([3.0, 3.0, math.inf, 2.0]))  # fmt: skip
    bs = BlockSizes(block_q=16, block_k=8)
    for cut in (5, 21, 40):  # mid-block positions
        qc, kc, vc = (jnp.concatenate([a[:, : cut + 1], a2[:, cut + 1 :]], 1)
                      for a, a2 in ((q, q2), (k, k2), (v, v2)))  # fmt: skip
        for impl in ("xla", "reference"):
            o1, s1 = sparge.attention(q, k, v, params, block_sizes=bs, implementation=impl)
            o2, _ = sparge.attention(qc, kc, vc, params, block_sizes=bs, implementation=impl)
            np.testing.assert_allclose(
                np.asarray(o1[:, : cut + 1]), np.asarray(o2[:, : cut + 1]), atol=1e-6
            )
            assert not np.allclose(np.asarray(o1[:, cut + 1 :]), np.asarray(o2[:, cut + 1 :]))
    assert float(jnp.mean(s1.kept)) < 0.95


def test_diagonal_block_is_causal():
    """Upstream's is_causal=False path lets a diagonal block see its future tokens. Here a
    huge value on a future key inside the same block must not reach earlier rows."""
    b, t, hq, d = 1, 16, 1, 8
    q, k, v = _qkv(b, t, t, hq, 1, d, seed=9)
    k = k.at[:, 7].set(q[:, 3, 0] * 50.0)  # key 7 would dominate query 3's attention
    v = v.at[:, 7].set(1e3)
    out, _ = sparge.attention(q, k, v, KEEP_ALL, block_sizes=BlockSizes(block_q=16, block_k=16))
    ref = dense_oracle(q, k, v, np.ones((b, t), bool))
    np.testing.assert_allclose(np.asarray(out)[:, :7], ref[:, :7], atol=1e-5)
    assert np.abs(np.asarray(out)[:, :7]).max() < 10


def test_bf16_close_to_f32():
    q, k, v = _qkv(1, 32, 32, 4, 2, 16, seed=11)
    p = (-1.0, 0.8, 3.0)
    bs = BlockSizes(block_q=16, block_k=8)
    o32, _ = sparge.attention(q, k, v, p, block_sizes=bs, implementation="xla")
    o16, _ = sparge.attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), p, block_sizes=bs,
                              implementation="xla")  # fmt: skip
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16, np.float32), np.asarray(o32), atol=5e-2)


# ---------------------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny GQA llama of tests/_tiny.py (2 layers, random O(1) weights): the checks below
    are structural (prefill == decode, perplexity == forward's NLLs, generate == dense), and
    half the layers of the trained llama-1m halve their compile time."""
    d = save_model(make_model("llama"), tmp_path_factory.mktemp("llama") / "m")
    return jcompress.load_hf(d)


def test_model_prefill_equals_decode(llama):
    """Logits of a full prefill == a short prefill then token-by-token KV-cache decode, with
    sparse thresholds (selection over cached key blocks)."""
    cfg, params = llama
    impl = sparge.BlockSparse(block_q=8, block_k=8, implementation="xla")
    p = sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads, simthreshd1=-1.0,
                                   cdfthreshd=0.5, pvthreshd=2.0)  # fmt: skip
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    full = np.asarray(jcompress.forward(cfg, params, ids, attention=impl, attention_state=p))
    dense = np.asarray(jcompress.forward(cfg, params, ids, attention="dense"))
    assert np.abs(full - dense).max() > 1e-3  # really sparse
    cache = init_cache(cfg, params, 2, 48)
    step = jax.jit(lambda x, c: forward_cached(cfg, params, x, jnp.ones(x.shape, bool), c, impl, p))
    logits, cache = step(jnp.asarray(ids[:, :20]), cache)
    outs = [np.asarray(logits)]
    for i in range(20, 40):
        logits, cache = step(jnp.asarray(ids[:, i : i + 1]), cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-4)


def test_perplexity_takes_the_thresholds_as_attention_state(llama):
    """perplexity(attention="block_sparse", attention_state=params) == the window NLLs computed
    from forward's logits under the same state (numpy log-softmax); two states, one compile."""
    from jcompress.eval import perplexity
    from jcompress.eval.perplexity import window_nll

    cfg, params = llama
    impl = sparge.BlockSparse(block_q=8, block_k=8, implementation="xla")
    # 2 windows of 40: forward under block_sparse runs the prefill test's program (no compile)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 2 * 40).astype(np.int32)
    loose = sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads, simthreshd1=-1.0,
                                       cdfthreshd=0.3)  # fmt: skip
    full = sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads, simthreshd1=-1.0,
                                      cdfthreshd=1.0, pvthreshd=1e9)  # fmt: skip
    got = {}
    for name, state in (("loose", loose), ("full", full)):
        res = perplexity(cfg, params, ids, seqlen=40, batch_size=2, progress=False,
                         attention=impl, attention_state=state)  # fmt: skip
        logits = np.asarray(jcompress.forward(cfg, params, ids.reshape(2, 40), attention=impl,
                                              attention_state=state), np.float64)  # fmt: skip
        logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, ids.reshape(2, 40)[:, 1:, None], -1)[..., 0].mean(-1)
        np.testing.assert_allclose(res.nlls, nll, rtol=1e-5)
        assert res.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-5)
        got[name] = res.ppl
    dense = perplexity(cfg, params, ids, seqlen=40, batch_size=2, progress=False).ppl
    assert got["full"] == pytest.approx(dense, rel=1e-5)  # keep-everything == dense
    assert abs(got["loose"] - dense) > 1e-4 * dense  # the state is really used
    if hasattr(window_nll, "_cache_size"):  # the thresholds are traced: no recompile
        before = window_nll._cache_size()
        perplexity(cfg, params, ids, seqlen=40, batch_size=2, progress=False, attention=impl,
                   attention_state=sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads,
                                                              cdfthreshd=0.5))  # fmt: skip
        assert window_nll._cache_size() == before


@pytest.fixture(scope="module", params=ATTENTION_NAMES)
def tiny(request, tmp_path_factory):
    name = request.param
    d = save_model(make_model(name), tmp_path_factory.mktemp(name) / "m")
    cfg, params = jcompress.load_hf(d)
    return name, cfg, params


def test_family_keep_everything_equals_dense(tiny):
    _, cfg, params = tiny
    ids, mask = batch()
    impl = sparge.BlockSparse(block_q=4, block_k=4, implementation="xla")
    p = sparge.SpargeParams.dense(cfg.num_layers, cfg.num_heads)
    ref = np.asarray(jcompress.forward(cfg, params, ids, mask, attention="dense"))
    out = np.asarray(jcompress.forward(cfg, params, ids, mask, attention=impl, attention_state=p))
    for row in range(ids.shape[0]):  # the 1e-5 (fp32), on the logits (max seen 2e-6)
        np.testing.assert_allclose(real(out, mask, row), real(ref, mask, row), atol=1e-5)
    assert ids.shape[1] == SEQ


def test_generate_with_default_thresholds(llama):
    cfg, params = llama
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    impl = sparge.BlockSparse(block_q=4, block_k=4, implementation="xla")
    p = sparge.SpargeParams.dense(cfg.num_layers, cfg.num_heads)
    kw = dict(max_new_tokens=5, eos_token_id=None)
    a = jcompress.generate(cfg, params, ids, attention=impl, attention_state=p, **kw)
    b = jcompress.generate(cfg, params, ids, attention="dense", **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------- params & errors


def test_params_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    p = sparge.SpargeParams.create(
        3, 4, simthreshd1=rng.uniform(-1, 1, (3, 4)), cdfthreshd=rng.uniform(0, 1, (3, 4)),
        pvthreshd=np.array([1.0, 2.0, math.inf, 0.0]),
    )  # fmt: skip
    path = sparge.save_params(tmp_path / "t.safetensors", p, model="m", extra={"block_k": 32})
    q, meta = sparge.load_params(path, layers=3, heads=4)
    for a, b in zip(p, q, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["model"] == "m" and meta["extra"] == {"block_k": 32}
    with pytest.raises(UserError, match="3 layers x 4 heads; the model has 4 layers x 8"):
        sparge.load_params(path, layers=4, heads=8)
    with pytest.raises(UserError, match="already exists"):
        sparge.save_params(path, p)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        sparge.load_params(tmp_path / "bad.safetensors")
    # another safetensors file (a model's weights): refused from its header, named briefly
    from safetensors.numpy import save_file

    weights = {f"model.layers.{i}.w": np.zeros((2, 2), np.float32) for i in range(6)}
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as e:
        sparge.load_params(tmp_path / "model.safetensors", arg="--tuned")
    msg = str(e.value)
    assert msg.startswith("--tuned: ") and "not a SpargeAttn thresholds file" in msg
    assert "... (6 in all)" in msg and "model.layers.5.w" not in msg
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cdfthreshd=1.5), r"cdfthreshd: 1.5 is out of range; allowed values are \[0.0, 1.0\]"),
        (dict(simthreshd1=-2.0), r"simthreshd1: -2 is out of range"),
        (dict(pvthreshd=-1.0), r"pvthreshd: -1 is out of range"),
        (dict(cdfthreshd=float("nan")), "cdfthreshd: NaN"),
        (dict(cdfthreshd=np.ones(3)), r"does not broadcast to \[layers, heads\] = \[2, 4\]"),
    ],
)
def test_bad_thresholds(kw, match):
    with pytest.raises(UserError, match=match):
        sparge.SpargeParams.create(2, 4, **kw)


def test_bad_block_sizes_and_implementation():
    with pytest.raises(UserError, match="block_k: must be an integer in"):
        sparge.BlockSparse(block_k=0)
    with pytest.raises(UserError, match="block_q: must be an integer in"):
        BlockSizes(block_q=2.5)
    with pytest.raises(UserError, match="implementation: 'cuda' is not one of"):
        sparge.BlockSparse(implementation="cuda")
    q, k, v = _qkv(1, 4, 4, 2, 1, 8)
    with pytest.raises(UserError, match="expected 2 per-head thresholds"):
        sparge.attention(q, k, v, (np.zeros(3), 1.0, math.inf))
    assert isinstance(A.resolve("block_sparse"), sparge.BlockSparse)


def test_raw_thresholds_are_range_checked_and_block_mask_shape():
    """Thresholds given as a raw triple get the same one-line range errors as SpargeParams;
    ``block_mask`` returns ``[B, Hq, nQ, nK]`` tiles, keep-everything keeps every causal tile."""
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (jax.random.normal(kk, (1, 32, 4, 16), jnp.float32) for kk in ks)
    for bad, needle in (((-1.5, 0.9, 1.0), "simthreshd1: -1.5 is out of range"),
                        ((0.5, 5.0, 1.0), "cdfthreshd: 5 is out of range"),
                        ((0.5, 0.9, -3.0), "pvthreshd: -3 is out of range"),
                        ((float("nan"), 0.9, 1.0), "simthreshd1: NaN")):  # fmt: skip
        with pytest.raises(UserError, match=needle):
            sparge.attention(q, k, v, bad)
        with pytest.raises(UserError, match=needle.split(":")[0]):
            sparge.block_mask(q, k, bad, block_q=8, block_k=8)
    m = sparge.block_mask(q, k, (-1.0, 1.0, float("inf")), block_q=8, block_k=8)
    assert m.shape == (1, 4, 4, 4) and m.dtype == jnp.bool_
    causal_tiles = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(np.asarray(m[0, 0]), causal_tiles)
