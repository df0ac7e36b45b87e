"""Run jcompress over many devices (and hosts) with JAX's own sharding: a ``data`` x ``model``
:class:`jax.sharding.Mesh`, params placed by a regex rule table, batches split over ``data``.

Nothing in the models or the methods is rewritten for this: every computation is already a
``jit``-ed function of (params, batch), so placing its inputs with
:class:`~jax.sharding.NamedSharding` is enough for XLA's sharding propagation to partition it
(matmuls against column-sharded kernels run head-parallel, contractions over the ``data``-sharded
batch become all-reduces, e.g. the calibration Gram matrices). What this module owns:

* :func:`parse_mesh` / :func:`make_mesh`: ``"data=2,model=4"`` -> a mesh over the devices
  (their product must equal the device count, or the number of ``devices`` given).
* :func:`param_rules` / :func:`param_shardings` / :func:`shard_params`: the qwix-style rule
  table (``re.fullmatch`` over ``/``-joined param paths, first match wins) built from the
  family's :class:`~jcompress.models.convert.Layout`:

  ======================================  ==============================  =================
  param                                   spec (dense ``[in, out]``)      must divide
  ======================================  ==============================  =================
  q / k / v kernel                        ``P(None, "model")`` (heads)    ``num_heads`` /
                                                                          ``num_kv_heads``
  q / k / v bias                          ``P("model")``                  as the kernel
  o kernel                                ``P("model", None)`` (rows)     ``num_heads``
  MLP up / gate kernel, bias              ``P(None, "model")``,           ``intermediate``
                                          ``P("model")``
  MLP down kernel                         ``P("model", None)``            ``intermediate``
  lm_head kernel (untied)                 ``P(None, "model")`` (vocab)    optional
  embeddings, norms, other biases         replicated
  ======================================  ==============================  =================

  Typed leaves (:mod:`jcompress.leaves`) get their children placed by a per-type handler
  (:func:`register_leaf_sharding`): ``LowRank`` shards the factor that carries the sharded
  dimension, ``HeadLowRank`` / ``HeadFoldedOut`` shard their heads axis, ``Residual`` both parts
  alike; other leaf types (quantized codes, TT / Tucker cores) are replicated. A child whose
  dimension does not divide is replicated (never an uneven shard).
* :func:`shard_batch` / :func:`place_batch`: ``[B, ...]`` batches split over ``data``.
* :func:`use_mesh`: a context in which :func:`jcompress.perplexity` and
  :func:`jcompress.calibration.stream_layers` (so every method built on the layer stream)
  shard params and batches over the mesh.
* :func:`initialize_distributed`: ``jax.distributed.initialize`` from the usual environment
  variables for multi-host runs.

Example::

  mesh = jcompress.sharding.make_mesh("data=2,model=4")
  params = jcompress.sharding.shard_params(params, cfg, mesh)
  logits = jcompress.forward(cfg, params, jcompress.sharding.shard_batch(ids, mesh))
  with jcompress.sharding.use_mesh(mesh):
      r = jcompress.perplexity(cfg, params, ids, seqlen=256)
      new_params, report = eigen_attention.compress(params, cfg, calib, config=config)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jcompress.errors import UserError
from jcompress.leaf_io import to_device
from jcompress.leaves import CompressedLeaf, HeadFoldedOut, HeadLowRank, LowRank, Residual
from jcompress.models.config import ModelConfig
from jcompress.models.families import spec_for

__all__ = [
    "AXES",
    "MESH_FORM",
    "ShardRule",
    "activate",
    "check_mesh",
    "current_mesh",
    "data_size",
    "initialize_distributed",
    "make_mesh",
    "param_rules",
    "param_shardings",
    "parse_mesh",
    "place_batch",
    "register_leaf_sharding",
    "replicate",
    "shard_batch",
    "shard_params",
    "to_host",
    "to_host_local",
    "use_mesh",
]

AXES = ("data", "model")
"""Mesh axis names, in mesh order: ``data`` (batches) and ``model`` (heads / columns)."""

MESH_FORM = "data=N,model=M (either may be left out: it is then 1)"

_P = PartitionSpec
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jcompress_mesh", default=None)


# --------------------------------------------------------------------------- meshes


def parse_mesh(spec: str, *, arg: str = "mesh") -> dict[str, int]:
    """Parse ``"data=2,model=4"`` into ``{"data": 2, "model": 4}`` (a missing axis is 1).

    Raises:
      UserError: not ``name=int`` items, an unknown or repeated axis, a size < 1.
    """
    bad = f"{arg}: expected {MESH_FORM}, got {spec!r}"
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(bad)
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]+)\s*=\s*([0-9]+)\s*", item)
        if m is None:
            raise UserError(bad)
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise UserError(f"{arg}: unknown axis {name!r} in {spec!r}; axes are data, model")
        if name in sizes:
            raise UserError(f"{arg}: axis {name!r} given twice in {spec!r}")
        if size < 1:
            raise UserError(f"{arg}: axis {name}={size} must be >= 1")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(
    spec: str | Mapping[str, int],
    devices: Sequence[Any] | None = None,
    *,
    arg: str = "mesh",
) -> Mesh:
    """A ``("data", "model")`` mesh.

    Args:
      spec: ``"data=2,model=4"`` or ``{"data": 2, "model": 4}``.
      devices: the devices to lay out, flat or already shaped ``[data, model]`` (e.g. from
        ``mesh_utils.create_hybrid_device_mesh`` for multi-slice TPUs; read in row-major
        order); default: every device of every process, in the order :func:`jax.make_mesh`
        picks for the interconnect. The product of the axis sizes must equal their number.
      arg: the argument name errors report (``--mesh`` on the command line).

    Returns:
      :class:`jax.sharding.Mesh` with ``Auto`` axes (XLA propagates shardings).

    Raises:
      UserError: a bad spec, or sizes whose product is not the device count.
    """
    if isinstance(spec, str):
        sizes = parse_mesh(spec, arg=arg)
    else:
        unknown = sorted(set(spec) - set(AXES))
        if unknown:
            raise UserError(f"{arg}: unknown axis {unknown[0]!r}; axes are data, model")
        sizes = {a: spec.get(a, 1) for a in AXES}
        for a, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise UserError(f"{arg}: axis {a}={n!r} must be an integer >= 1")
    shape = tuple(int(sizes[a]) for a in AXES)
    devs = None if devices is None else np.asarray(devices, dtype=object)
    n_dev = jax.device_count() if devs is None else devs.size
    if int(np.prod(shape)) != n_dev:
        shown = ",".join(f"{a}={n}" for a, n in zip(AXES, shape, strict=True))
        raise UserError(
            f"{arg}: {shown} spans {int(np.prod(shape))} devices but there are {n_dev} "
            f"({'given' if devices is not None else jax.default_backend()}); the sizes of "
            f"{MESH_FORM} must multiply to {n_dev}"
        )
    types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(shape, AXES, axis_types=types)
    return Mesh(devs.reshape(shape), AXES, axis_types=types)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within the block, :func:`jcompress.perplexity` and the calibration layer stream (every
    method's statistics) shard params and batches over ``mesh`` (``None``: no sharding)."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise UserError(f"mesh: expected a jax.sharding.Mesh (make_mesh), got {type(mesh)}")
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the innermost :func:`use_mesh` (or the one a CLI ``--mesh`` activated)."""
    return _MESH.get()


