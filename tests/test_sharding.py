"""jcompress.sharding: mesh specs, the param rule table, and sharded == single-device runs.

The multi-device checks run once, in a separate Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``tests/_sharding_checks.py``), so the
rest of the suite keeps its one device; the tests here assert on that process's JSON output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _xla_flags import compile_bound_flags
from jax.sharding import PartitionSpec as P

from jcompress import sharding
from jcompress.errors import UserError
from jcompress.leaves import LowRank, Residual
from jcompress.models.convert import unflatten
from jcompress.models.families import spec_for
from jcompress.models.params import param_shapes
from jcompress.outputs import MARKER

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Where the 8-device subprocess writes the two-process run's one-device references."""
    return tmp_path_factory.mktemp("sharding-refs")


@pytest.fixture(scope="module")
def checks(llama_dir, refs):
    env = dict(os.environ)
    # the subprocesses compile much and run little (_xla_flags.compile_bound_flags)
    env["XLA_FLAGS"] = compile_bound_flags(
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sharding_checks.py"), str(llama_dir), str(refs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- in this process


@pytest.mark.parametrize(
    "spec, want",
    [
        ("data=2,model=4", {"data": 2, "model": 4}),
        (" model = 8 ", {"data": 1, "model": 8}),
        ("model=2,data=4", {"data": 4, "model": 2}),
        ("data=1", {"data": 1, "model": 1}),
    ],
)
def test_parse_mesh(spec, want):
    assert sharding.parse_mesh(spec) == want


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", ["--mesh", "data=N,model=M"]),
        ("data=2;model=4", ["--mesh", "data=N,model=M"]),
        ("data=2,", ["--mesh", "data=N,model=M"]),
        ("data=x", ["--mesh", "data=N,model=M"]),
        ("batch=2", ["--mesh", "unknown axis 'batch'", "data, model"]),
        ("data=2,data=2", ["--mesh", "'data' given twice"]),
        ("data=0", ["--mesh", "data=0", ">= 1"]),
        ("data=-1", ["--mesh", "data=N,model=M"]),
    ],
)
def test_parse_mesh_errors(spec, words):
    with pytest.raises(UserError) as e:
        sharding.parse_mesh(spec, arg="--mesh")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_make_mesh_needs_the_device_count():
    n = jax.device_count()
    with pytest.raises(UserError, match=rf"--mesh: data={2 * n},model=1 spans {2 * n} devices"):
        sharding.make_mesh(f"data={2 * n}", arg="--mesh")
    with pytest.raises(UserError, match="unknown axis 'pipe'"):
        sharding.make_mesh({"pipe": 1})
    mesh = sharding.make_mesh({"model": n})
    assert dict(mesh.shape) == {"data": 1, "model": n}


def _family_cfg(name):
    sys.path.insert(0, str(HERE))
    try:
        import _tiny
    finally:
        sys.path.remove(str(HERE))
    hf = _tiny.hf_config(name)
    return spec_for(hf.model_type).config_from_hf(hf.to_dict())


