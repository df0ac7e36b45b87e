"""``load_hf`` / ``save_hf``: bit-exact round trips, transformers compatibility, sharding, atomic
writes, dtype requests and clear one-line errors for bad checkpoints.

No jcompress forward runs here (parity lives in test_families.py): this module costs no jit
compilation, only tiny-file I/O and a few transformers loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tiny import NAMES, batch, hf_logits, make_model, read_json, st_tensors
from safetensors.torch import load_file, save_file

import jcompress
from jcompress.models import SUPPORTED
from jcompress.models import hf as hf_mod
from jcompress.models.convert import flatten, unflatten

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# --------------------------------------------------------------------------- helpers


def user_error(fn, *words: str) -> str:
    """Run ``fn``; it must raise UserError with a one-line message containing ``words``."""
    with pytest.raises(jcompress.UserError) as ei:
        fn()
    msg = str(ei.value)
    assert msg and "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    return msg


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def assert_bit_exact(orig_dir: Path, new_dir: Path, *, tied: bool) -> int:
    """Every tensor of ``orig_dir`` is in ``new_dir`` with identical dtype, shape and bytes
    (a tied ``lm_head.weight``, should the original store it, may be absent)."""
    orig, new = st_tensors(orig_dir), st_tensors(new_dir)
    assert orig and new
    want = set(orig) - ({"lm_head.weight"} if tied else set())
    assert set(new) == want, set(new) ^ want
    for k in want:
        assert new[k][:2] == orig[k][:2], (k, orig[k][:2], new[k][:2])
        assert new[k][2] == orig[k][2], f"{k}: bytes differ"
    return len(want)


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def rewrite_weights(model_dir: Path, edit) -> None:
    """Apply ``edit(dict name -> tensor)`` to ``model_dir/model.safetensors``."""
    f = model_dir / "model.safetensors"
    tensors = dict(load_file(f))
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def _built():
    return {}


@pytest.fixture(scope="module", params=NAMES)
def src(request, _built, tmp_path_factory):
    """A tiny saved variant, loaded, and saved again by ``save_hf`` (cached per module)."""
    name = request.param
    if name not in _built:
        root = tmp_path_factory.mktemp(name)
        model = make_model(name)
        model.save_pretrained(root / "hf")
        cfg, params = jcompress.load_hf(root / "hf")
        out = jcompress.save_hf(cfg, params, root / "out")
        ids, mask = batch()
        _built[name] = SimpleNamespace(
            name=name,
            model=model,
            dir=root / "hf",
            out=out,
            cfg=cfg,
            params=params,
            ids=ids,
            mask=mask,
            ref=hf_logits(model, ids, mask),
        )
    return _built[name]


@pytest.fixture
def llama(src, tmp_path):
    """A private copy of the tiny llama checkpoint (tests may damage it)."""
    d = tmp_path / "llama"
    shutil.copytree(src.dir, d)
    return SimpleNamespace(dir=d, cfg=src.cfg, params=src.params, model=src.model)


def _with_llama(fn):
    return pytest.mark.parametrize("src", ["llama"], indirect=True)(fn)


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(src):
    n = assert_bit_exact(src.dir, src.out, tied=src.cfg.tie_word_embeddings)
    assert n == len(list(src.model.parameters()))  # one stored tensor per HF parameter


def test_round_trip_config(src):
    written, orig = read_json(src.out / "config.json"), read_json(src.dir / "config.json")
    assert written == orig
    assert sorted(os.listdir(src.out)) == ["config.json", "model.safetensors"]


def test_saved_dir_reloads_identically(src):
    cfg, params = jcompress.load_hf(src.out)
    assert cfg == src.cfg
    assert_same_params(params, src.params)


def test_saved_dir_loads_in_transformers(src):
    model = hf_model(src.out)
    assert type(model) is type(src.model)
    np.testing.assert_allclose(hf_logits(model, src.ids, src.mask), src.ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("src", ["llama", "gpt2", "mpt"], indirect=True)
def test_sharded_save(src, tmp_path):
    limit = 8192
    out = jcompress.save_hf(src.cfg, src.params, tmp_path / "sharded", max_shard_bytes=limit)
    shards = sorted(out.glob("*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert len(shards) >= 3
    index = read_json(out / "model.safetensors.index.json")
    tensors = st_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    for s in shards:  # a shard exceeds the limit only when it holds a single bigger tensor
        in_shard = [k for k, v in index["weight_map"].items() if v == s.name]
        size = sum(len(tensors[k][2]) for k in in_shard)
        assert size <= limit or len(in_shard) == 1, (s.name, size)
    assert_bit_exact(src.dir, out, tied=src.cfg.tie_word_embeddings)

    cfg, params = jcompress.load_hf(out)
    assert cfg == src.cfg
    assert_same_params(params, src.params)
    model = hf_model(out)
    np.testing.assert_allclose(hf_logits(model, src.ids, src.mask), src.ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("src", ["qwen2"], indirect=True)
def test_transformers_sharded_checkpoint_loads(src, tmp_path):
    src.model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 3
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, params = jcompress.load_hf(tmp_path / "hf")
    assert cfg == src.cfg
    assert_same_params(params, src.params)


@pytest.mark.parametrize("src", ["qwen2"], indirect=True)
def test_base_model_checkpoint_without_prefix_loads(src, tmp_path):
    # saved from the base model (Qwen2Model): names lack the "model." prefix; tied head
    src.model.model.save_pretrained(tmp_path / "base")
    assert "embed_tokens.weight" in st_tensors(tmp_path / "base")
    cfg, params = jcompress.load_hf(tmp_path / "base")
    assert_same_params(params, src.params)


@_with_llama
def test_compressed_leaf_is_saved_dense(src, tmp_path):
    flat = dict(flatten(src.params))
    path = "model/layers/1/mlp/up_proj/kernel"
    w = flat[path]
    flat[path] = jcompress.LowRank(a=w, b=jnp.eye(w.shape[1], dtype=w.dtype))
    out = jcompress.save_hf(src.cfg, unflatten(flat), tmp_path / "out")
    got = load_file(out / "model.safetensors")["model.layers.1.mlp.up_proj.weight"].numpy()
    np.testing.assert_allclose(got, np.asarray(w).T, rtol=0, atol=1e-6)


@_with_llama
def test_claim_hook_loads_rows_it_claims(src):
    """``load_hf(claim=...)``: a claimed row is the hook's value, every other row the loader's;
    a tensor the hook does not read stays unclaimed (the unexpected-tensor check)."""
    target, path = "model.layers.0.mlp.down_proj.weight", "model/layers/0/mlp/down_proj/kernel"
    seen = []

    def claim(row, tensors):
        seen.append(row.name)
        if row.name != target:
            return None
        assert row.paths == (path,) and row.name in tensors and "zz.weight" not in tensors
        assert row.shapes == (tuple(src.params["model"]["layers"]["0"]["mlp"]["down_proj"]
                                    ["kernel"].shape),)  # fmt: skip
        return {path: jnp.asarray(np.asarray(tensors.read(row.name), np.float32).T * 2)}

    _, params = jcompress.load_hf(src.dir, claim=claim)
    want, got = flatten(src.params), flatten(params)
    assert set(got) == set(want) and len(seen) == len(set(seen)) > 1
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v) * (2 if p == path else 1))
    with pytest.raises(jcompress.UserError, match=f"unexpected tensors .*{target}"):
        jcompress.load_hf(src.dir, claim=lambda r, t: {path: 0} if r.name == target else None)
    with pytest.raises(ValueError, match="claim: .* want"):
        jcompress.load_hf(src.dir, claim=lambda r, t: {"x": 0} if r.name == target else None)


# --------------------------------------------------------------------------- atomic writes


@_with_llama
def test_existing_out_dir_needs_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    user_error(lambda: jcompress.save_hf(src.cfg, src.params, out), str(out), "overwrite")
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert siblings(out) == ["out"]

    jcompress.save_hf(src.cfg, src.params, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert siblings(out) == ["out"]  # no temp or trash dir left behind
    assert_bit_exact(src.dir, out, tied=False)


@_with_llama
def test_missing_leaf_leaves_nothing_behind(src, tmp_path):
    flat = dict(flatten(src.params))
    del flat["model/layers/1/self_attn/v_proj/kernel"]
    parent = tmp_path / "p"
    parent.mkdir()
    user_error(
        lambda: jcompress.save_hf(src.cfg, unflatten(flat), parent / "out"),
        "missing leaf model/layers/1/self_attn/v_proj/kernel",
        "model.layers.1.self_attn.v_proj.weight",
    )
    assert os.listdir(parent) == []


@_with_llama
def test_extra_leaf_rejected(src, tmp_path):
    flat = dict(flatten(src.params))
    flat["model/layers/0/mlp/extra/kernel"] = jnp.zeros((2, 2))
    user_error(
        lambda: jcompress.save_hf(src.cfg, unflatten(flat), tmp_path / "out"),
        "model/layers/0/mlp/extra/kernel",
    )
    assert os.listdir(tmp_path) == []


@_with_llama
def test_wrong_leaf_shape_rejected(src, tmp_path):
    flat = dict(flatten(src.params))
    flat["model/layers/0/mlp/up_proj/kernel"] = jnp.zeros((32, 60))
    user_error(
        lambda: jcompress.save_hf(src.cfg, unflatten(flat), tmp_path / "out"),
        "model/layers/0/mlp/up_proj/kernel",
        "[32, 60]",
        "[32, 64]",
    )
    assert os.listdir(tmp_path) == []


class _Boom(RuntimeError):
    pass


@_with_llama
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failure_while_writing_leaves_nothing_behind(src, tmp_path, monkeypatch, existing):
    real_write = hf_mod.write_safetensors
    calls = []

    def flaky(path, entries, *a, **k):
        calls.append(path)
        n = real_write(path, entries, *a, **k)
        if len(calls) == 2:  # second shard is on disk, then the disk "fills up"
            raise _Boom("disk full")
        return n

    monkeypatch.setattr(hf_mod, "write_safetensors", flaky)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    with pytest.raises(_Boom):
        jcompress.save_hf(src.cfg, src.params, out, max_shard_bytes=8192, overwrite=existing)
    assert len(calls) == 2 and calls[0].parent.parent == tmp_path  # wrote into a temp sibling
    assert siblings(out) == (["out"] if existing else [])
    if existing:
        assert sorted(os.listdir(out)) == ["keep.txt"]


@_with_llama
def test_tokenizer_dir_files_are_copied(src, tmp_path, llama_dir):
    out = jcompress.save_hf(src.cfg, src.params, tmp_path / "out", tokenizer_dir=llama_dir)
    for fname in TOKENIZER_FILES:
        assert (out / fname).read_bytes() == (llama_dir / fname).read_bytes(), fname
    assert not (out / "TRAINING.log").exists()
    assert sorted(os.listdir(out)) == sorted([*TOKENIZER_FILES, "config.json", "model.safetensors"])


# --------------------------------------------------------------------------- dtypes


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    model = make_model("llama", seed=1, dtype=torch.bfloat16)
    d = tmp_path_factory.mktemp("bf16") / "hf"
    model.save_pretrained(d)
    return SimpleNamespace(model=model, dir=d)


def test_dtype_none_keeps_stored_bf16(bf16_model, tmp_path):
    assert read_json(bf16_model.dir / "config.json")["dtype"] == "bfloat16"
    cfg, params = jcompress.load_hf(bf16_model.dir, dtype=None)
    flat = flatten(params)
    assert all(v.dtype == jnp.bfloat16 for v in flat.values())
    want = bf16_model.model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    got = np.asarray(flat["model/layers/0/self_attn/q_proj/kernel"]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    out = jcompress.save_hf(cfg, params, tmp_path / "out")
    assert_bit_exact(bf16_model.dir, out, tied=False)
    assert read_json(out / "config.json")["dtype"] == "bfloat16"


@pytest.mark.parametrize("request_", ["float32", "fp32", jnp.float32, np.float32])
def test_dtype_float32_converts(bf16_model, request_):
    _, stored = jcompress.load_hf(bf16_model.dir)
    cfg, params = jcompress.load_hf(bf16_model.dir, dtype=request_)
    f32, bf = flatten(params), flatten(stored)
    assert all(v.dtype == jnp.float32 for v in f32.values())
    for k in bf:
        np.testing.assert_array_equal(np.asarray(f32[k]), np.asarray(bf[k]).astype(np.float32))


@_with_llama
def test_save_converted_dtype_writes_that_dtype(src, tmp_path):
    cfg, params = jcompress.load_hf(src.dir, dtype="float16")
    out = jcompress.save_hf(cfg, params, tmp_path / "out")
    tensors = st_tensors(out)
    assert {t[0] for t in tensors.values()} == {"torch.float16"}
    assert read_json(out / "config.json")["dtype"] == "float16"
    assert next(hf_model(out).parameters()).dtype == torch.float16


@pytest.mark.parametrize("bad", ["float64", "int8", "fp8", "banana", np.int32, np.float64, 3])
def test_bad_dtype_request(bad, tmp_path):
    # the dtype is validated before the directory is even looked at
    msg = user_error(lambda: jcompress.load_hf(tmp_path, dtype=bad), "dtype")
    assert "float32, bfloat16, float16" in msg


@_with_llama
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_model_bin_loads(src, tmp_path, dtype):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src.dir / "config.json", d)
    state = {k: v.to(dtype) for k, v in src.model.state_dict().items()}
    torch.save(state, d / "pytorch_model.bin")
    cfg, params = jcompress.load_hf(d)
    assert cfg == src.cfg
    want = src.params if dtype == torch.float32 else jcompress.load_hf(src.dir, dtype="bf16")[1]
    assert_same_params(params, want)


@_with_llama
def test_pytorch_model_bin_garbage(src, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src.dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not a pickle" * 8)
    user_error(lambda: jcompress.load_hf(d), "pytorch_model.bin", "cannot read")


# --------------------------------------------------------------------------- bad inputs


@_with_llama
def test_missing_directory(src, tmp_path):
    user_error(lambda: jcompress.load_hf(tmp_path / "nope"), "nope", "not a directory")


@_with_llama
def test_missing_config(llama):
    (llama.dir / "config.json").unlink()
    user_error(lambda: jcompress.load_hf(llama.dir), "config.json")


@_with_llama
def test_invalid_config_json(llama):
    (llama.dir / "config.json").write_text('{"model_type": "llama",')
    user_error(lambda: jcompress.load_hf(llama.dir), "config.json", "not valid JSON")


@_with_llama
def test_missing_weights(llama):
    (llama.dir / "model.safetensors").unlink()
    user_error(lambda: jcompress.load_hf(llama.dir), "model.safetensors", "pytorch_model.bin")


@_with_llama
def test_index_names_missing_shard(llama):
    (llama.dir / "model.safetensors").rename(llama.dir / "model-00001-of-00002.safetensors")
    names = st_tensors(llama.dir)
    wm = {k: "model-00001-of-00002.safetensors" for k in names}
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (llama.dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    user_error(
        lambda: jcompress.load_hf(llama.dir),
        "missing weights file",
        "model-00002-of-00002.safetensors",
    )


@_with_llama
def test_unknown_model_type(llama):
    cfg = read_json(llama.dir / "config.json")
    cfg["model_type"] = "bert"
    (llama.dir / "config.json").write_text(json.dumps(cfg))
    msg = user_error(lambda: jcompress.load_hf(llama.dir), "'bert'", "supported")
    for name in SUPPORTED:
        assert name in msg
    assert set(SUPPORTED) == {"gpt2", "llama", "mpt", "opt", "qwen2", "qwen3"}


def _garble(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return raw[:8] + b"#" * n + raw[8 + n :]


CORRUPTIONS = {
    "tiny-file": lambda raw: raw[:5],
    "huge-header-length": lambda raw: (10**15).to_bytes(8, "little") + raw[8:],
    "truncated-header": lambda raw: raw[: 8 + int.from_bytes(raw[:8], "little") // 2],
    "garbled-header": _garble,
    "truncated-data": lambda raw: raw[:-100],
}


@_with_llama
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_safetensors(llama, how):
    f = llama.dir / "model.safetensors"
    f.write_bytes(CORRUPTIONS[how](f.read_bytes()))
    user_error(lambda: jcompress.load_hf(llama.dir), str(f), "corrupt safetensors header")


@_with_llama
def test_tensor_shape_disagrees_with_tensor_file(llama):
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(t):
        t[name] = torch.zeros(63, 32)

    rewrite_weights(llama.dir, edit)
    user_error(lambda: jcompress.load_hf(llama.dir), "shape mismatch", name, "[63, 32]", "[64, 32]")


@_with_llama
def test_tensor_shape_disagrees_with_config(llama):
    cfg = read_json(llama.dir / "config.json")
    cfg["intermediate_size"] = 72
    (llama.dir / "config.json").write_text(json.dumps(cfg))
    user_error(lambda: jcompress.load_hf(llama.dir), "shape mismatch", "mlp", "72")


@_with_llama
def test_missing_tensor(llama):
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_weights(llama.dir, lambda t: t.pop(name))
    user_error(lambda: jcompress.load_hf(llama.dir), "missing tensor", name)


@_with_llama
def test_unexpected_tensor(llama):
    name = "model.layers.0.self_attn.bogus.weight"
    rewrite_weights(llama.dir, lambda t: t.update({name: torch.zeros(2)}))
    user_error(lambda: jcompress.load_hf(llama.dir), "unexpected tensor", name)


@_with_llama
def test_ignorable_buffers_are_accepted(llama):
    # older Llama checkpoints carry rotary inv_freq buffers: not parameters, not an error
    rewrite_weights(
        llama.dir,
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}),
    )
    _, params = jcompress.load_hf(llama.dir)
    assert_same_params(params, llama.params)


# --------------------------------------------------------------------------- real checkpoints

REAL = {"llama_dir": ("llama", "torch_dtype", "dtype"), "opt_dir": ("opt", "dtype", "torch_dtype")}


@pytest.mark.parametrize("fixture", list(REAL))
def test_real_checkpoint_round_trip(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    family, style_key, other_key = REAL[fixture]
    orig_cfg = read_json(model_dir / "config.json")
    assert orig_cfg[style_key] == "float32" and other_key not in orig_cfg  # the premise
    cfg, params = jcompress.load_hf(model_dir)
    assert cfg.family == family
    assert all(v.dtype == jnp.float32 for v in flatten(params).values())
    if family == "llama":  # old-style rope_theta, GQA, untied
        assert "rope_parameters" not in orig_cfg
        assert (cfg.rope_theta, cfg.rope_scaling) == (10000.0, None)
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (8, 4, False)
    else:
        assert cfg.tie_word_embeddings and cfg.embed_dim is None and cfg.pre_norm

    out = jcompress.save_hf(cfg, params, tmp_path / "out", tokenizer_dir=model_dir)
    assert assert_bit_exact(model_dir, out, tied=cfg.tie_word_embeddings) > 10
    assert read_json(out / "config.json") == orig_cfg
    for fname in TOKENIZER_FILES:
        assert (out / fname).read_bytes() == (model_dir / fname).read_bytes()
