"""OPT: learned positions (offset 2), LayerNorm with bias, ReLU MLP, pre- or post-LN blocks.

Covers the opt-350m layout: ``word_embed_proj_dim != hidden_size`` adds ``project_in`` and
``project_out``; ``do_layer_norm_before=False`` makes blocks post-LN and drops the final norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import Family, ModelConfig, Norm, Position
from jcompress.models.convert import IDENTITY, FamilySpec, Layout, Rule
from jcompress.models.families._common import (
    get_bool,
    get_int,
    get_str,
    linear,
    norm,
    special_ids,
    untied,
)

D = "model.decoder"
L = "model.decoder.layers.{i}"
J = "model/decoder/layers/{i}"


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    mt = "opt"
    hidden = get_int(d, "hidden_size", mt)
    heads = get_int(d, "num_attention_heads", mt)
    if not get_bool(d, "layer_norm_elementwise_affine", mt, True):
        raise UserError("config.json (opt): layer_norm_elementwise_affine=false is not supported")
    pre = get_bool(d, "do_layer_norm_before", mt, True)
    embed_dim = get_int(d, "word_embed_proj_dim", mt, hidden)
    bias = get_bool(d, "enable_bias", mt, True)
    return ModelConfig(
        family=Family.OPT,
        vocab_size=get_int(d, "vocab_size", mt),
        hidden_size=hidden,
        num_layers=get_int(d, "num_hidden_layers", mt),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=get_int(d, "ffn_dim", mt),
        max_position_embeddings=get_int(d, "max_position_embeddings", mt, 2048),
        norm=Norm.LAYER,
        norm_eps=1e-5,
        norm_bias=True,
        activation=get_str(d, "activation_function", mt, "relu"),
        gated_mlp=False,
        position=Position.LEARNED,
        pos_offset=2,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        pre_norm=pre,
        final_norm=pre and not get_bool(d, "_remove_final_layer_norm", mt, False),
        embed_dim=None if embed_dim == hidden else embed_dim,
        tie_word_embeddings=get_bool(d, "tie_word_embeddings", mt, True),
        hf_config=dict(d),
        **special_ids(d),
    )


def _projected(c: ModelConfig) -> bool:
    return c.embed_dim is not None


RULES = (
    Rule(
        f"{D}.embed_tokens.weight",
        ("model/decoder/embed_tokens/embedding",),
        IDENTITY,
        lambda c: (c.vocab_size, c.token_dim),
    ),
    Rule(
        f"{D}.embed_positions.weight",
        ("model/decoder/embed_positions/embedding",),
        IDENTITY,
        lambda c: (c.max_position_embeddings + c.pos_offset, c.hidden_size),
    ),
    *linear(
        f"{D}.project_in",
        "model/decoder/project_in",
        lambda c: (c.hidden_size, c.token_dim),
        when=_projected,
    ),
    *linear(
        f"{D}.project_out",
        "model/decoder/project_out",
        lambda c: (c.token_dim, c.hidden_size),
        when=_projected,
    ),
    *norm(
        f"{D}.final_layer_norm",
        "model/decoder/final_layer_norm",
        lambda c: c.hidden_size,
        when=lambda c: c.final_norm,
        bias=True,
    ),
    *linear("lm_head", "lm_head", lambda c: (c.vocab_size, c.token_dim), when=untied),
    *[
        r
        for p in ("q_proj", "k_proj", "v_proj")
        for r in linear(
            f"{L}.self_attn.{p}",
            f"{J}/self_attn/{p}",
            lambda c: (c.hidden_size, c.hidden_size),
            bias=lambda c: c.qkv_bias,
        )
    ],
    *linear(
        f"{L}.self_attn.out_proj",
        f"{J}/self_attn/out_proj",
        lambda c: (c.hidden_size, c.hidden_size),
        bias=lambda c: c.o_bias,
    ),
    *norm(
        f"{L}.self_attn_layer_norm", f"{J}/self_attn_layer_norm", lambda c: c.hidden_size, bias=True
    ),
    *linear(
        f"{L}.fc1",
        f"{J}/fc1",
        lambda c: (c.intermediate_size, c.hidden_size),
        bias=lambda c: c.mlp_bias,
    ),
    *linear(
        f"{L}.fc2",
        f"{J}/fc2",
        lambda c: (c.hidden_size, c.intermediate_size),
        bias=lambda c: c.mlp_bias,
    ),
    *norm(f"{L}.final_layer_norm", f"{J}/final_layer_norm", lambda c: c.hidden_size, bias=True),
)

LAYOUT = Layout(
    embed="model/decoder/embed_tokens",
    pos_embed="model/decoder/embed_positions",
    project_in="model/decoder/project_in",
    project_out="model/decoder/project_out",
    layers="model/decoder/layers",
    final_norm="model/decoder/final_layer_norm",
    lm_head="lm_head",
    attn_norm="self_attn_layer_norm",
    attn="self_attn",
    q="self_attn/q_proj",
    k="self_attn/k_proj",
    v="self_attn/v_proj",
    o="self_attn/out_proj",
    mlp_norm="final_layer_norm",
    mlp="",
    up="fc1",
    down="fc2",
)

SPECS = {
    "opt": FamilySpec(
        model_type="opt",
        config_from_hf=config_from_hf,
        rules=RULES,
        layout=LAYOUT,
        base_prefix="model",
    )
}
