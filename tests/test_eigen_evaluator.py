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

import numpy as np
import pytest
from _tiny import make_model

import jcompress
from jcompress.calibration import GroupedGram, stream_layers
from jcompress.eigen_attention import eigen_core as core
from jcompress.models.convert import flatten, unflatten
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
    yield dict(cfg=cfg, lay=lay, layer=layer, capture=capture, u=u, hk=hk, hq=hq)
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
