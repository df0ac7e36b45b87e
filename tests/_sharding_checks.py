"""Sharded vs single-device runs on 8 host CPU devices, for tests/test_sharding.py.

Run as ``python tests/_sharding_checks.py MODEL_DIR REFS_DIR`` (the test sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, so the rest of the
suite keeps one device). Prints one JSON object: differences, specs and error messages; the
parent test asserts on them. Every single-device reference runs on the unsharded params on
one device, so each comparison is sharded code against the plain code path. The one-device
references of the two-process run (``--multihost``) are computed here once and written to
``REFS_DIR`` (``forward.npy``, ``sparge.npz``, the ``quant`` export), or returned (the
perplexity, eigen and GED reports).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jcompress  # noqa: E402
from jcompress import sharding  # noqa: E402
from jcompress.calibration import (  # noqa: E402
    GroupedGram,
    grouped_gram_init,
    grouped_gram_update,
    stream_layers,
)
from jcompress.eigen_attention import EigenAttentionConfig  # noqa: E402
from jcompress.eigen_attention import compress as eigen_compress  # noqa: E402
from jcompress.errors import UserError  # noqa: E402
from jcompress.models.forward import Capture  # noqa: E402


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def spec_of(x) -> list | None:
    if not isinstance(x.sharding, jax.sharding.NamedSharding):
        return None
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def error_of(fn) -> str | None:
    try:
        fn()
    except UserError as e:
        return str(e)
    return None


def grams(cfg, params, calib, heads, offload_dir=None):
    """k_proj output Grams of layers 0 and 1 through the layer stream, plus the sharding of
    each layer's inputs and of the captured features."""
    out, specs = [], {}
    stream = stream_layers(cfg, params, calib, batch_size=4, offload_dir=offload_dir)
    for layer in stream:
        acc = GroupedGram(n=calib.shape[0], avg_dim=2, heads=heads)
        for ob in layer.observe(Capture(outputs="self_attn/k_proj")):
            feats = ob.captured["outputs"]["self_attn/k_proj"]
            if ob.batch == 0:
                specs[layer.index] = {"inputs": spec_of(ob.inputs), "k_proj": spec_of(feats)}
            acc.add((feats,), ob.real)
        out.append(np.asarray(acc.gram))
        if layer.index == 1:
            stream.close()
            break
    return out, specs


