"""SpargeAttn evaluation streamed from the shards (``sparge eval --stream``,
:func:`jcompress.sparge.tune.stream_evaluate`, ``stream_perplexity`` with tuned thresholds) and
``ppl --attention block_sparse --tuned``, on llama-1m with tiny windows. Oracles: the in-memory
:func:`~jcompress.sparge.tune.evaluate` / :func:`jcompress.perplexity` on the whole model, and
the loader's account of what was held."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jcompress.kernels.sparse_attention import BlockSizes

import jcompress
from jcompress import sparge
from jcompress.cli import main
from jcompress.models import attention as A
from jcompress.sparge import tune as T
from jcompress.streaming import GLOBAL, LayerLoader, stream_perplexity

BQ, BK, SEQ = 16, 8, 64


@pytest.fixture(scope="module")
def llama(llama_dir):
    return jcompress.load_hf(llama_dir)


@pytest.fixture(scope="module")
def thresholds(llama):
    """Non-trivial per-layer, per-head thresholds (drop blocks, skip some PV), seeded."""
    cfg, _ = llama
    rng = np.random.default_rng(3)
    shape = (cfg.num_layers, cfg.num_heads)
    return sparge.SpargeParams.create(
        cfg.num_layers, cfg.num_heads,
        simthreshd1=rng.uniform(-0.5, 0.9, shape), cdfthreshd=rng.uniform(0.3, 0.9, shape),
        pvthreshd=rng.uniform(2.0, 20.0, shape),
    )  # fmt: skip


def _one_layer_at_a_time(loader, cfg):
    layer_max = max(loader.group_bytes[i] for i in range(cfg.num_layers))
    assert loader.peak_bytes <= max(layer_max, loader.group_bytes[GLOBAL])
    assert loader.peak_bytes < sum(loader.group_bytes.values()) / 2
    assert loader.resident_bytes == 0


def test_stream_evaluate_and_ppl_equal_in_memory(llama, llama_dir, thresholds, tmp_path):
    # shapes as in test_sparge_tune and the CLI test below (2 windows of 64, blocks 16 x 8):
    # the compiled functions are shared
    cfg, params = llama
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)
    untuned = sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads)
    sets = {"tuned": thresholds, "untuned": untuned}
    loader = LayerLoader(llama_dir)
    got = T.stream_evaluate(loader, windows, sets, block_q=BQ, block_k=BK, batch_size=2,
                            offload_dir=tmp_path)  # fmt: skip
    _one_layer_at_a_time(loader, cfg)
    for name, p in sets.items():
        ref = T.evaluate(cfg, params, windows, p, block_q=BQ, block_k=BK, batch_size=2)
        assert set(got[name]) == set(ref)
        for k in ref:
            assert got[name][k].shape == (cfg.num_layers, cfg.num_heads)
            np.testing.assert_allclose(got[name][k], ref[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {k}")  # fmt: skip
    assert np.mean(got["tuned"]["row_sparsity"]) > 0.05  # the thresholds do drop blocks
    # independent path: the masked reference attention against dense attention on the
    # in-memory q/k/v (L1, kept (row, block) pairs and tiles per head)
    bs = BlockSizes(block_q=BQ, block_k=BK)
    for li, ((q, k, v, valid, scale),) in T.layer_qkv(cfg, params, windows, batch_size=2):
        out, st = sparge.attention(q, k, v, thresholds, layer=li, block_sizes=bs, scale=scale,
                                   implementation="reference")  # fmt: skip
        dense = np.asarray(A.Dense()(q, k, v, A.causal_mask(valid), scale=scale))
        l1 = np.abs(np.asarray(out) - dense).sum((0, 1, 3)) / np.abs(dense).sum((0, 1, 3))
        np.testing.assert_allclose(got["tuned"]["l1"][li], l1, atol=1e-4)
        np.testing.assert_allclose(got["tuned"]["row_sparsity"][li], 1 - np.asarray(st.kept),
                                   atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(got["tuned"]["tile_sparsity"][li], 1 - np.asarray(st.tiles),
                                   atol=1e-4)  # fmt: skip

    attn = sparge.BlockSparse(block_q=BQ, block_k=BK, implementation="xla")
    ids = windows.reshape(-1)
    kw = dict(seqlen=SEQ, batch_size=2, progress=False, attention=attn)
    loader = LayerLoader(llama_dir)
    ppl = {}
    for name, p in sets.items():
        ref = jcompress.perplexity(cfg, params, ids, attention_state=p, **kw)
        ppl[name] = stream_perplexity(loader, ids, attention_state=p, **kw)
        np.testing.assert_allclose(ppl[name].nlls, ref.nlls, rtol=1e-5, atol=1e-6, err_msg=name)
    assert abs(ppl["tuned"].mean_nll - ppl["untuned"].mean_nll) > 1e-4  # the state is used
    _one_layer_at_a_time(loader, cfg)


def test_cli_eval_stream_and_ppl_tuned(llama_dir, shared_data, thresholds, tmp_path, capsys):
    tuned = tmp_path / "tuned.safetensors"
    sparge.save_params(tuned, thresholds, extra={"block_q": BQ, "block_k": BK})
    data = str(shared_data / "wikitext-2-raw" / "test.txt")
    ev = ["sparge", "eval", "--model", str(llama_dir), "--tuned", str(tuned), "--data", data,
          "--seqlen", str(SEQ), "--max_windows", "2", "--batch_size", "2"]  # fmt: skip
    assert main([*ev, "--offload_dir", str(tmp_path)]) == 2  # needs --stream
    assert "--offload_dir: only with --stream" in capsys.readouterr().err
    assert main([*ev, "--stream", "--resume"]) == 2  # nothing to resume from
    assert "--resume: needs --work_dir" in capsys.readouterr().err
    assert main([*ev, "--out_dir", str(tmp_path / "mem")]) == 0
    assert main([*ev, "--stream", "--offload_dir", str(tmp_path),
                 "--out_dir", str(tmp_path / "str")]) == 0  # fmt: skip
    assert "weights held at once" in capsys.readouterr().out
    assert not (tmp_path / "str.stream").exists()  # the work directory went on success
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("mem", "str"))
    assert (a["block_q"], a["block_k"]) == (b["block_q"], b["block_k"]) == (BQ, BK)
    for name in ("dense", "tuned", "untuned"):
        np.testing.assert_allclose(b["perplexity"][name], a["perplexity"][name], rtol=1e-5)
    for name in ("tuned", "untuned"):
        for k, v in a["held_out"][name].items():
            np.testing.assert_allclose(b["held_out"][name][k], v, atol=2e-5, err_msg=k)
    assert a["perplexity"]["tuned"] != a["perplexity"]["untuned"]

    # ppl --attention block_sparse --tuned: sparge eval's tuned perplexity, streamed or not
    ppl = ["ppl", "--model", str(llama_dir), "--data", data, "--seqlen", str(SEQ),
           "--max-windows", "2", "--batch-size", "2", "--attention", "block_sparse",
           "--tuned", str(tuned)]  # fmt: skip
    for extra, out in (([], "p.json"), (["--stream"], "ps.json")):
        assert main([*ppl, *extra, "--json", str(tmp_path / out)]) == 0
        got = json.loads((tmp_path / out).read_text())
        assert got["tuned"] == str(tuned) and got["streamed"] == bool(extra)
        np.testing.assert_allclose(got["ppl"], a["perplexity"]["tuned"], rtol=1e-5)
    capsys.readouterr()
    # --tuned needs block_sparse; a file for another shape: the loader's error, one line
    assert main([*ppl[:-4], "--tuned", str(tuned)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tuned: only with --attention block_sparse" in err
    other = tmp_path / "other.safetensors"
    sparge.save_params(other, sparge.SpargeParams.create(2, 3))
    assert main([*ppl[:-1], str(other), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 layers x 3 heads; the model has 4 layers x 8 heads" in err
