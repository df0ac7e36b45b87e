"""quant.export.load_compressed_tensors: checkpoints written by save_compressed_tensors and by
the compressed-tensors package itself (its NVFP4A16 / MXFP4A16 presets, observers and packed
compressors) load back as QuantizedArray kernels, bit for bit on codes and block scales; the
forward pass runs on them; bad checkpoints are one clear error."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress.errors import UserError
from jcompress.models.convert import flatten
from jcompress.quant import QuantizedArray, QuantSpec
from jcompress.quant.apply import QuantApplyConfig, compress
from jcompress.quant.export import load_compressed_tensors, save_compressed_tensors

IDS = jnp.arange(2, 26)[None]


@pytest.fixture(scope="module")
def model(llama_dir):
    return jcompress.load_hf(llama_dir)


@pytest.fixture(scope="module")
def ours(model, tmp_path_factory):
    cfg, params = model
    rules = ((r"model/layers/[01]/mlp/(up|down)_proj", "nvfp4"),
             (r"model/layers/0/self_attn/[qk]_proj", "mxfp4"),
             (r"model/layers/1/self_attn/o_proj", "int8"))  # fmt: skip
    q, _ = compress(params, config=QuantApplyConfig(rules=rules), progress=False)
    out = save_compressed_tensors(cfg, q, tmp_path_factory.mktemp("ct") / "ours")
    return q, out


def _bytes(a):
    return np.asarray(a).view(np.uint8)


def test_round_trip_of_our_export(model, ours):
    cfg, _ = model
    q, out = ours
    cfg2, back = load_compressed_tensors(out)
    assert cfg2 == cfg
    fa, fb = flatten(q), flatten(back)
    assert set(fa) == set(fb)
    n_packed = 0
    for k, a in fa.items():
        b = fb[k]
        if isinstance(a, QuantizedArray) and a.spec.fmt in ("nvfp4", "mxfp4"):
            n_packed += 1
            assert isinstance(b, QuantizedArray) and b.spec == a.spec and b.dtype == a.dtype
            np.testing.assert_array_equal(_bytes(b.codes), _bytes(a.codes))
            np.testing.assert_array_equal(_bytes(b.scales), _bytes(a.scales))
            # engines divide by 1 / g: float32 reciprocals round-trip to within one ulp
            np.testing.assert_array_max_ulp(np.asarray(b.global_scale),
                                            np.asarray(a.global_scale), maxulp=1)  # fmt: skip
        else:  # dense, and the int8 kernel written materialized
            want = a.materialize() if isinstance(a, QuantizedArray) else a
            assert not isinstance(b, QuantizedArray)
            np.testing.assert_array_equal(np.asarray(b), np.asarray(want))
    assert n_packed == 2 * 2 + 2
    la, lb = jcompress.forward(cfg, q, IDS), jcompress.forward(cfg, back, IDS)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-4, atol=1e-4)
    # written again: the same packed tensors (codes and scales byte for byte)
    again = save_compressed_tensors(cfg, back, out.parent / "again")
    from jcompress.models.safetensors_io import SafetensorsFile

    f1, f2 = (
        SafetensorsFile(out / "model.safetensors"),
        SafetensorsFile(again / "model.safetensors"),
    )
    assert set(f1.keys()) == set(f2.keys())
    for k in f1.keys():
        if not k.endswith("weight_global_scale"):
            np.testing.assert_array_equal(_bytes(f2.get(k)), _bytes(f1.get(k)), err_msg=k)


def _package_checkpoint(llama_dir, dest):
    """llama-1m quantized by the compressed-tensors package (its observers' scales, packed
    compressors and config) on the linears :func:`ours` quantizes: layers 0-1 up / down
    NVFP4A16, layer 0 q / k MXFP4A16 (the same tree structure: one forward compile)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    from safetensors.torch import load_file, save_file

    sd = load_file(llama_dir / "model.safetensors")
    nv = [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("up", "down")]
    mx = [f"model.layers.0.self_attn.{p}_proj" for p in "qk"]
    groups, local_by_module = {}, {}
    for gi, (preset, comp, g, mods) in enumerate((
        ("NVFP4A16", NVFP4PackedCompressor, 16, nv),
        ("MXFP4A16", MXFP4PackedCompressor, 32, mx),
    )):  # fmt: skip
        scheme = preset_name_to_scheme(preset, targets=mods)
        scheme.format = f"{preset[:5].lower()}-pack-quantized"
        groups[f"group_{gi}"] = scheme
        for m in mods:
            w = sd.pop(f"{m}.weight").float()
            o, i = w.shape
            blocks = w.reshape(o, i // g, g)
            local = {"weight": w}
            gs = None
            if preset.startswith("NV"):
                gs = generate_gparam(w.min(), w.max())
                local["weight_global_scale"] = gs
            local["weight_scale"], _ = calculate_qparams(
                blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=gs
            )
            packed = comp.compress(local, scheme)
            local_by_module[m] = (packed, comp, scheme)
            sd.update({f"{m}.{k}": v.contiguous() for k, v in packed.items()})
    dest.mkdir()
    save_file(sd, dest / "model.safetensors")
    qc = QuantizationConfig(config_groups=groups, format="mixed-precision",
                            quantization_status="compressed")  # fmt: skip
    conf = json.loads((llama_dir / "config.json").read_text())
    conf["quantization_config"] = json.loads(json.dumps(qc.model_dump(), default=str))
    (dest / "config.json").write_text(json.dumps(conf))
    return torch, local_by_module


def test_checkpoint_written_by_the_package(llama_dir, ours, tmp_path):
    torch, local = _package_checkpoint(llama_dir, tmp_path / "pkg")
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    cfg, back = load_compressed_tensors(tmp_path / "pkg")
    flat = flatten(back)
    for m, (packed, comp, scheme) in local.items():
        leaf = flat[m.replace(".", "/") + "/kernel"]
        fmt = "nvfp4" if "weight_global_scale" in packed else "mxfp4"
        assert isinstance(leaf, QuantizedArray) and leaf.spec == QuantSpec(fmt)
        o, i = packed["weight_packed"].shape[0], packed["weight_packed"].shape[1] * 2
        codes = unpack_fp4_from_uint8(packed["weight_packed"], o, i, dtype=torch.float32)
        np.testing.assert_array_equal(np.asarray(leaf.codes).astype(np.float32), codes.numpy().T)
        np.testing.assert_array_equal(
            _bytes(leaf.scales), _bytes(packed["weight_scale"].view(torch.uint8).numpy().T)
        )
        # the package's own dequantization (bfloat16 arithmetic) and the exact formula
        w_pkg = comp.decompress(dict(packed), scheme)["weight"].float().numpy().T
        dense = np.asarray(leaf.materialize())
        np.testing.assert_allclose(dense, w_pkg, rtol=2**-7, atol=0)
        s = packed["weight_scale"]
        if fmt == "nvfp4":
            s = s.float().numpy().astype(np.float64) / float(packed["weight_global_scale"][0])
        else:
            s = 2.0 ** (s.numpy().astype(np.float64) - 127)
        exact = codes.numpy().astype(np.float64) * np.repeat(s, i // s.shape[1], axis=1)
        np.testing.assert_allclose(dense, exact.T, rtol=2e-7, atol=0)
    # the forward pass runs; the package's scales are ours up to rounding of 1 / g
    la = np.asarray(jcompress.forward(cfg, back, IDS))
    lb = np.asarray(jcompress.forward(cfg, ours[0], IDS))
    assert np.isfinite(la).all()
    np.testing.assert_allclose(la, lb, rtol=0, atol=0.05 * np.abs(lb).max())


def test_bad_checkpoints(llama_dir, ours, tmp_path):
    _, out = ours
    with pytest.raises(UserError, match="no compressed-tensors quantization_config"):
        load_compressed_tensors(llama_dir)
    bad = tmp_path / "acts"
    shutil.copytree(out, bad)
    conf = json.loads((bad / "config.json").read_text())
    g0 = next(iter(conf["quantization_config"]["config_groups"].values()))
    g0["input_activations"] = {"num_bits": 4, "type": "float"}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="quantizes activations"):
        load_compressed_tensors(bad)
    conf["quantization_config"]["config_groups"] = {"g": {"format": "int-quantized"}}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="format 'int-quantized'; loadable"):
        load_compressed_tensors(bad)
    # a packed module missing its scale / an unexpected tensor
    from jcompress.models.safetensors_io import SafetensorsFile, write_safetensors

    f = SafetensorsFile(out / "model.safetensors")
    for drop, extra, needle in (
        ("model.layers.1.mlp.up_proj.weight_scale", None,
         "model.layers.1.mlp.up_proj: missing weight_scale"),
        (None, "model.layers.1.mlp.up_proj.input_global_scale", "unexpected tensors"),
    ):  # fmt: skip
        d = tmp_path / f"t{needle[:3]}"
        d.mkdir()
        shutil.copy(out / "config.json", d / "config.json")
        entries = [(k, f.get(k).shape, f.get(k).dtype, lambda k=k: f.get(k))
                   for k in f.keys() if k != drop]  # fmt: skip
        if extra:
            entries.append((extra, (1,), np.dtype(np.float32), lambda: np.ones(1, np.float32)))
        write_safetensors(d / "model.safetensors", entries)
        with pytest.raises(UserError, match=needle):
            load_compressed_tensors(d)
