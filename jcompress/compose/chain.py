"""``jcompress.chain``: methods applied one after another to one param pytree.

Each step sees the leaves the previous one left (an EigenAttention ``HeadLowRank`` k_proj, a
Tucker ``TTLinear``, ...). Before the first step runs, :func:`preflight` walks the whole chain on
leaf types and shapes (the registry's plans, :mod:`jcompress.compose.registry`): a step that
cannot act on a leaf it would meet is one :class:`~jcompress.errors.UserError` naming the step,
the path and the leaf type, and nothing has been computed yet.

The result is one :class:`ChainReport`: every step's own report, its wall time, and the model's
sizes (param bytes, stored bits per kernel weight, KV-cache bytes per token) and, given an
evaluation text, its perplexity after every step (and before the first).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jcompress.compose.recipe import Step, parse_recipe, step_to_json
from jcompress.compose.registry import REGISTRY, Kind, LeafInfo, leaf_infos, type_name
from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, Factored
from jcompress.models.config import ModelConfig

__all__ = ["Chain", "ChainReport", "Sizes", "StepRecord", "chain", "model_sizes", "preflight"]


# --------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What a param tree costs.

    Attributes:
      param_bytes: bytes of every stored array (typed leaves: their children; quantized codes
        in their one-byte containers).
      kernel_bits_per_weight: stored bits of the 2-D ``kernel`` leaves (quantized codes at
        their format's width plus scales) per dense kernel entry.
      kv_bytes_per_token: KV-cache bytes one token costs over all layers (latent widths of
        factored k/v projections, the full width otherwise), at the k/v kernels' dtype.
    """

    param_bytes: int
    kernel_bits_per_weight: float
    kv_bytes_per_token: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _nbytes(x: Any) -> int:
    if isinstance(x, CompressedLeaf):
        return x.nbytes
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def model_sizes(cfg: ModelConfig, params: Any) -> Sizes:
    """:class:`Sizes` of ``params`` (no computation on the weights)."""
    from jcompress.models.convert import flatten, get_path
    from jcompress.models.families import spec_for
    from jcompress.quant.apply import stored_bits

    flat = flatten(params)
    total = sum(_nbytes(v) for v in flat.values())
    bits = n = 0.0
    for path, v in flat.items():
        if path.endswith("/kernel") and len(getattr(v, "shape", ())) == 2:
            bits += stored_bits(v)
            n += float(v.shape[0]) * float(v.shape[1])
    lay = spec_for(cfg.family.value).layout
    kv = 0
    for i in range(cfg.num_layers):
        lp = get_path(params, f"{lay.layers}/{i}")
        for role in (lay.k, lay.v):
            w = get_path(lp, role)["kernel"]
            width = w.latent_width if isinstance(w, Factored) else int(w.shape[-1])
            kv += width * np.dtype(w.dtype).itemsize
    return Sizes(int(total), bits / max(n, 1.0), int(kv))


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One step of a chain run: the method, its config, its own report, the wall time, and
    the model's sizes and perplexity after it."""

    index: int
    method: str
    config: Mapping[str, Any]
    report: Any
    seconds: float
    sizes: Sizes
    ppl: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "method": self.method,
            "config": dict(self.config),
            "seconds": self.seconds,
            "sizes": self.sizes.to_json(),
            "ppl": None if self.ppl is None else dict(self.ppl),
            "report": self.report.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """The report of a chain: the model before, then one :class:`StepRecord` per step.

    Attributes:
      before: sizes of the input tree.
      ppl_before: perplexity of the input tree (``None`` without an evaluation text).
      steps: the step records, in order.
      attention_state: the attention setting an attention step tuned
        (:class:`jcompress.sparge.SpargeParams`; ``None`` when there is none). Pass it as
        ``forward(..., attention="block_sparse", attention_state=...)``.
      attention: the attention implementation the perplexity after the step was measured
        with (``BlockSparse`` with the tuned block sizes):
        ``forward(..., attention=report.attention, attention_state=report.attention_state)``.
      extra: what the caller adds (model path, data files, ...).
    """

    before: Sizes
    steps: tuple[StepRecord, ...]
    ppl_before: Mapping[str, Any] | None = None
    attention_state: Any = None
    attention: Any = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def unmatched_rules(self) -> tuple[str, ...]:
        return tuple(  # SpargeAttn's TuneReport has no unmatched_rules
            f"step {s.index}: {r}"
            for s in self.steps
            for r in getattr(s.report, "unmatched_rules", ())
        )

    def with_extra(self, **kw: Any) -> ChainReport:
        return dataclasses.replace(self, extra={**self.extra, **kw})

    def to_json(self) -> dict[str, Any]:
        state = None
        if self.attention_state is not None:
            state = {
                "type": type(self.attention_state).__name__,
                "shape": list(np.shape(self.attention_state[0])),
                "attention": None
                if self.attention is None
                else {
                    "type": type(self.attention).__name__,
                    **{
                        k: getattr(self.attention, k)
                        for k in ("block_q", "block_k", "implementation")
                        if hasattr(self.attention, k)
                    },
                },
            }
        return {
            "before": {"sizes": self.before.to_json(), "ppl": self.ppl_before},
            "steps": [s.to_json() for s in self.steps],
            "attention_state": state,
            "unmatched_rules": list(self.unmatched_rules),
            **dict(self.extra),
        }

    to_dict = to_json

    def to_markdown(self) -> str:
        def ppl(p):
            return "" if p is None else f"{p['ppl']:.4f}"

        def row(name, method, secs, sz, p):
            return (
                f"| {name} | {method} | {secs} | {sz.param_bytes / 2**20:.3f} | "
                f"{sz.kernel_bits_per_weight:.2f} | {sz.kv_bytes_per_token:,} | {ppl(p)} |"
            )

        lines = [
            "| step | method | seconds | params (MiB) | kernel bits/weight | KV bytes/token "
            "| perplexity |",
            "|---|---|---|---|---|---|---|",
            row("input", "", "", self.before, self.ppl_before),
        ]
        lines += [
            row(str(s.index), s.method, f"{s.seconds:.1f}", s.sizes, s.ppl) for s in self.steps
        ]
        if self.attention_state is not None:
            lines.append(
                "\nThe last step tuned block-sparse attention thresholds: the perplexity after "
                "it is measured with attention=block_sparse (sparge_params.safetensors)."
            )
        for s in self.steps:
            lines += ["", f"## Step {s.index}: {s.method}", "", s.report.to_markdown()]
        if self.unmatched_rules:
            lines.append(f"\nunmatched rules: {', '.join(self.unmatched_rules)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- chain


def preflight(steps: Sequence[Step], params: Any, cfg: ModelConfig) -> dict[str, LeafInfo]:
    """Check every step against the leaf types it will meet, on types and shapes only.

    Args:
      steps: the chain's steps.
      params: the input tree (arrays, typed leaves, or ``jax.ShapeDtypeStruct`` leaves: a
        caller may check a recipe against ``param_shapes`` before loading any weights).
      cfg: its model config.

    Returns:
      ``{path: LeafInfo}`` after the last step (the leaf types each path may then hold).

    Raises:
      UserError: ``step I (METHOD): params: PATH is a TYPE; METHOD needs ...``, a rule that
        selects nothing, or a rank that does not fit, for the first step that fails.
    """
    return _plan_steps(steps, params, cfg)[-1]


def _plan_steps(steps: Sequence[Step], params: Any, cfg: ModelConfig) -> list[dict[str, LeafInfo]]:
    """The leaves before the first step, then after each (the plans' predictions)."""
    leaves = leaf_infos(params)
    out = [leaves]
    for i, s in enumerate(steps):
        try:
            updates = s.entry.plan(cfg, s.config, leaves)
        except UserError as e:
            raise UserError(f"step {i} ({s.method}): {e}") from None
        leaves = {**leaves, **updates}
        out.append(leaves)
    return out


def _check_plan(i: int, step: Step, predicted: Mapping[str, LeafInfo], params: Any) -> None:
    """Warn when a step wrote a leaf type its plan did not predict (the later steps were
    checked against the plan, so the plan is stale: a registry bug, not a user error)."""
    for path, info in leaf_infos(params).items():
        want = predicted.get(path)
        if want is not None and not info.types <= want.types:
            got = ", ".join(sorted(type_name(t) for t in info.types))
            warnings.warn(
                f"step {i} ({step.method}) wrote a {got} at {path}; its pre-flight plan "
                f"predicted {', '.join(sorted(type_name(t) for t in want.types))}",
                stacklevel=3,
            )


def _as_step(item: Any, i: int) -> Step:
    if isinstance(item, Step):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        entry = REGISTRY.get(item[0])
        if entry is not None and isinstance(item[1], entry.config_class()):
            return Step(entry.name, item[1])
    if isinstance(item, Mapping):
        return parse_recipe([item])[0]
    for entry in REGISTRY.values():
        if isinstance(item, entry.config_class()):
            return Step(entry.name, item)
    raise UserError(
        f"steps: step {i}: expected a Step, a method config ({', '.join(REGISTRY)}), a "
        f"(name, config) pair or a recipe mapping, got {type(item).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class Chain:
    """Steps applied in order; call it as ``chain(params, cfg, calib)``. Made by
    :func:`chain`."""

    steps: tuple[Step, ...]

    def preflight(self, params: Any, cfg: ModelConfig) -> dict[str, LeafInfo]:
        """:func:`preflight` of these steps."""
        return preflight(self.steps, params, cfg)

    def to_json(self) -> list[dict[str, Any]]:
        """The recipe (a list of step mappings; :func:`jcompress.compose.parse_recipe` reads
        it back)."""
        return [step_to_json(s) for s in self.steps]

    def __call__(
        self,
        params: Any,
        cfg: ModelConfig,
        calib: Any = None,
        *,
        eval_ids: Any = None,
        eval_seqlen: int = 512,
        eval_max_windows: int | None = None,
        progress: bool = True,
    ) -> tuple[Any, ChainReport]:
        """Run the steps.

        Args:
          params: the input tree (not modified).
          cfg: its model config.
          calib: ``[nsamples, seqlen]`` calibration token ids, given to every step that
            calibrates (each method's own ``nsamples`` / ``seqlen`` fields are the sampling
            settings of its own CLI; the chain uses these windows).
          eval_ids: ``[N]`` token ids of an evaluation text: perplexity before the first step
            and after each (``None``: no perplexity).
          eval_seqlen, eval_max_windows: the perplexity windows.
          progress: show progress bars.

        Returns:
          ``(params, ChainReport)``; the report's ``attention_state`` carries what an
          attention step (SpargeAttn) tuned.

        Raises:
          UserError: pre-flight failures (before any step runs), a step that needs
            calibration without ``calib``, or what a step itself rejects.
        """
        from jcompress.eval import perplexity

        for i, s in enumerate(self.steps):
            if calib is None and s.entry.needs_calib(s.config):
                raise UserError(f"calib: step {i} ({s.method}) needs calibration token ids")
        plans = _plan_steps(self.steps, params, cfg)

        def ppl(p, attention=None, state=None):
            if eval_ids is None:
                return None
            kw = {} if attention is None else {"attention": attention, "attention_state": state}
            return perplexity(
                cfg, p, eval_ids, seqlen=eval_seqlen, max_windows=eval_max_windows,
                progress=False, **kw,
            ).to_dict()  # fmt: skip

        original = params
        before, ppl_before = model_sizes(cfg, params), ppl(params)
        records, state, attention = [], None, None
        for i, s in enumerate(self.steps):
            t0 = time.perf_counter()
            try:
                out = s.entry.run(
                    params, cfg, calib, s.config, progress=progress, original=original
                )
            except UserError as e:
                raise UserError(f"step {i} ({s.method}): {e}") from None
            secs = time.perf_counter() - t0
            params = out.params
            _check_plan(i, s, plans[i + 1], params)
            if s.entry.kind is Kind.ATTENTION:
                state, attention = out.attention_state, out.attention
            records.append(
                StepRecord(
                    i, s.method, step_to_json(s), out.report, secs,
                    model_sizes(cfg, params), ppl(params, attention, state),
                )
            )  # fmt: skip
        return params, ChainReport(before, tuple(records), ppl_before, state, attention)


def chain(steps: Any) -> Chain:
    """Compose methods into one pure transform ``params, cfg, calib -> (params, ChainReport)``.

    Args:
      steps: a sequence whose items are method configs (``EigenAttentionConfig(...)``,
        ``TuckerConfig(...)``, ``QuantApplyConfig(...)``, ``SpargeTuneConfig(...)``),
        ``(name, config)`` pairs, :class:`~jcompress.compose.Step` s or recipe mappings
        (``{"method": "quant", "rules": [...]}``); or a recipe mapping ``{"steps": [...]}``.

    Returns:
      A :class:`Chain` (call it; ``.preflight(params, cfg)`` checks it without running).

    Example::

      from jcompress.eigen_attention import EigenAttentionConfig
      from jcompress.quant.apply import QuantApplyConfig

      run = jcompress.chain([
          EigenAttentionConfig(avg_dim=4, error_budget=0.05),
          QuantApplyConfig(rules=((r"model/layers/\\d+/mlp/.*", "nvfp4"),)),
      ])
      params2, report = run(params, cfg, calib, eval_ids=ids)
      print(report.to_markdown())
    """
    if isinstance(steps, Mapping):
        return Chain(parse_recipe(steps))
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise UserError(f"steps: expected a sequence of steps, got {type(steps).__name__}")
    if not steps:
        raise UserError("steps: no steps")
    out = tuple(_as_step(item, i) for i, item in enumerate(steps))
    parse_recipe(out)  # order checks (an attention step last)
    return Chain(out)
