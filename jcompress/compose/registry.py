"""The method registry: what :func:`jcompress.chain` can run, and the pre-flight protocol.

Each entry (:class:`Method`) names a method's frozen config class, an adapter to its pure
``compress`` (or, for SpargeAttn, its tuner), and a **plan**: a function of the model config,
the step's config and what is known about every param leaf *before* the step
(``{path: LeafInfo}``: the set of leaf types a path may hold, and its dense shape) that

* raises one :class:`~jcompress.errors.UserError` naming the path and the leaf type when the
  method cannot act on a leaf it would read (the same rule the method applies at run time:
  ``require_dense`` or :func:`jcompress.quant.apply.result_type`), and
* returns the leaves the step may write (``{path: LeafInfo}``), so the next step is checked
  against them.

The plans use types and shapes only (no weights, no calibration): a chain is checked end to end
before its first step runs. ``jax.eval_shape`` cannot do this (the methods calibrate on the
host). A path a method *may* leave dense (EigenAttention keeps a layer whose rank search finds
no saving) holds both types, and the next step must accept both.

Not registered: GED (``jcompress ged``) analyses activations and returns no params, so it is
not a step of a chain (:data:`NOT_CHAINABLE` says so when a recipe names it).
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, HeadFoldedOut, HeadLatentBias, HeadLowRank
from jcompress.methods import select
from jcompress.models.config import ModelConfig
from jcompress.models.families import spec_for

__all__ = [
    "DENSE",
    "NOT_CHAINABLE",
    "REGISTRY",
    "Kind",
    "LeafInfo",
    "Method",
    "StepOutput",
    "get_method",
    "leaf_infos",
    "register_method",
    "type_name",
]


class Dense:
    """Marker type: a dense array (``jax.Array``, ``np.ndarray``, ``jax.ShapeDtypeStruct``)."""


DENSE: type = Dense


def type_name(t: type) -> str:
    """``"dense array"`` or the leaf class name."""
    return "dense array" if t is Dense else t.__name__


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What the pre-flight check knows about one param leaf.

    Attributes:
      types: the leaf types the path may hold (``DENSE`` or ``CompressedLeaf`` subclasses).
      shape: the dense shape (``[in, out]`` for a kernel).
    """

    types: frozenset[type]
    shape: tuple[int, ...]

    def with_type(self, t: type, *, maybe: bool = False) -> LeafInfo:
        """This leaf after a step writes ``t`` (``maybe``: or leaves it as it was)."""
        return LeafInfo(self.types | {t} if maybe else frozenset({t}), self.shape)


def leaf_infos(params: Any) -> dict[str, LeafInfo]:
    """``{path: LeafInfo}`` of a param tree (arrays, typed leaves or ``ShapeDtypeStruct``)."""
    from jcompress.models.convert import flatten

    out = {}
    for path, v in flatten(params).items():
        t = type(v) if isinstance(v, CompressedLeaf) else Dense
        out[path] = LeafInfo(frozenset({t}), tuple(int(d) for d in getattr(v, "shape", ())))
    return out


