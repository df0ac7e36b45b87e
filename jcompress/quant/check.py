"""Check a tokenwise ranking against end-to-end perplexity (``jcompress quant check``).

The tokenwise tool scores each configuration layer by layer (``nmse`` of ``X W~ + b`` against
``Y``, no end-to-end forward). Whether that local score orders configurations the way the
model's perplexity does is an empirical question; this module answers it on one model:

* for every configuration ``c`` of an ``eval_fake`` result (cfg keys
  ``rank=16;fmt=nvfp4;blk=na``, ``rank=none;fmt=fp4;blk=128``, ``rank=8;quant=none``), the
  projections the result covers are quantized with ``c`` by :func:`jcompress.quant.apply.compress`
  (exact-path rules, the same leaves ``quant apply`` writes) and the perplexity is measured on
  the same windows as the dense model's (:func:`jcompress.eval.perplexity`; one compilation
  per leaf structure, i.e. per configuration, reused across its batches);
* the tokenwise prediction per configuration: the mean and max ``nmse`` over the covered
  projections and their sum ``S_c``; a calibrated predictor of the change,
  ``log(ppl_c / ppl_dense) ~ a * S_c`` (least squares through the origin: zero local error is
  the dense model), with its fit quality (``R^2`` over the configurations, RMSE in log-ppl);
* Spearman's rank correlation between the tokenwise score (mean or max ``nmse``) and the
  measured change, and every pair of configurations the tokenwise score orders the other way.

The CLI lives under ``jcompress quant`` (``quant check``), beside ``quant apply``, not under
``jcompress tokenwise``: it writes quantized leaves into the model and runs the forward pass
with ``quant apply``'s rule machinery and perplexity flags, whereas every ``tokenwise``
subcommand is layer-local by design (no end-to-end forward).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig
from jcompress.quant.apply import LayerChoice, QuantApplyConfig, compress, parse_choice

__all__ = [
    "CheckConfig",
    "ConfigRow",
    "RankingCheck",
    "check_ranking",
    "fit_through_origin",
    "plan_checks",
    "rankdata",
    "spearman",
    "wrong_pairs",
]

RANK_BY = ("mean", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckConfig:
    """How the check measures.

    Attributes:
      by: tokenwise score that orders configurations: ``mean`` or ``max`` ``nmse`` over the
        covered projections.
      configs: the result's cfg keys to check (``None``: all of them).
      seqlen, max_windows, batch_size: the perplexity windows (as ``quant apply``).
    """

    by: str = "mean"
    configs: tuple[str, ...] | None = None
    seqlen: int = 256
    max_windows: int | None = 40
    batch_size: int = 8

    def __post_init__(self):
        if self.by not in RANK_BY:
            raise UserError(f"--by: must be one of {', '.join(RANK_BY)}, got {self.by!r}")
        if self.configs is not None:
            object.__setattr__(self, "configs", tuple(str(c) for c in self.configs))
            if not self.configs:
                raise UserError("--configs: name at least one configuration")
        for f in ("seqlen", "max_windows", "batch_size"):
            v = getattr(self, f)
            if f == "max_windows" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{f}: must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- statistics


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks ``1..n`` of ``x`` (smallest first), ties sharing their average rank."""
    a = np.asarray(x, np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks.

    Returns ``None`` when it is undefined (fewer than two points, or one side constant).
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return None
    rx, ry = rankdata(x), rankdata(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return None if den == 0.0 else float(dx @ dy) / den


def wrong_pairs(names: Sequence[str], predicted: Sequence[float],
                measured: Sequence[float]) -> list[tuple[str, str]]:  # fmt: skip
    """Pairs ``(a, b)`` that the prediction puts strictly before (better than) ``b`` while the
    measurement puts ``a`` strictly after ``b``; ties on either side are not counted."""
    out = []
    for i in range(len(names)):
        for j in range(len(names)):
            if predicted[i] < predicted[j] and measured[i] > measured[j]:
                out.append((names[i], names[j]))
    return out


def fit_through_origin(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Least squares ``y ~ a x`` (no intercept): ``{slope, r2, rmse}``.

    ``r2 = 1 - SS_res / SS_tot`` with ``SS_tot`` about the mean of ``y`` (may be negative when
    the line through the origin fits worse than the mean); ``None`` where undefined.
    """
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sxx = float(xa @ xa)
    if len(xa) == 0 or sxx == 0.0:
        return {"slope": None, "r2": None, "rmse": None}
    a = float(xa @ ya) / sxx
    res = ya - a * xa
    ss_res = float(res @ res)
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    r2 = None if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return {"slope": a, "r2": r2, "rmse": math.sqrt(ss_res / len(xa))}


# ----------------------------------------------------------------------------- planning


def _choice(key: str, arg: str) -> LayerChoice:
    """A result's cfg key as ``quant apply`` reads it; ``rank=0`` is plain quantization (the
    tokenwise tool's meaning), i.e. ``rank=none``."""
    c = parse_choice(re.sub(r"(^|;)\s*rank=0\s*(;|$)", r"\1rank=none\2", key), arg=arg)
    if c.residual is not None or (c.rank is None and c.spec is None):
        raise UserError(f"{arg}: configuration {key!r} is not a tokenwise cfg key")
    return c


def plan_checks(
    result: Mapping[str, Any],
    cfg: ModelConfig,
    config: CheckConfig | None = None,
    *,
    arg: str = "--json",
) -> dict[str, tuple[QuantApplyConfig, dict[str, Any]]]:
    """Check a tokenwise result against the model and build one rule set per configuration.

    Returns:
      ``{cfg key: (QuantApplyConfig, prediction)}`` in the result's order; ``prediction`` holds
      ``n_proj``, ``nmse_mean``, ``nmse_max``, ``nmse_sum`` over the covered projections.

    Raises:
      UserError: not a tokenwise result, one written for another model (its cache metadata, a
        layer / block / projection the model lacks), one ``quant apply`` cannot reproduce
        (``eval_smooth``'s SmoothQuant scaling, an MPO low-rank branch), a cfg key
        ``quant apply`` cannot read, a ``configs`` entry the result does not hold; all
        before any weights are touched.
    """
    from jcompress.quant.choices import check_result_source, unit_paths
    from jcompress.quant.tokenwise import validate_result

    config = config or CheckConfig()
    result = validate_result(result, arg=arg)
    check_result_source(result, cfg, arg=arg)
    units = unit_paths(cfg, "proj")
    covered: list[str] = []  # the module paths (kernels) the result measured
    for layer, blocks in sorted(result["by_layer"].items(), key=lambda kv: int(kv[0])):
        for block, body in blocks.items():
            for proj in body["by_proj"]:
                key = (int(layer), str(block), str(proj))
                if key not in units:
                    raise UserError(
                        f"{arg}: layer {layer} {block}/{proj} is not in this model "
                        f"({cfg.num_layers} layers): a result for another model?"
                    )
                covered.extend(units[key])
    all_cfgs = list(next(iter(next(iter(result["by_layer"].values())).values()))["agg"])
    wanted = list(config.configs) if config.configs is not None else all_cfgs
    unknown = [c for c in wanted if c not in all_cfgs]
    if unknown:
        raise UserError(
            f"--configs: {unknown[0]!r} is not in the result; it holds {', '.join(all_cfgs)}"
        )
    out: dict[str, tuple[QuantApplyConfig, dict[str, Any]]] = {}
    for c in wanted:
        choice = _choice(c, arg)
        # one nmse per measured projection (a fused GPT-2 c_attn counts once, though it is
        # three kernels)
        per_proj = [
            float(m["nmse"])
            for blocks in result["by_layer"].values()
            for body in blocks.values()
            for m in (per[c] for per in body["by_proj"].values())
        ]
        rules = tuple((re.escape(p), choice) for p in covered)
        out[c] = (
            QuantApplyConfig(rules=rules),
            {
                "n_proj": len(per_proj),
                "nmse_mean": sum(per_proj) / len(per_proj),
                "nmse_max": max(per_proj),
                "nmse_sum": sum(per_proj),
            },
        )
    return out


# ----------------------------------------------------------------------------- the check


@dataclasses.dataclass(frozen=True)
class ConfigRow:
    """One configuration: what the tokenwise numbers predict and what the model measured."""

    cfg: str
    n_proj: int
    nmse_mean: float
    nmse_max: float
    nmse_sum: float
    bits_per_weight: float  # over the quantized kernels, as quant apply counts them
    ppl: float
    measured_log_ratio: float  # log(ppl / ppl_dense)
    predicted_log_ratio: float | None  # slope * nmse_sum

    @property
    def measured_change(self) -> float:
        return math.expm1(self.measured_log_ratio)

    @property
    def predicted_change(self) -> float | None:
        p = self.predicted_log_ratio
        return None if p is None else math.expm1(p)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "measured_change": self.measured_change,
            "predicted_change": self.predicted_change,
        }


@dataclasses.dataclass(frozen=True)
class RankingCheck:
    """The tokenwise ranking next to the measured perplexity changes (module doc)."""

    rows: tuple[ConfigRow, ...]
    ppl_dense: float
    by: str
    fit: Mapping[str, float | None]
    spearman: float | None
    wrong_pairs: tuple[tuple[str, str], ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def score(self, row: ConfigRow) -> float:
        return row.nmse_mean if self.by == "mean" else row.nmse_max

    def to_json(self) -> dict[str, Any]:
        return {
            **dict(self.meta),
            "by": self.by,
            "ppl_dense": self.ppl_dense,
            "predictor": "log(ppl / ppl_dense) ~ slope * nmse_sum (least squares through 0)",
            "fit": dict(self.fit),
            "spearman": self.spearman,
            "n_configs": len(self.rows),
            "wrong_pairs": [
                {"tokenwise_better": a, "measured_better": b} for a, b in self.wrong_pairs
            ],
            "configs": [r.to_json() for r in self.rows],
        }

    def to_markdown(self) -> str:
        def pct(v):
            return "" if v is None else f"{100 * v:+.2f}%"

        lines = [
            "| config | nmse mean | nmse max | bits/weight | predicted | perplexity | change |",
            "|---|---|---|---|---|---|---|",
            f"| dense | | | | | {self.ppl_dense:.4f} | |",
        ]
        for r in sorted(self.rows, key=lambda r: (self.score(r), r.cfg)):
            lines.append(
                f"| `{r.cfg}` | {r.nmse_mean:.4g} | {r.nmse_max:.4g} | {r.bits_per_weight:.2f} "
                f"| {pct(r.predicted_change)} | {r.ppl:.4f} | {pct(r.measured_change)} |"
            )
        f = self.fit

        def num(v, fmt):
            return "n/a" if v is None else format(v, fmt)

        lines += [
            "",
            f"rows by tokenwise nmse {self.by}; predicted = exp(a * nmse_sum) - 1 with "
            f"a = {num(f['slope'], '.4g')} (R^2 {num(f['r2'], '.3f')}, RMSE "
            f"{num(f['rmse'], '.3g')} in log-ppl); Spearman(tokenwise, measured) = "
            f"{num(self.spearman, '.3f')}",
        ]
        if self.wrong_pairs:
            lines.append(
                "ordered the other way by perplexity: "
                + ", ".join(f"`{a}` < `{b}`" for a, b in self.wrong_pairs)
            )
        else:
            lines.append("the tokenwise order agrees with the measured order on every pair")
        return "\n".join(lines)

    def scatter(self, path: str | os.PathLike) -> None:
        """Predicted vs measured perplexity change (PNG), one point per configuration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        xs = [100 * (r.predicted_change or 0.0) for r in self.rows]
        ys = [100 * r.measured_change for r in self.rows]
        ax.scatter(xs, ys)
        for r, x, y in zip(self.rows, xs, ys, strict=True):
            ax.annotate(r.cfg, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        hi = max([*xs, *ys, 0.0])
        lo = min([*xs, *ys, 0.0])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("predicted perplexity change (%)")
        ax.set_ylabel("measured perplexity change (%)")
        rho = "n/a" if self.spearman is None else f"{self.spearman:.3f}"
        ax.set_title(f"tokenwise vs end-to-end (Spearman {rho})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def check_ranking(
    cfg: ModelConfig,
    params: Any,
    result: Mapping[str, Any],
    ids: np.ndarray,
    config: CheckConfig | None = None,
    *,
    progress: bool = True,
    plan: Mapping[str, tuple[QuantApplyConfig, Mapping[str, Any]]] | None = None,
) -> RankingCheck:
    """Measure every configuration of a tokenwise ``result`` end to end (module doc).

    Args:
      cfg, params: the dense model the result was measured on.
      result: an ``eval_fake`` result dict (the seed's schema; SVD branch, no smoothing).
      ids: ``[N]`` token ids of the evaluation text; every configuration and the dense model
        see the same windows.
      config: which configurations, which score, the perplexity windows.
      progress: progress bars.
      plan: :func:`plan_checks`' output, when the caller already checked (the CLI does, before
        loading weights).

    Returns:
      :class:`RankingCheck`.

    Raises:
      UserError: see :func:`plan_checks`; bad ``ids`` / windows (:func:`jcompress.eval.perplexity`).
    """
    from jcompress.eval import perplexity

    config = config or CheckConfig()
    plan = plan if plan is not None else plan_checks(result, cfg, config)
    kw = dict(seqlen=config.seqlen, max_windows=config.max_windows,
              batch_size=config.batch_size, progress=progress)  # fmt: skip
    dense = perplexity(cfg, params, ids, **kw)
    measured: list[tuple[str, Mapping[str, Any], float, float]] = []
    for c, (rules, pred) in plan.items():
        new, report = compress(params, config=rules, progress=False)
        p = perplexity(cfg, new, ids, **kw)
        del new
        measured.append((c, pred, report.mean_bits_per_weight, p.ppl))
    xs = [pred["nmse_sum"] for _, pred, _, _ in measured]
    ys = [math.log(ppl / dense.ppl) for *_, ppl in measured]
    fit = fit_through_origin(xs, ys)
    a = fit["slope"]
    rows = tuple(
        ConfigRow(
            cfg=c,
            n_proj=int(pred["n_proj"]),
            nmse_mean=float(pred["nmse_mean"]),
            nmse_max=float(pred["nmse_max"]),
            nmse_sum=float(pred["nmse_sum"]),
            bits_per_weight=float(bits),
            ppl=float(ppl),
            measured_log_ratio=y,
            predicted_log_ratio=None if a is None else a * float(pred["nmse_sum"]),
        )
        for (c, pred, bits, ppl), y in zip(measured, ys, strict=True)
    )
    score = [r.nmse_mean if config.by == "mean" else r.nmse_max for r in rows]
    names = [r.cfg for r in rows]
    return RankingCheck(
        rows=rows,
        ppl_dense=dense.ppl,
        by=config.by,
        fit=fit,
        spearman=spearman(score, ys),
        wrong_pairs=tuple(wrong_pairs(names, score, ys)),
        meta={"seqlen": config.seqlen, "n_windows": dense.n_windows},
    )
