"""EigenAttention figures (matplotlib, Agg backend): each function writes one PNG and returns
its path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jcompress.eigen_attention.report import EigenReport

__all__ = ["kv_cache_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def kv_cache_figure(report: EigenReport, path: str | Path) -> Path:
    """KV cache per token for every layer of the model (layers ``layers`` left out, or left
    dense, at full width): keys and values after compression stacked against the dense
    width, the per-head-rank alternative as a marker where the threshold rule gives one, and
    the whole-model and selected-layer totals in the title.

    Args:
      report: an :class:`EigenReport` (``model_layers`` / ``model_kv_per_layer`` set).
      path: PNG to write (parent directories are created).

    Returns:
      ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _plt()
    n = max(report.model_layers, max((r.layer for r in report.layers), default=-1) + 1)
    full = report.model_kv_per_layer or (report.layers[0].kv_before if report.layers else 0)
    keys = np.full(n, full / 2.0)
    vals = np.full(n, full / 2.0)
    per_head = np.full(n, np.nan)
    for r in report.layers:
        keys[r.layer] = r.kv_heads * r.rank_kq
        vals[r.layer] = r.kv_heads * r.rank_v
        if r.kv_after_per_head < r.kv_after:
            per_head[r.layer] = r.kv_after_per_head
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n + 2.5), 3.6))
    ax.bar(x, np.full(n, full), color="0.88", label="dense", width=0.8)
    ax.bar(x, keys, color="tab:blue", label="keys", width=0.6)
    ax.bar(x, vals, bottom=keys, color="tab:orange", label="values", width=0.6)
    if np.isfinite(per_head).any():
        ax.plot(x, per_head, "k_", markersize=14, mew=2, label="per-head ranks")
    ax.set_xlabel("layer")
    ax.set_ylabel("cached scalars / token")
    ax.set_xticks(x)
    ax.set_title(
        f"KV cache: whole model {100 * report.model_kv_cache_ratio:.1f}%, "
        f"selected layers {100 * report.kv_cache_ratio:.1f}% "
        f"(budget {report.error_budget}, {report.rank_search})",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