class Kind(enum.Enum):
    """What a step changes: the param tree, or an attention setting next to it."""

    PARAMS = "params"
    ATTENTION = "attention"  # SpargeAttn: thresholds for the block_sparse attention


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one step's adapter returns: the new tree, the method's report and (attention
    steps) the attention setting it tuned (e.g. :class:`jcompress.sparge.SpargeParams`) with
    the attention implementation that applies it (``forward(..., attention=...)``)."""

    params: Any
    report: Any
    attention_state: Any = None
    attention: Any = None


Plan = Callable[[ModelConfig, Any, Mapping[str, LeafInfo]], dict[str, LeafInfo]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One chainable method.

    Attributes:
      name: the recipe's ``method`` value.
      config_class: a zero-argument callable returning the frozen config class (lazy, so
        importing :mod:`jcompress.compose` loads no method).
      run: ``run(params, cfg, calib, config, *, progress, original) -> StepOutput``
        (``original``: the chain's input tree, for residual quantization).
      plan: the pre-flight function (module docstring).
      needs_calib: ``needs_calib(config) -> bool``: the step cannot run without calibration
        windows.
      uses_calib: ``uses_calib(config) -> bool``: the step reads calibration windows when
        given (tucker's per-layer output errors); default: ``needs_calib``. A chain given
        calibration text that no step reads refuses it (``jcompress run``).
      kind: :class:`Kind`.
      from_mapping: optional ``(fields: dict, arg: str) -> config`` for configs with their own
        JSON form (``quant``'s rules); default: the fields are the dataclass fields.
      chain_settings: config fields a recipe may not set because the chain sets them once for
        every step (the calibration windows: ``nsamples``, ``seqlen``, ``seed``).
      doc: one line for ``--help`` and errors.
    """

    name: str
    config_class: Callable[[], type]
    run: Callable[..., StepOutput]
    plan: Plan
    needs_calib: Callable[[Any], bool]
    kind: Kind = Kind.PARAMS
    from_mapping: Callable[[dict[str, Any], str], Any] | None = None
    chain_settings: tuple[str, ...] = ()
    doc: str = ""
    uses_calib: Callable[[Any], bool] | None = None

    def reads_calib(self, config: Any) -> bool:
        """Whether this step reads calibration windows given to the chain."""
        return (self.uses_calib or self.needs_calib)(config)


REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}

NOT_CHAINABLE: dict[str, str] = {
    "ged": "GED is an analysis of activations (it returns no params): run `jcompress ged` on "
    "the model before or after the chain",
}


def register_method(method: Method, *, aliases: tuple[str, ...] = ()) -> Method:
    """Add ``method`` (and its aliases) to :data:`REGISTRY`; returns it."""
    for n in (method.name, *aliases):
        if n in REGISTRY or n in _ALIASES:
            raise ValueError(f"register_method: {n!r} is already registered")
    REGISTRY[method.name] = method
    _ALIASES.update({a: method.name for a in aliases})
    return method


