"""``quant apply``: write quantized leaves into a param tree by regex rules.

Each rule maps a regex over linear module paths (``model/layers/3/mlp/down_proj``; the
``kernel`` leaf below it is replaced) to a configuration in the tokenwise tool's cfg-key
syntax, so a choice read off a ranking is pasted as it is:

* ``nvfp4`` / ``fp4@128`` / ``fmt=nvfp4;blk=na`` / ``rank=none;fmt=fp4;blk=in``: plain
  quantization -> :class:`~jcompress.quant.QuantizedArray`;
* ``rank=16;fmt=nvfp4;blk=na``: ``W ~ L + Q(W - L)`` with ``L`` the rank-16 truncated SVD ->
  ``Residual(LowRank(U S, V^T), QuantizedArray(W - L))``;
* ``rank=16;quant=none``: ``LowRank`` only;
* ``none``: keep the kernel dense (a rule that exempts paths from later rules);
* ``residual=nvfp4`` / ``residual=fp4@128``: for a kernel another method already replaced by
  a typed leaf ``T`` (Tucker's ``TTLinear`` / ``TuckerLinear``, a ``LowRank``, ...):
  ``Residual(T, QuantizedArray(W - materialize(T)))`` with ``W`` the *original* dense kernel
  (``compress(..., original=tree)``; :func:`jcompress.chain` passes the chain's input).

Kernels that are typed leaves already (a method ran before, e.g. in a
:func:`jcompress.chain`): a plain spec (``nvfp4``) quantizes their *factors* and keeps the
leaf's structure, so the forward pass treats the result as it treated the leaf:

* ``LowRank(a, b)`` -> ``LowRank(Q(a), Q(b))`` (``a [in, r]``, ``b [r, out]``, blocks along
  each factor's input dimension); the KV cache still stores ``x @ Q(a)``;
* ``HeadLowRank(a, b)`` -> ``HeadLowRank(Q(a), b)``: ``a [in, heads * r]`` is quantized, the
  per-head bases ``b [heads, r, d]`` (``r * out`` entries) stay as they are: a
  ``HeadFoldedOut`` o_proj holds the same bases as ``ut``, and quantizing one copy only would
  make the folded (latent) and the widened attention paths disagree; its static ``basis``
  tag stays, so K/Q on a shared basis keep their rank-space scores;
* ``HeadFoldedOut(w, ut)`` -> ``HeadFoldedOut(Q(w), ut)`` (``w [Hq * r, out]``), for the same
  reason; the fold with the v projection still applies.

Any other typed leaf under a plain spec, a dense kernel under ``residual=``, or a typed leaf
under ``rank=R``: one :class:`UserError` naming the path and the leaf type, before any work
(:func:`result_type` is the rule, shared with :mod:`jcompress.compose`'s pre-flight check).

First matching rule wins (:func:`jcompress.methods.select`); a rule that matches nothing is an
error unless ``allow_unmatched``. The transform is pure: untouched leaves are shared.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, HeadFoldedOut, HeadLowRank, LowRank, Residual
from jcompress.methods import select
from jcompress.models.convert import flatten, unflatten
from jcompress.quant.formats import QuantSpec, parse_spec
from jcompress.quant.leaves import QuantizedArray, quantize_leaf
from jcompress.quant.lowrank import lowrank_factors

__all__ = [
    "LayerChoice",
    "QuantApplyConfig",
    "QuantApplyReport",
    "compress",
    "fake_quant_params",
    "linear_paths",
    "parse_choice",
    "parse_rule",
    "result_type",
    "stored_bits",
]


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One configuration: an optional low-rank branch and an optional format.

    Attributes:
      rank: rank of the SVD branch (``None``: no branch).
      spec: the quantization spec of the (residual) kernel (``None``: not quantized).
      residual: quantize ``W - materialize(leaf)`` of a typed leaf with this spec, keeping the
        leaf (``residual=SPEC``; excludes ``rank`` and ``spec``).
    """

    rank: int | None = None
    spec: QuantSpec | None = None
    residual: QuantSpec | None = None

    def __post_init__(self):
        if self.residual is not None and (self.rank is not None or self.spec is not None):
            raise UserError("residual=SPEC goes alone (no rank= / fmt= with it)")

    @property
    def key(self) -> str:
        """The tokenwise cfg key (``rank=16;fmt=nvfp4;blk=na``, ``rank=none;fmt=...``), or
        ``residual=SPEC``."""
        if self.residual is not None:
            return f"residual={self.residual}"
        if self.rank is None and self.spec is None:
            return "none"
        r = "none" if self.rank is None else str(self.rank)
        return f"rank={r};" + ("quant=none" if self.spec is None else self.spec.key)


