"""Mesh, parameter/batch shardings and multi-host helpers.

Mesh axes are ``('data', 'model')`` with ``AxisType.Auto`` (Flax logical constraints fail on
the Explicit default). The batch is sharded over ``data`` (replicated over ``model``).

Parameters (and every optimizer-state leaf) are either replicated, or with
``config.sharding.fsdp=True`` FSDP-sharded by a shape rule: a leaf with at least
``config.sharding.fsdp_min_size`` elements (default 2**12) is split over ``data`` along its
largest dimension divisible by the ``data`` axis size (first such dimension on ties); other
leaves are replicated. Because the rule depends only on shapes, Adam moments get the same
sharding as their parameters, and XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def fsdp_spec(shape: tuple[int, ...], data_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """PartitionSpec sharding the largest dim divisible by ``data_size`` over 'data' (or P())."""
    if data_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % data_size == 0 and (best is None or d > shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = DATA
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """NamedSharding for every array leaf of a (possibly abstract) train state."""
    data_size = mesh.shape[DATA]

    def one(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        spec = fsdp_spec(shape, data_size, fsdp_min_size) if fsdp else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state)


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
