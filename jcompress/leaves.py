"""Typed compressed leaves: the param-pytree values that compression methods produce.

Every leaf stands for a dense 2-D array: a linear kernel in Flax layout (``[in, out]``,
``y = x @ W``) or an embedding table (``[vocab, width]``). The forward pass calls :func:`dot` on
whatever sits at a ``kernel`` path and :func:`take` / :func:`dot_t` on the embedding table, so a
method swaps a dense array for a leaf without touching model code. Each leaf is a frozen
dataclass registered as a JAX pytree by :func:`register_leaf` (its array fields are children,
its other fields are static aux data), states its reconstruction rule in the docstring, and has

* ``materialize()`` -> the dense array it stands for,
* ``shape`` / ``dtype`` of that dense array,
* ``apply(x)`` -> ``x @ materialize()`` computed without building the dense array,
* ``take(ids)`` / ``apply_t(x)`` -> rows of it / ``x @ materialize().T`` (defaults go through
  ``materialize()``; factored leaves override them),
* ``num_params`` / ``nbytes`` for reports.

An array field may hold another leaf (``Residual(base=LowRank(...), residual=...)``, or a
``LowRank`` whose ``b`` is a leaf): pytree flattening, ``jit`` / ``vmap``, the counts and both
checkpoint formats (:mod:`jcompress.leaf_io`) recurse into it. Static fields must be hashable
(they are jit cache keys) and encodable by :mod:`jcompress.leaf_io`: bools, ints, floats
(non-finite too), strings, ``None``, tuples, dtypes, enums and frozen dataclasses of those.

Shapes are checked in ``__post_init__`` whenever the children are arrays and the leaf is built
directly; pytree machinery rebuilds a leaf without the check (around placeholders such as
``None`` or ``object()``, per-leaf scalars from ``jax.tree.map``, or stacked factors from
``vmap`` / ``scan``). This is why leaves are plain frozen dataclasses registered here rather
than ``flax.struct`` dataclasses: ``flax.struct`` rebuilds a node by calling its ``__init__``,
which runs ``__post_init__``, so ``jax.tree.map(jnp.max, leaf)`` would raise.

:func:`register_leaf` also files the class in :data:`LEAF_TYPES` under its qualified name
(``module.ClassName``, the type tag checkpoints store); the bare class name still resolves
(files written before qualified names) as long as only one registered class has it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError

__all__ = [
    "LEAF_TYPES",
    "CompressedLeaf",
    "Factored",
    "HeadFoldedOut",
    "HeadLatentBias",
    "HeadLowRank",
    "LowRank",
    "Residual",
    "dot",
    "dot_t",
    "is_compressed",
    "leaf_name",
    "leaf_type",
    "materialize",
    "register_leaf",
    "take",
]


def _is_array(x: Any) -> bool:
    """An array or a leaf (both have ``shape``, ``ndim`` and ``dtype``)."""
    return isinstance(x, CompressedLeaf) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def _dense(x: Any) -> Any:
    return x.materialize() if isinstance(x, CompressedLeaf) else x


class _Registry(Mapping):
    """Registered leaf classes by qualified name; other names resolve as aliases.

    ``LEAF_TYPES[name]`` accepts a qualified name, an alias passed to :func:`register_leaf`
    (unique: the library's own leaves claim their bare names so that files written before
    qualified names always read), or a bare class name that only one registered class has.
    Iteration yields the qualified names only.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, type[CompressedLeaf]] = {}
        self._claimed: dict[str, str] = {}  # explicit aliases
        self._aliases: dict[str, set[str]] = {}  # bare class names

    def add(self, cls: type[CompressedLeaf], name: str, aliases: Sequence[str]) -> None:
        have = self._by_name.get(name, self._by_name.get(self._claimed.get(name, "")))
        if have is not None and have is not cls:
            raise ValueError(
                f"register_leaf: {name!r} is already registered for {have.__module__}."
                f"{have.__qualname__}; pass another name="
            )
        current = leaf_name(cls, default=None)
        if current is not None and current != name:
            raise ValueError(
                f"register_leaf: {cls.__qualname__} is already registered as {current}"
            )
        for alias in aliases:
            owner = self._claimed.get(alias, name)
            if owner != name or (alias in self._by_name and alias != name):
                raise ValueError(f"register_leaf: alias {alias!r} is already taken")
        self._by_name[name] = cls
        self._claimed.update({alias: name for alias in aliases if alias != name})
        self._aliases.setdefault(cls.__name__, set()).add(name)

    def __getitem__(self, name: str) -> type[CompressedLeaf]:
        if name in self._by_name:
            return self._by_name[name]
        if name in self._claimed:
            return self._by_name[self._claimed[name]]
        targets = self._aliases.get(name, set())
        if len(targets) == 1:
            return self._by_name[next(iter(targets))]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._by_name))

    def __len__(self) -> int:
        return len(self._by_name)

    def ambiguous(self, name: str) -> list[str]:
        return [] if name in self else sorted(self._aliases.get(name, set()))


