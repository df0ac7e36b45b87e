"""Activations for GED: sentences -> token ids and positions -> ``[L, N, D]`` hook activations
through the shared layer stream (:func:`jcompress.calibration.stream_layers`).

Hooks are chosen by regex over module paths *relative to a decoder layer* (the paths
:class:`~jcompress.models.forward.Capture` sees inside :meth:`StreamLayer.observe`), on a side
(the module's output or input). Two names stand for the MLP expansion of every family:

========  ======================================================  ===========================
hook      what                                                    module (gpt2 / opt / llama,
                                                                  qwen / mpt)
========  ======================================================  ===========================
``pre``   the expansion's output before the nonlinearity          output of ``mlp/c_fc`` /
          (the default; the seed's GPT-2 ``mlp.c_fc`` hook)       ``fc1`` / ``mlp/up_proj`` /
                                                                  ``ffn/up_proj``
``post``  the input of the down projection (after the             input of ``mlp/c_proj`` /
          nonlinearity; for gated MLPs ``act(gate) * up``)        ``fc2`` / ``mlp/down_proj``
                                                                  / ``ffn/down_proj``
========  ======================================================  ===========================

Sentences are right-padded to one length; the decoder is causal, so the padding never changes
an activation at a real token (no attention mask is needed and positions count from 0).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jcompress.errors import UserError
from jcompress.ged.data import PronounExample, parse_marked
from jcompress.sharding import to_host
from jcompress.validate import NonFiniteInput

__all__ = [
    "CaptureConfig",
    "HOOKS",
    "POSITIONS",
    "Hook",
    "Tokenized",
    "capture_activations",
    "capture_layer",
    "capture_windows",
    "layer_modules",
    "resolve_hook",
    "resolve_layers",
    "stream_capture",
    "tokenize_examples",
]

HOOKS = ("pre", "post")
POSITIONS = ("target", "last", "all")
SIDES = ("output", "input")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """Where to read activations for :func:`jcompress.ged.analyze`.

    Attributes:
      hook: ``pre`` (the MLP expansion's output before the nonlinearity: GPT-2 ``mlp/c_fc``,
        OPT ``fc1``, Llama/Qwen ``mlp/up_proj``, MPT ``ffn/up_proj``; the default), ``post``
        (the input of the down projection: ``c_proj`` / ``fc2`` / ``down_proj``), or a regex
        that fully matches exactly one module path inside a decoder layer (e.g.
        ``self_attn/o_proj``).
      side: with a regex hook, read the module's ``output`` or ``input``.
      position: which tokens give samples: ``target`` (the last token of the marked
        ``[word]``), ``last`` (each sentence's last token) or ``all`` (every token of the
        sentence; special tokens such as BOS are left out).
      layers: decoder layer indices to analyse; empty means every layer.
      batch_size: sentences per layer-stream batch.
    """

    hook: str = "pre"
    side: str = "output"
    position: str = "target"
    layers: tuple[int, ...] = ()
    batch_size: int = 32

    def __post_init__(self):
        if not isinstance(self.hook, str) or not self.hook:
            raise UserError(
                f"hook: must be 'pre', 'post' or a module-path regex, got {self.hook!r}"
            )
        if self.hook not in HOOKS:
            try:
                re.compile(self.hook)
            except re.error as e:
                raise UserError(f"hook: {self.hook!r} is not a valid regex ({e})") from None
        if self.side not in SIDES:
            raise UserError(f"side: must be one of {', '.join(SIDES)}, got {self.side!r}")
        if self.position not in POSITIONS:
            raise UserError(
                f"position: must be one of {', '.join(POSITIONS)}, got {self.position!r}"
            )
        layers = self.layers
        if not isinstance(layers, tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers
        ):
            raise UserError(f"layers: must be a tuple of layer indices >= 0, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise UserError(f"layers: repeated layer index in {layers!r}")
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise UserError(f"batch_size: must be a positive integer, got {b!r}")


# --------------------------------------------------------------------------- model side


@dataclasses.dataclass(frozen=True)
class Hook:
    """A resolved hook: the module path inside a layer, the side, and the width ``D``."""

    path: str
    side: str
    width: int

    @property
    def capture(self):
        from jcompress.models.forward import Capture

        pattern = re.escape(self.path)
        return Capture(outputs=pattern) if self.side == "output" else Capture(inputs=pattern)

    def describe(self) -> str:
        return f"{self.side} of {self.path}"


def layer_modules(cfg) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"inputs": {path: shape}, "outputs": {path: shape}}`` of every module inside decoder
    layer 0 for a ``[1, 2]`` token batch (shapes only: traced with ``jax.eval_shape``)."""
    import jax
    import jax.numpy as jnp

    from jcompress.models.convert import get_path, unflatten
    from jcompress.models.families import spec_for
    from jcompress.models.forward import Capture, apply_layer
    from jcompress.models.params import param_shapes

    flat = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(cfg).items()}
    root = spec_for(cfg.family.value).layout.layers
    lp = get_path(unflatten(flat), f"{root}/0")
    hidden = jax.ShapeDtypeStruct((1, 2, cfg.hidden_size), jnp.float32)
    _, cap = jax.eval_shape(
        lambda p, h: apply_layer(cfg, p, h, 0, capture=Capture(inputs=".+", outputs=".+")),
        lp,
        hidden,
    )
    return {k: {p: tuple(v.shape) for p, v in d.items()} for k, d in cap.items()}


