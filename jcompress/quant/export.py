"""NVFP4 / MXFP4 leaves in the packed layout inference engines read (compressed-tensors).

The ``compressed-tensors`` convention (``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``,
what vLLM loads) for one ``nn.Linear`` (torch layout ``weight: [out, in]``):

* ``weight_packed``: ``uint8 [out, in / 2]``, two E2M1 codes per byte along the input
  dimension, element ``2k`` in the low nibble and ``2k + 1`` in the high one; a code is the
  OCP E2M1 bit pattern (sign bit 3, exponent bits 2..1, mantissa bit 0);
* ``weight_scale``: ``[out, in / 16]`` ``float8_e4m3fn`` (NVFP4) or ``[out, in / 32]``
  ``uint8`` E8M0 biased exponents (MXFP4, ``2 ** (e - 127)``);
* ``weight_global_scale`` (NVFP4 only): ``float32 [1]``, the divisor of the block scales:
  ``W = code * (weight_scale / weight_global_scale)``. Ours multiplies by the tensor scale
  ``g = amax / (6 * 448)``; the export writes ``1 / g`` (float32) and the import reads
  ``1 / weight_global_scale`` back, which can differ from ``g`` by one ulp (float32
  reciprocals are not a bijection: about one ``g`` in seven has no float32 ``x`` with
  ``1 / x == g``); codes and block scales round-trip bit for bit.

:func:`load_compressed_tensors` reads such a checkpoint (ours, or one the
``compressed-tensors`` package / llm-compressor wrote) back into a param tree whose packed
linears are :class:`QuantizedArray` leaves; the forward pass runs on it.

The layout is done here with numpy (the library never imports torch); the tests check it
bit for bit against the ``compressed-tensors`` package's own pack / unpack / dequantization.
A zero, missing or non-finite scale is an error at export (engines divide by them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jcompress.errors import UserError
from jcompress.quant.formats import QuantSpec
from jcompress.quant.leaves import QuantizedArray

__all__ = [
    "EXPORT_FORMATS",
    "from_compressed_tensors",
    "load_compressed_tensors",
    "pack_fp4",
    "save_compressed_tensors",
    "to_compressed_tensors",
    "unpack_fp4",
]

EXPORT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def pack_fp4(codes: Any) -> np.ndarray:
    """E2M1 values ``[in, out]`` -> ``uint8 [out, in / 2]`` (torch layout, low nibble first).

    Raises:
      UserError: ``in`` is odd or a value is not an E2M1 value.
    """
    c = np.asarray(codes).astype(np.float32).T  # [out, in]
    if c.ndim != 2 or c.shape[1] % 2:
        raise UserError(f"pack_fp4: need an even input dimension, got codes{tuple(c.shape)[::-1]}")
    bits = c.astype(ml_dtypes.float4_e2m1fn)
    if not np.array_equal(bits.astype(np.float32), c):
        raise UserError("pack_fp4: codes are not all E2M1 values")
    nib = bits.view(np.uint8) & 0x0F
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed: Any) -> np.ndarray:
    """``uint8 [out, in / 2]`` -> E2M1 values ``[in, out]`` in a ``float8_e4m3fn`` container."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise UserError(f"weight_packed: expected a 2-D uint8 array, got {p.dtype}{p.shape}")
    nib = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], -1)  # [out, in]
    vals = nib.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return vals.T.astype(ml_dtypes.float8_e4m3fn)


