"""Used by the ``python -m bench`` tests (``tests/test_bench.py``): run the CLI, parse its table,
and the dry run of rows with every structural check (one run of every row and, with ``--plots
--table``, every sweep: one worker process, so imports and compiled programs are shared).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _xla_flags import compile_bound_flags

REPO = Path(__file__).resolve().parents[1]
HEADER = "| benchmark | size | metric | jcompress | baseline | ratio |"


def bench(
    *args: str, timeout: float = 1800, fast_compile: bool = False
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # a dry run compiles much and runs little: XLA's backend optimizations cost more than they
    # save there (the dry run of every row: 175 vs 205 CPU s at -O1)
    if fast_compile:
        env["XLA_FLAGS"] = compile_bound_flags(env.get("XLA_FLAGS", ""))
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def all_names() -> list[str]:
    """The registry, in order (``--list``)."""
    p = bench("--list", timeout=60)
    assert p.returncode == 0, p.stderr
    return [line.split("\t")[0] for line in p.stdout.splitlines() if line.strip()]


def table_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("| benchmark |")]
    assert len(header) == 1, stdout
    assert lines[header[0] + 1].startswith("|---|"), stdout
    rows = {}
    for line in lines[header[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def _check_info(name: str, info: dict) -> None:
    """Row-specific evidence that both sides really ran and were compared."""
    if name == "forward_opt_125m":
        assert info["last_token_logits_max_abs_diff"] < 1e-3
    elif name == "load_hf_4shard":
        assert len(info["shards"]) == 4
    elif name == "eigen_bases_opt125m_layer":
        assert set(info["check"]) == {"kq", "v"}  # the row fails unless the bases agree
    elif name == "eigen_llama1m_end_to_end":
        assert 0 < info["kv_cache_ratio"] <= 1


# rows that may report "skipped: REASON" instead of numbers (they need hardware CI lacks)
SKIPPABLE = {"sparge_pallas_gpu": "GPU"}


def dry_run(tmp_path: Path, names: list[str], *args: str):
    """``python -m bench --quick --dry-run --only NAMES --out J [args]``, checked by
    :func:`check_dry_rows`. Returns ``(process, json, table rows)``."""
    out = tmp_path / "r.json"
    p = bench("--quick", "--dry-run", "--only", ",".join(names), "--out", str(out), *args,
              fast_compile=True)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    data = json.loads(out.read_text())
    return p, data, check_dry_rows(p, data, names, points=len(data.get("points", {})))


def check_dry_rows(p: subprocess.CompletedProcess, data: dict, names: list[str], points: int = 0):
    """A dry run (its process and ``--out`` JSON) of the rows ``names`` (and, with ``--plots
    --table``, ``points`` sweep points): every row ran end to end (in one shared worker), the
    table has exactly these rows, the JSON every number finite. Returns the table rows."""
    assert f"{len(names) + points} rows share one worker process" in p.stderr
    assert any(line.startswith(HEADER) for line in p.stdout.splitlines())
    rows = table_rows(p.stdout)
    assert list(rows) == names
    for name, cells in rows.items():
        assert len(cells) == 8 and cells[3] != "FAILED"
        if cells[3].startswith("skipped:"):
            assert name in SKIPPABLE and SKIPPABLE[name] in cells[3], cells

    meta = data["meta"]
    assert meta["mode"] == "dry" and meta["complete"] and meta["done"] == len(names) + points
    assert meta["processes"] == "one shared process (dry run)"
    assert list(data["results"]) == names
    for name, r in data["results"].items():
        assert r["name"] == name and "error" not in r and r["in_process"] is True
        if "skipped" in r:  # the reason, no numbers
            assert name in SKIPPABLE and SKIPPABLE[name] in r["skipped"], r
            assert not {"ours", "baseline", "ratio"} & set(r), r
            assert rows[name][3] == f"skipped: {r['skipped']}"
            continue
        for key in ("ours", "baseline", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
        for side in ("ours", "baseline"):
            assert r["peak_rss_mib"][side] > 0
            assert r["first_call_s"][side] >= 0
        _check_info(name, r["info"])
    return rows