def resolve_hook(cfg, config: CaptureConfig, *, arg: str = "hook") -> Hook:
    """The module path, side and width of ``config.hook`` in this model, or one clear error
    naming the paths there are (cheap: shapes only)."""
    from jcompress.models.families import spec_for

    lay = spec_for(cfg.family.value).layout
    if config.hook == "pre":
        path, side = lay.up, "output"
    elif config.hook == "post":
        path, side = lay.down, "input"
    else:
        path, side = None, config.side
    mods = layer_modules(cfg)[side + "s"]
    if path is None:
        hits = sorted(p for p in mods if re.fullmatch(config.hook, p))
        if len(hits) != 1:
            what = "matches no" if not hits else f"matches {len(hits)} ({', '.join(hits)})"
            raise UserError(
                f"{arg}: {config.hook!r} {what} module {side} inside one {cfg.family.value} layer "
                f"(exactly one needed; there are: {', '.join(sorted(mods))})"
            )
        path = hits[0]
    shape = mods[path]
    return Hook(path, side, int(shape[-1]))


def resolve_layers(cfg, config: CaptureConfig, *, arg: str = "layers") -> tuple[int, ...]:
    """``config.layers`` checked against the model (empty: all layers)."""
    n = cfg.num_layers
    bad = [i for i in config.layers if i >= n]
    if bad:
        raise UserError(f"{arg}: layer {bad[0]} out of range (the model has layers 0..{n - 1})")
    return tuple(config.layers) or tuple(range(n))


