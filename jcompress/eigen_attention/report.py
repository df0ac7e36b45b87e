"""The EigenAttention report: per-layer thresholds, ranks, errors, and KV-cache sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["EigenReport", "LayerReport"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One layer's outcome.

    Attributes:
      threshold: the kept threshold (``None``: no threshold met the budget; layer left dense).
      rank_kq, rank_v: per-head ranks of the K (and Q, when ``shares_q``) and V bases.
      head_dim_kq, head_dim_v: per-head widths before compression.
      kv_heads: heads that carry a basis (KV heads).
      error: relative layer-output error ``||Y - Y'|| / ||Y||`` on the calibration set.
      steps: layer evaluations (candidate ranks whose error was computed).
      compressed: whether any rank is below its head width (``threshold`` is ``None`` when
        not, and with ``rank_search='bisect'``).
      seconds: wall time spent on this layer (statistics, bases, search, leaves).
      shared_k_basis: one K basis for all KV heads (``reference_mode`` on the Llama family).
      head_ranks_kq, head_ranks_v: per KV head, the rank the threshold rule gives that head
        alone (the layer keeps the maximum over heads, the reference's rule, unless
        ``per_head_ranks`` is set: then these are the ranks kept, ``rank_kq`` / ``rank_v``
        the padded width); ``None`` without a threshold. :attr:`kv_after_per_head` is what
        per-head ranks cache.
    """

    layer: int
    path: str
    threshold: float | None
    rank_kq: int
    rank_v: int
    head_dim_kq: int
    head_dim_v: int
    kv_heads: int
    error: float
    steps: int
    compressed: bool
    shares_q: bool
    seconds: float = dataclasses.field(default=0.0, compare=False)
    shared_k_basis: bool = False
    head_ranks_kq: tuple[int, ...] | None = None
    head_ranks_v: tuple[int, ...] | None = None

    @property
    def kv_before(self) -> int:
        """Cached scalars per token (keys + values) before compression."""
        return self.kv_heads * (self.head_dim_kq + self.head_dim_v)

    @property
    def kv_after(self) -> int:
        return self.kv_heads * (self.rank_kq + self.rank_v)

    @property
    def kv_after_per_head(self) -> int:
        """Cached scalars per token if every head kept its own rank at this threshold
        (:attr:`kv_after` when there are no per-head ranks)."""
        if self.head_ranks_kq is None or self.head_ranks_v is None:
            return self.kv_after
        return sum(self.head_ranks_kq) + sum(self.head_ranks_v)


