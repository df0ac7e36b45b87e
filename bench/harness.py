"""Benchmark harness: the registry, the run context, timing / memory helpers, subprocess plumbing
and the markdown table.

A benchmark is a registry entry: a name, a metric, and a function ``fn(ctx) -> dict`` that runs
inside its own worker process (``python -m bench._worker NAME``) and returns::

    {"ours": {"value": ..., "first_s": ..., ...},      # jcompress
     "baseline": {"value": ..., "first_s": ..., ...},  # transformers / torch
     "size": "4x512, 125.2M params",                   # short description for the table
     "info": {...}}                                    # anything else worth keeping (JSON)

Each side is usually measured in a fresh subprocess with :meth:`Context.side`, so its peak RSS
(``peak_rss_mib``, added by the worker) is its own. Nothing here imports jax or torch: the
parent process stays light and every heavy import happens in the process being measured.

A dry run (``--dry-run``: tiny sizes, numbers meaningless, it only proves every row runs end to
end) shares one interpreter instead: the rows run one after another in one worker process and
their sides are called in it (:attr:`Context.in_process`), so jax / torch / transformers are
imported once rather than twice per row. Rows registered with ``isolated=True`` and every
``--quick`` / full run keep a fresh process per row and per side.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "quick", "dry")
_RESULT_FD: int | None = None  # the worker's real stdout, once :func:`claim_stdout` ran


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One row of the table.

    Attributes:
      name: identifier used by ``--only`` and as the JSON key.
      metric: what ``value`` measures, e.g. ``"tokens/s"``.
      higher_is_better: direction of ``metric`` (the ratio is always ours / baseline).
      fn: ``fn(ctx: Context) -> dict`` (see the module docstring).
      doc: one line for ``--list`` and the README.
      isolated: run in fresh processes (row and sides) even in a dry run, e.g. a row whose sides
        need their own environment or process-global settings.
    """

    name: str
    metric: str
    higher_is_better: bool
    fn: Callable[[Context], dict[str, Any]]
    doc: str = ""
    isolated: bool = False


REGISTRY: dict[str, Benchmark] = {}