# --------------------------------------------------------------------------- text side


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Sentences as token ids and the positions that give samples.

    Attributes:
      ids: one ``[T_i]`` int32 array per sentence.
      positions: one ``[P_i]`` int array per sentence (token indices, ``P_i >= 1``).
      tokens: the token strings at those positions (for the report).
    """

    ids: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]
    tokens: tuple[tuple[str, ...], ...]

    @property
    def n_samples(self) -> int:
        return int(sum(p.size for p in self.positions))


def _as_example(x: Any, i: int, what: str) -> PronounExample:
    if isinstance(x, PronounExample):
        return x
    if isinstance(x, str):
        return parse_marked(x, where=f"{what}[{i}]")
    raise UserError(f"{what}[{i}]: expected a sentence string or PronounExample, got {type(x)}")


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Any], position: str, *, what: str = "texts"
) -> Tokenized:
    """Tokenize sentences and pick the sample positions.

    Args:
      tokenizer: a Hugging Face *fast* tokenizer (character offsets are needed).
      examples: :class:`~jcompress.ged.PronounExample` items or strings with one ``[target]``
        (with ``position="last"`` / ``"all"`` a string without brackets is taken whole).
      position: ``target``: the last token whose characters overlap the marked word (the
        first token that has read the whole word: the model is causal); ``last``: the last
        non-special token; ``all``: every non-special token.

    Raises:
      UserError: an empty list, a sentence that tokenizes to nothing, a target word no token
        covers, a tokenizer without offsets.
    """
    if position not in POSITIONS:
        raise UserError(f"position: must be one of {', '.join(POSITIONS)}, got {position!r}")
    if len(examples) == 0:
        raise UserError(f"{what}: no sentences")
    exs = []
    for i, x in enumerate(examples):
        if position != "target" and isinstance(x, str) and "[" not in x and "]" not in x:
            exs.append(PronounExample(x, (0, len(x))))
        else:
            exs.append(_as_example(x, i, what))
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{what}: the tokenizer ({type(tokenizer).__name__}) gives no character offsets; "
            "a fast (tokenizers-backed) tokenizer is needed"
        )
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        enc = tokenizer(
            [e.text for e in exs], return_offsets_mapping=True, return_special_tokens_mask=True
        )
    finally:
        transformers.logging.set_verbosity(level)
    ids_out, pos_out, tok_out = [], [], []
    for i, e in enumerate(exs):
        ids = np.asarray(enc["input_ids"][i], np.int32)
        offs = np.asarray(enc["offset_mapping"][i], np.int64).reshape(-1, 2)
        special = np.asarray(enc["special_tokens_mask"][i], bool)
        real = (~special) & (offs[:, 1] > offs[:, 0])
        if not real.any():
            raise UserError(f"{what}[{i}]: the sentence tokenizes to nothing: {e.text!r}")
        if position == "target":
            a, b = e.span
            hit = np.flatnonzero(real & (offs[:, 0] < b) & (offs[:, 1] > a))
            if hit.size == 0:
                raise UserError(f"{what}[{i}]: no token covers the target {e.text[a:b]!r}")
            pos = hit[-1:]
        elif position == "last":
            pos = np.flatnonzero(real)[-1:]
        else:
            pos = np.flatnonzero(real)
        ids_out.append(ids)
        pos_out.append(pos)
        toks = tokenizer.convert_ids_to_tokens([int(ids[p]) for p in pos])
        tok_out.append(tuple(str(t) for t in toks))
    return Tokenized(tuple(ids_out), tuple(pos_out), tuple(tok_out))


# --------------------------------------------------------------------------- capture


def _pad(ids: Sequence[np.ndarray], pad_id: int) -> np.ndarray:
    t = max(int(x.size) for x in ids)
    out = np.full((len(ids), t), pad_id, np.int32)
    for i, x in enumerate(ids):
        out[i, : x.size] = x
    return out


def capture_windows(
    ids: Sequence[np.ndarray], positions: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sentences as one right-padded ``[n, T]`` window array, and the sample rows
    (sentence) and columns (token) ``[N]`` in sentence then position order.

    Raises:
      UserError: no sentence, a positions array per sentence missing, a position past its
        sentence.
    """
    if len(ids) != len(positions) or not ids:
        raise UserError("capture: need one positions array per sentence (and >= 1 sentence)")
    for i, (x, p) in enumerate(zip(ids, positions, strict=True)):
        p = np.asarray(p)
        if p.size and (p.min() < 0 or p.max() >= x.size):
            raise UserError(f"capture: sentence {i} has {x.size} tokens, position {p.max()}")
    rows = np.concatenate([np.full(np.asarray(p).size, i) for i, p in enumerate(positions)])
    cols = np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in positions])
    return _pad(ids, 0), rows, cols