def activate(mesh: Mesh | None) -> None:
    """Make ``mesh`` current for the rest of this context (what a CLI command does once)."""
    _MESH.set(mesh)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def data_size(mesh: Mesh | None = None) -> int:
    """How many ways a batch splits: the ``data`` size of ``mesh`` (default:
    :func:`current_mesh`), 1 without a mesh."""
    mesh = current_mesh() if mesh is None else mesh
    return 1 if mesh is None else _axis_size(mesh, "data")


# --------------------------------------------------------------------------- param rules


class ShardRule(NamedTuple):
    """``re.fullmatch(pattern, path)`` -> place the (dense) array with ``spec``.

    Attributes:
      pattern: regex over ``/``-joined param paths (``model/layers/3/self_attn/q_proj/kernel``).
      spec: :class:`~jax.sharding.PartitionSpec` of the dense array (a typed leaf's children
        follow from it, see :func:`register_leaf_sharding`).
      unit: what must divide by the ``model`` size, as ``(name, count)`` (e.g.
        ``("num_kv_heads", 4)``): a sharded dimension never splits a head. ``None``: not
        checked (a dimension its axis does not divide is then replicated).
      required: a size that does not divide ``unit`` is an error (``False``: replicate).
    """

    pattern: str
    spec: PartitionSpec
    unit: tuple[str, int] | None = None
    required: bool = True


