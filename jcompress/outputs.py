"""The one output-path guard: jcompress never destroys a user's data.

Every command checks each output path with :func:`check_output_dir` / :func:`check_output_file`
*before* loading any model, so a bad destination costs one line and exit status 2, not a
model load and certainly not a deleted directory. The rules:

* An existing destination is replaced only with ``overwrite=True`` (``--overwrite``), and a
  directory only if jcompress itself wrote it: it holds the :data:`MARKER` file that
  :func:`jcompress.atomic.atomic_dir` writes into every directory it creates (an empty directory
  is replaceable too: nothing is lost).
* Never an input of the same run (paths compared after resolving symlinks), never an ancestor of
  an input (replacing it would delete the input), never an existing path inside an input
  directory (e.g. ``--json`` onto the model's ``config.json``).
* A file is replaced only if it has the form jcompress writes there: a ``.json`` destination
  must hold a JSON object (every report is one), and callers name their own form for other
  files (``owner=``: a thresholds file, an activation cache), so ``--overwrite`` never
  replaces, say, a notes file or a model shard given as an output by mistake.
* A file where a directory is expected and vice versa, a symlink as the destination, a parent
  that is a file or not writable, or (given an estimate) too little free disk space are errors.
* An interrupted replacement of the same destination is completed and stale temporaries of
  killed runs are cleaned first (:func:`jcompress.atomic.recover`, ``clean_stale``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from jcompress.errors import UserError

__all__ = [
    "MARKER",
    "check_output_dir",
    "check_output_file",
    "json_report",
    "safetensors_metadata",
    "is_jcompress_output",
    "path_bytes",
    "write_marker",
]

MARKER = ".jcompress-output"

PathLike = str | os.PathLike
Inputs = Sequence[PathLike] | Mapping[str, PathLike]


def write_marker(directory: PathLike) -> Path:
    """Write the :data:`MARKER` file (tool version, time, pid) into ``directory``."""
    from jcompress import __version__

    p = Path(directory) / MARKER
    body = {"tool": "jcompress", "version": __version__, "time": time.time(), "pid": os.getpid()}
    p.write_text(json.dumps(body) + "\n")
    return p


def is_jcompress_output(path: PathLike) -> bool:
    """True when ``path`` is a directory written by jcompress (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def path_bytes(path: PathLike) -> int:
    """Total size of a file, or of the regular files under a directory (0 if missing)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _named(inputs: Inputs | None) -> list[tuple[str, Path]]:
    if not inputs:
        return []
    items: Iterable = inputs.items() if isinstance(inputs, Mapping) else ((None, p) for p in inputs)
    return [(name or str(p), Path(p)) for name, p in items if p is not None]


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _is_within(child: Path, parent: Path) -> bool:
    return child != parent and child.is_relative_to(parent)


def _check_inputs(path: Path, inputs: Inputs | None, arg: str) -> None:
    real = _real(path)
    for name, inp in _named(inputs):
        ri = _real(inp)
        what = f"the input {name}" if name != str(inp) else "an input of this run"
        if real == ri:
            raise UserError(f"{arg}: {path} is {what} ({inp}); refusing to write over it")
        if _is_within(ri, real):
            raise UserError(f"{arg}: {path} contains {what} ({inp}); refusing to write over it")
        if _is_within(real, ri) and (path.exists() or path.is_symlink()):
            raise UserError(f"{arg}: {path} is part of {what} ({inp}); refusing to write over it")


def _check_parent(path: Path, arg: str, need_bytes: int | None) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise UserError(f"{arg}: {parent} is a broken symlink")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{arg}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{arg}: cannot write in {parent} (permission denied)")
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise UserError(
                f"{arg}: not enough free disk space in {parent} (about {_mb(need_bytes)} needed, "
                f"{_mb(free)} free)"
            )


def _hint(arg: str) -> str:
    flag = "--overwrite" if arg.startswith("--") else "overwrite=True"
    return f"pass {flag} to replace it"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_output_dir(
    path: PathLike,
    *,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    arg: str = "--out",
    need_bytes: int | None = None,
    require_marker: bool = True,
) -> Path:
    """Check that the directory ``path`` may be (re)written by this run; cheap, call it before
    any heavy work. Completes an interrupted replacement of ``path`` and removes stale
    temporaries of killed runs first.

    Args:
      path: the output directory.
      inputs: the run's input paths (a sequence, or a mapping flag name -> path for messages).
      overwrite: whether the user allowed replacing an existing ``path``.
      arg: the flag naming ``path`` in error messages.
      need_bytes: estimated size of the output; too little free space is an error.
      require_marker: with ``overwrite``, replace only a directory jcompress wrote (or an
        empty one). Library functions whose documented ``overwrite=True`` replaces any
        directory (:func:`jcompress.save_hf`) pass False; the CLI never does.

    Returns:
      ``path`` as a Path.

    Raises:
      UserError: one line naming ``arg`` (see the module docstring for the rules).

    In a multi-host run process 0 checks (and cleans up), and every process raises its error.
    """
    from jcompress.atomic import on_writer

    path = Path(path)
    on_writer(
        lambda: _check_dir(path, inputs, overwrite, arg, need_bytes, require_marker),
        path=path,
        arg=arg,
    )
    return path


def _check_dir(path, inputs, overwrite, arg, need_bytes, require_marker) -> None:
    from jcompress.atomic import clean_stale, recover

    _check_inputs(path, inputs, arg)
    if path.parent.is_dir():
        recover(path)
        clean_stale(path)
    if path.is_symlink():
        raise UserError(f"{arg}: {path} is a symlink; give the directory itself")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{arg}: {path} already exists and is a file; expected a directory")
        if not overwrite:
            raise UserError(f"{arg}: {path} already exists ({_hint(arg)})")
        if require_marker and not (is_jcompress_output(path) or not any(path.iterdir())):
            raise UserError(
                f"{arg}: {path} exists and was not written by jcompress (no {MARKER}); "
                "refusing to replace it (remove it yourself or choose another path)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{arg}: cannot replace {path} (permission denied)")
    _check_parent(path, arg, need_bytes)


Owner = tuple  # (predicate: Path -> bool, description: str)


def json_report(path: Path) -> bool:
    """Whether ``path`` holds a JSON object (the form of every report jcompress writes)."""
    try:
        with open(path, encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def safetensors_metadata(path: Path, **want: str) -> bool:
    """Whether ``path`` is a safetensors file whose ``__metadata__`` has each ``key=value`` of
    ``want`` (a value of ``"*"``: the key is present)."""
    from jcompress.models.safetensors_io import SafetensorsFile

    try:
        meta = SafetensorsFile(path).metadata
    except (UserError, OSError):
        return False
    return all(k in meta and (v == "*" or meta[k] == v) for k, v in want.items())


JSON_REPORT: Owner = (json_report, "a JSON object (a jcompress report)")


def check_output_file(
    path: PathLike,
    *,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    arg: str = "--json",
    owner: Owner | None = None,
) -> Path:
    """Check that the file ``path`` may be (re)written by this run (same rules as
    :func:`check_output_dir`, for a file: an existing file needs ``overwrite`` and must have
    the form ``owner = (predicate, description)`` says jcompress writes there; default:
    :data:`JSON_REPORT` for a ``.json`` path, any file otherwise)."""
    from jcompress.atomic import on_writer

    path = Path(path)
    if owner is None and path.suffix.lower() == ".json":
        owner = JSON_REPORT
    on_writer(lambda: _check_file(path, inputs, overwrite, arg, owner), path=path, arg=arg)
    return path


def _check_file(path, inputs, overwrite, arg, owner=None) -> None:
    from jcompress.atomic import clean_stale

    _check_inputs(path, inputs, arg)
    if path.is_dir():
        raise UserError(f"{arg}: {path} is a directory; give a file path")
    if path.parent.is_dir():
        clean_stale(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{arg}: {path} is a broken symlink")
    if path.exists():
        if not overwrite:
            raise UserError(f"{arg}: {path} already exists ({_hint(arg)})")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UserError(f"{arg}: cannot replace {path} (permission denied)")
        if owner is not None and path.is_file() and not owner[0](path):
            raise UserError(
                f"{arg}: {path} exists and is not {owner[1]}; --overwrite replaces only "
                "output of the form jcompress writes there (move or remove it yourself)"
            )
    _check_parent(path, arg, None)
