"""Tests of the batch pipeline (permutations, sharded batches, evaluation chunks) and the statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxembed.configs import common
from jaxembed import configlib
from jaxembed import data
from jaxembed.data import pipeline


def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def test_epoch_permutation_depends_on_seed_and_epoch_only():
  a = pipeline.epoch_permutation(3, 5, 100)
  np.testing.assert_array_equal(np.sort(a), np.arange(100))
  np.testing.assert_array_equal(a, pipeline.epoch_permutation(3, 5, 100))
  assert not np.array_equal(a, pipeline.epoch_permutation(3, 6, 100))
  assert not np.array_equal(a, pipeline.epoch_permutation(4, 5, 100))


def test_training_epoch_drops_the_partial_batch_and_repeats_no_image():
  n, b = 103, 16
  spe = pipeline.steps_per_epoch(n, b)
  assert spe == 6
  for epoch in range(2):
    idx = np.concatenate([pipeline.batch_indices(7, epoch * spe + i, n, b) for i in range(spe)])
    assert len(idx) == 96 and len(set(idx.tolist())) == 96
    perm = pipeline.epoch_permutation(7, epoch, n)
    np.testing.assert_array_equal(idx, perm[:96])  # the last 7 of the permutation are dropped
  assert pipeline.batch_indices(7, 0, n, b).dtype == np.int32


def test_host_batch_indices_concatenate_to_the_global_batch():
  parts = [pipeline.host_batch_indices(1, 9, 50, 12, p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), pipeline.batch_indices(1, 9, 50, 12))
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.host_batch_indices(1, 0, 50, 10, 0, 4)


@pytest.mark.parametrize("n,chunk,multiple", [(0, 8, 8), (1, 8, 8), (37, 16, 8), (64, 64, 8),
                                              (65, 20, 8), (10, 3, 4)])
def test_padded_chunks_cover_every_example_once(n, chunk, multiple):
  seen = []
  for start, stop, padded in pipeline.padded_chunks(n, chunk, multiple):
    assert padded % multiple == 0 and padded >= stop - start > 0
    assert padded - (stop - start) < multiple
    seen += list(range(start, stop))
  assert seen == list(range(n))


def test_sharded_gather_on_8_devices_equals_numpy():
  """The trainer's layout: replicated uint8 data, batch-sharded indices, gather under jit."""
  mesh = mesh8()
  images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1)).astype(np.uint8)
  images_all = jax.device_put(images, NamedSharding(mesh, P()))
  gather = jax.jit(lambda x, i: x[i], out_shardings=NamedSharding(mesh, P("data")))
  idx = pipeline.batch_indices(0, 4, 50, 16)
  idx_dev = jax.device_put(idx, NamedSharding(mesh, P("data")))
  batch = gather(images_all, idx_dev)
  assert batch.dtype == jnp.uint8 and batch.sharding.spec == P("data")
  assert len(batch.addressable_shards) == 8 and batch.addressable_shards[0].data.shape[0] == 2
  np.testing.assert_array_equal(np.asarray(batch), images[idx])


def test_compute_stats_against_numpy():
  rng = np.random.default_rng(0)
  for shape in [(7, 5, 6, 3), (3, 9, 4, 1), (2, 3, 3, 1)]:
    x = rng.integers(0, 256, shape).astype(np.uint8)
    s = data.compute_stats(x)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(s["mean"], f.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s["std"], f.std(axis=(0, 1, 2)), rtol=1e-12)
    mask = np.zeros(shape[1:3], bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    np.testing.assert_allclose(s["border_mean"], f[:, mask].mean(axis=(0, 1)), rtol=1e-12)
  flat = data.compute_stats(np.full((2, 3, 3, 1), 9, np.uint8))
  assert flat["std"] == (1e-3,)  # never 0: the model divides by it


def test_compute_stats_chunks_agree(monkeypatch):
  from jaxembed.data import stats
  x = np.random.default_rng(1).integers(0, 256, (13, 4, 4, 3)).astype(np.uint8)
  whole = stats.compute_stats(x)
  monkeypatch.setattr(stats, "_CHUNK", 4)
  assert stats.compute_stats(x) == whole


def test_trainer_clamps_a_batch_larger_than_the_dataset(capsys):
  config = common.get_config()
  config.batch_size = 512
  ds = data.from_arrays(np.zeros((100, 4, 4), np.uint8))
  stats = data.compute_stats(ds.train_images)
  config = configlib.resolve_config(config, len(ds.train_images), stats, num_devices=8)
  assert config.batch_size == 96
  assert "larger than the 100 training images" in capsys.readouterr().out
  tiny = data.from_arrays(np.zeros((7, 4, 4), np.uint8))
  config.batch_size = 512
  with pytest.raises(data.DataError, match="only 7 training images for 8 devices"):
    configlib.resolve_config(config, len(tiny.train_images), stats, num_devices=8)
