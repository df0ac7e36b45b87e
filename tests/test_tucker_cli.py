"""``jcompress tucker``: exports that transformers loads, and one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import jcompress
from jcompress.cli import main
from jcompress.tucker import TTLinear, TuckerConfig


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tree(root):
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_tt_run_writes_reports_and_both_exports(capsys, tmp_path, shared_data, opt_dir):
    """Dense export: transformers logits == JAX forward on the factor export's leaves (1e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "tucker", "--model", str(opt_dir), "--variant", "tt", "--tt_ranks", "8,8",
        "--calib_data", str(shared_data / "wikitext-2" / "valid.txt"),
        "--nsamples", "4", "--seqlen", "64", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["variant"] == "tt" and rep["settings"] == {"n_cores": 3, "tt_ranks": [8, 8]}
    assert len(rep["projections"]) == 12 and len(rep["layer_errors"]) == 4
    assert "| **total** |" in (out / "report.md").read_text()
    cfg, params = jcompress.load_hf(out / "factors")
    leaf = params["model"]["decoder"]["layers"]["2"]["self_attn"]["v_proj"]["kernel"]
    assert isinstance(leaf, TTLinear) and leaf.ranks == (1, 8, 8, 1)
    hf = AutoModelForCausalLM.from_pretrained(out / "dense")
    ids = np.arange(1, 41)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jcompress.forward(cfg, params, ids))
    assert np.abs(ours - ref).max() <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_test_type_compression_only_takes_one_layer(capsys, opt_dir):
    code, out, err = run(
        capsys, "tucker", "--model", str(opt_dir), "--variant", "tucker",
        "--hooi_ranks", "6,4,8", "--test-type", "compression-only",
    )  # fmt: skip
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| model/")]
    assert [r.split(" | ")[0] for r in rows] == [
        f"| model/decoder/layers/0/self_attn/{p}_proj" for p in "qkv"
    ]
    # full: that layer compressed, the model run on it (random ids without --calib_data)
    code, out, err = run(
        capsys, "tucker", "--model", str(opt_dir), "--variant", "tt", "--tt_ranks", "4,4",
        "--layers", r".*/[12]/self_attn/v_proj", "--seqlen", "32", "--test-type", "full",
        "--seed", "5",  # the random ids' seed: allowed without --calib_data here
    )  # fmt: skip
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| model/")]
    assert [r.split(" | ")[0] for r in rows] == ["| model/decoder/layers/1/self_attn/v_proj"]
    change = float(out.split("relative logit change ")[1].split()[0])
    assert 0 < change < 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--variant", "svd"], "argument --variant: invalid choice: 'svd'"),
        (["--hooi_ranks", "6,x,8"], "--hooi_ranks: expected comma-separated positive integers"),
        (["--variant", "tucker_mps"], "--calib_data: variant tucker_mps learns its bases"),
        (["--mps_eps", "1.5"], "mps_eps: must be in (0, 1]"),
        (["--variant", "tucker", "--hooi_ranks", "6,6,8"], "hooi_ranks[1]: 6 exceeds the heads"),
        (["--layers", "nomatch"], "--layers: rule 'nomatch' matches nothing"),
        (["--out", "{tmp}/foreign"], "--out"),
        (["--test-type", "full", "--out", "{tmp}/new"], "--out: a --test-type run writes nothing"),
        (
            ["--test-type", "compression-only", "--eval_data", "{tmp}/foreign/mine.txt"],
            "--eval_data: a --test-type run measures no perplexity",
        ),
        (["--test-type", "compression-only", "--seed", "5"], "--seed: only used with --calib_data"),
        (["--calib_data", "{tmp}/nope.txt"], "--calib_data: {tmp}/nope.txt is not a file"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, opt_dir, argv, needle):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    before = tree(tmp_path)
    code, out, err = run(capsys, "tucker", "--model", str(opt_dir), *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jcompress: error:"), err
    assert needle.format(tmp=tmp_path) in lines[0]
    assert tree(tmp_path) == before


def test_every_config_field_is_a_flag():
    from jcompress.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["tucker"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(TuckerConfig)} <= dests
