"""quant.choices: a tokenwise ranking (Ranking-1 / Ranking-2 CSV as `tokenwise rank` writes
them, or the result JSON) -> quant apply rules. Oracles: the best configuration per unit read
off the synthetic scores by hand, bits per weight from the format definitions, the budgeted
choice against a brute force over every combination; `quant apply --from_ranking` end to end
on llama-1m; bad input as one line."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pytest

import jcompress
from jcompress.cli import main
from jcompress.errors import UserError
from jcompress.models import read_config
from jcompress.quant import QuantizedArray, QuantSpec
from jcompress.quant.apply import parse_choice
from jcompress.quant.choices import (
    ChoiceConfig,
    bits_per_weight,
    choose,
    config_from_ranking,
    read_ranking,
)
from jcompress.quant.tokenwise import write_rankings
from jcompress.quant.tokenwise.targets import targets

NV, I8, LR = "rank=none;fmt=nvfp4;blk=na", "rank=none;fmt=int8;blk=na", "rank=8;fmt=nvfp4;blk=na"
CFGS = (NV, I8, LR)
# llama-1m kernel shapes [in, out] (hidden 128, kv 64, mlp 352)
SHAPES = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
          "gate_proj": (128, 352), "up_proj": (128, 352), "down_proj": (352, 128)}  # fmt: skip


def _nmse(layer, proj, c):
    """Synthetic per-projection nmse: int8 best, then rank-8 + nvfp4, then nvfp4, except
    layer 2's MLP where nvfp4 beats int8 (so the best per block differs)."""
    base = {NV: 0.010, I8: 0.001, LR: 0.004}[c] * (1 + layer) * (1 + 0.1 * len(proj))
    if layer == 2 and proj in ("gate_proj", "up_proj", "down_proj") and c == NV:
        base = 1e-4
    return base


@pytest.fixture(scope="module")
def cfg(llama_dir):
    return read_config(llama_dir)


@pytest.fixture(scope="module")
def result(cfg):
    """An eval_fake result for llama-1m in the seed's schema with the synthetic nmse."""
    by_layer = {}
    for t in targets(cfg):
        blk = by_layer.setdefault(str(t.layer), {}).setdefault(t.block, {"by_proj": {}, "agg": {}})
        blk["by_proj"][t.proj] = {c: {"nmse": _nmse(t.layer, t.proj, c)} for c in CFGS}
    for blocks in by_layer.values():
        for body in blocks.values():
            for c in CFGS:
                v = [p[c]["nmse"] for p in body["by_proj"].values()]
                body["agg"][c] = {"nmse_mean_over_proj": sum(v) / len(v),
                                  "nmse_max_over_proj": max(v), "n_proj": len(v)}  # fmt: skip
    return {"meta": {"xy_path": "synthetic"}, "by_layer": by_layer}


@pytest.fixture(scope="module")
def ranked(result, tmp_path_factory):
    d = tmp_path_factory.mktemp("rank") / "out"
    write_rankings(result, d)
    js = d.parent / "result.json"
    js.write_text(json.dumps(result))
    return d, js