def param_rules(cfg: ModelConfig) -> tuple[ShardRule, ...]:
    """The default rule table for ``cfg``'s family (see the module docstring)."""
    lay = spec_for(cfg.family.value).layout
    layer = re.escape(lay.layers) + r"/\d+/"
    col, row, vec = _P(None, "model"), _P("model", None), _P("model")
    heads = ("num_heads", cfg.num_heads)
    kv = ("num_kv_heads", cfg.num_kv_heads)
    inter = ("intermediate_size", cfg.intermediate_size)
    rules = []
    for role, unit in ((lay.q, heads), (lay.k, kv), (lay.v, kv)):
        rules.append(ShardRule(layer + re.escape(role) + "/kernel", col, unit))
        rules.append(ShardRule(layer + re.escape(role) + "/bias", vec, unit))
    rules.append(ShardRule(layer + re.escape(lay.o) + "/kernel", row, heads))
    for role in (lay.up, lay.gate):
        if role is not None:
            rules.append(ShardRule(layer + re.escape(role) + "/kernel", col, inter))
            rules.append(ShardRule(layer + re.escape(role) + "/bias", vec, inter))
    rules.append(ShardRule(layer + re.escape(lay.down) + "/kernel", row, inter))
    if lay.lm_head is not None and not cfg.tie_word_embeddings:
        vocab = ("vocab_size", cfg.vocab_size)
        rules.append(ShardRule(re.escape(lay.lm_head) + "/kernel", col, vocab, required=False))
        rules.append(ShardRule(re.escape(lay.lm_head) + "/bias", vec, vocab, required=False))
    rules.append(ShardRule(r".*", _P()))  # embeddings, norms, o / down biases: replicated
    return tuple(rules)


def _check_rules(rules: Sequence[ShardRule], mesh: Mesh, arg: str) -> None:
    """Every required unit divides by the sizes of the axes its spec names (before any work)."""
    done = set()
    for r in rules:
        axes = [a for a in r.spec if a is not None]
        if not axes or r.unit is None or not r.required or r.unit in done:
            continue
        done.add(r.unit)
        name, count = r.unit
        for a in axes:
            n = _axis_size(mesh, a)
            if count % n:
                raise UserError(
                    f"{arg}: axis {a}={n} does not divide {name}={count} (the {a} axis "
                    f"splits {name}); use a {a} size that divides {count}"
                )


def check_mesh(cfg: ModelConfig, mesh: Mesh, *, arg: str = "mesh") -> None:
    """Check, before any weights are read, that ``mesh`` divides every head count and width
    the default rules shard (:func:`param_rules`).

    Raises:
      UserError: naming the axis, its size and the model dimension it does not divide.
    """
    _check_rules(param_rules(cfg), mesh, arg)


LeafSharder = Callable[[Any, PartitionSpec, Mesh], list[tuple[Any, PartitionSpec]]]
_LEAF_SHARDERS: dict[type, LeafSharder] = {}


def register_leaf_sharding(cls: type) -> Callable[[LeafSharder], LeafSharder]:
    """Decorator: ``fn(leaf, spec, mesh) -> [(child, child_spec), ...]`` places a typed leaf's
    children (in ``leaf.array_fields`` order) given the ``spec`` of the dense array it stands
    for. Children may be leaves themselves (placed recursively). Unregistered types are
    replicated."""

    def deco(fn: LeafSharder) -> LeafSharder:
        _LEAF_SHARDERS[cls] = fn
        return fn

    return deco


def _divides(n: int, mesh: Mesh, axis: str | None) -> bool:
    return axis is None or n % _axis_size(mesh, axis) == 0


@register_leaf_sharding(LowRank)
def _low_rank(leaf: LowRank, spec: PartitionSpec, mesh: Mesh):
    rows, cols = (tuple(spec) + (None, None))[:2]
    # W = a @ b: output columns live in b, input rows in a; the rank axis stays whole
    return [(leaf.a, _P(rows, None)), (leaf.b, _P(None, cols))]


