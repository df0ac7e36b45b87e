"""One storage form for typed leaves, shared by every checkpoint format.

A leaf becomes a flat ``{field path: array}`` dict plus a JSON description, and back::

    flat, desc = to_arrays(LowRank(a, b))
    # flat == {"a": a, "b": b}
    # desc == {"type": "jcompress.leaves.LowRank", "static": {},
    #          "children": {"a": "array", "b": "array"}}
    leaf = from_arrays(desc, flat)

Field paths join field names with ``/`` through nested leaves
(``Residual(LowRank(a, b), r)`` -> ``base/a``, ``base/b``, ``residual``); a ``None`` child is
stored as ``None`` in ``children`` and has no array. A tuple child (a variable number of
arrays or leaves, e.g. the cores of a tensor train) is stored as ``field/0``, ``field/1``, ...
with a list of the items' kinds in ``children``. ``type`` is the name the class is
registered under (:func:`jcompress.leaves.register_leaf`); ``static`` holds the other fields,
encoded by :func:`encode_static` so tuples, enums, dtypes (ml_dtypes ones too), frozen
dataclasses and non-finite floats come back as they went in.

:func:`jcompress.checkpoint.save` stores ``flat`` as a nested dict at the leaf's place in the
orbax tree and ``desc`` in its sidecar; :func:`jcompress.save_hf` with ``factors=True`` stores
``flat`` as safetensors tensors ``jcompress/<param path>/<field path>`` and ``desc`` in
``config.json``. Files written before this module (bare class names as ``type``; factor
descriptions without ``children``; statics as plain JSON) read back unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, leaf_name, leaf_type

__all__ = ["StoreOnce", "decode_static", "encode_static", "from_arrays", "to_arrays", "to_device"]

ARRAY = "array"


def to_device(x: Any, dtype: Any = None) -> jax.Array:
    """``jnp.asarray(x, dtype)`` that compiles nothing for a host ``np.ndarray``.

    ``jnp.asarray`` lifts an ndarray with no ``dtype`` through ``lax.stage``, an identity
    program JAX compiles once per distinct shape and dtype (one compile per weight shape of
    every checkpoint load). Here the (canonical) cast happens in numpy, as ``jnp.asarray``'s own
    numpy fallback does it, and the transfer is a copying ``device_put``: an owned device
    buffer, never an alias of the host memory (a checkpoint's memory map is released after
    the copy). Anything else (a ``jax.Array``, a scalar, a tracer) goes to ``jnp.asarray``."""
    if not isinstance(x, np.ndarray) or isinstance(x, np.ma.MaskedArray):
        return jax.numpy.asarray(x, dtype=dtype)
    want = jax.dtypes.canonicalize_dtype(x.dtype if dtype is None else dtype)
    return jax.device_put(np.asarray(x, dtype=want), may_alias=False)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, CompressedLeaf)


# --------------------------------------------------------------------------- statics


def _import_name(cls: type, where: str) -> str:
    """``module:qualname`` of a class that :func:`_resolve` finds again."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    if _lookup(name) is not cls:
        raise UserError(
            f"{where}: {cls.__qualname__} cannot be saved: it is not reachable by its name "
            f"{name} (define it at module level)"
        )
    return name


def _lookup(name: str) -> Any:
    module, _, qual = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in qual.split(".") if qual else ["<missing>"]:
        obj = getattr(obj, part, None)
    return obj


def _resolve(name: Any, kind: type, where: str) -> Any:
    obj = _lookup(name) if isinstance(name, str) else None
    if not (isinstance(obj, type) and issubclass(obj, kind)):
        module = name.partition(":")[0] if isinstance(name, str) else "?"
        raise UserError(
            f"{where}: cannot find {name!r} (import {module} before reading this checkpoint)"
        )
    return obj


def _dtype_name(v: Any) -> str | None:
    if isinstance(v, np.dtype) or (
        isinstance(v, type) and (issubclass(v, np.generic) or hasattr(v, "dtype"))
    ):
        dt = np.dtype(v)
        return None if dt.kind == "O" else dt.name
    return None