LEAF_TYPES = _Registry()


def leaf_type(name: Any) -> type[CompressedLeaf]:
    """The registered class for a type tag (qualified name, or a bare class name of old files).

    Raises:
      UserError: unknown or ambiguous name; the message lists the known types.
    """
    if isinstance(name, str) and name in LEAF_TYPES:
        return LEAF_TYPES[name]
    if isinstance(name, str) and name.startswith("jcompress.") and "." in name[10:]:
        # a library leaf whose module is not imported yet (e.g. jcompress.tucker.TTLinear):
        # import that jcompress module (only jcompress's own; nothing named by a file is
        # imported from elsewhere) and look again
        import importlib

        try:
            importlib.import_module(name.rsplit(".", 1)[0])
        except ImportError:
            pass
        if name in LEAF_TYPES:
            return LEAF_TYPES[name]
    known = ", ".join(LEAF_TYPES) or "none"
    clash = LEAF_TYPES.ambiguous(name) if isinstance(name, str) else []
    if clash:
        raise UserError(f"leaf type {name!r} is ambiguous (one of: {', '.join(clash)})")
    raise UserError(f"unknown leaf type {name!r} (known: {known})")


def leaf_name(cls: type, *, default: Any = ...) -> str:
    """The qualified name ``cls`` is registered under (its checkpoint type tag).

    Raises:
      UserError: ``cls`` is not registered (and no ``default`` is given).
    """
    for name, c in LEAF_TYPES._by_name.items():
        if c is cls:
            return name
    if default is not ...:
        return default
    raise UserError(
        f"leaf type {cls.__module__}.{cls.__qualname__} is not registered "
        "(decorate it with jcompress.leaves.register_leaf)"
    )


