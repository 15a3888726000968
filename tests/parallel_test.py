"""Mesh convention, global arrays from host data, and the argument checks of parallel.initialize."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxembed import parallel

ENV = ("JAXEMBED_COORDINATOR", "JAXEMBED_NUM_PROCESSES", "JAXEMBED_PROCESS_ID", "SLURM_JOB_ID",
       "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
       "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_mesh_is_1d_data_with_auto_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 8
  assert mesh.axis_types == (AxisType.Auto,)
  assert parallel.make_mesh(2).devices.size == 2
  with pytest.raises(ValueError, match="devices are present"):
    parallel.make_mesh(9)


def test_global_arrays_from_host_data_round_trip():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = parallel.global_from_full(mesh, x)
  assert g.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  # Device k holds rows 2k, 2k + 1: the batch is split in order.
  assert [s.index[0] for s in g.addressable_shards][:2] == [slice(0, 2), slice(2, 4)]
  np.testing.assert_array_equal(parallel.to_host(g), x)
  s = parallel.shard_batch(mesh, {"x": x})["x"]
  np.testing.assert_array_equal(parallel.to_host(s), x)
  r = parallel.replicate(mesh, {"w": np.ones(3)})["w"]
  assert r.sharding.is_fully_replicated
  assert parallel.is_main_process()


@pytest.fixture
def clean_env(monkeypatch):
  for name in ENV:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_initialize_is_a_no_op_for_one_process(clean_env):
  assert parallel.initialize() is False
  assert parallel.initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False
  clean_env.setenv("JAXEMBED_NUM_PROCESSES", "1")
  assert parallel.initialize() is False
  # A SLURM allocation of one task, or a shell without srun, is no multi-host run.
  clean_env.setenv("SLURM_JOB_ID", "7")
  assert parallel.initialize() is False
  # Nor is one TPU worker (what jaxembed.aot sets for compile-only libtpu use).
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert parallel.initialize() is False


def test_a_tpu_job_of_several_workers_is_detected(clean_env):
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
  assert parallel._cluster_detectable()  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs, env, match", [
    ({"coordinator_address": "127.0.0.1:1234"}, {}, "num_processes"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, {}, "process_id"),
    ({}, {"JAXEMBED_COORDINATOR": "h:1", "JAXEMBED_NUM_PROCESSES": "2",
          "JAXEMBED_PROCESS_ID": "2"}, "ids run from 0"),
    ({}, {"JAXEMBED_COORDINATOR": "h:1", "JAXEMBED_NUM_PROCESSES": "two",
          "JAXEMBED_PROCESS_ID": "0"}, "JAXEMBED_NUM_PROCESSES must be an integer"),
    ({"num_processes": 4, "process_id": 1}, {}, "no coordinator address"),
])
def test_initialize_reports_incomplete_settings(clean_env, kwargs, env, match):
  for k, v in env.items():
    clean_env.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    parallel.initialize(**kwargs)
