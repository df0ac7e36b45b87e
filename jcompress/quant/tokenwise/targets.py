"""Which linears the tokenwise tool measures, per family, and their Hugging Face names.

The allowlist is the seed's (``model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj``)
generalised through each family's :class:`~jcompress.models.convert.Layout`: the attention
projections and the MLP projections of every decoder layer, named by their HF module path
(``model.decoder.layers.0.fc1`` for OPT, ``transformer.h.0.attn.c_attn`` for GPT-2, whose
fused q/k/v kernels are measured as the one HF module they are: ``X @ [Wq | Wk | Wv]``).

In the results a projection sits under a *block*: the layout's attention and MLP module names
(``self_attn`` / ``mlp`` for Llama, Qwen and OPT; ``attn`` / ``mlp`` for GPT-2; ``attn`` /
``ffn`` for MPT) and is named by the last component of its HF module (``q_proj``, ``fc1``,
``c_attn``). Linears reading the same input share a ``group`` (SmoothQuant's shared factor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp

from jcompress.errors import UserError
from jcompress.methods import require_dense
from jcompress.models.config import ModelConfig
from jcompress.models.convert import get_path
from jcompress.models.families import spec_for

__all__ = ["Target", "layer_kernel", "layer_targets", "targets"]


class Target(NamedTuple):
    """One measured linear of one decoder layer.

    Attributes:
      layer: decoder layer index. block: ``self_attn`` / ``mlp`` / ... proj: ``q_proj`` / ...
      name: the HF module path (``model.layers.0.self_attn.q_proj``): cache keys are
        ``{name}.X`` / ``{name}.Y``.
      parts: param paths relative to the layer whose kernels concatenate (along the output
        axis) to the HF module's ``[in, out]`` weight (one path, or q/k/v of a fused module).
      group: linears with the same group read the same input.
    """

    layer: int
    block: str
    proj: str
    name: str
    parts: tuple[str, ...]
    group: str


def _rel_targets(cfg: ModelConfig) -> list[tuple[str, str, str, tuple[str, ...], str]]:
    """``(block, proj, hf_rel, parts, group)`` relative to a layer."""
    lay = spec_for(cfg.family.value).layout
    attn_block = lay.attn or "self_attn"
    mlp_block = lay.mlp or "mlp"
    out = []
    qkv = (lay.q, lay.k, lay.v)
    parents = {p.rsplit("/", 1)[0] for p in qkv if "/" in p}
    fused = len(parents) == 1 and all(p.rsplit("/", 1)[-1] in "qkv" for p in qkv)
    if fused:
        hf = parents.pop()
        out.append((attn_block, hf.rsplit("/", 1)[-1], hf, qkv, "attn_in"))
    else:
        out += [(attn_block, p.rsplit("/", 1)[-1], p, (p,), "attn_in") for p in qkv]
    out.append((attn_block, lay.o.rsplit("/", 1)[-1], lay.o, (lay.o,), "o_in"))
    mlp_in = [lay.gate] if getattr(lay, "gate", None) and cfg.gated_mlp else []
    for p in [*mlp_in, lay.up]:
        out.append((mlp_block, p.rsplit("/", 1)[-1], p, (p,), "mlp_in"))
    out.append((mlp_block, lay.down.rsplit("/", 1)[-1], lay.down, (lay.down,), "down_in"))
    return out


def layer_targets(cfg: ModelConfig, layer: int) -> list[Target]:
    """The measured linears of decoder layer ``layer``."""
    root = spec_for(cfg.family.value).layout.layers.replace("/", ".")
    return [
        Target(layer, b, p, f"{root}.{layer}.{hf.replace('/', '.')}", parts, g)
        for b, p, hf, parts, g in _rel_targets(cfg)
    ]


def targets(cfg: ModelConfig) -> list[Target]:
    """Every measured linear, layer by layer."""
    return [t for i in range(cfg.num_layers) for t in layer_targets(cfg, i)]


def layer_kernel(lp: Mapping[str, Any], t: Target) -> tuple[Any, Any]:
    """``(W [in, out] float32, bias [out] float32 or None)`` of target ``t`` from the layer's
    params ``lp`` (dense kernels only: one clear error for a compressed leaf)."""
    ws, bs = [], []
    for part in t.parts:
        p = get_path(lp, part)
        require_dense(f"{t.name} ({part}/kernel)", p["kernel"], "tokenwise")
        ws.append(jnp.asarray(p["kernel"], jnp.float32))
        bs.append(p.get("bias"))
    if any(b is not None for b in bs) and not all(b is not None for b in bs):
        raise UserError(f"{t.name}: some fused parts have a bias and some do not")
    w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=1)
    if bs[0] is None:
        return w, None
    b = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in bs])
    return w, b
