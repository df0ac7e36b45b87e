"""Tensor decompositions as JAX pytrees: Tucker (HOSVD / HOOI), tensor trains (TT-SVD, MPS) and
TT-matrices (MPO) of ``[in, out]`` weights.

Shared math for the compression methods (the Tucker/MPS method, the quantization method's MPO
low-rank branch); it knows nothing about models. Every result type is a frozen-dataclass pytree
with ``materialize()`` and ``num_params``, so ``jax.jit``, ``jax.vmap`` over a stacked batch
and ``jax.tree.map`` work on it.

References:
  Tucker, Psychometrika 31, 1966. De Lathauwer, De Moor, Vandewalle, SIAM J. Matrix Anal.
  Appl. 21(4), 2000. Oseledets, SIAM J. Sci. Comput. 33(5), 2011. Novikov et al.,
  "Tensorizing Neural Networks", NeurIPS 2015.
"""

from jcompress.decomp.tt_core import (
    TensorTrain,
    TTMatrix,
    factorize,
    tensor_train,
    tt_matrix,
    tt_svd_ranks,
)
from jcompress.decomp.tucker_core import HooiInfo, Tucker, hooi, hooi_core, hosvd, tucker_ranks

__all__ = [
    "HooiInfo",
    "TTMatrix",
    "TensorTrain",
    "Tucker",
    "factorize",
    "hooi",
    "hooi_core",
    "hosvd",
    "tensor_train",
    "tt_matrix",
    "tt_svd_ranks",
    "tucker_ranks",
]