def main(model_dir: str, refs: str) -> dict:
    res: dict = {"devices": jax.device_count()}
    cfg, params = jcompress.load_hf(model_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 24)).astype(np.int32)
    ref = np.asarray(jcompress.forward(cfg, params, ids))

    # --- forward on three meshes; params really sharded
    res["forward"] = {}
    for spec in ("data=2,model=4", "data=8", "data=4,model=2"):
        mesh = sharding.make_mesh(spec)
        sp = sharding.shard_params(params, cfg, mesh)
        out = jcompress.forward(cfg, sp, sharding.shard_batch(ids, mesh))
        res["forward"][spec] = {"max_diff": max_diff(out, ref), "out_spec": spec_of(out)}
        if spec == "data=2,model=4":
            q0 = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
            q = sp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
            k = sp["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
            res["params"] = {
                "q_spec": spec_of(q),
                "q_shard_shape": list(q.addressable_shards[0].data.shape),
                "k_shard_shape": list(k.addressable_shards[0].data.shape),
                "o_spec": spec_of(sp["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]),
                "down_spec": spec_of(sp["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]),
                "up_spec": spec_of(sp["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]),
                "embed_spec": spec_of(sp["model"]["embed_tokens"]["embedding"]),
                "norm_spec": spec_of(sp["model"]["norm"]["scale"]),
                "lm_head_spec": spec_of(sp["lm_head"]["kernel"]),
                "equal_values": max_diff(q, q0),
            }
            # 200 tokens: past one tile, where one device takes chunked's row-block path
            # (a lax.map over rows and heads, which XLA would gather for); sharded inputs
            # take the paired tiles instead, with no all-gather in the attention
            from jcompress.models.attention import Chunked, causal_mask, fit_to_devices

            long_ids = rng.integers(0, cfg.vocab_size, (8, 200)).astype(np.int32)
            long_ref = np.asarray(jcompress.forward(cfg, params, long_ids))
            long_out = jcompress.forward(cfg, sp, sharding.shard_batch(long_ids, mesh))
            qs = jax.device_put(
                rng.standard_normal((8, 200, 8, 16)).astype(np.float32),
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model")),
            )
            ks = jax.device_put(np.asarray(qs)[:, :, :4], qs.sharding)

            def gathers(impl, qa, ka):
                def attend(qx, kx):
                    return impl(qx, kx, kx, causal_mask(jnp.ones((8, 200), bool)), scale=0.25)

                return jax.jit(attend).lower(qa, ka).compile().as_text().count("all-gather")

            res["rows"] = {
                "max_diff": max_diff(long_out, long_ref),
                "fitted_row_blocks": fit_to_devices(Chunked(), sp).row_blocks,
                "one_device_row_blocks": fit_to_devices(Chunked(), params).row_blocks,
                "gathers_fitted": gathers(fit_to_devices(Chunked(), qs), qs, ks),
                "gathers_rows": gathers(Chunked(), qs, ks),
            }

    # --- errors: model axis over 4 KV heads, batch over data, device count
    m8, m24 = sharding.make_mesh("model=8"), sharding.make_mesh("data=2,model=4")
    res["errors"] = {
        "kv_heads": error_of(lambda: sharding.shard_params(params, cfg, m8)),
        "batch": error_of(lambda: sharding.shard_batch(ids[:3], m24)),
        "count": error_of(lambda: sharding.make_mesh("data=2,model=2")),
        "subset": error_of(lambda: sharding.make_mesh("data=2,model=2", jax.devices()[:4])),
    }

    # --- perplexity: explicit mesh= and an enclosing use_mesh
    stream_ids = rng.integers(0, cfg.vocab_size, 400).astype(np.int32)
    kw = dict(seqlen=32, max_windows=10, batch_size=4, progress=False)
    p1 = jcompress.perplexity(cfg, params, stream_ids, **kw)
    mesh = sharding.make_mesh("data=2,model=4")
    p2 = jcompress.perplexity(cfg, params, stream_ids, mesh=mesh, **kw)
    with sharding.use_mesh(sharding.make_mesh("data=4,model=2")):
        p3 = jcompress.perplexity(cfg, params, stream_ids, **kw)
    res["ppl"] = {
        "single": p1.ppl,
        "mesh": p2.ppl,
        "use_mesh": p3.ppl,
        "nll_diff": max(max_diff(p2.nlls, p1.nlls), max_diff(p3.nlls, p1.nlls)),
        "windows": [p1.n_windows, p2.n_windows],
    }

    # --- calibration Grams through the layer stream (a sharded reduction over data)
    calib = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    g1, _ = grams(cfg, params, calib, cfg.num_kv_heads)
    with sharding.use_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
        g2, specs = grams(cfg, params, calib, cfg.num_kv_heads)
        g3, specs3 = grams(cfg, params, calib, cfg.num_kv_heads, offload_dir=tmp)
    res["gram"] = {
        "offload_rel_diff": max(rel_diff(a, b) for a, b in zip(g3, g1, strict=True)),
        "offload_specs": specs3,
        "rel_diff": max(rel_diff(a, b) for a, b in zip(g2, g1, strict=True)),
        "specs": specs,
    }
    x = sharding.shard_batch(jnp.ones((4, 16, cfg.num_kv_heads * cfg.head_dim)), mesh)
    state = grouped_gram_init(cfg.num_kv_heads, 16, cfg.num_kv_heads * cfg.head_dim)
    hlo = (
        grouped_gram_update.lower(state, (x,), jnp.int32(0), jnp.int32(4), avg_dim=1)
        .compile()
        .as_text()
    )
    res["gram"]["hlo_all_reduce"] = "all-reduce" in hlo

    # --- EigenAttention under the mesh == single device
    config = EigenAttentionConfig(avg_dim=2, batch_size=4, layers=("model/layers/0",))
    e1, r1 = eigen_compress(params, cfg, calib, config=config, progress=False)
    with sharding.use_mesh(mesh):
        e2, r2 = eigen_compress(params, cfg, calib, config=config, progress=False)
    d1, d2 = jcompress.materialize(e1), jcompress.materialize(e2)
    res["eigen"] = {
        "ranks_single": [[lr.rank_kq, lr.rank_v, lr.threshold] for lr in r1.layers],
        "ranks_mesh": [[lr.rank_kq, lr.rank_v, lr.threshold] for lr in r2.layers],
        "kernel_rel_diff": max(
            rel_diff(a, b) for a, b in zip(jax.tree.leaves(d2), jax.tree.leaves(d1), strict=True)
        ),
    }
    # typed leaves placed by their handlers, and the forward on them still equal
    se = sharding.shard_params(e1, cfg, mesh)
    kl = se["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    ol = se["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]
    res["eigen"]["leaf_specs"] = {
        "type": type(kl).__name__,
        "a": spec_of(kl.a),
        "b": spec_of(kl.b),
        "o_type": type(ol).__name__,
        "o_w": spec_of(getattr(ol, "w", ol)),
    }
    ref_e = np.asarray(jcompress.forward(cfg, e1, ids))
    res["eigen"]["forward_max_diff"] = max_diff(
        jcompress.forward(cfg, se, sharding.shard_batch(ids, mesh)), ref_e
    )

    res["methods"] = method_checks(cfg, params, calib, mesh)
    res["tokenwise"] = tokenwise_checks()

    # --- the CLI: `generate`, `ppl`, `tokenwise`, `sparge tune` and `run` with --mesh, called
    # in-process; `eigen` and `ged` on one device (the two-process run's references)
    res["cli"] = cli_checks(model_dir, cfg, params, Path(refs))
    return res


def tokenwise_checks() -> dict:
    """tokenwise_metrics over ``data`` (``mesh=``; 150 tokens in chunks of 7, rounded up to 8
    over data=8) == one device == numpy (the current-mesh path: the tokenwise CLI below)."""
    from jcompress.quant.tokenwise import METRIC_KEYS, tokenwise_metrics

    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    w = rng.standard_normal((12, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    y = x @ w + b
    ws = np.stack([w + 0.01 * rng.standard_normal(w.shape), 0.5 * w]).astype(np.float32)
    single = tokenwise_metrics(x, y, ws, b, chunk_tokens=7)
    mesh = sharding.make_mesh("data=8")
    got = {"data=8": tokenwise_metrics(x, y, ws, b, chunk_tokens=7, mesh=mesh)}
    d = x.astype(np.float64) @ ws[1].astype(np.float64) + b - y
    return {
        "rel_diff": max(
            abs(g[k][key] - single[k][key]) / max(abs(single[k][key]), 1e-30)
            for g in got.values()
            for k in range(2)
            for key in METRIC_KEYS
        ),  # fmt: skip
        "n_tokens": [g[0]["n_tokens"] for g in got.values()],
        "sse_numpy_rel": abs(got["data=8"][1]["sse"] - (d * d).sum()) / (d * d).sum(),
    }


def method_checks(cfg, params, calib, mesh) -> dict:
    """Tucker-MPS (streamed covariances), SpargeAttn tuning (q/k/v probe through the stream)
    and the tokenwise X/Y capture under ``use_mesh`` == one device."""
    from safetensors.numpy import load_file

    from jcompress.quant.tokenwise import SaveXYConfig, save_xy
    from jcompress.sparge.tune import SpargeTuneConfig, tune
    from jcompress.tucker import TuckerConfig, Variant
    from jcompress.tucker import compress as tucker_compress

    out = {}
    tc = TuckerConfig(
        variant=Variant("tucker_mps"), layers=("model/layers/0/self_attn/[kv]_proj",), batch_size=4
    )
    t1, r1 = tucker_compress(params, cfg, calib, config=tc, progress=False)
    with sharding.use_mesh(mesh):
        t2, r2 = tucker_compress(params, cfg, calib, config=tc, progress=False)
    m1, m2 = jax.tree.leaves(jcompress.materialize(t1)), jax.tree.leaves(jcompress.materialize(t2))
    out["tucker_mps_rel_diff"] = max(rel_diff(a, b) for a, b in zip(m2, m1, strict=True))
    out["tucker_mps_types"] = [
        type(t2["model"]["layers"]["0"]["self_attn"][r]["kernel"]).__name__
        for r in ("k_proj", "v_proj")
    ]

    win = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    sc = SpargeTuneConfig(block_q=16, block_k=16, batch_size=4, sim_grid=4, cdf_steps=2,
                          pv_steps=0)  # fmt: skip
    p1, _ = tune(cfg, params, win, sc, progress=False)
    with sharding.use_mesh(mesh):
        p2, _ = tune(cfg, params, win, sc, progress=False)
    out["sparge_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
        for a, b in zip(p1, p2, strict=True)
    )

    with tempfile.TemporaryDirectory() as tmp:
        xc = SaveXYConfig(save_dtype="fp32", batch_size=4)
        f1 = save_xy(cfg, params, calib, tmp, "one", config=xc, progress=False)
        with sharding.use_mesh(mesh):
            f2 = save_xy(cfg, params, calib, tmp, "mesh", config=xc, progress=False)
        x1, x2 = load_file(str(f1)), load_file(str(f2))
    out["xy_keys_equal"] = sorted(x1) == sorted(x2) and len(x1) > 0
    out["xy_rel_diff"] = max(rel_diff(x2[k], x1[k]) for k in x1)
    return out


def cli_checks(model_dir: str, cfg, params, refs: Path) -> dict:
    import contextlib
    import io
    from pathlib import Path

    from jcompress.cli import main as cli
    from jcompress.cli.common import load_tokenizer_for
    from jcompress.data import load_tokens

    def run(argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli(argv)
        return rc, out.getvalue()

    leaked = []  # a command's --mesh must end with the command
    gen = ["generate", "--model", model_dir, "--prompt", "The tower is", "--max-new-tokens", "6"]
    rc1, text1 = run(gen)
    rc2, text2 = run([*gen, "--mesh", "data=2,model=4"])
    leaked.append(sharding.current_mesh() is not None)
    text = Path(jcompress.__file__).parent / "assets" / "wikitext2_test_excerpt.txt"
    ids = load_tokens(text, load_tokenizer_for(model_dir, "--model", cfg))
    kw = dict(seqlen=32, max_windows=8, batch_size=4, progress=False)
    ref = jcompress.perplexity(cfg, params, ids, **kw)
    # the one-device references of the two-process run (computed once, here): the logits of
    # its text batch (the shape of main()'s forward, compiled) and the SpargeAttn thresholds
    np.save(refs / "forward.npy", np.asarray(jcompress.forward(cfg, params, text_batch(ids))))
    sparge_ref = _sparge_reference(cfg, params, ids)
    np.savez(refs / "sparge.npz", **sparge_ref._asdict())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ppl.json"
        argv = ["ppl", "--model", model_dir, "--data", str(text), "--seqlen", "32",
                "--max-windows", "8", "--batch-size", "4", "--json", str(out)]  # fmt: skip
        rc3, _ = run([*argv, "--mesh", "data=2,model=4"])
        leaked.append(sharding.current_mesh() is not None)
        got = json.loads(out.read_text()) if out.exists() else {}
        eigen = eigen_cli(run, model_dir, Path(tmp))
        leaked.append(sharding.current_mesh() is not None)
        tokenwise = tokenwise_cli(run, model_dir, Path(tmp))
        leaked.append(sharding.current_mesh() is not None)
        sparge = sparge_cli(run, model_dir, Path(tmp), cfg, sparge_ref, text)
        leaked.append(sharding.current_mesh() is not None)
        recipe = run_cli(run, model_dir, Path(tmp), text)
        leaked.append(sharding.current_mesh() is not None)
        ged = ged_cli(run, model_dir, Path(tmp))
        leaked.append(sharding.current_mesh() is not None)
    # the one-device export the two-process `quant apply --mesh` must match byte for byte
    quant_ref_rc, _ = run(["quant", "apply", "--model", model_dir, *QUANT_ARGS, "--out",
                           str(refs / "quant")])  # fmt: skip
    rc4 = run(["ppl", "--model", model_dir, "--data", str(text), "--mesh", "model=8"])[0]
    rc5 = run(["ppl", "--model", model_dir, "--data", str(text), "--batch-size", "3",
               "--mesh", "data=2,model=4"])[0]  # fmt: skip
    return {
        "generate_rc": [rc1, rc2],
        "generate_same": text1 == text2 and len(text1) > 0,
        "ppl_rc": rc3,
        "ppl": got.get("ppl"),
        "ppl_ref": ref.ppl,
        "ppl_mesh": got.get("mesh"),
        "bad_mesh_rc": [rc4, rc5],
        "mesh_leaked": leaked,
        "eigen": eigen,
        "tokenwise": tokenwise,
        "sparge": sparge,
        "run": recipe,
        "ged": ged,
        "quant_ref_rc": quant_ref_rc,
    }


EIGEN_ARGS = ["--calib_data", str(Path(jcompress.__file__).parent / "assets" /
                                  "wikitext2_valid_excerpt.txt"),
              "--nsamples", "8", "--seqlen", "16", "--batch_size", "4", "--avg_dim", "2",
              "--layers", "model/layers/0", "--max_new_tokens", "4"]  # fmt: skip
"""``jcompress eigen`` flags of :func:`eigen_cli` and of the two-process run (whose test
compares its report with :func:`eigen_cli`'s one-device run)."""


def eigen_cli(run, model_dir: str, tmp) -> dict:
    """``jcompress eigen`` on one device: the report (ranks, layer errors, the greedy sample
    after compression; the same calibration shapes as the library run above, so most programs
    are compiled already; no perplexity rows: ``ppl --mesh`` is checked on its own), the
    reference of the two-process ``eigen --mesh data=2,model=4`` run (which checks the CLI's
    mesh path; the library's under a mesh without offloading: ``main`` and ``run --mesh``)."""
    path = tmp / "eigen-one.json"
    rc, _ = run(["eigen", "--model", model_dir, *EIGEN_ARGS, "--json", str(path)])
    return {"rc": rc, "one": json.loads(path.read_text()) if path.exists() else {}}


def tokenwise_cli(run, model_dir: str, tmp) -> dict:
    """``jcompress tokenwise save_xy --mesh data=8`` of 4 windows (fewer than the data axis:
    one batch padded to 8 rows) against the same on one device: the same captures; then
    ``eval_fake`` on that cache on one device and with ``--mesh data=8`` (chunks of 20 tokens
    rounded up to 24): the same metrics."""
    from safetensors.numpy import load_file

    from jcompress.quant.tokenwise import METRIC_KEYS

    small = ["--cn", "2", "--eu", "2", "--length", "16", "--save_dtype", "fp32", "--batch_size",
             "8"]  # fmt: skip
    rcs, results = [], []
    save = ["tokenwise", "save_xy", "--model_dir", model_dir, "--save_path", str(tmp), *small]
    rc1, _ = run([*save, "--label", "xy", "--mesh", "data=8"])
    rc0, _ = run([*save, "--label", "xy1"])
    rcs += [rc1, rc0]
    xy = [load_file(str(tmp / f"{n}.safetensors")) if r == 0 else {}
          for n, r in (("xy1", rc0), ("xy", rc1))]  # fmt: skip
    for name, mesh in (("one", []), ("mesh", ["--mesh", "data=8"])):
        out = tmp / f"tw-{name}.json"
        rc2, _ = run(["tokenwise", "eval_fake", "--model_dir", model_dir, "--xy_path",
                      str(tmp / "xy.safetensors"), "--out_json", str(out), "--ranks", "4",
                      "--qspecs", "nvfp4", "--chunk_tokens", "20", *mesh])  # fmt: skip
        rcs.append(rc2)
        results.append(json.loads(out.read_text()) if out.exists() else {})

    def metrics(obj, acc):  # every metric value in the result, in document order
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in METRIC_KEYS and isinstance(v, (int, float)):
                    acc.append(float(v))
                else:
                    metrics(v, acc)
        elif isinstance(obj, list):
            for v in obj:
                metrics(v, acc)
        return acc

    m1, m2 = metrics(results[0], []), metrics(results[1], [])
    return {
        "rc": rcs,
        "save_keys_equal": sorted(xy[0]) == sorted(xy[1]) and len(xy[0]) > 0,
        "save_rel_diff": max(
            (rel_diff(xy[1][k], xy[0][k]) for k in xy[0] if k in xy[1]), default=None
        ),
        "n_metrics": [len(m1), len(m2)],
        "rel_diff": max(
            (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(m1, m2, strict=False)), default=None
        ),
    }


def sparge_cli(run, model_dir: str, tmp, cfg, ref, text) -> dict:
    """``jcompress sparge tune --mesh data=2,model=4`` against ``ref``, the library's one-device
    run (:func:`_sparge_reference`): the same per-head thresholds in the written file."""
    from jcompress.sparge import load_params

    out = tmp / "sparge.safetensors"
    rc, _ = run(["sparge", "tune", "--model", model_dir, "--data", str(text), "--out", str(out),
                 *SPARGE_ARGS, "--mesh", "data=2,model=4"])  # fmt: skip
    got = load_params(out, layers=cfg.num_layers, heads=cfg.num_heads)[0] if rc == 0 else None
    return {
        "rc": rc,
        "equal": rc == 0 and sparge_equal(got, ref),
        "shape": None if got is None else list(np.shape(got.cdfthreshd)),
    }


SPARGE_ARGS = [
    "--block_q",
    "16",
    "--block_k",
    "16",
    "--batch_size",
    "4",
    "--sim_grid",
    "4",
    "--cdf_steps",
    "2",
    "--pv_steps",
    "0",
    "--nsamples",
    "4",
    "--seqlen",
    "32",
]
"""The ``sparge tune`` settings of :func:`sparge_cli` and :func:`multihost`."""


def _sparge_reference(cfg, params, ids):
    """The library's one-device :func:`~jcompress.sparge.tune.tune` of :data:`SPARGE_ARGS` on
    ``--data``'s windows (its tokens ``ids`` drawn with the config's seed; the shapes and
    settings of :func:`method_checks`, compiled there): what ``sparge tune`` must write."""
    from jcompress.data import calibration_windows
    from jcompress.sparge.tune import SpargeTuneConfig, tune

    sc = SpargeTuneConfig(block_q=16, block_k=16, batch_size=4, sim_grid=4, cdf_steps=2,
                          pv_steps=0, nsamples=4, seqlen=32)  # fmt: skip
    ref, _ = tune(cfg, params, calibration_windows(ids, 4, 32, seed=sc.seed), sc, progress=False)
    return ref


def sparge_equal(got, ref) -> bool:
    """Two sets of SpargeAttn thresholds (``SpargeParams`` or their ``_asdict()``), exactly."""
    got, ref = (x._asdict() if hasattr(x, "_asdict") else x for x in (got, ref))
    return set(got) == set(ref) and all(
        np.array_equal(np.asarray(got[k]), np.asarray(ref[k]), equal_nan=True) for k in ref
    )


def text_batch(ids):
    """The two-process run's forward batch: the first 8 x 24 tokens of its text."""
    return np.asarray(ids[: 8 * 24], np.int32).reshape(8, 24)


RUN_RECIPE = [
    {"method": "eigen", "avg_dim": 2, "batch_size": 4, "layers": ["model/layers/0"]},
    {"method": "quant", "rules": {"model/layers/0/mlp/.*": "nvfp4"}},
]
"""The ``jcompress run`` recipe of :func:`run_cli`: EigenAttention on layer 0 (the shapes of
:data:`EIGEN_ARGS`, compiled already), then NVFP4 on that layer's MLP kernels."""


def run_cli(run, model_dir: str, tmp, text) -> dict:
    """``jcompress run RECIPE`` (:data:`RUN_RECIPE`) on one device and with ``--mesh
    data=2,model=4``: the reports (per step: ranks and layer errors, the quantized kernels,
    the perplexity after it) and the factor exports (every leaf, materialized) of both."""
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps(RUN_RECIPE))
    argv = ["run", str(recipe), "--model", model_dir, *EIGEN_ARGS[:6], "--eval_data", str(text),
            "--eval_seqlen", "32", "--eval_max_windows", "8"]  # fmt: skip
    rcs, reps, kernels = [], [], []
    for name, extra in (("one", []), ("mesh", ["--mesh", "data=2,model=4"])):
        out = tmp / f"run-{name}"
        rc, _ = run([*argv, *extra, "--out", str(out)])
        rcs.append(rc)
        ok = rc == 0 and (out / "report.json").exists()
        reps.append(json.loads((out / "report.json").read_text()) if ok else {})
        kernels.append(jax.tree.leaves(jcompress.materialize(jcompress.load_hf(out / "factors")[1]))
                       if ok else [])  # fmt: skip
    steps = [rep.get("steps", []) for rep in reps]

    def ppls(rep):
        return [rep.get("before", {}).get("ppl", {}).get("ppl")] + [
            s.get("ppl", {}).get("ppl") for s in rep.get("steps", [])
        ]

    def eigen_rows(st):
        rows = st[0]["report"]["layers"] if st else []
        return [[r.get(k) for k in ("rank_kq", "rank_v", "threshold", "error")] for r in rows]

    return {
        "rc": rcs,
        "methods": [[s.get("method") for s in st] for st in steps],
        "ppl": [ppls(rep) for rep in reps],
        "eigen": [eigen_rows(st) for st in steps],
        "quant_paths": [
            sorted(r.get("path") for r in st[1]["report"]["layers"]) if len(st) > 1 else []
            for st in steps
        ],
        "n_leaves": [len(k) for k in kernels],
        "factors_rel_diff": max(
            (rel_diff(a, b) for a, b in zip(kernels[1], kernels[0], strict=True)), default=None
        ),
    }


GED_ARGS = ["ged", "--model", "--layer", "0", "--n_permutations", "4", "--n_folds", "2",
            "--batch_size", "32", "--quiet"]  # fmt: skip
"""``jcompress ged`` of :func:`ged_cli` and :func:`multihost` (the model dir after ``--model``)."""


def ged_cli(run, model_dir: str, tmp) -> dict:
    """``jcompress ged --layer 0`` on the bundled him / her sets on one device: the report,
    the reference of the two-process ``ged --mesh data=2,model=4`` run (the capture stream
    sharded over both processes, read through ``to_host``; the fits on the host)."""
    out = tmp / "ged-one"
    rc, _ = run([*GED_ARGS[:2], model_dir, *GED_ARGS[2:], "--out", str(out)])
    path = out / "report.json"
    return {"rc": rc, "report": json.loads(path.read_text()) if rc == 0 and path.exists() else {}}


def exchange_timeouts(sync: Path) -> list[str | None]:
    """A process that gives up waiting at an exchange (``JCOMPRESS_MULTIHOST_TIMEOUT`` of
    half a second) and the one it waited for get the same one-line error, both ways: the
    others wait for process 0's ``on_writer`` work, then process 0 for process 1 at
    ``agree``. The late side goes on only once the other has given up (a file in ``sync``),
    so the order is certain; afterwards the exchanges are still in step."""
    import time

    from jcompress import atomic

    me = jax.process_index()
    sync.mkdir(exist_ok=True)

    def wait_for(name):
        deadline = time.monotonic() + 120
        while not (sync / name).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(name)
            time.sleep(0.02)

    def late_writer():
        wait_for("gave-up-0")
        return "written"

    got: list[str | None] = []
    os.environ[atomic.TIMEOUT_VAR] = "0.5"
    try:
        for step in range(2):
            try:
                if step == 0:
                    atomic.on_writer(late_writer)
                else:
                    if me == 1:
                        wait_for("gave-up-1")
                    atomic.agree("same", arg="x")
                got.append(None)
            except atomic.ExchangeTimeout as e:
                got.append(str(e))
                if me != step:  # the side that waited: let the late one go on
                    (sync / f"gave-up-{step}").touch()
    finally:
        del os.environ[atomic.TIMEOUT_VAR]
    got.append(atomic.agree(7, arg="y"))  # the next exchange works
    return got


QUANT_ARGS = ["--rule", r".*mlp/.*=nvfp4", "--seqlen", "32", "--max_windows", "4",
              "--batch_size", "4"]  # fmt: skip
"""``jcompress quant apply`` flags of the two-process run (its one-device reference:
:func:`cli_checks`, into ``REFS_DIR/quant``)."""


def multihost(model_dir: str, out_dir: str, ckpt: str, refs: str) -> dict:
    """One of two processes (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` set by the test, 4 host devices each): ``jcompress ppl`` and
    ``jcompress quant apply`` with ``--mesh data=2,model=4`` over the 8 devices of both
    processes (the CLI starts the distributed runtime itself), both processes naming the same
    outputs (only process 0 may write them: a second writer would fail, they exist already),
    then a sharded forward gathered back (against the 8-device subprocess's one-device logits
    in ``refs``; its perplexity and thresholds are the test's references); ``jcompress
    eigen`` (offloaded activations) over both; what ``ppl`` printed here (process 0 alone
    prints); :func:`exchange_timeouts`. First of all ``jcompress convert`` (no
    ``--mesh``: it must start the runtime itself) of the one-process checkpoint ``ckpt`` to
    HF, and of the model to a checkpoint."""
    from pathlib import Path

    from jcompress import atomic
    from jcompress.cli import main as cli
    from jcompress.cli.common import load_tokenizer_for
    from jcompress.data import load_tokens

    text = Path(jcompress.__file__).parent / "assets" / "wikitext2_test_excerpt.txt"
    rc_convert = [
        cli(["convert", ckpt, str(Path(out_dir) / "convert_hf"), "--to", "hf"]),
        cli(["convert", model_dir, str(Path(out_dir) / "convert_ckpt"), "--to", "orbax"]),
    ]
    out = Path(out_dir) / "ppl.json"
    # only process 0 prints (report and progress); the other, nothing
    ppl_out, ppl_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(ppl_out), contextlib.redirect_stderr(ppl_err):
        rc = cli(["ppl", "--model", model_dir, "--data", str(text), "--seqlen", "32",
                  "--max-windows", "8", "--batch-size", "4", "--json", str(out),
                  "--mesh", "data=2,model=4"])  # fmt: skip
    # a calibrated method over both processes, its activations offloaded (each process
    # keeps its own rows): the test compares the report with a one-process run's
    with tempfile.TemporaryDirectory() as offload:
        rc_eigen = cli(["eigen", "--model", model_dir, *EIGEN_ARGS, "--offload_dir", offload,
                        "--mesh", "data=2,model=4", "--json",
                        str(Path(out_dir) / "eigen.json")])  # fmt: skip
    rc_quant = cli(["quant", "apply", "--model", model_dir, *QUANT_ARGS, "--mesh",
                    "data=2,model=4", "--out", str(Path(out_dir) / "quant"), "--json",
                    str(Path(out_dir) / "quant.json")])  # fmt: skip
    # the analyses whose captured batches span both processes (host reads via to_host):
    # SpargeAttn tuning and GED (the test compares the thresholds file and the report with the
    # 8-device subprocess's one-device runs)
    sparge_out = Path(out_dir) / "sparge.safetensors"
    rc_sparge = cli(["sparge", "tune", "--model", model_dir, "--data", str(text), "--out",
                     str(sparge_out), *SPARGE_ARGS, "--mesh", "data=2,model=4"])  # fmt: skip
    rc_ged = cli([*GED_ARGS[:2], model_dir, *GED_ARGS[2:], "--mesh", "data=2,model=4", "--out",
                  str(Path(out_dir) / "ged")])  # fmt: skip
    # streaming runs on process 0 (its work dir and output); the other waits, prints nothing
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc_stream = cli(["stream", "quant", "--model", model_dir, "--rule", QUANT_ARGS[1],
                         "--out", str(Path(out_dir) / "stream")])  # fmt: skip
    # process 0's one-line error, raised on every process: the output exists now; and
    # different outputs per process
    again = [["--json", str(out)], ["--json", str(Path(out_dir) / f"p{jax.process_index()}.json")]]
    errors = []
    for extra in again:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli(["ppl", "--model", model_dir, "--data", str(text), *extra,
                        "--mesh", "data=2,model=4"])  # fmt: skip
        errors.append([code, err.getvalue().strip().splitlines()[-1:]])
    timeouts = exchange_timeouts(Path(f"{out_dir}-sync"))
    res = {
        "rc": rc,
        "rc_eigen": rc_eigen,
        "printed": [ppl_out.getvalue(), ppl_err.getvalue()],
        "timeouts": timeouts,
        "errors": errors,
        "rc_convert": rc_convert,
        "rc_quant": rc_quant,
        "rc_stream": rc_stream,
        "rc_sparge": rc_sparge,
        "rc_ged": rc_ged,
        "stream_printed": "wrote " in printed.getvalue(),
        "writer": atomic.is_writer(),
        "sees_outputs": sorted(p.name for p in Path(out_dir).iterdir()),
        "processes": jax.process_count(),
        "devices": [jax.device_count(), jax.local_device_count()],
        "mesh_after_cli": sharding.current_mesh() is not None,
    }
    cfg, params = jcompress.load_hf(model_dir)
    ids = load_tokens(text, load_tokenizer_for(model_dir, "--model", cfg))
    res["ppl"] = json.loads(out.read_text())["ppl"] if out.exists() else None
    mesh = sharding.make_mesh("data=2,model=4")
    batch = text_batch(ids)
    logits = jcompress.forward(
        cfg, sharding.shard_params(params, cfg, mesh), sharding.shard_batch(batch, mesh)
    )
    res["fully_addressable"] = bool(logits.is_fully_addressable)
    ged_rep = Path(out_dir) / "ged" / "report.json"
    res["ged"] = json.loads(ged_rep.read_text()) if rc_ged == 0 and ged_rep.exists() else None
    # against the 8-device subprocess's one-device logits of the same batch
    res["forward_max_diff"] = max_diff(
        sharding.to_host(logits), np.load(Path(refs) / "forward.npy")
    )
    return res


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--multihost":
        print(json.dumps(multihost(sys.argv[1], *sys.argv[3:6])))
    else:
        print(json.dumps(main(sys.argv[1], sys.argv[2])))
