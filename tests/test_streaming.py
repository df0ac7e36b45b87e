"""Layer streaming (jcompress.streaming): streamed ppl / EigenAttention equal the in-memory
runs, the loader's account stays at one layer + globals, kill + resume equals an
uninterrupted run, and bad work dirs / checkpoints are one clear error each.

The oracle is the in-memory path (``load_hf`` -> ``perplexity`` / ``eigen_attention.compress``
-> ``save_hf``), which is tested on its own against transformers elsewhere; the model is
llama-1m re-saved as 5 shards (trained weights, so EigenAttention picks real ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jcompress
from jcompress.eigen_attention import EigenAttentionConfig
from jcompress.eigen_attention import compress as eigen_compress
from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf
from jcompress.models.convert import flatten
from jcompress.models.safetensors_io import SafetensorsFile
from jcompress.streaming import (
    GLOBAL,
    PICKED,
    LayerLoader,
    fingerprint,
    stream_compress,
    stream_perplexity,
)

CONFIG = EigenAttentionConfig(nsamples=8, seqlen=32, avg_dim=4, batch_size=3, error_budget=0.05)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, llama_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    out = tmp_path_factory.mktemp("stream") / "llama-sharded"
    jcompress.save_hf(cfg, params, out, tokenizer_dir=llama_dir, max_shard_bytes=1_500_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # several shards, layers split across
    return out, cfg, params


@pytest.fixture(scope="module")
def calib(sharded):
    rng = np.random.default_rng(0)
    return rng.integers(0, sharded[1].vocab_size, (CONFIG.nsamples, CONFIG.seqlen)).astype(np.int32)


@pytest.fixture(scope="module")
def in_memory(sharded, calib):
    _, cfg, params = sharded
    return eigen_compress(params, cfg, calib, config=CONFIG, progress=False)


@pytest.fixture(scope="module")
def streamed_dense(sharded, calib, tmp_path_factory):
    model, _, _ = sharded
    out = tmp_path_factory.mktemp("dense") / "out"
    res = stream_compress(
        model, out, eigen_compress, config=CONFIG, calib=calib, method="eigen", progress=False
    )
    return out, res


def test_loader_reads_one_layer_and_accounts(sharded):
    model, cfg, params = sharded
    loader = LayerLoader(model)
    flat = flatten(params)
    sizes = {
        g: sum(
            int(np.asarray(flat[p]).nbytes)
            for p in flat
            if jcompress.streaming.layer_of(cfg, p) == g
        )
        for g in [GLOBAL, *range(cfg.num_layers)]
    }
    assert loader.group_bytes == sizes  # header-only accounting == what load_hf would hold
    lay2 = loader.layer(2)
    assert set(lay2) == {p for p in flat if p.startswith("model/layers/2/")}
    for p, v in lay2.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat[p]))
    assert loader.resident_bytes == sizes[2]
    with pytest.raises(RuntimeError, match="already held"):
        loader.layer(2)
    loader.release(2)
    assert loader.resident_bytes == 0 and loader.peak_bytes == sizes[2]


def test_loader_reads_given_paths_only(sharded):
    model, cfg, params = sharded
    loader = LayerLoader(model)
    flat = flatten(params)
    want = ["model/layers/3/mlp/down_proj/kernel", "model/layers/0/self_attn/k_proj/kernel",
            "model/norm/scale"]  # fmt: skip
    got = loader.read(want)
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(flat[p]), err_msg=p)
    held = sum(int(np.asarray(flat[p]).nbytes) for p in want)
    assert loader.resident_bytes == loader.peak_bytes == held
    with pytest.raises(RuntimeError, match="already held"):
        loader.read(want[:1])
    loader.release(PICKED)
    assert loader.resident_bytes == 0
    with pytest.raises(UserError, match="paths: model/layers/9/mlp/up_proj/kernel is not a"):
        loader.read(["model/layers/9/mlp/up_proj/kernel", want[0]])


def test_streamed_ppl_equals_in_memory(sharded, tmp_path):
    model, cfg, params = sharded
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 7 * 24)
    ref = jcompress.perplexity(cfg, params, ids, seqlen=24, batch_size=3, progress=False)
    loader = LayerLoader(model)
    got = stream_perplexity(
        loader, ids, seqlen=24, batch_size=3, progress=False, offload_dir=tmp_path
    )
    assert got.n_windows == ref.n_windows == 7
    np.testing.assert_allclose(got.nlls, ref.nlls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.ppl, ref.ppl, rtol=1e-5)
    layer_max = max(loader.group_bytes[i] for i in range(cfg.num_layers))
    assert loader.peak_bytes <= max(layer_max, loader.group_bytes[GLOBAL])
    assert loader.resident_bytes == 0


def test_streamed_eigen_equals_in_memory(sharded, in_memory, streamed_dense):
    _, cfg, _ = sharded
    want_tree, want_rep = in_memory
    assert any(r.compressed for r in want_rep.layers)  # the comparison covers real factors
    out, res = streamed_dense
    rep = res.report
    # every layer's report (ranks, thresholds, errors) equals the in-memory run's
    got_layers = rep.method_report.layers
    assert [(r.rank_kq, r.rank_v, r.threshold, r.steps) for r in got_layers] == [
        (r.rank_kq, r.rank_v, r.threshold, r.steps) for r in want_rep.layers
    ]
    np.testing.assert_allclose(
        [r.error for r in got_layers], [r.error for r in want_rep.layers], rtol=1e-5
    )
    assert rep.method_report.params_after == want_rep.params_after
    # the dense-equivalent checkpoint holds materialize(in-memory tree)
    cfg2, got = jcompress.load_hf(out)
    assert cfg2 == cfg
    want = flatten(jcompress.materialize(want_tree))
    got = flatten(got)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_allclose(
            np.asarray(got[p]), np.asarray(want[p]), rtol=1e-5, atol=1e-6, err_msg=p
        )
    # stock transformers loads the streamed checkpoint (a sharded index of layer shards)
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jcompress.forward(cfg, want_tree, ids))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # the loader held one layer (+ the globals while layer 0's inputs were embedded)
    assert rep.peak_loaded_bytes <= rep.max_layer_bytes + rep.globals_bytes
    assert rep.peak_loaded_bytes < rep.model_bytes / 2
    assert not out.with_name("out.stream").exists()  # the work dir is gone


def test_streamed_eigen_factors(sharded, calib, in_memory, tmp_path):
    model, _, _ = sharded
    out = tmp_path / "factors"
    stream_compress(
        model, out, eigen_compress, config=CONFIG, calib=calib, factors=True, progress=False,
        offload_dir=tmp_path,
    )  # fmt: skip
    _, got = jcompress.load_hf(out)
    # V's basis and o_proj's folded copy are stored once per layer and linked
    meta = json.loads((out / "config.json").read_text())["jcompress_factors"]
    assert meta["format"] == 2 and any(k.endswith("o_proj/kernel/ut") for k in meta["links"])
    want, got = flatten(in_memory[0]), flatten(got)
    assert set(got) == set(want)
    for p, w in want.items():
        assert type(got[p]) is type(w), p
        for a, b in zip(jax.tree.leaves(got[p]), jax.tree.leaves(w), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert any(isinstance(v, CompressedLeaf) for v in got.values())


class _Killed(Exception):
    pass


def test_kill_then_resume_equals_uninterrupted(sharded, calib, streamed_dense, tmp_path):
    model, _, _ = sharded
    out = tmp_path / "out"

    def kill_after_1(i):
        if i == 1:
            raise _Killed

    with pytest.raises(_Killed):
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, progress=False,
                        on_layer=kill_after_1)  # fmt: skip
    work = tmp_path / "out.stream"
    assert json.loads((work / "manifest.json").read_text())["done"] == [0, 1]
    assert not out.exists()
    with pytest.raises(UserError, match="resume"):  # never silently reused
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, progress=False)
    other = EigenAttentionConfig(**{**CONFIG.__dict__, "error_budget": 0.02})
    with pytest.raises(UserError, match="different run.*error_budget"):
        stream_compress(model, out, eigen_compress, config=other, calib=calib, resume=True,
                        progress=False)  # fmt: skip
    with pytest.raises(UserError, match="different run.*calib"):
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib[::-1].copy(),
                        resume=True, progress=False)  # fmt: skip
    res = stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, resume=True,
                          progress=False)  # fmt: skip
    assert res.report.resumed_from == 2
    ref_out, ref = streamed_dense
    # layers 0-1 rebuilt from the manifest's JSON, 2-3 from this process: all equal
    assert res.report.method_report.layers == ref.report.method_report.layers
    assert res.report.method_report.params_after == ref.report.method_report.params_after
    for f in sorted(p.name for p in ref_out.glob("*.safetensors")):
        a, b = SafetensorsFile(ref_out / f), SafetensorsFile(out / f)
        assert a.keys() == b.keys()
        for k in a.keys():
            np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=f"{f}:{k}")
    assert not work.exists()


# The child of the real-kill test: a streamed EigenAttention run that, while the file HOLD
# exists, stops after each finished layer (its manifest committed) until it is killed.
_CHILD = """
import os, sys, time
import numpy as np
from jcompress.eigen_attention import EigenAttentionConfig, compress
from jcompress.streaming import stream_compress
model, out, calib, hold = sys.argv[1:5]
cfg = EigenAttentionConfig(**eval(sys.argv[5]))
def pause(i):
    while os.path.exists(hold):
        time.sleep(0.05)
