"""quant apply: rule / cfg-key grammar, the transform against an oracle (numpy SVD + the
fake-quant reference), purity, selection errors, the forward pass on llama-1m and opt-1m, and
the CLI end to end (report JSON + markdown, factors reloadable, perplexity before/after)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress.cli import main
from jcompress.errors import UserError
from jcompress.leaves import LowRank, Residual
from jcompress.models.convert import flatten
from jcompress.quant import QuantizedArray, QuantSpec, fake_quant
from jcompress.quant.apply import (
    LayerChoice,
    QuantApplyConfig,
    compress,
    parse_choice,
    parse_rule,
)


def test_choice_grammar():
    assert parse_choice("nvfp4") == LayerChoice(None, QuantSpec("nvfp4"))
    assert parse_choice("rank=16;fmt=nvfp4;blk=na") == LayerChoice(16, QuantSpec("nvfp4"))
    assert parse_choice("rank=none;fmt=fp4;blk=in") == LayerChoice(None, QuantSpec("fp4", "in"))
    assert parse_choice("rank=8;quant=none") == LayerChoice(8, None)
    assert parse_choice("fmt=fp4;blk=128").key == "rank=none;fmt=fp4;blk=128"
    assert parse_choice("none") == LayerChoice()
    # rank 0 (eval_fake --ranks 0: no low-rank branch), so the pipeline takes its own keys
    assert parse_choice("rank=0;fmt=nvfp4;blk=na") == LayerChoice(None, QuantSpec("nvfp4"))
    assert parse_choice("rank=0;quant=none") == LayerChoice()
    assert parse_rule("a/.*=rank=0;quant=none") == ("a/.*", LayerChoice())
    for key in ("rank=16;fmt=nvfp4;blk=na", "rank=none;fmt=fp4;blk=in", "rank=8;quant=none"):
        assert parse_choice(key).key == key  # the tokenwise cfg keys round-trip
    assert parse_rule(r"model/layers/\d+/mlp/.*=rank=4;fmt=int4;blk=32") == (
        r"model/layers/\d+/mlp/.*",
        LayerChoice(4, QuantSpec("int4", 32)),
    )
    for bad in (
        "rank=-1;fmt=nvfp4",
        "rank=x;fmt=nvfp4",
        "rank=4;quant=fp4",
        "fmt=fp5",
        "rank=none;quant=none",
        "blk=in",
        "speed=9;fmt=nvfp4",
        "fp4",
    ):
        with pytest.raises(UserError):
            parse_choice(bad)
    with pytest.raises(UserError, match="REGEX=CONFIG"):
        parse_rule("model/layers/(=nvfp4")
    with pytest.raises(UserError, match="at least one"):
        QuantApplyConfig(rules=())
    c = QuantApplyConfig.from_json({"rules": [["a", "nvfp4"]], "allow_unmatched": True})
    assert c.rules == (("a", LayerChoice(None, QuantSpec("nvfp4"))),) and c.allow_unmatched
    with pytest.raises(UserError, match="unknown keys"):
        QuantApplyConfig.from_json({"rules": [], "nope": 1})


@pytest.fixture(scope="module")
def llama(llama_dir):
    return jcompress.load_hf(llama_dir)


RULES = (
    (r"model/layers/0/self_attn/q_proj", "none"),  # exempt from the next rule
    (r"model/layers/0/self_attn/.*", "rank=4;fmt=fp4;blk=64"),
    (r"model/layers/1/mlp/.*", "nvfp4"),
    (r"model/layers/2/mlp/down_proj", "rank=8;quant=none"),
)


@pytest.fixture(scope="module")
def applied(llama):
    cfg, params = llama
    new, report = compress(params, cfg, config=QuantApplyConfig(rules=RULES), progress=False)
    return new, report


def test_apply_matches_oracle(llama, applied):
    cfg, params = llama
    new, report = applied
    old, got = flatten(params), flatten(new)
    changed = {k for k in got if got[k] is not old[k]}
    want_paths = (
        {f"model/layers/0/self_attn/{p}_proj/kernel" for p in "kvo"}
        | {f"model/layers/1/mlp/{p}_proj/kernel" for p in ("gate", "up", "down")}
        | {"model/layers/2/mlp/down_proj/kernel"}
    )
    assert changed == want_paths
    assert [r.path for r in report.layers] == sorted(
        (p[: -len("/kernel")] for p in want_paths), key=[r.path for r in report.layers].index
    )
    # plain NVFP4: exactly the reference fake quant
    p = "model/layers/1/mlp/up_proj/kernel"
    assert isinstance(got[p], QuantizedArray)
    np.testing.assert_array_equal(
        np.asarray(got[p].materialize()), np.asarray(fake_quant(old[p], "nvfp4"))
    )
    # rank 4 + fp4@64 residual: numpy SVD for L, the reference for Q(W - L)
    p = "model/layers/0/self_attn/k_proj/kernel"
    leaf = got[p]
    assert isinstance(leaf, Residual) and isinstance(leaf.base, LowRank)
    w = np.asarray(old[p], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    low = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(np.asarray(leaf.base.materialize()), low, atol=2e-5)
    res = np.asarray(leaf.residual.materialize())
    ref = np.asarray(fake_quant(jnp.asarray(w - low, jnp.float32), "fp4@64"))
    assert np.mean(np.abs(res - ref) < 1e-5) > 0.99  # ties may move by the SVD's last ulp
    # rank-8 only
    p = "model/layers/2/mlp/down_proj/kernel"
    assert isinstance(got[p], LowRank) and got[p].rank == 8
    # the report's relative error is the weight error of the leaf
    row = next(r for r in report.layers if r.path == "model/layers/1/mlp/up_proj")
    d = np.asarray(got["model/layers/1/mlp/up_proj/kernel"].materialize()) - np.asarray(
        old["model/layers/1/mlp/up_proj/kernel"]
    )
    assert row.rel_error == pytest.approx(
        np.linalg.norm(d) / np.linalg.norm(old["model/layers/1/mlp/up_proj/kernel"]), rel=1e-4
    )
    assert row.bits_per_weight == pytest.approx(4 + 8 / 16 + 32 / (128 * 352))
    js = json.loads(json.dumps(report.to_json()))
    assert js["n_layers"] == 7 and "| layer |" in report.to_markdown()


def test_forward_runs_and_is_close(llama, applied):
    cfg, params = llama
    new, _ = applied
    ids = jnp.arange(1, 33)[None]
    got = jcompress.forward(cfg, new, ids)
    dense = jcompress.forward(cfg, jcompress.materialize(new), ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-4, atol=1e-4)
    assert np.isfinite(np.asarray(got)).all()


def test_selection_errors(llama, applied):
    cfg, params = llama
    with pytest.raises(UserError, match="matches nothing"):
        compress(params, config=QuantApplyConfig(rules=(("model/nope/.*", "nvfp4"),)))
    with pytest.warns(UserWarning, match="matches nothing"):
        _, rep = compress(
            params,
            config=QuantApplyConfig(
                rules=(("model/nope/.*", "nvfp4"), ("lm_head", "int8")), allow_unmatched=True
            ),
            progress=False,
        )
    assert rep.unmatched_rules == ("model/nope/.*",) and rep.layers[0].path == "lm_head"
    new, _ = applied
    with pytest.raises(UserError, match="k_proj/kernel is a Residual"):
        compress(new, config=QuantApplyConfig(rules=((r"model/layers/0/.*", "int8"),)))


def test_opt_tied_model(opt_dir):
    cfg, params = jcompress.load_hf(opt_dir)
    new, rep = compress(
        params,
        config=QuantApplyConfig(rules=((r"model/decoder/layers/\d+/fc[12]", "mxfp4"),)),
        progress=False,
    )
    assert len(rep.layers) == 2 * cfg.num_layers
    ids = jnp.arange(2, 26)[None]
    a = jcompress.forward(cfg, new, ids)
    b = jcompress.forward(cfg, jax.tree.map(lambda x: x, jcompress.materialize(new)), ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_cli_end_to_end(capsys, tmp_path, llama_dir):
    out = tmp_path / "q"
    code = main(
        [
            "quant",
            "apply",
            "--model",
            str(llama_dir),
            "--rule",
            r"model/layers/\d+/mlp/.*=nvfp4",
            "--out",
            str(out),
            "--seqlen",
            "64",
            "--packed",
            "--max_windows",
            "2",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep == json.loads((tmp_path / "r.json").read_text())
    assert rep["n_layers"] == 12 and rep["ppl_before"]["ppl"] > 1 and rep["ppl_after"]["ppl"] > 1
    assert "| perplexity |" in text and (out / "report.md").is_file()
    cfg, back = jcompress.load_hf(out / "factors")
    leaf = back["model"]["layers"]["3"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, QuantizedArray) and leaf.spec == QuantSpec("nvfp4")
    conf = json.loads((out / "packed" / "config.json").read_text())
    assert conf["quantization_config"]["format"] == "nvfp4-pack-quantized"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--rule", "model/zzz=nvfp4"], "--rule: rule 'model/zzz' matches nothing"),
        (["--rule", "model/layers/0/mlp/up_proj=fp5"], "valid: fp4@in"),
        ([], "give --rule"),
        (["--rule", "model/layers/0/mlp/up_proj=int8", "--packed"], "--packed: no rule"),
    ],
)
def test_cli_bad_input_one_line(capsys, tmp_path, llama_dir, argv, needle):
    code = main(
        [
            "quant",
            "apply",
            "--model",
            str(llama_dir),
            "--no_eval",
            "--out",
            str(tmp_path / "o"),
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_tiny_qwen3_against_transformers(tmp_path):
    """A tiny random Qwen3 (q/k norms, head_dim != hidden / heads): the forward pass on the
    quantized leaves matches transformers running the fake-quantized dense weights."""
    from _tiny import batch, hf_logits, make_model, save_model
    from transformers import AutoModelForCausalLM

    src = save_model(make_model("qwen3"), tmp_path / "src")
    cfg, params = jcompress.load_hf(src)
    new, rep = compress(
        params,
        config=QuantApplyConfig(
            rules=(
                (r"model/layers/\d+/mlp/.*", "mxfp4"),
                (r"model/layers/\d+/self_attn/.*", "nvfp4"),
            )
        ),
        progress=False,
    )
    assert rep.layers and all(
        isinstance(v, QuantizedArray)
        for v in (flatten(new)[f"{r.path}/kernel"] for r in rep.layers)
    )
    dense = jcompress.save_hf(cfg, new, tmp_path / "dense")  # materialized: stock transformers
    model = AutoModelForCausalLM.from_pretrained(dense, attn_implementation="eager").eval()
    ids, mask = batch()
    got = np.asarray(jcompress.forward(cfg, new, ids, mask))
    want = hf_logits(model, ids, mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_typed_leaves_factors_and_residual():
    """Factors of LowRank / HeadLowRank quantized in place of the leaf, residual=SPEC over any
    typed leaf; oracle: numpy products of the fake-quantized factors."""
    from jcompress.leaves import HeadFoldedOut, HeadLowRank
    from jcompress.quant.apply import result_type

    assert parse_choice("residual=nvfp4") == LayerChoice(residual=QuantSpec("nvfp4"))
    assert parse_choice("residual=int4@32").key == "residual=int4@32"
    assert parse_rule(r"m/.*=residual=fp8_e4m3") == (r"m/.*", parse_choice("residual=fp8_e4m3"))
    for bad in ("residual=", "residual=nvfp4;rank=4", "rank=4;residual=nvfp4", "residual=fp5"):
        with pytest.raises(UserError):
            parse_choice(bad)

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a, b = f32(64, 8), f32(8, 48)
    ha, hb = f32(64, 4 * 6), f32(4, 6, 16)
    fw, fut = f32(8 * 6, 64), f32(4, 6, 16)
    w_orig = f32(64, 48)
    params = {
        "m": {
            "lr": {"kernel": LowRank(jnp.asarray(a), jnp.asarray(b))},
            "hl": {"kernel": HeadLowRank(jnp.asarray(ha), jnp.asarray(hb), basis="kq")},
            "fo": {"kernel": HeadFoldedOut(jnp.asarray(fw), jnp.asarray(fut))},
            "res": {"kernel": LowRank(jnp.asarray(a), jnp.asarray(b))},
            "d": {"kernel": jnp.asarray(w_orig)},
        }
    }
    original = {"m": {"res": {"kernel": jnp.asarray(w_orig)}}}
    config = QuantApplyConfig(
        rules=(("m/res", "residual=int8"), ("m/(lr|hl|fo)", "int8"), ("m/d", "none"))
    )
    new, rep = compress(params, config=config, progress=False, original=original)
    fq = lambda x: np.asarray(fake_quant(x, "int8"), np.float64)  # noqa: E731
    lr = new["m"]["lr"]["kernel"]
    assert isinstance(lr, LowRank) and isinstance(lr.a, QuantizedArray)
    np.testing.assert_allclose(np.asarray(lr.materialize()), fq(a) @ fq(b), rtol=1e-5, atol=1e-5)
    hl = new["m"]["hl"]["kernel"]
    assert isinstance(hl, HeadLowRank) and isinstance(hl.a, QuantizedArray)
    assert hl.basis == "kq"  # b untouched: the shared-basis tag (rank-space scores) stays
    oracle = np.einsum("ihr,hrd->ihd", fq(ha).reshape(64, 4, 6), hb).reshape(64, 64)
    np.testing.assert_allclose(np.asarray(hl.materialize()), oracle, rtol=1e-5, atol=1e-5)
    x = f32(3, 64)
    np.testing.assert_allclose(
        np.asarray(hl.down(jnp.asarray(x))), x @ fq(ha), rtol=1e-5, atol=1e-5
    )
    fo = new["m"]["fo"]["kernel"]
    assert isinstance(fo, HeadFoldedOut) and isinstance(fo.w, QuantizedArray)
    z = f32(3, 8 * 6)
    np.testing.assert_allclose(
        np.asarray(fo.apply_latent(jnp.asarray(z))), z @ fq(fw), rtol=1e-5, atol=1e-5
    )
    res = new["m"]["res"]["kernel"]
    assert isinstance(res, Residual) and res.base is params["m"]["res"]["kernel"]
    lr_dense = a.astype(np.float64) @ b
    r = fq((w_orig - lr_dense).astype(np.float32))
    np.testing.assert_allclose(np.asarray(res.materialize()), lr_dense + r, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(w_orig - lr_dense - r) < 0.05 * np.linalg.norm(w_orig - lr_dense)
    assert new["m"]["d"]["kernel"] is params["m"]["d"]["kernel"]
    rows = {row.path: row for row in rep.layers}
    assert rows["m/hl"].leaf == "HeadLowRank" and rows["m/res"].config == "residual=int8"
    assert rows["m/lr"].bits_per_weight < 16  # 8-bit factors of a rank-8 64x48 kernel
    json.dumps(rep.to_json())

    # what the rules cannot take: one error naming the path and the type, before any work
    with pytest.raises(UserError, match=r"m/res/kernel is a LowRank; .*needs the original"):
        compress(params, config=config, progress=False)
    bad = [
        ("m/d", "residual=int8", r"m/d/kernel is a dense array"),
        ("m/lr", "rank=4;fmt=int8;blk=na", r"m/lr/kernel is a LowRank; .*use a dense kernel"),
    ]
    for rx, choice, msg in bad:
        with pytest.raises(UserError, match=msg):
            compress(params, config=QuantApplyConfig(rules=((rx, choice),)), progress=False)
    q = compress(params, config=QuantApplyConfig(rules=(("m/d", "int8"),)), progress=False)[0]
    with pytest.raises(UserError, match=r"m/d/kernel is a QuantizedArray; .*residual=SPEC"):
        compress(q, config=QuantApplyConfig(rules=(("m/d", "int8"),)), progress=False)
    assert result_type("p", np.ndarray, parse_choice("nvfp4")) is QuantizedArray
    assert result_type("p", HeadLowRank, parse_choice("nvfp4")) is HeadLowRank
    assert result_type("p", QuantizedArray, parse_choice("residual=nvfp4")) is Residual


@pytest.fixture(scope="module")
def factor_dir(llama, tmp_path_factory):
    """llama-1m with layer 0's down_proj a rank-4 ``LowRank`` (numpy SVD), saved as a jcompress
    factor checkpoint: what another method leaves for ``quant apply --original``."""
    cfg, params = llama
    w = np.asarray(params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    a, b = (u[:, :4] * s[:4]).astype(np.float32), vt[:4].astype(np.float32)
    flat = flatten(params)
    flat["model/layers/0/mlp/down_proj/kernel"] = LowRank(jnp.asarray(a), jnp.asarray(b))
    from jcompress.models.convert import unflatten

    out = tmp_path_factory.mktemp("factors") / "lr"
    jcompress.save_hf(cfg, unflatten(flat), out, factors=True)
    return out, w.astype(np.float32), a, b


def test_cli_residual_with_original(capsys, tmp_path, llama_dir, factor_dir):
    """``--original``: the residual of a factor checkpoint's LowRank against the dense kernel;
    oracle: numpy int8 per-output-channel round-to-nearest-even of ``W - a b``."""
    model, w, a, b = factor_dir
    out = tmp_path / "q"
    rule = "model/layers/0/mlp/down_proj=residual=int8"
    argv = ["quant", "apply", "--model", str(model), "--original", str(llama_dir)]
    assert main([*argv, "--rule", rule, "--no_eval", "--out", str(out)]) == 0
    capsys.readouterr()
    _, back = jcompress.load_hf(out / "factors")
    leaf = back["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, Residual) and isinstance(leaf.base, LowRank)
    assert isinstance(leaf.residual, QuantizedArray) and leaf.residual.spec == QuantSpec("int8")
    np.testing.assert_array_equal(np.asarray(leaf.base.a), a)
    np.testing.assert_array_equal(np.asarray(leaf.base.b), b)
    r = w - (a @ b)  # float32, as the residual is formed from float32 operands
    scale = np.max(np.abs(r), axis=0, keepdims=True) / np.float32(127)
    oracle = np.round(r / scale) * scale
    np.testing.assert_allclose(np.asarray(leaf.residual.materialize()), oracle, atol=1e-6)
    rep = json.loads((out / "report.json").read_text())
    assert rep["original"] == str(llama_dir) and rep["layers"][0]["leaf"] == "LowRank"
    assert rep["layers"][0]["config"] == "residual=int8"
    # the error is against the original kernel: far below the rank-4 branch's own
    assert rep["layers"][0]["rel_error"] < 0.05 * np.linalg.norm(r) / np.linalg.norm(w)
    untouched = back["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(untouched, jax.Array)


def test_cli_original_reads_only_the_residual_kernels(
    capsys, tmp_path, llama_dir, factor_dir, monkeypatch
):
    """``--original`` is read tensor by tensor: of the original's file only the HF tensors of
    the kernels residual=SPEC rows need (here down_proj of layer 0) are read, not the model."""
    from jcompress.models import safetensors_io

    model, w, a, b = factor_dir
    reads: list[tuple[str, str]] = []
    get = safetensors_io.SafetensorsFile.get

    def counting_get(self, name):
        reads.append((str(self.path.parent), name))
        return get(self, name)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "get", counting_get)
    argv = ["quant", "apply", "--model", str(model), "--original", str(llama_dir), "--no_eval",
            "--rule", "model/layers/0/mlp/down_proj=residual=int8",
            "--rule", "model/layers/1/self_attn/q_proj=int8",
            "--out", str(tmp_path / "q")]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    read_original = [n for d, n in reads if d == str(llama_dir)]
    assert read_original == ["model.layers.0.mlp.down_proj.weight"]
    assert sum(d == str(model) for d, _ in reads) > 1  # --model itself is read whole
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert [r["leaf"] for r in rep["layers"]] == ["LowRank", "dense"]


@pytest.mark.parametrize(
    ("model", "original", "rule", "needle"),
    [
        ("factors", None, "residual=int8", "--original: rule 'model/layers/0/mlp/down_proj' is "
         "residual=SPEC"),
        ("llama", "llama", "int8", "--original: only residual=SPEC rules read"),
        ("factors", "opt", "residual=int8", "holds a model of family opt, --model one of family "
         "llama"),
        ("llama", "llama", "residual=int8", "down_proj/kernel is a dense array"),
        ("factors", "factors", "residual=int8", "is a jcompress factor checkpoint"),
        ("factors", "nowhere", "residual=int8", "is not a directory"),
    ],
)  # fmt: skip
def test_cli_original_errors_before_load(
    capsys, tmp_path, llama_dir, opt_dir, factor_dir, model, original, rule, needle
):
    dirs = {"llama": llama_dir, "opt": opt_dir, "factors": factor_dir[0],
            "nowhere": tmp_path / "nowhere"}  # fmt: skip
    argv = ["quant", "apply", "--model", str(dirs[model]), "--no_eval"]
    argv += ["--out", str(tmp_path / "o")]
    if original is not None:
        argv += ["--original", str(dirs[original])]
    code = main([*argv, "--rule", f"model/layers/0/mlp/down_proj={rule}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
