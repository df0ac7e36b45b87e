"""Turn a tokenwise ranking into ``quant apply`` rules: one configuration per block or projection.

Input (:func:`read_ranking`): what ``jcompress tokenwise rank`` writes, or the result it reads:

* ``ranking1.csv`` (Ranking-1: ``layer, block, cfg, nmse_mean_over_proj, nmse_max_over_proj``)
  or ``best_per_block.csv``: one unit per decoder layer block (``self_attn`` / ``mlp``), scored
  by ``nmse_{by}_over_proj``;
* ``ranking2.csv`` (Ranking-2: ``layer, block, proj, cfg, nmse``): one unit per projection;
* the ``eval_fake`` / ``eval_smooth`` JSON: per block (``agg``) or per projection (``by_proj``).

Choice (:func:`choose`): each unit gets the configuration with the smallest score, unless a
budget says otherwise:

* ``max_bits``: the weight-count-weighted mean bits per weight over the chosen units must stay
  at or under ``max_bits``. Every unit starts at its cheapest configuration (fewest bits, then
  the smaller score); then, greedily, the upgrade with the largest score reduction per added
  bit (counted over the unit's weights) that still fits is taken, until none fits. Bits are
  those ``quant apply`` stores: element bits + block scales (+ the tensor scale) and 16 bits
  per low-rank factor entry.
* ``top_k``: only the ``k`` units whose best configuration scores smallest are quantized
  (the ones the tokenwise numbers say tolerate it best); the others stay dense. With
  ``max_bits`` too, the units are kept first and the budget holds over the kept ones.

Units map to the model's linear module paths through the tokenwise targets (a GPT-2 fused
``c_attn`` projection is its q/k/v kernels), and :meth:`Choices.to_apply_config` emits one
exact-path rule per kernel (:class:`jcompress.quant.apply.QuantApplyConfig`, first match wins).
A unit the model does not have, or a configuration ``quant apply`` cannot parse, is one clear
error before any weights are read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig
from jcompress.quant.apply import LayerChoice, QuantApplyConfig, parse_choice
from jcompress.quant.formats import scales_shape

__all__ = [
    "Choices",
    "ChoiceConfig",
    "Ranking",
    "UnitChoice",
    "bits_per_weight",
    "check_result_source",
    "choose",
    "config_from_ranking",
    "read_ranking",
]

LEVELS = ("auto", "block", "proj")
RANK_BY = ("mean", "max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChoiceConfig:
    """How a ranking becomes choices.

    Attributes:
      by: Ranking-1 score: ``mean`` (``nmse_mean_over_proj``) or ``max``.
      level: ``block`` / ``proj`` units; ``auto``: what the file holds (a result JSON: block).
      max_bits: mean bits per weight over the chosen units at most this (``None``: no limit).
      top_k: quantize only the ``k`` best-scoring units (``None``: all).
    """

    by: str = "mean"
    level: str = "auto"
    max_bits: float | None = None
    top_k: int | None = None

    def __post_init__(self):
        if self.by not in RANK_BY:
            raise UserError(f"--ranking_by: must be one of {', '.join(RANK_BY)}, got {self.by!r}")
        if self.level not in LEVELS:
            raise UserError(
                f"--ranking_level: must be one of {', '.join(LEVELS)}, got {self.level!r}"
            )
        mb = self.max_bits
        if mb is not None and (
            isinstance(mb, bool)
            or not isinstance(mb, (int, float))
            or not math.isfinite(mb)
            or mb <= 0
        ):
            raise UserError(f"--max_bits: a positive number of bits per weight, got {mb!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"--top_k: a positive integer, got {k!r}")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Scored candidates: ``rows`` of ``(layer, block, proj or None, cfg key, score)``."""

    level: str  # "block" | "proj"
    rows: tuple[tuple[int, str, str | None, str, float], ...]
    source: str
    score: str  # the score's name, e.g. nmse_mean_over_proj


