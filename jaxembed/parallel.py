"""Device mesh, shardings, and multi-host start-up: the one place that decides how data is laid out.

Convention: a 1-D mesh with a single axis ``"data"`` of *Auto* axis type.
Batches are split along their first dimension over that axis, parameters
are replicated, and XLA inserts the collectives. With Auto axes, an
operation that mixes rows of the sharded batch (the pairwise distances of
the contrastive loss) is resolved by the compiler instead of failing the
sharding-type check that Explicit axes (the default of ``jax.make_mesh``)
would apply, so the loss sees the global batch without hand-written
collectives. (losses.py can still shard its rows by hand with
``jax.shard_map`` over ``data``; that works on Auto axes too.)

Multi-host: every process runs the same program on the global mesh, whose
devices ``jax.devices()`` orders process by process, so each process owns a
contiguous block of batch rows. ``initialize`` joins the processes; data
enter as global arrays through ``shard_batch`` (each process its own rows) or
``global_from_full`` (every process holds everything); ``to_host`` brings
results back to every process; only ``is_main_process()`` writes files.
docs/parallel.md has the details and the tests that check them.
"""

import glob
import importlib.util
import os

from absl import logging
import jax
from jax._src import xla_bridge
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

ENV_COORDINATOR = "JAXEMBED_COORDINATOR"
ENV_NUM_PROCESSES = "JAXEMBED_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXEMBED_PROCESS_ID"

