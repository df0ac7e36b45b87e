"""Worker processes of the benchmark harness. Each prints exactly one JSON line on stdout
(whatever else the process writes to stdout is sent to stderr).

``python -m bench._worker NAME [--quick | --dry-run] [--repeats N]`` runs one registered
benchmark (its function, in a private temp dir) and prints its JSON entry.

``python -m bench._worker --call MODULE:FUNC --kwargs JSON`` runs one side of a benchmark and
prints the function's dict with this process's ``peak_rss_mib`` and ``wall_s`` added.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    REGISTRY,
    Context,
    claim_stdout,
    emit,
    error_result,
    make_row,
    peak_rss_mib,
)


def _call(target: str, kwargs_json: str) -> int:
    t0 = time.perf_counter()
    try:
        mod, _, qual = target.partition(":")
        fn = importlib.import_module(mod)
        for part in qual.split("."):
            fn = getattr(fn, part)
        out = dict(fn(**json.loads(kwargs_json)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a result line
        emit(error_result(e))
        return 1
    out["peak_rss_mib"] = peak_rss_mib()
    out["wall_s"] = time.perf_counter() - t0
    emit(out)
    return 0


def _bench(name: str, mode: str, repeats: int | None, timeout: float | None) -> int:
    bench = REGISTRY.get(name)
    if bench is None:
        emit({"error": f"unknown benchmark {name!r}; valid: {', '.join(REGISTRY)}"})
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix=f"jcompress-bench-{name}-") as tmp:
            ctx = Context(name, mode, Path(tmp), repeats, timeout)
            row = make_row(bench, bench.fn(ctx))
    except BaseException as e:  # noqa: BLE001
        emit(error_result(e))
        return 1
    row["worker_peak_rss_mib"] = peak_rss_mib()
    emit(row)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._worker")
    p.add_argument("name", nargs="?")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--repeats", type=int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--call")
    p.add_argument("--kwargs", default="{}")
    a = p.parse_args(argv)
    claim_stdout()
    if a.call:
        return _call(a.call, a.kwargs)
    if not a.name:
        p.error("give a benchmark NAME or --call")
    mode = "dry" if a.dry_run else "quick" if a.quick else "full"
    return _bench(a.name, mode, a.repeats, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
