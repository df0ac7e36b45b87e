"""The benchmark harness end to end at dry-run sizes (``python -m bench --quick --dry-run``).

Only structure is checked: exit status, the JSON file, the markdown table. Timings never are.
A dry run shares one worker process across rows and sides (imports once);
``test_isolated_dry_row`` keeps the per-row / per-side subprocess path of measured runs covered.
The second half of the rows' dry run and the plots (``--plots --table``, one run) are
``tests/test_bench_plots.py``: a file of its own, so pytest-xdist's ``--dist loadfile`` can run
both halves at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from _bench_run import REPO, all_names, dry_run, halves, table_rows
from _bench_run import bench as _bench


@pytest.fixture(scope="module")
def names() -> list[str]:
    out = all_names()
    assert {
        "forward_llama_1m",
        "forward_opt_125m",
        "load_hf_4shard",
        "eigen_bases_opt125m_layer",
        "eigen_calib_memory",
        "eigen_calib_memory_in_ram",
        "eigen_llama1m_end_to_end",
    } <= set(out)
    return out


def test_dry_run_first_half(tmp_path, names, shared_data):
    """The first half of the rows (the rest: ``test_bench_plots.py``), with ``--markdown`` and
    ``--readme``."""
    md, readme = tmp_path / "r.md", tmp_path / "README.md"
    readme.write_text(
        "# t\n\n## Benchmarks\n<!-- bench:table -->\nold\n<!-- /bench:table -->\nafter\n"
    )
    first, _ = halves(names)
    p, data, rows = dry_run(tmp_path, first, "--markdown", str(md), "--readme", str(readme))

    # --markdown: the machine line, then the very table stdout printed, then the legend
    meta = data["meta"]
    assert meta["cpu_count"] == os.cpu_count() and meta["cpu_model"]
    text = md.read_text()
    line, rest = text.split("\n\n", 1)
    assert line.startswith("Measured ") and f"{os.cpu_count()} CPUs" in line
    assert f"jax {meta['versions']['jax']}" in line and "load average start" in line
    assert f"torch {meta['versions']['torch']}" in line and "PARTIAL" not in line
    table_out = p.stdout[p.stdout.index("| benchmark |") :].split("\n\n")[0]
    assert rest.startswith(table_out + "\n\n")
    assert table_rows(rest) == rows
    # --readme: the same text between the markers, the rest of the file untouched
    assert readme.read_text() == (
        f"# t\n\n## Benchmarks\n<!-- bench:table -->\n{text}<!-- /bench:table -->\nafter\n"
    )

    # --from-json: the same markdown again from the saved JSON, nothing run
    md2 = tmp_path / "again.md"
    q = _bench("--from-json", str(tmp_path / "r.json"), "--markdown", str(md2), timeout=120)
    assert q.returncode == 0, q.stderr
    assert md2.read_text() == text and "[bench] (" not in q.stderr
    # a stopped run's JSON (rewritten after every row): the rows not finished are "not run"
    data["meta"].update(complete=False, done=len(first) - 1, pending=[first[-1]])
    del data["results"][first[-1]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(data))
    q = _bench("--from-json", str(partial), "--markdown", str(md2), timeout=120)
    assert q.returncode == 0, q.stderr
    line2, rest2 = md2.read_text().split("\n\n", 1)
    assert line2.endswith(f"PARTIAL: {len(first) - 1} of {len(first)} rows had finished.")
    cells = table_rows(rest2)
    assert list(cells) == first and cells[first[-1]][3] == "not run"
    # a second --from-json (e.g. a later --only run) fills the missing row: complete again, and
    # the machine line names the row and the run it came from
    late = tmp_path / "late.json"
    row = json.loads((tmp_path / "r.json").read_text())["results"][first[-1]]
    late_meta = dict(json.loads((tmp_path / "r.json").read_text())["meta"])
    late_meta["started_utc"] = "2099-01-01T00:00:00+00:00"
    late.write_text(json.dumps({"meta": late_meta, "results": {first[-1]: row}}))
    q = _bench(
        "--from-json", str(partial), "--from-json", str(late), "--markdown", str(md2), timeout=120
    )
    assert q.returncode == 0, q.stderr
    line3, rest3 = md2.read_text().split("\n\n", 1)
    assert "PARTIAL" not in line3
    assert f"Rows {first[-1]} from a separate run: Measured 2099-01-01T00:00:00+00:00" in line3
    assert table_rows(rest3) == table_rows(rest)


def test_isolated_dry_row(tmp_path):
    """``--isolate``: the row in its own worker, each side in a fresh subprocess (as measured
    runs always do); sides report their own peak RSS and process wall time."""
    out = tmp_path / "r.json"
    p = _bench("--dry-run", "--isolate", "--only", "ged_fit_seed_size", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert "share one worker process" not in p.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["processes"] == "one per row and per side"
    r = data["results"]["ged_fit_seed_size"]
    assert r["in_process"] is False
    for side in ("ours", "baseline"):
        d = r["details"][side]
        assert d["process_wall_s"] >= d["wall_s"] > 0 and d["peak_rss_mib"] > 0


def test_only_selects(names):
    p = _bench("--list", "--only", f"{names[-1]},{names[0]}", "--only", names[0], timeout=60)
    assert p.returncode == 0, p.stderr
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == [names[-1], names[0]]


def test_readme_without_markers_fails_first(tmp_path, names):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    p = _bench("--dry-run", "--only", names[0], "--readme", str(readme), timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "--readme" in err and "<!-- bench:table -->" in err
    assert readme.read_text() == "# no markers\n"
    assert "[bench]" not in p.stderr  # nothing ran


def test_only_unknown_name(names):
    p = _bench("--dry-run", "--only", "no_such_bench", timeout=60)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "no_such_bench" in err
    for n in names:
        assert n in err
    assert p.stdout == ""


# --------------------------------------------------------------------------- harness plumbing


def _harness():
    if str(REPO) not in sys.path:  # bench/ is not an installed package
        sys.path.insert(0, str(REPO))
    from bench import harness

    return harness


def test_run_batch_reports_rows_errors_and_crash():
    """One line per row as it arrives; a row the worker reported as failed keeps its message;
    rows never reported (the worker died) come back as errors naming the exit status."""
    h = _harness()
    script = (
        "import json, sys\n"
        "print('library noise on stdout')\n"
        "print(json.dumps({'name': 'a', 'ours': 1.5}))\n"
        "print(json.dumps({'name': 'b', 'error': 'ValueError: boom'}))\n"
        "sys.stdout.flush()\n"
        "sys.exit(3)\n"
    )
    got = list(h.run_batch([sys.executable, "-c", script], ["a", "b", "c"], timeout=60))
    assert [name for name, _ in got] == ["a", "b", "c"]
    assert got[0][1] == {"name": "a", "ours": 1.5}
    assert got[1][1]["error"] == "ValueError: boom"
    assert "exited 3" in got[2][1]["error"]


def test_run_batch_timeout():
    h = _harness()
    script = "import time; time.sleep(60)"
    got = list(h.run_batch([sys.executable, "-c", script], ["a", "b"], timeout=1.0))
    assert "timed out after 1s" in got[0][1]["error"]
    assert got[1][0] == "b" and "error" in got[1][1]


def _side_ok(n: int) -> dict:
    import numpy as np

    return {"value": np.float32(n) / 2, "first_s": 0.0, "path": Path("/x")}


def _side_fails(n: int) -> dict:
    raise ValueError(f"first line\nbad n={n}")


def test_call_in_process():
    """A dry run's in-process side: same JSON round trip and extras as a side worker, and a
    failure becomes a BenchError with the worker's one-line message."""
    h = _harness()
    out = h.call_in_process(_side_ok, {"n": 3})
    assert out["value"] == 1.5 and isinstance(out["value"], float)
    assert out["path"] == "/x" and out["peak_rss_mib"] > 0 and out["wall_s"] >= 0
    with pytest.raises(h.BenchError, match=r"^ValueError: bad n=4$"):
        h.call_in_process(_side_fails, {"n": 4})
    with pytest.raises(TypeError):  # kwargs must be JSON, as for a subprocess
        h.call_in_process(_side_ok, {"n": object()})