_KEY_RE = re.compile(r"([a-z_]+)=([A-Za-z0-9_]+)")


def parse_choice(text: str, *, arg: str = "--rule") -> LayerChoice:
    """``nvfp4`` / ``fp4@128`` / ``none`` / a cfg key (``rank=16;fmt=nvfp4;blk=na``) /
    ``residual=SPEC`` (``residual=nvfp4``, ``residual=int4@32``)."""
    s = str(text).strip()
    if s.lower() == "none":
        return LayerChoice()
    if s.startswith("residual="):
        rest = s[len("residual=") :].strip()
        if not rest or "=" in rest or ";" in rest:
            raise UserError(
                f"{arg}: bad configuration {text!r}; residual= takes one spec alone "
                "(residual=nvfp4, residual=fp4@128)"
            )
        return LayerChoice(residual=parse_spec(rest, arg=arg))
    if "=" not in s:
        return LayerChoice(None, parse_spec(s, arg=arg))
    parts: dict[str, str] = {}
    for piece in s.split(";"):
        m = _KEY_RE.fullmatch(piece.strip())
        if m is None or m.group(1) in parts or m.group(1) not in ("rank", "fmt", "blk", "quant"):
            raise UserError(
                f"{arg}: bad configuration {text!r}; use a spec (nvfp4, fp4@128), a cfg key "
                "rank=R|none;fmt=F;blk=B|na or rank=R;quant=none, or residual=SPEC"
            )
        parts[m.group(1)] = m.group(2)
    rank: int | None = None
    if parts.get("rank", "none") != "none":
        r = parts["rank"]
        if not r.isdigit():
            raise UserError(f"{arg}: rank must be a non-negative integer or none, got {r!r}")
        rank = int(r) or None  # rank 0 (eval_fake --ranks 0): no low-rank branch, as none
    if parts.get("quant") == "none" and parts.get("rank") == "0" and len(parts) == 2:
        return LayerChoice()  # rank=0;quant=none: the original weight
    if parts.get("quant") == "none":
        if "fmt" in parts or "blk" in parts or rank is None:
            raise UserError(f"{arg}: {text!r}: quant=none goes with rank=R and no fmt/blk")
        return LayerChoice(rank, None)
    if "quant" in parts:
        raise UserError(f"{arg}: {text!r}: quant= only takes none")
    if "fmt" not in parts:
        raise UserError(f"{arg}: {text!r} has no fmt=")
    blk = parts.get("blk", "na")
    spec = parse_spec(parts["fmt"] + ("" if blk == "na" else f"@{blk}"), arg=arg)
    return LayerChoice(rank, spec)


def parse_rule(text: str, *, arg: str = "--rule") -> tuple[str, LayerChoice]:
    """``REGEX=CONFIG`` -> ``(regex, choice)``, split at the first ``=`` that leaves a valid
    regex and a valid configuration (cfg keys hold ``=`` themselves)."""
    s = str(text)
    first: UserError | None = None
    for i, ch in enumerate(s):
        if ch != "=":
            continue
        head, tail = s[:i], s[i + 1 :]
        try:
            rx = _check_regex(head, arg)
        except UserError:
            continue
        try:
            return rx, parse_choice(tail, arg=arg)
        except UserError as e:
            first = first or e
    if first is not None:  # a regex, then a bad configuration: say what is wrong with it
        raise first
    why = ""
    if "=" in s:  # no split leaves a valid regex: say what is wrong with the first one
        try:
            _check_regex(s[: s.index("=")], arg)
        except UserError as e:
            why = f" ({str(e).removeprefix(f'{arg}: ')})"
    raise UserError(
        f"{arg}: expected REGEX=CONFIG (e.g. 'model/layers/\\d+/mlp/.*=nvfp4'), got {text!r}{why}"
    )


