"""jcompress.chain: EigenAttention -> NVFP4 on the MLP kernels equals the two methods run by
hand; Tucker (tt) on K/Q/V -> quantized residual beats Tucker alone (numpy oracle); two methods
on disjoint paths commute; pre-flight errors name the step, path and leaf type before any
method runs; recipes are validated field by field (JSON and YAML); the chain report.

llama-1m from the shared data; one EigenAttention chain and one Tucker chain are shared through
module-scoped fixtures (8 calibration windows of 64 tokens)."""

from __future__ import annotations

import json
import os
import re
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress import data
from jcompress.compose import Chain, Step, load_recipe, parse_recipe, preflight
from jcompress.eigen_attention import EigenAttentionConfig
from jcompress.eigen_attention import compress as eigen_compress
from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, HeadFoldedOut, HeadLowRank, Residual
from jcompress.models.convert import flatten, unflatten
from jcompress.models.params import param_shapes
from jcompress.quant import QuantizedArray, fake_quant
from jcompress.quant.apply import QuantApplyConfig
from jcompress.quant.apply import compress as quant_compress
from jcompress.tucker import TTLinear, TuckerConfig

MLP = r"model/layers/\d+/mlp/.*"
KQV = r"model/layers/[01]/self_attn/(k|q|v)_proj"


@pytest.fixture(scope="module")
def llama(llama_dir, shared_data):
    cfg, params = jcompress.load_hf(llama_dir)
    tok = data.load_tokenizer(llama_dir)
    valid = data.load_tokens(shared_data / "wikitext-2" / "valid.txt", tok)
    calib = data.calibration_windows(valid, nsamples=8, seqlen=64, seed=2)
    return SimpleNamespace(cfg=cfg, params=params, calib=calib)


EIGEN = EigenAttentionConfig(
    nsamples=8, seqlen=64, avg_dim=2, error_budget=0.1, layers=("model/layers/[01]",)
)
NVFP4_MLP = QuantApplyConfig(rules=((MLP, "nvfp4"),))


def _dense_tree(tree):
    """{path: (type name, float32 numpy dense)} of every leaf."""
    out = {}
    for p, v in flatten(tree).items():
        d = v.materialize() if isinstance(v, CompressedLeaf) else v
        out[p] = (type(v).__name__, np.asarray(d, np.float32))
    return out


def _assert_same(a, b):
    da, db = _dense_tree(a), _dense_tree(b)
    assert da.keys() == db.keys()
    for p in da:
        assert da[p][0] == db[p][0], p
        np.testing.assert_array_equal(da[p][1], db[p][1], err_msg=p)


@pytest.fixture(scope="module")
def eigen_quant(llama):
    run = jcompress.chain([EIGEN, NVFP4_MLP])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run(llama.params, llama.cfg, llama.calib, progress=False)  # ppl: test_cli_run
    assert not [w for w in seen if "pre-flight plan" in str(w.message)]  # the plans held
    return out


def test_eigen_then_nvfp4_equals_by_hand(llama, eigen_quant):
    params, report = eigen_quant
    p1, _ = eigen_compress(llama.params, llama.cfg, llama.calib, config=EIGEN, progress=False)
    p2, _ = quant_compress(p1, config=NVFP4_MLP, progress=False)
    _assert_same(params, p2)
    flat = flatten(params)
    k = [v for p, v in flat.items() if p.endswith("self_attn/k_proj/kernel")]
    assert any(isinstance(v, HeadLowRank) for v in k)  # EigenAttention did compress
    mlp = {p: v for p, v in flat.items() if "/mlp/" in p and p.endswith("/kernel")}
    assert len(mlp) == 3 * llama.cfg.num_layers
    for p, v in mlp.items():
        assert isinstance(v, QuantizedArray)
        w = np.asarray(flatten(llama.params)[p])
        np.testing.assert_array_equal(
            np.asarray(v.materialize()), np.asarray(fake_quant(w, "nvfp4"))
        )
    ids = llama.calib[:2]
    logits = np.asarray(jcompress.forward(llama.cfg, params, ids))
    ref = np.asarray(jcompress.forward(llama.cfg, jcompress.materialize(params), ids))
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, ref, rtol=2e-4, atol=2e-4)
    # the input is untouched
    assert all(not isinstance(v, CompressedLeaf) for v in flatten(llama.params).values())


