"""Per-layer, per-head SpargeAttn thresholds (:class:`SpargeParams`) and their file format.

A :class:`SpargeParams` is a pytree of three float32 arrays ``[layers, heads]`` (query heads).
It travels into the model as ``forward(..., attention="block_sparse", attention_state=p)``,
where layer ``i`` reads row ``i``. Files are safetensors with the shape and the model's
identity in the metadata; loading onto a model with another layer or head count is one clear
error.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jcompress.atomic import on_writer
from jcompress.errors import UserError

__all__ = ["DEFAULTS", "SpargeParams", "load_params", "save_params"]

FORMAT = "jcompress.sparge/1"

DEFAULTS = {"simthreshd1": 0.6, "cdfthreshd": 0.98, "pvthreshd": math.inf}
"""Untuned settings: upstream's plug-and-play ``simthreshd1=0.6, cdfthreshd=0.98``, no PV
skip."""

_RANGES = {
    "simthreshd1": (-1.0, 1.0),
    "cdfthreshd": (0.0, 1.0),
    "pvthreshd": (0.0, math.inf),
}


def check_range(name: str, a: Any) -> None:
    """One :class:`UserError` naming ``name`` and its allowed values when a concrete threshold
    array holds NaN or a value outside its range (traced values are not checked)."""
    if isinstance(a, jax.core.Tracer):
        return
    lo, hi = _RANGES[name]
    a = np.asarray(a, np.float64)
    if np.isnan(a).any():
        raise UserError(f"{name}: NaN thresholds; allowed values are in [{lo}, {hi}]")
    if (a < lo).any() or (a > hi).any():
        bad = a[(a < lo) | (a > hi)].ravel()[0]
        raise UserError(f"{name}: {bad:g} is out of range; allowed values are [{lo}, {hi}]")


class SpargeParams(NamedTuple):
    """SpargeAttn thresholds per layer and query head (a pytree; leaves ``[layers, heads]``).

    Attributes:
      simthreshd1: self-similarity gate in ``[-1, 1]``: blocks at or below it keep everything
        (``1`` makes a head dense through the gate; ``-1`` lets every block be compressed).
      cdfthreshd: cumulative pooled-attention mass to keep, in ``[0, 1]`` (``1`` keeps all).
      pvthreshd: PV-skip margin in nats, ``>= 0``; ``inf`` never skips.
    """

    simthreshd1: Any
    cdfthreshd: Any
    pvthreshd: Any

    @classmethod
    def create(
        cls,
        layers: int,
        heads: int,
        *,
        simthreshd1: Any = DEFAULTS["simthreshd1"],
        cdfthreshd: Any = DEFAULTS["cdfthreshd"],
        pvthreshd: Any = DEFAULTS["pvthreshd"],
    ) -> SpargeParams:
        """Broadcast scalars / ``[heads]`` / ``[layers, heads]`` values to ``[layers, heads]``
        float32 arrays, validated (ranges, no NaN)."""
        for name, n in (("layers", layers), ("heads", heads)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise UserError(f"{name}: must be a positive integer, got {n!r}")
        vals = {}
        for name, val in (
            ("simthreshd1", simthreshd1), ("cdfthreshd", cdfthreshd), ("pvthreshd", pvthreshd)
        ):  # fmt: skip
            a = np.asarray(val, np.float32)
            try:
                a = np.broadcast_to(a, (layers, heads)).copy()
            except ValueError:
                raise UserError(
                    f"{name}: shape {list(a.shape)} does not broadcast to [layers, heads] = "
                    f"[{layers}, {heads}]"
                ) from None
            vals[name] = a
        p = cls(**vals)
        p.validate()
        return p

    @classmethod
    def dense(cls, layers: int, heads: int) -> SpargeParams:
        """Keep-everything thresholds (``cdfthreshd = 1``, ``simthreshd1 = -1``, no PV skip):
        block-sparse attention then equals dense attention."""
        return cls.create(layers, heads, simthreshd1=-1.0, cdfthreshd=1.0, pvthreshd=math.inf)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(np.shape(self.simthreshd1))

    def validate(self) -> None:
        """Host-side checks (concrete arrays): equal ``[layers, heads]`` shapes, ranges, no
        NaN. Raises :class:`UserError` naming the field and the allowed values."""
        shape = np.shape(self.simthreshd1)
        for name in _RANGES:
            a = np.asarray(getattr(self, name), np.float64)
            if a.shape != shape or a.ndim != 2:
                raise UserError(
                    f"{name}: expected shape [layers, heads] = {list(shape)}, got {list(a.shape)}"
                )
            check_range(name, a)

    def check_model(self, layers: int, heads: int, *, arg: str = "sparge params") -> None:
        """One clear error unless the thresholds are ``[layers, heads]``."""
        if self.shape != (layers, heads):
            raise UserError(
                f"{arg}: thresholds are for {self.shape[0]} layers x {self.shape[1]} heads; "
                f"the model has {layers} layers x {heads} heads"
            )

    def layer(self, i: Any) -> SpargeParams:
        """Row ``i`` (may be traced): thresholds ``[heads]`` of one layer."""
        return SpargeParams(*(a[i] for a in self))


def save_params(
    path: str | os.PathLike,
    params: SpargeParams,
    *,
    model: str = "",
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as safetensors (temporary sibling, then rename: never half-written).

    Metadata: format, ``layers``, ``heads``, ``model`` (e.g. the model directory's name) and
    ``extra`` (JSON, e.g. block sizes and the tuning bounds). In a multi-host run process 0
    writes it (:func:`jcompress.atomic.on_writer`)."""
    from safetensors.numpy import save

    params.validate()
    path = Path(path)
    layers, heads = params.shape
    meta = {
        "format": FORMAT,
        "layers": str(layers),
        "heads": str(heads),
        "model": model,
        "extra": json.dumps(extra or {}),
    }
    blob = save({k: np.asarray(v, np.float32) for k, v in params._asdict().items()}, meta)

    def write() -> None:  # in a multi-host run: on process 0 only
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists (pass overwrite=True / --overwrite)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "xb") as f:
                f.write(blob)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    on_writer(write, path=path, arg=str(path))
    return path


def load_params(
    path: str | os.PathLike,
    *,
    layers: int | None = None,
    heads: int | None = None,
    arg: str = "--tuned",
) -> tuple[SpargeParams, dict[str, Any]]:
    """Read a file written by :func:`save_params`; with ``layers``/``heads`` given, a file
    for another shape is a :class:`UserError`. Returns ``(params, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{arg}: {path} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            names = sorted(f.keys())
            # the header first: another safetensors file (a model's shard) is refused
            # without reading its tensors
            ours = meta.get("format") == FORMAT and set(names) == set(SpargeParams._fields)
            arrays = {k: f.get_tensor(k) for k in names} if ours else {}
    except Exception as e:  # corrupt / not safetensors
        raise UserError(f"{arg}: {path} is not a readable safetensors file ({e})") from None
    if not ours:
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise UserError(
            f"{arg}: {path} is not a SpargeAttn thresholds file (format {meta.get('format')!r}, "
            f"tensors: {shown or 'none'}; expected {', '.join(SpargeParams._fields)} as "
            "`jcompress sparge tune` writes)"
        )
    p = SpargeParams(**{k: arrays[k].astype(np.float32) for k in SpargeParams._fields})
    p.validate()
    if layers is not None and heads is not None:
        p.check_model(layers, heads, arg=arg)
    meta["extra"] = json.loads(meta.get("extra") or "{}")
    return p, meta
