"""The jcompress command line: demo, ppl, generate, convert, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jcompress.cli import bundled_model_dir, main

EIGEN = ["--model", "{model}", "--calib_data", "{data}"]
STREAM_EIGEN_BISECT = ["stream", "eigen", *EIGEN, "--out", "{tmp}/o", "--rank_search", "bisect"]
QUANT_APPLY = ["quant", "apply", "--model", "{model}", "--rule", ".*=nvfp4"]


def tree(root):
    """Every path under ``root`` with the bytes of each file (the sentinel check)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


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
        # perplexity in batches of 8 x 256, as test_ppl_reproduces_baseline: one compilation
        "--eval_seqlen", "256", "--eval_max_windows", "8", "--max-new-tokens", "5",
        "--out", str(out),
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


@pytest.mark.parametrize("attention", [[], ["--attention", "dense"]])
def test_generate(capsys, llama_dir, shared_data, attention):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        str(llama_dir),
        "--prompt",
        "The history of the",
        "--max-new-tokens",
        "30",
        *attention,
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
        # outputs: checked before any weights are loaded
        (["eigen", *EIGEN, "--out", "{tmp}/afile"], "--out: {tmp}/afile already exists and is a"),
        (["eigen", *EIGEN, "--out", "{tmp}/afile/x"], "is a file, not a directory"),
        (["eigen", *EIGEN, "--out", "{tmp}/foreign", "--overwrite"], "not written by jcompress"),
        (["eigen", *EIGEN, "--json", "{tmp}"], "--json: {tmp} is a directory"),
        (["ppl", "--model", "{model}", "--data", "{data}", "--json", "{tmp}/afile"], "exists"),
        (["ppl", "--model", "{model}", "--data", "{tmp}"], "--data: {tmp} is not a file"),
        (
            ["ppl", "--model", "{model}", "--data", "{tmp}/empty.txt"],
            "--seqlen: 512-token windows need a text of at least 512 tokens; "
            "--data {tmp}/empty.txt has 0",
        ),  # fmt: skip
        (
            ["ppl", "--model", "{model}", "--data", "{tmp}/afile", "--seqlen", "64"],
            "--seqlen: 64-token windows need a text of at least 64 tokens; "
            "--data {tmp}/afile has 1",
        ),  # fmt: skip
        (
            ["eigen", *EIGEN, "--eval_data", "{tmp}/empty.txt", "--out", "{tmp}/o"],
            "--seqlen: 512-token windows need a text of at least 512 tokens; "
            "--eval_data {tmp}/empty.txt has 0",
        ),  # fmt: skip
        # a calibration text too short: one rule (data.calibration_windows), the command's flags
        (
            ["eigen", "--model", "{model}", "--calib_data", "{tmp}/empty.txt", "--out", "{tmp}/o"],
            "--seqlen: 512-token windows need a text longer than 513 tokens; "
            "--calib_data {tmp}/empty.txt has 0",
        ),
        (
            [
                "sparge",
                "tune",
                "--model",
                "{model}",
                "--data",
                "{tmp}/empty.txt",
                "--out",
                "{tmp}/t.safetensors",
            ],
            "--seqlen: 512-token windows need a text longer than 513 tokens; "
            "--data {tmp}/empty.txt has 0",
        ),
        (
            ["demo", "--nsamples", "100000"],
            "--nsamples: 100000 windows of 256 tokens from the bundled calibration text ",
        ),
        (
            ["eigen", "--model", "{model}", "--calib_data", "{tmp}/afile", "--seqlen", "64"],
            "--seqlen: 64-token windows need a text longer than 65 tokens; "
            "--calib_data {tmp}/afile has 1",
        ),  # fmt: skip
        (
            [
                "stream",
                "eigen",
                "--model",
                "{model}",
                "--calib_data",
                "{tmp}/afile",
                "--out",
                "{tmp}/o",
                "--seqlen",
                "64",
            ],
            "--seqlen: 64-token windows need a text longer than 65 tokens; "
            "--calib_data {tmp}/afile has 1",
        ),  # fmt: skip
        (
            [
                "sparge",
                "tune",
                "--model",
                "{model}",
                "--data",
                "{tmp}/afile",
                "--out",
                "{tmp}/t.safetensors",
                "--seqlen",
                "64",
            ],
            "--seqlen: 64-token windows need a text longer than 65 tokens; --data {tmp}/afile",
        ),  # fmt: skip
        (
            [
                "sparge",
                "tune",
                "--model",
                "{model}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/t.safetensors",
                "--nsamples",
                "10000000",
            ],
            "--nsamples: 10000000 windows of 512 tokens from --data {data}",
        ),  # fmt: skip
        (["convert", "{model}", "{tmp}/foreign", "--to", "orbax", "--overwrite"], "jcompress"),
        (
            ["convert", "{model}", "{tmp}/x", "--to", "hf", "--tokenizer", "/nonexistent"],
            "--tokenizer: /nonexistent is not a directory",
        ),  # fmt: skip
        (
            ["convert", "{model}", "{tmp}/x", "--to", "hf", "--tokenizer", "{tmp}"],
            "--tokenizer: {tmp} has no tokenizer files",
        ),  # fmt: skip
        (["convert", "{model}", "{tmp}/x", "--to", "hf"], "SRC: {model} is not a jcompress"),
        (
            ["convert", "{model}", "{tmp}/x", "--to", "orbax", "--tokenizer", "{model}"],
            "--tokenizer: only applies with --to hf",
        ),  # fmt: skip
        # unbounded work: refused before it starts
        (["eigen", *EIGEN, "--nsamples", "100000"], "--nsamples: 100000 windows of 512 tokens"),
        (
            ["generate", "--model", "{model}", "--prompt", "a", "--max-new-tokens", "600"],
            "--max-new-tokens (600 after a 1-token prompt): 601 tokens exceed the model's 512 "
            "learned positions",
        ),  # fmt: skip
        (
            ["generate", "--model", "{model}", "--prompt", "a " * 600, "--max-new-tokens", "1"],
            "--prompt: 601 tokens exceed the model's 512 learned positions",
        ),  # fmt: skip
        (
            ["generate", "--model", "{llama}", "--prompt", "a", "--max-new-tokens", "600"],
            "--allow-long",
        ),  # fmt: skip
        # every EigenAttentionConfig field is a flag, validated by the config
        (["eigen", *EIGEN, "--min_rank_fraction", "2"], "min_rank_fraction: must be < 1"),
        (["eigen", *EIGEN, "--threshold-step", "0"], "threshold_step: must be in (0, 1)"),
        (["eigen", *EIGEN, "--layers", "("], "layers: bad regex"),
        (["eigen", *EIGEN, "--layers", "nomatch"], "--layers: rule 'nomatch' matches nothing"),
        (["eigen", *EIGEN, "--offload_dir", "/nope"], "--offload_dir: /nope is not a directory"),
        (["eigen", *EIGEN, "--min_rank", "x"], "--min-rank: invalid int value"),
        (["eigen", *EIGEN, "--ft_steps", "3"], "--ft_steps: only used with --fine_tune"),
        (["eigen", *EIGEN, "--eval_seqlen", "64"], "--eval_seqlen: only used with --eval_data"),
        (
            ["tucker", "--model", "{llama}", "--nsamples", "4", "--out", "{tmp}/o"],
            "--nsamples: only used with --calib_data",
        ),
        (
            ["stream", "tucker", "--model", "{llama}", "--seed", "3", "--out", "{tmp}/o"],
            "--seed: only used with --calib_data",
        ),
        (
            ["tucker", "--model", "{llama}", "--eval_max_windows", "2", "--out", "{tmp}/o"],
            "--eval_max_windows: only used with --eval_data",
        ),
        (["eigen", *EIGEN, "--prompt", ""], "--prompt: the prompt tokenizes to nothing"),
        (["eigen", *EIGEN, "--prompt", "a " * 600], "--prompt: 601 tokens exceed"),
        (
            [
                "sparge",
                "tune",
                "--model",
                "{llama}",
                "--data",
                "{data}",
                "--out",
                "{tmp}/t.safetensors",
                "--layer_l1",
                "99:0.04",
            ],
            "--layer_l1: layer 99 does not exist (the model has 4 layers)",
        ),
        (["eigen", *EIGEN, "--start_threshold", "0.3"], "start_threshold: 0.3 is not above"),
        (
            ["eigen", *EIGEN, "--rank_search", "bisect", "--min_rank_fraction", "0.98"],
            "min_rank_fraction: 0.98 of 4 x 32",
        ),
        (
            ["eigen", *EIGEN, "--rank_search", "bisect", "--min_threshold", "0.5"],
            "min_threshold: only used by rank_search='threshold'",
        ),
        (  # even at the walk's default value: the flag means nothing to the bisection
            ["eigen", *EIGEN, "--rank_search", "bisect", "--threshold_step", "0.02"],
            "--threshold_step: only used by --rank_search threshold",
        ),
        (
            [*STREAM_EIGEN_BISECT, "--threshold_step", "0.02"],
            "--threshold_step: only used by --rank_search threshold",
        ),
        (
            [*QUANT_APPLY, "--no_eval", "--eval_data", "{data}"],
            "--eval_data: not read with --no_eval",
        ),
        (
            [*QUANT_APPLY, "--eval_data", "{tmp}/afile", "--json", "{tmp}/afile", "--overwrite"],
            "--json: {tmp}/afile is the input --eval_data",
        ),
        (
            [
                "ppl",
                "--model",
                "{llama}",
                "--data",
                "{data}",
                "--attention",
                "block_sparse",
                "--tuned",
                "{tmp}/afile",
                "--json",
                "{tmp}/afile",
                "--overwrite",
            ],
            "--json: {tmp}/afile is the input --tuned",
        ),
        (
            [*STREAM_EIGEN_BISECT, "--min_rank", "128"],
            "min_rank: 128 leaves nothing to compress",
        ),
        (
            ["stream", "quant", *EIGEN, "--out", "{tmp}/o", "--rule", ".*=nvfp4"],
            "--calib_data: stream quant is data-free",
        ),
        (
            ["eigen", *EIGEN, "--rank_search", "bisect", "--min_rank", "128"],
            "min_rank: 128 leaves nothing to compress",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys, tmp_path, shared_data, opt_dir, llama_dir, argv, needle
):
    data = str(shared_data / "wikitext-2-raw" / "test.txt")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("mine")
    fmt = {"data": data, "model": str(opt_dir), "tmp": tmp_path, "llama": str(llama_dir)}
    argv = [a.format(**fmt) for a in argv]
    needle = needle.format(**fmt)
    before = tree(tmp_path)
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
    assert tree(tmp_path) == before  # nothing written, nothing removed


