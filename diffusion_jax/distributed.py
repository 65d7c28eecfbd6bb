"""Multi-host start-up: ``jax.distributed.initialize`` before any other JAX call.

On TPU pods, Slurm and Open MPI, JAX detects the coordinator and the process ids itself. Elsewhere
set ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(``JAX_LOCAL_DEVICE_IDS`` optional), which this module passes on: that is how several processes
on one machine (the CPU backend, one device each) form a cluster, e.g. in the tests.

On the CPU backend, arrays spanning processes need cross-process collectives: gloo (the default
of current JAX) unless another implementation (``mpi``) was configured.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize(enabled: bool) -> None:
    """Join the cluster when ``enabled`` or when ``JAX_COORDINATOR_ADDRESS`` is set."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (enabled or address):
        return
    kwargs = {}
    if address:
        kwargs = dict(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        if "JAX_LOCAL_DEVICE_IDS" in os.environ:
            ids = os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")
            kwargs["local_device_ids"] = [int(i) for i in ids]
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Process %d of %d: %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
