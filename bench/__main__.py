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
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from bench import REGISTRY, sweeps  # noqa: F401  (registers the scaling sweeps)
from bench.harness import (
    LEGEND,
    SWEEPS,
    BenchError,
    log,
    parse_point,
    run_batch,
    run_worker,
    summary,
    table,
    xla_devices,
)
from bench.plots import points_table, write_plots

README_START = "<!-- bench:table -->"
README_END = "<!-- /bench:table -->"


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
    p.add_argument(
        "--markdown",
        metavar="FILE",
        help="write the machine line (CPU, cores, load, versions), the table and its legend as "
        "markdown to FILE: README's benchmark section is this file",
    )
    p.add_argument(
        "--readme",
        metavar="FILE",
        help=f"replace what lies between the lines {README_START!r} and {README_END!r} in FILE "
        "(e.g. README.md) with what --markdown writes",
    )
    p.add_argument(
        "--from-json",
        metavar="FILE",
        action="append",
        help="run nothing: print the table (or, with --plots, draw the plots) from FILE, the "
        "--out JSON of an earlier run (also of a stopped one), and write --markdown / --readme; "
        "repeatable: rows of a later FILE (e.g. a run with --only) replace or add to those of "
        "the first, and the machine line says which rows were measured in which run",
    )
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="run the scaling sweeps instead of the table (both sides at several sizes, same "
        "harness) and write one plot per method, DIR/<method>.png, with its data as "
        "DIR/<method>.json; --only then selects sweeps or methods",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="with --plots: run the table's rows too, in the same run (a dry run: in the same "
        "worker process, so imports and compiled programs are shared), print their table and "
        "allow --markdown / --readme; --only then also selects rows (none named: every row; "
        "no sweep or method named: every sweep)",
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
        "--isolate",
        action="store_true",
        help="with --dry-run: a fresh process per row and per side, as measured runs always "
        "have (by default a dry run shares one process: imports happen once)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the benchmarks (those --only selects) and exit"
    )
    return p


def _log_row(k: int, n: int, name: str, row: dict) -> None:
    if "error" in row:
        log(f"({k}/{n}) {name} FAILED: {row['error']}")
        return
    if "skipped" in row:
        log(f"({k}/{n}) {name} skipped: {row['skipped']}")
        return
    ours, base = row["details"]["ours"], row["details"]["baseline"]
    log(
        f"({k}/{n}) {name} done in {row['wall_s']:.1f}s: ours {summary(ours)}; "
        f"baseline {summary(base)}; ratio {row['ratio']:.2f}"
    )


def _failed(name: str, error: str) -> dict:
    """The entry of a failed row or sweep point."""
    if "@" in name:
        sw, x = parse_point(name)
        return {"name": name, "sweep": sw.name, "method": sw.method, "x": x, "error": error}
    return {"name": name, "metric": REGISTRY[name].metric, "error": error}


def _isolated(name: str) -> bool:
    return parse_point(name)[0].isolated if "@" in name else REGISTRY[name].isolated