def test_distributed_without_a_cluster_is_one_line():
    """--distributed on a lone machine (no coordinator, no cluster JAX detects): one line,
    exit 2 (a fresh process: JAX's backend must not be up before it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    r = subprocess.run(
        [sys.executable, "-m", "jcompress", "ppl", "--distributed", "--model", "/nonexistent",
         "--data", "/nonexistent.txt"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jcompress: error: --distributed: no cluster")


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


# --------------------------------------------------------------------------- never destroy data


@pytest.fixture
def user_tree(tmp_path, opt_dir, shared_data):
    """A user's files: a model copy, a calibration text, a foreign directory, each with a
    sentinel; and a jcompress checkpoint stand-in (its sidecar is what `convert` checks)."""
    import shutil

    root = tmp_path / "user"
    model = root / "models" / "opt"
    shutil.copytree(opt_dir, model)
    (model / "SENTINEL").write_bytes(b"\x00do not lose me\xff")
    data = root / "calib.txt"
    data.write_bytes((shared_data / "wikitext-2" / "valid.txt").read_bytes()[:200_000])
    (root / "foreign").mkdir()
    (root / "foreign" / "SENTINEL").write_text("mine")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "jcompress.json").write_text("{}")
    (root / "link").symlink_to(model)
    return root


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eigen", "--out", "{m}"], "--out: {m} is the input --model"),
        (["eigen", "--out", "{u}/link"], "is the input --model"),
        (["eigen", "--out", "{u}/models"], "--out: {u}/models contains the input --model"),
        (["eigen", "--out", "{u}"], "contains the input --model"),
        (["eigen", "--out", "{m}/tokenizer.json"], "is part of the input --model"),
        (["eigen", "--json", "{m}/config.json"], "--json: {m}/config.json is part of the input"),
        (["eigen", "--json", "{u}/calib.txt"], "--json: {u}/calib.txt is the input --calib_data"),
        (["ppl", "--json", "{m}/config.json"], "is part of the input --model"),
        (["ppl", "--json", "{u}/calib.txt"], "is the input --data"),
        (["convert", "{m}", "{m}", "--to", "orbax"], "OUT: {m} is the input SRC"),
        (["convert", "{m}", "{u}/models", "--to", "orbax"], "contains the input SRC"),
        (["convert", "{u}/ckpt", "{u}/foreign", "--to", "hf"], "not written by jcompress"),
        (["convert", "{u}/ckpt", "{m}", "--to", "hf", "--tokenizer", "{m}"], "--tokenizer"),
        (["convert", "{u}/ckpt", "{u}/ckpt", "--to", "hf"], "is the input SRC"),
    ],
)
def test_overwrite_never_destroys_user_data(capsys, user_tree, argv, needle):
    u, m = user_tree, user_tree / "models" / "opt"
    argv = [a.format(u=u, m=m) for a in argv]
    if argv[0] == "eigen":
        argv += ["--model", str(m), "--calib_data", str(u / "calib.txt")]
    if argv[0] == "ppl":
        argv += ["--model", str(m), "--data", str(u / "calib.txt")]
    before = tree(u)
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 2 and err.count("\n") == 1, err
    assert needle.format(u=u, m=m) in err
    assert tree(u) == before  # every sentinel survives byte for byte


def test_eigen_without_eval_data_compresses_and_exports(capsys, tmp_path, shared_data, opt_dir):
    out = tmp_path / "run"
    argv = [
        "eigen", "--model", str(opt_dir),
        "--calib-data", str(shared_data / "wikitext-2" / "valid.txt"),
        # test_eigen_writes_report_and_both_exports's shapes: its compiled programs serve here
        "--nsamples", "8", "--seqlen", "128", "--avg_dim", "3", "--max-new-tokens", "5",
        "--layers", "model/decoder/layers/0", "--min_rank", "8", "--out", str(out),
    ]  # fmt: skip
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert "perplexity: not evaluated (no --eval_data given)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["extra"]["ppl_before"] is None and report["extra"]["eval_data"] is None
    assert "not evaluated" in (out / "report.md").read_text()
    assert (out / "dense" / "model.safetensors").is_file()
    assert (out / ".jcompress-output").is_file()  # so --overwrite may replace it later
    (out / "old-file").write_text("from the first run")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in err
    code, _, _ = run(capsys, *argv, "--overwrite", "--json", str(tmp_path / "r.json"))
    assert code == 0 and not (out / "old-file").exists()
    assert json.loads((tmp_path / "r.json").read_text())["extra"]["ppl_after"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "run"]


def test_every_eigen_config_field_is_a_flag():
    import dataclasses

    from jcompress.cli import build_parser
    from jcompress.cli.common import config_from_args
    from jcompress.eigen_attention import EigenAttentionConfig

    p = build_parser()
    given = {
        "nsamples": "7", "seqlen": "33", "avg_dim": "7", "error_budget": "0.1", "seed": "5",
        "threshold_step": "0.05", "start_threshold": "0.9", "min_threshold": "0.2",
        "min_rank": "3", "min_rank_fraction": "0.25", "batch_size": "2", "offload_dir": "/tmp",
        "gram_dtype": "float32",
    }  # fmt: skip
    fields = {f.name for f in dataclasses.fields(EigenAttentionConfig)}
    bools = {"allow_unmatched", "reference_mode", "per_head_ranks"}
    assert set(given) | {"layers", "rank_search"} | bools == fields
    for dashes in (False, True):
        argv = ["eigen", "--model", "m", "--calib_data", "c"]
        for k, v in given.items():
            argv += [f"--{k.replace('_', '-') if dashes else k}", v]
        argv += ["--layers", "a", "--layers", "b"]
        argv += ["--allow-unmatched" if dashes else "--allow_unmatched"]
        args = p.parse_args(argv)
        cfg = config_from_args(EigenAttentionConfig, args, args.config_fields)
        for k, v in given.items():
            assert str(getattr(cfg, k)) == v, k
        assert cfg.layers == ("a", "b") and cfg.allow_unmatched is True
    # defaults are the config's own (layers, Optional fields), seqlen left to the model
    args = p.parse_args(["eigen", "--model", "m", "--calib_data", "c"])
    cfg = config_from_args(EigenAttentionConfig, args, args.config_fields, seqlen=64)
    assert cfg == EigenAttentionConfig(seqlen=64)
    help_text = p._subparsers._group_actions[0].choices["eigen"].format_help()
    assert "--min_rank_fraction" in help_text and "(default: 0.02)" in help_text


def test_no_space_left_is_one_line(capsys, tmp_path, shared_data, opt_dir, monkeypatch):
    import errno

    from jcompress import atomic

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)
    out = tmp_path / "ppl.json"
    code, _, err = run(
        capsys, "ppl", "--model", str(opt_dir), "--data",
        str(shared_data / "wikitext-2-raw" / "test.txt"),
        "--seqlen", "256", "--max-windows", "8", "--json", str(out),  # test_ppl_... shapes
    )  # fmt: skip
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bars
    assert code == 2 and last.startswith("jcompress: error: --json: no space left on device")
    assert list(tmp_path.iterdir()) == []


def test_config_flags_maps_every_field_type():
    """The derivation future methods reuse: int/float/str/bool/Optional/tuple[str, ...]."""
    import argparse
    import dataclasses

    from jcompress.cli.common import config_flags, config_from_args

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Toy:
        """A toy method config.

        Attributes:
          rank: kept rank.
          ratio, scale: two numbers
            documented together.
          name: a name.
          fused: fuse the kernels.
          cap: optional cap; ``None``: no cap.
          tags: regexes.
        """

        rank: int = 4
        ratio: float = 0.5
        scale: float = 1.0
        name: str = "x"
        fused: bool = False
        cap: int | None = None
        tags: tuple[str, ...] = (".*",)

    p = argparse.ArgumentParser()
    names = config_flags(p, Toy, {"scale": None})
    assert names == ["rank", "ratio", "name", "fused", "cap", "tags"]
    args = p.parse_args([])
    assert config_from_args(Toy, args, names) == Toy()
    argv = ["--rank", "8", "--ratio", "0.25", "--name", "y", "--fused", "--cap", "3"]
    args = p.parse_args([*argv, "--tags", "a", "--tags", "b"])
    assert config_from_args(Toy, args, names) == Toy(
        rank=8, ratio=0.25, name="y", fused=True, cap=3, tags=("a", "b")
    )
    assert p.parse_args(["--no-fused"]).fused is False
    text = p.format_help()
    assert "two numbers documented together (default: 0.5)" in text
    assert "optional cap; None: no cap (default: None)" in text
    assert "--scale" not in text
