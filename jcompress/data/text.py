"""Text sources and tokenization.

Sources are addressed by path: a plain text file (read whole, UTF-8) or a JSONL file whose
objects carry a ``"text"`` field (joined with ``"\\n\\n"``, the protocol of
``shared/data/README.md``). Tokenization uses the model's own tokenizer through
``transformers.AutoTokenizer`` from a local directory (never the network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jcompress.errors import UserError

__all__ = ["read_text", "load_tokenizer", "tokenize", "load_tokens"]


def read_text(path: str | os.PathLike) -> str:
    """The text of a ``.txt`` file, or the ``"text"`` fields of a ``.jsonl`` joined by blank
    lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data: {p} is not a file (expected a .txt or .jsonl text file)")
    if p.suffix == ".jsonl":
        texts = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f'{p}:{n}: JSONL objects need a string "text" field')
                texts.append(obj["text"])
        return "\n\n".join(texts)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_tokenizer(model_dir: str | os.PathLike, *, cfg: Any = None) -> Any:
    """The model's tokenizer from its directory (offline).

    Args:
      model_dir: directory with ``tokenizer.json`` (or ``tokenizer.model`` / ``vocab.json``).
      cfg: the model's :class:`~jcompress.ModelConfig`; when given, a tokenizer whose
        vocabulary is larger than ``cfg.vocab_size`` is an error.

    Raises:
      UserError: no tokenizer files, a tokenizer file that is not valid JSON / not a JSON
        object, a tokenizer transformers cannot build, or one too large for ``cfg``.
    """
    from transformers import AutoTokenizer

    d = Path(model_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(
            f"model_dir: {d} has no tokenizer files (tokenizer.json / tokenizer.model / vocab.json)"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if not f.is_file():
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{f}: must be a JSON object, got a JSON {type(obj).__name__}")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        files = ", ".join(
            f for f in ("tokenizer.json", "tokenizer.model", "vocab.json") if (d / f).is_file()
        )
        raise UserError(
            f"model_dir: cannot build a tokenizer from {files} in {d} ({type(e).__name__}: {first})"
        ) from None
    if cfg is not None:
        from jcompress.validate import check_tokenizer

        check_tokenizer(cfg, tok)
    return tok


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """``tokenizer(text)["input_ids"]`` as an int32 array ``[N]`` (no truncation warnings)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        transformers.logging.set_verbosity(level)
    return np.asarray(ids, dtype=np.int32)


def load_tokens(path: str | os.PathLike, tokenizer: Any) -> np.ndarray:
    """Read a text source and tokenize it whole: ``[N]`` int32 ids."""
    return tokenize(tokenizer, read_text(path))
