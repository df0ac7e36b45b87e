"""Helpers shared by CLI subcommands: argument types, flags derived from a method's config
dataclass (:func:`config_flags`), and the cheap up-front checks every command runs before it
loads any weights."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jcompress.errors import UserError, naming

__all__ = [
    "DTYPES",
    "add_attention_flag",
    "add_calib_window_flags",
    "add_distributed_flag",
    "calib_window_args",
    "check_eval_window_flags",
    "check_prompt",
    "flags_under",
    "add_dtype_flag",
    "add_eval_window_flags",
    "add_mesh_flag",
    "add_model_flag",
    "add_stream_flags",
    "budget",
    "check_data_file",
    "check_positions",
    "config_flags",
    "config_from_args",
    "distributed_from_args",
    "field_docs",
    "generate_text",
    "load_model",
    "load_tokenizer_for",
    "mesh_from_args",
    "mesh_spec",
    "model_bytes",
    "positive",
    "stream_from_args",
    "table",
]

DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- common flags


def add_model_flag(s: argparse.ArgumentParser) -> None:
    """``--model DIR`` (required): an HF model directory."""
    s.add_argument(
        "--model", required=True, help="HF model directory (config.json + weights + tokenizer)"
    )


def add_dtype_flag(s: argparse.ArgumentParser) -> None:
    """``--dtype``: the compute dtype, default as stored."""
    s.add_argument(
        "--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)"
    )


def add_attention_flag(s: argparse.ArgumentParser) -> None:
    """``--attention NAME``: one of the registered attention implementations (jcompress's own
    packages that register one are imported first, so the choices do not depend on import order;
    names starting with ``_`` are internal and hidden)."""
    import jcompress.sparge  # noqa: F401  (registers "block_sparse")
    from jcompress.models.attention import DEFAULT, IMPLEMENTATIONS

    s.add_argument(
        "--attention",
        choices=sorted(n for n in IMPLEMENTATIONS if not n.startswith("_")),
        default=DEFAULT,
        help=f"attention implementation (default: {DEFAULT})",
    )


def add_calib_window_flags(s: argparse.ArgumentParser) -> None:
    """``--nsamples`` / ``--seqlen`` / ``--seed``: the calibration windows of a method command."""
    # default None: given without --calib_data is an error (calib_window_args), not ignored
    s.add_argument(
        "--nsamples",
        type=positive,
        default=None,
        help=f"calibration windows (default: {CALIB_DEFAULTS['nsamples']})",
    )
    s.add_argument(
        "--seqlen",
        type=positive,
        default=None,
        help="tokens per calibration window (default: 512, capped at the model's positions)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"calibration sampling seed (default: {CALIB_DEFAULTS['seed']})",
    )


CALIB_DEFAULTS = {"nsamples": 32, "seed": 2}
"""``--nsamples`` / ``--seed`` when calibration text is given without them."""


def flags_under(
    args: argparse.Namespace,
    parent: str,
    defaults: Mapping[str, Any],
    *,
    present: bool,
    why: str = "",
    exempt: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Flags that only mean something with ``parent`` (their argparse default is ``None``):
    without it (``present`` false) any of them given is an error (``exempt``: ones the command
    reads anyway), not a silently ignored flag. Returns each flag's value, ``defaults`` filled
    in where it was not given."""
    if not present:
        for flag in defaults:
            if flag not in exempt and getattr(args, flag, None) is not None:
                raise UserError(
                    f"--{flag}: only used with {parent}{why}; add {parent} or drop --{flag}"
                )
    return {
        f: d if getattr(args, f, None) is None else getattr(args, f) for f, d in defaults.items()
    }


def calib_window_args(
    args: argparse.Namespace, *, seed_without_calib: bool = False
) -> tuple[int, int]:
    """``(nsamples, seed)`` of :func:`add_calib_window_flags`, defaults filled in; either one
    given without ``--calib_data`` is an error (no window is sampled), ``--seed`` excepted
    where the command draws something else from it (``seed_without_calib``)."""
    v = flags_under(
        args, "--calib_data", CALIB_DEFAULTS,
        present=getattr(args, "calib_data", None) is not None,
        why=" (no calibration window is sampled without it)",
        exempt=("seed",) if seed_without_calib else (),
    )  # fmt: skip
    return v["nsamples"], v["seed"]


