"""Tests of the TFDS source and the streaming path (nothing downloaded).

Datasets prepared as array_record are built here from PIL images, which
needs no TensorFlow, and read with TensorFlow hidden (as in CI, where it is
not installed). ``tfds.testing.mock_data`` and TFRecord files go through
tf.data: those tests need TensorFlow (the ``tf`` extra) and skip without it.
"""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P
from PIL import Image

from jaxembed import data
from jaxembed import extras
from jaxembed.configs import common
from jaxembed.data import pipeline
from jaxembed.data import streaming

tfds = pytest.importorskip("tensorflow_datasets")

N_TRAIN, N_TEST, TEST_OFFSET = 40, 12, 100
NO_VALIDATION = r"no split 'validation'; its splits: \['test', 'train'\]"


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


def expected_image(i, shape):
  """Image ``i`` of the tiny datasets: seeded noise whose first pixel is ``i``."""
  img = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
  img[0, 0, 0] = i
  return img


class TinyRgb(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """8x8 RGB PNGs in three classes; train 0..39, test 100..111."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(N_TRAIN)),
            "test": self._generate_examples(range(TEST_OFFSET, TEST_OFFSET + N_TEST))}

  def _generate_examples(self, indices):
    for i in indices:  # PIL images: TFDS encodes them without TensorFlow
      yield str(i), {"image": Image.fromarray(expected_image(i, (8, 8, 3))), "label": i % 3}


class TinyGray(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Unlabelled gray PNGs of two sizes (6x6 and 10x10)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 1))}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(8)), "test": self._generate_examples([50])}

  def _generate_examples(self, indices):
    for i in indices:
      yield str(i), {"image": Image.fromarray(gray_image(i))}


def gray_image(i):
  return expected_image(i, (6, 6, 1) if i % 2 else (10, 10, 1))[..., 0]


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  for builder_class in (TinyRgb, TinyGray):
    builder_class(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_array_record_reads_without_tensorflow(array_record_dir, without_tensorflow):
  ds = data.load(cfg(source="tfds", name="tiny_rgb", dir=array_record_dir))
  assert ds.train_images.shape == (N_TRAIN, 8, 8, 3) and ds.train_images.dtype == np.uint8
  for images, labels, first in ((ds.train_images, ds.train_labels, 0),
                                (ds.test_images, ds.test_labels, TEST_OFFSET)):
    which = images[:, 0, 0, 0].astype(int)
    assert sorted(which) == list(range(first, first + len(images)))
    for img, label, i in zip(images, labels, which):
      np.testing.assert_array_equal(img, expected_image(i, (8, 8, 3)))
      assert label == i % 3
  assert ds.class_names == ("a", "b", "c") and ds.name == "tiny_rgb"
  assert len(set(ds.train_ids)) == N_TRAIN
  # Split expressions and a test split taken off the training split.
  ds = data.load(cfg(source="tfds", name="tiny_rgb", dir=array_record_dir,
                     train_split="train[:10]+test", test_split="none", test_fraction=0.25))
  assert len(ds.train_images) + len(ds.test_images) == 10 + N_TEST


def test_array_record_images_of_varying_size(array_record_dir, without_tensorflow):
  c = cfg(source="tfds", name="tiny_gray", dir=array_record_dir)
  with pytest.raises(data.DataError, match="varying size.*data.image_size"):
    data.load(c)
  c.image_size = 8
  ds = data.load(c)
  assert ds.train_images.shape == (8, 8, 8, 1) and (ds.train_labels == -1).all()
  resized = {i: np.asarray(Image.fromarray(gray_image(i)).resize((8, 8), Image.BILINEAR))
             for i in range(8)}
  # Each loaded image is the PIL-resized original of one of them (the first pixel blurs).
  for img in ds.train_images:
    assert any(np.array_equal(img[..., 0], r) for r in resized.values())


@pytest.mark.parametrize("channels", [None, 1])
def test_array_record_stream_equals_the_in_memory_batches(array_record_dir, without_tensorflow,
                                                          channels):
  c = cfg(source="tfds", name="tiny_rgb", dir=array_record_dir, image_size=6, channels=channels)
  ds = data.load(c)
  n = len(ds.train_images)
  mesh = mesh8()
  batches = list(streaming.stream_batches(c, 8, mesh, seed=3, num_steps=7))
  assert len(batches) == 7  # crosses an epoch (5 steps of 8 of 40)
  for step, batch in enumerate(batches):
    assert batch.shape == (8, 6, 6, 3 if channels is None else 1)
    assert batch.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(batch),
                                  ds.train_images[pipeline.batch_indices(3, step, n, 8)])
  resumed = next(streaming.stream_batches(c, 8, mesh, seed=3, start_step=6, num_steps=1))
  np.testing.assert_array_equal(np.asarray(resumed), np.asarray(batches[6]))


def test_tfrecord_data_without_tensorflow_name_the_extra(tmp_path, without_tensorflow):
  write_split_metadata(tmp_path, "mnist", {"train": 20, "test": 10})  # TFDS's default: TFRecord
  c = cfg(source="tfds", name="mnist", dir=str(tmp_path))
  for attempt in (lambda: data.load(c),
                  lambda: next(streaming.stream_batches(c, 8, mesh8(), num_steps=1))):
    with pytest.raises(extras.MissingExtra) as e:
      attempt()
    message = str(e.value)
    assert "\n" not in message and "'mnist'" in message
    assert 'pip install "jaxembed[tf]"' in message and "--file_format=array_record" in message


def test_tfds_bad_inputs_without_tensorflow(tmp_path, array_record_dir, without_tensorflow):
  write_split_metadata(tmp_path, "mnist", {"train": 20, "test": 10})
  with pytest.raises(data.DataError, match=NO_VALIDATION):
    data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), train_split="validation"))
  with pytest.raises(data.DataError, match=NO_VALIDATION):
    data.load(cfg(source="tfds", name="tiny_rgb", dir=array_record_dir, test_split="validation"))
  with pytest.raises(data.DataError, match="no feature 'picture'"):
    data.load(cfg(source="tfds", name="tiny_rgb", dir=array_record_dir, image_key="picture"))
  with pytest.raises(data.DataError,
                     match="not prepared.*tfds build mnist --file_format=array_record"):
    data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path / "empty")))
  with pytest.raises(data.DataError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
    data.load(cfg(source="tfds", name="no_such_dataset_xyz", dir=str(tmp_path)))
  with pytest.raises(data.DataError, match="needs --config.data.name"):
    data.load(cfg(source="tfds"))


# ------------------------------------------- tf.data (TFRecord, mock_data): needs TensorFlow


def test_tfds_cifar10_mock(tmp_path):
  pytest.importorskip("tensorflow")
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    ds = data.load(cfg(source="tfds", name="cifar10", dir=str(tmp_path), image_size=8))
  assert ds.train_images.shape == (24, 8, 8, 3) and ds.test_images.shape == (24, 8, 8, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert len(ds.class_names) == 10 and ds.name == "cifar10"
  assert len(set(ds.train_ids)) == 24 and all(ds.train_ids)


def test_tfds_gray_with_filters_and_test_split_none(tmp_path):
  pytest.importorskip("tensorflow")
  with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path)):
    ds = data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), max_examples=10,
                       test_split="none", test_fraction=0.2, channels=3))
  assert ds.train_images.shape == (8, 28, 28, 3) and ds.test_images.shape == (2, 28, 28, 3)


def test_tfds_bad_inputs_through_tf_data(tmp_path):
  pytest.importorskip("tensorflow")
  write_split_metadata(tmp_path, "mnist", {"train": 20, "test": 10})
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    with pytest.raises(data.DataError, match=NO_VALIDATION):
      data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), test_split="validation"))
    with pytest.raises(data.DataError, match="no feature 'picture'"):
      data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path), image_key="picture"))
  with pytest.raises(data.DataError, match="not prepared.*tfds build mnist"):
    data.load(cfg(source="tfds", name="mnist", dir=str(tmp_path / "empty")))


# -------------------------------------------------------------------- streaming


def make_folder(root, n_per_class=10):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    for i in range(n_per_class):
      (root / c).mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(root / c / f"{i}.png")
  return root


def test_folder_stream_equals_the_in_memory_batches(tmp_path):
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


def test_tfds_stream_through_tf_data(tmp_path):
  pytest.importorskip("tensorflow")
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
