"""Forward-pass features on the two real models: LowRank kernels, the latent KV cache,
activation capture, layer-by-layer execution and greedy generation."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress import Capture, LowRank
from jcompress.models import init_cache
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for

MODELS = ("llama-1m", "opt-1m")
MAX_NEW = 30  # one generate compilation per prompt shape, shared by every generate test
SAMPLE_PROMPT = "The history of the"
OTHER_PROMPT = "In 1955 the Australian Army was sent to"


def _compress(model: Model, ranks: dict[str, int | None]):
    """Replace the kernels of the attention roles in ``ranks`` (q/k/v/o) in every layer by a
    truncated SVD (``None``: full rank)."""
    flat = flatten(model.params)
    for i in range(model.cfg.num_layers):
        for role, rank in ranks.items():
            path = f"{model.lay.layers}/{i}/{getattr(model.lay, role)}/kernel"
            us, vt = model.svd(path)
            r = us.shape[1] if rank is None else rank
            f32 = jnp.float32  # explicit dtype: a host-to-device copy, no program per shape
            flat[path] = LowRank(jnp.asarray(us[:, :r], f32), jnp.asarray(vt[:r], f32))
    return unflatten(flat)


class Model:
    def __init__(self, name, model_dir):
        from transformers import AutoTokenizer

        self.name = name
        self.cfg, self.params = jcompress.load_hf(model_dir)
        self.lay = spec_for(self.cfg.family.value).layout
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        rng = np.random.default_rng(0)
        self.ids = jnp.asarray(rng.integers(1, self.cfg.vocab_size, (2, 12)), jnp.int32)
        # row 0: 4 pad slots (id 0), then the first 8 tokens of row 1; row 1 unpadded
        self.mask = jnp.asarray(np.array([[0] * 4 + [1] * 8, [1] * 12]), jnp.int32)
        self.ids_padded = self.ids.at[0].set(
            jnp.concatenate([jnp.zeros(4, jnp.int32), self.ids[1, :8]])
        )
        self._svd: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def svd(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``(u * s, vt)`` of an attention kernel (float64 SVD, float32 factors). All q/k/v/o
        kernels are decomposed on first use, one batched SVD per kernel shape."""
        if not self._svd:
            flat = flatten(self.params)
            paths = [
                f"{self.lay.layers}/{i}/{getattr(self.lay, role)}/kernel"
                for i in range(self.cfg.num_layers)
                for role in "qkvo"
            ]
            for shape in {flat[p].shape for p in paths}:
                group = [p for p in paths if flat[p].shape == shape]
                w = np.stack([np.asarray(flat[p], np.float64) for p in group])
                u, s, vt = np.linalg.svd(w, full_matrices=False)
                for p, u_, s_, vt_ in zip(group, u, s, vt, strict=True):
                    self._svd[p] = ((u_ * s_).astype(np.float32), vt_.astype(np.float32))
        return self._svd[path]

    def encode(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def lp(self, i):
        return jcompress.layer_params(self.cfg, self.params, i)


@pytest.fixture(scope="module", params=MODELS)
def model(request, shared_data) -> Model:
    return Model(request.param, shared_data / "models" / request.param)


@pytest.fixture(scope="module")
def llama(shared_data) -> Model:
    return Model("llama-1m", shared_data / "models" / "llama-1m")


def _close(x, y, tol):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- LowRank forward


def test_full_rank_lowrank_attention_equals_dense(model):
    cfg, params = model.cfg, model.params
    lr = _compress(model, {"q": None, "k": None, "v": None, "o": None})
    k = get_path(jcompress.layer_params(cfg, lr, 0), model.lay.k)["kernel"]
    assert isinstance(k, LowRank) and k.rank == min(k.shape)
    dense = jcompress.forward(cfg, params, model.ids)
    got = jcompress.forward(cfg, lr, model.ids)
    assert got.shape == (2, 12, cfg.vocab_size)
    _close(got, dense, 1e-4)


def test_low_rank_forward_equals_materialized(model):
    cfg, params = model.cfg, model.params
    lr = _compress(model, {"q": 8, "k": 6, "v": 10, "o": 8})
    mat = jcompress.materialize(lr)
    assert not any(isinstance(v, LowRank) for v in flatten(mat).values())
    got = jcompress.forward(cfg, lr, model.ids_padded, model.mask)
    want = jcompress.forward(cfg, mat, model.ids_padded, model.mask)
    _close(got, want, 2e-5)
    dense = jcompress.forward(cfg, params, model.ids_padded, model.mask)
    assert float(jnp.max(jnp.abs(got - dense))) > 1e-2  # the truncation really changed the model


def test_lowrank_kv_cache_is_latent_and_generate_matches_materialized(model):
    cfg, params = model.cfg, model.params
    lr = _compress(model, {"q": 12, "k": 6, "v": 10, "o": 12})
    cache = init_cache(cfg, lr, 2, 40)
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    assert {c.shape for c in cache.k} == {(2, 40, 6)}
    assert {c.shape for c in cache.v} == {(2, 40, 10)}
    dense_cache = init_cache(cfg, params, 2, 40)
    kv_width = cfg.num_kv_heads * cfg.head_dim
    assert {c.shape for c in dense_cache.k + dense_cache.v} == {(2, 40, kv_width)}

    ids, mask = _padded_pair(model)
    out = jcompress.generate(cfg, lr, ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    want = jcompress.generate(
        cfg, jcompress.materialize(lr), ids, attention_mask=mask, max_new_tokens=MAX_NEW
    )
    assert out.shape == (2, ids.shape[1] + MAX_NEW)
    np.testing.assert_array_equal(out, want)


# --------------------------------------------------------------------------- capture


def test_capture_paths_and_values(llama):
    cfg, params, ids = llama.cfg, llama.params, llama.ids
    n = cfg.num_layers
    logits, cap = jcompress.forward(
        cfg, params, ids, capture=Capture(inputs=r".*/k_proj", outputs=r"model/layers/\d+/mlp")
    )
    assert set(cap["inputs"]) == {f"model/layers/{i}/self_attn/k_proj" for i in range(n)}
    assert set(cap["outputs"]) == {f"model/layers/{i}/mlp" for i in range(n)}
    _close(logits, jcompress.forward(cfg, params, ids), 1e-6)

    _, ref = jcompress.forward(
        cfg,
        params,
        ids,
        capture=Capture(
            inputs=r"model/layers/\d+",
            outputs=r"model/layers/\d+(/self_attn|/input_layernorm|/post_attention_layernorm)?",
        ),
    )
    assert set(ref["inputs"]) == {f"model/layers/{i}" for i in range(n)}
    for i in range(n):
        L = f"model/layers/{i}"
        lp = llama.lp(i)
        k_in = cap["inputs"][f"{L}/self_attn/k_proj"]
        assert k_in.shape == (2, 12, cfg.hidden_size)
        # the k_proj input is the input_layernorm's output
        _close(k_in, ref["outputs"][f"{L}/input_layernorm"], 1e-6)
        # the MLP output, recomputed by hand from the post-attention norm's output
        x = np.asarray(ref["outputs"][f"{L}/post_attention_layernorm"], np.float64)
        g = x @ np.asarray(lp["mlp"]["gate_proj"]["kernel"])
        u = x @ np.asarray(lp["mlp"]["up_proj"]["kernel"])
        mlp = (g / (1 + np.exp(-g)) * u) @ np.asarray(lp["mlp"]["down_proj"]["kernel"])
        _close(cap["outputs"][f"{L}/mlp"], mlp, 1e-4)
        # residual stream: layer output = input + attention + MLP
        h_in, h_out = ref["inputs"][L], ref["outputs"][L]
        _close(h_out, h_in + ref["outputs"][f"{L}/self_attn"] + cap["outputs"][f"{L}/mlp"], 1e-5)
        if i + 1 < n:
            np.testing.assert_array_equal(h_out, ref["inputs"][f"model/layers/{i + 1}"])
    _close(ref["inputs"]["model/layers/0"], jcompress.embed(cfg, params, ids), 1e-6)
    _close(jcompress.unembed(cfg, params, ref["outputs"][f"model/layers/{n - 1}"]), logits, 1e-5)


def test_capture_layer_chain_head_and_apply_layer_relative_paths(model):
    cfg, params, ids, mask = model.cfg, model.params, model.ids_padded, model.mask
    layers = re.escape(model.lay.layers)
    logits, cap = jcompress.forward(
        cfg,
        params,
        ids,
        mask,
        capture=Capture(
            inputs=rf"{layers}/\d+|lm_head", outputs=rf"{layers}/\d+(/self_attn/k_proj)?|lm_head"
        ),
    )
    n = cfg.num_layers
    want = {f"{model.lay.layers}/{i}" for i in range(n)} | {"lm_head"}
    assert set(cap["inputs"]) == want
    assert set(cap["outputs"]) == want | {
        f"{model.lay.layers}/{i}/self_attn/k_proj" for i in range(n)
    }
    for i in range(n - 1):
        np.testing.assert_array_equal(
            cap["outputs"][f"{model.lay.layers}/{i}"], cap["inputs"][f"{model.lay.layers}/{i + 1}"]
        )
    np.testing.assert_array_equal(cap["outputs"]["lm_head"], logits)
    assert cap["inputs"]["lm_head"].shape == (2, 12, cfg.hidden_size)

    # apply_layer captures under paths relative to the layer
    h = cap["inputs"][f"{model.lay.layers}/1"]
    out, lcap = jcompress.apply_layer(
        cfg, model.lp(1), h, 1, mask, capture=Capture(outputs="self_attn/k_proj")
    )
    assert set(lcap["outputs"]) == {"self_attn/k_proj"} and lcap["inputs"] == {}
    k = lcap["outputs"]["self_attn/k_proj"]
    assert k.shape == (2, 12, cfg.num_kv_heads * cfg.head_dim)
    _close(k, cap["outputs"][f"{model.lay.layers}/1/self_attn/k_proj"], 1e-6)
    _close(out, cap["outputs"][f"{model.lay.layers}/1"], 1e-5)


# --------------------------------------------------------------------------- layer by layer


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "leftpad"])
def test_layer_by_layer_equals_forward(model, padded):
    cfg, params = model.cfg, model.params
    ids, mask = (model.ids_padded, model.mask) if padded else (model.ids, None)
    h = jcompress.embed(cfg, params, ids, mask)
    assert h.shape == (2, 12, cfg.hidden_size)
    for i in range(cfg.num_layers):
        h = jcompress.apply_layer(cfg, model.lp(i), h, i, mask)
    got = jcompress.unembed(cfg, params, h)
    want = jcompress.forward(cfg, params, ids, mask)
    _close(got, want, 1e-5)
    if padded:  # the padded row's real tokens score as the same tokens unpadded (row 1, causal)
        _close(want[0, 4:], want[1, :8], 1e-4)
        assert float(jnp.max(jnp.abs(want[0, 4:] - want[1, 4:]))) > 1e-2