@dataclasses.dataclass(frozen=True)
class EigenReport:
    """What :func:`jcompress.eigen_attention.compress` did (a :class:`jcompress.methods.Report`).

    ``params_before`` counts the scalars of the dense param tree; ``params_after`` the
    scalars the factors checkpoint stores (``save_hf(..., factors=True)``): typed leaves count
    their factors, and a factor equal to one already counted (the K/Q basis that K and Q
    share, V's basis and ``o_proj``'s folded copy of it) counts once
    (:func:`jcompress.models.count_stored_params`). ``extra`` holds what callers add (perplexity
    before/after, samples, timings).
    """

    family: str
    layers: tuple[LayerReport, ...]
    nsamples: int
    seqlen: int
    avg_dim: int
    averaged_sequences: int
    dropped_sequences: int
    error_budget: float
    unmatched_rules: tuple[str, ...]
    rope: bool
    params_before: int = 0
    params_after: int = 0
    rank_search: str = "threshold"
    reference_mode: bool = False
    per_head_ranks: bool = False
    model_layers: int = 0
    model_kv_per_layer: int = 0
    compress_seconds: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def model_kv_cache_before(self) -> int:
        """Cached scalars per token over *every* layer of the model, before (layers left out
        by ``layers`` count at full width)."""
        return self.model_layers * self.model_kv_per_layer

    @property
    def model_kv_cache_after(self) -> int:
        return self.model_kv_cache_before - (self.kv_cache_before - self.kv_cache_after)

    @property
    def model_kv_cache_ratio(self) -> float:
        """Whole-model after / before."""
        b = self.model_kv_cache_before
        return self.model_kv_cache_after / b if b else 1.0

    @property
    def kv_cache_after_per_head(self) -> int:
        """Selected layers' cache per token with per-head ranks (see ``LayerReport``)."""
        return sum(r.kv_after_per_head for r in self.layers)

    @property
    def evaluations(self) -> int:
        """Layer evaluations over all reported layers."""
        return sum(r.steps for r in self.layers)

    @property
    def kv_cache_before(self) -> int:
        """Cached scalars per token over the reported layers, before."""
        return sum(r.kv_before for r in self.layers)

    @property
    def kv_cache_after(self) -> int:
        return sum(r.kv_after for r in self.layers)

    @property
    def kv_cache_ratio(self) -> float:
        """After / before (1.0 = no reduction)."""
        return self.kv_cache_after / self.kv_cache_before if self.kv_cache_before else 1.0

    def with_extra(self, **kw: Any) -> EigenReport:
        return dataclasses.replace(self, extra={**self.extra, **kw})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the :class:`jcompress.methods.Report` protocol): every field,
        per-layer KV sizes, and the KV-cache totals."""
        d = dataclasses.asdict(self)
        d["layers"] = [
            {
                **dataclasses.asdict(r),
                "kv_before": r.kv_before,
                "kv_after": r.kv_after,
                "kv_after_per_head": r.kv_after_per_head,
            }
            for r in self.layers
        ]
        d["unmatched_rules"] = list(self.unmatched_rules)
        d["kv_cache_before"] = self.kv_cache_before
        d["kv_cache_after"] = self.kv_cache_after
        d["kv_cache_percent"] = 100.0 * self.kv_cache_ratio
        d["model_kv_cache_before"] = self.model_kv_cache_before
        d["model_kv_cache_after"] = self.model_kv_cache_after
        d["model_kv_cache_percent"] = 100.0 * self.model_kv_cache_ratio
        d["evaluations"] = self.evaluations
        d["kv_cache_after_per_head"] = self.kv_cache_after_per_head
        return d

    def to_dict(self) -> dict[str, Any]:
        """The same as :meth:`to_json` (the older name)."""
        return self.to_json()

    def to_markdown(self) -> str:
        q = "K/Q" if any(r.shares_q for r in self.layers) else "K"
        lines = [
            f"| layer | threshold | {q} rank/head | V rank/head | error | evaluations | "
            "seconds | KV/token before | KV/token after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            if not r.compressed:
                t = "dense"
            elif r.threshold is None:
                t = "(bisect)"
            else:
                t = f"{r.threshold:.2f}"
            lines.append(
                f"| {r.layer} | {t} | {r.rank_kq}/{r.head_dim_kq} | {r.rank_v}/{r.head_dim_v} | "
                f"{r.error:.4f} | {r.steps} | {r.seconds:.2f} | {r.kv_before} | {r.kv_after} |"
            )
        lines.append(
            f"| selected | | | | budget {self.error_budget} | {self.evaluations} | "
            f"{self.compress_seconds:.2f} | {self.kv_cache_before} | "
            f"{self.kv_cache_after} ({100 * self.kv_cache_ratio:.1f}%) |"
        )
        if self.model_layers:
            lines.append(
                f"| model ({self.model_layers} layers) | | | | | | | "
                f"{self.model_kv_cache_before} | {self.model_kv_cache_after} "
                f"({100 * self.model_kv_cache_ratio:.1f}%) |"
            )
        mode = f"rank search: {self.rank_search}"
        if self.reference_mode:
            mode += " (reference mode: the reference's stop rule"
            mode += ", one K basis per layer)" if self.rope else ")"
        notes = [
            mode,
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
            f"calibration: {self.nsamples} x {self.seqlen} tokens, avg_dim {self.avg_dim} -> "
            f"{self.averaged_sequences} averaged sequences"
            + (f", {self.dropped_sequences} dropped" if self.dropped_sequences else ""),
        ]
        if self.per_head_ranks:
            notes.append(
                f"per-head ranks: each head keeps its own count ({self.kv_cache_after_per_head} "
                f"scalars/token of true rank; the leaves and the KV cache are padded to the "
                f"max over heads, {self.kv_cache_after} scalars/token, the extra columns zero)"
            )
        elif self.kv_cache_after_per_head < self.kv_cache_after:
            notes.append(
                f"per-head ranks (each head its own count at the layer's threshold) would cache "
                f"{self.kv_cache_after_per_head} scalars/token instead of {self.kv_cache_after} "
                f"(heads x max over heads, the reference's rule)"
            )
        if self.unmatched_rules:
            notes.append(f"layer rules that matched nothing: {', '.join(self.unmatched_rules)}")
        return "\n".join(lines + [""] + notes)
