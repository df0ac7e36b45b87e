"""Errors raised for bad user input (the CLI prints these as one line, no traceback)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

__all__ = ["UserError", "comma_list", "naming"]


class UserError(ValueError):
    """Bad input from the caller: a missing file, an unknown option, a malformed checkpoint."""


def comma_list(text: object, *, arg: str, example: str, unique: bool = True) -> list[str]:
    """The stripped entries of a comma-separated flag value, one rule for every list flag.

    An empty value, an empty entry (``8,,16``, a trailing comma) and, with ``unique``, an
    entry given twice are errors naming ``arg`` and showing ``example`` (callers that
    normalise entries, e.g. ``nvfp4@16`` and ``nvfp4``, check duplicates again after it).

    Raises:
      UserError: as above.
    """
    s = str(text)
    parts = [p.strip() for p in s.split(",")]
    if not s.strip() or any(not p for p in parts):
        what = "is empty" if not s.strip() else f"has an empty entry in {s!r}"
        raise UserError(f"{arg}: {what} (e.g. {arg} {example})")
    if unique:
        for i, p in enumerate(parts):
            if p in parts[:i]:
                raise UserError(f"{arg}: {p!r} is given twice in {s!r}")
    return parts


_LEAD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*): ")


@contextlib.contextmanager
def naming(arg: str) -> Iterator[None]:
    """A :class:`UserError` raised inside names the flag ``arg`` first, as the CLI's errors
    do: a library message that already names a flag (``--...``) is kept; one led by the
    flag's library name (``seqlen: ...`` for ``--seqlen``) gets the flag's name instead;
    any other (``x.safetensors: corrupt header``) is prefixed with ``arg``."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        if msg.startswith("--"):
            raise
        m = _LEAD.match(msg)
        if m is not None and m.group(1) == arg.lstrip("-"):
            msg = msg[m.end() :]
        raise UserError(f"{arg}: {msg}") from None
