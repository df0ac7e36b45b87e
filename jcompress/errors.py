"""Errors raised for bad user input (the CLI prints these as one line, no traceback)."""

from __future__ import annotations

__all__ = ["UserError", "comma_list"]


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