def register(
    name: str, *, metric: str, higher_is_better: bool, doc: str = "", isolated: bool = False
):
    """Decorator adding ``fn(ctx) -> dict`` to :data:`REGISTRY` under ``name`` (``isolated``:
    see :class:`Benchmark`)."""

    def deco(fn):
        if name in REGISTRY:
            raise AssertionError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(
            name,
            metric,
            higher_is_better,
            fn,
            doc or (fn.__doc__ or "").strip().split("\n")[0],
            isolated,
        )
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A scaling sweep: one row family measured at several values of one parameter, plotted by
    ``python -m bench --plots DIR`` (one figure per ``method``, one panel per sweep).

    Each point runs like a row: ``fn(ctx, x) -> dict`` (the dict a row function returns) in its
    own worker process, each side in a fresh subprocess through :meth:`Context.side`, medians of
    timed repeats with the first call excluded.

    Attributes:
      name: identifier (``--only`` filters sweeps by it or by ``method``).
      method: the figure it belongs to (file ``DIR/<method>.png``), e.g. ``"forward"``.
      param: the x axis, e.g. ``"sequence length (tokens)"``.
      values: the x values per size mode (``{"full": ..., "quick": ..., "dry": ...}``).
      fn: ``fn(ctx, x) -> dict`` for one point.
      y: the key of each side's dict that is plotted, a time in seconds (``"value"`` for rows
        whose metric is seconds, ``"median_s"`` for throughput rows).
      ours / baseline: legend labels of the two sides.
      log_x / log_y: logarithmic axes (log-log where the sizes span decades).
      doc: one line (the panel's title).
      isolated: fresh processes even in a dry run (see :class:`Benchmark`).
    """

    name: str
    method: str
    param: str
    values: dict[str, tuple[Any, ...]]
    fn: Callable[[Context, Any], dict[str, Any]]
    y: str = "value"
    ours: str = "jcompress"
    baseline: str = "baseline"
    log_x: bool = True
    log_y: bool = True
    doc: str = ""
    isolated: bool = False

    def points(self, mode: str) -> list[str]:
        """The point keys ``NAME@<x as JSON>`` of ``mode``, in order."""
        return [point_key(self.name, x) for x in self.values[mode]]


SWEEPS: dict[str, Sweep] = {}


def sweep(
    name: str,
    *,
    method: str,
    param: str,
    full: tuple[Any, ...] | list[Any],
    quick: tuple[Any, ...] | list[Any],
    dry: tuple[Any, ...] | list[Any],
    y: str = "value",
    ours: str = "jcompress",
    baseline: str = "baseline",
    log_x: bool = True,
    log_y: bool = True,
    doc: str = "",
    isolated: bool = False,
):
    """Decorator adding ``fn(ctx, x) -> dict`` to :data:`SWEEPS` (see :class:`Sweep`)."""

    def deco(fn):
        if name in SWEEPS:
            raise AssertionError(f"sweep {name!r} registered twice")
        values = {"full": tuple(full), "quick": tuple(quick), "dry": tuple(dry)}
        for mode, xs in values.items():
            if len(xs) < 2:
                raise AssertionError(f"sweep {name!r}: {mode} needs at least two values")
            json.dumps(list(xs))  # the values travel to the worker as JSON
        SWEEPS[name] = Sweep(
            name, method, param, values, fn, y, ours, baseline, log_x, log_y,
            doc or (fn.__doc__ or "").strip().split("\n")[0], isolated,
        )  # fmt: skip
        return fn

    return deco


def point_key(name: str, x: Any) -> str:
    """``NAME@<x as compact JSON>``: one sweep point, as workers and results name it."""
    return f"{name}@{json.dumps(x, separators=(',', ':'))}"


def parse_point(key: str) -> tuple[Sweep, Any]:
    name, _, x = key.partition("@")
    if name not in SWEEPS or not x:
        raise KeyError(f"unknown sweep point {key!r}; sweeps: {', '.join(SWEEPS)}")
    return SWEEPS[name], json.loads(x)


# --------------------------------------------------------------------------- context


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A benchmark (or one of its sides) failed; the message says why."""


@dataclasses.dataclass
class Context:
    """What a benchmark function gets: the size mode, a private temp dir, and :meth:`side`.

    ``in_process`` (dry runs only): :meth:`side` calls the function in this process instead of
    a fresh one (imports shared across sides and rows; peak RSS is then the process's)."""

    name: str
    mode: str  # "full" | "quick" | "dry"
    tmp: Path
    repeats_override: int | None = None
    timeout: float | None = None
    in_process: bool = False

    def pick(self, *, full: Any, quick: Any, dry: Any) -> Any:
        """The value for the current size mode."""
        return {"full": full, "quick": quick, "dry": dry}[self.mode]

    def repeats(self, *, full: int, quick: int, dry: int = 1) -> int:
        """Timed repeats for the current mode (``--repeats`` overrides)."""
        if self.repeats_override is not None:
            return self.repeats_override
        return self.pick(full=full, quick=quick, dry=dry)

    def log(self, msg: str) -> None:
        log(f"{self.name}: {msg}")

    def side(self, fn: Callable[..., dict[str, Any]], label: str, **kwargs: Any) -> dict[str, Any]:
        """Run ``fn(**kwargs)`` in a fresh subprocess; return its dict plus ``peak_rss_mib`` and
        ``wall_s`` of that process. ``fn`` must be a module-level function and ``kwargs``
        JSON-serialisable."""
        target = f"{fn.__module__}:{fn.__qualname__}"
        self.log(f"{label} ...")
        t0 = time.perf_counter()
        if self.in_process:
            out = call_in_process(fn, kwargs)
            out["process_wall_s"] = time.perf_counter() - t0
            self.log(f"{label} done in-process in {out['process_wall_s']:.1f}s ({summary(out)})")
            return out
        cmd = [
            sys.executable,
            "-m",
            "bench._worker",
            "--call",
            target,
            "--kwargs",
            json.dumps(kwargs),
        ]
        out = run_worker(cmd, timeout=self.timeout)
        out["process_wall_s"] = time.perf_counter() - t0
        self.log(f"{label} done in {out['process_wall_s']:.1f}s ({summary(out)})")
        return out


def call_in_process(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One side in this process, with what a side worker adds (``peak_rss_mib``, ``wall_s``)
    and the same JSON round trips for its arguments and result; a failure is a
    :class:`BenchError` with the worker's one-line message."""
    kwargs = json.loads(json.dumps(kwargs))
    t0 = time.perf_counter()
    try:
        out = dict(fn(**kwargs))
    except Exception as e:
        raise BenchError(error_result(e)["error"]) from e
    finally:
        gc.collect()
    out["peak_rss_mib"] = peak_rss_mib()
    out["wall_s"] = time.perf_counter() - t0
    return json.loads(json.dumps(out, default=_jsonable))


def summary(m: dict[str, Any]) -> str:
    parts = [f"value={fmt(m['value'])}"] if "value" in m else []
    if "first_s" in m:
        parts.append(f"first={fmt(m['first_s'])}s")
    if "peak_rss_mib" in m:
        parts.append(f"peak={m['peak_rss_mib']:.0f}MiB")
    return ", ".join(parts) or "ok"


# --------------------------------------------------------------------------- measurement


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kib /= 1024
    return kib / 1024


def rss_mib() -> float:
    """Current resident set size, MiB (``/proc/self/statm``; falls back to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def time_calls(
    fn: Callable[[], Any],
    repeats: int,
    *,
    sync: Callable[[Any], Any] = lambda x: x,
    between: Callable[[], None] | None = None,
    warmup: int = 0,
) -> tuple[float, list[float], Any]:
    """Time the first call of ``fn`` on its own (for a jit function: trace + compile + run),
    make ``warmup`` more untimed calls, then ``repeats`` timed calls. ``sync`` blocks on the
    result (e.g. ``block_until_ready``) inside the timed region. The previous result is dropped
    before each call, so peak memory is that of one call; ``between`` (e.g. ``gc.collect``) runs
    untimed before every call after the first.

    Returns ``(first_s, times_s, last_result)``; the median of ``times_s`` is the measurement.
    """
    out = None
    t0 = time.perf_counter()
    out = sync(fn())
    first = time.perf_counter() - t0
    times = []
    for k in range(warmup + repeats):
        out = None
        if between is not None:
            between()
        t0 = time.perf_counter()
        out = sync(fn())
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return first, times, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- subprocesses


ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"  # the one XLA:CPU thread switch
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def xla_devices(env: dict[str, str] | None = None) -> int:
    """``JCOMPRESS_BENCH_XLA_DEVICES``: how many XLA:CPU host devices the JAX sides get (1 when
    unset). Raises :class:`BenchError` on a value that is not an integer >= 1, or one > 1
    together with ``JCOMPRESS_BENCH_THREADS=1`` (two devices are two threads)."""
    env = os.environ if env is None else env
    raw = env.get("JCOMPRESS_BENCH_XLA_DEVICES")
    if raw is None or raw == "":
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise BenchError(f"JCOMPRESS_BENCH_XLA_DEVICES: expected an integer >= 1, got {raw!r}")
    n = int(raw)
    if n > 1 and env.get("JCOMPRESS_BENCH_THREADS") is not None:
        raise BenchError(
            f"JCOMPRESS_BENCH_XLA_DEVICES={n} runs {n} threads: it cannot be combined with "
            "JCOMPRESS_BENCH_THREADS=1 (unset one of them)"
        )
    return n


def worker_env() -> dict[str, str]:
    """The workers' environment. ``JCOMPRESS_BENCH_THREADS=1`` pins *both* sides to one thread
    (torch/OpenMP/MKL/OpenBLAS via their ``*_NUM_THREADS`` variables, XLA:CPU via
    :data:`ONE_THREAD_XLA_FLAGS`): on a shared, loaded machine the default multi-threaded
    runs measure scheduling luck as much as the code (torch's OpenMP barriers suffer most), so
    single-thread ratios are the fairer comparison there. Unset: each library's default.
    ``JCOMPRESS_BENCH_XLA_DEVICES=N`` (:func:`xla_devices`) gives JAX ``N`` host devices
    (:data:`HOST_DEVICES_FLAG`); the forward rows then shard their jcompress side over them
    while torch keeps its default threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    devices = xla_devices(env)
    if devices > 1 and HOST_DEVICES_FLAG not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = " ".join(
            filter(None, [env.get("XLA_FLAGS"), f"{HOST_DEVICES_FLAG}={devices}"])
        )
    threads = env.get("JCOMPRESS_BENCH_THREADS")
    if threads is not None:
        if threads != "1":
            raise BenchError(f"JCOMPRESS_BENCH_THREADS: only 1 is supported, got {threads!r}")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        if ONE_THREAD_XLA_FLAGS not in env.get("XLA_FLAGS", ""):  # nested workers inherit it
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), ONE_THREAD_XLA_FLAGS]))
    return env


