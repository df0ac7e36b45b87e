"""Atomic writes: nothing half-written is ever left at a destination path.

A directory output is built in a hidden temporary sibling ``.NAME.tmp-<pid>-<rand>`` of the
destination ``NAME`` and renamed into place only when complete (:func:`atomic_dir`).

* Not replacing (the default): the final rename is ``renameat2(RENAME_NOREPLACE)`` on Linux,
  so it fails if ``NAME`` appeared meanwhile (e.g. a concurrent run of the same output). The
  fallback elsewhere serializes the check-then-rename with an ``O_EXCL`` lock file
  ``.NAME.lock``. The loser keeps its finished result in a visible sibling
  ``NAME.conflict-<pid>-<rand>`` and raises :class:`DestinationExists` naming it.
* Replacing (``overwrite=True``, :func:`replace_dir`): a two-rename swap, made recoverable by a
  journal ``.NAME.swap.json`` next to the destination::

      1. write the journal {"pid", "old", "new"}   <- the commit point: "new" is complete
      2. rename NAME      -> .NAME.old-<pid>-<rand>
      3. rename new (tmp) -> NAME
      4. delete the old directory, then the journal

  A run killed anywhere after 1 leaves the journal behind; the next :func:`atomic_dir` or
  :func:`recover` of the same destination (``jcompress`` does it before any work on an output)
  rolls the swap forward: ``NAME`` ends up holding the new result and the old copy is deleted.
  A journal whose owner process is still alive means a swap is in progress: that is an error
  rather than a recovery.
* Stale hidden siblings ``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>-*`` left by killed runs are
  removed on the next run of the same output when their owner pid is dead (or, for names with
  no pid, when older than :data:`STALE_SECONDS`); the removal is reported on stderr, and an old
  one whose pid is alive (possibly reused) is reported but kept.
* Created directories and files follow the process umask (no ``mkdtemp``/``mkstemp`` 0700/0600).
* Running out of disk (``ENOSPC``) while writing raises a one-line :class:`UserError`
  (``<arg>: no space left on device ...``); the partial temporary output is removed.
* Multi-host runs (``jax.distributed`` initialized, more than one process): process 0 is the
  only writer (:func:`is_writer`). Every process still runs the body of :func:`atomic_dir` (it
  may hold collectives, e.g. gathering sharded arrays), the others into a :func:`private_dir`
  that is deleted afterwards; :func:`write_json` and the :mod:`jcompress.outputs` pre-write
  checks run on process 0 only (:func:`on_writer`), and every process returns once process 0
  has finished, with its error (the same one line) if it failed. All processes must name the
  same destination (:func:`agree`). Inside process 0's temporary directory, a private
  directory, or an :func:`on_writer` call, writes are local (no collectives). A process
  that waits longer than ``JCOMPRESS_MULTIHOST_TIMEOUT`` seconds at an exchange gives up with
  :class:`ExchangeTimeout`, and the process it waited for gets the same error when it
  arrives (never a silent success on one side).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from jcompress.errors import UserError

__all__ = [
    "DestinationExists",
    "ExchangeTimeout",
    "NoSpaceLeft",
    "OutputBusy",
    "STALE_SECONDS",
    "agree",
    "atomic_dir",
    "clean_stale",
    "is_writer",
    "on_writer",
    "private_dir",
    "process_count",
    "recover",
    "rename_noreplace",
    "replace_dir",
    "write_json",
]

STALE_SECONDS = 24 * 3600
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class DestinationExists(UserError):
    """Another run wrote (or is replacing) the destination while this run was writing it;
    ``kept`` holds this run's finished result."""

    def __init__(self, dest: Path, kept: Path | None, arg: str | None = None):
        self.dest, self.kept = dest, kept
        where = f"; this run's finished result was left at {kept}" if kept else ""
        head = f"{arg}: " if arg and arg != str(dest) else ""
        super().__init__(
            f"{head}{dest} appeared while this run was writing it (another run?){where}"
        )


class OutputBusy(UserError):
    """Another live run is replacing the destination right now (its swap journal exists)."""


# --------------------------------------------------------------------------- helpers


