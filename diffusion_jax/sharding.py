"""The device mesh: one data-parallel axis over all devices of all hosts.

The train state is replicated; batches are split along their leading axis. Axes are ``Auto``
(GSPMD propagation) so model code needs no sharding annotations.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh ``("data",)`` over every device of every process."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: jax.sharding.Mesh, local: Any) -> Any:
    """Global batch arrays from this host's rows (all hosts call this with their own rows): an
    array, or a pytree of them (a batch dict), each split over the data axis."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def prefetch(mesh: jax.sharding.Mesh, batches: Iterator[Any], size: int = 1) -> Iterator[Any]:
    """``global_batch`` of each of ``batches``, ``size`` batches ahead: the transfer of the next
    batch to the devices is issued (asynchronously) before the current one is handed out, so it
    runs while the current step computes."""
    queue: collections.deque = collections.deque()
    for local in batches:
        queue.append(global_batch(mesh, local))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def check_batch_size(batch_size: int, name: str = "training.batch_size") -> None:
    """The global batch must split evenly over devices (and hence over hosts)."""
    n = jax.device_count()
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of the number of devices ({n}: "
            f"{jax.process_count()} process(es) x {jax.local_device_count()} local device(s))."
        )
