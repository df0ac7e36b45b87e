"""Shared helpers of the decomposition modules: pytree registration, dtype policy, signs."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jcompress.errors import UserError

HIGHEST = jax.lax.Precision.HIGHEST


def register(cls):
    """Make ``cls`` a frozen dataclass and a pytree whose fields are all children.

    Unflattening skips ``__post_init__`` (as in :mod:`jcompress.leaves`): ``vmap`` outputs,
    ``jax.tree.map`` results and placeholders rebuild a value whose children break the
    unbatched shape contract. Shapes are checked when a value is constructed directly.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in names)

    def flatten_with_keys(v):
        return [(k, getattr(v, n)) for k, n in zip(keys, names, strict=True)], None

    def flatten(v):
        return [getattr(v, n) for n in names], None

    def unflatten(_, children):
        v = object.__new__(cls)
        for n, c in zip(names, children, strict=True):
            object.__setattr__(v, n, c)
        return v

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def as_float(tensor: Any, what: str = "tensor") -> jax.Array:
    """``tensor`` as a JAX array of a float dtype the decompositions run in: float32 / float64
    stay, narrower floats (bf16, f16) and integers become float32; complex is refused."""
    x = jnp.asarray(tensor)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise UserError(f"{what}: complex dtype {x.dtype} is not supported")
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 4:
        x = x.astype(jnp.float32)
    return x


def flip_signs(u: jax.Array) -> jax.Array:
    """``u [I, R]`` with each column's largest-|.| entry made positive (``svd_flip``)."""
    idx = jnp.argmax(jnp.abs(u), axis=0)
    s = jnp.sign(jnp.take_along_axis(u, idx[None, :], axis=0)[0])
    return u * jnp.where(s == 0, 1, s).astype(u.dtype)[None, :]


def leading_eigvecs(gram: jax.Array, r: int) -> jax.Array:
    """The ``r`` leading eigenvectors of a symmetric PSD ``gram [I, I]``, as ``[I, r]`` columns
    in decreasing eigenvalue order, signs fixed (:func:`flip_signs`)."""
    _, v = jnp.linalg.eigh(gram)
    return flip_signs(v[:, ::-1][:, :r])


def check_int(value: Any, what: str, *, low: int) -> int:
    """``value`` as an int ``>= low``, else a :class:`UserError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{what}: expected an integer, got {value!r}")
    if value < low:
        raise UserError(f"{what}: {value} is below {low}")
    return int(value)


def rank_list(ranks: Any, n: int, what: str = "ranks") -> tuple[int, ...] | int:
    """An int (returned as is, checked >= 1) or a length-``n`` sequence of ints >= 1."""
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        return check_int(ranks, what, low=1)
    if not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise UserError(f"{what}: expected an int or a sequence of {n} ints, got {ranks!r}")
    if len(ranks) != n:
        raise UserError(f"{what}: expected {n} ranks, got {len(ranks)} ({list(ranks)})")
    return tuple(check_int(r, f"{what}[{k}]", low=1) for k, r in enumerate(ranks))


def check_fraction(value: Any, what: str, *, low_open: bool, high: float, high_open: bool):
    """A real number in ``(0 or [0) .. high] or high)``, else a :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise UserError(f"{what}: expected a number, got {value!r}")
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        lo = "(0" if low_open else "[0"
        hi = f"{high})" if high_open else f"{high}]"
        raise UserError(f"{what}: {value} is outside {lo}, {hi}")
    return float(value)


def batch_vmap(fn, nb: int):
    """``fn`` vmapped ``nb`` times over leading axes of every argument."""
    for _ in range(nb):
        fn = jax.vmap(fn)
    return fn


@functools.partial(jax.jit, static_argnames=("nb",))  # one program, not one per op
def relative_error(tensor: Any, approx: jax.Array, nb: int) -> jax.Array:
    """``||tensor - approx|| / ||tensor||`` over all but the ``nb`` leading (batch) axes
    (0 where ``tensor`` is 0)."""
    t = jnp.asarray(tensor, approx.dtype)
    axes = tuple(range(nb, t.ndim))
    num = jnp.sqrt(jnp.sum((t - approx) ** 2, axis=axes))
    den = jnp.sqrt(jnp.sum(t * t, axis=axes))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), num)