class CompressedLeaf(abc.ABC):
    """Base class of typed leaves. Subclasses are frozen dataclasses made by
    :func:`register_leaf`."""

    array_fields: ClassVar[tuple[str, ...]] = ()
    # array fields that keep their stored dtype when a checkpoint is read with a dtype cast
    # (``load_hf(dtype=...)``): quantized codes and their scales
    exact_fields: ClassVar[tuple[str, ...]] = ()
    # static fields added after files existed: stored only when they differ from the default
    optional_static: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """The dense ``[in, out]`` array this leaf stands for."""

    @abc.abstractmethod
    def apply(self, x: jax.Array) -> jax.Array:
        """``x @ materialize()`` for ``x: [..., in]``, without building the dense array."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense array."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def take(self, ids: jax.Array, *, mode: str | None = None) -> jax.Array:
        """Rows ``materialize()[ids]`` (``[*ids.shape, out]``), e.g. an embedding lookup;
        ``mode`` as in :func:`jax.numpy.take`. Default: materialize, then take."""
        return jnp.take(self.materialize(), ids, axis=0, mode=mode)

    def apply_t(self, x: jax.Array) -> jax.Array:
        """``x @ materialize().T`` for ``x: [..., out]`` (a head tied to an embedding table).
        Default: through ``materialize()``."""
        return _dot_t_dense(x, self.materialize())

    def _children(self) -> list[Any]:
        """Non-``None`` children, with tuple children (e.g. tensor-train cores) expanded."""
        out: list[Any] = []
        for c in (getattr(self, f) for f in self.array_fields):
            out.extend(c if isinstance(c, tuple) else (c,))
        return [c for c in out if c is not None]

    @property
    def dtype(self):
        """Dtype of the dense array: the children's result type, or (children that do not
        promote, e.g. float8 values with float32 scales) that of ``materialize()``."""
        try:
            return jnp.result_type(*[c.dtype for c in self._children()])
        except jax.dtypes.TypePromotionError:
            return jax.eval_shape(self.materialize).dtype

    @property
    def num_params(self) -> int:
        return int(
            sum(
                c.num_params if isinstance(c, CompressedLeaf) else np.prod(c.shape)
                for c in self._children()
            )
        )

    @property
    def nbytes(self) -> int:
        return int(
            sum(
                c.nbytes
                if isinstance(c, CompressedLeaf)
                else np.prod(c.shape) * jnp.dtype(c.dtype).itemsize
                for c in self._children()
            )
        )

    def shares_latent_scores(self, other: Any) -> bool:
        """Whether attention scores between this key projection's outputs and ``other``'s
        (a query projection's) may be computed on the two latents: ``q k^T == q' k'^T`` with
        ``q' = down_q(x) + latent_bias(b_q)`` and ``k'`` likewise, because both widen through
        one shared per-head orthonormal basis (EigenAttention's K/Q basis). The forward pass
        then never widens queries and keys back to the head width (when no RoPE, q/k norm or
        ``clip_qkv`` acts on the full-width heads). Default: no."""
        del other
        return False

    def consumes_latent_values(self, v_kernel: Any) -> bool:
        """Whether this leaf, sitting at an attention output projection, takes the latent
        head outputs that attention over ``v_kernel``'s latent values gives (then the forward
        pass never widens values back to the head width and calls :meth:`apply_latent`).
        Default: no."""
        del v_kernel
        return False

    def apply_latent(self, z: jax.Array) -> jax.Array:
        """``[..., heads * r] -> [..., out]`` on latent head outputs (see
        :meth:`consumes_latent_values`)."""
        raise NotImplementedError(f"{type(self).__name__} does not consume latent values")

    def widen(self, z: jax.Array) -> jax.Array:
        """Latent head outputs -> the full-width head outputs a dense output projection sees."""
        raise NotImplementedError(f"{type(self).__name__} does not consume latent values")

    def arrays(self) -> dict[str, Any]:
        """The children by field name: arrays, nested leaves or ``None`` (what checkpoints
        store; see :func:`jcompress.leaf_io.to_arrays` for the flat form)."""
        return {f: getattr(self, f) for f in self.array_fields}

    def static(self) -> dict[str, Any]:
        """The non-array settings by field name (hashable; encodable by
        :func:`jcompress.leaf_io.encode_static`). A field listed in ``optional_static`` is
        left out while it holds its default, so files of leaves that do not use it stay as
        they were before the field existed."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self.array_fields
            and not (f.name in self.optional_static and getattr(self, f.name) == f.default)
        }