def _num(v: Any, where: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise UserError(f"--from_ranking: {where}: {v!r} is not a number") from None
    if not math.isfinite(x):
        raise UserError(f"--from_ranking: {where}: score {v!r} is not finite")
    return x


def _layer(v: Any, where: str) -> int:
    s = str(v).strip()
    if not s.isdigit():
        raise UserError(f"--from_ranking: {where}: layer {v!r} is not a layer index")
    return int(s)


def _from_csv(p: Path, by: str) -> Ranking:
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--from_ranking: {p} is not a CSV file ({e})") from None
    if not rows:
        raise UserError(f"--from_ranking: {p} has no rows")
    cols = set(rows[0])
    score = f"nmse_{by}_over_proj"
    if {"layer", "block", "proj", "cfg", "nmse"} <= cols:
        level, key = "proj", "nmse"
    elif {"layer", "block", "cfg", score} <= cols:
        level, key = "block", score
    else:
        raise UserError(
            f"--from_ranking: {p}: columns {sorted(cols)} are neither Ranking-1 "
            f"(layer, block, cfg, {score}) nor Ranking-2 (layer, block, proj, cfg, nmse)"
        )
    out = []
    for i, r in enumerate(rows, start=2):
        where = f"{p.name} line {i}"
        out.append((
            _layer(r["layer"], where), str(r["block"]),
            str(r["proj"]) if level == "proj" else None, str(r["cfg"]), _num(r[key], where),
        ))  # fmt: skip
    return Ranking(level, tuple(out), str(p), key)


def _from_json(p: Path, by: str, level: str, cfg: ModelConfig | None) -> Ranking:
    from jcompress.quant.tokenwise.rank import ranking1, ranking2, validate_result

    try:
        res = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--from_ranking: {p} is not JSON ({e})") from None
    res = validate_result(res, arg="--from_ranking")
    if cfg is not None:
        check_result_source(res, cfg, arg="--from_ranking")
    if level == "proj":
        rows = [(r["layer"], r["block"], r["proj"], r["cfg"], float(r["nmse"]))
                for r in ranking2(res)]  # fmt: skip
        return Ranking("proj", tuple(rows), str(p), "nmse")
    key = f"nmse_{by}_over_proj"
    rows = [(r["layer"], r["block"], None, r["cfg"], float(r[key])) for r in ranking1(res, by)]
    return Ranking("block", tuple(rows), str(p), key)


def read_ranking(
    path: str | os.PathLike,
    *,
    by: str = "mean",
    level: str = "auto",
    cfg: ModelConfig | None = None,
) -> Ranking:
    """Read a ranking CSV (Ranking-1, best-per-block or Ranking-2) or a tokenwise result JSON.

    Args:
      path: the file.
      by: Ranking-1 score (``mean`` / ``max``).
      level: ``block`` / ``proj`` / ``auto``; a CSV fixes its own level (asking for the other
        one is an error), a result JSON gives either (``auto``: block).
      cfg: the model the ranking is for: a result JSON is checked to belong to it
        (:func:`check_result_source`; a CSV carries no model identity).
    """
    ChoiceConfig(by=by, level=level)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--from_ranking: {p} is not a file")
    if p.suffix.lower() == ".json":
        return _from_json(p, by, "proj" if level == "proj" else "block", cfg)
    r = _from_csv(p, by)
    if level != "auto" and level != r.level:
        raise UserError(
            f"--ranking_level {level}: {p} ranks {r.level}s; use "
            f"{'ranking2.csv' if level == 'proj' else 'ranking1.csv'} or the result JSON"
        )
    return r


def bits_per_weight(choice: LayerChoice, shape: tuple[int, int]) -> float:
    """Bits per dense entry that ``quant apply`` stores for ``choice`` on an ``[in, out]``
    kernel (as :attr:`jcompress.quant.QuantizedArray.bits_per_weight` and its low-rank
    factors at 16 bits per entry)."""
    n_in, n_out = int(shape[0]), int(shape[1])
    n = n_in * n_out
    bits = 0.0
    if choice.rank is not None:
        r = min(choice.rank, n_in, n_out)
        bits += 16.0 * r * (n_in + n_out) / n
    if choice.spec is not None:
        f = choice.spec.format
        el = f.element
        ebits = el.ebits + el.mbits + 1 if el.ebits else (4 if choice.spec.fmt == "int4" else 8)
        n_scales = math.prod(scales_shape(choice.spec, (n_in, n_out)))
        bits += ebits + (n_scales * f.scale_dtype.itemsize * 8 + 32) / n
    elif choice.rank is None:
        bits += 16.0  # "none": dense (counted as 16-bit)
    return bits


@dataclasses.dataclass(frozen=True)
class UnitChoice:
    """The configuration chosen for one unit (a block or a projection of one layer)."""

    layer: int
    block: str
    proj: str | None
    cfg: str
    score: float
    bits_per_weight: float
    n_weights: int
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.block}" + (f"/{self.proj}" if self.proj else "")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"paths": list(self.paths)}


