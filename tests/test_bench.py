"""The benchmark harness end to end at dry-run sizes (``python -m bench --quick --dry-run``).

Only structure is checked: exit status, the JSON file, the markdown table. Timings never are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
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
def names() -> list[str]:
    p = _bench("--list", timeout=60)
    assert p.returncode == 0, p.stderr
    out = [line.split("\t")[0] for line in p.stdout.splitlines() if line.strip()]
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


def _table_rows(stdout: str) -> dict[str, list[str]]:
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


def test_dry_run_all(tmp_path, names, shared_data):
    out = tmp_path / "r.json"
    p = _bench("--quick", "--dry-run", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]

    header = p.stdout.splitlines()
    assert any(
        h.startswith("| benchmark | size | metric | jcompress | baseline | ratio |") for h in header
    )
    rows = _table_rows(p.stdout)
    assert list(rows) == names
    for cells in rows.values():
        assert len(cells) == 8 and cells[3] != "FAILED"

    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "dry"
    assert list(data["results"]) == names
    for name, r in data["results"].items():
        assert r["name"] == name and "error" not in r
        for key in ("ours", "baseline", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
        for side in ("ours", "baseline"):
            assert r["peak_rss_mib"][side] > 0
            assert r["first_call_s"][side] >= 0
    fwd = data["results"]["forward_opt_125m"]["info"]
    assert fwd["last_token_logits_max_abs_diff"] < 1e-3
    assert len(data["results"]["load_hf_4shard"]["info"]["shards"]) == 4
    check = data["results"]["eigen_bases_opt125m_layer"]["info"]["check"]
    assert set(check) == {"kq", "v"}  # both sides' bases were compared (the row fails if not)
    assert 0 < data["results"]["eigen_llama1m_end_to_end"]["info"]["kv_cache_ratio"] <= 1


def test_only_selects(names):
    p = _bench("--list", "--only", f"{names[-1]},{names[0]}", "--only", names[0], timeout=60)
    assert p.returncode == 0, p.stderr
    assert [line.split("\t")[0] for line in p.stdout.splitlines()] == [names[-1], names[0]]


def test_only_unknown_name(names):
    p = _bench("--dry-run", "--only", "no_such_bench", timeout=60)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "no_such_bench" in err
    for n in names:
        assert n in err
    assert p.stdout == ""
