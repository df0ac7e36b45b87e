"""Typed compressed leaves: the param-pytree values that compression methods produce.

Every leaf stands for a dense ``[in, out]`` linear kernel (Flax layout, ``y = x @ W``). The
forward pass calls :func:`dot` on whatever sits at a ``kernel`` path, so a method swaps a dense
array for a leaf without touching model code. Each leaf is a frozen dataclass registered as a
JAX pytree (its arrays are children, its static settings are aux data), states its
reconstruction rule in the docstring, and has

* ``materialize()`` -> the dense ``[in, out]`` array it stands for,
* ``shape`` / ``dtype`` of that dense array,
* ``apply(x)`` -> ``x @ materialize()`` computed without building the dense array,
* ``num_params`` / ``nbytes`` for reports.

Shapes are checked in ``__post_init__`` whenever the children are arrays and the leaf is built
directly; pytree machinery rebuilds a leaf without the check (around placeholders such as
``None`` or ``object()``, per-leaf scalars from ``jax.tree.map``, or stacked factors from
``vmap`` / ``scan``).

The registry :data:`LEAF_TYPES` maps a class name to its class; checkpoint code uses it to
rebuild leaves from disk.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LEAF_TYPES",
    "CompressedLeaf",
    "Factored",
    "HeadFoldedOut",
    "HeadLowRank",
    "LowRank",
    "dot",
    "is_compressed",
    "materialize",
]

LEAF_TYPES: dict[str, type[CompressedLeaf]] = {}


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


class CompressedLeaf(abc.ABC):
    """Base class of typed leaves. Subclasses are frozen dataclasses."""

    array_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LEAF_TYPES[cls.__name__] = cls

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
    def dtype(self):
        return jnp.result_type(*[getattr(self, f) for f in self.array_fields])

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(getattr(self, f).shape) for f in self.array_fields))

    @property
    def nbytes(self) -> int:
        return int(
            sum(
                np.prod(getattr(self, f).shape) * jnp.dtype(getattr(self, f).dtype).itemsize
                for f in self.array_fields
            )
        )

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
        """The array children by field name (what checkpoints store)."""
        return {f: getattr(self, f) for f in self.array_fields}

    def static(self) -> dict[str, Any]:
        """The non-array settings by field name (JSON-serialisable)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self.array_fields
        }


def _register(cls):
    """Register a frozen dataclass leaf as a pytree (array fields are children).

    Unflattening skips ``__post_init__``: pytree transforms legitimately rebuild a leaf around
    children that break the 2-D contract (``jax.tree.map(jnp.max, leaf)`` gives scalars, ``vmap``
    / ``scan`` outputs and ``jnp.stack`` over leaves give stacked factors). Shapes are checked
    when a leaf is constructed directly.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = tuple(cls.array_fields)
    meta = tuple(f.name for f in dataclasses.fields(cls) if f.name not in data)
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

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


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


@_register
class LowRank(Factored):
    """A rank-``r`` factorisation of an ``[in, out]`` kernel.

    Reconstruction: ``W = a @ b``; applied as ``y = (x @ a) @ b``.

    Attributes:
      a: ``[in, r]`` first factor (the "down" projection; its output is the latent that a
        method may cache, e.g. rank-r keys).
      b: ``[r, out]`` second factor.
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
        return jnp.matmul(self.a, self.b)

    def down(self, x: jax.Array) -> jax.Array:
        return jnp.matmul(x, self.a)

    def up(self, z: jax.Array) -> jax.Array:
        return jnp.matmul(z, self.b)


@_register
class HeadLowRank(Factored):
    """Per-head rank-``r`` factorisation of an ``[in, heads * d]`` projection.

    Reconstruction: ``W = a @ blockdiag(b[0], ..., b[heads - 1])``: head ``h`` of the output is
    ``(x @ a[:, h*r:(h+1)*r]) @ b[h]``. This is the EigenAttention form ``W_h U_h U_h^T``
    with ``a = [W_h U_h]_h`` and ``b[h] = U_h^T``; ``down(x) = x @ a`` is the rank-r per-head
    latent a KV cache stores.

    Attributes:
      a: ``[in, heads * r]`` projections onto each head's basis.
      b: ``[heads, r, d]`` per-head maps back to the head width.
    """

    a: Any
    b: Any
    array_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    def __post_init__(self):
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
        return jnp.matmul(x, self.a)

    def up(self, z: jax.Array) -> jax.Array:
        h, r, d = self.b.shape
        zh = z.reshape(*z.shape[:-1], h, r)
        return jnp.einsum("...hr,hrd->...hd", zh, self.b).reshape(*z.shape[:-1], h * d)

    def latent_bias(self, bias: jax.Array) -> jax.Array:
        """``bias_h @ b[h]^T`` per head: exact when ``b[h]`` has orthonormal rows and the bias
        lies in their span (EigenAttention projects biases so)."""
        heads, _, d = self.b.shape
        return jnp.einsum("hd,hrd->hr", bias.reshape(heads, d), self.b).reshape(-1)

    def materialize(self) -> jax.Array:
        h, r, d = self.b.shape
        a = self.a.reshape(self.a.shape[0], h, r)
        return jnp.einsum("ihr,hrd->ihd", a, self.b).reshape(self.a.shape[0], h * d)


@_register
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
        return jnp.matmul(z, self.w)

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
        w = self.w.reshape(hq, r, -1)
        return jnp.einsum("hrd,hro->hdo", self._bases(), w).reshape(hq * d, -1)


def is_compressed(x: Any) -> bool:
    """True for a typed compressed leaf (use as ``is_leaf`` in ``jax.tree`` calls)."""
    return isinstance(x, CompressedLeaf)


def dot(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` for a dense ``[in, out]`` kernel or any typed leaf. ``x``: ``[..., in]``."""
    if isinstance(w, CompressedLeaf):
        return w.apply(x)
    return jnp.matmul(x, w)


def materialize(tree: Any) -> Any:
    """Replace every typed leaf in ``tree`` by its dense array."""
    return jax.tree.map(
        lambda v: v.materialize() if isinstance(v, CompressedLeaf) else v,
        tree,
        is_leaf=is_compressed,
    )