def add_eval_window_flags(s: argparse.ArgumentParser) -> None:
    """``--eval_seqlen`` / ``--eval_max_windows``: the perplexity windows of a method command."""
    s.add_argument(
        "--eval_seqlen",
        "--eval-seqlen",
        type=positive,
        default=None,
        help="perplexity window (default: --seqlen)",
    )
    s.add_argument(
        "--eval_max_windows",
        "--eval-max-windows",
        type=positive,
        default=None,
        help="at most this many evaluation windows (default: all)",
    )


def check_eval_window_flags(args: argparse.Namespace) -> None:
    """``--eval_seqlen`` / ``--eval_max_windows`` without ``--eval_data`` measure nothing: an
    error, not a silently ignored flag."""
    flags_under(
        args, "--eval_data", {"eval_seqlen": None, "eval_max_windows": None},
        present=getattr(args, "eval_data", None) is not None,
        why=" (no perplexity is measured without it)",
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataJob:
    """The fields a method command's job shares (``run``, ``tucker``): the model, the output
    directory, the calibration windows (:func:`add_calib_window_flags`) and the evaluation
    windows (:func:`add_eval_window_flags`). A command's job subclasses it with its own
    fields."""

    model: Path
    out: Path | None = None
    calib_data: Path | None = None
    eval_data: Path | None = None
    nsamples: int = 32
    seqlen: int | None = None  # None: 512 capped at the model's positions
    seed: int = 2
    eval_seqlen: int | None = None
    eval_max_windows: int | None = None
    overwrite: bool = False

    def calib_seqlen(self, cfg: Any) -> int:
        """``seqlen``, or 512 capped at the model's positions."""
        return self.seqlen or min(512, cfg.max_position_embeddings)

    def data_inputs(self) -> dict[str, Path]:
        """``{flag: path}`` of the data files given, each checked readable
        (:func:`check_data_file`): inputs the output guard protects."""
        out = {}
        for flag, p in (("--calib_data", self.calib_data), ("--eval_data", self.eval_data)):
            if p is not None:
                out[flag] = check_data_file(p, flag)
        return out

    def check_out_and_windows(self, cfg: Any, inputs: dict[str, Path]) -> None:
        """The output guard on ``--out`` (never one of ``inputs``, room for twice the model's
        bytes: dense + factor exports) and both window lengths within the model's positions;
        before any weights are loaded."""
        from jcompress.eval import check_seqlen
        from jcompress.outputs import check_output_dir

        if self.out is not None:
            check_output_dir(self.out, inputs=inputs, overwrite=self.overwrite, arg="--out",
                             need_bytes=2 * model_bytes(self.model))  # fmt: skip
        check_seqlen(cfg, self.calib_seqlen(cfg), arg="--seqlen", override=None)
        if self.eval_seqlen is not None:
            check_seqlen(cfg, self.eval_seqlen, arg="--eval_seqlen", override=None)

    def tokens(self, cfg: Any) -> tuple[Any, Any, int]:
        """``(calib, eval_ids, seqlen)``: the ``[nsamples, seqlen]`` calibration windows and
        the ``[N]`` evaluation ids (``None`` for a text not given), read and checked before
        any weights are loaded (:func:`calibration_from_text`, :func:`load_eval_tokens`)."""
        seqlen = self.calib_seqlen(cfg)
        tok = None
        if self.calib_data is not None or self.eval_data is not None:
            tok = load_tokenizer_for(self.model, "--model", cfg)
        calib = eval_ids = None
        if self.calib_data is not None:
            calib = calibration_from_text(self.calib_data, tok, self.nsamples, seqlen, self.seed)
        if self.eval_data is not None:
            eval_ids = load_eval_tokens(
                self.eval_data,
                tok,
                self.eval_seqlen or seqlen,
                arg="--eval_data",
                seqlen_arg="--eval_seqlen" if self.eval_seqlen else "--seqlen",
            )
        return calib, eval_ids, seqlen

    @staticmethod
    def fields_from_args(
        args: argparse.Namespace, *, seed_without_calib: bool = False
    ) -> dict[str, Any]:
        """The :class:`DataJob` fields from a parsed command line (``seed_without_calib``:
        as for :func:`calib_window_args`)."""

        def path(v):
            return None if v is None else Path(v)

        check_eval_window_flags(args)
        nsamples, seed = calib_window_args(args, seed_without_calib=seed_without_calib)
        return dict(
            model=Path(args.model),
            out=path(args.out),
            calib_data=path(args.calib_data),
            eval_data=path(args.eval_data),
            nsamples=nsamples,
            seqlen=args.seqlen,
            seed=seed,
            eval_seqlen=args.eval_seqlen,
            eval_max_windows=args.eval_max_windows,
            overwrite=args.overwrite,
        )


def add_mesh_flag(s: argparse.ArgumentParser) -> None:
    """``--mesh data=N,model=M``: run sharded over the devices (and hosts) with
    :mod:`jcompress.sharding`; read back by :func:`mesh_from_args`. (``--distributed`` is on
    every subcommand: :func:`jcompress.cli.build_parser` adds it.)"""
    from jcompress.sharding import MESH_FORM

    s.add_argument(
        "--mesh",
        type=mesh_spec,
        default=None,
        metavar="SPEC",
        help=f"shard over a device mesh: {MESH_FORM}; heads / MLP columns over model, "
        "batches over data (default: one device)",
    )


def add_stream_flags(s: argparse.ArgumentParser) -> None:
    """``--stream`` / ``--work_dir`` / ``--resume`` / ``--offload_dir``: run a per-layer
    analysis on decoder layers read one at a time from the checkpoint's safetensors shards
    (:func:`jcompress.streaming.stream_analysis`); read back by :func:`stream_from_args`."""
    s.add_argument(
        "--stream",
        action="store_true",
        help="read the checkpoint one decoder layer at a time from its safetensors shards "
        "(memory ~ one layer + the calibration activations); same results, resumable",
    )
    s.add_argument(
        "--work_dir",
        "--work-dir",
        default=None,
        metavar="DIR",
        help="with --stream: the resumable state (finished layers' results, next-layer "
        "inputs, manifest); default: OUT.stream next to --out, removed when the run completes",
    )
    s.add_argument(
        "--resume", action="store_true", help="with --stream: continue the run in --work_dir"
    )
    s.add_argument(
        "--offload_dir",
        "--offload-dir",
        default=None,
        metavar="DIR",
        help="with --stream: keep the calibration activations in a temporary file here",
    )


def stream_from_args(args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """The :func:`add_stream_flags` flags as keyword arguments of the streamed analysis
    (``work_dir``, ``resume``, ``offload_dir``), or ``None`` without ``--stream``.

    Raises:
      UserError: ``--work_dir`` / ``--resume`` / ``--offload_dir`` without ``--stream``, an
        ``--offload_dir`` that is not a directory, a ``--work_dir`` equal to ``out``, or a
        multi-host run (a streamed analysis runs on one process).
    """
    if not args.stream:
        for flag, v in (("--work_dir", args.work_dir), ("--resume", args.resume),
                        ("--offload_dir", args.offload_dir)):  # fmt: skip
            if v:
                raise UserError(f"{flag}: only with --stream")
        return None
    from jcompress.atomic import process_count

    if process_count() > 1:
        raise UserError("--stream: a streamed analysis runs on one process (not multi-host)")
    if args.offload_dir is not None and not Path(args.offload_dir).is_dir():
        raise UserError(f"--offload_dir: {args.offload_dir} is not a directory")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".stream")
    if work.resolve() == out.resolve():
        raise UserError(f"--work_dir: {work} must differ from --out")
    return {"work_dir": work, "resume": args.resume, "offload_dir": args.offload_dir}


def add_distributed_flag(s: argparse.ArgumentParser) -> None:
    """``--distributed``: start multi-host JAX (read back by :func:`distributed_from_args`).
    :func:`jcompress.cli.build_parser` adds it to every subcommand, and
    :func:`jcompress.cli.main` starts the runtime before any command runs."""
    s.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / "
        "JAX_NUM_PROCESSES / JAX_PROCESS_ID or the cluster (automatic when "
        "JAX_COORDINATOR_ADDRESS is set); process 0 writes every output",
    )