def register_leaf(
    cls: type | None = None, *, name: str | None = None, aliases: Sequence[str] = ()
) -> Any:
    """Class decorator: make a :class:`CompressedLeaf` subclass a frozen dataclass, a JAX
    pytree, and a registered (checkpointable) leaf type.

    The fields named in ``array_fields`` are the pytree children (arrays, nested leaves,
    ``None``, or a tuple of arrays / leaves such as tensor-train cores); every other field is
    static aux data (hashable). Unflattening skips
    ``__post_init__``: pytree transforms legitimately rebuild a leaf around children that break
    its shape contract (``jax.tree.map(jnp.max, leaf)`` gives scalars, ``vmap`` / ``scan``
    outputs and ``jnp.stack`` over leaves give stacked factors). Shapes are checked when a leaf
    is constructed directly (which is also how checkpoints rebuild it).

    Args:
      cls: the class (when used as ``@register_leaf``).
      name: the type tag checkpoints store; default ``f"{cls.__module__}.{cls.__qualname__}"``.
        Pass a fixed name to keep old files readable after moving the class.
      aliases: more names that resolve to ``cls`` when reading, claimed for it (registering
        another class with one of them is an error). The bare class name resolves too
        without being claimed, as long as only one registered class has it.

    Returns:
      The dataclass (or a decorator, when called with keywords only).

    Raises:
      ValueError: another class is registered under ``name``.
      TypeError: ``cls`` is not a ``CompressedLeaf`` subclass, is a non-frozen dataclass, or
        names array fields it does not have.

    Example::

        @register_leaf
        class Scaled(CompressedLeaf):
            \"\"\"``W = scale * w``.\"\"\"
            w: jax.Array
            scale: float = 1.0
            array_fields: ClassVar[tuple[str, ...]] = ("w",)
            ...
    """
    if cls is None:
        return lambda c: register_leaf(c, name=name, aliases=aliases)
    if not (isinstance(cls, type) and issubclass(cls, CompressedLeaf)):
        raise TypeError(f"register_leaf: {cls!r} is not a CompressedLeaf subclass")
    if "__dataclass_fields__" in cls.__dict__:
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"register_leaf: {cls.__qualname__} must be a frozen dataclass")
    else:
        cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    data = tuple(cls.array_fields)
    if not data or not set(data) <= set(names):
        raise TypeError(
            f"register_leaf: {cls.__qualname__}.array_fields {data} must name some of its "
            f"fields {tuple(names)}"
        )
    if any(not f.init for f in fields):
        raise TypeError(f"register_leaf: {cls.__qualname__} fields must all be __init__ fields")
    meta = tuple(n for n in names if n not in data)
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in data)

    def flatten_with_keys(leaf):
        children = [(k, getattr(leaf, n)) for k, n in zip(keys, data, strict=True)]
        return children, tuple(getattr(leaf, n) for n in meta)

    def flatten(leaf):
        return [getattr(leaf, n) for n in data], tuple(getattr(leaf, n) for n in meta)

    def unflatten(aux, children):
        leaf = object.__new__(cls)
        for n, v in zip(data, children, strict=True):
            object.__setattr__(leaf, n, v)
        for n, v in zip(meta, aux, strict=True):
            object.__setattr__(leaf, n, v)
        return leaf

    tag = name or f"{cls.__module__}.{cls.__qualname__}"
    if leaf_name(cls, default=None) == tag:
        return cls  # registered already (decorated twice)
    LEAF_TYPES.add(cls, tag, tuple(aliases))
    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


_register = register_leaf  # the name tests and older code used


class Factored(CompressedLeaf):
    """A leaf applied in two steps, ``y = up(down(x))``, whose middle is a narrow latent.

    The forward pass caches ``down(x)`` for k/v projections (a rank-r KV cache) and calls
    ``up`` when it reads the cache.
    """

    @abc.abstractmethod
    def down(self, x: jax.Array) -> jax.Array:
        """``[..., in] -> [..., latent_width]``."""

    @abc.abstractmethod
    def up(self, z: jax.Array) -> jax.Array:
        """``[..., latent_width] -> [..., out]``."""

    @property
    @abc.abstractmethod
    def latent_width(self) -> int:
        """Width of ``down(x)``."""

    def apply(self, x: jax.Array) -> jax.Array:
        return self.up(self.down(x))

    def latent_bias(self, bias: jax.Array) -> jax.Array:
        """A bias of the full projection expressed in the latent space (``[latent_width]``),
        for callers that consume latents directly; only leaves whose ``up`` is a per-head
        orthonormal basis can do this."""
        raise NotImplementedError(f"{type(self).__name__} has no latent bias")