def one_cpu_hook(env: dict[str, str]) -> Callable[[], None] | None:
    """With ``JCOMPRESS_BENCH_THREADS=1``, a ``preexec_fn`` that pins the worker (and the side
    workers it starts, which inherit it) to one CPU, where the OS allows it. The thread
    variables alone do not make XLA:CPU single-threaded: its YNNPACK fusions still split work
    over an intra-op pool sized by the CPUs the process may use (1.5-1.8 CPU seconds per wall
    second unpinned), so "one thread each" is only equal resources with one CPU each."""
    if env.get("JCOMPRESS_BENCH_THREADS") != "1" or not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {cpu})


def run_worker(cmd: list[str], *, timeout: float | None) -> dict[str, Any]:
    """Run a worker; its stderr goes to ours (progress, warnings), its stdout is searched for the
    result line. Raises :class:`BenchError` on failure."""
    env = worker_env()
    try:
        p = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            preexec_fn=one_cpu_hook(env),
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(cmd[2:5])}") from None
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise BenchError(f"worker exited {p.returncode} without a result: {' '.join(cmd[2:5])}")
    if "error" in result:
        raise BenchError(result["error"])
    if p.returncode != 0:
        raise BenchError(f"worker exited {p.returncode}")
    return result


def run_batch(
    cmd: list[str], names: list[str], *, timeout: float | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run a ``--batch`` worker (several dry rows in one process) and yield ``(name, row)`` as
    each row's line arrives; a failed row's dict has ``error``. ``timeout`` bounds each row.
    Rows the worker never reported (it crashed or timed out) come back as errors."""
    import queue
    import threading

    p = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    pending = list(names)
    try:
        while pending:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                p.kill()
                yield pending.pop(0), {"error": f"timed out after {timeout:.0f}s (batch worker)"}
                break
            if line is None:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = row.get("name") if isinstance(row, dict) else None
            if name not in pending:
                if isinstance(row, dict) and "error" in row and name is None:
                    yield pending.pop(0), row  # the batch itself refused (bad arguments)
                continue
            pending.remove(name)
            yield name, row
    finally:
        if p.poll() is None and pending:
            p.kill()
        rc = p.wait()
    for name in pending:
        yield name, {"error": f"batch worker exited {rc} before this benchmark reported"}


def claim_stdout() -> None:
    """Keep the worker's stdout for its one result line: anything else written to fd 1 (by
    libraries, C code included) goes to stderr from now on."""
    global _RESULT_FD
    if _RESULT_FD is None:
        sys.stdout.flush()
        _RESULT_FD = os.dup(1)
        os.dup2(2, 1)


def emit(result: dict[str, Any]) -> None:
    """Write the worker's one result line (a JSON object) to its real stdout."""
    line = (json.dumps(result, default=_jsonable) + "\n").encode()
    sys.stdout.flush()
    fd = 1 if _RESULT_FD is None else _RESULT_FD
    while line:
        line = line[os.write(fd, line) :]


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def error_result(e: BaseException) -> dict[str, Any]:
    traceback.print_exc()
    msg = str(e).strip().splitlines()
    return {"error": f"{type(e).__name__}: {msg[-1] if msg else ''}".rstrip(": ")}


