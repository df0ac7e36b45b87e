"""The whole GED pipeline on a model: sentences of two conditions -> hook activations per layer
(:mod:`jcompress.ged.capture`, through the shared layer stream) -> fit, permutation test and
held-out separation per layer (:func:`jcompress.ged.fit_layers`) -> report and figures."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jcompress.errors import UserError
from jcompress.ged.capture import (
    CaptureConfig,
    Hook,
    Tokenized,
    capture_activations,
    resolve_hook,
    resolve_layers,
    tokenize_examples,
)
from jcompress.ged.config import GEDConfig
from jcompress.ged.fit import LayerTable, fit_layers

__all__ = ["GEDAnalysis", "analyze", "stream_analyze"]

_CONFIG, _CAPTURE = GEDConfig(), CaptureConfig()


@dataclasses.dataclass(frozen=True)
class GEDAnalysis:
    """Result of :func:`analyze`.

    Attributes:
      table: the per-layer :class:`~jcompress.ged.LayerTable` (fits with the swap, nulls,
        held-out results), rows in ``layers`` order.
      layers: the decoder layer indices analysed.
      hook: the resolved hook (module path inside a layer, side, width ``D``).
      position: the token-position rule (``target`` / ``last`` / ``all``).
      acts_s, acts_r: ``[L, N_S, D]`` / ``[L, N_R, D]`` captured activations.
      tokens_s, tokens_r: the token strings sampled per sentence.
      config: the :class:`GEDConfig` used. labels: names of the two conditions.
    """

    table: LayerTable
    layers: tuple[int, ...]
    hook: Hook
    position: str
    acts_s: np.ndarray
    acts_r: np.ndarray
    tokens_s: tuple[tuple[str, ...], ...]
    tokens_r: tuple[tuple[str, ...], ...]
    config: GEDConfig
    labels: tuple[str, str] = ("S", "R")

    @property
    def best(self) -> int:
        """Row of the layer with the highest held-out accuracy (ties: the lower p-value)."""
        t = self.table
        return int(np.lexsort((t.p_value, -t.accuracy))[0])

    def to_json(self) -> dict[str, Any]:
        t = self.table
        layers = []
        for i, layer in enumerate(self.layers):
            res = t.results[i]
            row = {
                "layer": layer,
                **res.to_json(top=10),
                "p_value": float(t.p_value[i]),
                "null_p95": float(np.percentile(t.nulls[i], 95)) if t.nulls[i].size else None,
                "cv": t.cvs[i].to_json() if t.cvs else None,
                "top_neurons": [int(j) for j in np.argsort(-np.abs(np.asarray(res.maps[:, 0])))][
                    :10
                ],
            }
            layers.append(row)
        return {
            "hook": {"path": self.hook.path, "side": self.hook.side, "width": self.hook.width},
            "position": self.position,
            "labels": list(self.labels),
            "n_samples": [int(self.acts_s.shape[1]), int(self.acts_r.shape[1])],
            "config": dataclasses.asdict(self.config),
            "best_layer": self.layers[self.best],
            "layers": layers,
        }

    def to_markdown(self) -> str:
        t = self.table
        a, b = self.labels
        k = self.config.n_components
        pca = f"{self.config.variance_threshold:g}" if k is None else f"K = {k} (fixed)"
        lines = [
            f"GED of {a} (signal) vs {b} (reference): {self.hook.describe()} "
            f"(D = {self.hook.width}), position `{self.position}`, "
            f"{self.acts_s.shape[1]} vs {self.acts_r.shape[1]} samples, "
            f"PCA {pca}, shrinkage {self.config.shrinkage}, "
            f"{self.config.n_permutations} permutations, {self.config.n_folds}-fold CV",
            "",
            "| layer | K | rank R before -> after | top eigenvalues | swap top | p (top) "
            "| held-out acc | Cohen's d |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, layer in enumerate(self.layers):
            r = t.results[i]
            ev = ", ".join(f"{float(v):.3g}" for v in np.asarray(r.eigenvalues)[:3])
            sw = "-" if r.swapped is None else f"{float(r.swapped.eigenvalues[0]):.3g}"
            lines.append(
                f"| {layer} | {r.n_components} | {int(r.rank_r_before)} -> {int(r.rank_r_after)} "
                f"| {ev} | {sw} | {float(t.p_value[i]):.3g} | {float(t.accuracy[i]):.3f} "
                f"| {float(t.cohens_d[i]):.2f} |"
            )
        return "\n".join(lines)

    def figures(self, directory: str | Path) -> list[Path]:
        """Write the figures into ``directory``: per-layer summary, and for the best layer
        (:attr:`best`) the scree plot, the spectrum against the permutation null, held-out
        score histograms and the top neurons of the top map."""
        from jcompress.ged import figures as fg

        d = Path(directory)
        i, t = self.best, self.table
        layer = self.layers[i]
        out = [fg.layer_summary(t, d / "layers.png", layers=self.layers)]
        res = t.results[i]
        out.append(
            fg.scree(
                res,
                d / f"scree_layer{layer}.png",
                threshold=(
                    self.config.variance_threshold if self.config.n_components is None else None
                ),
            )
        )
        out.append(
            fg.spectrum_vs_null(
                res, t.nulls[i], d / f"spectrum_layer{layer}.png", p_value=float(t.p_value[i])
            )
        )
        if t.cvs:
            out.append(
                fg.score_histograms(t.cvs[i], d / f"scores_layer{layer}.png", labels=self.labels)
            )
        out.append(fg.top_neurons(res, d / f"neurons_layer{layer}.png"))
        return out


def _check_sizes(
    n_s: int, n_r: int, config: GEDConfig, what: tuple[str, str], width: int | None = None
) -> None:
    """Enough samples per condition for the folds and, given the hook's ``width``, for a
    fixed ``n_components`` (checked again per fit; here before anything is captured)."""
    for name, n in zip(what, (n_s, n_r), strict=True):
        if n < max(config.n_folds, 2):
            raise UserError(
                f"{name}: {n} samples, need at least {max(config.n_folds, 2)} "
                f"(n_folds={config.n_folds})"
            )
    k = config.n_components
    if k is not None and width is not None:
        from jcompress.ged.fit import _max_components

        avail = _max_components(n_s, n_r, width, config.center)
        if k > avail:
            raise UserError(
                f"n_components: {k} exceeds the {avail} components that {n_s} + {n_r} samples "
                f"of {width} neurons allow; allowed: 1 <= n_components <= {avail}"
            )


def analyze(
    cfg,
    params,
    texts_s: Sequence[Any],
    texts_r: Sequence[Any],
    *,
    tokenizer: Any,
    config: GEDConfig = _CONFIG,
    capture: CaptureConfig = _CAPTURE,
    labels: tuple[str, str] = ("S", "R"),
    progress: bool = True,
) -> GEDAnalysis:
    """GED of two conditions of sentences on a model, every selected layer.

    Args:
      cfg, params: the model (:func:`jcompress.load_hf`); any supported family.
      texts_s, texts_r: sentences of the signal and reference conditions:
        :class:`~jcompress.ged.PronounExample` items (:func:`~jcompress.ged.load_condition_file`)
        or strings with the target word in ``[brackets]``.
      tokenizer: the model's fast tokenizer (:func:`jcompress.data.load_tokenizer`).
      config: :class:`GEDConfig` (PCA threshold, shrinkage, permutations, folds, seed).
      capture: :class:`~jcompress.ged.CaptureConfig` (hook, side, token position, layers,
        batch size); the default reads the MLP expansion's output before the nonlinearity at
        the marked target token of every layer.
      labels: names of the two conditions (report and figures).
      progress: tqdm bars for the capture and the per-layer fits.

    Returns:
      :class:`GEDAnalysis` (``to_json`` / ``to_markdown`` / ``figures``).

    Raises:
      UserError: a hook that matches no module (or several), a layer out of range, an empty
        condition, an unmarked target, too few samples for ``n_folds`` -- all before the
        model runs.

    Example::

      cfg, params = jcompress.load_hf("models/gpt2")
      tok = jcompress.data.load_tokenizer("models/gpt2")
      res = analyze(cfg, params, load_condition_file(HIM_FILE), load_condition_file(HER_FILE),
                    tokenizer=tok, labels=("him", "her"))
      print(res.to_markdown()); res.figures("out/")
    """
    hook, layers, tok_s, tok_r = _prepare(cfg, texts_s, texts_r, tokenizer, config, capture,
                                          labels)  # fmt: skip
    acts = capture_activations(
        cfg,
        params,
        tok_s.ids + tok_r.ids,
        tok_s.positions + tok_r.positions,
        hook,
        layers,
        batch_size=capture.batch_size,
        progress=progress,
    )
    return _finish(acts, hook, layers, tok_s, tok_r, config, capture, labels, progress)


def stream_analyze(
    model: str | os.PathLike | Any,
    texts_s: Sequence[Any],
    texts_r: Sequence[Any],
    *,
    tokenizer: Any,
    config: GEDConfig = _CONFIG,
    capture: CaptureConfig = _CAPTURE,
    labels: tuple[str, str] = ("S", "R"),
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dtype: Any = None,
    offload_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_layer: Any = None,
) -> GEDAnalysis | None:
    """:func:`analyze` reading the checkpoint one decoder layer at a time.

    Layers ``0 .. max(capture.layers)`` are read from the safetensors shards one at a time
    (:func:`jcompress.streaming.stream_analysis`: peak memory ~ one layer plus the sentences'
    hidden states, offloaded with ``offload_dir``); each requested layer's activations are
    captured exactly as :func:`analyze` does (:func:`~jcompress.ged.capture.capture_layer`)
    and the fits run on them at the end. The result equals :func:`analyze`'s.

    Args:
      model: checkpoint directory (safetensors) or a
        :class:`~jcompress.streaming.LayerLoader` (its account shows what was held).
      texts_s, texts_r, tokenizer, config, capture, labels, progress: as for :func:`analyze`.
      work_dir, resume, offload_dir, on_layer: as for
        :func:`~jcompress.streaming.stream_analysis` (the captured activations of finished
        layers are kept in ``work_dir``; the run's identity is the capture settings, so a
        resumed run may change the fit settings ``config``).
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.

    Returns:
      :class:`GEDAnalysis` (``None`` on processes other than 0 of a multi-host run).

    Raises:
      UserError: as :func:`analyze`, and as :func:`~jcompress.streaming.stream_analysis`
        (bad checkpoint, work directory of another run), before any layer is read.
    """
    from jcompress.ged.capture import stream_capture
    from jcompress.streaming import LayerLoader

    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    hook, layers, tok_s, tok_r = _prepare(loader.cfg, texts_s, texts_r, tokenizer, config,
                                          capture, labels)  # fmt: skip
    acts = stream_capture(
        loader, tok_s.ids + tok_r.ids, tok_s.positions + tok_r.positions, capture,
        work_dir=work_dir, resume=resume, offload_dir=offload_dir, progress=progress,
        on_layer=on_layer,
    )  # fmt: skip
    if acts is None:
        return None
    return _finish(acts, hook, layers, tok_s, tok_r, config, capture, labels, progress)


def _prepare(cfg, texts_s, texts_r, tokenizer, config, capture, labels):
    """Every check :func:`analyze` makes before the model runs: hook, layers, tokenization,
    sample counts, vocabulary."""
    hook = resolve_hook(cfg, capture)
    layers = resolve_layers(cfg, capture)
    tok_s = tokenize_examples(tokenizer, texts_s, capture.position, what=labels[0])
    tok_r = tokenize_examples(tokenizer, texts_r, capture.position, what=labels[1])
    _check_sizes(tok_s.n_samples, tok_r.n_samples, config, labels, hook.width)
    _check_vocab(cfg, tok_s, tok_r)
    return hook, layers, tok_s, tok_r


def _finish(acts, hook, layers, tok_s, tok_r, config, capture, labels, progress) -> GEDAnalysis:
    """The fits on captured ``acts [L, N_S + N_R, D]``."""
    n_s = tok_s.n_samples
    acts_s, acts_r = acts[:, :n_s], acts[:, n_s:]
    table = fit_layers(acts_s, acts_r, config=config, swap=True, progress=progress)
    return GEDAnalysis(
        table=table,
        layers=layers,
        hook=hook,
        position=capture.position,
        acts_s=acts_s,
        acts_r=acts_r,
        tokens_s=tok_s.tokens,
        tokens_r=tok_r.tokens,
        config=config,
        labels=tuple(labels),
    )


def _check_vocab(cfg, *toks: Tokenized) -> None:
    from jcompress.models.forward import check_length

    longest = max(x.size for t in toks for x in t.ids)
    check_length(cfg, longest)
    top = max(int(x.max()) for t in toks for x in t.ids)
    if top >= cfg.vocab_size:
        raise UserError(
            f"tokenizer: token id {top} is outside the model's vocabulary of {cfg.vocab_size}"
        )
