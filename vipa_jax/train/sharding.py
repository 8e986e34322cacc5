"""Mesh, parameter/batch shardings (logical-axis rules) and multi-host helpers.

Mesh axes are ``('data', 'model')`` with ``AxisType.Auto`` (Flax logical constraints fail on
the Explicit default). The batch is sharded over ``data`` (replicated over ``model``).

Parameters are sharded through logical axes, as in maxtext / t5x:

1. every parameter gets logical axis names from its path (`PARAM_LOGICAL_AXES`, regexes on the
   '/'-joined path, first match wins; `config.sharding.param_axes` entries come first), or
   from its rank when no pattern matches (`RANK_LOGICAL_AXES`: a 2-D kernel is
   ``('embed', 'hidden')``, a 4-D conv kernel ``(None, None, 'conv_in', 'conv_out')``);
2. rules map logical names to mesh axes (`config.sharding.logical_axis_rules`, e.g.
   ``('embed=data', 'mlp=model')``); a dimension takes the first rule for its name whose mesh
   axis is not used by another dimension of the same leaf and divides its size, else it is
   replicated. Leaves under ``config.sharding.fsdp_min_size`` elements stay replicated.

No rules: every parameter is replicated (data parallel). ``config.sharding.fsdp=True`` without
rules uses `FSDP_RULES`: each large leaf is split over ``data`` along its first shardable
dimension. Rules over ``model`` give tensor parallelism (``'mlp=model', 'heads=model'``).
Optimizer-state leaves carry their parameter's path as a suffix (``.../mu/encoder/...``), so Adam
moments are sharded like their parameters; XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vipa_jax.train.optim import path_str

DATA, MODEL = "data", "model"
DEFAULT_FSDP_MIN_SIZE = 2**12


def maybe_initialize_distributed(
    enable: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when asked (flag or ``VIPA_DISTRIBUTED=1``).

    Without explicit arguments JAX auto-detects the cluster (SLURM, TPU pods, Kubernetes...).
    Returns whether it initialized. Must run before any other JAX call.
    """
    if enable is None:
        enable = os.environ.get("VIPA_DISTRIBUTED", "0") not in ("", "0", "false", "False")
    if not enable:
        return False
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = int(num_processes)
    if process_id is not None:
        kwargs["process_id"] = int(process_id)
    jax.distributed.initialize(**kwargs)
    return True


def define_distributed_flags() -> Callable[[], bool]:
    """Define ``--distributed``, ``--coordinator_address``, ``--num_processes``, ``--process_id``
    (absl) for an entry point; returns ``init()`` that calls `maybe_initialize_distributed`."""
    from absl import flags

    enable = flags.DEFINE_bool("distributed", None,
                               "Call jax.distributed.initialize() (default: $VIPA_DISTRIBUTED).")
    coord = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
    nproc = flags.DEFINE_integer("num_processes", None, "Number of processes.")
    pid = flags.DEFINE_integer("process_id", None, "This process's index.")
    return lambda: maybe_initialize_distributed(enable.value, coord.value, nproc.value, pid.value)