# --------------------------------------------------------------------------- results and table


def make_row(bench: Benchmark, raw: dict[str, Any]) -> dict[str, Any]:
    """The JSON entry of one benchmark from what its function returned. A row that cannot run
    here returns ``{"skipped": reason, ...}`` instead of the sides (e.g. no GPU): its entry
    keeps the reason and has no values."""
    if "skipped" in raw:
        return {"name": bench.name, "metric": bench.metric,
                "higher_is_better": bench.higher_is_better, "size": raw.get("size", ""),
                "skipped": str(raw["skipped"]), "info": raw.get("info", {})}  # fmt: skip
    ours, base = raw["ours"], raw["baseline"]
    ov, bv = float(ours["value"]), float(base["value"])
    return {
        "name": bench.name,
        "metric": bench.metric,
        "higher_is_better": bench.higher_is_better,
        "size": raw.get("size", ""),
        "ours": ov,
        "baseline": bv,
        "ratio": ov / bv if bv else float("nan"),
        "first_call_s": {"ours": ours.get("first_s"), "baseline": base.get("first_s")},
        "peak_rss_mib": {"ours": ours.get("peak_rss_mib"), "baseline": base.get("peak_rss_mib")},
        "details": {"ours": ours, "baseline": base},
        "info": raw.get("info", {}),
    }