def _oracle_bits(c, shape):
    n_in, n_out = shape
    n = n_in * n_out
    if c == NV:  # E2M1 + one E4M3 scale per 16 inputs + the fp32 tensor scale
        return 4 + (n_in // 16 * n_out * 8 + 32) / n
    if c == I8:  # 8-bit ints + one fp32 scale per output channel + the tensor scale slot
        return 8 + (n_out * 32 + 32) / n
    return _oracle_bits(NV, shape) + 16 * 8 * (n_in + n_out) / n


def test_bits_per_weight_match_the_formats_and_the_leaf(cfg):
    for c in CFGS:
        for shape in SHAPES.values():
            assert bits_per_weight(parse_choice(c), shape) == pytest.approx(_oracle_bits(c, shape))
    w = np.random.default_rng(0).standard_normal((352, 128)).astype(np.float32)
    from jcompress.quant import quantize_leaf

    assert bits_per_weight(parse_choice(NV), w.shape) == pytest.approx(
        quantize_leaf(w, "nvfp4").bits_per_weight
    )


def test_best_per_block_from_ranking1_csv(cfg, ranked):
    d, _ = ranked
    for name in ("ranking1.csv", "best_per_block.csv"):
        qc, ch = config_from_ranking(d / name, cfg)
        assert ch.config.level == "auto" and len(ch.units) == 8
        got = {(u.layer, u.block): u.cfg for u in ch.units}
        want = {(i, b): (NV if (i == 2 and b == "mlp") else I8)
                for i in range(4) for b in ("self_attn", "mlp")}  # fmt: skip
        assert got == want, name
        rules = dict(qc.rules)
        assert rules["model/layers/2/mlp/down_proj"].key == NV
        assert rules["model/layers/0/self_attn/k_proj"].key == I8
        assert len(rules) == 4 * 7
    # the same from the result JSON
    _, js = ranked
    _, ch = config_from_ranking(js, cfg)
    assert {(u.layer, u.block): u.cfg for u in ch.units} == want


def test_per_projection_from_ranking2(cfg, ranked, result):
    d, js = ranked
    for src, level in ((d / "ranking2.csv", "auto"), (js, "proj")):
        qc, ch = config_from_ranking(src, cfg, ChoiceConfig(level=level))
        assert len(ch.units) == 28 and ch.score == "nmse"
        for u in ch.units:
            per = result["by_layer"][str(u.layer)][u.block]["by_proj"][u.proj]
            assert u.cfg == min(per, key=lambda c, per=per: per[c]["nmse"])
            assert u.paths == (f"model/layers/{u.layer}/{u.block}/{u.proj}",)
        assert len(qc.rules) == 28


def test_budget_matches_brute_force(cfg, ranked):
    d, _ = ranked
    rk = read_ranking(d / "ranking1.csv")
    units = sorted({(r[0], r[1]) for r in rk.rows})
    score = {(r[0], r[1], r[3]): r[4] for r in rk.rows}
    projs = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
             "mlp": ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    size = {u: sum(np.prod(SHAPES[p]) for p in projs[u[1]]) for u in units}
    bits = {(u, c): sum(_oracle_bits(c, SHAPES[p]) * np.prod(SHAPES[p]) for p in projs[u[1]])
            / size[u] for u in units for c in CFGS}  # fmt: skip
    total = sum(size.values())
    for budget in (5.0, 6.5):
        ch = choose(rk, cfg, ChoiceConfig(max_bits=budget))
        assert ch.mean_bits_per_weight <= budget + 1e-9
        got = sum(u.score for u in ch.units)
        best = min(
            sum(score[(*u, c)] for u, c in zip(units, combo, strict=True))
            for combo in itertools.product(CFGS, repeat=len(units))
            if sum(bits[(u, c)] * size[u] for u, c in zip(units, combo, strict=True))
            <= budget * total
        )
        assert got == pytest.approx(best, rel=1e-9), budget
    with pytest.raises(UserError, match="--max_bits: 3.0 is below the cheapest"):
        choose(rk, cfg, ChoiceConfig(max_bits=3.0))


def test_top_k_keeps_the_rest_dense(cfg, ranked):
    d, _ = ranked
    qc, ch = config_from_ranking(d / "ranking1.csv", cfg, ChoiceConfig(top_k=2))
    # smallest chosen scores: layer 2 mlp (nvfp4, 1e-4) and layer 0 self_attn (int8)
    assert [u.name for u in ch.units] == ["0/self_attn", "2/mlp"]
    assert len(ch.dense) == 6 and "1/mlp" in ch.dense
    assert len(qc.rules) == 4 + 3


def test_top_k_with_a_budget_holds_the_budget_over_the_kept_units(cfg, ranked):
    """top_k first (the units whose best configuration scores best), then the budget over
    them: the mean bits of what is quantized stay within max_bits."""
    d, _ = ranked
    rk = read_ranking(d / "ranking1.csv")
    best = {}
    for layer, block, _, _, s in rk.rows:
        best[(layer, block)] = min(s, best.get((layer, block), math.inf))
    want = sorted(sorted(best, key=lambda u: (best[u], u))[:2])
    for budget in (5.0, 6.5):
        ch = choose(rk, cfg, ChoiceConfig(max_bits=budget, top_k=2))
        assert sorted((u.layer, u.block) for u in ch.units) == want
        assert ch.mean_bits_per_weight <= budget + 1e-9
        assert len(ch.dense) == 6


def test_errors(cfg, ranked, tmp_path):
    d, _ = ranked
    bad = tmp_path / "bad.csv"
    rows = list(csv.DictReader((d / "ranking1.csv").open()))
    rows[0]["layer"] = "9"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(UserError, match="layer 9 .* is not in this model"):
        config_from_ranking(bad, cfg)
    rows[0]["layer"], rows[0]["cfg"] = "0", "rank=none;fmt=fp5;blk=na"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(UserError, match="--from_ranking: bad quantization spec"):
        config_from_ranking(bad, cfg)
    cols = tmp_path / "cols.csv"
    cols.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="neither Ranking-1"):
        read_ranking(cols)
    with pytest.raises(UserError, match="--ranking_level proj: .* ranks blocks"):
        read_ranking(d / "ranking1.csv", level="proj")
    with pytest.raises(UserError, match="is not a file"):
        read_ranking(tmp_path / "nope.csv")
    bad_kw = [({"max_bits": 0}, "--max_bits"), ({"top_k": 0}, "--top_k"),
              ({"by": "median"}, "--ranking_by"), ({"level": "x"}, "--ranking_level")]  # fmt: skip
    for kw, needle in bad_kw:
        with pytest.raises(UserError, match=needle):
            ChoiceConfig(**kw)