@register_leaf(aliases=("LowRank",))  # the type tag files held before qualified names
class LowRank(Factored):
    """A rank-``r`` factorisation of an ``[in, out]`` kernel.

    Reconstruction: ``W = a @ b``; applied as ``y = (x @ a) @ b``. As an embedding table
    (``[vocab, width]``) rows are looked up as ``a[ids] @ b`` and a tied head computes
    ``(x @ b.T) @ a.T``; neither builds ``W``.

    Attributes:
      a: ``[in, r]`` first factor (the "down" projection; its output is the latent that a
        method may cache, e.g. rank-r keys). A dense array or a leaf.
      b: ``[r, out]`` second factor. A dense array or a leaf (e.g. a quantized residual
        factor); a leaf factor is applied with :func:`dot`, never materialized.
    """

    a: Any
    b: Any
    array_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    def __post_init__(self):
        if _is_array(self.a) and _is_array(self.b):
            if self.a.ndim != 2 or self.b.ndim != 2:
                raise ValueError(
                    "LowRank: a and b must be 2-D ([in, r] and [r, out]); got "
                    f"a{tuple(self.a.shape)} and b{tuple(self.b.shape)}"
                )
            if self.a.shape[1] != self.b.shape[0]:
                raise ValueError(
                    f"LowRank: inner ranks differ: a{tuple(self.a.shape)} @ b{tuple(self.b.shape)}"
                )

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def latent_width(self) -> int:
        return self.rank

    def materialize(self) -> jax.Array:
        return dot(_dense(self.a), self.b)

    def down(self, x: jax.Array) -> jax.Array:
        return dot(x, self.a)

    def up(self, z: jax.Array) -> jax.Array:
        return dot(z, self.b)

    def take(self, ids: jax.Array, *, mode: str | None = None) -> jax.Array:
        return dot(take(self.a, ids, mode=mode), self.b)

    def apply_t(self, x: jax.Array) -> jax.Array:
        return dot_t(dot_t(x, self.b), self.a)


@register_leaf(aliases=("HeadLowRank",))  # the type tag files held before qualified names
class HeadLowRank(Factored):
    """Per-head rank-``r`` factorisation of an ``[in, heads * d]`` projection.

    Reconstruction: ``W = a @ blockdiag(b[0], ..., b[heads - 1])``: head ``h`` of the output is
    ``(x @ a[:, h*r:(h+1)*r]) @ b[h]``. This is the EigenAttention form ``W_h U_h U_h^T``
    with ``a = [W_h U_h]_h`` and ``b[h] = U_h^T``; ``down(x) = x @ a`` is the rank-r per-head
    latent a KV cache stores.

    Attributes:
      a: ``[in, heads * r]`` projections onto each head's basis: a dense array or a leaf
        (e.g. a TT-matrix of it, ``jcompress.tucker``'s ``tucker_mps``), applied with
        :func:`dot`.
      b: ``[heads, r, d]`` per-head maps back to the head width.
      basis: static tag (``None``: untagged) of a basis shared with another projection of
        the same attention layer. Two leaves with the same tag promise ``b_q[h] ==
        b_k[h // (Hq / Hk)]``, rows orthonormal (or zero, with the matching columns of ``a``
        zero: padded per-head ranks) and projection biases in the rows' span. Then the
        scores ``q k^T`` equal ``q' k'^T`` on the latents (:meth:`shares_latent_scores`).
        EigenAttention tags its K and Q (``"eigen_attention/kq"``); rebuild a tagged leaf with
        ``dataclasses.replace`` to keep the tag, and drop it (``basis=None``) after any
        change to ``b``.
    """

    a: Any
    b: Any
    basis: str | None = None
    array_fields: ClassVar[tuple[str, ...]] = ("a", "b")
    optional_static: ClassVar[tuple[str, ...]] = ("basis",)

    def __post_init__(self):
        if self.basis is not None and not (isinstance(self.basis, str) and self.basis):
            raise ValueError(
                f"HeadLowRank: basis must be None or a non-empty str, got {self.basis!r}"
            )
        if _is_array(self.a) and _is_array(self.b):
            if self.a.ndim != 2 or self.b.ndim != 3:
                raise ValueError(
                    "HeadLowRank: a must be [in, heads*r] and b [heads, r, d]; got "
                    f"a{tuple(self.a.shape)} and b{tuple(self.b.shape)}"
                )
            if self.a.shape[1] != self.b.shape[0] * self.b.shape[1]:
                raise ValueError(
                    f"HeadLowRank: a{tuple(self.a.shape)} has {self.a.shape[1]} columns, "
                    f"b{tuple(self.b.shape)} needs heads*r = {self.b.shape[0] * self.b.shape[1]}"
                )

    @property
    def heads(self) -> int:
        return int(self.b.shape[0])

    @property
    def rank(self) -> int:
        """Per-head rank ``r``."""
        return int(self.b.shape[1])

    @property
    def latent_width(self) -> int:
        return int(self.a.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[0] * self.b.shape[2]))

    def down(self, x: jax.Array) -> jax.Array:
        return dot(x, self.a)  # ``a`` may be a leaf (quantized factor)

    def up(self, z: jax.Array) -> jax.Array:
        h, r, d = self.b.shape
        zh = z.reshape(*z.shape[:-1], h, r)
        return jnp.einsum("...hr,hrd->...hd", zh, self.b).reshape(*z.shape[:-1], h * d)

    def shares_latent_scores(self, other: Any) -> bool:
        """True when ``other`` is a ``HeadLowRank`` with the same non-``None`` ``basis`` tag,
        plain-array bases of one ``[r, d]`` shape and a head count that is a multiple of
        this leaf's (query heads over KV heads)."""
        if self.basis is None or not isinstance(other, HeadLowRank) or other.basis != self.basis:
            return False
        if isinstance(self.b, CompressedLeaf) or isinstance(other.b, CompressedLeaf):
            return False
        return (
            tuple(self.b.shape[1:]) == tuple(other.b.shape[1:])
            and other.b.shape[0] % self.b.shape[0] == 0
        )

    def latent_bias(self, bias: Any) -> jax.Array:
        """``bias_h @ b[h]^T`` per head: exact when ``b[h]`` has orthonormal rows and the bias
        lies in their span (EigenAttention projects biases so). A :class:`HeadLatentBias` on
        this leaf's basis (``ut`` of ``b``'s shape) already is that: its ``z`` is returned."""
        if isinstance(bias, HeadLatentBias) and tuple(bias.ut.shape) == tuple(self.b.shape):
            return bias.z
        bias = _dense(bias)
        heads, _, d = self.b.shape
        return jnp.einsum("hd,hrd->hr", bias.reshape(heads, d), self.b).reshape(-1)

    def materialize(self) -> jax.Array:
        h, r, d = self.b.shape
        a = _dense(self.a).reshape(self.a.shape[0], h, r)
        return jnp.einsum("ihr,hrd->ihd", a, self.b).reshape(self.a.shape[0], h * d)


