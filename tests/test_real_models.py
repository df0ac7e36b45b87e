"""Logits parity with transformers on the two trained models in ../shared/data/models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jcompress


@pytest.fixture(scope="module", params=["llama-1m", "opt-1m"])
def model(request, shared_data):
    d = shared_data / "models" / request.param
    cfg, params = jcompress.load_hf(d)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    return d, cfg, params, hf


def _ids(b, t, seed=0):
    return np.random.RandomState(seed).randint(1, 2048, (b, t)).astype(np.int64)


def test_logits_parity_fp32(model):
    _, cfg, params, hf = model
    ids = _ids(3, 96)
    ours = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids)))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, 96, 2048)
    assert np.abs(ours - ref).max() <= 1e-4


def test_logits_parity_padded(model):
    _, cfg, params, hf = model
    ids = _ids(2, 40, seed=1)
    mask = np.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    ours = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    # a padded row equals the same tokens run alone
    alone = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids[:1, 7:])))
    assert np.abs(ours[0, 7:] - alone[0]).max() <= 1e-4


def test_bf16_runs(model, shared_data):
    d, cfg, _, _ = model
    cfg16, p16 = jcompress.load_hf(d, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in __import__("jax").tree.leaves(p16))
    ids = _ids(2, 64, seed=2)
    lo = jcompress.forward(cfg16, p16, jnp.asarray(ids))
    assert lo.dtype == jnp.bfloat16
    _, p32 = jcompress.load_hf(d)
    hi = np.asarray(jcompress.forward(cfg, p32, jnp.asarray(ids)))
    lo = np.asarray(lo.astype(jnp.float32))
    assert np.isfinite(lo).all()
    # bf16 has ~3 significant digits: predictions agree almost everywhere
    agree = (lo.argmax(-1) == hi.argmax(-1)).mean()
    assert agree > 0.9, agree
    assert np.abs(lo - hi).mean() < 0.1


def test_out_of_range_pad_ids_and_lengths(llama_dir, opt_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    ids = _ids(1, 12, seed=3)
    mask = np.ones_like(ids)
    ids[0, :4], mask[0, :4] = cfg.vocab_size, 0  # pad id outside the vocabulary, masked
    out = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids[:, 4:])))
    assert np.isfinite(out).all()
    assert np.abs(out[0, 4:] - alone[0]).max() <= 1e-4
    with pytest.raises(jcompress.UserError, match="token ids must lie in"):
        jcompress.generate(cfg, params, jnp.asarray(ids), max_new_tokens=2)
    ocfg, oparams = jcompress.load_hf(opt_dir)
    with pytest.raises(jcompress.UserError, match="513 tokens exceed the model's 512 learned"):
        jcompress.forward(ocfg, oparams, jnp.zeros((1, 513), jnp.int32))
    with pytest.raises(jcompress.UserError, match="520 tokens exceed"):
        jcompress.generate(ocfg, oparams, jnp.zeros((1, 500), jnp.int32), max_new_tokens=20)