def distributed_from_args(args: argparse.Namespace) -> bool:
    """Start multi-host JAX if ``--distributed`` or ``JAX_COORDINATOR_ADDRESS`` asks for it
    (before any output check: those run on process 0 only). Returns whether this call did.
    :func:`jcompress.cli.main` calls it for every subcommand; calling it again is a no-op."""
    from jcompress import sharding

    return sharding.initialize_distributed(force=bool(getattr(args, "distributed", False)))


def mesh_from_args(args: argparse.Namespace, cfg: Any = None) -> Any:
    """Start multi-host JAX if asked (:func:`distributed_from_args`), build the ``--mesh``
    and make it current for the rest of the command (perplexity and the calibration stream
    of every method then run sharded; without ``--mesh``: no mesh, whatever an earlier
    command in the same process used). Call it before loading weights: it also checks that
    the mesh divides the heads and MLP width of ``cfg`` (default: the config of
    ``args.model``) and that ``data`` divides ``args.batch_size`` if there is one.
    :func:`jcompress.cli.main` scopes what it activates to the one call.

    Returns:
      The :class:`jax.sharding.Mesh`, or ``None`` without ``--mesh``.
    """
    from jcompress import sharding

    distributed_from_args(args)
    spec = getattr(args, "mesh", None)
    if spec is None:
        sharding.activate(None)
        return None
    mesh = sharding.make_mesh(spec, arg="--mesh")
    if cfg is None and getattr(args, "model", None) is not None:
        from jcompress.models import read_config

        try:
            cfg = read_config(args.model)
        except UserError:  # the command's own checks report a bad --model
            cfg = None
    if cfg is not None:
        sharding.check_mesh(cfg, mesh, arg="--mesh")
    bs, n = getattr(args, "batch_size", None), int(mesh.shape["data"])
    if isinstance(bs, int) and bs % n:
        raise UserError(
            f"--mesh: axis data={n} does not divide the batch size {bs}; use a batch size "
            f"that is a multiple of {n}"
        )
    sharding.activate(mesh)
    return mesh


