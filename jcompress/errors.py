"""Errors raised for bad user input (the CLI prints these as one line, no traceback)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the caller: a missing file, an unknown option, a malformed checkpoint."""
