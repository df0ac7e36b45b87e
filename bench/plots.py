"""Scaling plots from sweep points (``python -m bench --plots DIR``): one figure per method,
one panel per sweep, both sides' median time on the same axes, written as ``DIR/<method>.png``
with the plotted data as ``DIR/<method>.json`` next to it.

Only matplotlib (Agg) is imported here, never jax or torch: the points come from the worker
processes (:func:`bench.harness.make_point`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bench.harness import SWEEPS, Sweep, fmt

OURS_STYLE = dict(color="tab:blue", marker="o")
BASE_STYLE = dict(color="tab:orange", marker="s", linestyle="--")


def panel_data(sw: Sweep, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one panel: the sweep's description and its points in x order (failed points
    keep their ``error`` and are not drawn)."""
    rows = []
    for p in points:
        if "error" in p:
            rows.append({"x": p.get("x"), "error": p["error"]})
            continue
        rows.append(
            {
                "x": p["x"],
                "ours_s": p["ours"],
                "baseline_s": p["baseline"],
                "ratio": p["ratio"],
                "size": p.get("size", ""),
                "first_call_s": p["first_call_s"],
                "peak_rss_mib": p["peak_rss_mib"],
                "times_s": {
                    side: p["details"][side].get("times_s") or p["details"][side].get("times")
                    for side in ("ours", "baseline")
                },
            }
        )
    return {
        "sweep": sw.name,
        "doc": sw.doc,
        "param": sw.param,
        "y": f"median time per call, s (side key {sw.y!r})",
        "ours": sw.ours,
        "baseline": sw.baseline,
        "log_x": sw.log_x,
        "log_y": sw.log_y,
        "points": rows,
    }


def _draw(ax, panel: dict[str, Any]) -> None:
    import matplotlib.ticker

    ok = [p for p in panel["points"] if "error" not in p]
    xs = [p["x"] for p in ok]
    ax.plot(xs, [p["ours_s"] for p in ok], label=panel["ours"], **OURS_STYLE)
    ax.plot(xs, [p["baseline_s"] for p in ok], label=panel["baseline"], **BASE_STYLE)
    for p in ok:  # the ratio at every point, next to ours
        ax.annotate(
            f"{p['ratio']:.2g}x",
            (p["x"], p["ours_s"]),
            textcoords="offset points",
            xytext=(0, -12),
            ha="center",
            fontsize=7,
            color=OURS_STYLE["color"],
        )
    if panel["log_x"]:
        ax.set_xscale("log")
    if panel["log_y"]:
        ax.set_yscale("log")
    if xs:  # the swept values themselves as the x ticks, written plainly
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    failed = [p for p in panel["points"] if "error" in p]
    title = panel["doc"] + (f" ({len(failed)} point(s) FAILED)" if failed else "")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(panel["param"], fontsize=9)
    ax.set_ylabel("median time per call, s", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_method(
    out_dir: Path, method: str, panels: list[dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """``out_dir/<method>.png`` and ``out_dir/<method>.json`` (each written to a temporary
    sibling and renamed into place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _draw(ax, panel)
    fig.suptitle(
        f"{method}: jcompress vs baseline ({meta.get('mode', '?')} mode; ratio = ours / baseline)",
        fontsize=10,
    )
    fig.text(0.5, 0.005, meta.get("machine", ""), ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    png, js = out_dir / f"{method}.png", out_dir / f"{method}.json"
    tmp = out_dir / f".{method}.png.tmp-{os.getpid()}"
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, png)
    doc = {"method": method, "png": png.name, "meta": meta, "panels": panels}
    tmp = out_dir / f".{method}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(_finite(doc), indent=2, default=repr, allow_nan=False) + "\n")
    os.replace(tmp, js)
    return png, js


def write_plots(
    out_dir: str | os.PathLike,
    points: list[dict[str, Any]],
    meta: dict[str, Any],
    methods_only: set[str] | None = None,
) -> list[Path]:
    """Group ``points`` (each with ``sweep``) by method, in :data:`SWEEPS` order, and write one
    PNG + JSON per method (only those in ``methods_only`` when given, e.g. the one a new point
    changed). Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_sweep: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_sweep.setdefault(p["sweep"], []).append(p)
    methods: dict[str, list[dict[str, Any]]] = {}
    for name, sw in SWEEPS.items():
        if name in by_sweep:
            methods.setdefault(sw.method, []).append(panel_data(sw, by_sweep[name]))
    written = []
    for method, panels in methods.items():
        if methods_only is not None and method not in methods_only:
            continue
        written.extend(write_method(out, method, panels, meta))
    return written


def points_table(points: list[dict[str, Any]]) -> str:
    """A markdown table of every sweep point."""
    lines = [
        "| sweep | x | size | jcompress s | baseline s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        if "error" in p:
            cells = [p["sweep"], str(p.get("x")), "", "FAILED", "-", "-"]
        else:
            cells = [
                p["sweep"],
                str(p["x"]),
                p.get("size", ""),
                fmt(p["ours"]),
                fmt(p["baseline"]),
                f"{p['ratio']:.2f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
