"""GED figures (matplotlib, Agg backend): each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jcompress.ged.fit import CVResult, GEDResult, LayerTable

__all__ = ["scree", "spectrum_vs_null", "score_histograms", "top_neurons", "layer_summary"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def scree(result: GEDResult, path: str | Path, *, threshold: float | None = None) -> Path:
    """PCA scree plot of ``(S + R) / 2``: explained variance per component and cumulative,
    with the component cut (and the threshold line where given)."""
    plt = _plt()
    frac = np.asarray(result.explained, np.float64)
    k = result.n_components
    shown = min(frac.size, max(2 * k, 20))
    x = np.arange(1, shown + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(x, frac[:shown], color="0.6", label="per component")
    ax2 = ax.twinx()
    ax2.plot(x, np.cumsum(frac)[:shown], color="C0", label="cumulative")
    if threshold is not None:
        ax2.axhline(threshold, color="C3", ls=":", lw=1, label=f"threshold {threshold:g}")
    ax.axvline(k + 0.5, color="C3", ls="--", lw=1)
    ax.set_title(f"PCA of the mean covariance: {k} of {frac.size} components kept")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance")
    ax2.set_ylabel("cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.legend(loc="center right", fontsize=8)
    return _save(fig, path)


def spectrum_vs_null(
    result: GEDResult, null, path: str | Path, *, p_value: float | None = None, q: float = 95
) -> Path:
    """Generalized eigenvalues against the permutation null of the top eigenvalue (its
    ``q``-th percentile as a band)."""
    plt = _plt()
    ev = np.asarray(result.eigenvalues, np.float64)
    null = np.asarray(null, np.float64)
    x = np.arange(1, ev.size + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, ev, "o-", ms=3, label="eigenvalues")
    if null.size:
        hi = np.percentile(null, q)
        ax.axhspan(float(null.min()), hi, color="C1", alpha=0.25, label=f"null top, <= p{q:g}")
        ax.axhline(hi, color="C1", lw=1)
    title = "GED spectrum vs permutation null"
    if p_value is not None:
        title += f" (top: p = {p_value:.3g})"
    ax.set_title(title)
    ax.set_xlabel("component")
    ax.set_ylabel("lambda (S / R~ variance ratio)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_histograms(
    cv: CVResult, path: str | Path, *, labels: tuple[str, str] = ("S", "R")
) -> Path:
    """Histograms of the held-out top-component scores per condition."""
    plt = _plt()
    s, r = np.asarray(cv.scores_s), np.asarray(cv.scores_r)
    bins = np.histogram_bin_edges(np.concatenate([s, r]), bins=30)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(s, bins=bins, alpha=0.6, label=labels[0])
    ax.hist(r, bins=bins, alpha=0.6, label=labels[1])
    ax.set_title(f"held-out scores: accuracy {cv.accuracy:.2f}, d = {cv.cohens_d:.2f}")
    ax.set_xlabel("top component score")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _save(fig, path)


def top_neurons(result: GEDResult, path: str | Path, *, k: int = 20, component: int = 0) -> Path:
    """Bar chart of the ``k`` neurons with the largest |map| entries of one component."""
    plt = _plt()
    m = np.asarray(result.maps[:, component], np.float64)
    idx = np.argsort(-np.abs(m))[:k]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * k), 3.6))
    ax.bar(np.arange(idx.size), m[idx], color=np.where(m[idx] >= 0, "C0", "C3"))
    ax.set_xticks(np.arange(idx.size), [str(i) for i in idx], rotation=90, fontsize=7)
    ax.set_title(f"top {idx.size} neurons of map {component}")
    ax.set_xlabel("neuron")
    ax.set_ylabel("map weight")
    return _save(fig, path)


def layer_summary(table: LayerTable, path: str | Path, *, alpha: float = 0.05, layers=None) -> Path:
    """Per-layer top eigenvalue, held-out accuracy, and significance (p < alpha marked);
    ``layers`` labels the rows (default ``0 .. L-1``)."""
    plt = _plt()
    n = len(table.top_eigenvalue)
    x = np.arange(n) if layers is None else np.asarray(layers)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 4.8), sharex=True)
    a1.plot(x, table.top_eigenvalue, "o-", ms=4)
    sig = np.asarray(table.p_value) < alpha
    a1.plot(x[sig], np.asarray(table.top_eigenvalue)[sig], "r*", ms=10, label=f"p < {alpha:g}")
    a1.set_ylabel("top eigenvalue")
    a1.legend(fontsize=8)
    a2.plot(x, table.accuracy, "s-", ms=4, color="C2")
    a2.axhline(0.5, color="0.5", ls=":", lw=1)
    a2.set_ylim(0, 1)
    a2.set_ylabel("held-out accuracy")
    a2.set_xlabel("layer")
    a2.set_xticks(x)
    for i, k in zip(x, table.n_components, strict=True):
        a2.annotate(f"K={int(k)}", (i, 0.05), ha="center", fontsize=7)
    return _save(fig, path)
