"""Llama, Qwen2 and Qwen3: RMSNorm, RoPE, GQA, SwiGLU MLP (HF ``LlamaForCausalLM`` layout).

Qwen2 adds q/k/v biases; Qwen3 adds per-head RMSNorm on queries and keys (``q_norm``/``k_norm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import Family, ModelConfig, Norm, Position
from jcompress.models.convert import IDENTITY, FamilySpec, Layout, Rule
from jcompress.models.families._common import (
    get_bool,
    get_float,
    get_int,
    get_str,
    linear,
    norm,
    rope_from_hf,
    special_ids,
    untied,
)

L = "model.layers.{i}"
J = "model/layers/{i}"


def _config(family: Family):
    def parse(d: Mapping[str, Any]) -> ModelConfig:
        mt = family.value
        if get_bool(d, "use_sliding_window", mt, False):
            raise UserError(f"config.json ({mt}): use_sliding_window=true is not supported")
        hidden = get_int(d, "hidden_size", mt)
        heads = get_int(d, "num_attention_heads", mt)
        theta, scaling = rope_from_hf(d)
        attention_bias = get_bool(d, "attention_bias", mt, False)
        return ModelConfig(
            family=family,
            vocab_size=get_int(d, "vocab_size", mt),
            hidden_size=hidden,
            num_layers=get_int(d, "num_hidden_layers", mt),
            num_heads=heads,
            num_kv_heads=get_int(d, "num_key_value_heads", mt, heads),
            head_dim=get_int(d, "head_dim", mt, hidden // heads),
            intermediate_size=get_int(d, "intermediate_size", mt),
            max_position_embeddings=get_int(d, "max_position_embeddings", mt, 2048),
            norm=Norm.RMS,
            norm_eps=get_float(d, "rms_norm_eps", mt, 1e-6),
            activation=get_str(d, "hidden_act", mt, "silu"),
            gated_mlp=True,
            position=Position.ROPE,
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=True if family is Family.QWEN2 else attention_bias,
            o_bias=False if family is Family.QWEN2 else attention_bias,
            mlp_bias=get_bool(d, "mlp_bias", mt, False),
            qk_norm=family is Family.QWEN3,
            tie_word_embeddings=get_bool(d, "tie_word_embeddings", mt, False),
            hf_config=dict(d),
            **special_ids(d),
        )

    return parse


def _rules() -> tuple[Rule, ...]:
    q_out = lambda c: c.num_heads * c.head_dim  # noqa: E731
    kv_out = lambda c: c.num_kv_heads * c.head_dim  # noqa: E731
    return tuple(
        [
            Rule(
                "model.embed_tokens.weight",
                ("model/embed_tokens/embedding",),
                IDENTITY,
                lambda c: (c.vocab_size, c.hidden_size),
            ),
            *norm("model.norm", "model/norm", lambda c: c.hidden_size),
            *linear("lm_head", "lm_head", lambda c: (c.vocab_size, c.hidden_size), when=untied),
            *norm(f"{L}.input_layernorm", f"{J}/input_layernorm", lambda c: c.hidden_size),
            *norm(
                f"{L}.post_attention_layernorm",
                f"{J}/post_attention_layernorm",
                lambda c: c.hidden_size,
            ),
            *linear(
                f"{L}.self_attn.q_proj",
                f"{J}/self_attn/q_proj",
                lambda c: (q_out(c), c.hidden_size),
                bias=lambda c: c.qkv_bias,
            ),
            *linear(
                f"{L}.self_attn.k_proj",
                f"{J}/self_attn/k_proj",
                lambda c: (kv_out(c), c.hidden_size),
                bias=lambda c: c.qkv_bias,
            ),
            *linear(
                f"{L}.self_attn.v_proj",
                f"{J}/self_attn/v_proj",
                lambda c: (kv_out(c), c.hidden_size),
                bias=lambda c: c.qkv_bias,
            ),
            *linear(
                f"{L}.self_attn.o_proj",
                f"{J}/self_attn/o_proj",
                lambda c: (c.hidden_size, q_out(c)),
                bias=lambda c: c.o_bias,
            ),
            *norm(
                f"{L}.self_attn.q_norm",
                f"{J}/self_attn/q_norm",
                lambda c: c.head_dim,
                when=lambda c: c.qk_norm,
            ),
            *norm(
                f"{L}.self_attn.k_norm",
                f"{J}/self_attn/k_norm",
                lambda c: c.head_dim,
                when=lambda c: c.qk_norm,
            ),
            *linear(
                f"{L}.mlp.gate_proj",
                f"{J}/mlp/gate_proj",
                lambda c: (c.intermediate_size, c.hidden_size),
                bias=lambda c: c.mlp_bias,
            ),
            *linear(
                f"{L}.mlp.up_proj",
                f"{J}/mlp/up_proj",
                lambda c: (c.intermediate_size, c.hidden_size),
                bias=lambda c: c.mlp_bias,
            ),
            *linear(
                f"{L}.mlp.down_proj",
                f"{J}/mlp/down_proj",
                lambda c: (c.hidden_size, c.intermediate_size),
                bias=lambda c: c.mlp_bias,
            ),
        ]
    )


LAYOUT = Layout(
    embed="model/embed_tokens",
    layers="model/layers",
    final_norm="model/norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    attn="self_attn",
    q="self_attn/q_proj",
    k="self_attn/k_proj",
    v="self_attn/v_proj",
    o="self_attn/o_proj",
    q_norm="self_attn/q_norm",
    k_norm="self_attn/k_norm",
    mlp_norm="post_attention_layernorm",
    mlp="mlp",
    gate="mlp/gate_proj",
    up="mlp/up_proj",
    down="mlp/down_proj",
)

_IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")

SPECS = {
    fam.value: FamilySpec(
        model_type=fam.value,
        config_from_hf=_config(fam),
        rules=_rules(),
        layout=LAYOUT,
        base_prefix="model",
        ignore=_IGNORE,
    )
    for fam in (Family.LLAMA, Family.QWEN2, Family.QWEN3)
}
