"""What :func:`jcompress.tucker.compress` did: per projection and in total."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ProjectionReport", "TuckerReport"]


@dataclasses.dataclass(frozen=True)
class ProjectionReport:
    """One compressed projection.

    Attributes:
      path: projection path (``model/layers/0/self_attn/k_proj``; the kernel is at ``/kernel``).
      shape: dense kernel shape ``[in, out]``.
      ranks: TT bond ranks ``(r_1, ..., r_{d-1})``, Tucker ranks ``(r1, r2, r3)``, or the
        per-head latent width ``(r,)`` (``tucker_mps``; followed by the TT bond ranks of the
        projected weight when the MPS step applies: ``(r, r_1, ..., r_{d-1})``).
      params_before / params_after: stored scalars of the kernel (bias not counted).
      weight_error: ``||W - W'||_F / ||W||_F``.
    """

    path: str
    shape: tuple[int, int]
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    weight_error: float

    @property
    def compression_ratio(self) -> float:
        """``params_after / params_before`` (the seed's convention: smaller is more compressed)."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def space_saved(self) -> float:
        """``1 - compression_ratio`` (negative when the factors are larger than the kernel)."""
        return 1.0 - self.compression_ratio


@dataclasses.dataclass(frozen=True)
class TuckerReport:
    """A :class:`jcompress.methods.Report` of the tensor-network methods.

    Attributes:
      variant: ``"tt"``, ``"tucker"`` or ``"tucker_mps"``. family: model family.
      settings: the ranks / eps used.
      projections: one :class:`ProjectionReport` per compressed kernel, in layer order.
      unmatched_rules: selection rules that matched no projection.
      params_before / params_after: scalars of the whole param tree; ``params_after`` as a
        factor checkpoint stores it (:func:`jcompress.models.count_stored_params`: a basis
        shared by K and Q, V's and o_proj's copy, a ``HeadLatentBias``'s ``ut`` once).
      kv_cache_before / kv_cache_after: cached k/v scalars per token over all layers; equal
        for ``tt`` / ``tucker`` (their leaves are not ``Factored``; the cache keeps full k/v),
        smaller for ``tucker_mps`` (the cache keeps rank-r projected keys / values).
      layer_errors: ``(layer path, ||Y - Y'|| / ||Y||)`` per compressed layer when
        calibration windows were given, else empty.
      extra: what callers add (perplexity, timings).
    """

    variant: str
    family: str
    settings: dict[str, Any]
    projections: tuple[ProjectionReport, ...]
    unmatched_rules: tuple[str, ...]
    params_before: int
    params_after: int
    kv_cache_before: int
    kv_cache_after: int
    layer_errors: tuple[tuple[str, float], ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def selected_before(self) -> int:
        """Scalars of the compressed kernels, before."""
        return sum(p.params_before for p in self.projections)

    @property
    def selected_after(self) -> int:
        return sum(p.params_after for p in self.projections)

    @property
    def compression_ratio(self) -> float:
        """``after / before`` over the compressed kernels."""
        return self.selected_after / self.selected_before if self.selected_before else 1.0

    @property
    def space_saved(self) -> float:
        return 1.0 - self.compression_ratio

    @property
    def weight_error(self) -> float:
        """Mean relative weight error over the compressed kernels (0 when none)."""
        n = len(self.projections)
        return sum(p.weight_error for p in self.projections) / n if n else 0.0

    def with_extra(self, **kw: Any) -> TuckerReport:
        return dataclasses.replace(self, extra={**self.extra, **kw})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, per-projection ratios, and the totals."""
        d = dataclasses.asdict(self)
        d["projections"] = [
            {
                **dataclasses.asdict(p),
                "shape": list(p.shape),
                "ranks": list(p.ranks),
                "compression_ratio": p.compression_ratio,
                "space_saved": p.space_saved,
            }
            for p in self.projections
        ]
        d["unmatched_rules"] = list(self.unmatched_rules)
        d["layer_errors"] = {path: err for path, err in self.layer_errors}
        d["totals"] = {
            "selected_params_before": self.selected_before,
            "selected_params_after": self.selected_after,
            "compression_ratio": self.compression_ratio,
            "space_saved": self.space_saved,
            "mean_weight_error": self.weight_error,
            "model_params_before": self.params_before,
            "model_params_after": self.params_after,
            "kv_cache_per_token": self.kv_cache_after,
        }
        return d

    def to_markdown(self) -> str:
        lines = [
            f"**{self.variant}** ({self.family}; "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items())
            + ")",
            "",
            "| projection | shape | ranks | params before | params after | ratio | saved | "
            "weight error |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for p in self.projections:
            lines.append(
                f"| {p.path} | {p.shape[0]}x{p.shape[1]} | {','.join(map(str, p.ranks))} | "
                f"{p.params_before} | {p.params_after} | {p.compression_ratio:.3f} | "
                f"{100 * p.space_saved:.1f}% | {p.weight_error:.4f} |"
            )
        lines.append(
            f"| **total** | | | {self.selected_before} | {self.selected_after} | "
            f"{self.compression_ratio:.3f} | {100 * self.space_saved:.1f}% | "
            f"{self.weight_error:.4f} (mean) |"
        )
        if self.layer_errors:
            lines += ["", "| layer | output error |", "|---|---:|"]
            lines += [f"| {path} | {err:.4f} |" for path, err in self.layer_errors]
        lines += [
            "",
            f"Model params: {self.params_before} -> {self.params_after}. KV cache per token: "
            f"{self.kv_cache_before} -> {self.kv_cache_after} scalars"
            + (
                " (unchanged: TT / Tucker leaves are not low-rank `Factored` leaves, so the "
                "cache stores full k/v)."
                if self.kv_cache_after == self.kv_cache_before
                else " (the cache stores the projected rank-r keys / values)."
            ),
        ]
        if self.unmatched_rules:
            lines.append("Unused layer rules: " + ", ".join(self.unmatched_rules))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The same as :meth:`to_json`."""
        return self.to_json()