@dataclasses.dataclass(frozen=True)
class Choices:
    """The chosen configurations, what they came from, and the budget they meet."""

    units: tuple[UnitChoice, ...]
    dense: tuple[str, ...]  # units left dense by top_k
    source: str
    score: str
    config: ChoiceConfig

    @property
    def mean_bits_per_weight(self) -> float:
        n = sum(u.n_weights for u in self.units)
        return sum(u.bits_per_weight * u.n_weights for u in self.units) / max(n, 1)

    def to_apply_config(self) -> QuantApplyConfig:
        """One exact-path rule per kernel of every chosen unit."""
        rules = [(re.escape(p), u.cfg) for u in self.units for p in u.paths]
        if not rules:
            raise UserError("--from_ranking: no unit chosen (nothing to quantize)")
        return QuantApplyConfig(rules=tuple(rules))

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "score": self.score,
            "by": self.config.by,
            "max_bits": self.config.max_bits,
            "top_k": self.config.top_k,
            "mean_bits_per_weight": self.mean_bits_per_weight,
            "predicted_score_sum": sum(u.score for u in self.units),
            "units": [u.to_json() for u in self.units],
            "dense": list(self.dense),
        }

    def to_markdown(self) -> str:
        lines = [
            f"Choices from {self.source} ({self.score})",
            "",
            "| unit | config | score | bits/weight |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {u.name} | {u.cfg} | {u.score:.4g} | {u.bits_per_weight:.3f} |" for u in self.units
        ]
        lines.append(
            f"\n{len(self.units)} units, {self.mean_bits_per_weight:.3f} bits/weight on average"
            + (f"; left dense: {', '.join(self.dense)}" if self.dense else "")
        )
        return "\n".join(lines)


def unit_paths(cfg: ModelConfig, level: str) -> dict[tuple[int, str, str | None], list[str]]:
    """``{(layer, block, proj or None): [module paths]}`` from the tokenwise targets: the
    kernels one ranking unit covers (``level`` ``"proj"``: one projection; ``"block"``: the
    block's projections together, key ``proj=None``)."""
    from jcompress.models.families import spec_for
    from jcompress.quant.tokenwise.targets import targets

    root = spec_for(cfg.family.value).layout.layers
    out: dict[tuple[int, str, str | None], list[str]] = {}
    for t in targets(cfg):
        key = (t.layer, t.block, t.proj if level == "proj" else None)
        out.setdefault(key, []).extend(f"{root}/{t.layer}/{part}" for part in t.parts)
    return out


def _greedy(options: list[list[tuple[float, float, str]]], sizes: list[int], budget: float):
    """Pick one ``(bits, score, cfg)`` per unit minimizing the score sum under
    ``sum(size * bits) <= budget * sum(size)`` (greedy on score drop per added bit)."""
    total = sum(sizes)
    pick = [min(range(len(o)), key=lambda j, o=o: (o[j][0], o[j][1], o[j][2])) for o in options]
    used = sum(sizes[u] * options[u][pick[u]][0] for u in range(len(options)))
    cap = budget * total
    if used > cap * (1 + 1e-12):
        raise UserError(
            f"--max_bits: {budget} is below the cheapest choice of the ranking "
            f"({used / total:.3f} bits/weight)"
        )
    while True:
        best = None
        for u, opts in enumerate(options):
            b0, s0, _ = opts[pick[u]]
            for j, (b, s, _c) in enumerate(opts):
                if s >= s0:
                    continue
                extra = sizes[u] * (b - b0)
                if used + extra > cap * (1 + 1e-12):
                    continue
                gain = math.inf if extra <= 0 else (s0 - s) / extra
                cand = (gain, s0 - s, -u, -j)
                if best is None or cand > best[0]:
                    best = (cand, u, j, extra)
        if best is None:
            return pick
        _, u, j, extra = best
        pick[u] = j
        used += extra


