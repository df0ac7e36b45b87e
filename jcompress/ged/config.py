"""The frozen GED configuration."""

from __future__ import annotations

import dataclasses
import math

from jcompress.errors import UserError

__all__ = ["GEDConfig", "LEDOIT_WOLF"]

LEDOIT_WOLF = "ledoit_wolf"
"""``GEDConfig.shrinkage`` value selecting the Ledoit-Wolf intensity, estimated per fit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GEDConfig:
    """How to compress then separate two conditions (hashable: a static jit argument).

    Attributes:
      variance_threshold: keep the fewest principal components of the mean of the two
        covariances whose cumulative explained variance reaches this fraction, in ``(0, 1]``
        (unused when ``n_components`` is set).
      n_components: keep exactly this many principal components (a positive integer, at most
        ``min(N_S + N_R - 2, D)``, ``min(N_S + N_R, D)`` uncentered) instead of the count
        from ``variance_threshold``. A fixed count makes :func:`~jcompress.ged.fit`
        traceable (``jax.jit``, ``jax.vmap``); ``None``: the count is picked on the host.
      shrinkage: ``gamma`` in ``R~ = (1 - gamma) R + gamma * mean(eig(R)) * I``, applied to the
        reference covariance in the reduced space; a float in ``[0, 1)`` or ``"ledoit_wolf"``.
      n_permutations: label shuffles for the permutation test (``0`` skips it: p = 1).
      n_folds: stratified folds of the held-out separation test, ``>= 2``.
      seed: seeds the permutations and the fold assignment.
      center: subtract each condition's mean before its covariance (``False``: second-moment
        matrices, so a mean difference between conditions counts as signal).
    """

    variance_threshold: float = 0.99
    n_components: int | None = None
    shrinkage: float | str = 0.01
    n_permutations: int = 1000
    n_folds: int = 5
    seed: int = 0
    center: bool = True

    def __post_init__(self):
        t = self.variance_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1:
            raise UserError(f"GEDConfig.variance_threshold must be in (0, 1], got {t!r}")
        k = self.n_components
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"GEDConfig.n_components must be a positive integer or None, got {k!r}")
        g = self.shrinkage
        if isinstance(g, str):
            if g != LEDOIT_WOLF:
                raise UserError(
                    f"GEDConfig.shrinkage must be a float in [0, 1) or {LEDOIT_WOLF!r}, got {g!r}"
                )
        elif (
            isinstance(g, bool)
            or not isinstance(g, int | float)
            or not math.isfinite(g)
            or not 0 <= g < 1
        ):
            raise UserError(
                f"GEDConfig.shrinkage must be a float in [0, 1) or {LEDOIT_WOLF!r}, got {g!r}"
            )
        for name, low in (("n_permutations", 0), ("n_folds", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"GEDConfig.{name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"GEDConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.center, bool):
            raise UserError(f"GEDConfig.center must be True or False, got {self.center!r}")
