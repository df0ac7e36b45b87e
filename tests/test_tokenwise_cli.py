"""``jcompress tokenwise``: save_xy -> eval_fake / eval_smooth -> rank on opt-1m; errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jcompress.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_end_to_end_opt(capsys, tmp_path, opt_dir):
    xy = tmp_path / "xy"
    code, out, err = run(
        capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path", str(xy),
        "--label", "opt", "--cn", "2", "--eu", "2", "--length", "16", "--layout", "per_layer",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (xy / "opt").glob("*.safetensors")) == [
        f"opt_{i}.safetensors" for i in range(4)
    ]
    # --stream: the same cache from layers read one at a time
    code, out, err = run(
        capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path", str(xy),
        "--label", "opt_s", "--cn", "2", "--eu", "2", "--length", "16", "--layout", "per_layer",
        "--stream", "--offload_dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "weights held at once" in out
    from jcompress.quant.tokenwise import XYCache

    a, b = XYCache(xy / "opt"), XYCache(xy / "opt_s")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(b.get(k), a.get(k), rtol=1e-5, atol=1e-5, err_msg=k)
    res_path = tmp_path / "r.json"
    code, out, err = run(
        capsys, "tokenwise", "eval_fake", "--model_dir", str(opt_dir), "--xy_path",
        str(xy / "opt"), "--out_json", str(res_path), "--ranks", "2,8", "--qspecs",
        "nvfp4@128,fp4@in", "--chunk_tokens", "16",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(res_path.read_text())
    assert res["meta"]["grid_mode"] == "combined" and res["meta"]["xy_is_dir"] is True
    assert res["meta"]["qspecs"] == [["nvfp4", "na"], ["fp4", "in"]]
    agg = res["by_layer"]["0"]["mlp"]["agg"]
    assert list(agg) == [
        "rank=2;fmt=nvfp4;blk=na", "rank=2;fmt=fp4;blk=in",
        "rank=8;fmt=nvfp4;blk=na", "rank=8;fmt=fp4;blk=in",
    ]  # fmt: skip
    assert set(res["by_layer"]["0"]["mlp"]["by_proj"]) == {"fc1", "fc2"}
    assert set(res["by_layer"]["0"]["self_attn"]["by_proj"]) == {
        "q_proj", "k_proj", "v_proj", "out_proj"}  # fmt: skip
    # an existing result is not replaced without --overwrite (checked before loading)
    code, _, err = run(
        capsys, "tokenwise", "eval_fake", "--model_dir", str(opt_dir), "--xy_path",
        str(xy / "opt"), "--out_json", str(res_path),
    )  # fmt: skip
    assert code == 2 and "--out_json" in err and "already exists" in err
    sm_path = tmp_path / "s.json"
    grid = ["--ranks", "2,8", "--qspecs", "nvfp4@128,fp4@in", "--chunk_tokens", "16"]
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--alpha", "0.5", "--model_dir", str(opt_dir),
        "--xy_path", str(xy / "opt"), "--out_json", str(sm_path), *grid,  # eval_fake's grid
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(sm_path.read_text())["meta"]["smooth"] is True
    # no --alpha / --alphas / --smooth_model_dir: SmoothQuant's default alpha 0.5
    sd_path = tmp_path / "sd.json"
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--model_dir", str(opt_dir),
        "--xy_path", str(xy / "opt"), "--out_json", str(sd_path), *grid,
    )  # fmt: skip
    assert code == 0, err
    sd = json.loads(sd_path.read_text())
    assert sd["meta"]["smooth_source"] == "alpha" and set(sd["meta"]["smooth_alpha"].values()) == {
        0.5
    }
    sd["meta"].pop("model_dir"), sd["meta"].pop("xy_path")
    sm = json.loads(sm_path.read_text())
    sm["meta"].pop("model_dir"), sm["meta"].pop("xy_path")
    assert sd == sm
    code, out, err = run(capsys, "tokenwise", "rank", "--json", str(res_path))
    assert code == 0, err
    rank_dir = tmp_path / "r_rank"
    assert (rank_dir / "heatmap.png").stat().st_size > 0
    assert "Ranking-1" in (rank_dir / "rankings.md").read_text()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ranks", "8", "--qspecs", "nvfp4,fp9@in"], "--qspecs"),
        (["--ranks", "8,-2"], "--ranks: ranks must be >= 0"),
        (["--ranks", "x"], "--ranks: 'x' is not an integer"),
        (["--method", "tt"], "invalid choice"),
        (["--ranks", "4", "--chunk_tokens", "0"], "--chunk_tokens"),
    ],
)
def test_bad_flags_one_line(capsys, tmp_path, opt_dir, argv, needle):
    code, _, err = run(
        capsys, "tokenwise", "eval_fake", "--model_dir", str(opt_dir), "--xy_path",
        str(tmp_path / "none"), "--out_json", str(tmp_path / "o.json"), *argv,
    )  # fmt: skip
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_missing_cache_and_smooth_flags(capsys, tmp_path, opt_dir):
    code, _, err = run(
        capsys, "tokenwise", "eval_fake", "--model_dir", str(opt_dir), "--xy_path",
        str(tmp_path / "none"), "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--xy_path" in err and "does not exist" in err
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--alpha", "0.5", "--xy_path", str(tmp_path),
        "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--model_dir: required with --alpha" in err
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--xy_path", str(tmp_path),
        "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--model_dir: required" in err and "--smooth_model_dir" in err
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--alpha", "0.5", "--alphas", "0.3,0.7",
        "--model_dir", str(opt_dir), "--xy_path", str(tmp_path),
        "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--alphas: not allowed with argument --alpha" in err
    for alphas, needle in (
        ("0.3,,0.7", "--alphas: has an empty entry in '0.3,,0.7'"),
        ("0.3,0.30", "--alphas: a value is given twice in '0.3,0.30'"),
    ):
        code, _, err = run(
            capsys, "tokenwise", "eval_smooth", "--alphas", alphas, "--model_dir", str(opt_dir),
            "--xy_path", str(tmp_path), "--out_json", str(tmp_path / "o.json"),
        )  # fmt: skip
        assert code == 2 and needle in err, err
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--smooth_model_dir", str(opt_dir),
        "--model_dir", str(opt_dir), "--xy_path", str(tmp_path),
        "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--model_dir: not used with --smooth_model_dir" in err
    code, _, err = run(
        capsys, "tokenwise", "eval_smooth", "--alpha", "1.5", "--model_dir", str(opt_dir),
        "--xy_path", str(tmp_path), "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and "--alpha: must be in [0, 1]" in err
    code, _, err = run(
        capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path",
        str(tmp_path), "--label", "a", "--save_dtype", "int8",
    )  # fmt: skip
    assert code == 2 and "--save_dtype" in err
    for extra, needle in (
        (["--length", "1000"], "--length: 1000 tokens exceed the model's 512 learned positions"),
        (["--length", "500", "--cn", "5000"], "--cn: 5000 windows of 500 tokens from --cn_text"),
    ):
        code, _, err = run(
            capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path",
            str(tmp_path / "xy"), "--label", "a", *extra,
        )  # fmt: skip
        assert code == 2 and needle in err and "load_hf" not in err, err
        assert not (tmp_path / "xy").exists()
    # a library's message about a file names the flag that gave it
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    code, _, err = run(
        capsys, "tokenwise", "eval_fake", "--model_dir", str(opt_dir), "--xy_path",
        str(garbage), "--out_json", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 2 and err.startswith(f"jcompress: error: --xy_path: {garbage}: corrupt"), err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    code, _, err = run(
        capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path",
        str(tmp_path / "xy"), "--label", "a", "--eu_text", str(binary),
    )  # fmt: skip
    assert code == 2 and f"error: --eu_text: {binary}: not UTF-8 text" in err, err
    # the cache never replaces a text it reads, even with --overwrite
    text = tmp_path / "txt.safetensors"
    text.write_text("a text of a few words. " * 200)
    before = text.read_bytes()
    code, _, err = run(
        capsys, "tokenwise", "save_xy", "--model_dir", str(opt_dir), "--save_path",
        str(tmp_path), "--label", "txt", "--cn_text", str(text), "--overwrite",
    )  # fmt: skip
    assert code == 2 and "--cn_text" in err and len(err.strip().splitlines()) == 1, err
    assert text.read_bytes() == before
    code, _, err = run(capsys, "tokenwise", "rank", "--json", str(tmp_path / "nope.json"))
    assert code == 2 and "--json" in err


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, llama_dir):
    """``kill`` / ``timeout`` / a scheduler's SIGTERM while save_xy writes its cache: the
    command reports it, removes its half-written temporary and exits 143 (it left a hidden
    ``.run.tmp-*`` directory behind)."""
    out = tmp_path / "xy"
    out.mkdir()
    cmd = [sys.executable, "-c", "from jcompress.cli import console; console()",
           "tokenwise", "save_xy", "--model_dir", str(llama_dir), "--save_path", str(out),
           "--label", "run", "--cn", "200", "--eu", "200", "--stream",
           "--layout", "per_layer"]  # fmt: skip
    with open(tmp_path / "err", "wb") as err:  # a file: a full pipe would block the child
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            started = [p.name for p in out.iterdir()]
            assert started and proc.poll() is None, (proc.poll(), started)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            proc.kill()
            proc.wait()
    text = (tmp_path / "err").read_text()
    assert started[0].startswith(".run.tmp-"), started
    assert proc.returncode == 143, text[-2000:]
    assert "jcompress: terminated" in text and "Traceback" not in text, text[-2000:]
    assert list(out.iterdir()) == []