def capture_layer(layer, hook: Hook, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``[N, D]`` float32 activations at ``hook`` of one
    :class:`~jcompress.calibration.StreamLayer`, sample ``j`` at token ``cols[j]`` of window
    ``rows[j]`` (:func:`capture_windows`)."""
    out = np.zeros((rows.size, hook.width), np.float32)
    key = "outputs" if hook.side == "output" else "inputs"
    for ob in layer.observe(hook.capture):
        a = to_host(ob.captured[key][hook.path]).astype(np.float32, copy=False)[: ob.real]
        s = layer.batches[ob.batch].start
        sel = (rows >= s) & (rows < s + ob.real)
        out[sel] = a[rows[sel] - s, cols[sel]]
    return out


def check_finite(acts: np.ndarray, hook: Hook) -> np.ndarray:
    """``acts`` unchanged, or one error when any is NaN / Inf."""
    if not np.all(np.isfinite(acts)):
        raise NonFiniteInput(f"capture: non-finite activations at the {hook.describe()}")
    return acts


def capture_activations(
    cfg,
    params,
    ids: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    hook: Hook,
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    progress: bool = False,
    attention: Any = None,
) -> np.ndarray:
    """Hook activations at the given token positions of every sentence, per layer.

    One pass of :func:`jcompress.calibration.stream_layers` (sentences right-padded to one
    length; causal, so the padding does not reach real tokens), observing ``hook`` in each
    layer in ``layers`` (:func:`capture_layer`); later layers are not run. The streamed form
    (:func:`jcompress.ged.stream_analyze`) runs the same :func:`capture_layer` on layers read
    one at a time.

    Args:
      cfg, params: the model.
      ids: one ``[T_i]`` token-id array per sentence.
      positions: one ``[P_i]`` array of token indices per sentence.
      hook: :func:`resolve_hook`'s result.
      layers: decoder layer indices (any order; the result follows it).

    Returns:
      ``[len(layers), sum P_i, D]`` float32, samples in sentence order then position order.
    """
    from jcompress.calibration import stream_layers
    from jcompress.models.forward import DEFAULT_ATTENTION

    windows, rows, cols = capture_windows(ids, positions)
    want = {int(l): j for j, l in enumerate(layers)}
    out = np.zeros((len(layers), rows.size, hook.width), np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(want), desc="capture", unit="layer", leave=False)
    stream = stream_layers(
        cfg, params, windows, batch_size=batch_size,
        attention=DEFAULT_ATTENTION if attention is None else attention,
    )  # fmt: skip
    try:
        last = max(want)
        for layer in stream:
            if layer.index in want:
                out[want[layer.index]] = capture_layer(layer, hook, rows, cols)
                if bar is not None:
                    bar.update()
            if layer.index >= last:
                break
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    return check_finite(out, hook)


@dataclasses.dataclass(frozen=True)
class _StreamedCapture:
    """The identity of a streamed capture (:func:`stream_capture`'s work directory)."""

    capture: CaptureConfig
    hook: str
    side: str
    positions_sha256: str


def stream_capture(
    model: Any,
    ids: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    capture: CaptureConfig,
    *,
    work_dir: Any = None,
    resume: bool = False,
    dtype: Any = None,
    offload_dir: Any = None,
    progress: bool = False,
    on_layer: Any = None,
) -> np.ndarray | None:
    """:func:`capture_activations` reading the checkpoint one decoder layer at a time.

    Layers ``0 .. max(layers)`` are read from the safetensors shards one at a time and
    dropped (:func:`jcompress.streaming.stream_analysis`: peak memory ~ one layer plus the
    sentences' hidden states, offloaded with ``offload_dir``); each requested layer runs
    :func:`capture_layer`, as in memory, so the activations are :func:`capture_activations`'s.

    Args:
      model: checkpoint directory (safetensors) or a
        :class:`~jcompress.streaming.LayerLoader` (its account shows what was held).
      ids, positions: as for :func:`capture_activations`.
      capture: the hook, side, layers and batch size (:func:`resolve_hook`,
        :func:`resolve_layers`); with the sentences and positions, the run's identity.
      work_dir, resume, offload_dir, progress, on_layer: as for
        :func:`~jcompress.streaming.stream_analysis` (finished layers' activations are kept
        in ``work_dir``).
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.

    Returns:
      ``[len(layers), sum P_i, D]`` float32 (``None`` on processes other than 0 of a
      multi-host run).
    """
    import hashlib

    from jcompress.streaming import LayerLoader, stream_analysis

    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    hook = resolve_hook(loader.cfg, capture)
    layers = resolve_layers(loader.cfg, capture)
    windows, rows, cols = capture_windows(ids, positions)
    digest = hashlib.sha256(np.stack([rows, cols]).astype(np.int64).tobytes()).hexdigest()

    def one(layer):
        return {"acts": capture_layer(layer, hook, rows, cols)}

    res = stream_analysis(
        loader, one, windows, method="ged", config=_StreamedCapture(capture, hook.path,
        hook.side, digest), layers=layers, batch_size=capture.batch_size, work_dir=work_dir,
        resume=resume, offload_dir=offload_dir, progress=progress, on_layer=on_layer,
    )  # fmt: skip
    if res is None:
        return None
    return check_finite(np.stack([res.results[i]["acts"] for i in layers]), hook)
