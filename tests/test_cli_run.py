"""``jcompress run RECIPE``: a Tucker -> quant chain end to end on llama-1m (report with sizes and
perplexity after every step, factor export read back, dense export checked against
transformers), and one-line errors before the model is loaded (bad recipe, pre-flight, an
output directory jcompress did not write)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import numpy as np
import pytest

import jcompress
from jcompress.cli import main
from jcompress.leaves import Residual
from jcompress.quant import QuantizedArray
from jcompress.tucker import TTLinear

RECIPE = [
    {
        "method": "tucker",
        "variant": "tt",
        "tt_ranks": [4, 4],
        "layers": ["model/layers/0/self_attn/(k|v)_proj"],
    },
    {
        "method": "quant",
        "rules": {
            "model/layers/0/self_attn/k_proj": "residual=int8",
            "model/layers/0/mlp/.*": "nvfp4",
        },
    },
]


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def done(tmp_path_factory, llama_dir, shared_data):
    root = tmp_path_factory.mktemp("run")
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    out = root / "out"
    code = main(
        [
            "run", str(recipe), "--model", str(llama_dir), "--out", str(out),
            "--eval_data", str(shared_data / "wikitext-2-raw" / "test.txt"),
            "--eval_seqlen", "64", "--eval_max_windows", "2",
        ]
    )  # fmt: skip
    return code, out


def test_run_writes_report_and_exports(done):
    import torch
    from transformers import AutoModelForCausalLM

    code, out = done
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert [s["method"] for s in rep["steps"]] == ["tucker", "quant"]
    assert rep["recipe"][0]["tt_ranks"] == [4, 4]
    ppl = [rep["before"]["ppl"]["ppl"]] + [s["ppl"]["ppl"] for s in rep["steps"]]
    assert all(np.isfinite(ppl)) and len(set(ppl)) == 3  # every step changed the model
    bits = [rep["before"]["sizes"]["kernel_bits_per_weight"]]
    bits += [s["sizes"]["kernel_bits_per_weight"] for s in rep["steps"]]
    assert bits[0] > bits[1] > bits[2]
    rows = {r["path"]: r for r in rep["steps"][1]["report"]["layers"]}
    assert rows["model/layers/0/self_attn/k_proj"]["leaf"] == "TTLinear"
    md = (out / "report.md").read_text()
    assert "## Step 1: quant" in md and "perplexity" in md.splitlines()[0]

    cfg, params = jcompress.load_hf(out / "factors")
    attn = params["model"]["layers"]["0"]["self_attn"]
    k, v = attn["k_proj"]["kernel"], attn["v_proj"]["kernel"]
    assert isinstance(k, Residual) and isinstance(k.base, TTLinear)
    assert isinstance(k.residual, QuantizedArray) and isinstance(v, TTLinear)
    assert isinstance(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"], QuantizedArray)
    assert isinstance(
        params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"], np.ndarray | jax.Array
    )

    hf = AutoModelForCausalLM.from_pretrained(out / "dense")
    ids = np.arange(1, 41)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jcompress.forward(cfg, params, ids))
    assert np.abs(ours - ref).max() <= 1e-4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_errors_before_the_model_is_loaded(capsys, tmp_path, llama_dir, shared_data, monkeypatch):
    import jcompress.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(jcompress.models, "load_hf", no_load)
    cases = [
        ([{"method": "tucker", "rank": 4}], "recipe: step 0 (tucker): unknown field 'rank'"),
        (
            [RECIPE[0], {"method": "eigen", "layers": ["model/layers/0"]}],
            "step 1 (eigen_attention): params: model/layers/0/self_attn/k_proj/kernel is a "
            "TTLinear; EigenAttention needs dense k/q/v/o kernels",
        ),
        ([{"method": "ged"}], "'ged' cannot be chained"),
        (
            [{"method": "quant", "rules": {".*mlp.*": "nvfp4"}}],
            "--calib_data: no step of the recipe reads calibration text (quant); drop it",
        ),
    ]
    calib = ("--calib_data", shared_data / "wikitext-2" / "valid.txt")
    for i, (recipe, needle) in enumerate(cases):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(recipe))
        code, out, err = run(
            capsys, "run", path, "--model", llama_dir, "--out", tmp_path / "o", *calib
        )
        assert code == 2 and needle in err, err
        assert err.count("\n") == 1
    # a step's offload_dir is an input: --out may not replace a folder above it
    (tmp_path / "p" / "off").mkdir(parents=True)
    path = tmp_path / "off.json"
    path.write_text(json.dumps([{"method": "eigen", "offload_dir": str(tmp_path / "p" / "off")}]))
    code, out, err = run(
        capsys, "run", path, "--model", llama_dir, "--out", tmp_path / "p", "--overwrite", *calib
    )
    assert code == 2 and f"--out: {tmp_path / 'p'} contains the input step 0 offload_dir" in err
    path = tmp_path / "eigen.json"
    path.write_text(json.dumps([{"method": "eigen"}]))
    (tmp_path / "empty.txt").write_text("")
    for extra, needle in (
        (["--nsamples", "99999999"], "--nsamples: 99999999 windows of 512 tokens from"),
        (["--eval_data", tmp_path / "empty.txt", "--eval_seqlen", "64"],
         "--eval_seqlen: 64-token windows need a text of at least 64 tokens; "
         "--eval_data {}/empty.txt has 0"),
    ):  # fmt: skip
        code, out, err = run(capsys, "run", path, "--model", llama_dir, *calib, *extra)
        assert code == 2 and needle.format(tmp_path) in err and err.count("\n") == 1, err
    # the calibrating commands' rule: nsamples x seqlen <= the text's tokens (a count the
    # distinct-starts rule of save_xy would still accept is refused)
    from jcompress.data import load_tokenizer, load_tokens

    short = tmp_path / "short.txt"
    short.write_text("The history of the city begins with a small river settlement. " * 6)
    n = int(load_tokens(short, load_tokenizer(llama_dir)).shape[0])
    k = n // 16 + 1
    assert k <= n - 16  # within the distinct starts
    code, out, err = run(capsys, "run", path, "--model", llama_dir, "--calib_data", short,
                         "--seqlen", "16", "--nsamples", str(k))  # fmt: skip
    want = f"--nsamples: {k} windows of 16 tokens from --calib_data {short} need {16 * k} tokens"
    assert code == 2 and want in err and err.count("\n") == 1, err
    code, out, err = run(capsys, "run", path, "--model", llama_dir)
    assert code == 2 and "--calib_data: step 0 (eigen_attention) calibrates on a text" in err
    # an existing directory jcompress did not write is refused, and left as it was
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(RECIPE))
    code, out, err = run(capsys, "run", path, "--model", llama_dir, "--out", foreign)
    assert code == 2 and "--out" in err and err.count("\n") == 1
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o").exists()


def test_streamed_chain_equals_run(capsys, tmp_path, llama_dir):
    """The chain for checkpoints larger than memory: successive ``jcompress stream ...
    --factors`` runs, each reading the previous one's output layer by layer (``stream
    tucker`` as :data:`RECIPE`'s step 0, then ``stream quant`` of the MLP on its output) ==
    the same two steps in memory (``jcompress.chain``, what ``run`` calls): the same leaf
    types (the TT leaves kept through the second step) and every materialized kernel to 1e-5
    relative (float32 reduction order only). A ``residual=`` rule, which needs the original
    dense kernel under a TT leaf, is one line in a streamed step (only ``run`` has it)."""
    from jcompress.compose import Chain, load_recipe
    from jcompress.models.convert import flatten

    tt = RECIPE[0]
    mlp = "model/layers/0/mlp/.*"
    step1, step2 = tmp_path / "tt", tmp_path / "tt-quant"
    code, _, err = run(capsys, "stream", "tucker", "--model", llama_dir, "--variant",
                       tt["variant"], "--tt_ranks", ",".join(map(str, tt["tt_ranks"])),
                       "--layers", tt["layers"][0], "--factors", "--out", step1)  # fmt: skip
    assert code == 0, err
    quant = ["stream", "quant", "--model", step1, "--factors", "--out"]
    residual = "model/layers/0/self_attn/k_proj=residual=int8"
    code, _, err = run(capsys, *quant, tmp_path / "refused", "--rule", residual)
    assert code == 2 and err.count("\n") == 1
    assert "k_proj/kernel is a TTLinear; residual=int8 needs the original dense kernel" in err
    assert not (tmp_path / "refused").exists()
    code, _, err = run(capsys, *quant, step2, "--rule", f"{mlp}=nvfp4")
    assert code == 0, err
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps([tt, {"method": "quant", "rules": {mlp: "nvfp4"}}]))
    cfg, params = jcompress.load_hf(llama_dir)
    want, _ = Chain(load_recipe(recipe))(params, cfg, progress=False)
    got, want = flatten(jcompress.load_hf(step2)[1]), flatten(want)
    assert set(got) == set(want)
    for role in ("k_proj", "v_proj"):
        assert isinstance(got[f"model/layers/0/self_attn/{role}/kernel"], TTLinear)
    assert isinstance(got["model/layers/0/mlp/up_proj/kernel"], QuantizedArray)
    for p, w in want.items():
        assert type(got[p]) is type(w), p
        a, b = (np.asarray(jcompress.materialize(x), np.float64) for x in (got[p], w))
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), p
