"""The benchmark harness end to end at dry-run sizes: every row and every scaling sweep in one
run, ``python -m bench --quick --dry-run --plots DIR --table`` (one worker process for all rows,
points and sides, so jax / torch are imported once and a sweep point reuses the programs its
row compiled).

Only structure is checked: exit status, the JSON file, the markdown table, the plots (which
files, which points, that the plotted data are the measured points). Timings never are.
``test_isolated_dry_row`` keeps the per-row / per-side subprocess path of measured runs covered.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
from _bench_run import REPO, all_names, dry_run, table_rows
from _bench_run import bench as _bench

METHODS = {"forward", "eigen", "tucker", "ged", "quant", "sparge"}


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


@pytest.fixture(scope="module")
def sweeps() -> dict[str, tuple[str, str]]:
    """``--plots --list``: sweep name -> (method, x-axis parameter)."""
    p = _bench("--plots", "unused", "--list", timeout=60)
    assert p.returncode == 0, p.stderr
    out = {}
    for line in p.stdout.splitlines():
        name, method, param, _doc = line.split("\t")
        out[name] = (method, param)
    assert {m for m, _ in out.values()} >= METHODS
    return out


@pytest.fixture(scope="module")
def dry(tmp_path_factory, names, sweeps, shared_data):
    """Every row and sweep: ``--quick --dry-run --only ROWS --plots DIR --table --markdown MD
    --readme README --out J``, checked by :func:`_bench_run.check_dry_rows`."""
    tmp = tmp_path_factory.mktemp("dry")
    md, readme, plots = tmp / "r.md", tmp / "README.md", tmp / "plots"
    readme.write_text(
        "# t\n\n## Benchmarks\n<!-- bench:table -->\nold\n<!-- /bench:table -->\nafter\n"
    )
    p, data, rows = dry_run(
        tmp, names, "--plots", str(plots), "--table", "--markdown", str(md), "--readme", str(readme)
    )
    return {"p": p, "data": data, "rows": rows, "tmp": tmp, "md": md, "readme": readme,
            "plots": plots}  # fmt: skip


def test_dry_run_rows(dry, names):
    """Every row (checked in the fixture), with ``--markdown``, ``--readme`` and
    ``--from-json``."""
    tmp_path, md, readme = dry["tmp"], dry["md"], dry["readme"]
    p, data, rows = dry["p"], json.loads(json.dumps(dry["data"])), dry["rows"]

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
    # a stopped table run's JSON (rewritten after every row): the rows not finished are "not run"
    data["meta"].update(complete=False, done=len(names) - 1, total=len(names), pending=[names[-1]])
    del data["results"][names[-1]], data["points"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(data))
    q = _bench("--from-json", str(partial), "--markdown", str(md2), timeout=120)
    assert q.returncode == 0, q.stderr
    line2, rest2 = md2.read_text().split("\n\n", 1)
    assert line2.endswith(f"PARTIAL: {len(names) - 1} of {len(names)} rows had finished.")
    cells = table_rows(rest2)
    assert list(cells) == names and cells[names[-1]][3] == "not run"
    # a second --from-json (e.g. a later --only run) fills the missing row: complete again, and
    # the machine line names the row and the run it came from
    late = tmp_path / "late.json"
    row = json.loads((tmp_path / "r.json").read_text())["results"][names[-1]]
    late_meta = dict(json.loads((tmp_path / "r.json").read_text())["meta"])
    late_meta["started_utc"] = "2099-01-01T00:00:00+00:00"
    late.write_text(json.dumps({"meta": late_meta, "results": {names[-1]: row}}))
    q = _bench(
        "--from-json", str(partial), "--from-json", str(late), "--markdown", str(md2), timeout=120
    )
    assert q.returncode == 0, q.stderr
    line3, rest3 = md2.read_text().split("\n\n", 1)
    assert "PARTIAL" not in line3
    assert f"Rows {names[-1]} from a separate run: Measured 2099-01-01T00:00:00+00:00" in line3
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


# --------------------------------------------------------------------------- plots (--plots DIR)


def test_one_png_and_json_per_method(dry, sweeps):
    """``--plots DIR``: one PNG + JSON per method, one panel per sweep."""
    plots = dry["plots"]
    methods = {m for m, _ in sweeps.values()}
    assert sorted(f.name for f in plots.iterdir()) == sorted(
        f"{m}.{ext}" for m in methods for ext in ("png", "json")
    )
    import matplotlib.image

    for m in methods:
        png = plots / f"{m}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        doc = json.loads((plots / f"{m}.json").read_text())
        assert doc["method"] == m and doc["png"] == png.name
        assert [pn["sweep"] for pn in doc["panels"]] == [s for s, v in sweeps.items() if v[0] == m]
    # one panel per sweep: sparge has two (sequence length and sparsity)
    assert len(json.loads((plots / "sparge.json").read_text())["panels"]) == 2


def test_plotted_data_are_the_measured_points(dry, sweeps):
    """Every sweep has its dry values, in order, on both sides; the JSON next to each PNG holds
    exactly the points the run measured (``--out``), with ratio = ours / baseline."""
    p, plots, data = dry["p"], dry["plots"], dry["data"]
    assert data["meta"]["mode"] == "dry" and data["meta"]["machine"].startswith("Measured ")
    points = data["points"]
    assert all("error" not in r for r in points.values()), points
    for name, (method, param) in sweeps.items():
        doc = json.loads((plots / f"{method}.json").read_text())
        (panel,) = [pn for pn in doc["panels"] if pn["sweep"] == name]
        assert panel["param"] == param and len(panel["points"]) >= 2
        measured = [r for r in points.values() if r["sweep"] == name]
        assert [pt["x"] for pt in panel["points"]] == [r["x"] for r in measured]
        for pt, r in zip(panel["points"], measured, strict=True):
            assert r["name"] == f"{name}@{json.dumps(r['x'], separators=(',', ':'))}"
            assert pt["ours_s"] == r["ours"] and pt["baseline_s"] == r["baseline"]
            for v in (pt["ours_s"], pt["baseline_s"]):
                assert isinstance(v, float) and math.isfinite(v) and v > 0
            assert pt["ratio"] == pytest.approx(pt["ours_s"] / pt["baseline_s"])
            # the plotted value is the median of the side's timed repeats (first call apart)
            for side, key in (("ours", "ours_s"), ("baseline", "baseline_s")):
                times = pt["times_s"][side]
                assert times and pt[key] == pytest.approx(statistics.median(times))
    # stdout: one table row per point
    assert sum(line.startswith(("| forward_seq |", "| ged_samples |")) for line in
               p.stdout.splitlines()) == 4  # fmt: skip


def test_plots_only_selects_methods_and_rejects_unknown(sweeps, names):
    p = _bench("--plots", "unused", "--list", "--only", "sparge", timeout=60)
    assert p.returncode == 0, p.stderr
    sparge = [s for s, (m, _) in sweeps.items() if m == "sparge"]
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == sparge
    # with --table, --only also selects rows (listed first, then the sweeps)
    row = names[-1]
    p = _bench("--plots", "unused", "--table", "--list", "--only", f"sparge,{row}", timeout=60)
    assert p.returncode == 0, p.stderr
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == [row, *sparge]
    p = _bench("--table", "--list", "--only", row, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "--table" in err and "--plots" in err
    p = _bench("--plots", "unused", "--dry-run", "--only", "no_such_method", timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "no_such_method" in err and "forward" in err


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


def test_forward_rounds_pool_the_timings():
    """The forward rows alternate the two sides over several processes; a side's medians are
    over the timed calls of all its processes (not a median of medians), its first call and
    identity come from the first process and its peak memory is the largest."""
    from bench.foundation import _merge_rounds

    runs = [
        {"times_s": [1.0, 4.0], "cpu_s": [1.5, 3.5], "median_s": 2.5, "first_s": 5.0,
         "peak_rss_mib": 10.0, "n_params": 7},
        {"times_s": [2.0], "cpu_s": [2.5], "median_s": 2.0, "first_s": 6.0,
         "peak_rss_mib": 12.0, "n_params": 7},
    ]  # fmt: skip
    out = _merge_rounds(runs, tokens=8)
    assert out["median_s"] == 2.0 and out["value"] == 4.0  # median of 1, 4, 2; 8 tokens / 2 s
    assert out["cpu_median_s"] == 2.5 and out["cpu_s"] == [1.5, 3.5, 2.5]
    assert out["first_s"] == 5.0 and out["peak_rss_mib"] == 12.0 and out["n_params"] == 7
    assert out["rounds"] == 2 and out["round_median_s"] == [2.5, 2.0]
    assert runs[0]["median_s"] == 2.5  # the inputs are not modified


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_one_thread_runs_pin_one_cpu():
    """``JCOMPRESS_BENCH_THREADS=1``: workers start pinned to one CPU (XLA:CPU sizes its
    intra-op pool by the CPUs a process may use); unset, they are not pinned."""
    import subprocess

    h = _harness()
    assert h.one_cpu_hook({}) is None
    probe = [sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"]
    hook = h.one_cpu_hook({"JCOMPRESS_BENCH_THREADS": "1"})
    p = subprocess.run(probe, preexec_fn=hook, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "1"
