"""The shape every compression method follows (types and two small helpers).

A method lives in ``jcompress/<method>/`` and never imports another method. It has:

1. **A config**: a frozen, keyword-only dataclass that validates itself in ``__post_init__``
   (raising :class:`~jcompress.errors.UserError` naming the field and the allowed range), with
   a ``layers`` (or ``params``) tuple of regex rules. Enums, not magic strings.
2. **Statistics through the shared stream**: calibration windows go through
   :func:`jcompress.calibration.stream_layers` (batching, padding that never enters
   statistics, offloading, capture by regexes relative to the layer, replace-and-feed-next,
   output-error evaluation); a method adds only its own jitted per-batch statistic (e.g.
   :class:`jcompress.calibration.GroupedGram`).
3. **A pure transform**::

     compress(params, cfg, calib=None, *, config, progress=True) -> (params, report)

   The input tree is never mutated; the result shares untouched leaves with it and replaces
   ``kernel`` leaves by typed leaves (:mod:`jcompress.leaves`). Calibration-free methods take
   ``calib=None``.
4. **A report** (:class:`Report`): a frozen dataclass with ``to_json()`` (a JSON-ready dict)
   and ``to_markdown()``, carrying the rules that matched nothing (``unmatched_rules``).
5. **Selection** by ``re.fullmatch`` rules over ``/``-joined param paths
   (``model/layers/3``, ``model/layers/3/self_attn/k_proj``): :func:`select` (first match
   wins; unused rules reported).
6. **No dense assumption**: a method checks the leaf types it meets and fails with one clear
   error naming the path and the leaf type (:func:`require_dense`), since another method may
   already have replaced a kernel by a typed leaf.

The math sits in ``<method>/*_core.py`` (single matrices, ``vmap`` for heads / layers); a CLI
subcommand in ``cli/<method>.py``; tests in ``tests/test_<method>.py``. ARCHITECTURE.md ("How
to add a method") walks through an example.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig

__all__ = ["Compress", "MethodConfig", "Report", "Selection", "require_dense", "select"]


@runtime_checkable
class MethodConfig(Protocol):
    """A frozen keyword-only dataclass validated in ``__post_init__``; ``layers`` holds the
    selection rules (regexes, ``re.fullmatch``)."""

    layers: tuple[str, ...]


@runtime_checkable
class Report(Protocol):
    """What a method did: JSON and markdown views, and the selection rules left unused."""

    unmatched_rules: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` works on it as is)."""
        ...

    def to_markdown(self) -> str:
        """A human-readable summary (a markdown table and notes)."""
        ...


class Compress(Protocol):
    """The transform signature every method exports as ``compress``."""

    def __call__(
        self,
        params: Any,
        cfg: ModelConfig,
        calib: Any = None,
        *,
        config: Any,
        progress: bool = True,
    ) -> tuple[Any, Report]: ...


class Selection(NamedTuple):
    """Result of :func:`select`: ``chosen`` maps each selected path to the rule that took it
    (first match wins), in the order of ``paths``; ``unmatched`` lists rules that matched no
    path, in rule order."""

    chosen: dict[str, str]
    unmatched: tuple[str, ...]

    def __contains__(self, path: object) -> bool:
        return path in self.chosen


def select(
    rules: Sequence[str],
    paths: Iterable[str],
    *,
    allow_unmatched: bool = False,
    arg: str = "layers",
) -> Selection:
    """Select ``paths`` by regex ``rules`` (``re.fullmatch``; first matching rule wins).

    A rule that matches no path is an error before any work (a typo would otherwise run the
    whole job on nothing, or on the wrong layers): one :class:`UserError` naming the rule and
    showing what the paths look like. ``allow_unmatched=True`` downgrades it to a warning; the
    rule is then listed in ``Selection.unmatched`` (and in the method's report).

    Example::

      sel = select(("model/layers/[0-3]",), [f"model/layers/{i}" for i in range(8)])
      "model/layers/2" in sel        # True
      sel.unmatched                  # ()
    """
    compiled = [(r, re.compile(r)) for r in rules]
    paths = list(paths)
    chosen: dict[str, str] = {}
    used: set[str] = set()
    for p in paths:
        for r, rx in compiled:
            if rx.fullmatch(p):
                chosen[p] = r
                used.add(r)
                break
    # a rule shadowed by an earlier one still counts as matching if it would match something
    for p in chosen:
        used.update(r for r, rx in compiled if rx.fullmatch(p))
    unmatched = tuple(r for r, _ in compiled if r not in used)
    if unmatched:
        shown = ", ".join(paths[:2]) + (", ..." if len(paths) > 2 else "")
        msg = (
            f"{arg}: rule {unmatched[0]!r} matches nothing"
            + (f" (nor do {', '.join(map(repr, unmatched[1:]))})" if len(unmatched) > 1 else "")
            + f"; paths look like {shown or '(none)'}"
        )
        if not allow_unmatched:
            flag = "--allow_unmatched" if arg.startswith("--") else "allow_unmatched=True"
            raise UserError(msg + f" ({flag} reports it instead)")
        warnings.warn(msg, stacklevel=2)
    return Selection(chosen, unmatched)


def require_dense(path: str, leaf: Any, method: str, what: str = "kernels") -> None:
    """Raise one clear :class:`UserError` unless ``leaf`` is a dense array.

    The message names the path, the leaf type and the method:
    ``params: model/layers/0/self_attn/k_proj/kernel is a LowRank; EigenAttention needs dense
    k/q/v/o kernels``.
    """
    if not isinstance(leaf, jax.Array | np.ndarray):
        raise UserError(f"params: {path} is a {type(leaf).__name__}; {method} needs dense {what}")
