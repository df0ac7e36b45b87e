"""Family-neutral model configuration.

:class:`ModelConfig` is a frozen, hashable dataclass (it is a static argument of every jitted
function). Each family module turns a Hugging Face ``config.json`` dict into one; the raw dict
rides along in ``hf_config`` (excluded from hashing and equality) so ``save_hf`` writes it back.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError

__all__ = ["Family", "ModelConfig"]


class Family(enum.StrEnum):
    """Supported architectures, by Hugging Face ``model_type``."""

    OPT = "opt"
    LLAMA = "llama"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    MPT = "mpt"
    GPT2 = "gpt2"


class Norm(enum.StrEnum):
    RMS = "rms"
    LAYER = "layer"


class Position(enum.StrEnum):
    ROPE = "rope"
    LEARNED = "learned"
    ALIBI = "alibi"


ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the forward pass needs to know about a decoder-only transformer.

    Attributes:
      family: architecture family.
      vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
      intermediate_size: sizes. ``num_heads % num_kv_heads == 0`` (GQA groups).
      norm, norm_eps, norm_bias: normalisation kind and settings.
      activation: MLP activation name; ``gated_mlp`` means ``act(x Wg) * (x Wu)``.
      position: RoPE, learned absolute (``pos_offset`` rows skipped, OPT uses 2) or ALiBi.
      rope_theta, rope_scaling: RoPE base and scaling as a sorted tuple of items (``None``
        or ``rope_type`` "default" / "llama3" / "linear").
      qkv_bias, o_bias, mlp_bias: which linears carry biases.
      qk_norm: RMSNorm over ``head_dim`` on queries and keys (Qwen3).
      pre_norm: pre-LN (``True``) or post-LN blocks (OPT ``do_layer_norm_before=False``).
      final_norm: whether a final norm follows the last layer.
      embed_dim: width of the token embedding (OPT ``word_embed_proj_dim``); when it differs
        from ``hidden_size`` the model has ``project_in``/``project_out``.
      tie_word_embeddings: head shares the token embedding.
      attn_scale: softmax scale (``head_dim ** -0.5`` unless the family says otherwise).
      scale_attn_by_inverse_layer_idx: GPT-2 option, scores divided by ``layer + 1``.
      clip_qkv: MPT clamp of the q/k/v projections.
      alibi_bias_max: MPT ALiBi slope parameter.
      hf_config: the raw ``config.json`` dict (not hashed, not compared).
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: Norm = Norm.RMS
    norm_eps: float = 1e-5
    norm_bias: bool = False
    activation: str = "silu"
    gated_mlp: bool = True
    position: Position = Position.ROPE
    pos_offset: int = 0
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    pre_norm: bool = True
    final_norm: bool = True
    embed_dim: int | None = None
    tie_word_embeddings: bool = False
    attn_scale: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    clip_qkv: float | None = None
    alibi_bias_max: float = 8.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hf_config: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"config: {name} must be a positive integer, got {v!r}")
        for name in ("norm_eps", "rope_theta", "alibi_bias_max", "attn_scale", "clip_qkv"):
            v = getattr(self, name)
            if v is None and name in ("attn_scale", "clip_qkv"):
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise UserError(f"config: {name} must be a finite number > 0, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"config: activation {self.activation!r} is not supported; "
                f"allowed: {', '.join(ACTIVATIONS)}"
            )
        object.__setattr__(self, "family", Family(self.family))
        object.__setattr__(self, "norm", Norm(self.norm))
        object.__setattr__(self, "position", Position(self.position))
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in ("default", "llama3", "linear"):
                raise UserError(
                    f"config: rope_scaling type {rope_type!r} is not supported; "
                    "allowed: default, llama3, linear"
                )
            need = {
                "llama3": (
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ),
                "linear": ("factor",),
            }.get(rope_type, ())
            missing = [k for k in need if dict(self.rope_scaling).get(k) is None]
            if missing:
                raise UserError(
                    f"config: rope_scaling type {rope_type!r} needs {', '.join(missing)}"
                )

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def token_dim(self) -> int:
        """Width of the token embedding (``embed_dim`` or ``hidden_size``)."""
        return self.embed_dim or self.hidden_size

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def to_json(self) -> str:
        """The HF config dict as JSON (what ``save_hf`` writes as ``config.json``)."""
        return json.dumps(dict(self.hf_config), indent=2, sort_keys=True)
