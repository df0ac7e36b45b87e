"""GPT-2: Conv1D layout (weights already ``[in, out]``), fused ``c_attn`` split into q/k/v.

The fused ``attn.c_attn`` weight ``[H, 3H]`` and bias ``[3H]`` become three kernels and biases
under ``attn/c_attn/{q,k,v}``; saving concatenates them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jcompress.models.config import Family, ModelConfig, Norm, Position
from jcompress.models.convert import IDENTITY, LINEAR, FamilySpec, Layout, Rule, split_last
from jcompress.models.families._common import (
    get_bool,
    get_float,
    get_int,
    get_str,
    norm,
    special_ids,
    untied,
)

T = "transformer"
L = "transformer.h.{i}"
J = "transformer/h/{i}"
QKV = tuple(f"{J}/attn/c_attn/{p}" for p in "qkv")


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    mt = "gpt2"
    hidden = get_int(d, "n_embd", mt)
    heads = get_int(d, "n_head", mt)
    head_dim = hidden // heads
    return ModelConfig(
        family=Family.GPT2,
        vocab_size=get_int(d, "vocab_size", mt),
        hidden_size=hidden,
        num_layers=get_int(d, "n_layer", mt),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=get_int(d, "n_inner", mt, 4 * hidden),
        max_position_embeddings=get_int(d, "n_positions", mt, 1024),
        norm=Norm.LAYER,
        norm_eps=get_float(d, "layer_norm_epsilon", mt, 1e-5),
        norm_bias=True,
        activation=get_str(d, "activation_function", mt, "gelu_new"),
        gated_mlp=False,
        position=Position.LEARNED,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=get_bool(d, "tie_word_embeddings", mt, True),
        attn_scale=head_dim**-0.5 if get_bool(d, "scale_attn_weights", mt, True) else 1.0,
        scale_attn_by_inverse_layer_idx=get_bool(d, "scale_attn_by_inverse_layer_idx", mt, False),
        hf_config=dict(d),
        **special_ids(d),
    )


def _conv1d(hf: str, jx: str, shape) -> list[Rule]:
    return [
        Rule(f"{hf}.weight", (f"{jx}/kernel",), IDENTITY, shape),
        Rule(f"{hf}.bias", (f"{jx}/bias",), IDENTITY, lambda c: (shape(c)[1],)),
    ]


RULES = (
    Rule(
        f"{T}.wte.weight",
        ("transformer/wte/embedding",),
        IDENTITY,
        lambda c: (c.vocab_size, c.hidden_size),
    ),
    Rule(
        f"{T}.wpe.weight",
        ("transformer/wpe/embedding",),
        IDENTITY,
        lambda c: (c.max_position_embeddings, c.hidden_size),
    ),
    *norm(f"{T}.ln_f", "transformer/ln_f", lambda c: c.hidden_size, bias=True),
    Rule(
        "lm_head.weight",
        ("lm_head/kernel",),
        LINEAR,
        lambda c: (c.vocab_size, c.hidden_size),
        untied,
    ),
    *norm(f"{L}.ln_1", f"{J}/ln_1", lambda c: c.hidden_size, bias=True),
    *norm(f"{L}.ln_2", f"{J}/ln_2", lambda c: c.hidden_size, bias=True),
    Rule(
        f"{L}.attn.c_attn.weight",
        tuple(f"{p}/kernel" for p in QKV),
        split_last(3),
        lambda c: (c.hidden_size, 3 * c.hidden_size),
    ),
    Rule(
        f"{L}.attn.c_attn.bias",
        tuple(f"{p}/bias" for p in QKV),
        split_last(3),
        lambda c: (3 * c.hidden_size,),
    ),
    *_conv1d(f"{L}.attn.c_proj", f"{J}/attn/c_proj", lambda c: (c.hidden_size, c.hidden_size)),
    *_conv1d(f"{L}.mlp.c_fc", f"{J}/mlp/c_fc", lambda c: (c.hidden_size, c.intermediate_size)),
    *_conv1d(f"{L}.mlp.c_proj", f"{J}/mlp/c_proj", lambda c: (c.intermediate_size, c.hidden_size)),
)

LAYOUT = Layout(
    embed="transformer/wte",
    pos_embed="transformer/wpe",
    layers="transformer/h",
    final_norm="transformer/ln_f",
    lm_head="lm_head",
    attn_norm="ln_1",
    attn="attn",
    q="attn/c_attn/q",
    k="attn/c_attn/k",
    v="attn/c_attn/v",
    o="attn/c_proj",
    mlp_norm="ln_2",
    mlp="mlp",
    up="mlp/c_fc",
    down="mlp/c_proj",
)

SPECS = {
    "gpt2": FamilySpec(
        model_type="gpt2",
        config_from_hf=config_from_hf,
        rules=RULES,
        layout=LAYOUT,
        base_prefix="transformer",
        ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
    )
}