def test_xla_devices_setting(monkeypatch):
    """``JCOMPRESS_BENCH_XLA_DEVICES``: parsed and checked once, handed to the workers as XLA's
    host device count, refused with one-thread runs; the forward rows pick their mesh from
    the batch (data) or else the KV heads (model)."""
    h = _harness()
    from bench.foundation import forward_mesh_spec

    assert h.xla_devices({}) == 1 and h.xla_devices({"JCOMPRESS_BENCH_XLA_DEVICES": "2"}) == 2
    for bad in ("0", "two", "-1"):
        with pytest.raises(h.BenchError, match="JCOMPRESS_BENCH_XLA_DEVICES: expected"):
            h.xla_devices({"JCOMPRESS_BENCH_XLA_DEVICES": bad})
    both = {"JCOMPRESS_BENCH_XLA_DEVICES": "2", "JCOMPRESS_BENCH_THREADS": "1"}
    with pytest.raises(h.BenchError, match="cannot be combined"):
        h.xla_devices(both)
    monkeypatch.delenv("JCOMPRESS_BENCH_THREADS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    monkeypatch.setenv("JCOMPRESS_BENCH_XLA_DEVICES", "2")
    flags = h.worker_env()["XLA_FLAGS"].split()
    assert flags == ["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=2"]
    monkeypatch.delenv("JCOMPRESS_BENCH_XLA_DEVICES")
    assert h.worker_env()["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"

    assert forward_mesh_spec(4, 1, 4) is None
    assert forward_mesh_spec(4, 2, 4) == "data=2" and forward_mesh_spec(1, 2, 4) == "model=2"
    with pytest.raises(ValueError, match="divides neither the batch"):
        forward_mesh_spec(3, 2, 3)
