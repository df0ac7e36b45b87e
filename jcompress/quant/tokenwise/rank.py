"""Rankings of an ``eval_fake`` / ``eval_smooth`` result (the seed's post-processing).

* Ranking-1: every (layer, block, configuration) by the block's ``nmse_mean_over_proj`` (or
  ``nmse_max_over_proj``), smallest first;
* Ranking-2: every (layer, block, projection, configuration) by its ``nmse``, smallest first;
* the best configuration per block, and a heatmap (rows: layer/block, columns:
  configurations, colour: ``log10`` of the Ranking-1 metric).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from jcompress.errors import UserError

__all__ = ["RANK_BY", "load_result", "ranking1", "ranking2", "validate_result", "write_rankings"]

RANK_BY = ("mean", "max")
_AGG_KEYS = ("nmse_mean_over_proj", "nmse_max_over_proj", "n_proj")


def validate_result(res: Any, *, arg: str = "--json") -> dict[str, Any]:
    """The seed's schema: ``meta``, ``by_layer -> layer -> block -> {by_proj, agg}``, with
    ``by_proj -> proj -> cfg -> {nmse, ...}`` and ``agg -> cfg -> {nmse_mean_over_proj,
    nmse_max_over_proj, n_proj}``, every block listing the same configurations. One clear
    error naming the first place that does not fit."""
    if not isinstance(res, dict) or not isinstance(res.get("meta"), dict):
        raise UserError(f"{arg}: not a tokenwise result (no 'meta' object)")
    by_layer = res.get("by_layer")
    if not isinstance(by_layer, dict) or not by_layer:
        raise UserError(f"{arg}: not a tokenwise result (no 'by_layer' entries)")
    cfgs = None
    for layer, blocks in by_layer.items():
        if not str(layer).isdigit() or not isinstance(blocks, dict) or not blocks:
            raise UserError(f"{arg}: by_layer[{layer!r}] is not a layer index with blocks")
        for block, body in blocks.items():
            where = f"by_layer[{layer}][{block}]"
            if not isinstance(body, dict) or set(body) != {"by_proj", "agg"}:
                raise UserError(f"{arg}: {where} must hold exactly 'by_proj' and 'agg'")
            agg = body["agg"]
            if cfgs is None:
                cfgs = list(agg)
            if list(agg) != cfgs or not cfgs:
                raise UserError(f"{arg}: {where}.agg lists other configurations than the rest")
            for c, a in agg.items():
                if not isinstance(a, dict) or any(k not in a for k in _AGG_KEYS):
                    raise UserError(f"{arg}: {where}.agg[{c}] lacks {', '.join(_AGG_KEYS)}")
                for k in _AGG_KEYS[:2]:
                    _check_nmse(a[k], f"{arg}: {where}.agg[{c}].{k}")
            if not isinstance(body["by_proj"], dict) or not body["by_proj"]:
                raise UserError(f"{arg}: {where}.by_proj is empty")
            for proj, per in body["by_proj"].items():
                if not isinstance(per, dict) or list(per) != cfgs:
                    raise UserError(f"{arg}: {where}.by_proj[{proj}] lists other configurations")
                for c, m in per.items():
                    v = m.get("nmse") if isinstance(m, dict) else None
                    _check_nmse(v, f"{arg}: {where}.by_proj[{proj}][{c}].nmse")
    return res


def _check_nmse(v: Any, where: str) -> None:
    """An nmse (a ratio of sums of squares) is a finite number >= 0; anything else is a
    broken result file."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where} is missing or not finite (got {v!r})")
    if v < 0:
        raise UserError(f"{where} is negative ({v!r}); an nmse is >= 0")


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--json: {p} is not a file")
    try:
        res = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--json: {p} is not JSON ({e})") from None
    return validate_result(res)


def _layers(res):
    return sorted(res["by_layer"].items(), key=lambda kv: int(kv[0]))