@register_leaf_sharding(HeadLowRank)
def _head_low_rank(leaf: HeadLowRank, spec: PartitionSpec, mesh: Mesh):
    rows, cols = (tuple(spec) + (None, None))[:2]
    if cols is not None and _divides(leaf.heads, mesh, cols):  # a: [in, heads * r] by heads
        return [(leaf.a, _P(rows, cols)), (leaf.b, _P(cols, None, None))]
    return [(leaf.a, _P(rows, None)), (leaf.b, _P())]


@register_leaf_sharding(HeadFoldedOut)
def _head_folded_out(leaf: HeadFoldedOut, spec: PartitionSpec, mesh: Mesh):
    rows, cols = (tuple(spec) + (None, None))[:2]
    if rows is not None and not _divides(leaf.query_heads, mesh, rows):
        rows = None  # w: [Hq * r, out], rows by query head
    return [(leaf.w, _P(rows, cols)), (leaf.ut, _P())]


@register_leaf_sharding(Residual)
def _residual(leaf: Residual, spec: PartitionSpec, mesh: Mesh):
    return [(leaf.base, spec), (leaf.residual, spec)]


def _fit(x: Any, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """``spec`` for array ``x``, with every axis that does not divide its dimension dropped."""
    dims = list(tuple(spec)[: x.ndim]) + [None] * max(0, x.ndim - len(spec))
    for i, a in enumerate(dims):
        if a is not None and x.shape[i] % _axis_size(mesh, a):
            dims[i] = None
    while dims and dims[-1] is None:
        dims.pop()
    return _P(*dims)


def _leaf_specs(x: Any, spec: PartitionSpec, mesh: Mesh) -> list[PartitionSpec]:
    """Specs for ``jax.tree.leaves(x)`` in order (``x`` an array or a typed leaf)."""
    if not isinstance(x, CompressedLeaf):
        return [_fit(x, spec, mesh)]
    fn = next((f for t, f in _LEAF_SHARDERS.items() if type(x) is t), None)
    if fn is None:
        return [_P() for _ in jax.tree.leaves(x)]
    out: list[PartitionSpec] = []
    for child, child_spec in fn(x, spec, mesh):
        if child is not None:
            out.extend(_leaf_specs(child, child_spec, mesh))
    return out


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def param_shardings(
    params: Any,
    cfg: ModelConfig,
    mesh: Mesh,
    *,
    rules: Sequence[ShardRule | tuple[str, PartitionSpec]] | None = None,
    arg: str = "mesh",
) -> Any:
    """A pytree of :class:`~jax.sharding.NamedSharding` matching ``params`` leaf for leaf.

    Args:
      params: param pytree (dense arrays and typed leaves).
      cfg: its config (the family layout and the head counts the rules check).
      mesh: from :func:`make_mesh`.
      rules: rules tried before the defaults of :func:`param_rules`: ``ShardRule`` or
        ``(pattern, PartitionSpec)`` pairs (first match wins).
      arg: the argument name errors report.

    Raises:
      UserError: the ``model`` size does not divide a head count / the MLP width that a
        required rule shards.
    """
    table = [r if isinstance(r, ShardRule) else ShardRule(r[0], r[1], None) for r in rules or ()]
    table += list(param_rules(cfg))
    _check_rules(table, mesh, arg)
    compiled = [(re.compile(r.pattern), r) for r in table]
    top, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda v: isinstance(v, CompressedLeaf)
    )
    specs: list[PartitionSpec] = []
    for path, x in top:
        p = _path_str(path)
        rule = next(r for pat, r in compiled if pat.fullmatch(p))
        if rule.unit is not None and not rule.required:
            if any(rule.unit[1] % _axis_size(mesh, a) for a in rule.spec if a is not None):
                rule = rule._replace(spec=_P())
        specs.extend(_leaf_specs(x, rule.spec, mesh))
    leaves, flat_def = jax.tree.flatten(params)
    if len(leaves) != len(specs):  # a leaf type whose children are not its array_fields
        raise AssertionError(f"{len(leaves)} arrays but {len(specs)} specs")
    return jax.tree.unflatten(flat_def, [NamedSharding(mesh, s) for s in specs])


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the whole value: each places its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(
    params: Any,
    cfg: ModelConfig,
    mesh: Mesh | None,
    *,
    rules: Sequence[ShardRule | tuple[str, PartitionSpec]] | None = None,
    arg: str = "mesh",
) -> Any:
    """``params`` placed on ``mesh`` by :func:`param_shardings` (``mesh=None``: unchanged).

    Leaves already placed so are not copied. Typed leaves keep their types (their children
    are placed).
    """
    if mesh is None:
        return params
    shardings = param_shardings(params, cfg, mesh, rules=rules, arg=arg)
    leaves, treedef = jax.tree.flatten(params)
    placed = [_put(x, s) for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)]
    return jax.tree.unflatten(treedef, placed)


