"""bench/sparge.py: the rows' dense-fits fallback and the sparsity-vs-speed curve (JSON + PNG).

Timing sides run in-process here (a Context whose ``side`` calls the function directly), at the
dry size; the curve's plotting is checked from a hand-written ``python -m bench --out`` file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import sparge as B
from bench.harness import REGISTRY, BenchError, Context, make_row, table


class _InProcess(Context):
    def side(self, fn, label, **kwargs):
        self.calls.append((fn.__name__, kwargs.get("impl")))
        return fn(**kwargs)


def _ctx(tmp_path: Path) -> _InProcess:
    ctx = _InProcess("sparge_test", "dry", tmp_path)
    ctx.calls = []
    return ctx


def test_full_size_is_the_issue_size_and_dense_bytes():
    assert B.FULL == (8192, 32, 128)
    assert B.dense_bytes(8192, 32) == 2 * 32 * 8192 * 8192 * 4  # ~17.2 GB of fp32 scores


def test_row_falls_back_to_chunked_when_dense_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "mem_available", lambda: 64 * 2**30)
    ctx = _ctx(tmp_path)
    row = B._row(ctx, 0.5)
    assert ctx.calls == [("side_sparse", None), ("side_impl", "dense")]
    assert row["info"]["baseline"] == "dense" and "chunked" not in row["size"]
    # 1 MiB available: the 256-token dense scores (2 x 2 x 256 x 256 x 4 B) do not fit in 70%
    monkeypatch.setattr(B, "mem_available", lambda: 2**20)
    ctx = _ctx(tmp_path)
    row = B._row(ctx, 0.5)
    assert ("side_impl", "dense") not in ctx.calls and ("side_impl", "chunked") in ctx.calls
    assert row["info"]["baseline"] == "chunked" and row["baseline"] is not None
    assert "dense needs ~0.0 GiB" in row["size"] and "baseline is chunked" in row["size"]
    assert 0 <= row["info"]["sparsity"] < 1 and row["ours"]["value"] > 0


def _results(tmp_path: Path) -> Path:
    rows = {}
    for pct, s, sp in ((25, 3.0, 0.26), (50, 2.0, 0.51), (75, 1.0, 0.74)):
        rows[f"sparge_xla_sparsity_{pct}"] = {
            "name": f"sparge_xla_sparsity_{pct}", "size": "T=8192, H=32, D=128", "ours": s,
            "baseline": 4.0, "details": {"ours": {"times_s": [s, s]}},
            "info": {"baseline": "dense", "chunked_s": 5.0, "sparsity": sp},
        }  # fmt: skip
    rows["sparge_tune_llama1m_layer"] = {"name": "sparge_tune_llama1m_layer", "ours": 9.0}
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"meta": {"mode": "full"}, "results": rows}))
    return p


def test_curve_from_results_and_plot_files(tmp_path):
    res = _results(tmp_path)
    out = tmp_path / "plots"
    assert B.main(["--plot", str(out), "--from", str(res)]) == 0
    doc = json.loads((out / "sparge_speed.json").read_text())
    assert [p["sparsity"] for p in doc["points"]] == [0.26, 0.51, 0.74]
    assert [p["s"] for p in doc["points"]] == [3.0, 2.0, 1.0]
    assert doc["baselines_s"] == {"dense": 4.0, "chunked": 5.0} and doc["mode"] == "full"
    png = (out / "sparge_speed.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # an existing output is not replaced without --overwrite; with it, it is
    assert B.main(["--plot", str(out), "--from", str(res)]) == 1
    assert B.main(["--plot", str(out), "--from", str(res), "--overwrite"]) == 0


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert B.main(["--plot", str(tmp_path / "a"), "--sparsities", "0.5,1.5"]) == 2
    assert "--sparsities: comma-separated numbers in [0, 1)" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": {}}))
    assert B.main(["--plot", str(tmp_path / "b"), "--from", str(empty)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --from: no sparge_xla_sparsity_* rows") and "\n" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("avail", [None, 10 * 2**30])
def test_dense_fits_rule(avail, monkeypatch):
    monkeypatch.setattr(B, "mem_available", lambda: avail)
    ok, note = B.dense_fits(8192, 32)
    assert ok is (avail is None) and (note == "") is ok
    assert np.isclose(B.dense_bytes(1024, 8) / 2**20, 64.0)


def test_pallas_gpu_row_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """Without a GPU (or without the ``gpu`` extra) the Pallas-vs-dense row runs no side and
    reports why; the table says so; the Pallas side never falls back to XLA."""
    import importlib.util

    import jax

    bench = REGISTRY["sparge_pallas_gpu"]
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    ctx = _ctx(tmp_path)
    row = make_row(bench, bench.fn(ctx))
    assert ctx.calls == []  # nothing timed, nothing faked
    assert row["skipped"] == "no GPU: jax's default backend is cpu"
    assert not {"ours", "baseline", "ratio"} & set(row) and row["size"].startswith("T=256")
    line = table([row]).splitlines()[-1]
    assert "| skipped: no GPU: jax's default backend is cpu |" in line
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "jax_triton" else real(n, *a))  # fmt: skip
    assert "gpu extra is not installed" in B.gpu_unavailable()
    monkeypatch.undo()
    if jax.default_backend() != "gpu":
        with pytest.raises(BenchError, match="Pallas kernel does not support"):
            B.side_pallas(256, 2, 16, 0.5, 1)
