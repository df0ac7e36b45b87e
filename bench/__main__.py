"""``python -m bench``: run the registered benchmarks, print a markdown table, write JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from importlib import metadata

from bench import REGISTRY
from bench.harness import LEGEND, BenchError, log, run_worker, summary, table


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(REGISTRY)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark jcompress against transformers/torch on CPU. Each benchmark runs in its own "
            "subprocess (and each side of it in another), jit compile / first call is reported "
            "separately, values are medians of repeats, and peak RSS is per side. Prints one "
            f"markdown table row per benchmark. Benchmarks: {names}."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller inputs and fewer repeats (batch 1x128, ~10M-param checkpoint)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models, seq 16, 1 repeat: checks the harness end to end in seconds "
        "(what the test suite runs); numbers are meaningless",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this benchmark (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write all results as JSON to FILE (default: no file is written)",
    )
    p.add_argument("--repeats", type=int, metavar="N", help="override the timed repeats")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600,
        metavar="S",
        help="seconds per benchmark subprocess (default: 3600)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the benchmarks (those --only selects) and exit"
    )
    return p


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "torch", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    names = list(REGISTRY)
    if a.only:
        names = [n.strip() for item in a.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            print(
                f"python -m bench: error: unknown benchmark {unknown[0]!r}; "
                f"valid: {', '.join(REGISTRY)}",
                file=sys.stderr,
            )
            return 2
        names = list(dict.fromkeys(names))
    if a.list:
        for n in names:
            b = REGISTRY[n]
            print(f"{b.name}\t{b.metric}\t{b.doc}")
        return 0
    if a.repeats is not None and a.repeats < 1:
        print("python -m bench: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    mode = "dry" if a.dry_run else "quick" if a.quick else "full"
    flags = ["--dry-run"] if mode == "dry" else ["--quick"] if mode == "quick" else []
    if a.repeats is not None:
        flags += ["--repeats", str(a.repeats)]

    load_start = _loadavg()
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        log(f"load average {load_start:.1f} on {os.cpu_count()} CPUs: timings will be noisy")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t_all = time.perf_counter()
    rows = []
    for k, name in enumerate(names, 1):
        log(f"({k}/{len(names)}) {name} [{mode}]")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench._worker", name, *flags, "--timeout", str(a.timeout)]
        try:
            row = run_worker(cmd, timeout=a.timeout)
        except BenchError as e:
            log(f"({k}/{len(names)}) {name} FAILED: {e}")
            rows.append({"name": name, "metric": REGISTRY[name].metric, "error": str(e)})
            continue
        row["wall_s"] = time.perf_counter() - t0
        ours, base = row["details"]["ours"], row["details"]["baseline"]
        log(
            f"({k}/{len(names)}) {name} done in {row['wall_s']:.1f}s: ours {summary(ours)}; "
            f"baseline {summary(base)}; ratio {row['ratio']:.2f}"
        )
        rows.append(row)

    print(table(rows))
    print()
    print(LEGEND)
    failed = [r["name"] for r in rows if "error" in r]
    if a.out:
        doc = {
            "meta": {
                "mode": mode,
                "argv": sys.argv[1:] if argv is None else argv,
                "started_utc": started,
                "wall_s": time.perf_counter() - t_all,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "loadavg_1m": {"start": load_start, "end": _loadavg()},
                "versions": _versions(),
                "ratio": "ours / baseline",
            },
            "results": {r["name"]: r for r in rows},
        }
        with open(a.out, "w") as f:
            json.dump(_finite(doc), f, indent=2, default=repr, allow_nan=False)
            f.write("\n")
        log(f"wrote {a.out}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


def _loadavg() -> float | None:
    """1-minute load average: other processes on the CPU make every number noisier."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _finite(x):
    """Strict JSON: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