def choose(ranking: Ranking, cfg: ModelConfig, config: ChoiceConfig | None = None) -> Choices:
    """One configuration per unit of ``ranking`` for the model ``cfg`` (module doc).

    Raises:
      UserError: a unit the model lacks, an unparsable configuration, a budget below the
        cheapest choice.
    """
    from jcompress.models.params import param_shapes

    config = config or ChoiceConfig()
    paths = unit_paths(cfg, ranking.level)
    shapes = param_shapes(cfg)
    by_unit: dict[tuple[int, str, str | None], dict[str, float]] = {}
    for layer, block, proj, c, s in ranking.rows:
        key = (layer, block, proj)
        if key not in paths:
            have = sorted({f"{k[1]}" + (f"/{k[2]}" if k[2] else "") for k in paths})
            raise UserError(
                f"--from_ranking: {ranking.source}: layer {layer} "
                f"{block}{'/' + proj if proj else ''} is not in this model "
                f"({cfg.num_layers} layers; units: {', '.join(have)})"
            )
        by_unit.setdefault(key, {})[c] = s
    parsed: dict[str, LayerChoice] = {}
    units = sorted(by_unit)
    options: list[list[tuple[float, float, str]]] = []
    sizes: list[int] = []
    for key in units:
        kshapes = [shapes[f"{p}/kernel"] for p in paths[key]]
        n = sum(int(a) * int(b) for a, b in kshapes)
        opts = []
        for c, s in by_unit[key].items():
            if c not in parsed:
                parsed[c] = parse_choice(c, arg="--from_ranking")
            bits = sum(bits_per_weight(parsed[c], sh) * sh[0] * sh[1] for sh in kshapes) / n
            opts.append((bits, s, c))
        options.append(opts)
        sizes.append(n)
    keep = list(range(len(units)))
    if config.top_k is not None and config.top_k < len(units):
        # the k units whose best configuration scores best; the budget then holds over them
        best = [min(s for _, s, _ in o) for o in options]
        keep = sorted(sorted(keep, key=lambda i: (best[i], i))[: config.top_k])
    opts, ns = [options[i] for i in keep], [sizes[i] for i in keep]
    if config.max_bits is not None:
        pick = _greedy(opts, ns, float(config.max_bits))
    else:
        pick = [min(range(len(o)), key=lambda j, o=o: (o[j][1], o[j][0], o[j][2])) for o in opts]
    chosen = [
        UnitChoice(units[i][0], units[i][1], units[i][2], opts[m][pick[m]][2],
                   opts[m][pick[m]][1], opts[m][pick[m]][0], ns[m], tuple(paths[units[i]]))
        for m, i in enumerate(keep)
    ]  # fmt: skip
    kept = set(keep)
    dense = [
        f"{units[i][0]}/{units[i][1]}" + (f"/{units[i][2]}" if units[i][2] else "")
        for i in range(len(units))
        if i not in kept
    ]  # UnitChoice.name
    return Choices(tuple(chosen), tuple(dense), ranking.source, ranking.score, config)


def check_result_source(result: Mapping[str, Any], cfg: ModelConfig, *, arg: str) -> None:
    """One clear error when a (validated) tokenwise result cannot stand for ``quant apply`` on
    the model of ``cfg``: measured on another model, on SmoothQuant-scaled weights
    (``eval_smooth``), or with an MPO low-rank branch (apply's ``rank=R`` is a truncated SVD)."""
    from jcompress.quant.tokenwise import check_model_meta

    meta = result["meta"]
    check_model_meta(meta.get("xy_meta") or {}, cfg, arg=arg, what="the result was measured on")
    if meta.get("smooth"):
        raise UserError(
            f"{arg}: an eval_smooth result (SmoothQuant-scaled weights): quant apply quantizes "
            "the unscaled kernels, so it cannot reproduce it; use an eval_fake result"
        )
    if str(meta.get("method", "svd")) != "svd":
        raise UserError(
            f"{arg}: the result's low-rank branch is method={meta['method']}; quant apply's "
            "rank=R is a truncated SVD: use an eval_fake result made with --method svd"
        )


def config_from_ranking(
    path: str | os.PathLike, cfg: ModelConfig, config: ChoiceConfig | None = None
) -> tuple[QuantApplyConfig, Choices]:
    """:func:`read_ranking` (a result JSON checked to belong to this model) + :func:`choose` +
    :meth:`Choices.to_apply_config`."""
    config = config or ChoiceConfig()
    ch = choose(read_ranking(path, by=config.by, level=config.level, cfg=cfg), cfg, config)
    return ch.to_apply_config(), ch