def test_chain_report(eigen_quant):
    _, report = eigen_quant
    js = json.loads(json.dumps(report.to_json()))
    assert [s["method"] for s in js["steps"]] == ["eigen_attention", "quant"]
    before, s0, s1 = js["before"], js["steps"][0], js["steps"][1]
    # sizes: EigenAttention shrinks the KV cache, NVFP4 the stored kernel bits
    assert s0["sizes"]["kv_bytes_per_token"] < before["sizes"]["kv_bytes_per_token"]
    assert s1["sizes"]["kv_bytes_per_token"] == s0["sizes"]["kv_bytes_per_token"]
    assert s1["sizes"]["kernel_bits_per_weight"] < s0["sizes"]["kernel_bits_per_weight"] < 32
    assert before["sizes"]["kernel_bits_per_weight"] == 32.0
    assert s1["sizes"]["param_bytes"] < s0["sizes"]["param_bytes"] < before["sizes"]["param_bytes"]
    assert before["ppl"] is None and s0["ppl"] is None  # no evaluation text given
    assert s0["report"]["layers"] and s1["report"]["n_layers"] == 12
    assert s1["config"]["rules"] == [[MLP, "rank=none;fmt=nvfp4;blk=na"]]
    md = report.to_markdown()
    assert "## Step 0: eigen_attention" in md and "## Step 1: quant" in md
    assert "| input |" in md and "KV bytes/token" in md


def test_quantized_eigen_factors_keep_the_fold(llama, eigen_quant):
    """quant apply on EigenAttention's k/v (HeadLowRank) and o (HeadFoldedOut): the factors
    are quantized, the structure kept, the folded forward equals the dense one."""
    params, _ = eigen_quant
    att = QuantApplyConfig(rules=((r"model/layers/\d+/self_attn/(k|v|o)_proj", "int8"),))
    q, rep = quant_compress(params, config=att, progress=False)
    flat, before = flatten(q), flatten(params)
    folded = 0
    for p, v in flat.items():
        if not p.endswith("kernel") or "self_attn" not in p or "q_proj" in p:
            continue
        old = before[p]
        if isinstance(old, HeadLowRank):
            assert isinstance(v, HeadLowRank) and isinstance(v.a, QuantizedArray)
            assert v.b is old.b  # the per-head bases stay (HeadFoldedOut holds them too)
            a = np.asarray(fake_quant(np.asarray(old.a), "int8"))
            h, r, d = np.asarray(old.b).shape
            oracle = np.einsum("ihr,hrd->ihd", a.reshape(-1, h, r), np.asarray(old.b))
            np.testing.assert_allclose(
                np.asarray(v.materialize()), oracle.reshape(-1, h * d), rtol=1e-5, atol=1e-6
            )
        elif isinstance(old, HeadFoldedOut):
            folded += 1
            assert isinstance(v, HeadFoldedOut) and isinstance(v.w, QuantizedArray)
            assert v.consumes_latent_values(flat[p.replace("o_proj", "v_proj")])
        else:
            assert isinstance(v, QuantizedArray)
    assert folded > 0
    assert {r.leaf for r in rep.layers} >= {"HeadLowRank", "HeadFoldedOut"}
    ids = llama.calib[:2]
    logits = np.asarray(jcompress.forward(llama.cfg, q, ids))  # folded rank-r values
    ref = np.asarray(jcompress.forward(llama.cfg, jcompress.materialize(q), ids))
    np.testing.assert_allclose(logits, ref, rtol=2e-4, atol=2e-4)
    # the latent KV cache (x @ Q(a)) decodes what the full forward predicts; prompt + new
    # tokens have the shape of ids, so the forward on them is the program compiled above
    prompt = ids[:, :58]
    out = np.asarray(jcompress.generate(llama.cfg, q, prompt, max_new_tokens=6))
    assert out.shape == (2, 64) and (out[:, :58] == prompt).all()
    again = np.asarray(jcompress.forward(llama.cfg, q, out))
    np.testing.assert_array_equal(again[:, 57:-1].argmax(-1), out[:, 58:])


@pytest.fixture(scope="module")
def tucker_residual(llama):
    # fixed bond ranks: one batched decomposition per kernel shape (mps_eps picks ranks per
    # matrix, each rank a program of its own; that rule is test_tucker's)
    tt = TuckerConfig(variant="tt", tt_ranks=(8, 8), layers=(KQV,))
    res = QuantApplyConfig(rules=((KQV, "residual=int4@32"),))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        both, report = jcompress.chain([tt, res])(llama.params, llama.cfg, progress=False)
    assert not [w for w in seen if "pre-flight plan" in str(w.message)]
    return both, report