def make_mesh(mesh_shape: tuple[int, ...] | list[int] = (-1, 1),
              devices: list | None = None) -> Mesh:
    """('data', 'model') mesh over all (or the given) devices; one entry may be -1."""
    shape = [int(s) for s in mesh_shape]
    if len(shape) != 2:
        raise ValueError(f"mesh_shape must be (data, model), got {tuple(mesh_shape)}")
    n = len(devices) if devices is not None else jax.device_count()
    if shape.count(-1) > 1:
        raise ValueError(f"at most one -1 in mesh_shape, got {tuple(mesh_shape)}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if known <= 0 or n % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
    return jax.make_mesh(tuple(shape), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over 'data'."""
    return NamedSharding(mesh, P(DATA))


# Logical axes by path (regex searched in the '/'-joined path; first match wins).
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)(query|key|value)/kernel$", ("embed", "heads")),
    (r"(^|/)(query|key|value)/bias$", ("heads",)),
    (r"(^|/)(out|attention/output/dense)/kernel$", ("heads", "embed")),
    (r"(^|/)(fc1|intermediate/dense)/kernel$", ("embed", "mlp")),
    (r"(^|/)(fc1|intermediate/dense)/bias$", ("mlp",)),
    (r"(^|/)(fc2|output/dense)/kernel$", ("mlp", "embed")),
    (r"(^|/)word_embeddings/embedding$", ("vocab", "embed")),
    (r"(^|/)embedding$", ("table", "embed")),
    (r"(^|/)relative_position_bias_table$", ("table", "heads")),
    (r"(^|/)absolute_pos_embed/table$", (None, None, None, "embed")),
)
# The stacked axis of scanned blocks' parameters, found by its path component.
LAYERS = "layers"
_STACKED = re.compile(r"(?:^|/)(block_pairs/)")
# ... and by rank for every other leaf (biases and norms are 'norm': never sharded by default).
RANK_LOGICAL_AXES: dict[int, tuple[str | None, ...]] = {
    0: (), 1: ("norm",), 2: ("embed", "hidden"), 4: (None, None, "conv_in", "conv_out"),
}
# config.sharding.fsdp=True without explicit rules: one dimension of each big leaf over 'data'.
FSDP_RULES = ("embed=data", "vocab=data", "mlp=data", "heads=data", "hidden=data", "table=data",
              "conv_out=data", "conv_in=data")


def _parse_pairs(entries: Iterable[str], what: str) -> list[tuple[str, str]]:
    """("lhs=rhs", ...) -> [(lhs, rhs)] with a clear error naming the bad entry."""
    out = []
    for e in entries:
        lhs, sep, rhs = str(e).rpartition("=")
        if not sep or not lhs.strip():
            raise ValueError(f"config.sharding.{what}: expected 'name=value' entries, got {e!r}")
        out.append((lhs.strip(), rhs.strip()))
    return out


def parse_axis_rules(rules: Iterable[str], mesh_axes: Sequence[str] = (DATA, MODEL)
                     ) -> list[tuple[str, str | None]]:
    """("embed=data", "mlp=model", "norm=") -> [(logical, mesh axis or None)]."""
    out: list[tuple[str, str | None]] = []
    for name, axis in _parse_pairs(rules, "logical_axis_rules"):
        if axis and axis not in mesh_axes:
            raise ValueError(f"config.sharding.logical_axis_rules: {name}={axis}: {axis!r} is "
                             f"not a mesh axis {tuple(mesh_axes)}")
        out.append((name, axis or None))
    return out


def parse_param_axes(entries: Iterable[str]) -> list[tuple[str, tuple[str | None, ...]]]:
    """("regex=ax1,ax2", ...) -> [(regex, (ax1, ax2))]; an empty name means unsharded (None)."""
    out = []
    for pattern, axes in _parse_pairs(entries, "param_axes"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.sharding.param_axes: bad regex {pattern!r}: {e}") from e
        out.append((pattern, tuple(a.strip() or None for a in axes.split(","))))
    return out


def logical_axes(path: str, ndim: int,
                 extra: Sequence[tuple[str, tuple[str | None, ...]]] = ()
                 ) -> tuple[str | None, ...]:
    """Logical axis names of the leaf at `path` ('/'-joined) with `ndim` dimensions. A leaf of
    stacked blocks (`.../block_pairs/...`, `model.swin.stacked_params`) is ('layers', then the
    axes of one block's leaf); no default rule shards 'layers'."""
    stacked = _STACKED.search(path)
    if stacked and ndim:
        one = path[:stacked.start(1)] + path[stacked.end(1):]
        return (LAYERS, *logical_axes(one, ndim - 1, extra))
    for pattern, axes in (*extra, *PARAM_LOGICAL_AXES):
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return RANK_LOGICAL_AXES.get(ndim, (None,) * ndim)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int],
                    rules: Sequence[tuple[str, str | None]], mesh_shape: dict[str, int]) -> P:
    """PartitionSpec from logical axes: each dim takes its first usable rule (free mesh axis of
    size > 1 that divides the dim), else None."""
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        chosen = None
        for logical, axis in rules:
            if logical != name or axis is None or axis in used:
                continue
            n = mesh_shape.get(axis, 1)
            if n > 1 and size % n == 0:
                chosen = axis
                break
        if chosen is not None:
            used.add(chosen)
        spec.append(chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
                    rules: Sequence[str] = (), param_axes: Sequence[str] = ()) -> Any:
    """NamedSharding for every array leaf of a (possibly abstract) train state (see module doc)."""
    rule_list = parse_axis_rules(rules or (FSDP_RULES if fsdp else ()), mesh.axis_names)
    extra = parse_param_axes(param_axes)
    mesh_shape = dict(mesh.shape)

    def one(path: Sequence[Any], x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        if not rule_list or not shape or int(np.prod(shape)) < fsdp_min_size:
            return NamedSharding(mesh, P())
        axes = logical_axes(path_str(path), len(shape), extra)
        return NamedSharding(mesh, logical_to_spec(axes, shape, rule_list, mesh_shape))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """Per-process batch size; errors unless the batch splits evenly over processes and 'data'."""
    pc, data_size = jax.process_count(), mesh.shape[DATA]
    if global_batch % data_size or global_batch % pc:
        raise ValueError(
            f"global batch {global_batch} must be divisible by the data axis ({data_size}) "
            f"and the process count ({pc})"
        )
    return global_batch // pc


def host_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded along the batch dim."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