def shard_batch(x: Any, mesh: Mesh, *, arg: str = "batch_size") -> jax.Array:
    """``x [B, ...]`` (token ids, masks, activations) split over ``data`` along ``B``.

    Raises:
      UserError: ``B`` is not a multiple of the ``data`` size.
    """
    n = _axis_size(mesh, "data")
    b = int(np.shape(x)[0])
    if b % n:
        raise UserError(
            f"{arg}: a batch of {b} rows does not divide over mesh axis data={n}; use a "
            f"multiple of {n} (batch dimension 0)"
        )
    return _put(x, NamedSharding(mesh, _P("data")))


def place_batch(x: Any, mesh: Mesh | None = None, *, arg: str = "batch_size") -> jax.Array:
    """:func:`shard_batch` over ``mesh`` (default: :func:`current_mesh`), or :func:`to_device`
    when there is no mesh: the one line the batch loops call."""
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None:
        return to_device(x)
    return shard_batch(x, mesh, arg=arg)


def replicate(x: Any, mesh: Mesh) -> jax.Array:
    """``x`` (host or device) copied whole onto every device of ``mesh``."""
    return _put(x, NamedSharding(mesh, _P()))


def to_host(x: jax.Array) -> np.ndarray:
    """``np.asarray`` of a (possibly multi-host) array: every process gets the whole value
    (a replicated one from its own copy, no collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_host_local(x: Any) -> tuple[np.ndarray, Callable[[np.ndarray], jax.Array] | None]:
    """This process's part of ``x`` on the host, and how to put such a part back.

    For an array that spans other processes' devices (a multi-host run), the part is the
    process-local block of a :class:`~jax.sharding.NamedSharding` (e.g. its rows of a
    ``data``-sharded batch: no collective, and each process keeps only its share), and the
    returned function makes the global array again from that block on every process.
    Anything else (one process, or a fully addressable array) comes back whole, with
    ``None`` as the function (the caller places it as it would a fresh host value).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x), None
    s = x.sharding
    if not isinstance(s, NamedSharding):
        return to_host(x), None
    from jax.experimental import multihost_utils

    local = multihost_utils.global_array_to_host_local_array(x, s.mesh, s.spec)

    def back(block: np.ndarray) -> jax.Array:
        return multihost_utils.host_local_array_to_global_array(block, s.mesh, s.spec)

    return np.asarray(local), back


# --------------------------------------------------------------------------- multi-host

_DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {v!r}") from None
    if n < 0:
        raise UserError(f"{name}: expected an integer >= 0, got {v!r}")
    return n


def initialize_distributed(force: bool = False) -> bool:
    """Start JAX's multi-host runtime (:func:`jax.distributed.initialize`) when asked to
    (``force``) or when ``JAX_COORDINATOR_ADDRESS`` is set; a no-op otherwise or if done.

    The coordinator address, process count and process id come from
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; with ``force`` and none of them set, JAX auto-detects the cluster
    (SLURM, Open MPI, Cloud TPU pods, GKE / Kubernetes).

    Returns:
      Whether this call initialized the runtime.

    Raises:
      UserError: a malformed variable, or a process id outside ``[0, JAX_NUM_PROCESSES)``.
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if not force and addr is None:
        return False
    if jax.distributed.is_initialized():
        return False
    nproc, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if nproc is not None and pid is not None and pid >= nproc:
        raise UserError(f"JAX_PROCESS_ID: {pid} must be < JAX_NUM_PROCESSES={nproc}")
    if nproc is not None and nproc < 1:
        raise UserError("JAX_NUM_PROCESSES: must be >= 1")
    try:
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
    except ValueError as e:  # no coordinator given and no cluster JAX can detect
        if addr is not None:
            raise
        raise UserError(
            f"--distributed: no cluster to join ({e}); set JAX_COORDINATOR_ADDRESS=host:port "
            "of process 0, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process (or run "
            "under SLURM / Open MPI / a TPU pod, which JAX detects)"
        ) from None
    return True