# --------------------------------------------------------------------------- generation


def _padded_pair(model: Model):
    a, b = model.encode(SAMPLE_PROMPT), model.encode(OTHER_PROMPT)
    assert len(a) < len(b)
    t = len(b)
    ids = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.int32)
    ids[0, t - len(a) :], mask[0, t - len(a) :] = a, 1
    ids[1], mask[1] = b, 1
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def test_batched_left_padded_generate_equals_alone(model):
    cfg, params = model.cfg, model.params
    ids, mask = _padded_pair(model)
    out = np.asarray(
        jcompress.generate(cfg, params, ids, attention_mask=mask, max_new_tokens=MAX_NEW)
    )
    t = ids.shape[1]
    for row, text in enumerate((SAMPLE_PROMPT, OTHER_PROMPT)):
        prompt = model.encode(text)
        alone = np.asarray(
            jcompress.generate(cfg, params, jnp.asarray([prompt]), max_new_tokens=MAX_NEW)
        )
        assert alone.shape == (1, len(prompt) + MAX_NEW)
        np.testing.assert_array_equal(alone[0, : len(prompt)], prompt)
        np.testing.assert_array_equal(out[row, t:], alone[0, len(prompt) :])
        np.testing.assert_array_equal(out[row, :t], np.asarray(ids[row]))


def test_greedy_sample_matches_baseline(model, shared_data):
    baseline = json.loads((shared_data / "baselines.json").read_text())[model.name]["greedy_sample"]
    prompt = model.encode(SAMPLE_PROMPT)
    out = jcompress.generate(model.cfg, model.params, jnp.asarray([prompt]), max_new_tokens=MAX_NEW)
    assert out.shape == (1, len(prompt) + MAX_NEW)
    assert model.tok.decode(np.asarray(out[0])) == baseline