def _dtype_by_name(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def encode_static(v: Any, where: str = "static") -> Any:
    """A static value -> JSON, tagged so :func:`decode_static` gives back an equal value of the
    same type.

    Args:
      v: ``None``, bool, int, float (``nan`` / ``inf`` too), str, tuple, list, dict with string
        keys, a dtype (``np.dtype`` or a scalar type such as ``jnp.bfloat16``), an enum member,
        or a dataclass instance of those. Enums and dataclasses must be defined at module
        level (they are stored by ``module:qualname``).
      where: names the value in error messages.

    Raises:
      UserError: ``v`` (or a part of it) has no JSON form.
    """
    if isinstance(v, CompressedLeaf):
        raise UserError(f"{where}: a leaf cannot be a static field (list it in array_fields)")
    if isinstance(v, enum.Enum):
        return {"__enum__": _import_name(type(v), where), "value": encode_static(v.value, where)}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else {"__float__": repr(f)}
    if isinstance(v, tuple):
        return {"__tuple__": [encode_static(x, where) for x in v]}
    if isinstance(v, list):
        return [encode_static(x, where) for x in v]
    if isinstance(v, Mapping):
        if not all(isinstance(k, str) for k in v):
            raise UserError(f"{where}: dict keys must be strings to be saved")
        if any(k.startswith("__") and k.endswith("__") for k in v):
            raise UserError(f"{where}: dict keys of the form __name__ are reserved")
        return {k: encode_static(x, f"{where}.{k}") for k, x in v.items()}
    name = _dtype_name(v)
    if name is not None:
        return {"__dtype__": name}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {
            f.name: encode_static(getattr(v, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(v)
            if f.init
        }
        return {"__dataclass__": _import_name(type(v), where), "fields": fields}
    raise UserError(f"{where}: value {v!r} of type {type(v).__name__} cannot be saved")


def decode_static(v: Any, where: str = "static") -> Any:
    """Inverse of :func:`encode_static` (plain JSON values pass through)."""
    if isinstance(v, list):
        return [decode_static(x, where) for x in v]
    if not isinstance(v, dict):
        return v
    keys = set(v)
    if keys == {"__tuple__"}:
        return tuple(decode_static(x, where) for x in v["__tuple__"])
    if keys == {"__float__"}:
        return float(v["__float__"])
    if keys == {"__dtype__"}:
        try:
            return _dtype_by_name(v["__dtype__"])
        except (TypeError, AttributeError):
            raise UserError(f"{where}: unknown dtype {v['__dtype__']!r}") from None
    if keys == {"__enum__", "value"}:
        cls = _resolve(v["__enum__"], enum.Enum, where)
        try:
            return cls(decode_static(v["value"], where))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    if keys == {"__dataclass__", "fields"} and isinstance(v["fields"], dict):
        cls = _resolve(v["__dataclass__"], object, where)
        if not dataclasses.is_dataclass(cls):
            raise UserError(f"{where}: {v['__dataclass__']} is not a dataclass")
        fields = {k: decode_static(x, f"{where}.{k}") for k, x in v["fields"].items()}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: cannot rebuild {cls.__qualname__}: {e}") from None
    return {k: decode_static(x, where) for k, x in v.items()}


# --------------------------------------------------------------------------- leaves


def to_arrays(leaf: CompressedLeaf, where: str = "leaf") -> tuple[dict[str, Any], dict[str, Any]]:
    """A typed leaf -> (``{field path: array}``, JSON description).

    Args:
      leaf: a leaf of a registered type; children may be arrays, leaves or ``None``.
      where: names the leaf in error messages (e.g. its param path).

    Returns:
      ``(flat, desc)``: ``flat`` maps ``/``-joined field paths to the arrays as they are (no
      copy); ``desc`` is ``{"type", "static", "children"}`` (see the module docstring).

    Raises:
      UserError: the type is not registered, a child is not an array / leaf / ``None``, or a
        static field has no JSON form.
    """
    name = leaf_name(type(leaf))
    flat: dict[str, Any] = {}
    children: dict[str, Any] = {}
    for field, child in leaf.arrays().items():
        sub = f"{where}.{field}"
        if isinstance(child, tuple):  # a variable number of children (e.g. TT cores)
            kinds = []
            for i, item in enumerate(child):
                inner, kind = _child_arrays(item, f"{sub}[{i}]")
                if kind is None:
                    raise UserError(f"{sub}[{i}]: a tuple child cannot hold None")
                flat.update({f"{field}/{i}{k}": x for k, x in inner.items()})
                kinds.append(kind)
            children[field] = kinds
        else:
            inner, children[field] = _child_arrays(child, sub)
            flat.update({f"{field}{k}": x for k, x in inner.items()})
    static = {k: encode_static(v, f"{where}.{k}") for k, v in leaf.static().items()}
    return flat, {"type": name, "static": static, "children": children}


def _child_arrays(child: Any, where: str) -> tuple[dict[str, Any], Any]:
    """One child -> (``{suffix: array}`` with suffixes ``""`` or ``"/<field path>"``, kind)."""
    if child is None:
        return {}, None
    if isinstance(child, CompressedLeaf):
        inner, desc = to_arrays(child, where)
        return {f"/{k}": x for k, x in inner.items()}, desc
    if _is_array(child):
        return {"": child}, ARRAY
    raise UserError(f"{where}: expected an array, got {type(child).__name__}")


def from_arrays(
    desc: Mapping[str, Any],
    arrays: Mapping[str, Any] | Callable[[str], Any],
    where: str = "leaf",
    *,
    cast: Callable[[Any], Any] | None = None,
) -> CompressedLeaf:
    """Inverse of :func:`to_arrays`: rebuild (and validate) a leaf.

    Args:
      desc: the JSON description. ``type`` may be a qualified or a bare (older) class name;
        without ``children`` every field in the class's ``array_fields`` is an array.
      arrays: ``{field path: array}``, or a function ``field path -> array`` (read lazily;
        it raises ``KeyError`` or its own :class:`UserError` for a missing array).
      where: names the leaf in error messages.
      cast: applied to each array child (``load_hf(dtype=...)``), except the fields a class
        lists in ``exact_fields`` (quantized codes and scales keep their stored dtype).

    Raises:
      UserError: unknown type, a malformed description, a missing array, or a leaf that fails
        its own validation.
    """
    get = arrays.__getitem__ if isinstance(arrays, Mapping) else arrays
    if not isinstance(desc, Mapping):
        raise UserError(f"{where}: malformed leaf description {desc!r}")
    try:
        cls = leaf_type(desc.get("type"))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    kinds = desc.get("children")
    if kinds is None:
        kinds = {f: ARRAY for f in cls.array_fields}
    static = desc.get("static") or {}
    if not isinstance(kinds, Mapping) or not isinstance(static, Mapping):
        raise UserError(f"{where}: malformed description of a {cls.__name__}")

    def child(field: str, kind: Any, sub: str) -> Any:
        if kind is None:
            return None
        if kind == ARRAY:
            try:
                x = get(field)
            except KeyError:
                raise UserError(
                    f"{where}: array {field} of a {cls.__name__} is missing (corrupt checkpoint)"
                ) from None
            if cast is not None and field.split("/")[0] not in getattr(cls, "exact_fields", ()):
                x = cast(x)
            return x
        if isinstance(kind, Mapping):
            return from_arrays(kind, lambda p, f=field: get(f"{f}/{p}"), sub, cast=cast)
        raise UserError(f"{where}: malformed description of a {cls.__name__} ({field})")

    kwargs: dict[str, Any] = {}
    for field, kind in kinds.items():
        if isinstance(kind, list):  # a tuple child: field/0, field/1, ...
            if not kind or any(k is None for k in kind):
                raise UserError(f"{where}: malformed description of a {cls.__name__} ({field})")
            kwargs[field] = tuple(
                child(f"{field}/{i}", k, f"{where}.{field}[{i}]") for i, k in enumerate(kind)
            )
        else:
            kwargs[field] = child(field, kind, f"{where}.{field}")
    kwargs.update({k: decode_static(v, f"{where}.{k}") for k, v in static.items()})
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: cannot rebuild {cls.__name__}: {e}") from None


class StoreOnce:
    """Arrays stored once across a checkpoint: an array equal (dtype, shape and bytes) to one
    already stored becomes a link to it (EigenAttention's shared K/Q basis, V's basis and the
    o_proj fold's copy of it). Arrays are compared by a SHA-256 digest of their bytes, and only
    against arrays of the same dtype and shape; the same object links without a digest.

    Example::

        once = StoreOnce()
        for key, arr in items:
            if once.first(key, arr) is None:
                write(key, arr)
        # once.links: {key not written: key holding its bytes}
    """

    def __init__(self) -> None:
        self.links: dict[str, str] = {}
        self._seen: dict[tuple, list[tuple[str, Any, list[bytes]]]] = {}

    @staticmethod
    def _digest(arr: Any, memo: list[bytes]) -> bytes:
        if not memo:
            memo.append(hashlib.sha256(np.ascontiguousarray(np.asarray(arr)).tobytes()).digest())
        return memo[0]

    def first(self, key: str, arr: Any) -> str | None:
        """The key an equal array is already stored under (``key`` is then linked to it), or
        ``None`` (``arr`` is new: store it under ``key``)."""
        if not getattr(arr, "is_fully_addressable", True):
            return None  # spread over hosts (multi-host orbax save): stored as it is
        group = self._seen.setdefault((tuple(arr.shape), np.dtype(arr.dtype).str), [])
        memo: list[bytes] = []
        for other_key, other, other_memo in group:
            if other is arr or self._digest(other, other_memo) == self._digest(arr, memo):
                self.links[key] = other_key
                return other_key
        group.append((key, arr, memo))
        return None
