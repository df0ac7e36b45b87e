"""MPT: fused ``Wqkv`` (split into q/k/v), ALiBi, LayerNorm without bias, no linear biases.

ALiBi follows transformers' ``build_mpt_alibi_tensor`` (slopes from ``alibi_bias_max``);
``clip_qkv`` clamps the q/k/v projections, which is elementwise and so commutes with the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import Family, ModelConfig, Norm, Position
from jcompress.models.convert import IDENTITY, FamilySpec, Layout, Rule, linear_split
from jcompress.models.families._common import (
    get_bool,
    get_dict,
    get_float,
    get_int,
    linear,
    norm,
    positive_float,
    special_ids,
    untied,
)

T = "transformer"
L = "transformer.blocks.{i}"
J = "transformer/blocks/{i}"


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    mt = "mpt"
    attn = get_dict(d, "attn_config", mt)
    if attn.get("qk_ln"):
        raise UserError("config.json (mpt): attn_config.qk_ln=true is not supported")
    if not attn.get("alibi", True):
        raise UserError("config.json (mpt): only ALiBi MPT models are supported (alibi=false)")
    if not get_bool(d, "no_bias", mt, True):
        raise UserError("config.json (mpt): no_bias=false is not supported")
    hidden = get_int(d, "d_model", mt)
    heads = get_int(d, "n_heads", mt)
    scale = attn.get("softmax_scale")
    return ModelConfig(
        family=Family.MPT,
        vocab_size=get_int(d, "vocab_size", mt),
        hidden_size=hidden,
        num_layers=get_int(d, "n_layers", mt),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=get_int(d, "expansion_ratio", mt, 4) * hidden,
        max_position_embeddings=get_int(d, "max_seq_len", mt, 2048),
        norm=Norm.LAYER,
        norm_eps=get_float(d, "layer_norm_epsilon", mt, 1e-5),
        norm_bias=False,
        activation="gelu",
        gated_mlp=False,
        position=Position.ALIBI,
        attn_scale=None
        if scale is None
        else positive_float(scale, f"config.json ({mt}): softmax_scale"),
        # transformers clamps only when clip_qkv is truthy (0 / null both mean "off")
        clip_qkv=positive_float(attn["clip_qkv"], f"config.json ({mt}): clip_qkv")
        if attn.get("clip_qkv")
        else None,
        # transformers builds the ALiBi tensor with its default alibi_bias_max=8 whatever the
        # config says; parity with it wins over the config field.
        alibi_bias_max=8.0,
        tie_word_embeddings=get_bool(d, "tie_word_embeddings", mt, True),
        hf_config=dict(d),
        **special_ids(d),
    )


RULES = (
    Rule(
        f"{T}.wte.weight",
        ("transformer/wte/embedding",),
        IDENTITY,
        lambda c: (c.vocab_size, c.hidden_size),
    ),
    *norm(f"{T}.norm_f", "transformer/norm_f", lambda c: c.hidden_size),
    *linear("lm_head", "lm_head", lambda c: (c.vocab_size, c.hidden_size), when=untied),
    *norm(f"{L}.norm_1", f"{J}/norm_1", lambda c: c.hidden_size),
    *norm(f"{L}.norm_2", f"{J}/norm_2", lambda c: c.hidden_size),
    Rule(
        f"{L}.attn.Wqkv.weight",
        tuple(f"{J}/attn/Wqkv/{p}/kernel" for p in "qkv"),
        linear_split(3),
        lambda c: (3 * c.hidden_size, c.hidden_size),
    ),
    *linear(f"{L}.attn.out_proj", f"{J}/attn/out_proj", lambda c: (c.hidden_size, c.hidden_size)),
    *linear(f"{L}.ffn.up_proj", f"{J}/ffn/up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    *linear(
        f"{L}.ffn.down_proj", f"{J}/ffn/down_proj", lambda c: (c.hidden_size, c.intermediate_size)
    ),
)

LAYOUT = Layout(
    embed="transformer/wte",
    layers="transformer/blocks",
    final_norm="transformer/norm_f",
    lm_head="lm_head",
    attn_norm="norm_1",
    attn="attn",
    q="attn/Wqkv/q",
    k="attn/Wqkv/k",
    v="attn/Wqkv/v",
    o="attn/out_proj",
    mlp_norm="norm_2",
    mlp="ffn",
    up="ffn/up_proj",
    down="ffn/down_proj",
)

SPECS = {
    "mpt": FamilySpec(
        model_type="mpt",
        config_from_hf=config_from_hf,
        rules=RULES,
        layout=LAYOUT,
        base_prefix="transformer",
    )
}