def test_tucker_then_quantized_residual(llama, tucker_residual):
    both, report = tucker_residual
    orig, fb = flatten(llama.params), flatten(both)
    n = 0
    for p, w in orig.items():
        if not re.fullmatch(KQV + "/kernel", p):
            assert fb[p] is w  # untouched leaves are shared
            continue
        n += 1
        leaf = fb[p]
        assert isinstance(leaf, Residual) and isinstance(leaf.base, TTLinear)
        w = np.asarray(w, np.float64)
        t = np.asarray(leaf.base.materialize(), np.float64)  # what Tucker alone gives
        assert isinstance(leaf.residual, QuantizedArray)
        # numpy oracle: the residual is the quantized W - T, the sum beats T alone
        r = np.asarray(fake_quant(np.asarray(w - t, np.float32), "int4@32"), np.float64)
        np.testing.assert_allclose(np.asarray(leaf.residual.materialize()), r, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(leaf.materialize()), t + r, rtol=1e-5, atol=1e-6)
        err_t, err_tr = np.linalg.norm(w - t), np.linalg.norm(w - (t + r))
        assert err_tr < 0.5 * err_t, (p, err_t, err_tr)
    assert n == 3 * 2
    rows = report.steps[1].report.layers
    assert {r.leaf for r in rows} == {"TTLinear"} and all(
        r.config == "residual=int4@32" for r in rows
    )
    logits = np.asarray(jcompress.forward(llama.cfg, both, llama.calib[:2]))
    assert np.isfinite(logits).all()


def test_disjoint_steps_commute(llama):
    # tucker_residual's tt step (compiled already) on attention, NVFP4 on a layer's MLP
    tt = TuckerConfig(variant="tt", tt_ranks=(8, 8), layers=(KQV,))
    mlp0 = QuantApplyConfig(rules=((r"model/layers/0/mlp/.*", "nvfp4"),))
    a, _ = jcompress.chain([tt, mlp0])(llama.params, llama.cfg, progress=False)
    b, _ = jcompress.chain([mlp0, tt])(llama.params, llama.cfg, progress=False)
    _assert_same(a, b)
    kinds = {type(v).__name__ for v in flatten(a).values()}
    assert {"TTLinear", "QuantizedArray"} <= kinds