# --------------------------------------------------------------------------- argument types


def mesh_spec(s: str) -> str:
    """argparse type: a ``--mesh`` spec (:func:`jcompress.sharding.parse_mesh`)."""
    from jcompress.sharding import parse_mesh

    try:
        parse_mesh(s, arg="--mesh")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--mesh: ")) from None
    return s


def positive(s: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def budget(s: str) -> float:
    """argparse type: a number in (0, 1)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}")
    return v


# --------------------------------------------------------------------------- config flags


def field_docs(cls: type) -> dict[str, str]:
    """Per-field help from the ``Attributes:`` section of a dataclass docstring (an entry
    ``a, b: text`` documents both ``a`` and ``b``; continuation lines are joined)."""
    doc = cls.__doc__ or ""
    m = re.search(r"^\s*Attributes:\s*$", doc, re.M)
    if not m:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in doc[m.end() :].splitlines():
        if not line.strip():
            continue
        ind = len(line) - len(line.lstrip())
        entry = re.match(r"\s*([A-Za-z_][\w, ]*):\s(.*)", line)
        if entry and (indent is None or ind <= indent):
            indent = ind
            names = [n.strip() for n in entry[1].split(",") if n.strip()]
            for n in names:
                out[n] = entry[2].strip()
        elif indent is not None and ind > indent and names:
            for n in names:
                out[n] += " " + line.strip()
        else:
            break
    return {k: _plain(v) for k, v in out.items()}


def _plain(text: str) -> str:
    """Docstring markup to plain help text (``x`` -> x, :func:`x` -> x)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("%", "%%")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    overrides: Mapping[str, Mapping[str, Any] | None] | None = None,
    *,
    fields: Iterable[str] | None = None,
) -> list[str]:
    """Add one flag per field of the dataclass ``config_cls``: ``--field_name`` (the reference
    spelling) and its dash alias ``--field-name``; ``dest`` is the field name.

    Types map as: ``int`` / ``float`` / ``str`` -> a typed option; ``bool`` -> ``--x`` /
    ``--no-x``; ``X | None`` -> an option of type ``X`` whose default ``None`` means "the
    config's own default rule"; ``tuple[str, ...]`` -> a repeatable option (collected into a
    tuple by :func:`config_from_args`). Help comes from the class docstring's ``Attributes:``
    section; the default is shown.

    Args:
      parser: where to add the flags.
      config_cls: a dataclass (e.g. ``EigenAttentionConfig``).
      overrides: per field, argparse keyword arguments replacing the derived ones (``type``,
        ``default``, ``help``, ``metavar``, ...), or ``None`` to leave the field out.
      fields: only these fields (default: all).

    Returns:
      The field names that got a flag (pass them to :func:`config_from_args`).
    """
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    wanted = None if fields is None else set(fields)
    added = []
    for f in dataclasses.fields(config_cls):
        if (wanted is not None and f.name not in wanted) or not f.init:
            continue
        if f.name in overrides and overrides[f.name] is None:
            continue
        tp, optional = _unwrap(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kw: dict[str, Any] = {"default": default}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple and typing.get_args(tp)[-1:] == (Ellipsis,):
            kw.update(action="append", default=None, type=typing.get_args(tp)[0])
        elif tp in (int, float, str):
            kw["type"] = tp
            kw["metavar"] = {int: "N", float: "X", str: "S"}[tp]
        else:
            raise TypeError(
                f"config_flags: unsupported type {tp!r} of {config_cls.__name__}.{f.name}"
            )
        kw.update(overrides.get(f.name) or {})
        if "help" not in kw:
            text = docs.get(f.name, f.name.replace("_", " "))
            shown = kw["default"] if kw.get("action") != "append" else default
            if shown is None and optional:
                shown = "None"
            kw["help"] = f"{text.rstrip('.')} (default: {_show(shown)})"
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        parser.add_argument(*names, dest=f.name, **kw)
        added.append(f.name)
    return added


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v)) or "none"
    return str(v)


