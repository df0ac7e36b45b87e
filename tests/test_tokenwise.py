"""The tokenwise tool: save_xy caches, metrics, eval grid (seed JSON schema), smoothing, ranks.

Oracles: numpy (metrics, SVD truncation, SmoothQuant), torch forward hooks on the HF model
(cached X / Y and their HF names), the seed's documented JSON example (schema)."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jcompress.quant.tokenwise as tw  # noqa: E402
from jcompress.data import load_tokenizer  # noqa: E402
from jcompress.errors import UserError  # noqa: E402
from jcompress.models import load_hf  # noqa: E402
from jcompress.models.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402
from jcompress.quant.formats import fake_quant, parse_spec, parse_specs  # noqa: E402

SMALL = dict(cn=2, eu=2, length=16)


# ----------------------------------------------------------------------------- metrics


def _np_metrics(x, y, w, b=None, eps=1e-8):
    yh = x.astype(np.float64) @ w.astype(np.float64) + (0 if b is None else b)
    d = yh - y.astype(np.float64)
    l2 = np.sqrt((d**2).sum(1))
    rel = l2 / (np.sqrt((y.astype(np.float64) ** 2).sum(1)) + eps)
    sse, den = (d**2).sum(), (y.astype(np.float64) ** 2).sum()
    return {
        "nmse": sse / den,
        "sse": sse,
        "denom": den,
        "token_l2_mean": l2.mean(),
        "token_l2_max": l2.max(),
        "token_rel_l2_mean": rel.mean(),
        "token_rel_l2_max": rel.max(),
        "n_tokens": float(len(x)),
        "token_rel_l2_p95": np.quantile(rel, 0.95),
        "token_rel_l2_p99": np.quantile(rel, 0.99),
        "token_rel_l2_p999": np.quantile(rel, 0.999),
    }


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_metrics_match_numpy(chunk):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    w = rng.standard_normal((12, 9)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    y = x @ w + b
    ws = np.stack([w + 0.01 * rng.standard_normal(w.shape), w * 0.5]).astype(np.float32)
    got = tw.tokenwise_metrics(x, y, ws, b, chunk_tokens=chunk)
    for k in range(2):
        want = _np_metrics(x, y, ws[k], b)
        assert set(got[k]) == set(want) == set(tw.METRIC_KEYS)
        for key, v in want.items():
            assert got[k][key] == pytest.approx(v, rel=2e-4), key


def test_metrics_refuse_non_finite_tokens():
    """NaN / Inf anywhere in X or Y (here in the second chunk) is an error naming the first
    such token, never a NaN metric (nor a finite maximum that skipped it)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    y = x @ w
    bad_x, bad_y = x.copy(), y.copy()
    bad_x[13, 2], bad_y[9, 0] = np.nan, np.inf
    with pytest.raises(UserError, match=r"^tokenwise_metrics: X holds NaN / Inf \(token 13\)$"):
        tw.tokenwise_metrics(bad_x, y, w, chunk_tokens=8)
    with pytest.raises(UserError, match=r"^tokenwise_metrics: Y holds NaN / Inf \(token 9\)$"):
        tw.tokenwise_metrics(x, bad_y, w, chunk_tokens=8)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama(llama_dir):
    cfg, params = load_hf(llama_dir)
    config = tw.SaveXYConfig(**SMALL)
    windows = tw.representative_windows(load_tokenizer(llama_dir), config)
    return cfg, params, windows


@pytest.fixture(scope="module")
def caches(llama, tmp_path_factory):
    cfg, params, windows = llama
    root = tmp_path_factory.mktemp("xy")
    single = tw.save_xy(
        cfg,
        params,
        windows,
        root,
        "lm",
        progress=False,
        config=tw.SaveXYConfig(**SMALL, save_dtype="fp32"),
    )
    per = tw.save_xy(
        cfg,
        params,
        windows,
        root,
        "lm",
        progress=False,
        config=tw.SaveXYConfig(**SMALL, save_dtype="fp32", layout="per_layer"),
    )
    return single, per


SPECS = "nvfp4,fp4@in"


@pytest.fixture(scope="module")
def result(llama, caches):
    cfg, params, _ = llama
    config = tw.EvalConfig(
        ranks=(4, 8), qspecs=parse_specs(SPECS), grid_mode="full", chunk_tokens=24
    )
    return tw.eval_grid(cfg, params, tw.XYCache(caches[1]), config, progress=False)


# ----------------------------------------------------------------------------- save_xy


def test_windows_follow_the_seed_split(llama_dir):
    tok = load_tokenizer(llama_dir)
    c = tw.SaveXYConfig(cn=3, eu=5, length=16, seed=1)
    w = tw.representative_windows(tok, c)
    assert w.shape == (8, 16)
    np.testing.assert_array_equal(w, tw.representative_windows(tok, c))  # seeded
    assert not np.array_equal(
        w, tw.representative_windows(tok, tw.SaveXYConfig(cn=3, eu=5, length=16, seed=2))
    )
    cn_path, eu_path = tw.default_texts()
    assert "的" in cn_path.read_text() and "the" in eu_path.read_text()