def test_preflight_errors_before_any_work(llama, opt_dir, monkeypatch):
    import jcompress.eigen_attention
    import jcompress.quant.apply
    import jcompress.tucker

    calls = []

    def spy(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} ran")

        return f

    for mod in (jcompress.tucker, jcompress.eigen_attention, jcompress.quant.apply):
        monkeypatch.setattr(mod, "compress", spy(mod.__name__))
    tt_k = TuckerConfig(variant="tt", layers=(r"model/layers/\d+/self_attn/k_proj",))
    cases = [
        (
            [tt_k, EIGEN],
            r"step 1 \(eigen_attention\): params: model/layers/0/self_attn/k_proj/kernel is a "
            r"TTLinear; EigenAttention needs dense k/q/v/o kernels",
        ),
        (
            [tt_k, QuantApplyConfig(rules=((r".*/k_proj", "nvfp4"),))],
            r"step 1 \(quant\): params: model/layers/0/self_attn/k_proj/kernel is a TTLinear;"
            r".*residual=SPEC",
        ),
        (
            [QuantApplyConfig(rules=((r".*/k_proj", "residual=nvfp4"),))],
            r"step 0 \(quant\): params: model/layers/0/self_attn/k_proj/kernel is a dense array",
        ),
        (
            [EIGEN, QuantApplyConfig(rules=((r".*/v_proj", "rank=4;fmt=nvfp4;blk=na"),))],
            r"step 1 \(quant\): params: model/layers/0/self_attn/v_proj/kernel is a "
            r"(dense array|HeadLowRank)",
        ),
        (
            [EIGEN, TuckerConfig(variant="tucker", layers=(KQV,))],
            r"step 1 \(tucker\): params: model/layers/0/self_attn/k_proj/kernel is a HeadLowRank",
        ),
        (
            [NVFP4_MLP, QuantApplyConfig(rules=((MLP, "int8"),))],
            r"step 1 \(quant\): params: model/layers/0/mlp/gate_proj/kernel is a QuantizedArray",
        ),
        ([tt_k, TuckerConfig(layers=(r"nothing/\d+",))], r"step 1 \(tucker\): layers: rule"),
    ]
    for steps, msg in cases:
        with pytest.raises(UserError, match=msg):
            jcompress.chain(steps)(llama.params, llama.cfg, llama.calib, progress=False)
    assert calls == []
    # the same check on shapes alone (what `jcompress run` does before loading weights)
    shapes = unflatten(
        {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(llama.cfg).items()}
    )
    with pytest.raises(UserError, match="is a TTLinear"):
        preflight(jcompress.chain([tt_k, EIGEN]).steps, shapes, llama.cfg)
    after = preflight(jcompress.chain([EIGEN, NVFP4_MLP]).steps, shapes, llama.cfg)
    k = after["model/layers/0/self_attn/k_proj/kernel"]
    assert {t.__name__ for t in k.types} == {"Dense", "HeadLowRank"}
    # OPT (no RoPE): EigenAttention also writes q_proj, on shapes alone
    from jcompress.models import read_config

    opt = read_config(opt_dir)
    opt_shapes = unflatten(
        {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(opt).items()}
    )
    q_rank = QuantApplyConfig(rules=((r".*/q_proj", "rank=4;quant=none"),))
    with pytest.raises(UserError, match=r"step 1 \(quant\): params: model/decoder/layers/0/"
                       r"self_attn/q_proj/kernel is a HeadLowRank"):  # fmt: skip
        eigen_opt = EigenAttentionConfig(layers=(r"model/decoder/layers/\d+",))
        preflight(jcompress.chain([eigen_opt, q_rank]).steps, opt_shapes, opt)
    preflight(jcompress.chain([q_rank]).steps, opt_shapes, opt)  # dense q: fine
    with pytest.raises(UserError, match=r"calib: step 0 \(eigen_attention\) needs calibration"):
        jcompress.chain([EIGEN])(llama.params, llama.cfg, None)