def _stamp() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{_stamp()}"


def _journal(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.swap.json"


def _lock(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _rmtree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _say(msg: str) -> None:
    print(f"jcompress: {msg}", file=sys.stderr)


class NoSpaceLeft(UserError):
    """``ENOSPC`` while writing ``dest``; the partial output was removed."""

    def __init__(self, arg: str, dest: Path):
        self.dest = dest
        super().__init__(
            f"{arg}: no space left on device while writing {dest} (nothing was written; free "
            "some space and run again)"
        )


def _is_enospc(e: BaseException) -> bool:
    """ENOSPC as an OSError, or as the message of a library's own error type (orbax /
    tensorstore report a full disk in a ValueError or a runtime error)."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return isinstance(e, Exception) and "No space left on device" in str(e)


def _no_space(arg: str, dest: Path) -> NoSpaceLeft:
    return NoSpaceLeft(arg, dest)


def _mkdir(p: Path) -> Path:
    os.mkdir(p, 0o777)  # the umask applies (mkdtemp would force 0700)
    return p


@contextlib.contextmanager
def _new_parents(path: Path, arg: str) -> Iterator[None]:
    """Create the missing parent directories of ``path`` for the body; if the body fails (an
    error, Ctrl-C), remove those this call created that are still empty, so a failed run
    leaves no empty folders behind (a directory something else wrote into meanwhile stays)."""
    created: list[Path] = []  # deepest first
    p = path.absolute().parent
    while not p.exists() and not p.is_symlink():
        created.append(p)
        p = p.parent

    def undo() -> None:
        for d in created:
            try:
                os.rmdir(d)
            except OSError:  # not empty (another writer), or already gone
                break

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        undo()
        if e.errno == errno.ENOSPC:
            raise _no_space(arg, path) from None
        raise
    try:
        yield
    except BaseException:
        undo()
        raise


# --------------------------------------------------------------------------- renames


def _libc_renameat2() -> Callable[[str, str], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def call(src: str, dst: str) -> int:
        r = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        return 0 if r == 0 else ctypes.get_errno()

    return call


_renameat2 = _libc_renameat2()


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``; raise ``FileExistsError`` if ``dst`` exists (atomically on
    Linux via ``renameat2(RENAME_NOREPLACE)``; elsewhere, or on file systems without it, the
    check and the rename are serialized by an ``O_EXCL`` lock file next to ``dst``)."""
    src, dst = Path(src), Path(dst)
    if _renameat2 is not None:
        err = _renameat2(str(src), str(dst))
        if err == 0:
            return
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    lock = _lock(dst)
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        os.write(fd, str(os.getpid()).encode())
        if _exists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _keep_aside(tmp: Path, dest: Path) -> Path | None:
    kept = dest.parent / f"{dest.name}.conflict-{_stamp()}"
    try:
        rename_noreplace(tmp, kept)
    except OSError:
        return tmp
    return kept


# --------------------------------------------------------------------------- recovery


def recover(dest: str | os.PathLike) -> bool:
    """Finish a swap of ``dest`` interrupted by a killed run (see the module docstring).

    Returns True when a journal was found and resolved. Raises :class:`UserError` when the
    journal's owner is still running (a concurrent replacement of the same output)."""
    dest = Path(dest)
    j = _journal(dest)
    if not j.is_file():
        return False
    try:
        info = json.loads(j.read_text())
        pid, old, new = int(info["pid"]), Path(info["old"]), Path(info["new"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{j}: unreadable swap journal; inspect it and {dest}, then delete it"
        ) from None
    if pid != os.getpid() and _pid_alive(pid):
        raise OutputBusy(f"{dest}: another jcompress run (pid {pid}) is replacing it right now")
    if _exists(new):
        if _exists(dest) and not _exists(old):
            os.replace(dest, old)  # killed before the first rename
        if not _exists(dest):
            os.replace(new, dest)  # killed between the renames: roll forward
    if _exists(old):
        _rmtree(old)
    j.unlink(missing_ok=True)
    _say(f"completed the replacement of {dest} that an interrupted run (pid {pid}) had started")
    return True


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[^/]*")


def clean_stale(dest: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``dest`` left by killed
    runs: those whose owner pid (encoded in the name) is dead, or that are older than
    :data:`STALE_SECONDS` when the name has no pid. A live pid's are kept (reported when old).
    Returns what was removed."""
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for p in parent.iterdir():
        m = _STALE.fullmatch(p.name)
        if not m or m["name"] != dest.name:
            continue
        pid = int(m["pid"]) if m["pid"] else None
        try:
            age = now - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        if (pid is not None and not _pid_alive(pid)) or (pid is None and age > STALE_SECONDS):
            _rmtree(p)
            removed.append(p)
            _say(f"removed {p}, left behind by an interrupted run")
        elif age > STALE_SECONDS:  # its pid is alive: a long run, or a reused pid
            _say(f"note: {p} may be the leftover of an interrupted run (pid {pid} is running)")
    return removed


# --------------------------------------------------------------------------- multi-host

T = TypeVar("T")
_MSG_CHARS = 1024
TIMEOUT_VAR = "JCOMPRESS_MULTIHOST_TIMEOUT"
"""Seconds a process waits for the others at an exchange (default a week): process 0 may
work alone for long (a streamed run) while the others wait."""
_SEQ = itertools.count()  # every process exchanges in the same order: the same numbers
# set while process 0 runs an ``on_writer`` function: writes inside it are local
_SOLO: ContextVar[bool] = ContextVar("jcompress_solo_writer", default=False)
# process 0's temporary output directories and every process's private directories
_LOCAL_DIRS: set[str] = set()


def process_count() -> int:
    """JAX processes of this run: 1 unless ``jax.distributed`` is initialized (never starts
    a JAX backend itself, so it may run before ``jax.distributed.initialize``)."""
    import jax

    if not jax.distributed.is_initialized():
        return 1
    return int(jax.process_count())


def is_writer() -> bool:
    """Whether this process writes outputs: process 0 of a multi-host run, or the only one."""
    if process_count() == 1:
        return True
    import jax

    return jax.process_index() == 0


def _local(path: str | os.PathLike | None = None) -> bool:
    """Whether a write of ``path`` skips the multi-host protocol: one process, inside an
    :func:`on_writer` call, or under a local (temporary / private) directory."""
    if _SOLO.get() or process_count() == 1:
        return True
    if path is None:
        return False
    p = os.path.abspath(path)
    return any(p == d or p.startswith(d + os.sep) for d in _LOCAL_DIRS)


def _timeout_ms() -> int:
    v = os.environ.get(TIMEOUT_VAR, "")
    try:
        secs = float(v) if v else 7 * 24 * 3600.0
    except ValueError:
        raise UserError(f"{TIMEOUT_VAR}: expected seconds, got {v!r}") from None
    if not secs > 0:
        raise UserError(f"{TIMEOUT_VAR}: expected seconds > 0, got {v!r}")
    return int(min(secs * 1000, 2**31 - 1))


class ExchangeTimeout(UserError):
    """A process of a multi-host run waited longer than :data:`TIMEOUT_VAR` seconds for
    another at an exchange; the process it waited for gets the same error when it arrives
    (the waiter's mark takes that process's place in the key-value store), so no process
    goes on alone."""


# what a process that gave up waiting leaves in place of the late process's value
_GAVE_UP = "\x00jcompress-gave-up\x00"


def _already_exists(e: Exception) -> bool:
    return "ALREADY_EXISTS" in str(e) or "already exists" in str(e)


def _gather(text: str) -> list[str]:
    """Every process's ``text``, in process order (every process must call it at the same
    point). Through the key-value store of JAX's coordination service, not a device
    collective: nothing to compile, and no collective timeout (XLA:CPU's gloo gives up after
    30 s) while process 0 works alone; waits up to :data:`TIMEOUT_VAR` seconds.

    A timeout is symmetric: the waiter writes its own message under the late process's key
    (a write that fails if the value arrived meanwhile, so exactly one of the two wins) and
    raises :class:`ExchangeTimeout`; the late process then finds its key taken and raises
    the same error, and so does any other process that reads that key.
    """
    import jax
    from jax._src import distributed  # the runtime's client (as orbax's multihost utils)

    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    key = f"jcompress/exchange/{next(_SEQ)}"

    def gave_up(value: str) -> ExchangeTimeout:
        return ExchangeTimeout(value.removeprefix(_GAVE_UP))

    try:
        client.key_value_set(f"{key}/{me}", text)  # never overwrites
    except Exception as e:  # the runtime's own error type
        if not _already_exists(e):
            raise
        raise gave_up(client.key_value_try_get(f"{key}/{me}")) from None
    out = []
    for i in range(n):
        if i == me:
            out.append(text)
            continue
        try:
            value = client.blocking_key_value_get(f"{key}/{i}", _timeout_ms())
        except Exception as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            msg = (
                f"process {me} of this multi-host run waited {_timeout_ms() / 1000:g} s for "
                f"process {i} and gave up (set {TIMEOUT_VAR} to wait longer)"
            )
            try:
                client.key_value_set(f"{key}/{i}", _GAVE_UP + msg)
            except Exception as e2:
                if not _already_exists(e2):
                    raise
                value = client.key_value_try_get(f"{key}/{i}")  # it arrived just now
            else:
                raise ExchangeTimeout(msg) from None
        if value.startswith(_GAVE_UP):  # another process gave up on process i
            raise gave_up(value)
        out.append(value)
    return out


def _exchange(err: BaseException | None) -> list[tuple[int, str]]:
    """Every process's outcome, in process order: ``(0, "")`` for success, ``(1, message)``
    for a :class:`UserError`, ``(2, "Type: message")`` otherwise."""
    code, text = 0, ""
    if err is not None:
        user = isinstance(err, UserError)
        code = 1 if user else 2
        text = (str(err) if user else f"{type(err).__name__}: {err}")[:_MSG_CHARS]
    rows = _gather(f"{code}:{text}")
    return [(int(r[0]), r[2:]) for r in rows]


def _settle(err: BaseException | None) -> None:
    """Exchange outcomes (every process calls it); re-raise this process's own error, else
    the first other process's (a :class:`UserError` keeps its one line, so every process
    reports the same)."""
    outcomes = _exchange(err)
    if err is not None:
        raise err
    for idx, (code, msg) in enumerate(outcomes):
        if code == 1:
            raise UserError(msg if idx == 0 else f"process {idx}: {msg}")
        if code:
            raise RuntimeError(f"jcompress process {idx} failed: {msg}")


def agree(value: T, *, arg: str) -> T:
    """Check that every process of a multi-host run holds the same ``value`` (JSON-able;
    every process calls it); return it.

    Raises:
      UserError: naming ``arg`` and the first process that differs from process 0.
    """
    if process_count() == 1:
        return value
    text = json.dumps(value, sort_keys=True, default=str).encode()
    rows = _gather(hashlib.sha256(text).hexdigest())
    for idx in range(1, len(rows)):
        if rows[idx] != rows[0]:
            raise UserError(
                f"{arg}: process {idx} of this multi-host run has a different value than "
                "process 0; start every process with the same arguments"
            )
    return value


def on_writer(
    fn: Callable[[], T], *, path: str | os.PathLike | None = None, arg: str | None = None
) -> T | None:
    """Run ``fn()`` on process 0 only (directly where the write of ``path`` is local: one
    process, within an ``on_writer`` call, or under a temporary / private directory).

    Every process returns once process 0 has finished (an exchange): process 0 with
    ``fn``'s result, the others with ``None``; an error of ``fn`` is raised on every
    process (a :class:`UserError` with the same one line). Every process must name the
    same ``path`` (:func:`agree`, errors naming ``arg``). Should another process give up
    waiting (:class:`ExchangeTimeout`), process 0 raises that error once ``fn`` is done,
    adding that it finished (whatever ``fn`` wrote stays).
    """
    if _local(path):
        return fn()
    if path is not None:
        agree(os.path.abspath(path), arg=arg or str(path))
    result, err = None, None
    if is_writer():
        token = _SOLO.set(True)
        try:
            result = fn()
        except BaseException as e:  # reported to every process below
            err = e
        finally:
            _SOLO.reset(token)
    try:
        _settle(err)
    except ExchangeTimeout as e:  # another process gave up while process 0 worked
        if err is None and is_writer():  # say what is done (e.g. an output written)
            done = "" if path is None else f" ({path} is complete)"
            raise ExchangeTimeout(f"{e}; process 0 had finished its work{done}") from None
        raise
    return result


@contextlib.contextmanager
def private_dir(*, marker: bool = False) -> Iterator[Path]:
    """A fresh local directory (under ``TMPDIR``) deleted on exit: where a process other than
    the writer puts what it would have written. Writes under it are local."""
    from jcompress.outputs import write_marker

    tmp = Path(tempfile.mkdtemp(prefix="jcompress-private-"))
    _LOCAL_DIRS.add(str(tmp))
    try:
        if marker:
            write_marker(tmp)
        yield tmp
    finally:
        _LOCAL_DIRS.discard(str(tmp))
        _rmtree(tmp)


@contextlib.contextmanager
def _atomic_dir_multi(dest: Path, *, overwrite: bool, arg: str, marker: bool) -> Iterator[Path]:
    """:func:`atomic_dir` of a multi-host run (see the module docstring). Four exchanges:
    the same destination everywhere; process 0 started; every body finished (else all
    raise and process 0 discards its directory); process 0 placed ``dest``."""
    agree(os.path.abspath(dest), arg=arg)
    writer = is_writer()
    cm = (
        _atomic_dir_local(dest, overwrite=overwrite, arg=arg, marker=marker)
        if writer
        else private_dir(marker=marker)
    )
    tmp, err = None, None
    try:
        tmp = cm.__enter__()
    except BaseException as e:
        err = e
    _settle(err)  # process 0 could not start: every process stops here
    _LOCAL_DIRS.add(str(tmp))
    try:
        try:
            yield tmp
        except BaseException as e:
            _settle(e)  # re-raises e
            raise
        _settle(None)  # another process's body failed: raise that here
    except BaseException as e:
        _LOCAL_DIRS.discard(str(tmp))
        cm.__exit__(type(e), e, e.__traceback__)
        raise
    _LOCAL_DIRS.discard(str(tmp))
    err = None
    try:
        cm.__exit__(None, None, None)  # process 0: the final rename
    except BaseException as e:
        err = e
    _settle(err)


# --------------------------------------------------------------------------- writers


# Temporary directories made by ``atomic_dir(overwrite=False)``: :func:`replace_dir` never swaps
# out an existing destination for these (their final rename is RENAME_NOREPLACE).
_NO_REPLACE: set[str] = set()


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``, swapping out (and then deleting) an
    existing ``dest``; journaled so that a kill between the two renames is recovered by the
    next :func:`recover` of ``dest``. A failing swap puts the old ``dest`` back. For a ``tmp``
    made by ``atomic_dir(overwrite=False)`` an existing ``dest`` is never replaced
    (``FileExistsError``)."""
    tmp, dest = Path(tmp), Path(dest)
    recover(dest)
    if not _exists(dest):
        try:
            rename_noreplace(tmp, dest)
            return
        except FileExistsError:
            if str(tmp) in _NO_REPLACE:
                raise
    if str(tmp) in _NO_REPLACE:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest))
    old = _sibling(dest, "old")
    j = _journal(dest)
    body = json.dumps({"pid": os.getpid(), "old": str(old), "new": str(tmp)})
    try:
        fd = os.open(j, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:  # a concurrent replacement got there first
        raise OutputBusy(f"{dest}: another jcompress run is replacing it right now") from None
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(dest, old)
    except BaseException:
        j.unlink(missing_ok=True)
        raise
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            if not _exists(dest):
                os.replace(old, dest)
                j.unlink(missing_ok=True)
        raise
    _rmtree(old)
    j.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(
    dest: str | os.PathLike,
    *,
    overwrite: bool = False,
    arg: str | None = None,
    marker: bool = True,
) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``dest``; on success it becomes ``dest``, on any
    error it is removed.

    In a multi-host run only process 0's directory becomes ``dest``; the other processes run
    the same body into a :func:`private_dir`, and all return once ``dest`` is in place (or
    raise process 0's error). Arguments: as :func:`_atomic_dir_local`.
    """
    dest = Path(dest)
    arg = arg or str(dest)
    if _local(dest):
        with _atomic_dir_local(dest, overwrite=overwrite, arg=arg, marker=marker) as tmp:
            yield tmp
        return
    with _atomic_dir_multi(dest, overwrite=overwrite, arg=arg, marker=marker) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_dir_local(
    dest: str | os.PathLike,
    *,
    overwrite: bool = False,
    arg: str | None = None,
    marker: bool = True,
) -> Iterator[Path]:
    """:func:`atomic_dir` in this process alone.

    Args:
      dest: the destination directory.
      overwrite: replace an existing ``dest`` (journaled swap). Without it the final rename
        refuses to clobber a ``dest`` that appeared meanwhile (:class:`DestinationExists`,
        naming where the finished result was kept). Callers check their overwrite policy
        (:mod:`jcompress.outputs`) before doing the work.
      arg: how to name ``dest`` in a one-line error (default ``str(dest)``).
      marker: write the :data:`jcompress.outputs.MARKER` file into the directory, so a later
        ``--overwrite`` can tell it was written by jcompress (``save_hf`` leaves it out unless
        asked: its directories hold exactly the HF files).
    """
    dest = Path(dest)
    arg = arg or str(dest)
    with _new_parents(dest, arg):
        with _atomic_dir_in(dest, overwrite=overwrite, arg=arg, marker=marker) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_dir_in(dest: Path, *, overwrite: bool, arg: str, marker: bool) -> Iterator[Path]:
    """:func:`_atomic_dir_local` once ``dest``'s parent exists."""
    from jcompress.outputs import write_marker

    recover(dest)
    clean_stale(dest)
    tmp = _mkdir(_sibling(dest, "tmp"))
    if not overwrite:
        _NO_REPLACE.add(str(tmp))
    placing = False
    try:
        if marker:
            write_marker(tmp)
        yield tmp
        placing = True
        try:
            replace_dir(tmp, dest)
        except (FileExistsError, OutputBusy):  # lost a race: keep the result, say where
            kept = _keep_aside(tmp, dest)
            raise DestinationExists(dest, kept, arg) from None
    except DestinationExists:
        if not placing:  # a nested writer's conflict: ours is unfinished
            _rmtree(tmp)
        raise
    except NoSpaceLeft:  # from a nested writer: report it as this output's
        _rmtree(tmp)
        raise _no_space(arg, dest) from None
    except BaseException as e:
        _rmtree(tmp)
        if _is_enospc(e):
            raise _no_space(arg, dest) from None
        raise
    finally:
        _NO_REPLACE.discard(str(tmp))


def write_json(
    path: str | os.PathLike, obj: Any, *, overwrite: bool = True, arg: str | None = None
) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename).

    With ``overwrite=False`` an existing ``path`` (even one that appeared while writing) is
    never replaced (:class:`DestinationExists`). The file mode follows the umask. In a
    multi-host run process 0 writes it (:func:`on_writer`)."""
    path = Path(path)
    arg = arg or str(path)
    on_writer(lambda: _write_json_local(path, obj, overwrite, arg), path=path, arg=arg)


def _write_json_local(path: Path, obj: Any, overwrite: bool, arg: str) -> None:
    with _new_parents(path, arg):
        _write_json_in(path, obj, overwrite, arg)


def _write_json_in(path: Path, obj: Any, overwrite: bool, arg: str) -> None:
    tmp = _sibling(path, "tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                try:
                    os.link(tmp, path)  # fails if path exists, atomically
                    tmp.unlink()
                except FileExistsError:
                    raise
                except OSError:  # no hard links here
                    rename_noreplace(tmp, path)
            except FileExistsError:
                kept = _keep_aside(tmp, path)
                raise DestinationExists(path, kept, arg) from None
    except DestinationExists:
        raise
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_enospc(e):
            raise _no_space(arg, path) from None
        raise
