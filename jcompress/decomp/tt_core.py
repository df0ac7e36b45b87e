"""Tensor trains (MPS) by TT-SVD, and TT-matrices (MPO) of ``[in, out]`` weights.

TT-SVD (Oseledets 2011, Alg. 1) sweeps left to right: the carried matrix
``C [r_{k-1} n_k, n_{k+1} ... n_d]`` is split by a truncated SVD ``C ~ U S V^T``; ``U`` becomes
core ``k`` (``[r_{k-1}, n_k, r_k]``, orthonormal as a matrix, signs fixed so that each column's
largest-magnitude entry is positive) and ``S V^T`` is carried on. The error is exactly the sum
of what the truncations drop: ``||A - A_tt||^2 = sum_k sum_{j > r_k} s_j(C_k)^2``.

Bond ranks are chosen in one of three ways (exactly one is given):

* ``ranks``: fixed (static); everything is one jit-able function. Each split takes the
  leading singular vectors from the smaller Gram matrix of the unfolding (``eigh``, plus a thin
  QR on the tall side) and carries the exact projection ``U^T C``: the same truncation as the
  SVD up to rounding, several times faster on CPU than LAPACK SVDs of wide unfoldings.
* ``eps`` (the reference's energy rule): per unfolding, the smallest ``r`` whose cumulative
  squared singular values reach ``eps`` of the total, i.e. the dropped tail energy is at most
  ``(1 - eps) ||C_k||^2`` up to a rounding tolerance the size of the tail's own rounding error
  (see ``_rank_from_tail``: a cut exactly at ``eps`` in exact arithmetic is taken, and
  ``eps = 1`` keeps everything above rounding level). Since ``||C_k|| <= ||A||``:
  ``||A - A_tt||^2 <= (d - 1) (1 - eps) ||A||^2`` (+ the rounding tolerances).
* ``rel_error`` (Oseledets' delta-truncation): ``delta = rel_error / sqrt(d - 1) * ||A||``, per
  unfolding the smallest ``r`` with dropped tail energy ``<= delta^2``, so
  ``||A - A_tt|| <= rel_error * ||A||``.

Data-dependent ranks (``eps`` / ``rel_error``) are chosen on the host: the sweep runs eagerly
(each SVD, signs fixed, is one jit-compiled op per unfolding shape, whatever rank it keeps)
and reads the singular values back between steps, so those two modes are not jit-able; use
the ranks they found with ``ranks=`` to jit or vmap.

The tail energies are reverse cumulative sums of ``s^2`` (no cancellation of ``1 - cumsum``),
so the rule holds at the ``eps = 1`` boundary (where ``cumsum(s^2) / total >= 1`` can fail by
rounding and a naive rule collapses to rank 1) and for tiny tails.

References:
  Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
  Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
  Van Loan, Pitsianis, "Approximation with Kronecker Products", 1993 (the 2-core case).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.decomp._base import (
    HIGHEST,
    as_float,
    batch_vmap,
    check_fraction,
    check_int,
    flip_signs,
    is_array,
    leading_eigvecs,
    rank_list,
    register,
    relative_error,
)
from jcompress.errors import UserError

__all__ = [
    "TTMatrix",
    "TensorTrain",
    "factorize",
    "tensor_train",
    "tt_matrix",
    "tt_svd_ranks",
]


# --------------------------------------------------------------------------- types


@register
class TensorTrain:
    """A tensor train (MPS): ``A[i_1, ..., i_d] = G_1[:, i_1, :] @ ... @ G_d[:, i_d, :]``.

    Attributes:
      cores: tuple of ``d`` cores ``[r_{k-1}, n_k, r_k]`` with ``r_0 = r_d = 1``. As
        :func:`tensor_train` returns them, cores ``1..d-1`` are left-orthonormal
        (``reshape(G_k, [r_{k-1} n_k, r_k])`` has orthonormal columns).

    A batch (``vmap`` output) carries the same leading axes on every core.

    References:
      Oseledets, SIAM J. Sci. Comput. 33(5), 2011.
    """

    cores: tuple[Any, ...]

    def __post_init__(self):
        object.__setattr__(self, "cores", tuple(self.cores))
        if not self.cores:
            raise ValueError("TensorTrain: no cores")
        if all(is_array(c) for c in self.cores):
            _check_chain(self.cores, 3, "TensorTrain")

    @property
    def batch_ndim(self) -> int:
        return self.cores[0].ndim - 3

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(1, r_1, ..., r_{d-1}, 1)``."""
        return tuple(int(c.shape[-3]) for c in self.cores) + (int(self.cores[-1].shape[-1]),)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n_1, ..., n_d)`` (per batch item)."""
        return tuple(int(c.shape[-2]) for c in self.cores)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(c.shape) for c in self.cores))

    def materialize(self) -> jax.Array:
        """The dense tensor ``[..., n_1, ..., n_d]``."""
        return batch_vmap(_tt_to_tensor, self.batch_ndim)(self.cores)

    to_tensor = materialize

    def relative_error(self, tensor: Any) -> jax.Array:
        """``||tensor - materialize()|| / ||tensor||`` (one value per batch item)."""
        return relative_error(tensor, self.materialize(), self.batch_ndim)


@register
class TTMatrix:
    """A TT-matrix (MPO) standing for a weight ``W [in, out]``, ``in = prod(m_k)``,
    ``out = prod(n_k)``.

    Reconstruction: with row index ``i = (i_1, ..., i_d)`` and column index
    ``j = (j_1, ..., j_d)`` (row-major, ``i_1`` most significant),
    ``W[i, j] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]``. :meth:`apply` computes
    ``x @ W`` core by core without the dense kernel.

    Attributes:
      cores: tuple of ``d`` cores ``[r_{k-1}, m_k, n_k, r_k]``, ``r_0 = r_d = 1`` (the t3f /
        Novikov et al. layout).

    References:
      Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015; Oseledets 2011.
    """

    cores: tuple[Any, ...]

    def __post_init__(self):
        object.__setattr__(self, "cores", tuple(self.cores))
        if not self.cores:
            raise ValueError("TTMatrix: no cores")
        if all(is_array(c) for c in self.cores):
            _check_chain(self.cores, 4, "TTMatrix")

    @property
    def batch_ndim(self) -> int:
        return self.cores[0].ndim - 4

    @property
    def in_modes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-3]) for c in self.cores)

    @property
    def out_modes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[-2]) for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(1, r_1, ..., r_{d-1}, 1)``."""
        return tuple(int(c.shape[-4]) for c in self.cores) + (int(self.cores[-1].shape[-1]),)

    @property
    def shape(self) -> tuple[int, int]:
        """``(in, out)`` of the dense weight."""
        return (math.prod(self.in_modes), math.prod(self.out_modes))

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(c.shape) for c in self.cores))

    def materialize(self) -> jax.Array:
        """The dense weight ``[..., in, out]``."""
        return batch_vmap(_ttm_to_matrix, self.batch_ndim)(self.cores)

    def apply(self, x: jax.Array) -> jax.Array:
        """``x @ materialize()`` for ``x [..., in]`` -> ``[..., out]``, one core at a time, or
        by building ``W`` once where bonds near full rank make the chain cost more multiply-adds
        (decided from the static shapes; unbatched cores; ``vmap`` for a batch of
        TT-matrices)."""
        if self.batch_ndim:
            raise ValueError("TTMatrix.apply: batched cores; vmap over the batch instead")
        return _ttm_apply(self.cores, x)

    def relative_error(self, w: Any) -> jax.Array:
        """``||w - materialize()|| / ||w||`` (one value per batch item)."""
        return relative_error(w, self.materialize(), self.batch_ndim)