def _check_regex(rx: str, arg: str) -> str:
    if not rx:
        raise UserError(f"{arg}: empty regex")
    try:
        re.compile(rx)
    except re.error as e:
        raise UserError(f"{arg}: bad regex {rx!r}: {e}") from None
    return rx


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantApplyConfig:
    """Which linears get which configuration.

    Attributes:
      rules: ``(regex, choice)`` pairs over linear module paths, first match wins; a choice
        is a :class:`LayerChoice` or its text (``"nvfp4"``, ``"rank=16;fmt=fp4;blk=128"``).
      allow_unmatched: a rule that matches nothing is reported instead of an error.
    """

    rules: tuple[tuple[str, Any], ...]
    allow_unmatched: bool = False

    def __post_init__(self):
        if not self.rules:
            raise UserError("rules: give at least one REGEX=CONFIG rule")
        fixed = []
        for item in self.rules:
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise UserError(f"rules: expected (regex, config) pairs, got {item!r}")
            rx, choice = item
            choice = (
                choice if isinstance(choice, LayerChoice) else parse_choice(choice, arg="rules")
            )
            fixed.append((_check_regex(str(rx), "rules"), choice))
        object.__setattr__(self, "rules", tuple(fixed))

    @classmethod
    def from_json(cls, data: Any, *, arg: str = "--config") -> QuantApplyConfig:
        """``{"rules": [[regex, config], ...], "allow_unmatched": false}`` or a mapping
        ``{regex: config}`` (in order)."""
        if isinstance(data, Mapping) and "rules" in data:
            rules = data["rules"]
            extra = set(data) - {"rules", "allow_unmatched"}
            if extra:
                raise UserError(
                    f"{arg}: unknown keys {sorted(extra)}; allowed: rules, allow_unmatched"
                )
            allow = data.get("allow_unmatched", False)
        elif isinstance(data, Mapping):
            rules, allow = list(data.items()), False
        else:
            raise UserError(f'{arg}: expected a JSON object with "rules"')
        if not isinstance(rules, list) or not isinstance(allow, bool):
            raise UserError(f'{arg}: "rules" must be a list of [regex, config] pairs')
        try:
            return cls(
                rules=tuple(tuple(r) if isinstance(r, list) else r for r in rules),
                allow_unmatched=allow,
            )
        except UserError as e:
            raise UserError(f"{arg}: {e}") from None


def linear_paths(params: Any) -> dict[str, Any]:
    """``{module path: kernel}`` of every 2-D ``kernel`` in the tree (dense or a leaf)."""
    out = {}
    for path, v in flatten(params).items():
        if path.endswith("/kernel") and len(getattr(v, "shape", ())) == 2:
            out[path[: -len("/kernel")]] = v
    return out


@dataclasses.dataclass(frozen=True)
class LayerRow:
    path: str
    config: str
    shape: tuple[int, int]
    bits_per_weight: float  # a low-rank branch at 16 bits, as deployed (SVDQuant, tokenwise)
    rel_error: float  # ||W - W~||_F / ||W||_F
    leaf: str = "dense"  # the kernel's type before this step
    stored_bits_per_weight: float | None = None  # what the params hold (factors: their dtype)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class QuantApplyReport:
    """Per-layer configuration, bits per weight and relative weight error, plus what the caller
    measured (perplexity before / after) in ``extra``."""

    layers: tuple[LayerRow, ...]
    unmatched_rules: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def with_extra(self, **kw: Any) -> QuantApplyReport:
        return dataclasses.replace(self, extra={**self.extra, **kw})

    @property
    def mean_bits_per_weight(self) -> float:
        n = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in self.layers) / max(n, 1)

    @property
    def mean_stored_bits_per_weight(self) -> float:
        """Like :attr:`mean_bits_per_weight`, with each row's bits as stored (a low-rank
        branch in its factors' dtype, e.g. 32 bits for a float32 model)."""
        n = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(
            (r.bits_per_weight if r.stored_bits_per_weight is None else r.stored_bits_per_weight)
            * r.shape[0]
            * r.shape[1]
            for r in self.layers
        ) / max(n, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [r.to_json() for r in self.layers],
            "n_layers": len(self.layers),
            "mean_bits_per_weight": self.mean_bits_per_weight,
            "mean_stored_bits_per_weight": self.mean_stored_bits_per_weight,
            "unmatched_rules": list(self.unmatched_rules),
            **dict(self.extra),
        }

    to_dict = to_json

    def to_markdown(self) -> str:
        lines = [
            "| layer | config | shape | bits/weight | rel. weight error |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.path} | {r.config} | {r.shape[0]}x{r.shape[1]} | {r.bits_per_weight:.2f} | "
            f"{r.rel_error:.4g} |"
            for r in self.layers
        ]
        lines.append(
            f"\n{len(self.layers)} linears quantized, "
            f"{self.mean_bits_per_weight:.2f} bits/weight on average"
        )
        stored = self.mean_stored_bits_per_weight
        if abs(stored - self.mean_bits_per_weight) > 0.005:
            lines.append(
                f"(a low-rank branch counts 16 bits per factor entry, as deployed; as stored "
                f"in these params: {stored:.2f} bits/weight)"
            )
        b, a = self.extra.get("ppl_before"), self.extra.get("ppl_after")
        if b and a:
            lines += [
                "",
                "| | before | after | change |",
                "|---|---|---|---|",
                f"| perplexity | {b['ppl']:.4f} | {a['ppl']:.4f} | "
                f"{100 * (a['ppl'] / b['ppl'] - 1):+.2f}% |",
            ]
        if self.unmatched_rules:
            lines.append(f"\nunmatched rules: {', '.join(self.unmatched_rules)}")
        return "\n".join(lines)


