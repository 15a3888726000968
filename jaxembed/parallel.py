"""Device mesh, shardings, and multi-host start-up: the one place that decides how data is laid out.

Convention: a 1-D mesh with a single axis ``"data"`` of *Auto* axis type.
Batches are split along their first dimension over that axis, parameters
are replicated, and XLA inserts the collectives. With Auto axes, an
operation that mixes rows of the sharded batch (the pairwise distances of
the contrastive loss) is resolved by the compiler instead of failing the
sharding-type check that Explicit axes (the default of ``jax.make_mesh``)
would apply, so the loss sees the global batch without hand-written
collectives.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-host run; a no-op for a single process.

  On TPU pods and SLURM, ``jax.distributed.initialize()`` detects everything
  by itself. Elsewhere the coordinator address, process count and id come
  from the arguments or from the environment variables
  ``JAXEMBED_COORDINATOR``, ``JAXEMBED_NUM_PROCESSES`` and
  ``JAXEMBED_PROCESS_ID``.
  """
  coordinator_address = coordinator_address or os.environ.get("JAXEMBED_COORDINATOR")
  if num_processes is None and "JAXEMBED_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAXEMBED_NUM_PROCESSES"])
  if process_id is None and "JAXEMBED_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAXEMBED_PROCESS_ID"])
  auto = any(v in os.environ for v in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator_address is None and not auto:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def make_mesh(num_devices=None):
  """A 1-D ``data`` mesh over all (or the first ``num_devices``) devices."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n < 1 or n > len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are present")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def batch_sharding(mesh):
  """Sharding of a batch: first dimension split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  """Sharding of parameters and other state: a full copy on every device."""
  return NamedSharding(mesh, P())


def shard_batch(mesh, host_batch):
  """Turns this process's part of a batch (a pytree of arrays) into global arrays.

  With one process the host batch is the global batch. With several, every
  process passes its own rows and the global batch is their concatenation
  in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def global_from_full(mesh, array):
  """A batch-sharded global array from a NumPy array that every process holds in full."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda index: array[index])


def replicate(mesh, tree):
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x):
  """Fetches a (possibly multi-host) global array as one NumPy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def is_main_process():
  return jax.process_index() == 0
