"""Per-matrix glue of the tensor-network methods: two typed leaves and their constructors.

* :class:`TTLinear`: an ``[in, out]`` kernel as a TT-matrix (MPO, :class:`jcompress.decomp.TTMatrix`
  cores ``[r_{k-1}, m_k, n_k, r_k]``); ``apply(x)`` contracts ``x`` with one core at a time.
* :class:`TuckerLinear`: a q/k/v projection ``[hidden, heads * head_dim]`` viewed as the 3-way
  tensor ``[hidden, heads, head_dim]`` in Tucker form (core ``[r1, r2, r3]`` and three factors);
  ``apply(x)`` goes through the ``r1``-wide latent ``x @ U_in`` and never builds the kernel.

The math (TT-SVD, HOOI) is :mod:`jcompress.decomp`'s; this module only reshapes kernels, casts
results back to the kernel's dtype and wraps them as leaves. Both constructors work on one
matrix; with fixed ranks they are jit-able (static ranks). For many kernels of one shape,
``jax.lax.map`` them over the stack inside one ``jit`` (``jcompress.tucker.compress`` does)
rather than ``vmap``: a ``vmap``-ed HOOI once deadlocked XLA:CPU (see
:mod:`jcompress.decomp.tucker_core`).

Neither leaf is :class:`jcompress.leaves.Factored`: as a k/v projection the KV cache stores the
full k/v (the forward pass only caches latents of ``Factored`` leaves).

References:
  Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks", NeurIPS 2015 (MPO);
  Oseledets, SIAM J. Sci. Comput. 33(5), 2011 (TT-SVD); De Lathauwer, De Moor, Vandewalle,
  SIAM J. Matrix Anal. Appl. 21(4), 2000 (HOOI).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jcompress.decomp import TTMatrix, Tucker, hooi, tt_matrix
from jcompress.leaves import CompressedLeaf, register_leaf

__all__ = ["TTLinear", "TuckerLinear", "tt_linear", "tucker_linear"]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@register_leaf(name="jcompress.tucker.TTLinear")
class TTLinear(CompressedLeaf):
    """An ``[in, out]`` kernel as a TT-matrix (MPO).

    Reconstruction (:class:`jcompress.decomp.TTMatrix`): with ``in = prod(m_k)``,
    ``out = prod(n_k)`` and row / column multi-indices ``i = (i_1..i_d)``, ``j = (j_1..j_d)``
    (row-major), ``W[i, j] = cores[0][:, i_1, j_1, :] @ ... @ cores[d-1][:, i_d, j_d, :]``.
    ``apply(x)`` contracts ``x [..., in]`` with the cores left to right (no ``[in, out]`` array).

    Attributes:
      cores: tuple of ``d >= 1`` cores ``[r_{k-1}, m_k, n_k, r_k]``, ``r_0 = r_d = 1``.
    """

    cores: tuple[Any, ...]
    array_fields: ClassVar[tuple[str, ...]] = ("cores",)

    def __post_init__(self):
        if not isinstance(self.cores, tuple):
            object.__setattr__(self, "cores", tuple(self.cores))
        if self.cores and all(_is_array(c) for c in self.cores):
            TTMatrix(self.cores)  # validates: 4-D cores that chain, end ranks 1
        elif not self.cores:
            raise ValueError("TTLinear: no cores")

    @property
    def ttm(self) -> TTMatrix:
        return TTMatrix(self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(1, r_1, ..., r_{d-1}, 1)``."""
        return self.ttm.ranks

    @property
    def shape(self) -> tuple[int, int]:
        return self.ttm.shape

    def materialize(self) -> jax.Array:
        return self.ttm.materialize()

    def apply(self, x: jax.Array) -> jax.Array:
        return self.ttm.apply(x)


@register_leaf(name="jcompress.tucker.TuckerLinear")
class TuckerLinear(CompressedLeaf):
    """A projection ``[hidden, heads * head_dim]`` as a Tucker tensor ``[hidden, heads, head_dim]``.

    Reconstruction: ``W[i, h * head_dim + d] = sum_{a,b,c} core[a, b, c] u_in[i, a]
    u_heads[h, b] u_dim[d, c]``. Applied in factored form:
    ``y[..., h, d] = sum_{b, c} ((x @ u_in) . core)[..., b, c] u_heads[h, b] u_dim[d, c]``,
    i.e. ``((x @ U_in) x core) @ (U_heads (x) U_dim)^T`` without the dense kernel.

    Attributes:
      core: ``[r1, r2, r3]``.
      u_in: ``[hidden, r1]``.
      u_heads: ``[heads, r2]``.
      u_dim: ``[head_dim, r3]``.
    """

    core: Any
    u_in: Any
    u_heads: Any
    u_dim: Any
    array_fields: ClassVar[tuple[str, ...]] = ("core", "u_in", "u_heads", "u_dim")

    def __post_init__(self):
        if all(_is_array(getattr(self, f)) for f in self.array_fields):
            Tucker(self.core, (self.u_in, self.u_heads, self.u_dim))  # validates the ranks

    @property
    def ranks(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.core.shape)  # type: ignore[return-value]

    @property
    def heads(self) -> int:
        return int(self.u_heads.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.u_dim.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.u_in.shape[0]), self.heads * self.head_dim)

    def materialize(self) -> jax.Array:
        t = Tucker(self.core, (self.u_in, self.u_heads, self.u_dim)).materialize()
        return t.reshape(self.shape)

    def apply(self, x: jax.Array) -> jax.Array:
        z = jnp.matmul(x, self.u_in)  # [..., r1]
        t = jnp.einsum("...a,abc->...bc", z, self.core)  # [..., r2, r3]
        t = jnp.einsum("...bc,dc->...bd", t, self.u_dim)  # [..., r2, head_dim]
        y = jnp.einsum("...bd,hb->...hd", t, self.u_heads)  # [..., heads, head_dim]
        return y.reshape(*y.shape[:-2], self.heads * self.head_dim)