def _dense32(x: Any) -> jax.Array:
    return (x.materialize() if isinstance(x, CompressedLeaf) else x).astype(jnp.float32)


@jax.jit
def _minus(w: jax.Array, leaf: CompressedLeaf) -> jax.Array:
    """``W - materialize(leaf)`` in float32, returned in ``w.dtype`` (one compiled call)."""
    return (w.astype(jnp.float32) - _dense32(leaf)).astype(w.dtype)


@jax.jit
def _rel_error(new: Any, old: Any) -> jax.Array:
    """``||dense(new) - dense(old)||_F / ||dense(old)||_F`` (leaves or arrays; one call)."""
    ref = _dense32(old)
    return jnp.linalg.norm(_dense32(new) - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


def _build(w: jax.Array, choice: LayerChoice) -> tuple[Any, float]:
    """(leaf, bits per weight)."""
    n = w.shape[0] * w.shape[1]
    low = None
    if choice.rank is not None:
        r = min(choice.rank, min(w.shape))
        # the same SVD branch the tokenwise tool measures (exact, randomized above its threshold)
        a, b = lowrank_factors(w, r, method="svd")
        low = LowRank(a.astype(w.dtype), b.astype(w.dtype))
    if choice.spec is None:
        assert low is not None
        return low, 16.0 * low.num_params / n
    q = quantize_leaf(w if low is None else _minus(w, low), choice.spec)
    if low is None:
        return q, q.bits_per_weight
    return Residual(low, q), q.bits_per_weight + 16.0 * low.num_params / n


_FACTOR_QUANT = ("LowRank", "HeadLowRank", "HeadFoldedOut")


def _type_name(t: type) -> str:
    return t.__name__ if issubclass(t, CompressedLeaf) else "dense array"


def result_type(path: str, leaf_type: type, choice: LayerChoice) -> type | None:
    """The leaf type ``choice`` makes of a kernel of type ``leaf_type`` (``None``: untouched),
    or one :class:`UserError` naming the path and the type when it cannot act on it.

    Dense kernels are any non-leaf type (``jax.Array``, ``np.ndarray``,
    ``jax.ShapeDtypeStruct``). This is the rule :func:`compress` follows, so a caller can check
    a plan on types alone (:mod:`jcompress.compose` does, before any step runs).
    """
    if choice.key == "none":
        return None
    typed = isinstance(leaf_type, type) and issubclass(leaf_type, CompressedLeaf)
    name = _type_name(leaf_type) if isinstance(leaf_type, type) else str(leaf_type)
    if choice.residual is not None:
        if not typed:
            raise UserError(
                f"params: {path}/kernel is a {name}; quant apply's {choice.key} quantizes what "
                "a typed leaf leaves of the original kernel (use a plain spec such as "
                f"{choice.residual} for dense kernels)"
            )
        return Residual
    if not typed:
        if choice.rank is None:
            return QuantizedArray
        return LowRank if choice.spec is None else Residual
    if choice.rank is None and leaf_type in (LowRank, HeadLowRank, HeadFoldedOut):
        return leaf_type
    allowed = "residual=SPEC" if choice.rank is None else "a dense kernel"
    raise UserError(
        f"params: {path}/kernel is a {name}; quant apply's {choice.key} takes dense kernels "
        f"or the factors of {', '.join(_FACTOR_QUANT)}; for a {name} use {allowed}"
    )


def stored_bits(x: Any) -> float:
    """Bits a (nested) leaf stores: quantized arrays at their format's width plus scales,
    other arrays at their dtype's width."""
    if isinstance(x, QuantizedArray):
        return x.bits_per_weight * x.shape[0] * x.shape[1]
    if isinstance(x, CompressedLeaf):
        return float(sum(stored_bits(c) for c in x._children()))
    return float(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize * 8


def _factor(path: str, field: str, x: Any, spec: QuantSpec) -> QuantizedArray:
    if not isinstance(x, jax.Array | np.ndarray):
        raise UserError(
            f"params: {path}/kernel/{field} is a {type(x).__name__}; quant apply quantizes "
            "dense factors only"
        )
    return quantize_leaf(jnp.asarray(x), spec)


def _build_typed(path: str, leaf: CompressedLeaf, choice: LayerChoice, original: Any) -> Any:
    """The new leaf for a typed kernel (``result_type`` has accepted the pair)."""
    if choice.residual is not None:
        if original is None:
            raise UserError(
                f"params: {path}/kernel is a {type(leaf).__name__}; {choice.key} needs the "
                "original dense kernel (compress(..., original=tree), as jcompress.chain passes)"
            )
        w = flatten(original).get(f"{path}/kernel")
        if not isinstance(w, jax.Array | np.ndarray) or tuple(w.shape) != tuple(leaf.shape):
            what = "missing" if w is None else f"a {type(w).__name__}{tuple(w.shape)}"
            raise UserError(
                f"original: {path}/kernel is {what}; {choice.key} needs the dense "
                f"{list(leaf.shape)} kernel the {type(leaf).__name__} stands for"
            )
        return Residual(leaf, quantize_leaf(_minus(jnp.asarray(w), leaf), choice.residual))
    spec = choice.spec
    assert spec is not None
    if isinstance(leaf, LowRank):
        return LowRank(_factor(path, "a", leaf.a, spec), _factor(path, "b", leaf.b, spec))
    if isinstance(leaf, HeadLowRank):
        # replace: static tags stay (the shared K/Q basis ``b`` is untouched)
        return dataclasses.replace(leaf, a=_factor(path, "a", leaf.a, spec))
    assert isinstance(leaf, HeadFoldedOut)
    return dataclasses.replace(leaf, w=_factor(path, "w", leaf.w, spec))


def compress(
    params: Any,
    cfg: Any = None,
    calib: Any = None,
    *,
    config: QuantApplyConfig,
    progress: bool = True,
    original: Any = None,
) -> tuple[Any, QuantApplyReport]:
    """Replace the selected linears' kernels by quantized (or low-rank + quantized) leaves.

    Args:
      params: the param tree (not modified); kernels may be dense or typed leaves another
        method made (see the module docstring for what each rule does to them).
      cfg, calib: unused (the method protocol's signature; quantization here is data-free).
      config: the rules.
      progress: show a progress bar.
      original: the tree before any method ran (dense kernels), for ``residual=SPEC`` rules.

    Returns:
      ``(new_params, report)``; the low-rank factors keep the kernel's dtype (bits counted as
      16 per factor entry). A row's ``rel_error`` compares the new kernel with the one this
      call received (materialized), except ``residual=`` rows: with the original kernel.

    Raises:
      UserError: a rule matching nothing (unless allowed), a selected kernel whose leaf type
        the rule cannot act on (:func:`result_type`, all checked before any work), a missing
        ``original``, or a non-finite kernel.
    """
    del cfg, calib
    linears = linear_paths(params)
    sel = select(
        [rx for rx, _ in config.rules],
        list(linears),
        allow_unmatched=config.allow_unmatched,
        arg="rules",
    )
    by_rx = dict(config.rules)
    todo = [(p, by_rx[rx]) for p, rx in sel.chosen.items() if by_rx[rx].key != "none"]
    for p, choice in todo:
        result_type(p, type(linears[p]), choice)
        full = min(int(d) for d in linears[p].shape)
        if choice.rank is not None and choice.rank > full:
            raise UserError(
                f"rules: {choice.key} on {p}/kernel {list(linears[p].shape)}: rank "
                f"{choice.rank} is above its full rank {full} (the factors would be larger "
                "than the kernel)"
            )
    flat = flatten(params)
    rows = []
    for path, choice in tqdm(todo, desc="quantize", disable=not progress, leave=False):
        w = linears[path]
        n = int(w.shape[0]) * int(w.shape[1])
        if isinstance(w, CompressedLeaf):
            leaf = _build_typed(path, w, choice, original)
            before = w
            if choice.residual is not None:
                before = jnp.asarray(flatten(original)[f"{path}/kernel"])
            bits = stored_bits(leaf) / n
        else:
            before = jnp.asarray(w)
            leaf, bits = _build(before, choice)
        err = float(_rel_error(leaf, before))
        flat[f"{path}/kernel"] = leaf
        rows.append(
            LayerRow(
                path,
                choice.key,
                tuple(int(d) for d in w.shape),
                float(bits),
                err,
                type(w).__name__ if isinstance(w, CompressedLeaf) else "dense",
                stored_bits(leaf) / n,
            )
        )
    return unflatten(flat), QuantApplyReport(tuple(rows), sel.unmatched)


def fake_quant_params(params: Any, config: QuantApplyConfig) -> Any:
    """The dense tree a quantized one stands for (every selected kernel fake-quantized)."""
    new, _ = compress(params, config=config, progress=False)
    from jcompress.leaves import materialize

    return materialize(new)