def test_cache_layouts_read_back_equal_with_metadata(llama, caches):
    cfg, _, windows = llama
    single, per = tw.XYCache(caches[0]), tw.XYCache(caches[1])
    assert single.layout == "single" and per.layout == "per_layer"
    assert sorted(single.keys()) == sorted(per.keys())
    assert len(single.keys()) == 2 * 7 * cfg.num_layers
    for k in single.keys():
        np.testing.assert_array_equal(single.get(k), per.get(k))
    n = windows.size
    assert single.get("model.layers.3.mlp.down_proj.X").shape == (n, cfg.intermediate_size)
    for key, v in dict(
        seed="0", cn="2", eu="2", length="16", save_dtype="fp32", model_type="llama", num_layers="4"
    ).items():
        assert single.meta[key] == v
    assert per.meta["layout"] == "per_layer"
    names = sorted(p.name for p in caches[1].iterdir() if p.suffix == ".safetensors")
    assert names == [f"lm_{i}.safetensors" for i in range(4)]


def test_streamed_save_xy_equals_in_memory(llama, caches, llama_dir, tmp_path):
    from jcompress.streaming import GLOBAL, LayerLoader

    _, _, windows = llama
    loader = LayerLoader(llama_dir)
    config = tw.SaveXYConfig(**SMALL, save_dtype="fp32", layout="per_layer")
    out = tw.stream_save_xy(loader, windows, tmp_path, "lm", config=config, progress=False,
                            offload_dir=tmp_path)  # fmt: skip
    got, want = tw.XYCache(out), tw.XYCache(caches[1])
    assert got.meta == want.meta and sorted(got.keys()) == sorted(want.keys())
    for k in want.keys():
        np.testing.assert_allclose(got.get(k), want.get(k), rtol=1e-5, atol=1e-6, err_msg=k)
    # weights held: one layer (+ the embedding table while the windows were embedded)
    assert loader.peak_bytes <= loader.group_bytes[0] + loader.group_bytes[GLOBAL]
    assert loader.resident_bytes == 0