def config_from_args(
    config_cls: type, args: argparse.Namespace, names: Iterable[str], **fixed: Any
):
    """Build ``config_cls`` from the flags :func:`config_flags` added (``names``); repeated
    options become tuples, an omitted repeatable option keeps the config default; ``fixed``
    values win."""
    defaults = {f.name: f for f in dataclasses.fields(config_cls)}
    kw: dict[str, Any] = {}
    for n in names:
        v = getattr(args, n)
        if isinstance(v, list):
            v = tuple(v)
        if v is None and defaults[n].default is dataclasses.MISSING:
            continue  # default_factory
        if v is None and defaults[n].default is not None:
            continue  # not given: the config's default
        kw[n] = v
    kw.update(fixed)
    return config_cls(**kw)


# --------------------------------------------------------------------------- up-front checks


def table(rows: list[tuple[str, str]]) -> str:
    """A two-column markdown table ``| metric | value |``."""
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k:<{w}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def check_data_file(path: str | os.PathLike, arg: str) -> Path:
    """A readable text file, or a one-line error naming ``arg``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{arg}: {p} is not a file (expected a .txt or .jsonl text file)")
    if not os.access(p, os.R_OK):
        raise UserError(f"{arg}: {p} is not readable (permission denied)")
    return p


def calibration_from_text(
    path: str | os.PathLike,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    *,
    arg: str = "--calib_data",
    nsamples_arg: str = "--nsamples",
    seqlen_arg: str = "--seqlen",
) -> Any:
    """``[nsamples, seqlen]`` seeded calibration windows of the text at ``path``
    (:func:`jcompress.data.calibration_windows` with ``limit="tokens"``): a text too short for
    one window, or holding fewer than ``nsamples * seqlen`` tokens, is a one-line error naming
    the command's flags (the calibrating commands' one rule: their work stays within the size
    of the text they were given)."""
    from jcompress.data import calibration_windows, load_tokens

    with naming(arg):
        ids = load_tokens(path, tokenizer)
    return calibration_windows(ids, nsamples, seqlen, seed=seed, nsamples_arg=nsamples_arg,
                               seqlen_arg=seqlen_arg, text=f"{arg} {path}",
                               limit="tokens")  # fmt: skip


def load_eval_tokens(
    path: str | os.PathLike, tokenizer: Any, seqlen: int, *, arg: str, seqlen_arg: str
) -> Any:
    """Tokenize an evaluation text whole (``[N]`` ids) and check that it holds at least one
    window of ``seqlen`` tokens (:func:`jcompress.data.eval_windows`'s rule): an empty or
    too-short file is a one-line error naming ``seqlen_arg`` and ``arg``, before any weights
    are read."""
    from jcompress.data import eval_windows, load_tokens

    with naming(arg):
        ids = load_tokens(path, tokenizer)
    eval_windows(ids, seqlen, 1, seqlen_arg=seqlen_arg, text=f"{arg} {path}")
    return ids


def load_tokenizer_for(directory: str | os.PathLike, arg: str, cfg: Any = None) -> Any:
    """The tokenizer in ``directory`` (present and loadable, and with ``cfg`` no larger than
    the model's vocabulary), or a one-line error."""
    from jcompress.data import load_tokenizer

    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{arg}: {d} is not a directory")
    try:
        return load_tokenizer(d, cfg=cfg)
    except UserError as e:
        raise UserError(f"{arg}: {str(e).split(': ', 1)[-1]}") from None
    except Exception as e:  # transformers raises many types for a broken tokenizer
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"{arg}: cannot load the tokenizer in {d} ({msg})") from None


def model_bytes(model_dir: str | os.PathLike) -> int:
    """Size of the weight files of an HF model directory (an estimate of an export's size)."""
    d = Path(model_dir)
    return sum(
        p.stat().st_size
        for p in d.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".pt"))
    )


