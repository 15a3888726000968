"""Tests of the TFDS source (tfds.testing.mock_data, nothing downloaded) and the streaming path."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P
from PIL import Image

from configs import common
from jaxembed import data
from jaxembed.data import pipeline

tfds = pytest.importorskip("tensorflow_datasets")


def cfg(**kw):
  c = ml_collections.ConfigDict(common.get_config().data.to_dict())
  c.image_size = 0
  c.update(kw)
  return c


def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def write_split_metadata(data_dir, name, splits):
  """dataset_info.json with known splits, so that mock_data knows the split names."""
  b = tfds.builder(name, data_dir=str(data_dir))
  b.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in splits.items()]))
  os.makedirs(b.data_dir, exist_ok=True)
  b.info.write_to_directory(b.data_dir)


def test_tfds_cifar10_mock(tmp_path):
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    ds = data.load(cfg(source="tfds", name="cifar10", dir=str(tmp_path), image_size=8))
  assert ds.train_images.shape == (24, 8, 8, 3) and ds.test_images.shape == (24, 8, 8, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert len(ds.class_names) == 10 and ds.name == "cifar10"
  assert len(set(ds.train_ids)) == 24 and all(ds.train_ids)


def test_tfds_gray_with_filters_and_test_split_none(tmp_path):
  with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path)):
    ds = data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), max_examples=10,
                       test_split="none", test_fraction=0.2, channels=3))
  assert ds.train_images.shape == (8, 28, 28, 3) and ds.test_images.shape == (2, 28, 28, 3)


def test_tfds_bad_inputs(tmp_path):
  write_split_metadata(tmp_path, "mnist", {"train": 20, "test": 10})
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    with pytest.raises(data.DataError, match=r"no split 'validation'; its splits: \['test', 'train'\]"):
      data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), test_split="validation"))
    with pytest.raises(data.DataError, match="no feature 'picture'"):
      data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), image_key="picture"))
  with pytest.raises(data.DataError, match="not prepared.*tfds build mnist"):
    data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path / "empty")))
  with pytest.raises(data.DataError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
    data.load(cfg(source="tfds", name="no_such_dataset_xyz", dir=str(tmp_path)))
  with pytest.raises(data.DataError, match="needs --config.data.name"):
    data.load(cfg(source="tfds"))


# -------------------------------------------------------------------- streaming


def make_folder(root, n_per_class=10):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    for i in range(n_per_class):
      (root / c).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(root / c / f"{i}.png")
  return root


def test_folder_stream_equals_the_in_memory_batches(tmp_path):
  from jaxembed.data import streaming
  c = cfg(source="folder", path=str(make_folder(tmp_path)), image_size=4, test_fraction=0.25)
  ds = data.load(c)
  n = len(ds.train_images)
  assert n == 15
  mesh = mesh8()
  batches = list(streaming.stream_batches(c, 8, mesh, seed=3, num_steps=4))
  assert len(batches) == 4
  for step, batch in enumerate(batches):
    assert batch.dtype == np.uint8 and batch.shape == (8, 4, 4, 3)
    assert batch.sharding.spec == P("data") and len(batch.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch),
                                  ds.train_images[pipeline.batch_indices(3, step, n, 8)])
  resumed = next(streaming.stream_batches(c, 8, mesh, seed=3, start_step=2, num_steps=1))
  np.testing.assert_array_equal(np.asarray(resumed), np.asarray(batches[2]))


def test_folder_stream_bad_inputs(tmp_path):
  from jaxembed.data import streaming
  mesh = mesh8()
  root = make_folder(tmp_path / "f", 4)
  c = cfg(source="folder", path=str(root), image_size=4, test_fraction=0.0)
  with pytest.raises(data.DataError, match="larger than the 8 training images"):
    streaming.stream_batches(c, 16, mesh)
  with pytest.raises(data.DataError, match="not divisible by the 8 devices"):
    streaming.stream_batches(c, 12, mesh)
  with pytest.raises(data.DataError, match="'folder' or 'tfds', not 'digits'"):
    streaming.stream_batches(cfg(source="digits"), 8, mesh)
  (root / "b" / "3.png").write_bytes(b"broken")
  with pytest.raises(data.DataError, match="cannot read .*3.png"):
    list(streaming.stream_batches(c, 8, mesh, num_steps=2))
  (tmp_path / "g").mkdir()
  for i in range(8):
    Image.fromarray(np.full((3, 3), i, np.uint16)).save(tmp_path / "g" / f"{i}.png")
  with pytest.raises(data.DataError, match="vrange=\\(lo, hi\\)"):
    streaming.stream_batches(cfg(source="folder", path=str(tmp_path / "g"), test_fraction=0.0),
                             8, mesh)


def test_tfds_stream(tmp_path):
  from jaxembed.data import streaming
  mesh = mesh8()
  c = cfg(source="tfds", name="cifar10", dir=str(tmp_path), image_size=8)
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    batches = [np.asarray(b) for b in streaming.stream_batches(c, 8, mesh, seed=1, num_steps=5)]
    again = [np.asarray(b) for b in streaming.stream_batches(c, 8, mesh, seed=1, num_steps=5)]
    resumed = np.asarray(next(streaming.stream_batches(c, 8, mesh, seed=1, start_step=3)))
  assert len(batches) == 5 and batches[0].shape == (8, 8, 8, 3) and batches[0].dtype == np.uint8
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(resumed, batches[3])
