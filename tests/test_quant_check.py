"""quant.check: a tokenwise eval_fake result against end-to-end perplexity.

Oracles: Spearman / wrong pairs / the through-origin fit computed by hand on small examples;
the measured perplexities against `quant apply`'s own path run separately (broad regex rules
-> compress -> perplexity), not the exact-path rules the check builds; bad input as one line
before any weights load."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jcompress.quant.tokenwise as tw  # noqa: E402
from jcompress.cli import bundled_eval_text, main  # noqa: E402
from jcompress.data import load_tokenizer, load_tokens  # noqa: E402
from jcompress.errors import UserError  # noqa: E402
from jcompress.eval import perplexity  # noqa: E402
from jcompress.models import load_hf  # noqa: E402
from jcompress.quant.apply import QuantApplyConfig, compress  # noqa: E402
from jcompress.quant.check import (  # noqa: E402
    CheckConfig,
    check_ranking,
    fit_through_origin,
    plan_checks,
    rankdata,
    spearman,
    wrong_pairs,
)
from jcompress.quant.formats import parse_specs  # noqa: E402

# the eval's combined grid (ranks 0, 16): rank 0 is plain quantization
INT8, NV, FP4, LRNV = (
    "rank=0;fmt=int8;blk=na",
    "rank=0;fmt=nvfp4;blk=na",
    "rank=0;fmt=fp4;blk=128",
    "rank=16;fmt=nvfp4;blk=na",
)
CONFIGS = (INT8, NV, FP4, LRNV)
# the same configurations in quant apply's rule syntax, written out by hand
AS_RULE = {INT8: "int8", NV: "nvfp4", FP4: "fp4@128", LRNV: "rank=16;fmt=nvfp4;blk=na"}
WIN = dict(seqlen=32, max_windows=2, batch_size=2)


# ----------------------------------------------------------------------------- statistics


def test_spearman_hand_computed():
    # no ties: ranks of y are 1, 3, 2, 4; sum d^2 = 2; 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # a tie in y: ranks 1, 2, 3.5, 5, 3.5; Pearson of the ranks = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert list(rankdata([5, 6, 7, 8, 7])) == [1, 2, 3.5, 5, 3.5]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [4, 4, 4]) is None and spearman([1], [2]) is None


def test_wrong_pairs_and_fit_hand_computed():
    assert wrong_pairs("abcd", [1, 2, 3, 4], [10, 30, 20, 40]) == [("b", "c")]
    assert wrong_pairs("ab", [1, 1], [2, 1]) == []  # a tie in the prediction: no claim
    # y ~ a x through 0: a = (1*2 + 2*4.2) / (1 + 4) = 2.08; residuals -0.08, 0.04
    f = fit_through_origin([1, 2], [2, 4.2])
    assert f["slope"] == pytest.approx(2.08)
    assert f["r2"] == pytest.approx(1 - 0.008 / 2.42)
    assert f["rmse"] == pytest.approx(math.sqrt(0.008 / 2))
    assert fit_through_origin([0, 0], [1, 2])["slope"] is None


# ----------------------------------------------------------------------------- on llama-1m


@pytest.fixture(scope="module")
def llama(llama_dir):
    cfg, params = load_hf(llama_dir)
    ids = load_tokens(bundled_eval_text(), load_tokenizer(llama_dir))
    return cfg, params, ids


@pytest.fixture(scope="module")
def result(llama, llama_dir, tmp_path_factory):
    """A real eval_fake result: a tiny cache (4 windows of 16 tokens), ranks 0 / 16 x 3 specs."""
    cfg, params, _ = llama
    small = tw.SaveXYConfig(cn=2, eu=2, length=16, save_dtype="fp32")
    windows = tw.representative_windows(load_tokenizer(llama_dir), small)
    root = tmp_path_factory.mktemp("xy")
    cache = tw.save_xy(cfg, params, windows, root, "lm", progress=False, config=small)
    config = tw.EvalConfig(ranks=(0, 16), qspecs=parse_specs("int8,nvfp4,fp4@128"))
    res = tw.eval_grid(cfg, params, tw.XYCache(cache), config, progress=False)
    path = root / "eval.json"
    path.write_text(json.dumps(res))
    return res, path


@pytest.fixture(scope="module")
def checked(llama, result):
    cfg, params, ids = llama
    return check_ranking(cfg, params, result[0], ids, CheckConfig(configs=CONFIGS, **WIN),
                         progress=False)  # fmt: skip


def test_measured_equals_quant_apply_run_separately(llama, result, checked):
    cfg, params, ids = llama
    assert [r.cfg for r in checked.rows] == list(CONFIGS)
    dense = perplexity(cfg, params, ids, progress=False, **WIN).ppl
    assert checked.ppl_dense == dense
    for row in checked.rows:
        rx = r"model/layers/\d+/(self_attn|mlp)/.*"
        rules = QuantApplyConfig(rules=((rx, AS_RULE[row.cfg]),))
        new, rep = compress(params, config=rules, progress=False)
        assert rep.mean_bits_per_weight == pytest.approx(row.bits_per_weight)
        assert row.ppl == perplexity(cfg, new, ids, progress=False, **WIN).ppl, row.cfg
        assert row.measured_log_ratio == pytest.approx(math.log(row.ppl / dense))
    # the quantized models are worse, fp4@128 (seed minifloat, 128-tiles) more than int8
    by = {r.cfg: r for r in checked.rows}
    assert by[FP4].ppl > by[INT8].ppl and by[FP4].ppl > dense


def test_prediction_from_the_json(result, checked):
    res = result[0]
    for row in checked.rows:
        v = [per[row.cfg]["nmse"] for blocks in res["by_layer"].values()
             for body in blocks.values() for per in body["by_proj"].values()]  # fmt: skip
        assert row.n_proj == len(v) == 28
        assert row.nmse_mean == pytest.approx(np.mean(v)) and row.nmse_max == max(v)
        assert row.nmse_sum == pytest.approx(sum(v))
    x = np.array([r.nmse_sum for r in checked.rows])
    y = np.array([r.measured_log_ratio for r in checked.rows])
    a = float(x @ y / (x @ x))
    assert checked.fit["slope"] == pytest.approx(a)
    for r in checked.rows:
        assert r.predicted_log_ratio == pytest.approx(a * r.nmse_sum)
    assert checked.spearman == pytest.approx(spearman([r.nmse_mean for r in checked.rows], y))


def test_json_markdown_and_cli(capsys, tmp_path, llama_dir, result, checked):
    out = tmp_path / "chk"
    argv = ["quant", "check", "--json", str(result[1]), "--model", str(llama_dir),
            "--configs", ",".join(CONFIGS), "--seqlen", "32", "--max_windows", "2",
            "--batch_size", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    js = json.loads((out / "check.json").read_text())
    assert {"by", "ppl_dense", "predictor", "fit", "spearman", "n_configs", "wrong_pairs",
            "configs", "seqlen", "n_windows", "model", "json", "eval_data"} <= set(js)  # fmt: skip
    assert set(js["fit"]) == {"slope", "r2", "rmse"} and js["n_configs"] == 4
    row_keys = {"cfg", "n_proj", "nmse_mean", "nmse_max", "nmse_sum", "bits_per_weight", "ppl",
                "measured_log_ratio", "predicted_log_ratio", "measured_change",
                "predicted_change"}  # fmt: skip
    assert all(set(r) == row_keys for r in js["configs"])
    # the CLI measured what the library measured
    assert [r["ppl"] for r in js["configs"]] == [r.ppl for r in checked.rows]
    assert js["spearman"] == checked.spearman
    assert js["wrong_pairs"] == [{"tokenwise_better": a, "measured_better": b}
                                 for a, b in checked.wrong_pairs]  # fmt: skip
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "check.md").read_text()
    assert md.strip() == checked.to_markdown().strip() and "Spearman" in text
    assert all(f"`{c}`" in md for c in CONFIGS)


def _edit(res, tmp_path, fn):
    r = json.loads(json.dumps(res))
    fn(r)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(r))
    return p


def _rename_cfg(r, old, new):
    for blocks in r["by_layer"].values():
        for body in blocks.values():
            body["agg"] = {new if k == old else k: v for k, v in body["agg"].items()}
            for proj, per in body["by_proj"].items():
                body["by_proj"][proj] = {new if k == old else k: v for k, v in per.items()}


def _extra_layer(r):
    r["by_layer"]["9"] = r["by_layer"]["0"]


@pytest.mark.parametrize(
    ("edit", "extra", "needle"),
    [
        (lambda r: r["meta"]["xy_meta"].update(num_layers="12"), [],
         "--json: the result was measured on another model (num_layers=12"),
        (_extra_layer, [], "--json: layer 9 self_attn/q_proj is not in this model (4 layers)"),
        (lambda r: _rename_cfg(r, NV, "rank=none;fmt=fp5;blk=na"), [], "valid: fp4@in"),
        (lambda r: r["meta"].update(smooth=True), [], "--json: an eval_smooth result"),
        (lambda r: r["meta"].update(method="mpo"), [], "low-rank branch is method=mpo"),
        (None, ["--configs", "rank=none;fmt=mxfp4;blk=na"],
         "--configs: 'rank=none;fmt=mxfp4;blk=na' is not in the result; it holds rank=0;"),
        (None, ["--eval_data", "/nonexistent/t.txt"], "--eval_data: /nonexistent/t.txt is not"),
        (None, ["--configs", f"{NV},"], f"--configs: has an empty entry in '{NV},'"),
        (None, ["--configs", f"{NV},{NV}"], f"--configs: '{NV}' is given twice"),
        (None, ["--eval_data", "{tmp}/e.txt"], "--seqlen: 256-token windows need a text "
         "of at least 256 tokens; --eval_data {tmp}/e.txt has 0"),
    ],
)  # fmt: skip
def test_cli_bad_input_one_line(capsys, tmp_path, llama_dir, result, edit, extra, needle):
    path = result[1] if edit is None else _edit(result[0], tmp_path, edit)
    (tmp_path / "e.txt").write_text("")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    needle = needle.replace("{tmp}", str(tmp_path))
    argv = ["quant", "check", "--json", str(path), "--model", str(llama_dir),
            "--out", str(tmp_path / "o"), *extra]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_plan_rejects_non_results(llama):
    cfg = llama[0]
    with pytest.raises(UserError, match="not a tokenwise result"):
        plan_checks({"by_layer": {}}, cfg)
    with pytest.raises(UserError, match="--by: must be one of mean, max"):
        CheckConfig(by="median")
