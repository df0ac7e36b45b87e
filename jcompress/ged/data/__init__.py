"""Condition files for GED: one sentence a line with the target word in square brackets.

``him.txt`` / ``her.txt`` (written for this project) are minimally paired: line ``i`` of each
uses the same sentence frame with ``[him]`` / ``[her]`` as an object pronoun in varied
positions (after verbs and prepositions, in questions, imperatives, quotes, comparisons).
Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from jcompress.errors import UserError

__all__ = ["HER_FILE", "HIM_FILE", "PronounExample", "load_condition_file", "parse_marked"]

_DIR = Path(__file__).resolve().parent
HIM_FILE = _DIR / "him.txt"
HER_FILE = _DIR / "her.txt"

_MARK = re.compile(r"\[([^\[\]]+)\]")


class PronounExample(NamedTuple):
    """A sentence without its brackets and the ``[start, end)`` character span of the target
    word in it (``text[start:end]`` is the word)."""

    text: str
    span: tuple[int, int]


def parse_marked(line: str, *, where: str = "sentence") -> PronounExample:
    """One sentence with exactly one ``[target]`` -> :class:`PronounExample` (brackets
    removed); a missing, repeated, empty or stray bracket is a :class:`UserError` naming
    ``where``."""
    marks = list(_MARK.finditer(line))
    stray = line.count("[") + line.count("]") != 2 * len(marks)
    if len(marks) != 1 or stray:
        raise UserError(
            f"{where}: expected exactly one [target] in square brackets, "
            f"found {len(marks)}{' and stray brackets' if stray else ''}: {line!r}"
        )
    m = marks[0]
    if not m.group(1).strip():
        raise UserError(f"{where}: empty [target]: {line!r}")
    text = line[: m.start()] + m.group(1) + line[m.end() :]
    return PronounExample(text, (m.start(), m.start() + len(m.group(1))))


def load_condition_file(path: str | Path) -> list[PronounExample]:
    """Read a condition file.

    Args:
      path: a UTF-8 text file, one sentence a line, exactly one ``[target]`` per sentence.

    Returns:
      One :class:`PronounExample` per sentence, in file order.

    Raises:
      UserError: a missing or empty file, or a line without exactly one marked target (stray
        brackets included), naming the file and line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read condition file ({e})") from None
    out = []
    for i, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append(parse_marked(line, where=f"{path}:{i}"))
    if not out:
        raise UserError(f"{path}: no sentences (the condition file is empty)")
    return out
