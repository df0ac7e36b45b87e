"""Recipes: an ordered list of method steps, validated field by field before any model work.

A recipe is a JSON (or, with PyYAML installed, YAML) list of steps; each step is a mapping
with ``method`` (a :data:`~jcompress.compose.registry.REGISTRY` name) and that method's config
fields (its frozen dataclass fields; lists become tuples)::

    [
      {"method": "eigen_attention", "error_budget": 0.05, "avg_dim": 4,
       "layers": ["model/layers/[0-3]"]},
      {"method": "quant", "rules": [["model/layers/\\\\d+/mlp/.*", "nvfp4"]]}
    ]

A top-level mapping ``{"steps": [...]}`` is accepted as well. The calibration windows are the
chain's, shared by every step (``jcompress run --nsamples / --seqlen / --seed``): a step may not
set a method's own ``nsamples`` / ``seqlen`` / ``seed``. Every problem is one
:class:`~jcompress.errors.UserError` naming the step index, the method and the field
(``recipe: step 1 (tucker): unknown field 'rank'; allowed: variant, mps_eps, ...``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jcompress.compose.registry import Kind, Method, get_method
from jcompress.errors import UserError

__all__ = ["Step", "load_recipe", "parse_recipe", "step_to_json"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a chain: a registered method name and its validated frozen config."""

    method: str
    config: Any

    @property
    def entry(self) -> Method:
        return get_method(self.method)


def _to_tuples(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_to_tuples(x) for x in v)
    return v


def _wants_tuple(tp: Any) -> bool:
    return "tuple" in str(tp)


def _config_from_fields(entry: Method, fields: Mapping[str, Any], where: str) -> Any:
    cls = entry.config_class()
    if entry.from_mapping is not None:
        return entry.from_mapping(dict(fields), where)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: no tuple hints
        hints = {}
    kw = {}
    for name, value in fields.items():
        if name in entry.chain_settings:
            raise UserError(
                f"{where}: {name}: the calibration windows are set once for the whole chain "
                "(jcompress run --nsamples / --seqlen / --seed, or the calib argument of a "
                "Chain); allowed fields here: "
                + ", ".join(n for n in known if n not in entry.chain_settings)
            )
        if name not in known:
            raise UserError(f"{where}: unknown field {name!r}; allowed: {', '.join(known)}")
        tp = hints.get(name, known[name].type)
        if tp is bool and not isinstance(value, bool):
            raise UserError(f"{where}: {name}: must be true or false, got {value!r}")
        if isinstance(value, list) or (_wants_tuple(tp) and isinstance(value, tuple)):
            if not _wants_tuple(tp) and "Sequence" not in str(tp):
                raise UserError(f"{where}: {name}: expected a single value, got a list {value!r}")
            value = _to_tuples(value)
        elif isinstance(value, Mapping):
            raise UserError(f"{where}: {name}: expected a value, got a mapping {dict(value)!r}")
        kw[name] = value
    return cls(**kw)


def _step(item: Any, i: int) -> Step:
    where = f"recipe: step {i}"
    if isinstance(item, Step):
        return item
    if not isinstance(item, Mapping):
        raise UserError(f"{where}: expected a mapping with 'method', got {item!r}")
    if "method" not in item:
        raise UserError(f"{where}: no 'method' (one of the registered methods)")
    entry = get_method(item["method"], arg=f"{where}: method")
    where = f"{where} ({entry.name})"
    fields = {k: v for k, v in item.items() if k != "method"}
    try:
        config = _config_from_fields(entry, fields, where)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (TypeError, ValueError) as e:  # a config without its own check for this value
        raise UserError(f"{where}: {e}") from None
    return Step(entry.name, config)


def _check_order(steps: Sequence[Step]) -> None:
    for i, s in enumerate(steps):
        if s.entry.kind is Kind.ATTENTION and i != len(steps) - 1:
            raise UserError(
                f"recipe: step {i} ({s.method}) tunes an attention setting for the final "
                "params; it must be the last step (a later step would change the model it was "
                "tuned on)"
            )


def parse_recipe(data: Any) -> tuple[Step, ...]:
    """A recipe (already decoded: a list of step mappings, or ``{"steps": [...]}``) ->
    validated :class:`Step` s. Also takes :class:`Step` objects as they are."""
    if isinstance(data, Mapping):
        extra = set(data) - {"steps"}
        if "steps" not in data or extra:
            raise UserError(
                "recipe: expected a list of steps or a mapping with 'steps' only"
                + (f" (unknown keys: {', '.join(sorted(map(str, extra)))})" if extra else "")
            )
        data = data["steps"]
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise UserError(f"recipe: expected a list of steps, got {type(data).__name__}")
    if not data:
        raise UserError("recipe: no steps")
    steps = tuple(_step(item, i) for i, item in enumerate(data))
    _check_order(steps)
    return steps


def load_recipe(path: str | os.PathLike) -> tuple[Step, ...]:
    """Read and validate a recipe file: ``.json``, or ``.yaml`` / ``.yml`` (needs PyYAML)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe: {p} is not a file")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(
                f"recipe: {p} is YAML and PyYAML is not installed; pip install pyyaml or "
                "write the recipe as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"recipe: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"recipe: {p} is not valid JSON: {e}") from None
    else:
        raise UserError(f"recipe: {p}: expected a .json, .yaml or .yml file")
    return parse_recipe(data)


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def step_to_json(step: Step) -> dict[str, Any]:
    """``{"method": ..., <config fields>}`` (JSON-ready; quant rules as their text keys)."""
    cfg = step.config
    if step.method == "quant":
        fields = {
            "rules": [[rx, c.key] for rx, c in cfg.rules],
            "allow_unmatched": cfg.allow_unmatched,
        }
    else:
        skip = step.entry.chain_settings  # the chain's calibration windows, not the step's
        fields = {
            f.name: _plain(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if f.name not in skip
        }
    return {"method": step.method, **fields}