def tt_linear(
    w: jax.Array,
    *,
    n_cores: int = 3,
    ranks: tuple[int, ...] | None = None,
    eps: float | None = None,
) -> TTLinear:
    """A :class:`TTLinear` of ``w [in, out]`` by TT-SVD of its MPO reshaping.

    Args:
      w: ``[in, out]`` kernel.
      n_cores: number of cores ``d`` (modes from :func:`jcompress.decomp.factorize`).
      ranks: fixed bond ranks (``d - 1`` ints; jit-able), or
      eps: the energy rule in ``(0, 1]`` (ranks chosen on the host; not jit-able).

    Returns:
      The leaf, cores cast to ``w.dtype``.
    """
    ttm = tt_matrix(w, n_cores=n_cores, ranks=ranks, eps=eps)
    return TTLinear(tuple(c.astype(w.dtype) for c in ttm.cores))


def tucker_linear(
    w: jax.Array, *, head_dim: int, ranks: tuple[int, int, int], n_iter_max: int = 100
) -> TuckerLinear:
    """A :class:`TuckerLinear` of ``w [hidden, heads * head_dim]`` by HOOI on
    ``[hidden, heads, head_dim]`` (jit-able; ranks static).

    Args:
      w: ``[hidden, heads * head_dim]`` kernel.
      head_dim: width of one head.
      ranks: multilinear ranks ``(r1, r2, r3)``, each at most its mode size.
      n_iter_max: most HOOI sweeps.
    """
    hidden, width = (int(s) for s in w.shape)
    heads = width // head_dim
    if heads * head_dim != width or heads < 1:
        raise ValueError(f"tucker_linear: width {width} is not a multiple of head_dim {head_dim}")
    t = hooi(w.reshape(hidden, heads, head_dim), tuple(ranks), n_iter_max=n_iter_max)
    u_in, u_heads, u_dim = (f.astype(w.dtype) for f in t.factors)
    return TuckerLinear(t.core.astype(w.dtype), u_in, u_heads, u_dim)


def param_count(leaf: CompressedLeaf | Any) -> int:
    """Stored scalars of a leaf or a dense array."""
    if isinstance(leaf, CompressedLeaf):
        return leaf.num_params
    return math.prod(leaf.shape)


def kron_basis(
    cov: jax.Array,
    modes: tuple[int, ...],
    ranks: tuple[int, ...],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A Kronecker-structured orthonormal basis ``P = U_1 (x) ... (x) U_m`` of the dominant
    subspace of a covariance, by HOOI (the ``tucker_mps`` output basis).

    Given outputs ``y_t [D]`` with ``D = prod(modes)`` (row-major multi-index) and their
    covariance ``C = sum_t y_t y_t^T [D, D]``, HOOI on the data tensor ``Y [N, n_1, ..., n_m]``
    at ranks ``(N, r_1, ..., r_m)`` maximises the captured energy ``tr(P^T C P)`` over
    Kronecker bases. Every HOOI step reads ``Y`` only through Gram matrices, i.e. through
    ``C``; so the same factors come from any ``L`` with ``L L^T = C``: here
    ``L = V diag(sqrt(s))`` from ``C = V diag(s) V^T``, and HOOI runs on the small tensor
    ``L`` reshaped ``[n_1, ..., n_m, D]`` at ranks ``(r_1, ..., r_m, D)`` (``D`` columns stand
    for the ``N`` tokens: memory is flat in ``N``).

    Args:
      cov: ``[D, D]`` symmetric positive semi-definite.
      modes: ``(n_1, ..., n_m)``, product ``D``.
      ranks: ``(r_1, ..., r_m)``, ``1 <= r_k <= n_k``.
      n_iter_max: most HOOI sweeps.
      tol: HOOI stopping tolerance on the change of the relative error (tight by default:
        these tensors are tiny and the basis, not the error, is the result).

    Returns:
      ``(P [D, prod(ranks)], (U_1 [n_1, r_1], ..., U_m [n_m, r_m]))``, ``P`` orthonormal.

    References:
      De Lathauwer, De Moor, Vandewalle 2000 (HOOI); Van Loan, Pitsianis 1993 (Kronecker
      structure).
    """
    d = int(cov.shape[0])
    if math.prod(modes) != d or cov.shape != (d, d) or len(ranks) != len(modes):
        raise ValueError(f"kron_basis: cov{tuple(cov.shape)} does not fit modes {modes}")
    s, v = jnp.linalg.eigh(cov)
    root = v * jnp.sqrt(jnp.maximum(s, 0))[None, :]  # [D, D], root @ root.T == cov
    t = hooi(root.reshape(*modes, d), (*ranks, d), n_iter_max=n_iter_max, tol=tol)
    factors = tuple(t.factors[:-1])
    p = factors[0]
    for u in factors[1:]:
        p = jnp.kron(p, u)
    return p, factors