def get_method(name: Any, *, arg: str = "method") -> Method:
    """The registry entry for ``name`` (or an alias), or one :class:`UserError` listing the
    allowed names."""
    if isinstance(name, str) and name in NOT_CHAINABLE:
        raise UserError(f"{arg}: {name!r} cannot be chained: {NOT_CHAINABLE[name]}")
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in REGISTRY:
        raise UserError(f"{arg}: unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


# --------------------------------------------------------------------------- plans


def _reject(path: str, t: type, method: str, wants: str) -> UserError:
    return UserError(f"params: {path} is a {type_name(t)}; {method} needs {wants}")


def _need_dense(leaves: Mapping[str, LeafInfo], path: str, method: str, what: str) -> LeafInfo:
    info = leaves.get(path)
    if info is None:
        raise UserError(f"params: {path} is missing; {method} reads it")
    for t in sorted(info.types, key=type_name):
        if t is not Dense:
            raise _reject(path, t, method, f"dense {what}")
    return info


def _quiet_select(rules, paths, allow_unmatched: bool, arg: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the method warns itself when it runs
        return select(rules, paths, allow_unmatched=allow_unmatched, arg=arg)


def _plan_eigen(cfg: ModelConfig, config: Any, leaves: Mapping[str, LeafInfo]):
    from jcompress.eigen_attention.compress import _ROPE_FAMILIES

    lay = spec_for(cfg.family.value).layout
    rope = cfg.family in _ROPE_FAMILIES
    if not rope and cfg.num_heads != cfg.num_kv_heads:
        raise UserError(f"{cfg.family.value}: shared K/Q bases need num_heads == num_kv_heads")
    layers = [f"{lay.layers}/{i}" for i in range(cfg.num_layers)]
    sel = _quiet_select(config.layers, layers, config.allow_unmatched, "layers")
    out = {}
    for layer in sel.chosen:
        info = {
            r: _need_dense(leaves, f"{layer}/{r}/kernel", "EigenAttention", "k/q/v/o kernels")
            for r in (lay.k, lay.q, lay.v, lay.o)
        }
        # a layer whose rank search finds no saving stays dense: "maybe" types
        for r in (lay.k, lay.v) if rope else (lay.k, lay.q, lay.v):
            out[f"{layer}/{r}/kernel"] = info[r].with_type(HeadLowRank, maybe=True)
            if (bias := leaves.get(f"{layer}/{r}/bias")) is not None:  # kept in rank space
                out[f"{layer}/{r}/bias"] = bias.with_type(HeadLatentBias, maybe=True)
        out[f"{layer}/{lay.o}/kernel"] = info[lay.o].with_type(HeadFoldedOut, maybe=True)
    return out


def _plan_tucker(cfg: ModelConfig, config: Any, leaves: Mapping[str, LeafInfo]):
    from jcompress.eigen_attention.compress import _ROPE_FAMILIES
    from jcompress.tucker import TTLinear, TuckerLinear, Variant, check_fits

    lay = spec_for(cfg.family.value).layout
    cands = [
        (f"{lay.layers}/{i}", f"{lay.layers}/{i}/{path}", role)
        for i in range(cfg.num_layers)
        for role, path in (("q", lay.q), ("k", lay.k), ("v", lay.v))
    ]
    sel = _quiet_select(config.layers, [p for _, p, _ in cands], config.allow_unmatched, "layers")
    method = f"tucker ({config.variant.value})"
    out = {}
    if config.variant is not Variant.TUCKER_MPS:
        leaf = TTLinear if config.variant is Variant.TT else TuckerLinear
        for _, path, _ in cands:
            if path in sel:
                key = f"{path}/kernel"
                out[key] = _need_dense(leaves, key, method, "kernels").with_type(leaf)
        check_fits(cfg, config)  # ranks against the projection shapes
        return out
    rope = cfg.family in _ROPE_FAMILIES
    roles: dict[str, set[str]] = {}
    for layer, path, role in cands:
        if path in sel:
            roles.setdefault(layer, set()).add(role)
    for layer, rs in roles.items():
        info = {
            r: _need_dense(leaves, f"{layer}/{r}/kernel", method, "k/q/v/o kernels")
            for r in (lay.k, lay.q, lay.v, lay.o)
        }
        projected = ((lay.k,) if rope else (lay.k, lay.q)) if "k" in rs else ()
        projected += (lay.v,) if "v" in rs else ()
        for r in projected:
            out[f"{layer}/{r}/kernel"] = info[r].with_type(HeadLowRank)
            if (bias := leaves.get(f"{layer}/{r}/bias")) is not None:  # kept in rank space
                out[f"{layer}/{r}/bias"] = bias.with_type(HeadLatentBias)
        if "v" in rs:
            out[f"{layer}/{lay.o}/kernel"] = info[lay.o].with_type(HeadFoldedOut)
    check_fits(cfg, config)  # basis ranks against the head width
    return out


def _plan_quant(cfg: ModelConfig, config: Any, leaves: Mapping[str, LeafInfo]):
    from jcompress.quant.apply import result_type

    del cfg
    linears = {
        p[: -len("/kernel")]: info
        for p, info in leaves.items()
        if p.endswith("/kernel") and len(info.shape) == 2
    }
    sel = _quiet_select([rx for rx, _ in config.rules], linears, config.allow_unmatched, "rules")
    by_rx = dict(config.rules)
    out = {}
    for path, rx in sel.chosen.items():
        choice, info = by_rx[rx], linears[path]
        made = set()
        for t in sorted(info.types, key=type_name):
            r = result_type(path, t, choice)  # raises for a type the rule cannot take
            if r is not None:
                made.add(r)
        if made:
            out[f"{path}/kernel"] = LeafInfo(frozenset(made), info.shape)
    return out


def _plan_sparge(cfg: ModelConfig, config: Any, leaves: Mapping[str, LeafInfo]):
    del leaves  # tuning runs the forward pass, which takes every registered leaf type
    bad = [layer for layer in config.layer_bounds() if layer >= cfg.num_layers]
    if bad:
        raise UserError(
            f"layer_l1: layer {bad[0]} does not exist (the model has {cfg.num_layers} layers)"
        )
    return {}


# --------------------------------------------------------------------------- adapters


def _run_eigen(params, cfg, calib, config, *, progress, original):
    from jcompress.eigen_attention import compress

    del original
    return StepOutput(*compress(params, cfg, calib, config=config, progress=progress))


def _run_tucker(params, cfg, calib, config, *, progress, original):
    from jcompress.tucker import compress

    del original
    return StepOutput(*compress(params, cfg, calib, config=config, progress=progress))


def _run_quant(params, cfg, calib, config, *, progress, original):
    from jcompress.quant.apply import compress

    return StepOutput(
        *compress(params, cfg, calib, config=config, progress=progress, original=original)
    )


def _run_sparge(params, cfg, calib, config, *, progress, original):
    from jcompress.sparge.tune import tune

    del original
    from jcompress.sparge.api import BlockSparse

    state, report = tune(cfg, params, calib, config, progress=progress)
    attention = BlockSparse(block_q=config.block_q, block_k=config.block_k)
    return StepOutput(params, report, state, attention)


def _eigen_config():
    from jcompress.eigen_attention import EigenAttentionConfig

    return EigenAttentionConfig


def _tucker_config():
    from jcompress.tucker import TuckerConfig

    return TuckerConfig


def _quant_config():
    from jcompress.quant.apply import QuantApplyConfig

    return QuantApplyConfig


def _sparge_config():
    from jcompress.sparge.tune import SpargeTuneConfig

    return SpargeTuneConfig


def _quant_from_mapping(fields: dict[str, Any], arg: str):
    from jcompress.quant.apply import QuantApplyConfig

    if "rules" not in fields:
        raise UserError(f"{arg}: quant needs rules: [[REGEX, CONFIG], ...] or {{REGEX: CONFIG}}")
    if isinstance(fields["rules"], Mapping):  # {regex: config}, in order
        fields = {**fields, "rules": [list(kv) for kv in fields["rules"].items()]}
    return QuantApplyConfig.from_json(fields, arg=arg)


def _tucker_needs_calib(config) -> bool:
    from jcompress.tucker import Variant

    return config.variant is Variant.TUCKER_MPS


register_method(
    Method(
        "eigen_attention",
        _eigen_config,
        _run_eigen,
        _plan_eigen,
        lambda config: True,
        chain_settings=("nsamples", "seqlen", "seed"),
        doc="EigenAttention: per-head low-rank K/Q/V from calibration bases (HeadLowRank, "
        "HeadFoldedOut o_proj)",
    ),
    aliases=("eigen",),
)
register_method(
    Method(
        "tucker",
        _tucker_config,
        _run_tucker,
        _plan_tucker,
        _tucker_needs_calib,
        uses_calib=lambda config: True,  # tt / tucker: per-layer output errors when given
        doc="Tucker / MPS: K/Q/V as TTLinear (tt), TuckerLinear (tucker) or Kronecker-basis "
        "HeadLowRank (tucker_mps)",
    ),
)
register_method(
    Method(
        "quant",
        _quant_config,
        _run_quant,
        _plan_quant,
        lambda config: False,
        from_mapping=_quant_from_mapping,
        doc="quant apply: regex rules -> QuantizedArray, low-rank + quantized residual, "
        "quantized factors of LowRank / HeadLowRank, residual=SPEC over any typed leaf",
    ),
    aliases=("quant_apply",),
)
register_method(
    Method(
        "sparge",
        _sparge_config,
        _run_sparge,
        _plan_sparge,
        lambda config: True,
        kind=Kind.ATTENTION,
        chain_settings=("nsamples", "seqlen", "seed"),
        doc="SpargeAttn tuning: per-head block-sparse attention thresholds (an attention "
        "setting, not a param transform: the last step; the chain result carries it)",
    ),
    aliases=("sparge_tune",),
)
