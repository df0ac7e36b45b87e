"""Recovery fine-tuning after EigenAttention (the reference's ``--fine_tune``).

A short optax run on calibration windows that tunes the low-rank factors and nothing else: for
every :class:`~jcompress.leaves.HeadLowRank` k/q/v projection its ``a`` (``[in, heads * r]``,
the projection onto each head's basis) and for every
:class:`~jcompress.leaves.HeadFoldedOut` o_proj its ``w`` (``[Hq * r, out]``). The bases
(``b = U^T`` and ``ut``) stay as calibrated: orthonormal, and the v projection's ``b`` still
equal to o_proj's ``ut``, so the latent-value forward pass, the KV-cache widths and
``materialize`` (the dense export) stay exact. Everything else (embeddings, norms, MLPs, dense
layers) is frozen. The loss is the mean next-token NLL of the windows (``window_nll``), one
jitted step per batch (``value_and_grad`` + ``optax.adamw``), with a progress bar; a held-out
perplexity before and after goes into the :class:`FineTuneReport`.

References:
  Saxena et al., "EigenAttention", arXiv:2408.05646 (reference code: ``--fine_tune``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLowRank
from jcompress.models.config import ModelConfig
from jcompress.models.convert import flatten, unflatten

__all__ = ["FineTuneConfig", "FineTuneReport", "fine_tune", "trainable_factors"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    """Settings of :func:`fine_tune`.

    Attributes:
      steps: optimizer steps (``--ft_steps``).
      lr: peak AdamW learning rate (``--ft_lr``); cosine decay to 0 after a 10% warmup.
      batch_size: windows per step (drawn without replacement, reshuffled every epoch).
      weight_decay: AdamW weight decay.
      seed: window order.
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name}: must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise UserError(f"lr: must be in (0, 1), got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise UserError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")


@dataclasses.dataclass(frozen=True)
class FineTuneReport:
    """What :func:`fine_tune` did: losses per step, held-out perplexity before / after."""

    steps: int
    lr: float
    trainable_params: int
    losses: tuple[float, ...]
    heldout_ppl_before: float | None
    heldout_ppl_after: float | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"losses": list(self.losses)}


def trainable_factors(params: Any) -> dict[str, jax.Array]:
    """The arrays :func:`fine_tune` tunes, by flat path: ``<path>/a`` of every ``HeadLowRank``
    and ``<path>/w`` of every ``HeadFoldedOut``. Empty when nothing was compressed."""
    out = {}
    for k, v in flatten(params).items():
        if isinstance(v, HeadLowRank):
            out[f"{k}/a"] = v.a
        elif isinstance(v, HeadFoldedOut):
            out[f"{k}/w"] = v.w
    return out


def _merge(flat: dict, trainable: dict) -> Any:
    """``flat`` params with the tuned factors put back into their leaves."""
    new = dict(flat)
    for key, arr in trainable.items():
        path, field = key.rsplit("/", 1)
        new[path] = dataclasses.replace(new[path], **{field: arr})
    return unflatten(new)


def _nll(cfg, flat, trainable, ids):
    from jcompress.eval.perplexity import window_nll

    # "dense" attention: the default ("chunked") loops with dynamic bounds, which reverse-mode
    # differentiation cannot go through
    return jnp.mean(window_nll(cfg, _merge(flat, trainable), ids, attention="dense"))


@functools.partial(jax.jit, static_argnames=("cfg", "opt"))
def _step(cfg, flat, trainable, opt_state, ids, *, opt):
    loss, grads = jax.value_and_grad(functools.partial(_nll, cfg, flat))(trainable, ids)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def fine_tune(
    params: Any,
    cfg: ModelConfig,
    windows: Any,
    *,
    config: FineTuneConfig = FineTuneConfig(),  # noqa: B008 - frozen, immutable
    heldout: Any = None,
    heldout_seqlen: int | None = None,
    heldout_max_windows: int | None = None,
    progress: bool = True,
) -> tuple[Any, FineTuneReport]:
    """Tune the low-rank factors of an EigenAttention-compressed model on ``windows``.

    Args:
      params: params from :func:`jcompress.eigen_attention.compress` (with ``HeadLowRank`` /
        ``HeadFoldedOut`` leaves; the input is not modified).
      cfg: model config.
      windows: ``[n, T]`` integer token ids (e.g. the calibration windows).
      config: :class:`FineTuneConfig`.
      heldout: optional token stream ``[N]`` for perplexity before / after (never trained on).
      heldout_seqlen, heldout_max_windows: its windows (default: ``T``, all).
      progress: progress bar over steps.

    Returns:
      ``(params, report)``: the same tree and leaf types with tuned ``a`` / ``w`` arrays, and a
      :class:`FineTuneReport`.
    """
    from jcompress.eval import perplexity

    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise UserError(f"windows: expected integer token ids [n, T], got {windows.dtype}"
                        f"{list(windows.shape)}")  # fmt: skip
    if windows.min() < 0 or windows.max() >= cfg.vocab_size:
        raise UserError(f"windows: token ids must lie in [0, {cfg.vocab_size})")
    flat = flatten(params)
    trainable = trainable_factors(params)
    if not trainable:
        raise UserError("params: no HeadLowRank / HeadFoldedOut leaves to fine-tune "
                        "(nothing was compressed)")  # fmt: skip

    def ppl(p):
        if heldout is None:
            return None
        return perplexity(cfg, p, heldout, seqlen=heldout_seqlen or windows.shape[1],
                          max_windows=heldout_max_windows, progress=False).ppl  # fmt: skip

    t0 = time.perf_counter()
    before = ppl(params)
    warmup = max(1, config.steps // 10)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, warmup, max(config.steps, warmup + 1)
    )
    opt = optax.adamw(sched, weight_decay=config.weight_decay)
    trainable = {k: jnp.array(v, jnp.float32) for k, v in trainable.items()}  # own copies
    dtypes = {k: v.dtype for k, v in trainable_factors(params).items()}
    opt_state = opt.init(trainable)
    bs = min(config.batch_size, windows.shape[0])
    rng = np.random.default_rng(config.seed)
    order, pos = rng.permutation(windows.shape[0]), 0
    losses = []
    for _ in tqdm(range(config.steps), desc="fine_tune", disable=not progress, leave=False):
        if pos + bs > order.size:
            order, pos = rng.permutation(windows.shape[0]), 0
        ids = jnp.asarray(windows[order[pos : pos + bs]])
        pos += bs
        trainable, opt_state, loss = _step(cfg, flat, trainable, opt_state, ids, opt=opt)
        losses.append(loss)
    losses = [float(x) for x in jax.device_get(losses)]
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("fine_tune: the loss became NaN/inf; lower --ft_lr")
    out = _merge(flat, {k: v.astype(dtypes[k]) for k, v in trainable.items()})
    report = FineTuneReport(
        steps=config.steps,
        lr=config.lr,
        trainable_params=sum(int(v.size) for v in trainable.values()),
        losses=tuple(losses),
        heldout_ppl_before=before,
        heldout_ppl_after=ppl(out),
        seconds=time.perf_counter() - t0,
    )
    return out, report