@register_leaf(aliases=("HeadFoldedOut",))  # the type tag files held before qualified names
class HeadFoldedOut(CompressedLeaf):
    """An attention output projection folded onto per-KV-head value bases (EigenAttention's
    ``W_o' = W_o U_v``), for values kept at rank ``r`` per head.

    With query heads ``h`` grouped onto KV heads ``g(h) = h // (Hq / Hk)`` and bases
    ``U_g = ut[g]^T`` (``[d, r]``): ``w[h] = U_g(h)^T W_o[h]``. Reconstruction (dense
    ``[Hq * d, out]``): ``W[h] = U_g(h) w[h]``. ``apply(x)`` takes full-width head outputs;
    ``apply_latent(z)`` takes the rank-r head outputs that attention over rank-r values gives,
    so the forward pass never widens values back to ``d``. It pairs with a ``HeadLowRank``
    v projection whose ``b`` is this ``ut`` (the forward pass relies on that pairing).

    Attributes:
      w: ``[Hq * r, out]`` folded projection.
      ut: ``[Hk, r, d]`` per-KV-head ``U^T`` (the ``b`` of the matching ``HeadLowRank`` v).
    """

    w: Any
    ut: Any
    array_fields: ClassVar[tuple[str, ...]] = ("w", "ut")

    def __post_init__(self):
        if _is_array(self.w) and _is_array(self.ut):
            if self.w.ndim != 2 or self.ut.ndim != 3:
                raise ValueError(
                    "HeadFoldedOut: w must be [Hq*r, out] and ut [Hk, r, d]; got "
                    f"w{tuple(self.w.shape)} and ut{tuple(self.ut.shape)}"
                )
            hk, r, _ = self.ut.shape
            if self.w.shape[0] % (hk * r):
                raise ValueError(
                    f"HeadFoldedOut: w{tuple(self.w.shape)} rows are not a multiple of "
                    f"Hk*r = {hk * r} (ut{tuple(self.ut.shape)})"
                )

    def consumes_latent_values(self, v_kernel: Any) -> bool:
        """Pairs with a ``HeadLowRank`` v projection whose ``b`` has this ``ut``'s shape."""
        return isinstance(v_kernel, HeadLowRank) and tuple(v_kernel.b.shape) == tuple(self.ut.shape)

    @property
    def rank(self) -> int:
        return int(self.ut.shape[1])

    @property
    def query_heads(self) -> int:
        return int(self.w.shape[0]) // self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return (self.query_heads * int(self.ut.shape[2]), int(self.w.shape[1]))

    def _bases(self) -> jax.Array:
        """``[Hq, r, d]``: each query head's ``U^T`` (KV bases repeated over their group)."""
        return jnp.repeat(self.ut, self.query_heads // self.ut.shape[0], axis=0)

    def apply_latent(self, z: jax.Array) -> jax.Array:
        """``z [..., Hq * r] -> [..., out]``."""
        return dot(z, self.w)  # ``w`` may be a leaf (quantized factor)

    def widen(self, z: jax.Array) -> jax.Array:
        """Rank-r head outputs ``[..., Hq * r]`` -> full width ``[..., Hq * d]`` (``z_h U_h^T``)."""
        hq, (_, r, d) = self.query_heads, self.ut.shape
        zh = z.reshape(*z.shape[:-1], hq, r)
        return jnp.einsum("...hr,hrd->...hd", zh, self._bases()).reshape(*z.shape[:-1], hq * d)

    def apply(self, x: jax.Array) -> jax.Array:
        hq, (_, r, d) = self.query_heads, self.ut.shape
        xh = x.reshape(*x.shape[:-1], hq, d)
        z = jnp.einsum("...hd,hrd->...hr", xh, self._bases())
        return self.apply_latent(z.reshape(*x.shape[:-1], hq * r))

    def materialize(self) -> jax.Array:
        hq, (_, r, d) = self.query_heads, self.ut.shape
        w = _dense(self.w).reshape(hq, r, -1)
        return jnp.einsum("hrd,hro->hdo", self._bases(), w).reshape(hq * d, -1)


@register_leaf
class HeadLatentBias(CompressedLeaf):
    """A projection bias kept in the rank space of the projection's per-head basis: the
    bias EigenAttention projects onto the span of ``U_h`` stored as its ``r`` coordinates per
    head instead of ``d`` values.

    Reconstruction (dense ``[heads * d]``): ``bias_h = z_h @ ut[h]`` (``= z_h U_h^T``). With
    ``ut`` the ``b`` of the projection's ``HeadLowRank`` (rows orthonormal), ``z`` is that
    leaf's :meth:`HeadLowRank.latent_bias` exactly, and checkpoints store ``ut`` once (it
    is linked to the kernel's ``b``). A dense array as the bias works the same everywhere.

    Attributes:
      z: ``[heads * r]`` the bias's coordinates in each head's basis.
      ut: ``[heads, r, d]`` per-head ``U^T`` (the ``b`` of the matching ``HeadLowRank``).
    """

    z: Any
    ut: Any
    array_fields: ClassVar[tuple[str, ...]] = ("z", "ut")

    def __post_init__(self):
        if _is_array(self.z) and _is_array(self.ut):
            if self.z.ndim != 1 or self.ut.ndim != 3:
                raise ValueError(
                    "HeadLatentBias: z must be [heads*r] and ut [heads, r, d]; got "
                    f"z{tuple(self.z.shape)} and ut{tuple(self.ut.shape)}"
                )
            if self.z.shape[0] != self.ut.shape[0] * self.ut.shape[1]:
                raise ValueError(
                    f"HeadLatentBias: z{tuple(self.z.shape)} needs heads*r = "
                    f"{self.ut.shape[0] * self.ut.shape[1]} entries (ut{tuple(self.ut.shape)})"
                )

    @property
    def shape(self) -> tuple[int]:
        return (int(self.ut.shape[0] * self.ut.shape[2]),)

    def materialize(self) -> jax.Array:
        h, r, _ = self.ut.shape
        return jnp.einsum("hr,hrd->hd", self.z.reshape(h, r), self.ut).reshape(-1)

    def apply(self, x: jax.Array) -> jax.Array:
        """``x @ bias`` as for a dense 1-D array: ``[..., heads * d] -> [...]``."""
        return jnp.matmul(x, self.materialize())


@register_leaf
class Residual(CompressedLeaf):
    """A dense-equivalent sum of two parts, e.g. a low-rank base plus a quantized residual.

    Reconstruction: ``W = materialize(base) + materialize(residual)``; applied as
    ``y = x @ base + x @ residual`` (each part through :func:`dot`, so a factored or quantized
    part is never materialized); rows as ``take(base, ids) + take(residual, ids)``.

    Attributes:
      base: ``[in, out]`` dense array or leaf.
      residual: ``[in, out]`` dense array or leaf.
    """

    base: Any
    residual: Any
    array_fields: ClassVar[tuple[str, ...]] = ("base", "residual")

    def __post_init__(self):
        if _is_array(self.base) and _is_array(self.residual):
            if self.base.ndim != 2 or tuple(self.base.shape) != tuple(self.residual.shape):
                raise ValueError(
                    "Residual: base and residual must have the same 2-D shape; got "
                    f"base{tuple(self.base.shape)} and residual{tuple(self.residual.shape)}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.base.shape[0]), int(self.base.shape[1]))

    def materialize(self) -> jax.Array:
        return _dense(self.base) + _dense(self.residual)

    def apply(self, x: jax.Array) -> jax.Array:
        return dot(x, self.base) + dot(x, self.residual)

    def take(self, ids: jax.Array, *, mode: str | None = None) -> jax.Array:
        return take(self.base, ids, mode=mode) + take(self.residual, ids, mode=mode)

    def apply_t(self, x: jax.Array) -> jax.Array:
        return dot_t(x, self.base) + dot_t(x, self.residual)


def is_compressed(x: Any) -> bool:
    """True for a typed compressed leaf (use as ``is_leaf`` in ``jax.tree`` calls)."""
    return isinstance(x, CompressedLeaf)


def dot(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` for a dense ``[in, out]`` kernel or any typed leaf. ``x``: ``[..., in]``."""
    if isinstance(w, CompressedLeaf):
        return w.apply(x)
    return jnp.matmul(x, w)


def _dot_t_dense(x: jax.Array, table: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ve->...v", x, table)


def dot_t(x: jax.Array, table: Any) -> jax.Array:
    """``x @ table.T`` for a dense ``[vocab, width]`` table or any typed leaf (a head tied to
    the embedding table; ``LowRank``: ``(x @ b.T) @ a.T``).

    Args:
      x: ``[..., width]``.
      table: ``[vocab, width]`` dense array or leaf.

    Returns:
      ``[..., vocab]``.
    """
    if isinstance(table, CompressedLeaf):
        return table.apply_t(x)
    return _dot_t_dense(x, table)


def take(table: Any, ids: jax.Array, *, mode: str | None = None) -> jax.Array:
    """Rows ``table[ids]`` of a dense ``[vocab, width]`` table or any typed leaf (an embedding
    lookup; ``LowRank``: ``a[ids] @ b``).

    Args:
      table: ``[vocab, width]`` dense array or leaf.
      ids: integer ids of any shape.
      mode: out-of-range handling as in :func:`jax.numpy.take` (``"clip"``, ``"fill"``, ...).

    Returns:
      ``[*ids.shape, width]``.
    """
    if isinstance(table, CompressedLeaf):
        return table.take(ids, mode=mode)
    return jnp.take(table, ids, axis=0, mode=mode)


def materialize(tree: Any) -> Any:
    """Replace every typed leaf in ``tree`` by its dense array."""
    return jax.tree.map(
        lambda v: v.materialize() if isinstance(v, CompressedLeaf) else v,
        tree,
        is_leaf=is_compressed,
    )