def test_recipe_validation(tmp_path):
    good = [
        {"method": "eigen", "error_budget": 0.05, "avg_dim": 2, "layers": ["model/layers/0"]},
        {"method": "tucker", "variant": "tt", "tt_ranks": [4, 4], "layers": [KQV]},
        {"method": "quant", "rules": {MLP: "nvfp4", KQV: "residual=int8"}},
        {"method": "sparge", "sim_grid": 2},
    ]
    steps = parse_recipe(good)
    assert [s.method for s in steps] == ["eigen_attention", "tucker", "quant", "sparge"]
    assert steps[0].config == EigenAttentionConfig(
        error_budget=0.05, avg_dim=2, layers=("model/layers/0",)
    )
    assert steps[1].config.tt_ranks == (4, 4)
    assert [c.key for _, c in steps[2].config.rules] == [
        "rank=none;fmt=nvfp4;blk=na",
        "residual=int8",
    ]
    # a chain's recipe round-trips; JSON and YAML files read the same
    assert parse_recipe(Chain(steps).to_json()) == steps
    (tmp_path / "r.json").write_text(json.dumps({"steps": good}))
    assert load_recipe(tmp_path / "r.json") == steps
    yaml = pytest.importorskip("yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    assert load_recipe(tmp_path / "r.yaml") == steps
    bad = [
        (
            [{"method": "wanda"}],
            r"step 0: method: unknown method 'wanda'; allowed: eigen_attention, quant, sparge, "
            "tucker",
        ),
        ([{"method": "ged"}], r"step 0: method: 'ged' cannot be chained: GED is an analysis"),
        (
            [good[0], {"method": "tucker", "rank": 3}],
            r"step 1 \(tucker\): unknown field 'rank'; allowed: variant, mps_eps",
        ),
        (
            [{"method": "tucker", "variant": "cp"}],
            r"step 0 \(tucker\): variant: must be one of tt, tucker, tucker_mps",
        ),
        (
            [{"method": "eigen", "error_budget": 2}],
            r"step 0 \(eigen_attention\): error_budget: must be in \(0, 1\)",
        ),
        (
            [{"method": "eigen", "error_budget": "abc"}],
            r"step 0 \(eigen_attention\): error_budget: must be a number, got 'abc'",
        ),
        (
            [{"method": "eigen", "layers": 5}],
            r"step 0 \(eigen_attention\): layers: must be a regex or a list of regexes, got 5",
        ),
        (
            [{"method": "eigen", "error_budget": [0.1]}],
            r"step 0 \(eigen_attention\): error_budget: expected a single value",
        ),
        (
            [{"method": "quant", "rules": {MLP: "fp5"}}],
            r"step 0 \(quant\): rules: bad quantization spec 'fp5'",
        ),
        ([{"method": "quant"}], r"step 0 \(quant\): quant needs rules"),
        (
            [{"method": "quant", "rules": [[MLP, "nvfp4"]], "bits": 4}],
            r"step 0 \(quant\): unknown keys \['bits'\]",
        ),
        (
            [{"method": "sparge"}, good[0]],
            r"step 0 \(sparge\) tunes an attention setting .* last step",
        ),
        ([{"error_budget": 0.1}], r"step 0: no 'method'"),
        (
            [{"method": "eigen", "nsamples": 64}],
            r"step 0 \(eigen_attention\): nsamples: the calibration windows are set once for "
            r"the whole chain .*allowed fields here: avg_dim, error_budget",
        ),
        (
            [{"method": "tucker", "allow_unmatched": "yes"}],
            r"step 0 \(tucker\): allow_unmatched: must be true or false, got 'yes'",
        ),
        ([], r"recipe: no steps"),
        ("eigen", r"recipe: expected a list of steps"),
    ]
    for recipe, msg in bad:
        with pytest.raises(UserError, match=msg):
            parse_recipe(recipe)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(UserError, match=r"recipe: .*bad.json is not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(UserError, match=r"expected a \.json, \.yaml or \.yml file"):
        load_recipe(_touch(tmp_path / "r.txt"))
    with pytest.raises(UserError, match="steps: step 0: expected a Step"):
        jcompress.chain([3])
    assert jcompress.chain([("quant", NVFP4_MLP)]).steps == (Step("quant", NVFP4_MLP),)


def _touch(p):
    p.write_text("[]")
    return p


def test_sparge_step_carries_its_thresholds(llama):
    from jcompress.sparge import SpargeParams
    from jcompress.sparge.api import BlockSparse
    from jcompress.sparge.tune import SpargeTuneConfig

    tune = SpargeTuneConfig(
        nsamples=2, seqlen=64, block_q=16, block_k=16, sim_grid=2, cdf_steps=2, pv_steps=0,
        batch_size=2,
    )  # fmt: skip
    mlp0 = QuantApplyConfig(rules=((r"model/layers/0/mlp/.*", "nvfp4"),))
    params, report = jcompress.chain([mlp0, tune])(
        llama.params, llama.cfg, llama.calib[:2], progress=False
    )
    assert report.steps[1].method == "sparge" and len(report.steps[0].report.layers) == 3
    state = report.attention_state
    assert isinstance(state, SpargeParams)
    assert np.shape(state[0]) == (llama.cfg.num_layers, llama.cfg.num_heads)
    assert isinstance(report.attention, BlockSparse) and report.attention.block_q == 16
    assert flatten(params).keys() == flatten(llama.params).keys()  # params as step 0 left them
    js = json.loads(json.dumps(report.to_json()))
    assert js["attention_state"]["shape"] == [4, 8]
    assert js["attention_state"]["attention"]["block_k"] == 16
    logits = jcompress.forward(
        llama.cfg, params, llama.calib[:1], attention="block_sparse", attention_state=state
    )
    assert np.isfinite(np.asarray(logits)).all()


def test_a_stale_plan_is_reported(llama, monkeypatch):
    """A step writing a leaf type its plan did not announce: a warning naming step and path."""
    import dataclasses

    from jcompress.compose import REGISTRY

    entry = REGISTRY["quant"]
    monkeypatch.setitem(REGISTRY, "quant", dataclasses.replace(entry, plan=lambda c, k, lv: {}))
    mlp0 = QuantApplyConfig(rules=((r"model/layers/0/mlp/down_proj", "int8"),))
    with pytest.warns(UserWarning, match=r"step 0 \(quant\) wrote a QuantizedArray at "
                      r"model/layers/0/mlp/down_proj/kernel; its pre-flight plan predicted "
                      r"dense array"):  # fmt: skip
        jcompress.chain([mlp0])(llama.params, llama.cfg, progress=False)