def check_positions(
    cfg,
    n_tokens: int,
    *,
    arg: str,
    allow_long: bool = False,
    override: str | None = "--allow-long",
) -> None:
    """Refuse a sequence longer than the model's trained positions (learned positions always,
    RoPE unless ``--allow-long``): :func:`jcompress.validate.check_positions` with the flag
    named (``override=None``: the command has no ``--allow-long``; the message names none)."""
    from jcompress import validate

    validate.check_positions(cfg, n_tokens, arg=arg, allow_long=allow_long, override=override)


def check_prompt(
    cfg,
    tok: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    max_new_arg: str = "--max_new_tokens",
    allow_long: bool | None = None,
) -> int:
    """The sample prompt tokenizes to something and, with ``max_new_tokens`` generated after
    it, fits the model's positions (the prompt alone blamed when it is too long by itself).
    ``allow_long``: the command's ``--allow-long`` value; ``None``: it has no such flag (the
    messages then name none). Returns the prompt's token count."""
    from jcompress.data import tokenize

    n = int(tokenize(tok, prompt).size)
    if n == 0:
        raise UserError("--prompt: the prompt tokenizes to nothing")
    kw = dict(allow_long=bool(allow_long), override=None if allow_long is None else "--allow-long")
    check_positions(cfg, n, arg="--prompt", **kw)
    check_positions(
        cfg, n + max_new_tokens, arg=f"{max_new_arg} ({max_new_tokens} after a {n}-token prompt)",
        **kw,
    )  # fmt: skip
    return n


def load_model(model: str | os.PathLike, dtype: str | None):
    """``load_hf`` with a progress bar."""
    from jcompress.models import load_hf

    return load_hf(model, dtype=dtype, progress=True)


def generate_text(
    cfg, params, tok: Any, prompt: str, max_new_tokens: int, *, attention: str | None = None
) -> str:
    """Greedy continuation of ``prompt`` decoded to text (prompt included)."""
    import jax.numpy as jnp

    from jcompress.data import tokenize
    from jcompress.models import generate

    ids = tokenize(tok, prompt)
    if ids.size == 0:
        raise UserError("--prompt: the prompt tokenizes to nothing")
    out = generate(
        cfg, params, jnp.asarray(ids)[None], max_new_tokens=max_new_tokens, attention=attention
    )
    return tok.decode([int(t) for t in out[0]], skip_special_tokens=True)
