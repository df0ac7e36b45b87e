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
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
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
    """

    name: str
    metric: str
    higher_is_better: bool
    fn: Callable[[Context], dict[str, Any]]
    doc: str = ""


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, *, metric: str, higher_is_better: bool, doc: str = ""):
    """Decorator adding ``fn(ctx) -> dict`` to :data:`REGISTRY` under ``name``."""

    def deco(fn):
        if name in REGISTRY:
            raise AssertionError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(
            name, metric, higher_is_better, fn, doc or (fn.__doc__ or "").strip().split("\n")[0]
        )
        return fn

    return deco


# --------------------------------------------------------------------------- context


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A benchmark (or one of its sides) failed; the message says why."""


@dataclasses.dataclass
class Context:
    """What a benchmark function gets: the size mode, a private temp dir, and :meth:`side`."""

    name: str
    mode: str  # "full" | "quick" | "dry"
    tmp: Path
    repeats_override: int | None = None
    timeout: float | None = None

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


ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def worker_env() -> dict[str, str]:
    """The workers' environment. ``JCOMPRESS_BENCH_THREADS=1`` pins *both* sides to one thread
    (torch/OpenMP/MKL/OpenBLAS via their ``*_NUM_THREADS`` variables, XLA:CPU via
    :data:`ONE_THREAD_XLA_FLAGS`): on a shared, loaded machine the default multi-threaded
    runs measure scheduling luck as much as the code (torch's OpenMP barriers suffer most), so
    single-thread ratios are the fairer comparison there. Unset: each library's default."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    threads = env.get("JCOMPRESS_BENCH_THREADS")
    if threads is not None:
        if threads != "1":
            raise BenchError(f"JCOMPRESS_BENCH_THREADS: only 1 is supported, got {threads!r}")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        if ONE_THREAD_XLA_FLAGS not in env.get("XLA_FLAGS", ""):  # nested workers inherit it
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), ONE_THREAD_XLA_FLAGS]))
    return env


def run_worker(cmd: list[str], *, timeout: float | None) -> dict[str, Any]:
    """Run a worker; its stderr goes to ours (progress, warnings), its stdout is searched for the
    result line. Raises :class:`BenchError` on failure."""
    try:
        p = subprocess.run(
            cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, text=True, timeout=timeout
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
    """The JSON entry of one benchmark from what its function returned."""
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
        if "error" in r:
            cells = [r["name"], r.get("size", ""), r.get("metric", ""), "FAILED", *["-"] * 4]
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
