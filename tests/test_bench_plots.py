"""``python -m bench --plots DIR --dry-run``: every scaling sweep at tiny sizes, end to end (the
same worker machinery as the table), one PNG + JSON per method. Structure only: which files,
which points, that the plotted data are the measured points. Timings are never checked.

The run is ``--plots DIR --table`` with the second half of the table's rows (the first half:
``test_bench.py``): rows and sweep points in one worker process, whose points mostly reuse the
programs their rows compiled; ``test_dry_run_second_half`` checks those rows."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from _bench_run import all_names, check_dry_rows, halves

REPO = Path(__file__).resolve().parents[1]
METHODS = {"forward", "eigen", "tucker", "ged", "quant", "sparge"}


def _bench(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
def second_half() -> list[str]:
    _, second = halves(all_names())
    assert second
    return second


@pytest.fixture(scope="module")
def dry_plots(tmp_path_factory, sweeps, second_half, shared_data):
    """Every sweep and the second half of the rows: ``--plots DIR --table --only ROWS``."""
    tmp = tmp_path_factory.mktemp("plots")
    plots, out = tmp / "plots", tmp / "points.json"
    only = ",".join(second_half)
    p = _bench("--dry-run", "--plots", str(plots), "--table", "--only", only, "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    return p, plots, json.loads(out.read_text())


def test_dry_run_second_half(dry_plots, second_half):
    """The second half of the rows (the first: ``test_bench.py``), run with the sweeps."""
    p, _, data = dry_plots
    check_dry_rows(p, data, second_half, points=len(data["points"]))


def test_one_png_and_json_per_method(dry_plots, sweeps):
    _, plots, _ = dry_plots
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


def test_plotted_data_are_the_measured_points(dry_plots, sweeps):
    """Every sweep has its dry values, in order, on both sides; the JSON next to each PNG holds
    exactly the points the run measured (``--out``), with ratio = ours / baseline."""
    p, plots, data = dry_plots
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


def test_plots_only_selects_methods_and_rejects_unknown(sweeps, second_half):
    p = _bench("--plots", "unused", "--list", "--only", "sparge", timeout=60)
    assert p.returncode == 0, p.stderr
    sparge = [s for s, (m, _) in sweeps.items() if m == "sparge"]
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == sparge
    # with --table, --only also selects rows (listed first, then the sweeps)
    row = second_half[-1]
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