def test_cli_from_ranking(capsys, tmp_path, llama_dir, ranked):
    d, _ = ranked
    out = tmp_path / "q"
    argv = ["--from_ranking", str(d / "ranking1.csv"), "--top_k", "2", "--no_eval"]
    code = main(["quant", "apply", "--model", str(llama_dir), *argv, "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "Choices from" in text
    rep = json.loads((out / "report.json").read_text())
    assert {r["path"]: r["config"] for r in rep["layers"]} == {
        **{f"model/layers/0/self_attn/{p}": I8 for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{f"model/layers/2/mlp/{p}": NV for p in ("gate_proj", "up_proj", "down_proj")},
    }
    assert rep["ranking_choices"]["top_k"] == 2
    _, back = jcompress.load_hf(out / "factors")
    leaf = back["model"]["layers"]["2"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, QuantizedArray) and leaf.spec == QuantSpec("nvfp4")
    # a budget without a ranking: one line, nothing written
    code = main(["quant", "apply", "--model", str(llama_dir), "--rule",
                 "model/layers/0/mlp/up_proj=int8", "--max_bits", "5", "--no_eval", "--out",
                 str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "add --from_ranking" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_apply_refuses_before_work(capsys, tmp_path, llama_dir, ranked, result):
    """quant apply: its input ranking is never its --json; --json inside --out, a rank above
    the weight's dimensions, and a result measured on another model (or on SmoothQuant-scaled
    weights) are one line each, before any weights load."""
    _, js = ranked
    before = js.read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**result, "meta": {"xy_meta": {"num_layers": "7"}}}))
    smooth = tmp_path / "smooth.json"
    smooth.write_text(json.dumps({**result, "meta": {"smooth": True}}))
    base = ["quant", "apply", "--model", str(llama_dir), "--no_eval"]
    inner = str(tmp_path / "o" / "r.json")
    cases = [
        (["--from_ranking", str(js), "--json", str(js), "--overwrite"], "--json"),
        (
            ["--rule", ".*mlp/up_proj=int8", "--out", str(tmp_path / "o"), "--json", inner],
            "inside --out",
        ),  # fmt: skip
        (["--rule", ".*mlp/up_proj=rank=999;quant=none"], "999 is out of range"),
        (["--from_ranking", str(other)], "measured on another model (num_layers=7"),
        (["--from_ranking", str(smooth)], "eval_smooth result"),
    ]
    for argv, needle in cases:
        code = main([*base, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (argv, err)
    assert js.read_bytes() == before and not (tmp_path / "o").exists()