# the sharded params of layer 0 per family, written out by hand from the HF module names;
# every other path must be replicated
EXPECTED = {
    "llama": {
        "model/layers/0/self_attn/q_proj/kernel": (None, "model"),
        "model/layers/0/self_attn/k_proj/kernel": (None, "model"),
        "model/layers/0/self_attn/v_proj/kernel": (None, "model"),
        "model/layers/0/self_attn/o_proj/kernel": ("model",),
        "model/layers/0/mlp/gate_proj/kernel": (None, "model"),
        "model/layers/0/mlp/up_proj/kernel": (None, "model"),
        "model/layers/0/mlp/down_proj/kernel": ("model",),
        "lm_head/kernel": (None, "model"),
    },
    "opt": {
        "model/decoder/layers/0/self_attn/q_proj/kernel": (None, "model"),
        "model/decoder/layers/0/self_attn/q_proj/bias": ("model",),
        "model/decoder/layers/0/self_attn/k_proj/kernel": (None, "model"),
        "model/decoder/layers/0/self_attn/k_proj/bias": ("model",),
        "model/decoder/layers/0/self_attn/v_proj/kernel": (None, "model"),
        "model/decoder/layers/0/self_attn/v_proj/bias": ("model",),
        "model/decoder/layers/0/self_attn/out_proj/kernel": ("model",),
        "model/decoder/layers/0/fc1/kernel": (None, "model"),
        "model/decoder/layers/0/fc1/bias": ("model",),
        "model/decoder/layers/0/fc2/kernel": ("model",),
        "lm_head/kernel": (None, "model"),
    },
    "gpt2": {
        "transformer/h/0/attn/c_attn/q/kernel": (None, "model"),
        "transformer/h/0/attn/c_attn/q/bias": ("model",),
        "transformer/h/0/attn/c_attn/k/kernel": (None, "model"),
        "transformer/h/0/attn/c_attn/k/bias": ("model",),
        "transformer/h/0/attn/c_attn/v/kernel": (None, "model"),
        "transformer/h/0/attn/c_attn/v/bias": ("model",),
        "transformer/h/0/attn/c_proj/kernel": ("model",),
        "transformer/h/0/mlp/c_fc/kernel": (None, "model"),
        "transformer/h/0/mlp/c_fc/bias": ("model",),
        "transformer/h/0/mlp/c_proj/kernel": ("model",),
    },
    "mpt": {
        "transformer/blocks/0/attn/Wqkv/q/kernel": (None, "model"),
        "transformer/blocks/0/attn/Wqkv/k/kernel": (None, "model"),
        "transformer/blocks/0/attn/Wqkv/v/kernel": (None, "model"),
        "transformer/blocks/0/attn/out_proj/kernel": ("model",),
        "transformer/blocks/0/ffn/up_proj/kernel": (None, "model"),
        "transformer/blocks/0/ffn/down_proj/kernel": ("model",),
    },
}
EXPECTED["qwen3"] = EXPECTED["llama"]


def _shape_tree(cfg):
    return unflatten({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in param_shapes(cfg).items()})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rule_table_per_family(name):
    cfg = _family_cfg(name)
    mesh = sharding.make_mesh({"model": 1}, jax.devices()[:1])
    tree = _shape_tree(cfg)
    specs = sharding.param_shardings(tree, cfg, mesh)
    flat = {
        "/".join(str(k.key) for k in path): s.spec
        for path, s in jax.tree_util.tree_flatten_with_path(specs)[0]
    }
    assert set(flat) == set(param_shapes(cfg))
    for path, spec in flat.items():
        if "/1/" in path:  # layer 1 follows layer 0
            path0 = path.replace("/1/", "/0/")
            assert spec == flat[path0], path
            continue
        assert tuple(spec) == EXPECTED[name].get(path, ()), path