def make_point(sw: Sweep, x: Any, key: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The JSON entry of one sweep point: both sides' ``sw.y`` (seconds) at ``x``."""
    ours, base = raw["ours"], raw["baseline"]
    for label, side in (("ours", ours), ("baseline", base)):
        if sw.y not in side:
            raise KeyError(f"sweep {sw.name!r}: the {label} side returned no {sw.y!r}")
    ov, bv = float(ours[sw.y]), float(base[sw.y])
    return {
        "name": key,
        "sweep": sw.name,
        "method": sw.method,
        "x": x,
        "y": sw.y,
        "size": raw.get("size", ""),
        "ours": ov,
        "baseline": bv,
        "ratio": ov / bv if bv else float("nan"),
        "first_call_s": {"ours": ours.get("first_s"), "baseline": base.get("first_s")},
        "peak_rss_mib": {"ours": ours.get("peak_rss_mib"), "baseline": base.get("peak_rss_mib")},
        "details": {"ours": ours, "baseline": base},
        "info": raw.get("info", {}),
    }


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    x = float(x)
    if x != x:
        return "nan"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


HEADER = (
    "| benchmark | size | metric | jcompress | baseline | ratio | "
    "first call s (ours / base) | peak RSS MiB (ours / base) |"
)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: a header and one row per benchmark (failed ones say so)."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        if r.get("not_run"):
            cells = [r["name"], "", r.get("metric", ""), "not run", *["-"] * 4]
        elif "error" in r:
            cells = [r["name"], r.get("size", ""), r.get("metric", ""), "FAILED", *["-"] * 4]
        elif "skipped" in r:
            cells = [r["name"], r["size"], r["metric"], f"skipped: {r['skipped']}", *["-"] * 4]
        else:
            fc, rss = r["first_call_s"], r["peak_rss_mib"]
            cells = [
                r["name"],
                r["size"],
                f"{r['metric']} {'↑' if r['higher_is_better'] else '↓'}",
                fmt(r["ours"]),
                fmt(r["baseline"]),
                f"{r['ratio']:.2f}x",
                f"{fmt(fc['ours'])} / {fmt(fc['baseline'])}",
                f"{fmt(rss['ours'])} / {fmt(rss['baseline'])}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "ratio = jcompress / baseline (↑: >1 means jcompress is better; ↓: <1 means jcompress is "
    "better). Values are medians over the timed repeats; the first call (jit compile, warm-up) "
    "is reported separately and excluded. Peak RSS is per side, each in its own process."
)