def _check_chain(cores, ndim: int, what: str) -> None:
    nb = cores[0].ndim - ndim
    if nb < 0 or any(c.ndim != ndim + nb for c in cores):
        raise ValueError(f"{what}: cores must all be {ndim}-D, got {[c.shape for c in cores]}")
    if cores[0].shape[nb] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError(f"{what}: the end ranks must be 1, got {[c.shape for c in cores]}")
    for k in range(1, len(cores)):
        if cores[k - 1].shape[-1] != cores[k].shape[nb]:
            raise ValueError(
                f"{what}: cores[{k - 1}]{cores[k - 1].shape} and cores[{k}]{cores[k].shape} "
                "do not chain"
            )


# --------------------------------------------------------------------------- array math


@jax.jit  # one program per shape, not one per op (materialize / apply run eagerly)
def _tt_to_tensor(cores) -> jax.Array:
    shape = tuple(c.shape[1] for c in cores)
    out = cores[0].reshape(-1, cores[0].shape[-1])  # [n_1, r_1]
    for c in cores[1:]:
        out = jnp.matmul(out, c.reshape(c.shape[0], -1), precision=HIGHEST)
        out = out.reshape(-1, c.shape[-1])
    return out.reshape(shape)


@jax.jit  # one program per shape, not one per op (materialize / apply run eagerly)
def _ttm_to_matrix(cores) -> jax.Array:
    m = tuple(c.shape[1] for c in cores)
    n = tuple(c.shape[2] for c in cores)
    merged = tuple(c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores)
    t = _tt_to_tensor(merged).reshape(
        tuple(x for mk, nk in zip(m, n, strict=True) for x in (mk, nk))
    )
    d = len(cores)
    t = t.transpose(tuple(range(0, 2 * d, 2)) + tuple(range(1, 2 * d, 2)))
    return t.reshape(math.prod(m), math.prod(n))