def test_user_rules_come_first():
    cfg = _family_cfg("llama")
    mesh = sharding.make_mesh({"model": 1}, jax.devices()[:1])
    rules = [("lm_head/kernel", P()), (r"model/embed_tokens/embedding", P("model", None))]
    specs = sharding.param_shardings(_shape_tree(cfg), cfg, mesh, rules=rules)
    assert specs["lm_head"]["kernel"].spec == P()  # default: vocab over model
    assert specs["model"]["embed_tokens"]["embedding"].spec == P("model")  # default: replicated
    assert specs["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "model")


def test_typed_leaf_children_follow_the_dense_spec():
    cfg = _family_cfg("llama")
    mesh = sharding.make_mesh({"model": 1}, jax.devices()[:1])
    tree = _shape_tree(cfg)
    s = jax.ShapeDtypeStruct
    attn = tree["model"]["layers"]["0"]["self_attn"]
    attn["q_proj"]["kernel"] = LowRank(s((32, 4), np.float32), s((4, 64), np.float32))
    attn["o_proj"]["kernel"] = LowRank(s((64, 4), np.float32), s((4, 32), np.float32))
    dense = s((32, 32), np.float32)
    lr = LowRank(s((32, 4), np.float32), s((4, 32), np.float32))
    attn["k_proj"]["kernel"] = Residual(lr, dense)
    specs = sharding.param_shardings(tree, cfg, mesh)
    a = specs["model"]["layers"]["0"]["self_attn"]
    q, o, k = a["q_proj"]["kernel"], a["o_proj"]["kernel"], a["k_proj"]["kernel"]
    assert (q.a.spec, q.b.spec) == (P(), P(None, "model"))  # columns live in b
    assert (o.a.spec, o.b.spec) == (P("model"), P())  # rows live in a
    assert (k.base.a.spec, k.base.b.spec) == (P(), P(None, "model"))  # nested: recursive
    assert k.residual.spec == P(None, "model")


def test_place_batch_without_mesh_is_a_plain_array():
    x = sharding.place_batch(np.arange(6).reshape(2, 3))
    assert isinstance(x, jax.Array) and x.shape == (2, 3)
    assert sharding.current_mesh() is None
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with sharding.use_mesh(mesh):
        assert sharding.current_mesh() is mesh
        assert sharding.place_batch(np.zeros((3, 2))).sharding.spec == P("data")
    assert sharding.current_mesh() is None
    with pytest.raises(UserError, match="mesh: expected a jax.sharding.Mesh"):
        with sharding.use_mesh("data=2"):
            pass


def test_one_process_is_the_writer(tmp_path):
    from jcompress import atomic

    assert atomic.process_count() == 1 and atomic.is_writer()
    assert atomic.agree({"out": "x"}, arg="--out") == {"out": "x"}
    assert atomic.on_writer(lambda: 7, path=tmp_path / "f") == 7
    with atomic.private_dir(marker=True) as d:
        assert d.is_dir() and (d / MARKER).is_file() and d.parent != tmp_path
        atomic.write_json(d / "r.json", {"a": 1})
        assert json.loads((d / "r.json").read_text()) == {"a": 1}
    assert not d.exists()


class _LateKV:
    """A stand-in for the coordination service's key-value store, as process 1 of 2 sees it:
    process 0's value lands just as process 1's wait runs out (the same value as process 1's,
    so ``agree`` holds)."""

    def __init__(self):
        self.store: dict[str, str] = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        if key in self.store and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
        self.store[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.store:
            self.store[key] = self.store[key[: key.rindex("/")] + "/1"]  # arrives now
            raise RuntimeError("DEADLINE_EXCEEDED: timed out")
        return self.store[key]

    def key_value_try_get(self, key):
        if key not in self.store:
            raise RuntimeError("NOT_FOUND")
        return self.store[key]


def test_a_value_arriving_at_the_deadline_is_used(monkeypatch):
    """The race a timeout has to settle: the waiter's deadline passes just as the value
    arrives. The value wins (it is used, not overwritten), so there is no error on either
    side."""
    from jax._src import distributed

    from jcompress import atomic

    kv = _LateKV()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(distributed.global_state, "client", kv)
    monkeypatch.setenv(atomic.TIMEOUT_VAR, "0.5")
    assert atomic.agree({"out": "x"}, arg="--out") == {"out": "x"}
    ((k0, v0), (k1, v1)) = sorted(kv.store.items())
    assert k0.endswith("/0") and k1.endswith("/1") and v0 == v1  # process 0's value kept


def test_initialize_distributed_needs_a_reason_and_checks_ids(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.initialize_distributed() is False  # nothing set, not forced: no-op
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(UserError, match="JAX_PROCESS_ID: 2 must be < JAX_NUM_PROCESSES=2"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(UserError, match="JAX_PROCESS_ID: expected an integer, got 'one'"):
        sharding.initialize_distributed()


# every command that runs (and may write) with the least argv that parses; the list is the
# oracle: a new subcommand must be added here, and so gets checked
COMMAND_ARGV = {
    "convert": ["convert", "src", "out", "--to", "hf"],
    "demo": ["demo"],
    "eigen": ["eigen", "--model", "m", "--calib_data", "c"],
    "ged": ["ged", "--model", "m", "--out", "o"],
    "generate": ["generate", "--model", "m", "--prompt", "hi"],
    "ppl": ["ppl", "--model", "m", "--data", "d"],
    "quant apply": ["quant", "apply", "--model", "m"],
    "quant check": ["quant", "check", "--json", "j", "--model", "m"],
    "run": ["run", "recipe.json", "--model", "m"],
    "sparge eval": ["sparge", "eval", "--model", "m", "--tuned", "t", "--data", "d"],
    "sparge tune": ["sparge", "tune", "--model", "m", "--data", "d", "--out", "o"],
    "stream eigen": ["stream", "eigen", "--model", "m", "--out", "o"],
    "stream quant": ["stream", "quant", "--model", "m", "--out", "o"],
    "stream tucker": ["stream", "tucker", "--model", "m", "--out", "o"],
    "tokenwise eval_fake": ["tokenwise", "eval_fake", "--model_dir", "m", "--xy_path", "x",
                            "--out_json", "o"],
    "tokenwise eval_smooth": ["tokenwise", "eval_smooth", "--smooth_model_dir", "m",
                              "--xy_path", "x", "--out_json", "o"],
    "tokenwise rank": ["tokenwise", "rank", "--json", "j"],
    "tokenwise save_xy": ["tokenwise", "save_xy", "--model_dir", "m", "--save_path", "s",
                          "--label", "l"],
    "tucker": ["tucker", "--model", "m"],
}  # fmt: skip


def test_every_command_is_listed():
    from jcompress.cli import build_parser, leaf_parsers

    assert sorted(" ".join(k) for k in leaf_parsers(build_parser())) == sorted(COMMAND_ARGV)


@pytest.mark.parametrize("name", sorted(COMMAND_ARGV))
def test_every_command_starts_multihost_first(monkeypatch, capsys, name):
    """``--distributed`` on every subcommand, one help text, and the runtime started (here: a
    stand-in that fails) before the command's own checks, through the one shared helper."""
    from jcompress.cli import build_parser, leaf_parsers, main

    argv = COMMAND_ARGV[name]
    parser = build_parser()
    assert parser.parse_args([*argv, "--distributed"]).distributed is True
    assert parser.parse_args(argv).distributed is False
    leaf = leaf_parsers(parser)[tuple(name.split())]
    (flag,) = [a for a in leaf._actions if "--distributed" in a.option_strings]
    assert flag.help == (
        "multi-host: jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / "
        "JAX_NUM_PROCESSES / JAX_PROCESS_ID or the cluster (automatic when "
        "JAX_COORDINATOR_ADDRESS is set); process 0 writes every output"
    )
    assert "--distributed" in leaf.format_help()
    calls = []

    def fake(force=False):
        calls.append(force)
        raise UserError("JAX_PROCESS_ID: stand-in")

    monkeypatch.setattr(sharding, "initialize_distributed", fake)
    assert main([*argv, "--distributed"]) == 2  # the bogus paths were never looked at
    assert capsys.readouterr().err == "jcompress: error: JAX_PROCESS_ID: stand-in\n"
    assert calls == [True]
    calls.clear()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    assert main(argv) == 2 and calls == [False]  # the environment alone: the helper decides
    capsys.readouterr()


# --------------------------------------------------------------------------- 8 devices


def test_subprocess_has_8_devices(checks):
    assert checks["devices"] == 8


@pytest.mark.parametrize("mesh", ["data=2,model=4", "data=8", "data=4,model=2"])
def test_forward_sharded_equals_single_device(checks, mesh):
    r = checks["forward"][mesh]
    assert r["max_diff"] < 1e-4  # logits are O(10): float32 reduction order only
    assert r["out_spec"][0] == "data"


def test_row_block_attention_gives_way_to_sharded_inputs(checks):
    """Inputs spread over devices take chunked's paired tiles (no all-gather of q / k / v);
    one device keeps the row-block path; the sharded forward still equals one device's."""
    r = checks["rows"]
    assert r["max_diff"] < 1e-4
    assert (r["fitted_row_blocks"], r["one_device_row_blocks"]) == (0, 32)
    assert r["gathers_fitted"] == 0 and r["gathers_rows"] > 0  # the cost avoided


def test_params_really_sharded(checks):
    p = checks["params"]
    assert p["q_spec"] == [None, "model"] and p["q_shard_shape"] == [128, 32]  # 8 heads / 4
    assert p["k_shard_shape"] == [128, 16]  # 4 kv heads of 16 over model=4: one head each
    assert p["o_spec"] == ["model"] and p["down_spec"] == ["model"]
    assert p["up_spec"] == [None, "model"] and p["lm_head_spec"] == [None, "model"]
    assert p["embed_spec"] == [] and p["norm_spec"] == []
    assert p["equal_values"] == 0.0


def test_errors_name_axis_size_and_dimension(checks):
    e = checks["errors"]
    assert e["kv_heads"].startswith("mesh: axis model=8 does not divide num_kv_heads=4")
    assert "batch_size: a batch of 3 rows" in e["batch"] and "data=2" in e["batch"]
    assert "spans 4 devices but there are 8" in e["count"]
    assert e["subset"] is None  # 4 given devices: a 2 x 2 mesh is fine


def test_perplexity_sharded(checks):
    p = checks["ppl"]
    assert p["windows"] == [10, 10]
    assert p["nll_diff"] < 1e-5
    assert p["mesh"] == pytest.approx(p["single"], rel=1e-5)
    assert p["use_mesh"] == pytest.approx(p["single"], rel=1e-5)


def test_calibration_grams_are_a_sharded_reduction(checks):
    g = checks["gram"]
    assert g["rel_diff"] < 1e-5
    assert g["offload_rel_diff"] < 1e-5  # activations read back from offload files
    assert g["offload_specs"]["1"]["inputs"][0] == "data"  # ... and placed over data again
    for layer in ("0", "1"):  # batches stay split over data through the stream
        assert g["specs"][layer]["inputs"][0] == "data"
        assert g["specs"][layer]["k_proj"][0] == "data"
    assert g["hlo_all_reduce"]  # the Gram contraction over data-sharded tokens


def test_eigen_compress_sharded(checks):
    e = checks["eigen"]
    assert e["ranks_mesh"] == e["ranks_single"]
    assert e["kernel_rel_diff"] < 1e-4
    ls = e["leaf_specs"]
    assert ls["type"] == "HeadLowRank" and ls["a"] == [None, "model"] and ls["b"] == ["model"]
    assert ls["o_type"] == "HeadFoldedOut" and ls["o_w"] == ["model"]
    assert e["forward_max_diff"] < 1e-4


def test_other_methods_sharded(checks):
    m = checks["methods"]
    assert m["tucker_mps_types"] == ["HeadLowRank", "HeadLowRank"]
    assert m["tucker_mps_rel_diff"] < 1e-4
    assert m["sparge_equal"]  # per-head thresholds from the sharded q/k/v probe
    assert m["xy_keys_equal"] and m["xy_rel_diff"] < 1e-5  # tokenwise X / Y captures


def test_cli_mesh(checks):
    c = checks["cli"]
    assert c["generate_rc"] == [0, 0] and c["generate_same"]
    assert c["ppl_rc"] == 0 and c["ppl_mesh"] == "data=2,model=4"
    assert c["ppl"] == pytest.approx(c["ppl_ref"], rel=1e-5)
    assert c["bad_mesh_rc"] == [2, 2]  # model=8 over 4 kv heads, batch 3 over data=2
    assert c["mesh_leaked"] == [False] * 7  # --mesh ends with its main()


def test_sparge_tune_cli_mesh_equals_one_device(checks, llama_dir):
    s = checks["cli"]["sparge"]
    assert s["rc"] == 0
    assert s["shape"] == [4, 8]  # llama-1m: 4 layers x 8 query heads
    assert s["equal"]  # the thresholds file == the library's one-device tuning


def test_run_recipe_cli_mesh_equals_one_device(checks):
    """``jcompress run`` (EigenAttention on layer 0, then NVFP4 on its MLP) with ``--mesh
    data=2,model=4`` == one device: the same steps, ranks and thresholds, layer errors to 1e-4
    relative, perplexity before and after every step to 1e-5 relative (float32 reduction order
    only; measured 3e-7), every materialized leaf of the factor export to 1e-4 relative
    (measured 4e-7)."""
    r = checks["cli"]["run"]
    assert r["rc"] == [0, 0]
    assert r["methods"] == [["eigen_attention", "quant"]] * 2
    (one,), (mesh,) = r["eigen"]
    assert mesh[:3] == one[:3] and isinstance(one[0], int)  # rank_kq, rank_v, threshold
    assert mesh[3] == pytest.approx(one[3], rel=1e-4)
    assert r["quant_paths"][0] == [f"model/layers/0/mlp/{k}_proj" for k in ("down", "gate", "up")]
    assert r["quant_paths"][1] == r["quant_paths"][0]
    assert len(r["ppl"][0]) == 3 and len(set(r["ppl"][0])) == 3  # every step changed the model
    assert r["ppl"][1] == pytest.approx(r["ppl"][0], rel=1e-5)
    assert r["n_leaves"][0] > 0 and r["n_leaves"][1] == r["n_leaves"][0]
    assert r["factors_rel_diff"] < 1e-4


def test_tokenwise_metrics_over_data(checks):
    t = checks["tokenwise"]
    assert t["n_tokens"] == [150.0]  # the padding of the last chunk is not counted
    assert t["rel_diff"] < 1e-5  # every metric vs one device
    assert t["sse_numpy_rel"] < 1e-4


def test_tokenwise_cli_mesh(checks):
    t = checks["cli"]["tokenwise"]
    assert t["rc"] == [0, 0, 0, 0]
    # save_xy of 4 windows over data=8 (padded, the padding dropped) == one device
    assert t["save_keys_equal"] and t["save_rel_diff"] < 1e-5
    assert t["n_metrics"][0] > 0 and t["n_metrics"][0] == t["n_metrics"][1]
    assert t["rel_diff"] < 1e-5


@pytest.mark.parametrize(
    "argv",
    [
        ["eigen", "--calib_data", "x", "--model", "{model}"],
        ["tucker", "--variant", "tt", "--model", "{model}"],
        ["quant", "apply", "--rule", "lm_head=fp8_e4m3", "--model", "{model}"],
        ["generate", "--prompt", "hi", "--model", "{model}"],
        ["tokenwise", "save_xy", "--save_path", "x", "--label", "y", "--model_dir", "{model}"],
        ["tokenwise", "eval_fake", "--xy_path", "x", "--out_json", "y", "--model_dir", "{model}"],
        ["sparge", "tune", "--data", "x", "--out", "y", "--model", "{model}"],
        ["ged", "--out", "x", "--model", "{model}"],
        ["run", "recipe.json", "--model", "{model}"],
    ],
)
def test_method_commands_take_mesh(capsys, llama_dir, argv):
    from jcompress.cli import main

    n = jax.device_count()
    argv = [a.replace("{model}", str(llama_dir)) for a in argv]
    rc = main([*argv, "--mesh", f"model={2 * n}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"jcompress: error: --mesh: data=1,model={2 * n} spans")


# the commands that take --mesh (the oracle: a command gaining --mesh is added here)
MESH_COMMANDS = [
    "eigen", "generate", "ged", "ppl", "quant apply", "run", "sparge tune",
    "tokenwise eval_fake", "tokenwise eval_smooth", "tokenwise save_xy", "tucker",
]  # fmt: skip


@pytest.mark.parametrize("name", MESH_COMMANDS)
def test_mesh_flag_on_every_sharded_command(name):
    """``--mesh`` parses on each sharded command, with the one shared help text."""
    from jcompress.cli import build_parser, leaf_parsers

    parser = build_parser()
    argv = COMMAND_ARGV[name]
    assert parser.parse_args([*argv, "--mesh", "data=2,model=4"]).mesh == "data=2,model=4"
    assert parser.parse_args(argv).mesh is None
    (flag,) = [a for a in leaf_parsers(parser)[tuple(name.split())]._actions
               if "--mesh" in a.option_strings]  # fmt: skip
    assert flag.help == (
        "shard over a device mesh: data=N,model=M (either may be left out: it is then 1); "
        "heads / MLP columns over model, batches over data (default: one device)"
    )


@pytest.mark.parametrize(
    "argv, what",
    [
        (["sparge", "tune", "--data", "x", "--out", "y"], "a streamed tuning"),
        (["ged", "--out", "x"], "a streamed capture"),
    ],
)
def test_mesh_with_stream_is_one_error(capsys, llama_dir, argv, what):
    from jcompress.cli import main

    rc = main([*argv, "--model", str(llama_dir), "--stream", "--mesh", "data=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"jcompress: error: --mesh: not with --stream ({what} runs on one device)\n"


def test_cli_mesh_flag_errors(capsys, llama_dir):
    from jcompress.cli import main

    rc = main(
        [
            "ppl",
            "--model",
            str(llama_dir),
            "--data",
            "x",
            "--mesh",
            f"data={2 * jax.device_count()}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("jcompress: error: --mesh: data=") and "devices but there are" in err
    with pytest.raises(SystemExit) as e:
        main(["ppl", "--model", str(llama_dir), "--data", "x", "--mesh", "pipe=2"])
    assert e.value.code == 2
    assert "argument --mesh: unknown axis 'pipe'" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# what the two processes write into their output directory, and nothing else
OUTPUTS = [
    "convert_ckpt",
    "convert_hf",
    "eigen.json",
    "ged",
    "ppl.json",
    "quant",
    "quant.json",
    "sparge.json",
    "sparge.md",
    "sparge.safetensors",
    "stream",
]


def test_two_processes(llama_dir, tmp_path, checks, refs):
    """Multi-host on one machine: two processes of 4 host devices each (CPU collectives over
    gloo), started through the environment variables a cluster launcher sets. (``checks`` /
    ``refs``: the 8-device subprocess's one-device runs are the references of the two
    processes': perplexity, logits, eigen and GED reports, SpargeAttn thresholds, the quant
    export.)"""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=compile_bound_flags(
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ),
        OPENBLAS_NUM_THREADS="1",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
    )
    from jcompress.cli import main

    # a one-process checkpoint, converted back to HF by both processes (convert first of all:
    # it must start the runtime itself), and its one-process conversion to compare with
    one = tmp_path.parent / f"{tmp_path.name}-one"
    ckpt = one / "ckpt"
    assert main(["convert", str(llama_dir), str(ckpt), "--to", "orbax"]) == 0
    assert main(["convert", str(ckpt), str(one / "convert_hf"), "--to", "hf"]) == 0
    script = [sys.executable, str(HERE / "_sharding_checks.py"), str(llama_dir), "--multihost"]
    procs = [
        subprocess.Popen(
            [*script, str(tmp_path), str(ckpt), str(refs)],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in outs:
        assert r["rc"] == 0 and r["processes"] == 2 and r["devices"] == [8, 4]
        assert r["ppl"] == pytest.approx(checks["cli"]["ppl_ref"], rel=1e-5)
        assert not r["fully_addressable"]  # the logits really span both processes
        assert r["forward_max_diff"] < 1e-4
        assert not r["mesh_after_cli"]
        # both named the same outputs: a second writer would have failed (they existed), and
        # each process returned only once process 0 had placed them
        assert r["rc_quant"] == 0 and r["rc_stream"] == 0 and r["rc_convert"] == [0, 0]
        assert r["rc_eigen"] == 0
        # analyses whose captured batches span both processes (read through to_host): the
        # tuned thresholds (below) exactly the one-device library run's; `ged --layer 0`
        # (the fits on the host in float64) == the 8-device subprocess's one-device CLI run:
        # the same sample counts, PCA size, permutation p-value, fold sizes and accuracies and
        # top neurons; eigenvalues and Cohen's d to 1e-4 relative (float32 activations in
        # another reduction order; measured 2e-6)
        assert r["rc_sparge"] == 0
        assert r["rc_ged"] == 0 and checks["cli"]["ged"]["rc"] == 0
        g1, g2 = checks["cli"]["ged"]["report"], r["ged"]
        assert g2["n_samples"] == g1["n_samples"] == [171, 171]
        l1, l2 = g1["layers"][0], g2["layers"][0]
        assert l2["n_components"] == l1["n_components"] > 0
        assert l2["p_value"] == l1["p_value"] < 1
        assert len(l1["eigenvalues"]) > 0
        np.testing.assert_allclose(l2["eigenvalues"], l1["eigenvalues"], rtol=1e-4)
        assert l2["cv"]["fold_sizes"] == l1["cv"]["fold_sizes"]
        assert l2["cv"]["fold_accuracy"] == l1["cv"]["fold_accuracy"]
        assert l2["cv"]["cohens_d"] == pytest.approx(l1["cv"]["cohens_d"], rel=1e-4)
        assert l2["top_neurons"] == l1["top_neurons"]
        # a process that gave up waiting and the one it waited for: the same one line, both
        # ways (process 1 for process 0's on_writer, process 0 for process 1's agree); process
        # 0 adds that its on_writer work was done
        waited = "process {} of this multi-host run waited 0.5 s for process {} and gave up " \
                 "(set JCOMPRESS_MULTIHOST_TIMEOUT to wait longer)"  # fmt: skip
        done = "; process 0 had finished its work" if r["writer"] else ""
        assert r["timeouts"] == [waited.format(1, 0) + done, waited.format(0, 1), 7]
        assert r["sees_outputs"] == OUTPUTS
        exists, differ = r["errors"]
        assert exists == [2, [f"jcompress: error: --json: {tmp_path / 'ppl.json'} already exists "
                              "(pass --overwrite to replace it)"]]  # fmt: skip
        assert differ[0] == 2 and differ[1][0].startswith(
            "jcompress: error: --json: process 1 of this multi-host run has a different value"
        )
    assert [r["writer"] for r in outs] == [True, False]
    assert [r["stream_printed"] for r in outs] == [True, False]  # streamed by process 0 only
    # ppl's report and progress bar on process 0's terminal only; process 1 prints nothing
    (out0, err0), (out1, err1) = (r["printed"] for r in outs)
    assert "| perplexity |" in out0 and "ppl L=32" in err0
    assert (out1, err1) == ("", "")
    # nothing else: no second writer's conflict copy, no temporaries, the work dir removed
    assert sorted(p.name for p in tmp_path.iterdir()) == OUTPUTS
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    from jcompress.sparge import load_params

    sys.path.insert(0, str(HERE))
    try:
        from _sharding_checks import sparge_equal
    finally:
        sys.path.remove(str(HERE))
    # sparge tune: the thresholds file exactly the 8-device subprocess's one-device library run
    tuned, _ = load_params(tmp_path / "sparge.safetensors", layers=4, heads=8)  # llama-1m
    assert sparge_equal(tuned, dict(np.load(refs / "sparge.npz")))

    # convert: the HF export byte for byte the one-process one; the checkpoint holds the model
    want, got = one / "convert_hf", tmp_path / "convert_hf"
    files = sorted(p.name for p in want.iterdir())
    assert files == sorted(p.name for p in got.iterdir()) and "model.safetensors" in files
    for f in files:
        if f != MARKER:
            assert (got / f).read_bytes() == (want / f).read_bytes(), f
    import jcompress
    from jcompress import checkpoint

    _, restored = checkpoint.restore(tmp_path / "convert_ckpt")
    _, loaded = jcompress.load_hf(llama_dir)
    assert jax.tree.structure(restored) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))

    # eigen over both processes (activations offloaded, each process its own rows) == one
    # process (the 8-device subprocess's one-device run of the same EIGEN_ARGS): the same
    # ranks per head, layer error and sample after compression
    assert checks["cli"]["eigen"]["rc"] == 0
    e1 = checks["cli"]["eigen"]["one"]
    e2 = json.loads((tmp_path / "eigen.json").read_text())
    for a, b in zip(e1["layers"], e2["layers"], strict=True):
        for k in ("path", "rank_kq", "rank_v", "head_ranks_kq", "head_ranks_v", "threshold"):
            assert a[k] == b[k], k
        assert b["error"] == pytest.approx(a["error"], rel=1e-4)
    assert len(e1["layers"]) == 1 and e1["layers"][0]["compressed"]
    assert all(isinstance(e1["layers"][0][k], int) for k in ("rank_kq", "rank_v"))  # chosen
    assert len(e1["extra"]["sample_after"]) > 0
    assert e2["extra"]["sample_after"] == e1["extra"]["sample_after"]

    # quant apply: the export is byte for byte the one-process run's (quantization does not
    # depend on the mesh; the perplexity in the report does only to float rounding)
    assert checks["cli"]["quant_ref_rc"] == 0  # the one-device run, in the 8-device subprocess
    ref = refs / "quant"
    got = tmp_path / "quant"
    files = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert any(f.endswith(".safetensors") for f in files)
    for f in files:
        if f not in ("report.json", "report.md", MARKER):  # the marker: time and pid
            assert (got / f).read_bytes() == (ref / f).read_bytes(), f
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (ref, got))
    assert r2["ppl_after"]["ppl"] == pytest.approx(r1["ppl_after"]["ppl"], rel=1e-5)
    assert r2["layers"] == r1["layers"]  # per-kernel formats, sizes and errors