def _check_scales(where: str, scales: np.ndarray, fmt: str) -> None:
    vals = (
        np.ldexp(1.0, scales.astype(np.int32) - 127)
        if fmt == "mxfp4"
        else scales.astype(np.float32)
    )
    bad = ~np.isfinite(vals) | (scales == 255 if fmt == "mxfp4" else vals <= 0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise UserError(
            f"{where}: {int(bad.sum())} block scale(s) are zero or non-finite (first: block "
            f"{i} of output channel {j}, value {vals[i, j]}); engines divide by them, so this "
            f"weight cannot be exported (an all-zero block has no scale)"
        )


def to_compressed_tensors(leaf: QuantizedArray, *, where: str = "weight") -> dict[str, np.ndarray]:
    """A :class:`QuantizedArray` (NVFP4 / MXFP4) -> the compressed-tensors tensors.

    Args:
      leaf: the leaf (``[in, out]``, ``in`` a multiple of the block).
      where: names the weight in error messages.

    Returns:
      ``{"weight_packed", "weight_scale"[, "weight_global_scale"]}`` numpy arrays.

    Raises:
      UserError: another format, a ragged input dimension, or a zero / non-finite scale.
    """
    if not isinstance(leaf, QuantizedArray) or leaf.spec.fmt not in EXPORT_FORMATS:
        got = leaf.spec.key if isinstance(leaf, QuantizedArray) else type(leaf).__name__
        raise UserError(
            f"{where}: only {', '.join(EXPORT_FORMATS)} leaves export to "
            f"compressed-tensors, got {got}"
        )
    fmt = leaf.spec.fmt
    bi = leaf.spec.format.fixed_block[0]
    if leaf.shape[0] % bi:
        raise UserError(
            f"{where}: input dimension {leaf.shape[0]} is not a multiple of the {fmt} block {bi}"
        )
    scales = np.asarray(leaf.scales)
    _check_scales(where, scales, fmt)
    out = {"weight_packed": pack_fp4(leaf.codes), "weight_scale": np.ascontiguousarray(scales.T)}
    if fmt == "nvfp4":
        g = np.float32(np.asarray(leaf.global_scale).reshape(()))
        if not np.isfinite(g) or g <= 0:
            raise UserError(f"{where}: tensor scale {g} is zero or non-finite")
        out["weight_global_scale"] = np.array([np.float32(1.0) / g], np.float32)
    return out


def from_compressed_tensors(
    tensors: Mapping[str, Any],
    fmt: str,
    *,
    dense_dtype: Any = np.float32,
    where: str = "weight",
) -> QuantizedArray:
    """The inverse of :func:`to_compressed_tensors` (a validated leaf).

    Raises:
      UserError: a missing tensor, wrong shapes / dtypes, or a zero / non-finite scale.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"{where}: format {fmt!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    need = ("weight_packed", "weight_scale") + (("weight_global_scale",) if fmt == "nvfp4" else ())
    missing = [k for k in need if k not in tensors]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    codes = unpack_fp4(tensors["weight_packed"])
    spec = QuantSpec(fmt)
    want_dt = spec.format.scale_dtype
    scales = np.asarray(tensors["weight_scale"])
    n_blocks = -(-codes.shape[0] // spec.format.fixed_block[0])
    if scales.dtype != want_dt or scales.shape != (codes.shape[1], n_blocks):
        raise UserError(
            f"{where}: weight_scale {scales.dtype}{scales.shape} does not fit "
            f"weight_packed for {fmt}"
        )
    scales = np.ascontiguousarray(scales.T)
    _check_scales(where, scales, fmt)
    g = np.ones((1,), np.float32)
    if fmt == "nvfp4":
        gs = np.asarray(tensors["weight_global_scale"], np.float32).reshape(-1)
        if gs.shape != (1,) or not np.isfinite(gs).all() or gs[0] <= 0:
            raise UserError(f"{where}: weight_global_scale must be one positive finite value")
        g = np.array([np.float32(1.0) / gs[0]], np.float32)
    try:
        return QuantizedArray(
            jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(g), spec, np.dtype(dense_dtype)
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _scheme(fmt: str, targets: list[str]) -> dict[str, Any]:
    """A compressed-tensors config group: weight-only FP4 (W4A16), group of 16 / 32."""
    return {
        "targets": targets,
        "weights": {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "strategy": "tensor_group" if fmt == "nvfp4" else "group",
            "group_size": 16 if fmt == "nvfp4" else 32,
            "dynamic": False,
            **({"scale_dtype": None} if fmt == "nvfp4" else {}),
        },
        "input_activations": None,
        "output_activations": None,
        "format": EXPORT_FORMATS[fmt],
    }


def save_compressed_tensors(
    cfg: Any,
    params: Any,
    out_dir: Any,
    *,
    tokenizer_dir: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Any:
    """Write an HF checkpoint whose NVFP4 / MXFP4 linears are packed for inference engines.

    Every ``nn.Linear`` whose kernel is an NVFP4 / MXFP4 :class:`QuantizedArray` becomes
    ``<module>.weight_packed`` / ``.weight_scale`` (/ ``.weight_global_scale``); every other
    tensor is written dense (typed leaves materialized) as :func:`jcompress.save_hf` does;
    ``config.json`` gets the compressed-tensors ``quantization_config`` (one config group per
    format, the packed modules as targets). Written atomically.

    Args:
      cfg, params: the model.
      out_dir: destination directory (refused if it exists, unless ``overwrite``).
      tokenizer_dir: copy the tokenizer files from here.
      overwrite: replace an existing ``out_dir``.
      progress: show a progress bar.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      UserError: no exportable leaf, a packed leaf on a fused / non-linear tensor, a ragged
        input dimension, or a zero / non-finite scale (all before anything is written).
    """
    import json
    import shutil
    from pathlib import Path

    from tqdm.auto import tqdm

    from jcompress.atomic import atomic_dir
    from jcompress.leaves import CompressedLeaf
    from jcompress.models import hf
    from jcompress.models.convert import flatten
    from jcompress.models.families import spec_for
    from jcompress.models.safetensors_io import write_safetensors
    from jcompress.outputs import check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(
        out_dir,
        inputs={"tokenizer_dir": tokenizer_dir} if tokenizer_dir else None,
        overwrite=overwrite,
        arg="out_dir",
        require_marker=False,
    )
    flat = flatten(params)
    spec = spec_for(cfg.family.value)
    entries: list[tuple[str, tuple[int, ...], np.dtype, Any]] = []
    groups: dict[str, list[str]] = {f: [] for f in EXPORT_FORMATS}
    for rule, name, paths in spec.table(cfg):
        leaves = [flat[p] for p in paths]
        leaf = leaves[0]
        packed = isinstance(leaf, QuantizedArray) and leaf.spec.fmt in EXPORT_FORMATS
        if packed:
            if (
                len(paths) != 1
                or rule.transform.name != "transpose"
                or not name.endswith(".weight")
            ):
                raise UserError(
                    f"{paths[0]}: a packed {leaf.spec.fmt} kernel must be a plain "
                    f"nn.Linear weight (HF {name} is {rule.transform.name})"
                )
            module = name[: -len(".weight")]
            for k, arr in to_compressed_tensors(leaf, where=module).items():
                entries.append((f"{module}.{k}", arr.shape, arr.dtype, lambda a=arr: a))
            groups[leaf.spec.fmt].append(module)
            continue
        dtype = np.result_type(*[np.dtype(v.dtype) for v in leaves])

        def produce(rule=rule, leaves=leaves, dtype=dtype):
            dense = [
                np.asarray(v.materialize() if isinstance(v, CompressedLeaf) else v) for v in leaves
            ]
            return rule.transform.to_hf(*[d.astype(dtype, copy=False) for d in dense])

        entries.append((name, tuple(rule.hf_shape(cfg)), np.dtype(dtype), produce))
    if not any(groups.values()):
        raise UserError(
            "params: no NVFP4 / MXFP4 QuantizedArray kernels to pack "
            "(quantize with jcompress quant apply first)"
        )
    packed_names = {f"{m}." for g in groups.values() for m in g}
    config = hf._config_dict(  # torch_dtype from the dense tensors only
        cfg, [e for e in entries if not any(e[0].startswith(m) for m in packed_names)]
    )
    config.pop(hf.FACTORS_KEY, None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision"
        if all(groups.values())
        else next(EXPORT_FORMATS[f] for f, g in groups.items() if g),
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{k}": _scheme(f, g)
            for k, (f, g) in enumerate((f, g) for f, g in groups.items() if g)
        },
        "ignore": [],
    }
    with atomic_dir(out_dir, overwrite=overwrite, arg="out_dir", marker=False) as tmp:
        bar = tqdm(total=len(entries), desc="export", disable=not progress, leave=False)

        def ticking():
            for n, sh, dt, produce in entries:
                yield n, sh, dt, lambda produce=produce: (bar.update(1), produce())[1]

        write_safetensors(tmp / "model.safetensors", list(ticking()))
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in hf.TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return out_dir


_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "weight_shape")


def _ct_config(cfg: Any, model_dir: Any) -> dict[str, Any]:
    """The checkpoint's compressed-tensors ``quantization_config`` (checked)."""
    qc = cfg.hf_config.get("quantization_config")
    where = f"{model_dir}/config.json"
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "compressed-tensors":
        raise UserError(
            f"{where}: no compressed-tensors quantization_config (quant_method "
            f"{qc.get('quant_method') if isinstance(qc, Mapping) else None!r}); a dense or "
            "jcompress checkpoint loads with jcompress.load_hf"
        )
    allowed = set(EXPORT_FORMATS.values())
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise UserError(f"{where}: quantization_config has no config_groups")
    for name, g in groups.items():
        fmt = (g or {}).get("format") or qc.get("format")
        if fmt not in allowed:
            raise UserError(
                f"{where}: config group {name} has format {fmt!r}; loadable: "
                f"{', '.join(sorted(allowed))}"
            )
        acts = [(g or {}).get(k) for k in ("input_activations", "output_activations")]
        if any(a for a in acts):
            raise UserError(
                f"{where}: config group {name} quantizes activations; only weight-only "
                "(W4A16) checkpoints load as QuantizedArray leaves"
            )
    return dict(qc)


def load_compressed_tensors(
    model_dir: Any,
    *,
    dtype: Any = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Load a compressed-tensors NVFP4 / MXFP4 (W4A16) checkpoint as ``(cfg, params)``.

    Every ``nn.Linear`` stored packed (``<module>.weight_packed`` / ``.weight_scale`` /
    ``.weight_global_scale``) becomes a :class:`QuantizedArray` kernel (codes and block scales
    bit for bit; its format from the scale dtype: E4M3 with a tensor scale is NVFP4, E8M0
    ``uint8`` is MXFP4); every other tensor loads dense as :func:`jcompress.load_hf` loads it.
    Reads what :func:`save_compressed_tensors` writes and what the ``compressed-tensors``
    package (llm-compressor) writes for these formats; single-file or sharded safetensors.

    Args:
      model_dir: the checkpoint directory.
      dtype: ``None`` keeps each dense tensor's stored dtype and materializes quantized leaves
        in ``config.json``'s ``torch_dtype``; else the dtype for both.
      progress: show a progress bar over tensors.

    Returns:
      ``(cfg, params)``; ``jcompress.forward(cfg, params, ids)`` runs on it, and
      :func:`save_compressed_tensors` writes it back.

    Raises:
      UserError: no compressed-tensors config, another format or activation quantization,
        a packed tensor on a fused / non-linear weight, a missing, misshapen or unexpected
        tensor, a zero / non-finite scale, NaN / Inf in a dense tensor.
    """
    from pathlib import Path

    from jcompress.models import hf

    model_dir = Path(model_dir)
    dt = hf.parse_dtype(dtype)
    cfg = hf.read_config(model_dir)
    _ct_config(cfg, model_dir)
    if dt is not None:
        dense_dtype = np.dtype(dt)
    else:
        name = cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype") or "float32"
        dense_dtype = np.dtype(hf.parse_dtype(str(name)) or np.float32)

    def claim(row: hf.LoadRow, tensors: hf.RowTensors) -> dict[str, Any] | None:
        """A linear stored packed -> its QuantizedArray kernel; anything else: load_hf's."""
        module = row.name[: -len(".weight")] if row.name.endswith(".weight") else None
        if module is None or f"{module}.weight_packed" not in tensors:
            return None
        if len(row.paths) != 1 or row.rule.transform.name != "transpose":
            raise UserError(
                f"{model_dir}: {module} is packed but {row.name} is not a plain nn.Linear "
                f"weight ({row.rule.transform.name}); only linear kernels load packed"
            )
        local = {
            k: tensors.read(f"{module}.{k}") for k in _PACKED_SUFFIXES if f"{module}.{k}" in tensors
        }
        scale = local.get("weight_scale")
        # the scale dtype names the format: E4M3 (+ a tensor scale) NVFP4, E8M0 bits MXFP4
        fmt = "mxfp4" if scale is not None and scale.dtype == np.uint8 else "nvfp4"
        if fmt == "mxfp4" and "weight_global_scale" in local:
            raise UserError(f"{module}: E8M0 (uint8) scales with a weight_global_scale")
        want = row.shapes[0]  # [in, out]
        if "weight_shape" in local:
            ws = tuple(int(v) for v in np.asarray(local.pop("weight_shape")).reshape(-1))
            if ws != want[::-1]:
                raise UserError(
                    f"{module}: weight_shape {list(ws)}, config implies {list(want[::-1])}"
                )
        leaf = from_compressed_tensors(local, fmt, dense_dtype=dense_dtype, where=module)
        if tuple(leaf.shape) != want:
            raise UserError(
                f"{module}: packed weight stands for [in, out] = {list(leaf.shape)}, "
                f"config implies {list(want)}"
            )
        return {row.paths[0]: leaf}

    return hf.load_hf(model_dir, dtype=dt, progress=progress, claim=claim)
