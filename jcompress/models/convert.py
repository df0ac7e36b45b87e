"""The conversion engine: one declarative table per family, invertible value transforms.

A :class:`Rule` ties one Hugging Face tensor name template (``{i}`` = layer index) to one or
more param-pytree path templates, with a :class:`Transform` that maps the HF value to the pytree
value(s) and back. Transforms are pure re-layouts (transpose, split, concatenate), so the round
trip HF -> pytree -> HF is bit-exact. Every HF tensor must be produced by exactly one rule
instance (or listed as ignorable); every pytree leaf must be consumed by exactly one on save.

Pytree paths are ``/``-joined and mirror HF module names with Flax leaf names: linear
``kernel`` (``[in, out]``) and ``bias``, norm ``scale`` and ``bias``, embedding ``embedding``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig

__all__ = [
    "FamilySpec",
    "Layout",
    "Rule",
    "Transform",
    "flatten",
    "unflatten",
    "IDENTITY",
    "LINEAR",
    "split_last",
    "linear_split",
]

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """An invertible value map. ``to_jax(x) -> tuple of arrays``; ``to_hf(*arrays) -> x``."""

    name: str
    to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


IDENTITY = Transform("identity", lambda x: (x,), lambda x: x)
# torch nn.Linear stores [out, in]; Flax kernels are [in, out].
LINEAR = Transform("transpose", lambda x: (x.T,), lambda x: x.T)


def split_last(n: int) -> Transform:
    """Split the last axis into ``n`` equal parts (fused q/k/v of a Conv1D kernel or bias)."""
    return Transform(
        f"split_last({n})",
        lambda x: tuple(np.split(x, n, axis=-1)),
        lambda *xs: np.concatenate(xs, axis=-1),
    )


def linear_split(n: int) -> Transform:
    """Transpose an nn.Linear weight, then split its output axis into ``n`` kernels."""
    return Transform(
        f"transpose+split_last({n})",
        lambda x: tuple(np.split(x.T, n, axis=-1)),
        lambda *xs: np.concatenate(xs, axis=-1).T,
    )


def _always(cfg: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a family's conversion table.

    Attributes:
      hf: HF tensor name template, e.g. ``"model.layers.{i}.self_attn.q_proj.weight"``.
      jx: pytree path template(s) the tensor maps to.
      transform: value map between the two.
      hf_shape: expected HF shape for a config (checked on load and used by ``init_params``).
      when: whether this tensor exists for a config (biases, tied heads, optional norms).
    """

    hf: str
    jx: tuple[str, ...]
    transform: Transform
    hf_shape: Callable[[ModelConfig], Shape]
    when: Callable[[ModelConfig], bool] = _always

    def instances(self, cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...]]]:
        """Concrete ``(hf_name, pytree_paths)`` pairs for a config."""
        if not self.when(cfg):
            return
        layers = range(cfg.num_layers) if "{i}" in self.hf else [None]
        for i in layers:
            fmt = {} if i is None else {"i": i}
            yield self.hf.format(**fmt), tuple(p.format(**fmt) for p in self.jx)

    def jax_shapes(self, cfg: ModelConfig) -> tuple[Shape, ...]:
        """Pytree shapes, derived by applying the transform to a zero-cost broadcast array."""
        ghost = np.broadcast_to(np.zeros((), np.float32), self.hf_shape(cfg))
        return tuple(a.shape for a in self.transform.to_jax(ghost))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each role lives in a family's pytree (module paths, without leaf names).

    Top-level roles are absolute; per-layer roles are relative to ``{layers}/{i}``. Optional
    roles are ``None`` where the family lacks them.
    """

    embed: str
    layers: str
    final_norm: str | None
    lm_head: str | None  # None: tied to ``embed``
    attn_norm: str
    attn: str
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str
    mlp: str  # "" where the family has no MLP module (OPT)
    up: str
    down: str
    gate: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    pos_embed: str | None = None
    project_in: str | None = None
    project_out: str | None = None


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """A family: its HF config parser, conversion table, ignorable names and layout."""

    model_type: str
    config_from_hf: Callable[[Mapping[str, Any]], ModelConfig]
    rules: tuple[Rule, ...]
    layout: Layout
    base_prefix: str  # HF ``base_model_prefix`` ("model", "transformer")
    ignore: tuple[str, ...] = ()  # regexes of HF names that carry no parameters (buffers)
    tied_head_name: str = "lm_head.weight"

    def table(self, cfg: ModelConfig) -> list[tuple[Rule, str, tuple[str, ...]]]:
        """All concrete ``(rule, hf_name, paths)`` rows for a config; names are unique."""
        rows, seen = [], set()
        for rule in self.rules:
            for name, paths in rule.instances(cfg):
                if name in seen:  # a malformed table is a bug, not user input
                    raise AssertionError(f"{self.model_type}: two rules produce {name}")
                seen.add(name)
                rows.append((rule, name, paths))
        return rows

    def is_ignored(self, name: str, cfg: ModelConfig) -> bool:
        if cfg.tie_word_embeddings and name == self.tied_head_name:
            return True
        return any(re.fullmatch(p, name) for p in self.ignore)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``. Typed leaves are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """Look up a ``/``-joined path; raises ``KeyError`` naming the path."""
    node: Any = tree
    for p in path.split("/"):
        if not isinstance(node, Mapping) or p not in node:
            raise KeyError(path)
        node = node[p]
    return node


def check_shape(name: str, got: Shape, want: Shape) -> None:
    if tuple(got) != tuple(want):
        raise UserError(
            f"shape mismatch for tensor {name}: checkpoint has {list(got)}, "
            f"config.json implies {list(want)}"
        )
