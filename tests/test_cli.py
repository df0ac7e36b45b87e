"""The jcompress command line: demo, ppl, generate, convert, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jcompress.cli import bundled_model_dir, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_needs_no_flags(capsys, tmp_path, shared_data):
    code, out, err = run(capsys, "demo", "--json", str(tmp_path / "demo.json"))
    assert code == 0
    for needle in ("perplexity", "KV cache", "sample before", "sample after", "| layer |"):
        assert needle in out
    res = json.loads((tmp_path / "demo.json").read_text())
    # the bundled model is the shared llama-1m: its greedy sample is the published one
    baselines = json.loads((shared_data / "baselines.json").read_text())
    assert res["extra"]["sample_before"] == baselines["llama-1m"]["greedy_sample"]
    before, after = res["extra"]["ppl_before"]["ppl"], res["extra"]["ppl_after"]["ppl"]
    assert 20 < before < 200 and after < before * 1.05
    assert res["kv_cache_after"] < res["kv_cache_before"]
    assert len(res["layers"]) == 4
    assert all(layer["error"] < 0.025 for layer in res["layers"])


def test_eigen_writes_report_and_both_exports(capsys, tmp_path, shared_data, opt_dir):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    import jcompress

    out = tmp_path / "run"
    code, stdout, _ = run(
        capsys, "eigen", "--model", str(opt_dir),
        "--calib_data", str(shared_data / "wikitext-2" / "valid.txt"),
        "--eval-data", str(shared_data / "wikitext-2-raw" / "test.txt"),
        "--nsamples", "8", "--seqlen", "128", "--avg_dim", "3", "--error_budget", "0.05",
        "--eval_max_windows", "4", "--max-new-tokens", "5", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    assert "2 are left out" in stdout  # 8 % 3 windows dropped from the bases, and said so
    report = json.loads((out / "report.json").read_text())
    assert report["dropped_sequences"] == 2 and report["averaged_sequences"] == 2
    assert (out / "report.md").read_text().count("\n| ") >= 5
    cfg, params = jcompress.load_hf(out / "factors")
    assert (
        isinstance(
            params["model"]["decoder"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"],
            jcompress.HeadLowRank,
        )
        or report["layers"][0]["threshold"] is None
    )
    hf = AutoModelForCausalLM.from_pretrained(out / "dense")
    import numpy as np
    import torch

    ids = np.arange(1, 41)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jcompress.forward(cfg, params, ids))
    assert np.abs(ours - ref).max() <= 1e-4
    assert "model.safetensors" in {p.name for p in (out / "dense").iterdir()}
    assert load_file(out / "factors" / "jcompress_model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bundled_model_is_the_shared_one(shared_data):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (bundled_model_dir() / name).read_bytes() == (
            shared_data / "models" / "llama-1m" / name
        ).read_bytes()


def test_ppl_reproduces_baseline_and_writes_json(capsys, tmp_path, shared_data, opt_dir):
    out_json = tmp_path / "sub" / "ppl.json"
    code, out, _ = run(
        capsys,
        "ppl",
        "--model",
        str(opt_dir),
        "--data",
        str(shared_data / "wikitext-2-raw" / "test.txt"),
        "--seqlen",
        "256",
        "--max-windows",
        "40",
        "--json",
        str(out_json),
    )
    assert code == 0
    res = json.loads(out_json.read_text())
    assert res["n_windows"] == 40 and res["seqlen"] == 256 and res["tokens"] == 439507
    assert abs(res["ppl"] / 117.479 - 1) < 1e-3
    assert "perplexity" in out
    assert not [p for p in out_json.parent.iterdir() if p.name.startswith(".")]


def test_generate(capsys, llama_dir, shared_data):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(llama_dir),
        "--prompt",
        "The history of the",
        "--max-new-tokens",
        "30",
    )
    assert code == 0
    baselines = json.loads((shared_data / "baselines.json").read_text())
    assert out.strip() == baselines["llama-1m"]["greedy_sample"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["ppl", "--model", "/does/not/exist", "--data", "{data}"], "model_dir: /does/not/exist"),
        (["ppl", "--model", "{model}", "--data", "/no/such.txt"], "--data: /no/such.txt"),
        (["ppl", "--model", "{model}", "--data", "{data}", "--seqlen", "0"], "--seqlen"),
        (["ppl", "--model", "{model}", "--data", "{data}", "--dtype", "int3"], "--dtype"),
        (
            ["ppl", "--model", "{model}", "--data", "{data}", "--seqlen", "4096"],
            "learned positions",
        ),
        (["convert", "{model}", "{tmp}/x", "--to", "tar"], "--to"),
        (["frobnicate"], "invalid choice"),
        (["demo", "--avg_dim", "64"], "avg_dim: 64 is larger than nsamples (32)"),
        (["demo", "--error_budget", "2"], "--error_budget"),
        (
            ["eigen", "--model", "{model}", "--calib_data", "/nope", "--eval_data", "{data}"],
            "--calib_data: /nope",
        ),
        (
            [
                "eigen",
                "--model",
                "{model}",
                "--calib_data",
                "{data}",
                "--eval_data",
                "{data}",
                "--out",
                "{tmp}",
            ],
            "already exists",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, shared_data, opt_dir, argv, needle):
    data = str(shared_data / "wikitext-2-raw" / "test.txt")
    argv = [a.format(data=data, model=str(opt_dir), tmp=tmp_path) for a in argv]
    try:
        code, out, err = run(capsys, *argv)
    except SystemExit as e:  # argparse errors exit directly
        code = e.code
        out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jcompress: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "jcompress", "ppl", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--model",
        "--data",
        "--seqlen",
        "--max-windows",
        "--dtype",
        "--json",
        "--batch-size",
    ):
        assert flag in out
    top = subprocess.run(
        [sys.executable, "-m", "jcompress", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("ppl", "generate", "convert", "demo"):
        assert cmd in top


def test_convert_round_trip_hf_orbax_hf(capsys, tmp_path, llama_dir):
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
    code, out, _ = run(capsys, "convert", str(llama_dir), str(ckpt), "--to", "orbax")
    assert code == 0 and ckpt.is_dir()
    code, out, _ = run(
        capsys, "convert", str(ckpt), str(back), "--to", "hf", "--tokenizer", str(llama_dir)
    )
    assert code == 0
    from safetensors.numpy import load_file

    ours, ref = load_file(back / "model.safetensors"), load_file(llama_dir / "model.safetensors")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].tobytes() == ref[k].tobytes(), k
    assert (back / "tokenizer.json").is_file()
    code, _, err = run(capsys, "convert", str(llama_dir), str(ckpt), "--to", "orbax")
    assert code == 2 and "exists" in err