# The variables jax's own SLURM detection reads (jax/_src/clusters/slurm_cluster.py);
# SLURM_STEP_NODELIST exists only inside ``srun``, not in a bare ``salloc`` shell.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-host run; a no-op for a single process. Call it before any other JAX call.

  Explicit set-up: the coordinator's ``host:port``, the process count and
  this process's id (0 is the coordinator) from the arguments or else from
  the environment variables ``JAXEMBED_COORDINATOR``,
  ``JAXEMBED_NUM_PROCESSES`` and ``JAXEMBED_PROCESS_ID``; every process
  passes the same address and count. Without them, a ``srun`` step of more
  than one SLURM task and a Cloud TPU VM (pod slice or GKE) are detected by
  ``jax.distributed.initialize()`` itself.

  Returns:
    True if this process is now part of a distributed run, else False.

  Raises:
    ValueError: a coordinator without a process count or id (or the other
      way round), an id outside ``[0, num_processes)``, or a value that is
      not an integer.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _int_setting(num_processes, "num_processes", ENV_NUM_PROCESSES)
  process_id = _int_setting(process_id, "process_id", ENV_PROCESS_ID)

  if coordinator_address is None:
    if num_processes is not None and num_processes > 1:
      raise ValueError(f"num_processes={num_processes} but no coordinator address; pass "
                       f"coordinator_address='host:port' or set {ENV_COORDINATOR}")
    if not _cluster_detectable():
      return False
    jax.distributed.initialize()
    return True

  if num_processes is None or process_id is None:
    raise ValueError(f"coordinator {coordinator_address!r} given without "
                     f"{'num_processes' if num_processes is None else 'process_id'}; pass both "
                     f"or set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} with num_processes={num_processes}: ids run from "
                     f"0 to num_processes - 1")
  if num_processes == 1:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def _int_setting(value, name, env):
  if value is None:
    value = os.environ.get(env) or None
    name = env
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _cluster_detectable():
  """Whether jax.distributed.initialize() can configure itself (SLURM step, Cloud TPU VM)."""
  if all(v in os.environ for v in _SLURM_VARS):
    return int(os.environ["SLURM_NTASKS"]) > 1
  if "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return True
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    # A multi-host TPU job lists its workers; one name (as jaxembed.aot sets for
    # compile-only use, "localhost") is a single host.
    return len([h for h in os.environ["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]) > 1
  # A Cloud TPU VM (GCE pod slice): libtpu installed and TPU chips present.
  # jax then reads the workers from the metadata server; one host is one process.
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


# ---------------------------------------------------------------------- platform


def platform(mesh=None):
  """The platform ("cpu", "gpu" or "tpu") of the devices a program is compiled for.

  The one place that decides which platform-specific path a program takes
  (the CPU convolution workaround in models/cpu_conv.py, augmentation's
  per-image scan, the evaluator's host threads and block sizes): it asks
  the devices of ``mesh`` (or of ``jax.devices()`` when None), not the
  backend JAX happens to run on, so that a program compiled here for a TPU
  slice (compile-only devices, scripts/aot_compile.py) is the one a TPU
  would run.
  """
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  kinds = {_PLATFORM_NAMES.get(d.platform.lower(), d.platform.lower()) for d in devices}
  if len(kinds) != 1:
    raise ValueError(f"a mesh over devices of several platforms {sorted(kinds)}; use one kind")
  return kinds.pop()


# What ``Device.platform`` reports, by the names used here.
_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


def uses_cpu_paths(mesh_or_platform=None):
  """Whether programs for ``mesh_or_platform`` (a mesh, a platform name or None) run on CPUs."""
  if isinstance(mesh_or_platform, str):
    return _PLATFORM_NAMES.get(mesh_or_platform, mesh_or_platform) == "cpu"
  return platform(mesh_or_platform) == "cpu"


# XLA:GPU's switch for run-to-run identical results (jaxlib 0.10 still has it;
# it implies --xla_gpu_exclude_nondeterministic_ops, openxla/xla#12520): no
# atomics-based scatters and reductions, and no autotuning, whose kernel
# choice can change between runs. Only XLA:GPU reads it.
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_deterministic_ops():
  """Adds XLA's deterministic-ops flag to ``XLA_FLAGS`` (``train.deterministic``).

  XLA reads ``XLA_FLAGS`` once, when JAX starts its backend (the first
  computation, or ``jax.devices()``), so this must run before that:
  ``python -m jaxembed.train`` calls it first thing. Called later, the
  flag can no longer take effect: on a GPU that is an error (exact resume
  was asked for and cannot be given); elsewhere it only warns, since only
  XLA:GPU reads the flag.

  Returns:
    True if the flag is in effect for this process's backend.

  Raises:
    ValueError: the backend already runs on GPUs without the flag.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if any(tok in (DETERMINISTIC_FLAG, "--xla_gpu_deterministic_ops")
         for tok in current.split()):
    return True
  if _backend_started():
    if platform() == "gpu":
      raise ValueError(
          "train.deterministic=True needs XLA_FLAGS set before JAX starts its GPU backend, "
          "and it has started already; set XLA_FLAGS=" + DETERMINISTIC_FLAG + " in the "
          "environment, or call jaxembed.parallel.enable_deterministic_ops() before any JAX "
          "computation")
    logging.warning("train.deterministic: the JAX backend has started, so %s cannot take "
                    "effect; the %s backend does not read it", DETERMINISTIC_FLAG, platform())
    return False
  os.environ["XLA_FLAGS"] = (current + " " + DETERMINISTIC_FLAG).strip()
  return True


def _backend_started():
  try:
    return xla_bridge.backends_are_initialized()
  except AttributeError:  # another jax: assume the worst
    return True


# -------------------------------------------------------------------------- mesh


def make_mesh(num_devices=None, devices=None):
  """A 1-D ``data`` mesh over all (or the first ``num_devices``) devices.

  ``devices`` replaces ``jax.devices()``, e.g. by compile-only devices of a
  TPU slice (jaxembed.aot) for a program compiled here and run there.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices) if num_devices is None else num_devices
  if n < 1 or n > len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are present")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def data_axis_size(mesh, batch, user, fix=""):
  """Devices on ``mesh``'s ``data`` axis, over which a batch of ``batch`` rows is split.

  Raises ValueError when the mesh has no ``data`` axis or the batch does not
  split evenly over it; ``user`` names what shards (e.g. "the loss") and
  ``fix`` is appended to the second message (another way out, if any).
  """
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"{user} shards over a mesh axis named {DATA_AXIS!r}; got a mesh with axes "
                     f"{mesh.axis_names}. Build it with parallel.make_mesh().")
  n = mesh.shape[DATA_AXIS]
  if batch % n:
    raise ValueError(f"batch size {batch} is not divisible by the {n} devices of the "
                     f"{DATA_AXIS!r} mesh axis; use a batch size that is a multiple of {n}{fix}")
  return n


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
  """Fetches (possibly multi-host) global arrays, a pytree, as NumPy arrays on every process."""
  if jax.process_count() > 1:
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(x))  # one transfer call for the whole tree


def gather_rows(local):
  """Every process's rows of ``local`` (NumPy; the count may differ by process), on every process.

  The rows come in process order: with contiguous shares of a split per
  process, that is the split's order. One process: ``local`` itself.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(local)], np.int64)))
  counts = counts.reshape(-1)
  padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))  # (processes, max, ...)
  return np.concatenate([every[p, :counts[p]] for p in range(len(counts))])


def is_main_process():
  return jax.process_index() == 0