def test_cached_xy_equal_torch_hooks(llama, caches, llama_dir):
    """Independent oracle: transformers' own module names and forward hooks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, windows = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    seen = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith(("_proj",)) and ".layers." in name:
            hooks.append(
                mod.register_forward_hook(
                    lambda m, i, o, name=name: seen.setdefault(name, []).append(
                        (
                            i[0].reshape(-1, i[0].shape[-1]).numpy(),
                            o.reshape(-1, o.shape[-1]).numpy(),
                        )
                    )
                )
            )
    with torch.no_grad():
        model(torch.as_tensor(windows, dtype=torch.long))
    for h in hooks:
        h.remove()
    cache = tw.XYCache(caches[0])
    assert sorted(seen) == sorted({k[:-2] for k in cache.keys()})
    for name, [(x, y)] in seen.items():
        np.testing.assert_allclose(cache.get(f"{name}.X"), x, atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(cache.get(f"{name}.Y"), y, atol=2e-4, rtol=2e-4)


LAYER0_NAMES = {  # the HF module paths of layer 0's measured linears, written out
    "qwen3": {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    | {f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")},
    "gpt2": {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"}
    | {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"},
    "mpt": {"transformer.blocks.0.attn.Wqkv", "transformer.blocks.0.attn.out_proj"}
    | {"transformer.blocks.0.ffn.up_proj", "transformer.blocks.0.ffn.down_proj"},
}
BLOCKS = {"qwen3": {"self_attn", "mlp"}, "gpt2": {"attn", "mlp"}, "mpt": {"attn", "ffn"}}


@pytest.mark.parametrize("variant", ["qwen3", "gpt2", "mpt"])
def test_tiny_families_names_and_values(variant, tmp_path):
    """Qwen3 (q/k norms), GPT-2 (fused Conv1D c_attn measured as one HF module) and MPT (fused
    Wqkv, clip_qkv active: X / Y are the Wqkv module's own, before the clip)."""
    torch = pytest.importorskip("torch")
    import _tiny

    model = _tiny.make_model(variant)
    d = _tiny.save_model(model, tmp_path / "m")
    cfg, params = load_hf(d)
    ids = np.random.default_rng(0).integers(0, _tiny.VOCAB, (2, 8)).astype(np.int32)
    seen = {}
    names = {t.name for t in tw.targets(cfg)}
    assert {n for n in names if ".0." in n} == LAYER0_NAMES[variant]
    assert len(names) == len(LAYER0_NAMES[variant]) * cfg.num_layers
    mods = dict(model.named_modules())
    assert names <= set(mods), sorted(names - set(mods))
    hooks = [
        mods[n].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(
                n, (i[0].reshape(-1, i[0].shape[-1]).numpy(), o.reshape(-1, o.shape[-1]).numpy())
            )
        )
        for n in names
    ]
    with torch.no_grad():
        model(torch.as_tensor(ids, dtype=torch.long))
    for h in hooks:
        h.remove()
    out = tw.save_xy(
        cfg,
        params,
        ids,
        tmp_path,
        "c",
        progress=False,
        config=tw.SaveXYConfig(cn=1, eu=1, length=8, save_dtype="fp32"),
    )
    cache = tw.XYCache(out)
    if variant == "mpt":  # the clip is active: Y is Wqkv's output before it
        assert np.abs(seen["transformer.blocks.0.attn.Wqkv"][1]).max() > cfg.clip_qkv
    for n, (x, y) in seen.items():
        np.testing.assert_allclose(cache.get(f"{n}.X"), x, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(cache.get(f"{n}.Y"), y, atol=1e-4, rtol=1e-4)
    res = tw.eval_grid(
        cfg, params, cache, tw.EvalConfig(ranks=(2,), qspecs=parse_specs("nvfp4")), progress=False
    )
    tw.validate_result(res)
    blocks = {b for layer in res["by_layer"].values() for b in layer}
    assert blocks == BLOCKS[variant]


# ----------------------------------------------------------------------------- eval


def _check_seed_schema(res):
    """The seed's documented example, written out: meta keys, by_layer -> layer -> block ->
    {by_proj -> proj -> cfg -> metrics, agg -> cfg -> 3 numbers}."""
    assert {"xy_path", "xy_meta", "grid_mode", "ranks", "qspecs", "smooth", "chunk_tokens"} <= set(
        res["meta"]
    )
    assert set(res) == {"meta", "by_layer"}
    for layer, blocks in res["by_layer"].items():
        assert layer.isdigit()
        for body in blocks.values():
            assert set(body) == {"by_proj", "agg"}
            for c, a in body["agg"].items():
                assert set(a) == {"nmse_mean_over_proj", "nmse_max_over_proj", "n_proj"}
                assert isinstance(a["n_proj"], int)
                vals = [p[c]["nmse"] for p in body["by_proj"].values()]
                assert a["n_proj"] == len(vals)
                assert a["nmse_mean_over_proj"] == pytest.approx(sum(vals) / len(vals))
                assert a["nmse_max_over_proj"] == max(vals)
            for per in body["by_proj"].values():
                for m in per.values():
                    assert set(m) == set(tw.METRIC_KEYS)
    json.loads(json.dumps(res))


# The seed's documented output structure (seed 003, section 2.5), copied verbatim; its "..."
# stand for entries left out. The test below turns it into a template and checks a result
# against it, so the structure is read from the seed's own text, not from the code.
SEED_EXAMPLE = """
{
  "meta": {
    "xy_path": "...",
    "xy_meta": {"seed": "0", "cn": "50", ...},
    "grid_mode": "combined",
    "ranks": [16, 32],
    "qspecs": [["nvfp4", "128"]],
    "smooth": false,
    "chunk_tokens": 4096
  },
  "by_layer": {
    "0": {
      "self_attn": {
        "by_proj": {
          "q_proj": {
            "rank=16;fmt=nvfp4;blk=128": {"nmse": 0.001, ...},
            "rank=32;fmt=nvfp4;blk=128": {"nmse": 0.0006, ...}
          },
          "k_proj": { ... }
        },
        "agg": {
          "rank=16;fmt=nvfp4;blk=128": {
            "nmse_mean_over_proj": 0.0012,
            "nmse_max_over_proj": 0.0035,
            "n_proj": 4
          }
        }
      },
      "mlp": { ... }
    }
  }
}
"""
# dicts keyed by data (layer, block, projection, config) rather than by field name: the
# seed's Ranking-1 / Ranking-2 read by_layer[layer][block]["agg"][cfg] and
# by_layer[layer][block]["by_proj"][proj][cfg]
SEED_DATA_KEYED = {
    ("by_layer",): r"\d+",
    ("by_layer", "*"): r"self_attn|mlp",
    ("by_layer", "*", "*", "by_proj"): r"\w+",
    ("by_layer", "*", "*", "by_proj", "*"): "cfg",
    ("by_layer", "*", "*", "agg"): "cfg",
}


def _seed_template():
    text = re.sub(r",\s*\.\.\.\s*}", "}", SEED_EXAMPLE)  # {"nmse": 0.001, ...} -> {"nmse": 0.001}
    text = re.sub(r"{\s*\.\.\.\s*}", "{}", text)  # "k_proj": { ... } -> {}
    return json.loads(text)


def _conforms(ours, tmpl, path, cfg_re):
    """``ours`` has the template's structure: every field the template names (same JSON type,
    recursively), and data-keyed dicts whose keys have the template's form and whose entries
    all have the structure of the template's first entry."""
    where = "/".join(path) or "<root>"
    if isinstance(tmpl, dict):
        assert isinstance(ours, dict), where
        pattern = next(
            (v for k, v in SEED_DATA_KEYED.items() if len(k) == len(path)
             and all(a in ("*", b) for a, b in zip(k, path, strict=True))),
            None,
        )  # fmt: skip
        if pattern is None:  # named fields
            for k, v in tmpl.items():
                assert k in ours, f"{where}: missing {k!r}"
                _conforms(ours[k], v, (*path, k), cfg_re)
            return
        key_re = cfg_re if pattern == "cfg" else pattern
        assert re.fullmatch(key_re, next(iter(tmpl))), f"{where}: the seed's own key"
        entry = next((x for x in tmpl.values() if x), None)  # the first spelled-out entry
        assert ours, f"{where}: empty"
        for k, v in ours.items():
            assert re.fullmatch(key_re, k), f"{where}: key {k!r} is not of the form {key_re}"
            if entry is not None:
                _conforms(v, entry, (*path, k), cfg_re)
        return
    if isinstance(tmpl, list):
        assert isinstance(ours, list) and ours, where
        for x in ours:
            _conforms(x, tmpl[0], (*path, "[]"), cfg_re)
        return
    kind = {bool: bool, int: int, float: (int, float), str: str}[type(tmpl)]
    assert isinstance(ours, kind) and not (kind is int and isinstance(ours, bool)), (where, ours)


def test_result_has_the_seed_examples_structure(result):
    """Against the seed's literal example (above): meta fields with their types (xy_meta of
    strings, qspecs as [fmt, blk] string pairs, ranks of ints), layer -> block -> by_proj /
    agg, metric and agg entries. Config keys have the example's form
    ``rank=<int>;fmt=<fmt>;blk=<blk>``; grid_mode full adds the issue's two other forms
    (``rank=none;fmt=...``, ``rank=<int>;quant=none``)."""
    tmpl = _seed_template()
    combined = r"rank=\d+;fmt=[a-z0-9]+;blk=[a-z0-9]+"
    assert result["meta"]["grid_mode"] == "full"
    cfg_re = rf"{combined}|rank=none;fmt=[a-z0-9]+;blk=[a-z0-9]+|rank=\d+;quant=none"
    _conforms(result, tmpl, (), cfg_re)
    assert all(isinstance(v, str) for v in result["meta"]["xy_meta"].values())
    assert {"seed", "cn"} <= set(result["meta"]["xy_meta"])
    assert all(len(p) == 2 for p in result["meta"]["qspecs"])
    # the example's metric and agg entries, field for field
    agg = tmpl["by_layer"]["0"]["self_attn"]["agg"]["rank=16;fmt=nvfp4;blk=128"]
    ours = result["by_layer"]["0"]["self_attn"]
    for c in ours["agg"]:
        assert set(ours["agg"][c]) == set(agg)
    assert "nmse" in ours["by_proj"]["q_proj"]["rank=4;fmt=nvfp4;blk=na"]
    # the template check fails on a result that lost a field
    broken = json.loads(json.dumps(result))
    del broken["by_layer"]["0"]["mlp"]["agg"][c]["n_proj"]
    with pytest.raises(AssertionError, match="n_proj"):
        _conforms(broken, tmpl, (), cfg_re)
    broken = json.loads(json.dumps(result))
    broken["meta"]["ranks"] = ["4", "8"]
    with pytest.raises(AssertionError):
        _conforms(broken, tmpl, (), cfg_re)


def test_result_schema_and_keys(result):
    _check_seed_schema(result)
    keys = list(result["by_layer"]["0"]["self_attn"]["agg"])
    assert keys == [
        "rank=none;fmt=nvfp4;blk=na",
        "rank=none;fmt=fp4;blk=in",
        "rank=4;quant=none",
        "rank=8;quant=none",
        "rank=4;fmt=nvfp4;blk=na",
        "rank=4;fmt=fp4;blk=in",
        "rank=8;fmt=nvfp4;blk=na",
        "rank=8;fmt=fp4;blk=in",
    ]
    assert set(result["by_layer"]) == {"0", "1", "2", "3"}
    assert set(result["by_layer"]["0"]["mlp"]["by_proj"]) == {"gate_proj", "up_proj", "down_proj"}
    assert result["meta"]["qspecs"] == [["nvfp4", "na"], ["fp4", "in"]]
    tw.validate_result(result)


def test_values_match_an_independent_reconstruction(llama, caches, result):
    cfg, params, _ = llama
    cache = tw.XYCache(caches[0])
    name = "model.layers.1.self_attn.o_proj"
    x, y = cache.get(f"{name}.X"), cache.get(f"{name}.Y")
    w = np.asarray(params["model"]["layers"]["1"]["self_attn"]["o_proj"]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    lr8 = (u[:, :8] * s[:8]) @ vt[:8]
    spec = parse_spec("fp4@in")
    w_hat = lr8 + np.asarray(fake_quant(np.asarray(w - lr8, np.float32), spec), np.float64)
    per = result["by_layer"]["1"]["self_attn"]["by_proj"]["o_proj"]
    want = _np_metrics(x, y, w_hat)
    for k in ("nmse", "token_rel_l2_p99", "token_l2_max"):
        assert per["rank=8;fmt=fp4;blk=in"][k] == pytest.approx(want[k], rel=5e-3)
    lr_only = _np_metrics(x, y, lr8)
    assert per["rank=8;quant=none"]["nmse"] == pytest.approx(lr_only["nmse"], rel=1e-4)
    # more rank, less error (the low-rank-only configurations)
    assert per["rank=8;quant=none"]["nmse"] < per["rank=4;quant=none"]["nmse"]


def test_split_bf16_route_equals_the_fp32_route(llama, caches, result):
    """The exact bf16 split (configurations that factor: svd side path + NVFP4 residual, ranks
    0 and up, quant-only and rank-only keys of the full grid) gives the float32 route's
    metrics (the ``result`` fixture: ``auto`` is float32 on a CPU); fp4@in stays on the
    float32 route. SmoothQuant's float32 pieces: tests/test_split_gemm.py."""
    cfg, params, _ = llama
    cache = tw.XYCache(caches[1])
    # one chunk (the default) against the fixture's 24-token chunks: the metrics do not
    # depend on the chunking beyond float32 summation order (test_metrics_match_numpy)
    config = tw.EvalConfig(ranks=(4, 8), qspecs=parse_specs(SPECS), grid_mode="full",
                           gemm="split_bf16")  # fmt: skip
    got_all = tw.eval_grid(cfg, params, cache, config, progress=False)
    assert got_all["meta"]["gemm"] == "split_bf16" and result["meta"]["gemm"] == "auto"
    for layer, blocks in result["by_layer"].items():
        for block, v in blocks.items():
            for proj, by_cfg in v["by_proj"].items():
                for key, m in by_cfg.items():
                    got = got_all["by_layer"][layer][block]["by_proj"][proj][key]
                    # float32 rounding of Y~ (~1e-7 |Y|, the summation orders differ) is a
                    # larger share of a small error: looser where nmse is small (high rank)
                    rel = 2e-5 if m["nmse"] > 1e-3 else 1e-3
                    for k, want in m.items():
                        assert got[k] == pytest.approx(want, rel=rel, abs=1e-12), (proj, key, k)
    # a spec whose only rank is exact for some weights (64 = min(in, out) of k/v_proj): those
    # stay on the float32 route, the others take the split
    config = tw.EvalConfig(ranks=(64,), qspecs=parse_specs("nvfp4"), gemm="split_bf16")
    got = tw.eval_grid(cfg, params, cache, config, progress=False)
    for blocks in got["by_layer"].values():
        for v in blocks.values():
            for proj, by_cfg in v["by_proj"].items():
                assert 0 <= by_cfg["rank=64;fmt=nvfp4;blk=na"]["nmse"] < 1e-2, proj
    with pytest.raises(UserError, match="--gemm: must be one of auto, fp32, split_bf16"):
        tw.EvalConfig(ranks=(4,), qspecs=parse_specs("nvfp4"), gemm="bf16")


def test_streamed_eval_holds_one_layer_and_equals_in_memory(caches, result, llama_dir):
    """eval_grid from a LayerLoader: the loader's account never holds more than one decoder
    layer's tensors, each read is released before the next, and the result is the in-memory
    path's, bit for bit."""
    from jcompress.streaming import LayerLoader, layer_of

    class Watched(LayerLoader):
        def read(self, paths):
            paths = list(paths)
            assert self.resident_bytes == 0, "a layer was read before the last was released"
            layers.append({layer_of(self.cfg, p) for p in paths})
            out = super().read(paths)
            held.append(self.resident_bytes)
            return out

    layers, held = [], []
    loader = Watched(llama_dir)
    config = tw.EvalConfig(
        ranks=(4, 8), qspecs=parse_specs(SPECS), grid_mode="full", chunk_tokens=24
    )
    res = tw.eval_grid(loader.cfg, loader, tw.XYCache(caches[1]), config, progress=False)
    assert layers == [{i} for i in range(loader.cfg.num_layers)]  # one layer per read, in order
    for i, n in enumerate(held):
        assert 0 < n <= loader.group_bytes[i]
    assert loader.peak_bytes == max(held) and loader.resident_bytes == 0
    assert json.dumps(res, sort_keys=False) == json.dumps(result, sort_keys=False)


def test_open_weights_streams_safetensors_and_loads_a_torch_bin_whole(caches, llama_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    from jcompress.streaming import LayerLoader

    cfg, loader = tw.open_weights(llama_dir)
    assert isinstance(loader, LayerLoader) and loader.resident_bytes == 0  # nothing read yet
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    state = {k: torch.from_numpy(v) for k, v in load_file(llama_dir / "model.safetensors").items()}
    torch.save(state, d / "pytorch_model.bin")
    bcfg, params = tw.open_weights(d)
    assert bcfg == cfg and not isinstance(params, LayerLoader)  # no per-tensor reads: whole
    # the `result` fixture's grid: its compiled programs
    config = tw.EvalConfig(
        ranks=(4, 8), qspecs=parse_specs(SPECS), grid_mode="full", chunk_tokens=24
    )
    cache = tw.XYCache(caches[1])
    got = tw.eval_grid(bcfg, params, cache, config, progress=False)
    assert got == tw.eval_grid(cfg, loader, cache, config, progress=False)
    with pytest.raises(UserError, match="--model_dir: .* is not a model directory"):
        tw.open_weights(tmp_path)


def test_mpo_method_and_exact_rank(llama, caches):
    cfg, params, _ = llama
    res = tw.eval_grid(
        cfg,
        params,
        tw.XYCache(caches[1]),
        tw.EvalConfig(ranks=(64,), qspecs=parse_specs("nvfp4"), method="mpo", grid_mode="full"),
        progress=False,
    )
    per = res["by_layer"]["0"]["self_attn"]["by_proj"]
    assert per["k_proj"]["rank=64;quant=none"]["nmse"] < 1e-10  # rank = min(in, out): exact
    assert per["q_proj"]["rank=64;quant=none"]["nmse"] < 1e-10  # bond 64 = largest 2-core bond
    assert res["meta"]["method"] == "mpo"


def test_errors_before_work(llama, caches, opt_dir, tmp_path):
    cfg, params, _ = llama
    cache = tw.XYCache(caches[1])

    def evaluate(xy, params=params, cfg=cfg):  # rank 4 + nvfp4: enough to reach each check
        tw.eval_grid(cfg, params, xy, tw.EvalConfig(ranks=(4,), qspecs=parse_specs("nvfp4")),
                     progress=False)  # fmt: skip

    with pytest.raises(UserError, match=r"--ranks \(model.layers.0.self_attn.q_proj.*0\.\.128"):
        tw.eval_grid(
            cfg,
            params,
            cache,
            tw.EvalConfig(ranks=(129,), qspecs=parse_specs("nvfp4")),
            progress=False,
        )
    with pytest.raises(UserError, match="ranks must be >= 0"):
        tw.parse_ranks("8,-1")
    with pytest.raises(UserError, match=r"--ranks: has an empty entry in '8,,16'"):
        tw.parse_ranks("8,,16")
    with pytest.raises(UserError, match="--ranks: rank 8 is given twice"):
        tw.parse_ranks("8,08")
    assert tw.parse_ranks(" 8, 16 ") == (8, 16) and tw.parse_ranks("") == ()
    with pytest.raises(UserError, match="--qspecs"):
        parse_specs("nvfp4,bogus@7")
    with pytest.raises(UserError, match="combined needs both"):
        tw.EvalConfig(ranks=(4,), qspecs=())
    ocfg, oparams = load_hf(opt_dir)
    with pytest.raises(UserError, match="written for another model"):
        evaluate(cache, params=oparams, cfg=ocfg)
    # same architecture, other weights: the Y = X W spot check
    other = dict(params)
    lay = dict(other["model"]["layers"])
    l0 = {
        **lay["0"],
        "self_attn": {
            **lay["0"]["self_attn"],
            "q_proj": {
                "kernel": params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] * 2
            },
        },
    }
    other["model"] = {**other["model"], "layers": {**lay, "0": l0}}
    with pytest.raises(UserError, match="q_proj: cached Y differs from X W"):
        evaluate(cache, params=other)
    # a missing key
    f = SafetensorsFile(caches[0])
    keep = [k for k in f.keys() if k != "model.layers.2.mlp.up_proj.Y"]
    bad = tmp_path / "bad.safetensors"
    write_safetensors(
        bad,
        [(k, f.shape(k), f.dtype(k), (lambda k=k: f.get(k))) for k in keep],
        metadata=f.metadata,
    )
    with pytest.raises(UserError, match="no tensor model.layers.2.mlp.up_proj.Y"):
        evaluate(tw.XYCache(bad))
    # the spot check's tolerance: the cache's and the weights' rounding, not a flat 5%
    from jcompress.models.forward import layer_params
    from jcompress.quant.tokenwise.targets import layer_kernel
    from jcompress.quant.tokenwise.xy import spot_tolerance

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((8, 4)).astype(np.float32)
    wb = np.asarray(jnp.asarray(w32, jnp.bfloat16).astype(jnp.float32))
    assert spot_tolerance("fp32", w32) == 1e-3
    assert spot_tolerance("fp16", w32) == pytest.approx(8 * (2.0**-11 + 2.0**-24))
    assert spot_tolerance("bf16", w32) == pytest.approx(8 * (2.0**-8 + 2.0**-24))
    assert spot_tolerance("fp32", wb) == pytest.approx(8 * (2.0**-24 + 2.0**-8))
    t = tw.targets(cfg)[0]
    w, b = layer_kernel(layer_params(cfg, params, t.layer), t)
    cache.spot_check(t.name, jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), b)  # bf16 weights
    with pytest.raises(UserError, match="cached Y differs from X W"):  # the weights, 2% off
        cache.spot_check(t.name, w * (1 + 0.02 * rng.standard_normal(w.shape)), b)
    # NaN past the first tokens the spot check reads: found while measuring, named
    x = np.array(f.get("model.layers.1.mlp.down_proj.X"))
    x[-1, 3] = np.nan
    poisoned = tmp_path / "nan.safetensors"
    write_safetensors(
        poisoned,
        [(k, f.shape(k), f.dtype(k),
          (lambda k=k: x if k == "model.layers.1.mlp.down_proj.X" else f.get(k)))
         for k in f.keys()],
        metadata=f.metadata,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^--xy_path: model.layers.1.mlp.down_proj.X: the cache "
                       rf"holds NaN / Inf \(token {x.shape[0] - 1}\)$"):  # fmt: skip
        evaluate(tw.XYCache(poisoned))
    # a per-layer directory with a layer file missing
    gap = tmp_path / "gap"
    gap.mkdir()
    for i in (0, 1, 3):
        os.link(caches[1] / f"lm_{i}.safetensors", gap / f"lm_{i}.safetensors")
    with pytest.raises(UserError, match=r"lacks the files of layers \[2\]"):
        tw.XYCache(gap)


# ----------------------------------------------------------------------------- smoothing


def test_smooth_alpha_matches_numpy_and_smooth_model_dir(llama, caches, tmp_path):
    cfg, params, _ = llama
    cache = tw.XYCache(caches[0])
    spec = parse_spec("nvfp4")
    config = tw.EvalConfig(ranks=(0,), qspecs=(spec,))
    res = tw.eval_grid(
        cfg, params, cache, config, smoothing=tw.Smoothing(alpha=0.5), progress=False
    )
    assert res["meta"]["smooth"] is True
    _check_seed_schema(res)
    # numpy oracle for the gate/up group of layer 2
    lp = params["model"]["layers"]["2"]["mlp"]
    x = cache.get("model.layers.2.mlp.gate_proj.X").astype(np.float64)
    wg, wu = (np.asarray(lp[p]["kernel"], np.float64) for p in ("gate_proj", "up_proj"))
    s = np.abs(x).max(0) ** 0.5 / np.maximum(np.abs(wg).max(1), np.abs(wu).max(1)) ** 0.5
    w_hat = np.asarray(fake_quant(np.asarray(s[:, None] * wu, np.float32), spec), np.float64)
    want = _np_metrics(x / s, cache.get("model.layers.2.mlp.up_proj.Y"), w_hat)
    got = res["by_layer"]["2"]["mlp"]["by_proj"]["up_proj"]["rank=0;" + spec.key]
    assert got["nmse"] == pytest.approx(want["nmse"], rel=5e-3)

    # the seed's smoothed model: weights diag(s) W with smooth_factor buffers in the file
    from jcompress.models import save_hf
    from jcompress.models.convert import flatten, unflatten
    from jcompress.quant import smooth as sq

    flat = dict(flatten(params))
    factors = {}
    for t in tw.targets(cfg):
        group = [u for u in tw.layer_targets(cfg, t.layer) if u.group == t.group]
        xa = sq.absmax_rows(cache.get(f"{group[0].name}.X"))
        ws = [flat[f"model/layers/{t.layer}/{u.parts[0]}/kernel"] for u in group]
        factors[t.name] = np.asarray(sq.group_scales(xa, ws, 0.5))
    for t in tw.targets(cfg):
        k = f"model/layers/{t.layer}/{t.parts[0]}/kernel"
        flat[k] = np.asarray(params_kernel(params, t)) * factors[t.name][:, None]
    d = tmp_path / "smoothed"
    save_hf(cfg, unflatten(flat), d)
    f = SafetensorsFile(d / "model.safetensors")
    entries = [(k, f.shape(k), f.dtype(k), (lambda k=k: np.array(f.get(k)))) for k in f.keys()]
    entries += [
        (f"{n}.smooth_factor", v.shape, np.dtype(np.float32), (lambda v=v: v))
        for n, v in factors.items()
    ]
    write_safetensors(tmp_path / "w.safetensors", entries, metadata=f.metadata)
    os.replace(tmp_path / "w.safetensors", d / "model.safetensors")
    scfg, sparams, sf = tw.load_smoothed(d)
    assert set(sf) == set(factors)
    res2 = tw.eval_grid(
        scfg, sparams, cache, config, smoothing=tw.Smoothing(factors=sf), progress=False
    )
    got2 = res2["by_layer"]["2"]["mlp"]["by_proj"]["up_proj"]["rank=0;" + spec.key]
    assert got2["nmse"] == pytest.approx(got["nmse"], rel=1e-3)
    # streamed from the buffer-free copy (kept while the context lives): the same result
    with tw.open_smoothed(d) as (lcfg, loader, lf):
        res3 = tw.eval_grid(
            lcfg, loader, cache, config, smoothing=tw.Smoothing(factors=lf), progress=False
        )
        assert loader.resident_bytes == 0 and loader.peak_bytes > 0
        # without the factors the smoothed weights miss the cache: layer 0's check says so,
        # and the layer read for it is released
        with pytest.raises(UserError, match="layers.0.self_attn.q_proj: cached Y differs"):
            tw.eval_grid(lcfg, loader, cache, config, progress=False)
        assert loader.resident_bytes == 0
    assert res3 == res2
    with pytest.raises(UserError, match="missing for layer model.layers.0.self_attn.q_proj"):
        tw.eval_grid(
            scfg,
            sparams,
            cache,
            config,
            progress=False,
            smoothing=tw.Smoothing(
                factors={k: v for k, v in sf.items() if "layers.0.self_attn.q_proj" not in k}
            ),
        )


def test_smoothing_defaults_to_alpha_half_and_refuses_two_sources():
    assert tw.Smoothing() == tw.Smoothing(alpha=0.5)
    assert tw.Smoothing().source == "alpha" and tw.Smoothing().alpha == 0.5
    assert tw.Smoothing(alphas=(0.3, 0.7)).alpha is None  # a search: no default alpha
    assert tw.Smoothing(factors={"a": 1.0}).alpha is None
    with pytest.raises(UserError, match="at most one of --alpha, --alphas"):
        tw.Smoothing(alpha=0.5, alphas=(0.3,))
    with pytest.raises(UserError, match="at most one of"):
        tw.Smoothing(alphas=(0.3,), factors={"a": 1.0})
    with pytest.raises(UserError, match=r"--alpha: must be in \[0, 1\]"):
        tw.Smoothing(alpha=1.5)


def params_kernel(params, t):
    p = params["model"]["layers"][str(t.layer)]
    for part in t.parts[0].split("/"):
        p = p[part]
    return p["kernel"]


def test_alpha_search_picks_the_best_of_the_grid(llama, caches):
    cfg, params, _ = llama
    spec = parse_spec("nvfp4")
    res = tw.eval_grid(
        cfg,
        params,
        tw.XYCache(caches[0]),
        tw.EvalConfig(ranks=(0,), qspecs=(spec,)),
        smoothing=tw.Smoothing(alphas=(0.2, 0.8)),
        progress=False,
    )
    chosen = res["meta"]["smooth_alpha"]
    assert set(chosen.values()) <= {0.2, 0.8}
    assert chosen["model.layers.0.self_attn.q_proj"] == chosen["model.layers.0.self_attn.v_proj"]


# ----------------------------------------------------------------------------- rank


def test_rankings(result, tmp_path):
    r1 = tw.ranking1(result)
    vals = [r["nmse_mean_over_proj"] for r in r1]
    assert vals == sorted(vals) and r1[0]["rank"] == 1
    assert len(r1) == 4 * 2 * 8
    r2 = tw.ranking2(result)
    assert [r["nmse"] for r in r2] == sorted(r["nmse"] for r in r2)
    assert len(r2) == 4 * 7 * 8
    best = min(r2, key=lambda r: r["nmse"])
    assert r2[0]["nmse"] == best["nmse"]
    out = tw.write_rankings(result, tmp_path / "rk", by="max")
    assert {p.name for p in out.iterdir()} >= {
        "ranking1.csv",
        "ranking2.csv",
        "best_per_block.csv",
        "rankings.md",
        "heatmap.png",
    }
    head = (out / "ranking1.csv").read_text().splitlines()
    assert head[0] == "rank,layer,block,cfg,nmse_mean_over_proj,nmse_max_over_proj,n_proj"
    col = [float(line.split(",")[5]) for line in head[1:]]
    assert col == sorted(col)
    bad = json.loads(json.dumps(result))
    del bad["by_layer"]["1"]["mlp"]["agg"]["rank=4;quant=none"]
    with pytest.raises(UserError, match=r"by_layer\[1\]\[mlp\].agg lists other"):
        tw.validate_result(bad)
    bad = json.loads(json.dumps(result))
    bad["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"]["rank=4;quant=none"]["nmse"] = math.nan
    with pytest.raises(UserError, match="not finite"):
        tw.validate_result(bad)
    bad["by_layer"]["0"]["self_attn"]["by_proj"]["q_proj"]["rank=4;quant=none"]["nmse"] = -0.5
    with pytest.raises(UserError, match=r"q_proj\]\[rank=4;quant=none\].nmse is negative"):
        tw.validate_result(bad)
    bad = json.loads(json.dumps(result))
    bad["by_layer"]["1"]["mlp"]["agg"]["rank=4;quant=none"]["nmse_max_over_proj"] = "x"
    with pytest.raises(UserError, match=r"agg\[rank=4;quant=none\].nmse_max_over_proj is missing"):
        tw.validate_result(bad)