stream_compress(model, out, compress, config=cfg, calib=np.load(calib), method="eigen",
                resume=True, progress=False, on_layer=pause)
"""


def test_sigkill_then_resume_equals_uninterrupted(sharded, calib, streamed_dense, tmp_path):
    """A process killed by SIGKILL (no exception handler, no ``finally``: a stale lock is
    left) after a finished layer resumes, with the same command, to the uninterrupted run's
    checkpoint bit for bit, and leaves no work directory or temporary file behind."""
    model, _, _ = sharded
    out, work, hold = tmp_path / "out", tmp_path / "out.stream", tmp_path / "hold"
    np.save(tmp_path / "calib.npy", calib)
    cmd = [sys.executable, "-c", _CHILD, str(model), str(out), str(tmp_path / "calib.npy"),
           str(hold), repr(dataclasses.asdict(CONFIG))]  # fmt: skip
    hold.touch()
    err = open(tmp_path / "child.err", "wb")  # a file: a full pipe would block the child
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        done: list[int] = []
        deadline = time.monotonic() + 600
        while not done and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not yet written
                done = json.loads((work / "manifest.json").read_text())["done"]
        assert done, f"no layer finished: {proc.poll()} {(tmp_path / 'child.err').read_text()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        err.close()
    assert proc.returncode == -signal.SIGKILL
    done = json.loads((work / "manifest.json").read_text())["done"]
    assert 1 <= len(done) < 4 and done == list(range(len(done)))
    assert (work / ".lock").read_text().strip() == str(proc.pid)  # the dead owner's lock
    assert not out.exists()
    hold.unlink()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ref_out, ref = streamed_dense
    got = json.loads((out / "jcompress_stream_report.json").read_text())
    assert got["resumed_from"] == len(done)

    def timeless(layers):  # every layer's report but its wall time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in layers]

    want_layers = json.loads(json.dumps(ref.report.to_json()["method_report"]["layers"]))
    assert timeless(got["method_report"]["layers"]) == timeless(want_layers)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_out.iterdir())
    for f in sorted(p.name for p in ref_out.glob("*.safetensors")):
        a, b = SafetensorsFile(ref_out / f), SafetensorsFile(out / f)
        assert a.keys() == b.keys()
        for k in a.keys():
            np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=f"{f}:{k}")
    for name in ("config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (ref_out / name).read_bytes()
    # nothing partial or temporary: the work dir (lock, inputs, shards) is gone, no stray files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "child.err", "out"]


def test_resume_with_another_model_is_an_error(sharded, calib, tmp_path, llama_dir):
    model, _, _ = sharded
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, progress=False,
                        on_layer=lambda i: (_ for _ in ()).throw(_Killed()))  # fmt: skip
    lock = tmp_path / "out.stream" / ".lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process holds the work directory
    with pytest.raises(UserError, match="in use by process"):
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, resume=True,
                        progress=False)  # fmt: skip
    lock.unlink()
    with pytest.raises(UserError, match="different run.*model"):
        stream_compress(llama_dir, out, eigen_compress, config=CONFIG, calib=calib,
                        resume=True, progress=False)  # fmt: skip
    # another fine-tune of the same architecture: the same shards and headers, other bytes
    _, cfg, params = sharded
    tuned = tmp_path / "tuned"
    other = jax.tree.map(lambda x: x * 1.01, params)
    jcompress.save_hf(cfg, other, tuned, tokenizer_dir=llama_dir, max_shard_bytes=1_500_000)
    a, b = fingerprint(model)["files"], fingerprint(tuned)["files"]
    shards = [k for k in a if k.endswith(".safetensors")]
    assert a.keys() == b.keys() and all(a[k]["header"] == b[k]["header"] for k in shards)
    with pytest.raises(UserError, match="different run.*model"):
        stream_compress(tuned, out, eigen_compress, config=CONFIG, calib=calib,
                        resume=True, progress=False)  # fmt: skip


def test_bad_checkpoints_are_one_clear_error(sharded, tmp_path):
    model, _, _ = sharded
    bad = tmp_path / "m"
    shutil.copytree(model, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (bad / shard).rename(bad / "elsewhere")
    with pytest.raises(UserError, match=f"missing weights file: .*{shard}"):
        LayerLoader(bad)
    (bad / "elsewhere").rename(bad / shard)
    raw = (bad / shard).read_bytes()
    (bad / shard).write_bytes(raw[:8] + b"x" + raw[9:])
    with pytest.raises(UserError, match="corrupt safetensors header"):
        LayerLoader(bad)
    (bad / shard).write_bytes(raw)
    name = next(k for k, v in index["weight_map"].items() if v == shard)
    index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"tensor {name} is not in"):
        LayerLoader(bad)


def test_method_that_reads_other_layers_is_refused(sharded, tmp_path):
    model, _, _ = sharded

    def global_method(params, cfg, calib=None, *, config, progress=True):
        return jax.tree.map(lambda x: x * 2, params), None

    with pytest.raises(UserError, match="outside the layer being streamed"):
        stream_compress(model, tmp_path / "o", global_method, config=CONFIG, progress=False)


def test_cli_stream_eigen_then_ppl_stream(capsys, tmp_path):
    from jcompress.cli import bundled_calib_text, bundled_eval_text, bundled_model_dir, main

    out = tmp_path / "out"
    argv = ["stream", "eigen", "--model", str(bundled_model_dir()), "--calib_data",
            str(bundled_calib_text()), "--out", str(out), "--nsamples", "8", "--seqlen", "32",
            "--avg_dim", "4", "--batch_size", "3"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "loader peak" in text and f"wrote {out}" in text
    rep = json.loads((out / "jcompress_stream_report.json").read_text())
    assert rep["method"] == "eigen" and len(rep["method_report"]["layers"]) == 4
    assert main(argv) == 2  # --out exists: one line, exit 2
    assert "already exists" in capsys.readouterr().err
    ppl = ["ppl", "--model", str(out), "--data", str(bundled_eval_text()), "--seqlen", "32",
           "--max-windows", "5", "--batch-size", "2"]  # fmt: skip
    assert main([*ppl, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*ppl, "--stream", "--json", str(tmp_path / "b.json")]) == 0
    assert "weights held at once" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert b["streamed"] and not a["streamed"]
    np.testing.assert_allclose(b["ppl"], a["ppl"], rtol=1e-5)
    assert main([*ppl, "--offload-dir", str(tmp_path)]) == 2  # needs --stream


def test_streamed_tucker_with_layer_rules_equals_in_memory(sharded, calib, tmp_path):
    from jcompress.tucker import TuckerConfig
    from jcompress.tucker import compress as tucker_compress

    model, cfg, params = sharded
    config = TuckerConfig(
        variant="tucker",
        hooi_ranks=(16, 4, 8),
        hooi_iters=3,
        layers=("model/layers/[13]/self_attn/(k|v)_proj", "model/layers/9/.*"),
        allow_unmatched=True,
    )
    with pytest.warns(UserWarning, match="matches nothing"):
        want, want_rep = tucker_compress(params, cfg, calib, config=config, progress=False)
    out = tmp_path / "t"
    with pytest.warns(UserWarning, match=r"selected nothing in any layer: model/layers/9/\.\*"):
        res = stream_compress(model, out, tucker_compress, config=config, calib=calib, factors=True,
                              progress=False)  # fmt: skip
    assert res.report.unmatched_rules == ("model/layers/9/.*",)
    got_rep = res.report.method_report  # the per-layer reports merged into one
    assert got_rep.projections == want_rep.projections
    # layer output errors: layer 0 (nothing selected, no stream) embedded by the runner,
    # layer 1 streamed from its saved inputs, layer 2 fed the original layer's outputs
    assert [p for p, _ in got_rep.layer_errors] == ["model/layers/1", "model/layers/3"]
    np.testing.assert_allclose(
        [e for _, e in got_rep.layer_errors], [e for _, e in want_rep.layer_errors], rtol=1e-5
    )
    assert (got_rep.params_after, got_rep.kv_cache_after) == (
        want_rep.params_after,
        want_rep.kv_cache_after,
    )
    assert got_rep.unmatched_rules == want_rep.unmatched_rules
    _, got = jcompress.load_hf(out)
    want, got = flatten(want), flatten(got)
    typed = sorted(p for p, v in want.items() if isinstance(v, CompressedLeaf))
    assert typed == [f"model/layers/{i}/self_attn/{r}_proj/kernel" for i in (1, 3) for r in "kv"]
    assert sorted(p for p, v in got.items() if isinstance(v, CompressedLeaf)) == typed
    for p in typed:
        for a, b in zip(jax.tree.leaves(got[p]), jax.tree.leaves(want[p]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # a rule that matches no path of the model at all: one line, before any work
    bad = TuckerConfig(variant="tucker", hooi_ranks=(16, 4, 8), layers=("model/layer/1/.*",))
    with pytest.raises(UserError, match="layers: rule 'model/layer/1/.\\*' matches no path"):
        stream_compress(model, tmp_path / "u", tucker_compress, config=bad, progress=False)
    assert not (tmp_path / "u.stream").exists()


def test_streamed_quant_with_globals_step_equals_in_memory(sharded, tmp_path):
    from jcompress.quant.apply import QuantApplyConfig
    from jcompress.quant.apply import compress as quant_compress

    model, cfg, params = sharded
    config = QuantApplyConfig(rules=(("model/layers/[02]/mlp/.*", "nvfp4"), ("lm_head", "nvfp4")))
    want, want_rep = quant_compress(params, cfg, config=config, progress=False)
    res = stream_compress(model, tmp_path / "q", quant_compress, config=config, factors=True,
                          globals_step=True, progress=False)  # fmt: skip
    _, got = jcompress.load_hf(tmp_path / "q")
    want, got = flatten(want), flatten(got)
    typed = sorted(p for p, v in want.items() if isinstance(v, CompressedLeaf))
    assert "lm_head/kernel" in typed and len(typed) == 7
    assert sorted(p for p, v in got.items() if isinstance(v, CompressedLeaf)) == typed
    for p in want:  # quantization is deterministic: bit-equal codes and scales
        for a, b in zip(jax.tree.leaves(got[p]), jax.tree.leaves(want[p]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    assert sorted(r.path for r in res.report.method_report.layers) == sorted(
        r.path for r in want_rep.layers
    )
    # without the globals step the head stays dense and its rule is reported unused
    with pytest.warns(UserWarning, match="selected nothing in any layer: lm_head"):
        res = stream_compress(model, tmp_path / "q2", quant_compress, config=config,
                              progress=False)  # fmt: skip
    assert res.report.unmatched_rules == ("lm_head",)


# -- analyses: a result per layer instead of a checkpoint (stream_analysis) --------------------


def _recording(loader):
    """The loader, recording which decoder layers it reads."""
    seen, read = [], loader.layer

    def layer(i):
        seen.append(i)
        return read(i)

    loader.layer = layer
    return seen


def test_streamed_sparge_tune_equals_in_memory_and_resumes(sharded, tmp_path):
    from jcompress.sparge import tune as T

    model, cfg, params = sharded
    config = T.SpargeTuneConfig(l1=0.1, pv_l1=0.15, layer_l1=("0:0.05",), nsamples=2, seqlen=64,
                                batch_size=2, block_q=16, block_k=16, sim_grid=2, cdf_steps=3,
                                pv_steps=2)  # fmt: skip
    windows = np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 64)).astype(np.int32)
    want, want_rep = T.tune(cfg, params, windows, config, progress=False)
    work = tmp_path / "work"

    def kill_after_1(i):
        if i == 1:
            raise _Killed

    with pytest.raises(_Killed):
        T.stream_tune(model, windows, config, work_dir=work, progress=False,
                      on_layer=kill_after_1)  # fmt: skip
    man = json.loads((work / "manifest.json").read_text())
    assert man["done"] == [0, 1] and sorted(man["results"]) == ["0", "1"]
    with pytest.raises(UserError, match="resume"):  # an existing work dir is never reused
        T.stream_tune(model, windows, config, work_dir=work, progress=False)
    with pytest.raises(UserError, match="different run.*calib"):
        T.stream_tune(model, windows[::-1].copy(), config, work_dir=work, resume=True,
                      progress=False)  # fmt: skip
    loader = LayerLoader(model)
    seen = _recording(loader)
    got, rep = T.stream_tune(loader, windows, config, work_dir=work, resume=True,
                             offload_dir=tmp_path, progress=False)  # fmt: skip
    assert seen == [2, 3] and not work.exists()
    for name, a, b in zip(want._fields, want, got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, err_msg=name)
    assert [(r.layer, r.l1_bound, r.pv_l1_bound, r.evaluations) for r in rep.layers] == [
        (r.layer, r.l1_bound, r.pv_l1_bound, r.evaluations) for r in want_rep.layers
    ]
    for a, b in zip(rep.layers, want_rep.layers, strict=True):
        for key in ("row_sparsity", "tile_sparsity"):
            np.testing.assert_allclose([getattr(h, key) for h in a.heads],
                                       [getattr(h, key) for h in b.heads], rtol=1e-6)  # fmt: skip
        assert [h.dense for h in a.heads] == [h.dense for h in b.heads]
    layer_max = max(loader.group_bytes[i] for i in range(cfg.num_layers))
    assert loader.peak_bytes == layer_max and loader.resident_bytes == 0


def test_streamed_ged_capture_stops_at_the_deepest_layer(sharded, tmp_path):
    from jcompress.ged import CaptureConfig, capture_activations, resolve_hook, stream_capture

    model, cfg, params = sharded
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (9, 5, 12, 7, 9, 3, 8)]
    positions = [np.sort(rng.choice(x.size, min(2, x.size), replace=False)) for x in ids]
    capture = CaptureConfig(layers=(2, 0), batch_size=3, hook="post")
    want = capture_activations(cfg, params, ids, positions, resolve_hook(cfg, capture), (2, 0),
                               batch_size=3)  # fmt: skip
    loader = LayerLoader(model)
    seen = _recording(loader)
    got = stream_capture(loader, ids, positions, capture, work_dir=tmp_path / "w",
                         offload_dir=tmp_path)  # fmt: skip
    assert seen == [0, 1, 2]  # layer 3 is past the deepest requested layer: never read
    assert got.shape == want.shape == (2, 14, cfg.intermediate_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # layer 0's inputs were embedded: the embedding table was held with it, nothing more
    assert loader.peak_bytes <= loader.group_bytes[0] + loader.group_bytes[GLOBAL]
    assert loader.resident_bytes == 0 and not (tmp_path / "w").exists()
    with pytest.raises(UserError, match="layers: layer 7 out of range"):
        stream_capture(model, ids, positions, CaptureConfig(layers=(7,)))


def test_broken_weights_leave_no_work_dir(sharded, calib, tmp_path):
    """NaN weights in a later layer stop the run there, and the work directory it made goes
    with it: a resume would meet the same NaN, so a rerun after the fix starts clean."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "broken"
    shutil.copytree(sharded[0], model)
    key = "model.layers.2.mlp.up_proj.weight"
    shard = next(p for p in model.glob("*.safetensors") if key in SafetensorsFile(p).keys())
    tensors = load_file(shard)
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, shard, metadata=SafetensorsFile(shard).metadata)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"{key}: 1 of .* NaN or Inf"):
        stream_compress(model, out, eigen_compress, config=CONFIG, calib=calib, method="eigen",
                        progress=False)  # fmt: skip
    assert not out.exists() and not (tmp_path / "out.stream").exists()