@jax.jit  # one program per shape, not one per op (materialize / apply run eagerly)
def _ttm_apply(cores, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    m = tuple(int(c.shape[1]) for c in cores)
    n_in = math.prod(m)
    if x.shape[-1] != n_in:
        raise ValueError(f"TTMatrix.apply: x{tuple(x.shape)} does not end in {n_in}")
    dtype = jnp.result_type(x.dtype, *(c.dtype for c in cores))
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x = x.astype(dtype)
    lead = x.shape[:-1]
    b = math.prod(lead)
    if _ttm_chain_flops(cores, b) > _ttm_dense_flops(cores, b):
        # bonds near full rank: the core-by-core chain costs more than building W once
        out = jnp.matmul(x.reshape(b, n_in), _ttm_to_matrix(cores).astype(dtype), precision=HIGHEST)
        return out.reshape(*lead, -1)
    # state [B, N_done, r, m_k, M_rest]: output modes done so far, bond, current and later inputs
    s = x.reshape(b, 1, 1, m[0], n_in // m[0])
    for k, c in enumerate(cores):
        s = jnp.einsum("bprmq,rmns->bpnsq", s, c.astype(dtype), precision=HIGHEST)
        bb, p, nk, r, q = s.shape
        mk = m[k + 1] if k + 1 < len(cores) else 1
        s = s.reshape(bb, p * nk, r, mk, q // mk)
    return s.reshape(*lead, -1)


def _ttm_chain_flops(cores, b: int) -> int:
    """Multiply-adds of :func:`_ttm_apply`'s core-by-core chain for ``b`` rows."""
    m = [int(c.shape[1]) for c in cores]
    total, done_out = 0, 1
    for k, c in enumerate(cores):
        r0, mk, nk, r1 = (int(x) for x in c.shape)
        total += b * done_out * r0 * mk * math.prod(m[k + 1 :]) * nk * r1
        done_out *= nk
    return total


def _ttm_dense_flops(cores, b: int) -> int:
    """Multiply-adds of building ``W`` (:func:`_ttm_to_matrix`) and ``x @ W`` for ``b`` rows."""
    build, done = 0, int(cores[0].shape[1] * cores[0].shape[2])
    for c in cores[1:]:
        r0, mk, nk, r1 = (int(x) for x in c.shape)
        build += done * r0 * mk * nk * r1
        done *= mk * nk
    return build + b * done  # done = in * out


def _split_fixed(c: jax.Array, rows: int, r: int) -> tuple[jax.Array, jax.Array]:
    """``c -> C [rows, cols]``, split at rank ``r``: ``(U [rows, r], U^T C [r, cols])`` with
    ``U`` the ``r`` leading left singular vectors of ``C`` (signs fixed), taken from the smaller
    Gram matrix: ``eigh(C C^T)`` when ``rows <= cols``, else ``V`` from ``eigh(C^T C)`` and
    ``U = qr(C V)``. ``U^T C`` is the exact projection (``= S_r V_r^T``), so the truncation
    error is the SVD's up to rounding of the kept directions."""
    c = c.reshape(rows, -1)
    if rows <= c.shape[1]:
        u = leading_eigvecs(jnp.matmul(c, c.T, precision=HIGHEST), r)
    else:
        v = leading_eigvecs(jnp.matmul(c.T, c, precision=HIGHEST), r)
        u, _ = jnp.linalg.qr(jnp.matmul(c, v, precision=HIGHEST))
        u = flip_signs(u)
    return u, jnp.matmul(u.T, c, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("ranks",))
def _tt_svd_fixed(x: jax.Array, ranks: tuple[int, ...]) -> tuple[jax.Array, ...]:
    shape = x.shape
    cores = []
    c, r_prev = x, 1
    for k, r in enumerate(ranks):
        u, c = _split_fixed(c, r_prev * shape[k], r)
        cores.append(u.reshape(r_prev, shape[k], r))
        r_prev = r
    cores.append(c.reshape(r_prev, shape[-1], 1))
    return tuple(cores)


@functools.partial(jax.jit, static_argnames=("rows",))
def _svd_signed(c: jax.Array, rows: int):
    """``c -> C [rows, cols]``; its thin SVD with signs fixed on every column:
    ``(U [rows, q] signs fixed, s [q], S V^T [q, cols] with the matching signs)``, so that
    ``U[:, :r] @ (S V^T)[:r]`` is the rank-``r`` truncation for every ``r``. Compiled once per
    unfolding shape: the rank, read from ``s`` on the host, only slices the result
    (:func:`flip_signs` works column by column, so fixing all columns then slicing equals
    slicing then fixing)."""
    u, s, vt = jnp.linalg.svd(c.reshape(rows, -1), full_matrices=False)
    uf = flip_signs(u)
    sign = jnp.sum(uf * u, axis=0)  # +-1 per column
    return uf, s, (s * sign)[:, None] * vt


def _rank_from_tail(s: np.ndarray, budget: float, dtype) -> int:
    """Smallest ``r >= 1`` whose dropped tail energy ``t_r = sum_{j >= r} s_j^2`` is at most
    ``budget`` up to rounding: ``t_r <= budget + tol_r`` with
    ``tol_r = q e budget + 4 sqrt(q) e s_max sqrt(t_r) + (q e)^2 sum s^2`` (``e`` machine
    epsilon of ``dtype``, ``q`` singular values), the size of the rounding error of ``t_r``
    (singular values carry absolute errors ~ ``e s_max``). At ``budget = 0`` (``eps = 1``)
    only rounding-level tails (``s_j <~ sqrt(q) e s_max``) are dropped."""
    s = np.asarray(s, np.float64)
    s2 = s**2
    q = len(s2)
    e = float(jnp.finfo(dtype).eps)
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = sum_{j >= r}
    smax = float(s.max()) if q else 0.0
    tol = q * e * budget + 4 * math.sqrt(q) * e * smax * np.sqrt(tail) + (q * e) ** 2 * s2.sum()
    ok = np.nonzero(tail <= budget + tol)[0]
    return max(int(ok[0]), 1)


@functools.partial(jax.jit, static_argnames=("r_prev", "n", "r"))
def _keep(u: jax.Array, svt: jax.Array, r_prev: int, n: int, r: int):
    """The rank-``r`` cut of :func:`_svd_signed`'s factors: ``(core [r_prev, n, r],
    carried S_r V_r^T [r, cols])`` (one program, not one per eager slice / reshape)."""
    return u[:, :r].reshape(r_prev, n, r), svt[:r]


def _tt_svd_adaptive(
    x: jax.Array, *, eps: float | None, rel_error: float | None
) -> tuple[jax.Array, ...]:
    """TT-SVD with ranks read from each unfolding's singular values on the host (full thin
    SVDs: the rule needs accurate small singular values)."""
    shape = x.shape
    d = len(shape)
    cores = []
    c, r_prev = x, 1
    delta2 = None
    for k in range(d - 1):
        u, s, svt = _svd_signed(c, r_prev * shape[k])
        s_host = np.asarray(s, np.float64)
        energy = float(np.sum(s_host**2))
        if delta2 is None and rel_error is not None:  # ||A||^2 from the first unfolding
            delta2 = rel_error**2 / (d - 1) * energy
        budget = (1.0 - eps) * energy if eps is not None else delta2
        r = _rank_from_tail(s_host, budget, x.dtype)
        core, c = _keep(u, svt, r_prev, shape[k], r)
        cores.append(core)
        r_prev = r
    cores.append(c.reshape(r_prev, shape[-1], 1))
    return tuple(cores)


# --------------------------------------------------------------------------- public API


def tt_svd_ranks(shape: tuple[int, ...], ranks: Any) -> tuple[int, ...]:
    """Validated internal bond ranks ``(r_1, ..., r_{d-1})`` for a tensor of ``shape``.

    ``ranks`` is an int (every bond, clipped to the largest bond the sweep allows there), a
    sequence of ``d - 1`` ints, or of ``d + 1`` ints with ``1`` at both ends (the TensorLy
    convention). An explicit rank must be at most ``min(r_{k-1} n_k, n_{k+1} ... n_d)``, the
    largest bond the sweep can produce after the earlier ones.
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d < 2:
        raise UserError(f"tensor_train: needs a tensor of order >= 2, got shape {shape}")
    if (
        not isinstance(ranks, int)
        and hasattr(ranks, "__len__")
        and len(ranks) == d + 1
        and not isinstance(ranks, str)
    ):
        if ranks[0] != 1 or ranks[-1] != 1:
            raise UserError(f"ranks: a list of d + 1 = {d + 1} ranks must start and end in 1")
        ranks = tuple(ranks[1:-1])
    rs = rank_list(ranks, d - 1)
    out, r_prev = [], 1
    for k in range(d - 1):
        cap = min(r_prev * shape[k], math.prod(shape[k + 1 :]))
        if isinstance(rs, int):
            r = min(rs, cap)
        else:
            r = rs[k]
            if r > cap:
                raise UserError(
                    f"ranks[{k}]: {r} exceeds the largest bond possible there, "
                    f"min({r_prev} * {shape[k]}, {math.prod(shape[k + 1 :])}) = {cap}"
                )
        out.append(r)
        r_prev = r
    return tuple(out)


def _one_rule(ranks, eps, rel_error) -> None:
    given = [
        n for n, v in (("ranks", ranks), ("eps", eps), ("rel_error", rel_error)) if v is not None
    ]
    if len(given) != 1:
        raise UserError(
            "give exactly one of ranks=, eps= (energy rule) or rel_error= (delta-truncation)"
            + (f"; got {', '.join(given)}" if given else "")
        )
    if eps is not None:
        check_fraction(eps, "eps", low_open=True, high=1.0, high_open=False)
    if rel_error is not None:
        check_fraction(rel_error, "rel_error", low_open=False, high=1.0, high_open=True)


def tensor_train(
    tensor: Any,
    *,
    eps: float | None = None,
    ranks: Any = None,
    rel_error: float | None = None,
) -> TensorTrain:
    """TT-SVD: a :class:`TensorTrain` of ``tensor [n_1, ..., n_d]`` (``d >= 2``).

    Args:
      tensor: the dense tensor; float32 / float64 kept, other dtypes computed in float32.
      eps: energy rule in ``(0, 1]``: per unfolding keep the fewest singular values whose
        squared sum reaches ``eps`` of the total (``1``: exact up to rounding). Bound:
        ``||A - A_tt||^2 <= (d - 1) (1 - eps) ||A||^2``. Ranks chosen on the host (not jit-able).
      ranks: fixed bond ranks (an int, ``d - 1`` ints or ``d + 1`` ints with 1 at the ends;
        see :func:`tt_svd_ranks`). Jit-able and vmap-able (the ranks are static).
      rel_error: Oseledets' delta-truncation in ``[0, 1)``: guarantees
        ``||A - A_tt|| <= rel_error * ||A||``. Ranks chosen on the host.

    Exactly one of ``eps`` / ``ranks`` / ``rel_error`` is given; all are checked before work
    (:class:`~jcompress.errors.UserError`).

    Returns:
      :class:`TensorTrain` with cores ``[r_{k-1}, n_k, r_k]``.

    Example::

      tt = tensor_train(x, eps=0.99)        # x: [64, 64, 144]
      tt.ranks, tt.materialize().shape      # (1, r1, r2, 1), (64, 64, 144)
      tt = jax.jit(lambda x: tensor_train(x, ranks=(8, 16)))(x)

    References:
      Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011 (Alg. 1).
    """
    _one_rule(ranks, eps, rel_error)
    x = as_float(tensor)
    if x.ndim < 2:
        raise UserError(f"tensor_train: needs a tensor of order >= 2, got shape {tuple(x.shape)}")
    if ranks is not None:
        return TensorTrain(_tt_svd_fixed(x, tt_svd_ranks(x.shape, ranks)))
    if isinstance(x, jax.core.Tracer):
        raise UserError(
            "tensor_train: eps= / rel_error= pick ranks from the data on the host and cannot run "
            "under jit / vmap; pass the ranks they found as ranks= there"
        )
    return TensorTrain(_tt_svd_adaptive(x, eps=eps, rel_error=rel_error))


def factorize(n: int, d: int) -> tuple[int, ...]:
    """``d`` factors of ``n`` as equal as possible, in decreasing order.

    Minimises the largest factor, then the sum of factors. Any ``n >= 1`` works: a prime or
    a size with few divisors gives factors of 1 (``factorize(127, 3) == (127, 1, 1)``,
    ``factorize(6, 3) == (3, 2, 1)``); ``factorize(768, 3) == (12, 8, 8)``.
    """
    n = check_int(n, "factorize: n", low=1)
    d = check_int(d, "factorize: d", low=1)
    divisors = [k for k in range(1, n + 1) if n % k == 0] if n <= 1 << 20 else None
    if divisors is None:
        divisors = sorted(
            {k for i in range(1, math.isqrt(n) + 1) if n % i == 0 for k in (i, n // i)}
        )
    best: tuple[int, ...] | None = None

    def key(t):
        return (max(t), sum(t))

    def rec(rest: int, slots: int, cap: int, acc: tuple[int, ...]):
        nonlocal best
        if slots == 1:
            if rest <= cap:
                t = acc + (rest,)
                if best is None or key(t) < key(best):
                    best = t
            return
        lo = math.ceil(round(rest ** (1.0 / slots), 9))
        for f in reversed(divisors):
            if f > cap or f > rest:
                continue
            if f < lo:
                break
            if rest % f == 0:
                rec(rest // f, slots - 1, f, acc + (f,))

    rec(n, d, n, ())
    assert best is not None
    return best


@functools.partial(jax.jit, static_argnames=("in_modes", "out_modes"))
def _mpo_tensor(w: jax.Array, in_modes: tuple[int, ...], out_modes: tuple[int, ...]):
    """``w [in, out]`` -> ``[m_1 n_1, ..., m_d n_d]``: reshaped to ``(m_1..m_d, n_1..n_d)``
    (row-major), permuted to ``(m_1, n_1, ..., m_d, n_d)`` and merged pairwise."""
    d = len(in_modes)
    t = w.reshape(in_modes + out_modes)
    t = t.transpose(tuple(x for k in range(d) for x in (k, d + k)))
    return t.reshape(tuple(m * n for m, n in zip(in_modes, out_modes, strict=True)))


@functools.partial(jax.jit, static_argnames=("in_modes", "out_modes"))
def _unmerge(cores, in_modes: tuple[int, ...], out_modes: tuple[int, ...]):
    """TT cores ``[r_{k-1}, m_k n_k, r_k]`` -> MPO cores ``[r_{k-1}, m_k, n_k, r_k]``."""
    return tuple(
        c.reshape(c.shape[0], m, n, c.shape[-1])
        for c, m, n in zip(cores, in_modes, out_modes, strict=True)
    )


def tt_matrix(
    w: Any,
    *,
    in_modes: Any = None,
    out_modes: Any = None,
    ranks: Any = None,
    eps: float | None = None,
    rel_error: float | None = None,
    n_cores: int | None = None,
) -> TTMatrix:
    """TT-matrix (MPO) of a weight ``w [in, out]`` (Novikov et al. 2015).

    ``w`` is reshaped to ``(m_1, ..., m_d, n_1, ..., n_d)`` (row-major), permuted to
    ``(m_1, n_1, ..., m_d, n_d)``, merged to ``(m_1 n_1, ..., m_d n_d)`` and split by TT-SVD
    (:func:`tensor_train`, same ``ranks`` / ``eps`` / ``rel_error`` rules and bounds); each
    core ``[r_{k-1}, m_k n_k, r_k]`` is unmerged to ``[r_{k-1}, m_k, n_k, r_k]``.

    Two cores with bond ``r`` (``tt_matrix(w, n_cores=2, ranks=(r,))``): the TT-SVD is one
    rank-``r`` truncated SVD of the rearranged matrix ``R[(i_1, j_1), (i_2, j_2)]
    [m_1 n_1, m_2 n_2]``, so ``W ~ sum_{k < r} A_k (x) B_k`` (Kronecker products,
    ``A_k [m_1, n_1]``, ``B_k [m_2, n_2]``): the optimal r-term Kronecker approximation
    (Van Loan & Pitsianis). With ``in_modes=(in, 1), out_modes=(1, out)`` the rearranged
    matrix is ``W`` itself and the MPO is the rank-``r`` SVD ``W ~ (U_r) (S_r V_r^T)``.

    Args:
      w: ``[in, out]``.
      in_modes / out_modes: factorisations of ``in`` / ``out`` of one length ``d``; missing
        ones come from :func:`factorize` (``d = n_cores``, default 3, or the given modes'
        length). Sizes with few divisors get factors of 1 (a prime ``in`` gives
        ``(in, 1, 1)``).
      ranks / eps / rel_error: exactly one, as in :func:`tensor_train` (``d - 1`` bond ranks).
      n_cores: ``d`` when no modes are given.

    Returns:
      :class:`TTMatrix` with cores ``[r_{k-1}, m_k, n_k, r_k]``.

    References:
      Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks", NeurIPS 2015;
      Oseledets 2011; Van Loan, Pitsianis, "Approximation with Kronecker Products", 1993.
    """
    _one_rule(ranks, eps, rel_error)
    w = as_float(w, "w")
    if w.ndim != 2:
        raise UserError(f"tt_matrix: w must be [in, out], got shape {tuple(w.shape)}")
    n_in, n_out = (int(s) for s in w.shape)
    d = None
    for name, modes in (("in_modes", in_modes), ("out_modes", out_modes)):
        if modes is not None:
            if d is not None and len(modes) != d:
                raise UserError(
                    f"{name}: {len(modes)} modes, but the other modes have {d}: "
                    f"in_modes={in_modes}, out_modes={out_modes}"
                )
            d = len(modes)
    if n_cores is not None:
        check_int(n_cores, "n_cores", low=1)
        if d is not None and n_cores != d:
            raise UserError(f"n_cores: {n_cores} disagrees with {d} given modes")
        d = n_cores
    d = 3 if d is None else d
    if d < 1:
        raise UserError("tt_matrix: at least one core")
    in_modes = factorize(n_in, d) if in_modes is None else tuple(in_modes)
    out_modes = factorize(n_out, d) if out_modes is None else tuple(out_modes)
    for name, modes, size in (("in_modes", in_modes, n_in), ("out_modes", out_modes, n_out)):
        for k, m in enumerate(modes):
            check_int(m, f"{name}[{k}]", low=1)
        if math.prod(modes) != size:
            raise UserError(f"{name}: {modes} multiply to {math.prod(modes)}, not {size}")
    if d == 1:  # one core, no bonds: w itself
        return TTMatrix((w.reshape(1, n_in, n_out, 1),))
    merged_shape = tuple(m * n for m, n in zip(in_modes, out_modes, strict=True))
    if ranks is not None:
        tt_svd_ranks(merged_shape, ranks)  # fail before the reshape
    in_modes, out_modes = tuple(map(int, in_modes)), tuple(map(int, out_modes))
    t = _mpo_tensor(w, in_modes, out_modes)
    tt = tensor_train(t, eps=eps, ranks=ranks, rel_error=rel_error)
    return TTMatrix(_unmerge(tt.cores, in_modes, out_modes))