def _run_rows(
    names: list[str],
    flags: list[str],
    timeout: float,
    *,
    shared: bool,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every row (or sweep point ``SWEEP@X``) in ``names``, order kept. Measured runs: one
    worker process per row (and per side, :meth:`Context.side`). ``shared`` (dry runs): those
    not registered ``isolated`` run one after another in one ``--batch`` worker, sides
    in-process. ``on_row(rows so far, in ``names`` order)`` runs after each row."""
    n = len(names)
    index = {name: k for k, name in enumerate(names, 1)}
    done: dict[str, dict] = {}
    batch = [name for name in names if shared and not _isolated(name)]
    if batch:
        log(f"dry run: {len(batch)} rows share one worker process (sides in-process)")
        cmd = [sys.executable, "-m", "bench._worker", "--batch", ",".join(batch), *flags]
        t0 = time.perf_counter()
        for name, row in run_batch(cmd, batch, timeout=timeout):
            if "error" in row:
                row = _failed(name, row["error"])
            else:
                row["wall_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _log_row(index[name], n, name, row)
            done[name] = row
            if on_row is not None:
                on_row([done[k] for k in names if k in done])
    for name in names:
        if name in done:
            continue
        log(f"({index[name]}/{n}) {name}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench._worker", name, *flags, "--timeout", str(timeout)]
        try:
            row = run_worker(cmd, timeout=timeout)
        except BenchError as e:
            row = _failed(name, str(e))
        else:
            row["wall_s"] = time.perf_counter() - t0
        _log_row(index[name], n, name, row)
        done[name] = row
        if on_row is not None:
            on_row([done[k] for k in names if k in done])
    return [done[name] for name in names]


def _select(
    only: list[str] | None, plots: bool, table: bool = False
) -> tuple[list[str], list[str]] | str:
    """``(rows, sweeps)`` selected: the rows (the table; with ``--plots`` only when ``table``)
    and, with ``--plots``, the sweeps; an error message for an unknown name."""
    names = [n.strip() for item in only or [] for n in item.split(",") if n.strip()]
    methods = {sw.method for sw in SWEEPS.values()}
    rows_ok = not plots or table
    unknown = [
        n
        for n in names
        if not (rows_ok and n in REGISTRY) and not (plots and (n in SWEEPS or n in methods))
    ]
    if unknown:
        if not plots:
            return f"unknown benchmark {unknown[0]!r}; valid: {', '.join(REGISTRY)}"
        valid = f"sweeps: {', '.join(SWEEPS)}; methods: {', '.join(sorted(methods))}"
        if table:
            return (
                f"unknown row, sweep or method {unknown[0]!r} (with --plots --table); {valid}; "
                f"rows: {', '.join(REGISTRY)}"
            )
        return f"unknown sweep or method {unknown[0]!r} (with --plots); {valid}"
    rows = [n for n in names if n in REGISTRY] if rows_ok else []
    if rows_ok and not rows:
        rows = list(REGISTRY)
    rows = list(dict.fromkeys(rows))
    if not plots:
        return rows, []
    picked = [s for s, sw in SWEEPS.items() if s in names or sw.method in names]
    return rows, picked or list(SWEEPS)


def _interleave(groups: list[list[str]]) -> list[str]:
    """Round robin over the sweeps (each one's first point, then each one's second, ...), each
    sweep's own order kept: a long run stopped early still has a few points of every method."""
    out = []
    for k in range(max(map(len, groups), default=0)):
        out += [g[k] for g in groups if k < len(g)]
    return out


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
    if a.table and a.plots is None:
        print("python -m bench: error: --table goes with --plots (the table alone is the "
              "default run)", file=sys.stderr)  # fmt: skip
        return 2
    selected = _select(a.only, a.plots is not None, a.table)
    if isinstance(selected, str):
        print(f"python -m bench: error: {selected}", file=sys.stderr)
        return 2
    row_names, names = selected  # names: the sweeps (--plots)
    if a.list:
        for n in row_names:
            b = REGISTRY[n]
            print(f"{b.name}\t{b.metric}\t{b.doc}")
        for n in names:
            sw = SWEEPS[n]
            print(f"{sw.name}\t{sw.method}\t{sw.param}\t{sw.doc}")
        return 0
    if a.repeats is not None and a.repeats < 1:
        print("python -m bench: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    if a.plots is not None and not a.table and (a.markdown or a.readme):
        msg = "--markdown / --readme write the table: with --plots, add --table"
        print(f"python -m bench: error: {msg}", file=sys.stderr)
        return 2
    if a.readme:
        err = _readme_check(a.readme)
        if err:
            print(f"python -m bench: error: --readme: {err}", file=sys.stderr)
            return 2
    if a.plots is not None and Path(a.plots).exists() and not Path(a.plots).is_dir():
        print(f"python -m bench: error: --plots: {a.plots} is not a directory", file=sys.stderr)
        return 2
    if a.from_json:
        return _from_json(a)
    try:
        xla_devices()
    except BenchError as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
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
    shared = mode == "dry" and not a.isolate
    # rows first: a sweep point measures the side functions of a row, so in a shared dry run
    # its programs are mostly compiled already
    items = row_names + _interleave([SWEEPS[n].points(mode) for n in names])

    def meta_now(rows: list[dict]) -> dict:
        meta = {
            "mode": mode,
            "argv": sys.argv[1:] if argv is None else argv,
            "started_utc": started,
            "wall_s": time.perf_counter() - t_all,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": {"start": load_start, "end": _loadavg()},
            "versions": versions,
            "threads": os.environ.get("JCOMPRESS_BENCH_THREADS") or "library defaults",
            "xla_devices": xla_devices(),
            "processes": "one shared process (dry run)" if shared else "one per row and per side",
            "ratio": "ours / baseline",
            "complete": len(rows) == len(items),
            "done": len(rows),
            "total": len(items),
            "pending": [k for k in items if k not in {r["name"] for r in rows}],
        }
        meta["machine"] = machine_line(meta)
        return meta

    drawn: dict[str, int] = {}  # method -> its points in its figure as last drawn

    def write(rows: list[dict], meta: dict, final: bool = False) -> None:
        table_rows, points = _split(rows)
        if a.out:
            doc: dict = {"meta": meta}
            if a.plots is not None:
                doc["points"] = {r["name"]: r for r in points}
            if row_names:
                doc["results"] = {r["name"]: r for r in table_rows}
            text = json.dumps(_finite(doc), indent=2, default=repr, allow_nan=False)
            _write_atomic(a.out, text + "\n")
        if a.markdown:
            _write_atomic(a.markdown, markdown(table_rows, meta))
        if a.plots is not None:
            # while running, only the figures a new point changed (each drawing costs a
            # matplotlib render); the last write redraws them all with the final meta
            count = Counter(p["method"] for p in points)
            changed = {m for m, k in count.items() if drawn.get(m) != k}
            if final or changed:
                write_plots(a.plots, points, meta, None if final else changed)
            drawn.update(count)

    versions = _versions()
    # --out / --markdown are rewritten after every row (meta.complete false until the end), so
    # an interrupted long run still leaves what it measured
    rows = _run_rows(
        items,
        flags,
        a.timeout,
        shared=shared,
        on_row=lambda done: write(done, meta_now(done)),
    )
    meta = meta_now(rows)
    failed = [r["name"] for r in rows if "error" in r]
    table_rows, points = _split(rows)
    if a.plots is not None:
        flat = [key for n in names for key in SWEEPS[n].points(mode)]  # sweep by sweep
        print(points_table(sorted(points, key=lambda r: flat.index(r["name"]))))
    if row_names:
        if a.plots is not None:
            print()
        print(table(table_rows))
        print()
        print(LEGEND)
    write(rows, meta, final=True)
    for path in (a.out, a.markdown, a.plots):
        if path:
            log(f"wrote {path}")
    if a.readme:
        _update_readme(a.readme, markdown(table_rows, meta))
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(table rows, sweep points)`` of a run's results, each in run order."""
    return [r for r in rows if "@" not in r["name"]], [r for r in rows if "@" in r["name"]]


def _update_readme(path: str, body: str) -> None:
    text = Path(path).read_text()
    head, rest = text.split(README_START + "\n", 1)
    _, tail = rest.split(README_END, 1)
    _write_atomic(path, f"{head}{README_START}\n{body}{README_END}{tail}")
    log(f"updated the table in {path}")


def _from_json(a: argparse.Namespace) -> int:
    """``--from-json FILE [--from-json FILE2 ...]``: print and write (``--markdown``,
    ``--readme``, ``--plots``) what runs saved with ``--out`` hold, without running anything
    (e.g. for a run that was stopped: its JSON is rewritten after every row). Rows of a later
    file replace or add to the earlier ones; the first file's run gives the machine line, and
    each later run's rows are named in it with when and how they were measured."""
    key = "points" if a.plots is not None else "results"
    merged: dict = {}
    meta: dict = {}
    for i, path in enumerate(a.from_json):
        try:
            doc = json.loads(Path(path).read_text())
            m, got = doc["meta"], dict(doc[key])
            if key == "results" and not m.get("complete", True) and "pending" not in m:
                m["pending"] = [n for n in REGISTRY if n not in got]
            machine = machine_line(m)
        except (OSError, ValueError, KeyError, TypeError) as e:
            what = "a --plots run's" if a.plots is not None else "a table run's"
            print(
                f"python -m bench: error: --from-json: {path} is not {what} --out JSON ({e})",
                file=sys.stderr,
            )
            return 2
        if i == 0:
            meta = m
        else:
            meta.setdefault("merged", []).append({"rows": list(got), "machine": machine})
            filled = [n for n in meta.get("pending") or [] if n in got]
            meta["pending"] = [n for n in meta.get("pending") or [] if n not in got]
            if not meta.get("complete", True):
                meta["done"] += len(filled)
                meta["complete"] = not meta["pending"]
        merged.update(got)
    meta["machine"] = machine_line(meta)
    rows = list(merged.values())  # the first run's order; rows only a later run has at the end
    if a.plots is not None:
        print(points_table(rows))
        write_plots(a.plots, rows, meta)
        log(f"wrote {a.plots}")
    else:
        print(table(rows))
        print()
        print(LEGEND)
    if a.markdown:
        _write_atomic(a.markdown, markdown(rows, meta))
        log(f"wrote {a.markdown}")
    if a.readme:
        _update_readme(a.readme, markdown(rows, meta))
    return 1 if any("error" in r for r in rows) else 0


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line(meta: dict) -> str:
    """One line saying where and how the numbers were measured."""
    v = meta["versions"]
    load = meta["loadavg_1m"]
    loads = ", ".join(
        f"{k} {x:.1f}" for k, x in (("start", load["start"]), ("end", load["end"])) if x is not None
    )
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "torch", "transformers") if v.get(k))
    return (
        f"Measured {meta['started_utc']} ({meta['mode']} mode, {meta['wall_s'] / 60:.1f} min) on "
        f"{meta['cpu_model']}, {meta['cpu_count']} CPUs, 1-minute load average {loads or 'n/a'}; "
        f"Python {meta['python']}, {libs}; threads: {meta['threads']}; "
        + (
            f"XLA host devices: {meta['xla_devices']} (forward rows shard jcompress over them); "
            if meta.get("xla_devices", 1) > 1
            else ""
        )
        + f"processes: {meta['processes']}."
        + (
            ""
            if meta.get("complete", True)
            else f" PARTIAL: {meta['done']} of {meta['total']} rows had finished."
        )
        + "".join(
            f" Rows {', '.join(m['rows'])} from a separate run: {m['machine']}"
            for m in meta.get("merged") or []
        )
    )


def markdown(rows: list[dict], meta: dict) -> str:
    """The machine line, the table and its legend: what README's benchmark section holds. A
    partial run's rows that had not finished are listed as ``not run`` (its sweep points,
    ``SWEEP@X``, are not table rows)."""
    pending = [
        {"name": n, "metric": REGISTRY[n].metric if n in REGISTRY else "", "not_run": True}
        for n in meta.get("pending") or []
        if "@" not in n
    ]
    return f"{machine_line(meta)}\n\n{table(rows + pending)}\n\n{LEGEND}\n"


def _readme_check(path: str) -> str | None:
    """Why ``path`` cannot take the table (checked before any benchmark runs), or None."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    starts, ends = text.count(README_START + "\n"), text.count(README_END)
    if starts != 1 or ends != 1 or text.index(README_START) > text.index(README_END):
        return (
            f"{path} needs exactly one line {README_START!r} followed by one {README_END!r} "
            f"(found {starts} and {ends})"
        )
    return None


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory: a reader never
    sees a half-written file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


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
