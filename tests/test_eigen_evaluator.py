"""EigenAttention's candidate scoring (``compress._Evaluator``) on a tiny random Llama (GQA).

Oracle: each candidate layer is rebuilt here in float64 numpy (``W_h U_r U_r^T`` for K and V,
``U_r U_r^T W_o`` rows for o_proj) and scored with ``StreamLayer.relative_error`` (the
stream's own jitted error step, a code path the evaluator does not use). Checked: equal
errors, equal pass/fail decisions with the early exit on, ``exact`` after an early exit, and
no compilation per candidate rank (the statistics pass's layer executable is reused).
"""

from __future__ import annotations

import importlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import make_model

import jcompress
from jcompress.calibration import GroupedGram, stream_layers
from jcompress.eigen_attention import EigenAttentionConfig, compress
from jcompress.eigen_attention import eigen_core as core
from jcompress.leaves import HeadLowRank, materialize
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for

fwd = importlib.import_module("jcompress.models.forward")
ev_mod = importlib.import_module("jcompress.eigen_attention.compress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eigen-eval") / "hf"
    make_model("llama").save_pretrained(d)
    cfg, params = jcompress.load_hf(d)
    calib = np.random.RandomState(1).randint(0, cfg.vocab_size, (8, 16))
    lay = spec_for(cfg.family.value).layout
    hk, hq = cfg.num_kv_heads, cfg.num_heads
    capture = fwd.Capture(outputs=f"{re.escape(lay.k)}|{re.escape(lay.v)}")
    stream = stream_layers(cfg, params, calib, batch_size=3)  # 3 + 3 + 2 (padded) windows
    layer = next(stream)
    acc = {r: GroupedGram(n=8, avg_dim=1, heads=hk, dtype="float64") for r in (lay.k, lay.v)}
    for ob in layer.observe(capture):
        for role, a in acc.items():
            a.add((ob.captured["outputs"][role],), ob.real)
    u = {role: core.host_bases(a.gram)[0] for role, a in acc.items()}
    yield dict(cfg=cfg, params=params, lay=lay, layer=layer, capture=capture, u=u, hk=hk, hq=hq)
    stream.close()


def _evaluator(s, budget, host=None):
    lay, layer = s["lay"], s["layer"]
    d = s["u"][lay.k].shape[1]
    return ev_mod._Evaluator(
        layer, layer.params, *(s["u"][r] for r in (lay.k, lay.v)), cfg=s["cfg"],
        attention=fwd.DEFAULT_ATTENTION, capture=s["capture"], d_k=d, d_v=d, kv_heads=s["hk"],
        budget=budget, host=host, query_heads=s["hq"], kq_roles=(lay.k,), v_role=lay.v,
        o_role=lay.o,
    )  # fmt: skip


