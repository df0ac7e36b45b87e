"""Random params of a tiny model drawn by numpy, for tests that only need some weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jcompress.models.convert import unflatten
from jcompress.models.params import param_shapes


def random_params(cfg, seed: int, std: float):
    """``jcompress.init_params``' layout (normal(std) kernels and embeddings, ones for norm
    scales, zeros for biases), drawn by numpy on the host: no random-number program to
    compile per leaf shape (``init_params`` compiles one threefry normal per shape)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in sorted(param_shapes(cfg).items()):
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "scale":
            a = np.ones(shape)
        elif leaf == "bias":
            a = np.zeros(shape)
        else:
            a = std * rng.standard_normal(shape)
        flat[path] = jnp.asarray(a.astype(np.float32))
    return unflatten(flat)
