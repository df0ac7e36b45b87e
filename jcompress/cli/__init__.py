"""The ``jcompress`` command line: ``demo``, ``eigen``, ``tucker``, ``quant``, ``tokenwise``,
``ged``, ``sparge``, ``run``, ``ppl``, ``generate``, ``convert``.

One module per subcommand (``cli/<name>.py``), each with ``add_parser(subparsers)`` and
``run(args)``; shared helpers live in ``cli/common.py``. Every output path is checked by the
:mod:`jcompress.outputs` guard before any weights are loaded.

Every subcommand takes ``--distributed`` and starts JAX's multi-host runtime, when that flag or
``JAX_COORDINATOR_ADDRESS`` asks for it, before it runs (one place: :func:`build_parser` and
:func:`main`); in a multi-host run process 0 is then the only writer (:mod:`jcompress.atomic`)
and the only one that prints (reports, progress, notes); the others show only their errors.

User errors (bad paths, bad options, malformed checkpoints) print one line
``jcompress: error: ...`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from jcompress.atomic import write_json
from jcompress.errors import UserError

__all__ = [
    "COMMANDS",
    "build_parser",
    "bundled_calib_text",
    "bundled_eval_text",
    "bundled_model_dir",
    "leaf_parsers",
    "main",
    "write_json",
]

# subcommand name -> module under jcompress.cli (in --help order)
COMMANDS = (
    "demo", "eigen", "tucker", "quant", "tokenwise", "ged", "sparge", "run", "stream", "ppl",
    "generate", "convert",
)  # fmt: skip


def bundled_model_dir() -> Path:
    """Directory of the bundled llama-1m model (config, safetensors, tokenizer)."""
    return Path(str(resources.files("jcompress") / "assets" / "llama-1m"))


def bundled_eval_text() -> Path:
    """The bundled WikiText-2 raw test excerpt."""
    return Path(str(resources.files("jcompress") / "assets" / "wikitext2_test_excerpt.txt"))


def bundled_calib_text() -> Path:
    """The bundled WikiText-2 validation excerpt (the demo's calibration text)."""
    return Path(str(resources.files("jcompress") / "assets" / "wikitext2_valid_excerpt.txt"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"jcompress: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one subparser per module in :data:`COMMANDS`, and
    ``--distributed`` on every leaf (sub)command
    (:func:`~jcompress.cli.common.add_distributed_flag`)."""
    import importlib

    from jcompress.cli.common import add_distributed_flag

    p = _Parser(prog="jcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="{" + ",".join(COMMANDS) + "}",
    )
    for name in COMMANDS:
        importlib.import_module(f"jcompress.cli.{name}").add_parser(sub)
    for leaf in leaf_parsers(p).values():
        add_distributed_flag(leaf)
    return p


def leaf_parsers(
    p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """The parsers of ``p`` that run a command (no further subcommand), keyed by the words
    that select them, e.g. ``("sparge", "tune")``; an alias is listed once."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix: p}
    out: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    seen: set[int] = set()
    for name, child in subs[0].choices.items():
        if id(child) not in seen:
            seen.add(id(child))
            out.update(leaf_parsers(child, (*prefix, name)))
    return out


def main(argv: list[str] | None = None) -> int:
    # transformers (tokenizers, configs) is imported lazily below; keep its import-time notices
    # (e.g. "PyTorch was not found") out of the command's output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # library warnings (e.g. a RoPE window past the trained positions) as one line each
        warnings.showwarning = _one_line_warning
        return _run(args)


def console() -> None:
    """The ``jcompress`` command: :func:`main`, then exit with its code. SIGTERM (``kill``,
    ``timeout``, a batch scheduler) is handled as Ctrl-C is: it raises in the main thread, so
    every temporary is removed on the way out of its ``with``; the exit code is 143 (130 for
    Ctrl-C). A second SIGTERM during that clean-up ends the process at once. After either
    (reported and cleaned up by then) the process ends with ``os._exit``: interpreter
    shutdown with XLA's worker threads still running the interrupted computation segfaulted
    in 3 of 5 tries.

    Python runs a signal handler only between bytecodes, so while the main thread waits in
    one long XLA computation the SIGTERM would wait too: a watchdog thread, woken through
    ``signal.set_wakeup_fd``, ends the process with 143 :data:`SIGTERM_GRACE_S` seconds after
    a SIGTERM that the main thread has not finished handling (its temporaries then stay, as
    after a kill, and the next run of the same output removes them)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _start_sigterm_watchdog()
    code = main()
    if code in (130, 143) and _INTERRUPTED.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


_INTERRUPTED = threading.Event()
SIGTERM_GRACE_S = 10.0


def _start_sigterm_watchdog() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            got = os.read(r, 64)
            if not got:
                return
            if signal.SIGTERM in got:
                time.sleep(SIGTERM_GRACE_S)
                print("jcompress: terminated (the running computation did not stop)",
                      file=sys.stderr)  # fmt: skip
                os._exit(143)

    threading.Thread(target=watch, name="jcompress-sigterm", daemon=True).start()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (same clean-up paths)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM: no more clean-up
    raise _Terminated()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"jcompress: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from jcompress.cli.common import distributed_from_args

    _INTERRUPTED.clear()
    try:
        # every command, before its own checks: in a multi-host run those (and its writes)
        # happen on process 0 only
        distributed_from_args(args)
        # in a copy of the caller's context: what the command makes current (its --mesh) ends
        # with it, so a later main() in the same process does not inherit it
        with _quiet_unless_writer():
            return contextvars.copy_context().run(args.func, args)
    except UserError as e:
        print(f"jcompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, _Terminated)
        print(f"jcompress: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        _INTERRUPTED.set()
        return 143 if term else 130


@contextlib.contextmanager
def _quiet_unless_writer() -> Iterator[None]:
    """In a multi-host run, the processes other than 0 print nothing while the command runs
    (its report, progress bars and notes go to process 0's terminal alone); their errors are
    printed after it, by :func:`_run` or the interpreter, so every process shows them."""
    from jcompress.atomic import is_writer

    if is_writer():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        with contextlib.redirect_stderr(null):
            yield


if __name__ == "__main__":
    sys.exit(main())
