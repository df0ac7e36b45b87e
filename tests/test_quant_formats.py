"""jcompress.quant.formats against oracles written here from the specs (numpy + ml_dtypes casts,
explicit per-block loops), hand-worked FP4 values, and the spec grammar."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jcompress.errors import UserError
from jcompress.quant import (
    FORMATS,
    QuantSpec,
    dequantize,
    fake_quant,
    parse_spec,
    parse_specs,
    quantize,
)
from jcompress.quant import formats as F

# element -> (ml_dtypes type used as the oracle, the clip applied before its cast)
ORACLE = {
    "E2M1": (ml_dtypes.float4_e2m1fn, 6.0),
    "E3M2": (ml_dtypes.float6_e3m2fn, 28.0),
    "E2M3": (ml_dtypes.float6_e2m3fn, 7.5),
    "E4M3FN": (ml_dtypes.float8_e4m3fn, 448.0),
    "E5M2": (ml_dtypes.float8_e5m2, 57344.0),
    # the seed's IEEE-like grids are the low end of these (same bias, top exponent cut off)
    "SEED_E2M1": (ml_dtypes.float4_e2m1fn, 3.0),
    "SEED_E3M2": (ml_dtypes.float6_e3m2fn, 14.0),
    "SEED_E4M3": (ml_dtypes.float8_e4m3, 240.0),  # IEEE E4M3 with inf/nan: max 240
}
ELEMENT = {name: getattr(F, name) for name in ORACLE}


def oracle_round(y: np.ndarray, elem: str) -> np.ndarray:
    dt, mx = ORACLE[elem]
    return np.clip(y.astype(np.float32), -mx, mx).astype(dt).astype(np.float32)


def grid(elem: str) -> np.ndarray:
    """Every finite non-negative value of the element, from the ml_dtypes bit patterns."""
    dt, mx = ORACLE[elem]
    nbits = {
        ml_dtypes.float4_e2m1fn: 4,
        ml_dtypes.float6_e3m2fn: 6,
        ml_dtypes.float6_e2m3fn: 6,
    }.get(dt, 8)
    codes = np.arange(2**nbits, dtype=np.uint8)
    if nbits == 8:
        vals = codes.view(dt).astype(np.float32)
    else:  # sub-byte types: values from the bit layout (sign, exponent, mantissa) and finfo
        fi = ml_dtypes.finfo(dt)
        m, bias = fi.nmant, 1 - fi.minexp
        vals = np.array(
            [
                (c & ((1 << m) - 1)) / 2**m * 2.0 ** (1 - bias)
                if c >> m == 0
                else (1 + (c & ((1 << m) - 1)) / 2**m) * 2.0 ** ((c >> m) - bias)
                for c in range(2 ** (nbits - 1))
            ],
            np.float32,
        )
        # cross-check the layout against ml_dtypes' own conversion
        np.testing.assert_array_equal(vals.astype(dt).astype(np.float32), vals)
    vals = vals[np.isfinite(vals)]
    vals = np.unique(np.abs(vals))
    return vals[vals <= mx]


# ---------------------------------------------------------------- element grids


def test_fp4_e2m1_values_and_ties_by_hand():
    assert grid("E2M1").tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert grid("SEED_E2M1").tolist() == [0, 0.5, 1, 1.5, 2, 3]
    y = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e9, -0.25, -5.0, 0.26, 5.01])
    want = [0, 1, 1, 2, 2, 4, 4, 6, 6, -0.0, -4, 0.5, 6]
    got = np.asarray(F.round_to_grid(jnp.asarray(y, jnp.float32), F.E2M1))
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[9])  # -0.25 -> -0.0 keeps its sign
    got = np.asarray(F.round_to_grid(jnp.asarray(y, jnp.float32), F.SEED_E2M1))
    np.testing.assert_array_equal(got, [0, 1, 1, 2, 2, 3, 3, 3, 3, -0.0, -3, 0.5, 3])


@pytest.mark.parametrize("elem", list(ORACLE))
def test_grid_fixed_points_ties_and_random(elem):
    g = grid(elem)
    el = ELEMENT[elem]
    assert g.max() == el.max
    # the grid's size from the bit layout: 2**(e+m) codes minus the reserved ones
    assert len(g) >= 2 ** (el.ebits + el.mbits) - 2**el.mbits
    mids = (g[1:] + g[:-1]) / 2  # exact ties
    rng = np.random.default_rng(0)
    rnd = rng.uniform(-1.3 * el.max, 1.3 * el.max, 2000)
    small = rng.uniform(-2.0 * g[1], 2.0 * g[1], 200)  # the subnormal range
    y = np.concatenate([g, -g, mids, -mids, rnd, small, [el.max * 10, -el.max * 10]])
    y = y.astype(np.float32)
    got = np.asarray(F.round_to_grid(jnp.asarray(y), el))
    np.testing.assert_array_equal(got, oracle_round(y, elem))
    np.testing.assert_array_equal(got[: len(g)], g)  # every representable value is kept


def test_element_constants():
    assert (F.E2M1.emax, F.E3M2.emax, F.E2M3.emax, F.E4M3FN.emax) == (2, 4, 2, 8)  # OCP MX Tab. 1
    assert F.SEED_E4M3.max == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3).max)
    assert F.E4M3FN.max == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    assert F.E5M2.max == float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max)


# ---------------------------------------------------------------- block oracles


def blocks_of(shape, spec: QuantSpec):
    """(bi, bo) written from the issue text, independently of formats.block_shape."""
    n_in, n_out = shape
    fixed = {
        "nvfp4": (16, 1),
        "mxfp4": (32, 1),
        "mxfp6_e3m2": (32, 1),
        "mxfp6_e2m3": (32, 1),
        "mxfp8": (32, 1),
    }
    if spec.fmt in fixed:
        return fixed[spec.fmt]
    blk = spec.blk
    if blk == "in":
        return 1, n_out
    if blk == "out":
        return n_in, 1
    if blk is None:
        return (n_in, n_out) if spec.fmt.startswith("fp8_") else (n_in, 1)
    return (blk, blk) if spec.fmt in ("fp4", "fp6", "fp8") else (blk, 1)


ELEM_OF = {
    "fp4": "SEED_E2M1",
    "fp6": "SEED_E3M2",
    "fp8": "SEED_E4M3",
    "nvfp4": "E2M1",
    "mxfp4": "E2M1",
    "mxfp6_e3m2": "E3M2",
    "mxfp6_e2m3": "E2M3",
    "mxfp8": "E4M3FN",
    "fp8_e4m3": "E4M3FN",
    "fp8_e5m2": "E5M2",
    "int4": None,
    "int8": None,
}


def oracle_fake_quant(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    w = w.astype(np.float32)
    n_in, n_out = w.shape
    bi, bo = blocks_of(w.shape, spec)
    out = np.zeros_like(w)
    elem = ELEM_OF[spec.fmt]
    g = np.float32(np.abs(w).max() / np.float32(6 * 448))
    for i0 in range(0, n_in, bi):
        for j0 in range(0, n_out, bo):
            blk = w[i0 : i0 + bi, j0 : j0 + bo]
            amax = np.float32(np.abs(blk).max())
            if spec.fmt.startswith("int"):
                qmax = 7 if spec.fmt == "int4" else 127
                s = np.float32(amax / np.float32(qmax))
                q = np.clip(np.round(blk / s), -qmax, qmax) if s > 0 else 0 * blk
                out[i0 : i0 + bi, j0 : j0 + bo] = q * s
            elif spec.fmt == "nvfp4":
                sb = np.float32(amax / np.float32(6)) / g if g > 0 else np.float32(0)
                sb = oracle_round(np.array([sb]), "E4M3FN")[0]
                if sb * g > 0:
                    q = oracle_round(blk / np.float32(sb * g), "E2M1")
                    out[i0 : i0 + bi, j0 : j0 + bo] = q * np.float32(sb * g)
            elif spec.fmt.startswith("mx"):
                emax = {"E2M1": 2, "E3M2": 4, "E2M3": 2, "E4M3FN": 8}[elem]
                k = math.floor(math.log2(amax)) - emax if amax > 0 else -127
                k = min(max(k, -127), 127)
                x = np.float32(2.0**k)
                out[i0 : i0 + bi, j0 : j0 + bo] = oracle_round(blk / x, elem) * x
            else:
                mx = ORACLE[elem][1]
                s = np.float32(amax / np.float32(mx))
                if s > 0:
                    out[i0 : i0 + bi, j0 : j0 + bo] = oracle_round(blk / s, elem) * s
    return out


SPECS = [
    "fp4@in",
    "fp4@out",
    "fp4@16",
    "fp6@in",
    "fp6@8",
    "fp8@out",
    "fp8@16",
    "nvfp4",
    "mxfp4",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp8",
    "fp8_e4m3",
    "fp8_e4m3@out",
    "fp8_e5m2",
    "fp8_e5m2@16",
    "int4",
    "int4@16",
    "int8",
    "int8@in",
    "fp4@100000",  # tiles / groups longer than the weight: one block along that dimension
    "int4@1000000",
]


STORED = {"fp4@16", "nvfp4", "mxfp6_e2m3", "fp8_e5m2@16", "int4"}  # one per scale kind


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((72, 40)).astype(np.float32)
    w[:, 3] *= 50.0  # an outlier channel
    w[16:32, :] *= 1e-3  # small blocks (NVFP4 block scales near the E4M3 subnormals)
    w[32:64, 5] = 0.0  # an all-zero MX / NVFP4 block
    return w


@pytest.mark.parametrize("text", SPECS)
def test_fake_quant_matches_block_oracle(weight, text):
    spec = parse_spec(text)
    got = np.asarray(fake_quant(jnp.asarray(weight), spec))
    want = oracle_fake_quant(weight, spec)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()
    if text not in STORED:
        return
    q = quantize(jnp.asarray(weight), spec)
    np.testing.assert_array_equal(np.asarray(dequantize(q, spec)), want)
    assert q.codes.dtype == spec.format.code_dtype and q.scales.dtype == spec.format.scale_dtype
    bi, bo = blocks_of(weight.shape, spec)
    assert q.scales.shape == (-(-72 // bi), -(-40 // bo))


def test_fake_quant_idempotent_and_dtype(weight):
    w = jnp.asarray(weight)
    for text in ("fp4@in", "int8", "mxfp4"):
        once = fake_quant(w, text)
        np.testing.assert_array_equal(np.asarray(fake_quant(once, text)), np.asarray(once))
    wb = w.astype(jnp.bfloat16)
    out = fake_quant(wb, "nvfp4")
    assert out.dtype == jnp.bfloat16
    want = oracle_fake_quant(np.asarray(wb.astype(jnp.float32)), parse_spec("nvfp4"))
    np.testing.assert_array_equal(
        np.asarray(out.astype(jnp.float32)), want.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_nvfp4_scales_by_hand():
    w = np.zeros((16, 1), np.float32)
    w[:, 0] = np.linspace(-3, 3, 16)
    w[0, 0] = 12.0  # amax 12 -> g = 12 / 2688; block scale 12/6/g = 448 exactly
    q = quantize(jnp.asarray(w), "nvfp4")
    assert float(q.global_scale[0]) == np.float32(12.0) / np.float32(2688.0)
    assert float(q.scales.astype(jnp.float32)[0, 0]) == 448.0
    assert float(q.codes.astype(jnp.float32)[0, 0]) == 6.0


def test_mx_scale_is_floor_power_of_two():
    w = np.zeros((32, 3), np.float32)
    w[0] = [3.0, 0.75, 0.0]  # floor(log2 3) = 1 -> 2**(1 - 2) for E2M1; column 2 all zero
    w[1, 1] = -0.5
    q = quantize(jnp.asarray(w), "mxfp4")
    want = np.array([0.5, 2.0**-3, 2.0**-127], np.float32)
    np.testing.assert_array_equal(
        np.asarray(F.scale_values(q.scales, q_spec := parse_spec("mxfp4")))[0], want
    )
    # stored as E8M0 bits: the same bytes ml_dtypes' float8_e8m0fnu holds
    assert q.scales.dtype == np.uint8
    np.testing.assert_array_equal(
        np.asarray(q.scales)[0], want.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    )
    assert q_spec.format.scaling == "mx"


def test_zeros_and_all_zero_blocks():
    for text in SPECS:
        z = fake_quant(jnp.zeros((72, 40)), text)  # the shape compiled above: cached
        assert np.all(np.asarray(z) == 0)


def test_non_finite_input_is_an_error():
    w = np.ones((16, 4), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        w2 = w.copy()
        w2[3, 1] = bad
        with pytest.raises(UserError, match="non-finite"):
            fake_quant(jnp.asarray(w2), "nvfp4")
        with pytest.raises(UserError, match="non-finite"):
            quantize(jnp.asarray(w2), "fp4@in")
    # under jit the input cannot be checked: its block comes out NaN, never a number
    w2 = w.copy()
    w2[3, 1] = np.nan
    out = np.asarray(jax.jit(fake_quant, static_argnums=1)(jnp.asarray(w2), parse_spec("int8")))
    assert np.isnan(out[:, 1]).all() and np.isfinite(np.delete(out, 1, axis=1)).all()


def test_shape_and_dtype_errors():
    with pytest.raises(UserError, match="2-D"):
        fake_quant(jnp.ones((4,)), "int8")
    with pytest.raises(UserError, match="floating"):
        fake_quant(jnp.ones((4, 4), jnp.int32), "int8")


# ---------------------------------------------------------------- grammar


def test_parse_spec_grammar():
    assert parse_spec("nvfp4") == QuantSpec("nvfp4", None)
    assert parse_spec("nvfp4@128").key == "fmt=nvfp4;blk=na"
    assert parse_spec("nvfp4@16").key == "fmt=nvfp4;blk=na"
    assert parse_spec("fp4@128").key == "fmt=fp4;blk=128"
    assert parse_spec("fp4@in").key == "fmt=fp4;blk=in"
    assert parse_spec(" FP4@OUT ").key == "fmt=fp4;blk=out"
    assert parse_spec("int4@128") == QuantSpec("int4", 128)
    assert parse_spec("int8").key == "fmt=int8;blk=na"
    assert QuantSpec("mxfp4", 64).blk is None
    assert parse_specs("nvfp4@128,fp4@128,fp4@in") == (
        QuantSpec("nvfp4"),
        QuantSpec("fp4", 128),
        QuantSpec("fp4", "in"),
    )
    assert str(parse_spec("fp4@128")) == "fp4@128"
    assert {QuantSpec("fp4", 128): 1}[parse_spec("fp4@128")] == 1  # hashable, equal
    assert set(FORMATS) >= {
        "fp4",
        "fp6",
        "fp8",
        "nvfp4",
        "mxfp4",
        "mxfp6_e3m2",
        "mxfp6_e2m3",
        "mxfp8",
        "fp8_e4m3",
        "fp8_e5m2",
        "int4",
        "int8",
    }


@pytest.mark.parametrize(
    "bad", ["fp4", "fp5@in", "fp4@0", "fp4@-8", "fp4@x", "nvfp4@@1", "", "fp4@in@out", "int4@1.5"]
)
def test_parse_spec_errors(bad):
    with pytest.raises(UserError, match=r"--qspecs: .*valid: fp4@in"):
        parse_spec(bad)


def test_parse_specs_errors():
    with pytest.raises(UserError, match="--ranks"):
        parse_specs("nvfp4,,fp4@in", arg="--ranks")
    with pytest.raises(UserError, match="repeats"):
        parse_specs("nvfp4@128,nvfp4")
    with pytest.raises(UserError, match="blk"):
        QuantSpec("fp4", 0)
    with pytest.raises(UserError, match="valid"):
        QuantSpec("fp16", None)


# ---------------------------------------------------------------- qwix as an independent oracle


def _close_to(ours: np.ndarray, theirs: np.ndarray, step: np.ndarray):
    """Equal but for rare one-grid-step differences: qwix divides by a broadcast scale, which
    XLA turns into a multiplication by the reciprocal (an ulp off, which moves exact ties)."""
    diff = np.abs(ours - theirs)
    assert np.mean(diff == 0) > 0.99
    assert np.all(diff <= step * (1 + 1e-6))


def test_against_qwix(weight):
    qwix_q = pytest.importorskip("qwix._src.core.qarray")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    # FP8 E4M3FN, one scale per tensor: qwix's absmax / 448
    ours = np.asarray(fake_quant(jnp.asarray(w), "fp8_e4m3"))
    theirs = np.asarray(qwix_q.dequantize(qwix_q.quantize_api(jnp.asarray(w), jnp.float8_e4m3fn)))
    _close_to(ours, theirs, np.abs(ours) / 8 + 1e-30)
    # MXFP4 / MXFP8: qwix scales by 2**ceil(log2(amax / elem_max)), the OCP rule by
    # 2**(floor(log2 amax) - emax_elem); the two agree when amax = elem_max * 2**k, so give
    # every block such an entry (larger than the block's other entries)
    for fmt, emax, qt, lo in (("mxfp4", 6.0, "mxfp4", 0), ("mxfp8", 448.0, "mxfp8", -6)):
        wb = w.copy()
        wb[::32, :] = emax * 2.0 ** rng.integers(lo, lo + 4, size=(2, 24))
        ours = np.asarray(fake_quant(jnp.asarray(wb), fmt))
        qa = qwix_q.quantize_api(jnp.asarray(wb), qt, tiled_axes={0: 32}, channelwise_axes=(1,))
        _close_to(ours, np.asarray(qwix_q.dequantize(qa)), np.abs(ours) / 2 + 1e-30)
    # NVFP4: qwix has no tensor scale (E4M3 block scale of amax_b / 6); with amax = 6 * 448
    # ours is exactly 1, so the two coincide
    wb = w.copy()
    wb[0, 0] = 6 * 448.0
    ours = np.asarray(fake_quant(jnp.asarray(wb), "nvfp4"))
    assert float(quantize(jnp.asarray(wb), "nvfp4").global_scale[0]) == 1.0
    qa = qwix_q.quantize_api(jnp.asarray(wb), "nvfp4", tiled_axes={0: 16}, channelwise_axes=(1,))
    _close_to(ours, np.asarray(qwix_q.dequantize(qa)), np.abs(ours) / 2 + 1e-30)


def test_vmap_is_bit_exact():
    """Batched (svdq_grid, eval_grid) and one-by-one quantization give the same bits: the true
    division survives vmap's batching (XLA would turn a division by a broadcast into a
    multiplication by the reciprocal, off by one ulp)."""
    w = np.random.default_rng(0).standard_normal((3, 64, 48)).astype(np.float32)
    for spec in ("nvfp4", "fp4@in", "fp8_e4m3", "int8", "fp4@16", "mxfp6_e2m3"):
        batched = np.asarray(jax.jit(jax.vmap(lambda x, s=spec: fake_quant(x, s)))(w))
        for i in range(3):
            np.testing.assert_array_equal(batched[i], np.asarray(fake_quant(w[i], spec)), spec)


def test_differentiable_for_straight_through_training():
    """The exact division keeps a JVP (a custom_vmap alone has none): the straight-through
    estimator ``w + stop_gradient(fake_quant(w) - w)`` trains, also under vmap."""
    w = np.random.default_rng(1).standard_normal((2, 32, 8)).astype(np.float32)

    def loss(x):
        q = x + jax.lax.stop_gradient(jax.vmap(lambda v: fake_quant(v, "nvfp4"))(x) - x)
        return jnp.sum(q**2)

    want = 2 * np.stack([np.asarray(fake_quant(w[i], "nvfp4")) for i in range(2)])
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(jnp.asarray(w))), want, rtol=1e-6)
    assert np.isfinite(float(jax.grad(lambda x: jnp.sum(fake_quant(x, "int8") ** 2))(w[0]).sum()))