def ranking1(res: dict[str, Any], by: str = "mean") -> list[dict[str, Any]]:
    """Rows ``{rank, layer, block, cfg, nmse_mean_over_proj, nmse_max_over_proj, n_proj}``."""
    if by not in RANK_BY:
        raise UserError(f"--by: must be one of {', '.join(RANK_BY)}, got {by!r}")
    key = f"nmse_{by}_over_proj"
    rows = [
        {"layer": int(layer), "block": block, "cfg": c, **{k: a[k] for k in _AGG_KEYS}}
        for layer, blocks in _layers(res)
        for block, body in blocks.items()
        for c, a in body["agg"].items()
    ]
    rows.sort(key=lambda r: (r[key], r["layer"], r["block"], r["cfg"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def ranking2(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{rank, layer, block, proj, cfg, nmse, token_rel_l2_mean, token_rel_l2_p99}``."""
    rows = []
    for layer, blocks in _layers(res):
        for block, body in blocks.items():
            for proj, per in body["by_proj"].items():
                for c, m in per.items():
                    rows.append({
                        "layer": int(layer), "block": block, "proj": proj, "cfg": c,
                        "nmse": m["nmse"],
                        "token_rel_l2_mean": m.get("token_rel_l2_mean"),
                        "token_rel_l2_p99": m.get("token_rel_l2_p99"),
                    })  # fmt: skip
    rows.sort(key=lambda r: (r["nmse"], r["layer"], r["block"], r["proj"], r["cfg"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def best_per_block(res: dict[str, Any], by: str = "mean") -> list[dict[str, Any]]:
    key = f"nmse_{by}_over_proj"
    out = []
    for layer, blocks in _layers(res):
        for block, body in blocks.items():
            c = min(body["agg"], key=lambda k: body["agg"][k][key])
            out.append({"layer": int(layer), "block": block, "cfg": c, key: body["agg"][c][key]})
    return out


def _csv(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _md(rows, limit: int | None = None) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows[:limit]:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def heatmap(res: dict[str, Any], path: str | os.PathLike, by: str = "mean") -> None:
    """``log10`` of the Ranking-1 metric, rows layer/block, columns configurations (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    key = f"nmse_{by}_over_proj"
    rows, data = [], []
    cfgs = None
    for layer, blocks in _layers(res):
        for block, body in blocks.items():
            cfgs = cfgs or list(body["agg"])
            rows.append(f"{layer}/{block}")
            data.append([math.log10(max(body["agg"][c][key], 1e-30)) for c in cfgs])
    arr = np.asarray(data)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cfgs), 1.0 + 0.35 * len(rows)))
    im = ax.imshow(arr, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cfgs)), [c.replace(";", "\n") for c in cfgs], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"log10 {key}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_rankings(res: dict[str, Any], out_dir: str | os.PathLike, *, by: str = "mean",
                   overwrite: bool = False, top: int = 50) -> Path:  # fmt: skip
    """Write ``ranking1.csv``, ``ranking2.csv``, ``best_per_block.csv``, ``rankings.md`` and
    ``heatmap.png`` into ``out_dir`` (atomically)."""
    from jcompress.atomic import atomic_dir

    validate_result(res)
    r1, r2, best = ranking1(res, by), ranking2(res), best_per_block(res, by)
    md = "\n\n".join([
        f"# Tokenwise rankings ({res['meta'].get('xy_path', '')})",
        f"## Ranking-1: blocks by nmse_{by}_over_proj", _md(r1, top),
        "## Ranking-2: projections by nmse", _md(r2, top),
        "## Best configuration per block", _md(best),
    ]) + "\n"  # fmt: skip
    with atomic_dir(out_dir, overwrite=overwrite, arg="--out_dir") as tmp:
        (tmp / "ranking1.csv").write_text(_csv(r1))
        (tmp / "ranking2.csv").write_text(_csv(r2))
        (tmp / "best_per_block.csv").write_text(_csv(best))
        (tmp / "rankings.md").write_text(md)
        heatmap(res, tmp / "heatmap.png", by)
    return Path(out_dir)
