"""``jcompress ged``: an opt-1m run end to end (report.json / report.md / figures, numbers equal
to the library's on transformers-hooked activations), the output guard, and bad input as one
line, exit 2, before any weights load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jcompress
from jcompress.cli import main
from jcompress.data import load_tokenizer
from jcompress.ged import GEDConfig, fit, load_condition_file, tokenize_examples


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _tree(p):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


def test_cli_opt_end_to_end(capsys, tmp_path, opt_dir):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(
        "# signal\n" + "\n".join(f"On day {i} of {3 * i} the [cat] sat." for i in range(12)) + "\n"
    )
    b.write_text("\n".join(f"On day {i} of {3 * i} the [dog] ran." for i in range(12)) + "\n")
    out = tmp_path / "out"
    argv = ["ged", "--model", str(opt_dir), "--cond-a", str(a), "--cond-b", str(b)]
    argv += ["--layer", "2", "--n-permutations", "30", "--n-folds", "3", "--quiet"]
    code, text, err = _run(capsys, *argv, "--out", str(out))
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["hook"] == {"path": "fc1", "side": "output", "width": 512}
    assert rep["labels"] == ["a", "b"] and rep["n_samples"] == [12, 12]
    (row,) = rep["layers"]
    assert row["layer"] == 2 and "swapped" in row and row["cv"]["fold_sizes"] == [8, 8, 8]
    for f in rep["figures"]:
        assert (out / f).stat().st_size > 1000
    assert "| 2 |" in (out / "report.md").read_text() and "| 2 |" in text
    # --stream: layers 0..2 read one at a time from the shards (3 never), the same numbers
    code, text, err = _run(capsys, *argv, "--stream", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert "weights held at once" in text and not (tmp_path / "s.stream").exists()
    srep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert srep["stream"]["peak_loaded_bytes"] < srep["stream"]["model_bytes"] / 2
    (srow,) = srep["layers"]
    assert srow["n_components"] == row["n_components"] and srow["cv"] == row["cv"]
    np.testing.assert_allclose(srow["eigenvalues"], row["eigenvalues"], rtol=1e-4)
    assert srow["p_value"] == row["p_value"]
    # oracle: transformers' fc1 output at the target token, fitted by the library
    model = AutoModelForCausalLM.from_pretrained(opt_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(opt_dir)
    acts = []
    hook = model.get_submodule("model.decoder.layers.2.fc1").register_forward_hook(
        lambda m, i, o: acts.append(o.detach().reshape(-1, o.shape[-1]).numpy())
    )
    xs = []
    for f in (a, b):
        t = tokenize_examples(tok, load_condition_file(f), "target")
        acts.clear()
        with torch.no_grad():
            for ids in t.ids:
                model(torch.tensor(ids[None], dtype=torch.long))
        xs.append(np.stack([x[p[0]] for x, p in zip(acts, t.positions, strict=True)]))
    hook.remove()
    ref = fit(xs[0], xs[1], config=GEDConfig(n_permutations=30, n_folds=3))
    assert row["n_components"] == ref.n_components
    np.testing.assert_allclose(row["eigenvalues"][:3], ref.eigenvalues[:3], rtol=2e-3)
    # the guard: an existing output is never replaced without --overwrite
    before = _tree(out)
    code, _, err = _run(capsys, *argv, "--out", str(out))
    assert code == 2 and "already exists" in err and _tree(out) == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layer", "9"], "--layer: layer 9 out of range (the model has layers 0..3)"),
        (["--layer", "-1"], "--layer: layer indices are >= 0"),
        (["--hook", "nothing"], "--hook: 'nothing' matches no module output"),
        (["--hook", "("], "hook: '(' is not a valid regex"),
        (["--position", "first"], "--position: invalid choice"),
        (["--shrinkage", "2"], "--shrinkage: expected a number in [0, 1) or ledoit_wolf"),
        (["--variance-threshold", "0"], "variance_threshold must be in (0, 1]"),
        (["--n-folds", "0"], "--n-folds: expected a positive integer"),
        (["--cond-a", "{tmp}/empty.txt"], "--cond-a: {tmp}/empty.txt: no sentences"),
        (["--cond-b", "{tmp}/unmarked.txt"], "--cond-b: {tmp}/unmarked.txt:2: expected exactly"),
        (["--cond-a", "{tmp}/missing.txt"], "--cond-a: {tmp}/missing.txt is not a file"),
        (["--cond-a", "{tmp}/few.txt", "--n-folds", "5"], "--cond-a: 3 samples, need at least 5"),
        (["--model", "{tmp}"], "--model: {tmp} is not a model directory"),
        (["--out", "{tmp}/foreign", "--overwrite"], "was not written by jcompress"),
        (["--out", "{tmp}/unmarked.txt"], "already exists and is a file"),
        (["--resume"], "--resume: only with --stream"),
        (["--n-components", "100000"], "--n_components: 100000 exceeds the"),
        (
            ["--cond-a", "{tmp}/few.txt", "--cond-b", "{tmp}/few.txt"],
            "--cond-b: {tmp}/few.txt holds the same sentences as --cond-a",
        ),
        (["--stream", "--offload_dir", "{tmp}/nodir"], "--offload_dir: {tmp}/nodir is not a dir"),
        (["--stream", "--work_dir", "{tmp}/foreign"], "foreign exists and holds no manifest"),
    ],
)
def test_bad_input_one_line_before_weights(capsys, tmp_path, monkeypatch, extra, needle):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "unmarked.txt").write_text("I saw [him].\nI saw him.\n")
    (tmp_path / "few.txt").write_text("a [him].\nb [him].\nc [him].\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("mine")

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the input checks")

    monkeypatch.setattr(jcompress, "load_hf", no_weights)
    fmt = {"tmp": tmp_path}
    argv = ["ged", "--out", str(tmp_path / "o"), "--quiet"]
    argv += [x.format(**fmt) for x in extra]
    before = _tree(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jcompress: error:"), err
    assert needle.format(**fmt) in lines[0]
    assert _tree(tmp_path) == before
