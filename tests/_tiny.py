"""Tiny random Hugging Face models of every supported family, for parity and I/O tests.

Each :data:`VARIANTS` entry is a ``transformers`` config class name plus kwargs (hidden 32-64,
2 layers, vocab 128) and the :class:`~jcompress.ModelConfig` fields that config must parse to.
:func:`make_model` builds the torch model and re-draws every weight at a scale where logits are
O(1) (the default ``initializer_range=0.02`` gives near-constant logits, zero biases and unit
norms, which would let a wrong bias/norm/layout pass a parity check).

One shared batch shape (``[3, SEQ]``) keeps the number of jit compilations at one per variant:
row 0 unpadded, row 1 left-padded, row 2 right-padded, pad slots filled with random (not pad)
token ids so only the mask can hide them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import jcompress

VOCAB = 128
SEQ = 16
PAD = 4  # pad slots in the padded rows
LAYERS = 2

_LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # small enough that, with head_dim 16, frequencies fall in all three llama3 bands
    original_max_position_embeddings=64,
)

# name -> (transformers config class, kwargs, expected ModelConfig fields)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=1,
        ),
        dict(
            family="opt",
            pre_norm=True,
            final_norm=True,
            embed_dim=None,
            tie_word_embeddings=False,
            pos_offset=2,
            qkv_bias=True,
        ),
    ),
    "opt-350m": (  # word_embed_proj_dim != hidden_size, post-LN, no final norm
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            pad_token_id=1,
        ),
        dict(
            family="opt", pre_norm=False, final_norm=False, embed_dim=16, tie_word_embeddings=True
        ),
    ),
    "llama": (  # GQA, untied head
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        dict(
            family="llama",
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
            rope_scaling=None,
            qkv_bias=False,
        ),
    ),
    "llama-tied-llama3": (  # tied head, rope_scaling llama3, multi-query attention
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            rope_parameters=_LLAMA3,
        ),
        dict(
            family="llama",
            num_kv_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            rope_scaling=tuple(sorted((k, v) for k, v in _LLAMA3.items() if k != "rope_theta")),
        ),
    ),
    "qwen2": (  # q/k/v biases (no o bias), tied
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
        dict(family="qwen2", qkv_bias=True, o_bias=False, qk_norm=False, num_kv_heads=2),
    ),
    "qwen3": (  # q_norm/k_norm, head_dim (16) != hidden / heads (8)
        "Qwen3Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
        ),
        dict(family="qwen3", qk_norm=True, qkv_bias=False, head_dim=16, num_kv_heads=2),
    ),
    "mpt": (  # fused Wqkv, ALiBi, no biases, clip_qkv (active at this weight scale)
        "MptConfig",
        dict(d_model=32, n_heads=4, max_seq_len=64, attn_config=dict(clip_qkv=0.5)),
        dict(family="mpt", position="alibi", clip_qkv=0.5, norm_bias=False, qkv_bias=False),
    ),
    "mpt-6heads": (  # ALiBi slopes for a non-power-of-2 head count
        "MptConfig",
        dict(d_model=48, n_heads=6, max_seq_len=64),
        dict(family="mpt", num_heads=6, head_dim=8, clip_qkv=None),
    ),
    "gpt2": (  # Conv1D layout, fused c_attn, tied
        "GPT2Config",
        dict(n_embd=32, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        dict(
            family="gpt2",
            position="learned",
            tie_word_embeddings=True,
            scale_attn_by_inverse_layer_idx=False,
        ),
    ),
    "gpt2-untied-layerscale": (
        "GPT2Config",
        dict(
            n_embd=32,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
        ),
        dict(family="gpt2", tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
    ),
}
NAMES = tuple(VARIANTS)
# One variant per family for tests of an attention implementation against "dense" inside a
# whole model: an implementation sees only q, k, v, the scale and the mask (causal offset, key
# validity, ALiBi slopes as data), so the variants that differ only outside attention add no
# case. Together these cover MHA (opt), MQA (llama-tied-llama3: one KV head, head_dim 16),
# GQA (qwen2; qwen3 with head_dim != hidden / heads), ALiBi with clipped q/k/v (mpt) and a
# per-layer scale (gpt2-untied-layerscale). Every variant's forward itself is checked in
# tests/test_families.py and tests/test_hf_io.py.
ATTENTION_NAMES = ("opt", "llama-tied-llama3", "qwen2", "qwen3", "mpt", "gpt2-untied-layerscale")

_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+)\.(weight|bias)$")


def hf_config(name: str, **overrides: Any) -> transformers.PreTrainedConfig:
    cls, kwargs, _ = VARIANTS[name]
    layers = {"MptConfig": "n_layers", "GPT2Config": "n_layer"}.get(cls, "num_hidden_layers")
    kw = {"vocab_size": VOCAB, layers: LAYERS, **kwargs, **overrides}
    return getattr(transformers, cls)(**kw)


def make_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny eval-mode model of variant ``name`` with O(1)-scale random weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(name), attn_implementation="eager"
    )
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if _NORM.search(pname):
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if pname.endswith("weight") else 0.0))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def save_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of shape ``[3, SEQ]``: unpadded, left-padded, right-padded rows.

    Rows 1 and 2 hold the first ``SEQ - PAD`` tokens of row 0.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, SEQ)
    junk = rng.integers(0, VOCAB, PAD)
    n = SEQ - PAD
    ids = np.stack([x, np.concatenate([junk, x[:n]]), np.concatenate([x[:n], junk])])
    mask = np.ones((3, SEQ), np.int32)
    mask[1, :PAD] = 0
    mask[2, n:] = 0
    return ids.astype(np.int32), mask


def real(a: np.ndarray, mask: np.ndarray, row: int) -> np.ndarray:
    """The non-pad positions of ``a[row]``."""
    return a[row][mask[row].astype(bool)]


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits (fp32 numpy) with the same position ids jcompress derives from the
    mask, for models whose forward takes ``position_ids`` (MPT's ALiBi needs none)."""
    kw: dict[str, Any] = {"attention_mask": torch.tensor(mask, dtype=torch.long)}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kw["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), **kw).logits
    return out.float().numpy()


def jx_logits(cfg, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(jcompress.forward(cfg, params, ids, mask).astype(np.float32))


def st_tensors(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint dir, read with the ``safetensors`` package:
    ``name -> (dtype, shape, raw bytes)``."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                assert k not in out, f"{k} stored twice"
                out[k] = (str(t.dtype), tuple(t.shape), raw)
    return out


def cfg_fields(cfg) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "hf_config"}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