def _oracle_error(s, r_k: int, r_v: int) -> float:
    lay, layer, hk, hq = s["lay"], s["layer"], s["hk"], s["hq"]
    flat = dict(flatten(layer.params))
    proj = {}
    for role, r in ((lay.k, r_k), (lay.v, r_v)):
        ur = s["u"][role][:, :, :r]
        proj[role] = p = np.einsum("hdr,her->hde", ur, ur)  # [Hk, D, D]
        w = np.asarray(flat[f"{role}/kernel"], np.float64)
        wh = w.reshape(w.shape[0], hk, -1)
        flat[f"{role}/kernel"] = np.einsum("ihd,hde->ihe", wh, p).reshape(w.shape)
    wo = np.asarray(flat[f"{lay.o}/kernel"], np.float64)
    pq = np.repeat(proj[lay.v], hq // hk, axis=0)
    flat[f"{lay.o}/kernel"] = np.einsum("hde,heo->hdo", pq, wo.reshape(hq, pq.shape[1], -1))
    flat[f"{lay.o}/kernel"] = flat[f"{lay.o}/kernel"].reshape(wo.shape)
    for role in (lay.k, lay.v, lay.o):
        flat[f"{role}/kernel"] = np.float32(flat[f"{role}/kernel"])
    return float(layer.relative_error(unflatten(flat)))


def test_errors_decisions_and_no_recompile(setup):
    s = setup
    d = s["u"][s["lay"].k].shape[1]
    pairs = [(r_k, r_v) for r_k in (1, d // 2, d - 1, d) for r_v in (1, d // 2, d - 1)]
    oracle = {p: _oracle_error(s, *p) for p in pairs}
    layer_cache = fwd._apply_layer._cache_size()
    # the jitted float32 candidates (GPU/TPU) and the host float64 ones (CPU backend)
    device = _evaluator(s, budget=None, host=False)  # no early exit: every batch runs
    device(*pairs[0])  # compiles the masked layer and the sums once
    masked_cache = ev_mod._masked_layer._cache_size()
    full = _evaluator(s, budget=None, host=True)
    for p in pairs:
        assert device(*p) == pytest.approx(oracle[p], rel=2e-4, abs=1e-6), p
        assert full(*p) == pytest.approx(oracle[p], rel=2e-4, abs=1e-6), p
    assert fwd._apply_layer._cache_size() == layer_cache  # the observe executable, reused
    assert ev_mod._masked_layer._cache_size() == masked_cache
    assert full.count == len(pairs) and not full.partial
    assert full.batches == 3 * len(pairs)
    assert full(d, d) == 0.0 and full.count == len(pairs)  # the dense pair costs nothing

    # a budget inside the range of errors: decisions equal the full evaluation's, failures
    # far above it stop early with a lower bound, and exact() gives the full value
    errs = sorted(oracle.values())
    budget = 0.5 * (errs[len(errs) // 2] + errs[len(errs) // 2 + 1])
    early = _evaluator(s, budget=budget)
    for p in pairs:
        assert (early(*p) < budget) == (oracle[p] < budget), p
        assert early(*p) <= full(*p) * (1 + 1e-6)
    assert early.partial and early.batches < full.batches
    for p in early.partial.copy():
        assert early(*p) >= budget
        assert early.exact(*p) == pytest.approx(full(*p), rel=1e-6)
    assert not early.partial


def test_per_head_ranks(setup):
    """``per_head_ranks``: each KV head's leaf block is its own rank-``c_h`` orthogonal
    projection (padded to the max with zero columns), the reported error is the materialized
    layer's (recomputed here in float64), and the cached decoder agrees with the dense
    forward of the materialized params."""
    cfg, lay, hk = setup["cfg"], setup["lay"], setup["hk"]
    params = setup["params"]
    calib = np.random.RandomState(2).randint(0, cfg.vocab_size, (8, 16))
    config = EigenAttentionConfig(
        nsamples=8, seqlen=16, avg_dim=1, error_budget=0.2, batch_size=3, per_head_ranks=True
    )
    out, rep = compress(params, cfg, calib, config=config, progress=False)
    assert rep.per_head_ranks and "per-head ranks: each head keeps" in rep.to_markdown()
    assert any(lr.compressed for lr in rep.layers)
    h = np.asarray(jcompress.embed(cfg, params, jnp.asarray(calib)))
    for lr in rep.layers:
        lp0 = jcompress.layer_params(cfg, params, lr.layer)
        lp = jcompress.layer_params(cfg, out, lr.layer)
        y = np.asarray(jcompress.apply_layer(cfg, lp0, h, lr.layer), np.float64)
        if lr.compressed:
            assert lr.kv_after_per_head == sum(lr.head_ranks_kq) + sum(lr.head_ranks_v)
            assert lr.kv_after_per_head <= lr.kv_after
            for role, counts, width in (
                (lay.k, lr.head_ranks_kq, lr.rank_kq), (lay.v, lr.head_ranks_v, lr.rank_v),
            ):  # fmt: skip
                leaf = get_path(lp, role)["kernel"]
                assert isinstance(leaf, HeadLowRank) and leaf.rank == width == max(counts)
                w0 = np.asarray(get_path(lp0, role)["kernel"], np.float64)
                w = np.asarray(materialize(leaf), np.float64)
                d = w0.shape[1] // hk
                for head, c in enumerate(counts):
                    b = np.asarray(leaf.b[head], np.float64)  # [width, D]
                    assert np.all(b[c:] == 0) and np.linalg.matrix_rank(b[:c]) == c
                    p = b.T @ b  # the head's projector
                    np.testing.assert_allclose(p @ p, p, atol=1e-5)
                    blk = slice(head * d, (head + 1) * d)
                    np.testing.assert_allclose(w[:, blk], w0[:, blk] @ p, atol=1e-5)
            y2 = jcompress.apply_layer(cfg, materialize(lp), h, lr.layer)
            err = np.linalg.norm(np.asarray(y2, np.float64) - y) / np.linalg.norm(y)
            assert lr.error == pytest.approx(err, rel=1e-3) and lr.error < 0.2
        h = y.astype(np.float32)  # Feed.ORIGINAL: the next layer sees the original outputs
    # the padded latent cache decodes as the dense-equivalent model
    ids = jnp.asarray(calib[:2, :8])
    seq = np.asarray(jcompress.generate(cfg, out, ids, max_new_tokens=6, eos_token_id=None))
    logits = np.asarray(jcompress.forward(cfg, materialize(out), jnp.asarray(seq)))
    np.testing.assert_array_equal(seq[:, 8:], logits[:, 7:-1].argmax(-1))
    with pytest.raises(jcompress.UserError, match="per_head_ranks"):
        EigenAttentionConfig(nsamples=8, avg_dim=1, per_head_ranks=True, rank_search="bisect")
