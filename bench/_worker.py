"""Worker processes of the benchmark harness. Each prints exactly one JSON line on stdout
(whatever else the process writes to stdout is sent to stderr).

``python -m bench._worker NAME [--quick | --dry-run] [--repeats N]`` runs one registered
benchmark (its function, in a private temp dir) and prints its JSON entry.

``python -m bench._worker --call MODULE:FUNC --kwargs JSON`` runs one side of a benchmark and
prints the function's dict with this process's ``peak_rss_mib`` and ``wall_s`` added.

``python -m bench._worker --batch NAME,NAME,... --dry-run`` runs several benchmarks one after
another in this one process, their sides in-process too (``Context.in_process``), and prints
one JSON line per benchmark as it finishes (a failed one: ``{"name": ..., "error": ...}``).
Dry runs only: measured runs keep a process per row and per side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import sweeps  # noqa: F401  (registers the scaling sweeps)
from bench.harness import (
    REGISTRY,
    Context,
    claim_stdout,
    emit,
    error_result,
    make_point,
    make_row,
    parse_point,
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


def _bench(
    name: str, mode: str, repeats: int | None, timeout: float | None, in_process: bool = False
) -> int:
    """One row (``NAME``) or one sweep point (``SWEEP@X``, see :func:`bench.harness.point_key`)."""
    if "@" in name:
        try:
            sw, x = parse_point(name)
        except (KeyError, ValueError) as e:
            emit({"name": name, "error": str(e).strip("'\"")})
            return 2
    elif name not in REGISTRY:
        emit({"name": name, "error": f"unknown benchmark {name!r}; valid: {', '.join(REGISTRY)}"})
        return 2
    try:
        prefix = f"jcompress-bench-{name.partition('@')[0]}-"
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            ctx = Context(name, mode, Path(tmp), repeats, timeout, in_process=in_process)
            if "@" in name:
                row = make_point(sw, x, name, sw.fn(ctx, x))
            else:
                bench = REGISTRY[name]
                row = make_row(bench, bench.fn(ctx))
    except BaseException as e:  # noqa: BLE001
        if in_process and not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit end the batch
        emit({"name": name, **error_result(e)})
        return 1
    row["worker_peak_rss_mib"] = peak_rss_mib()
    row["in_process"] = in_process
    emit(row)
    return 0


def _batch(names: list[str], mode: str, repeats: int | None, timeout: float | None) -> int:
    if mode != "dry":
        emit({"error": "--batch runs dry runs only (measured rows keep their own processes)"})
        return 2
    rc = 0
    for name in names:
        rc = max(rc, _bench(name, mode, repeats, timeout, in_process=True))
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._worker")
    p.add_argument("name", nargs="?")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--repeats", type=int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--call")
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--batch", metavar="NAMES")
    a = p.parse_args(argv)
    claim_stdout()
    if a.call:
        return _call(a.call, a.kwargs)
    mode = "dry" if a.dry_run else "quick" if a.quick else "full"
    if a.batch:
        return _batch([n for n in a.batch.split(",") if n], mode, a.repeats, a.timeout)
    if not a.name:
        p.error("give a benchmark NAME, --batch NAMES or --call")
    return _bench(a.name, mode, a.repeats, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
