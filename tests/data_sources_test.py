"""Tests of the in-memory sources: digits, MedMNIST .npz, IDX, arrays; intensity scaling, filters, bad input."""

import gzip

import ml_collections
import numpy as np
import pytest

from jaxembed.configs import common
from jaxembed import data
from jaxembed.data import convert
from jaxembed.data import idx as idx_lib
from jaxembed.data import medmnist


def data_config(**kw):
  c = common.get_config().data
  c.image_size = 0  # keep the source's size unless a test says otherwise
  for k, v in kw.items():
    setattr(c, k, v) if k in c else c.__setitem__(k, v)
  return c


def cfg(**kw):
  """A plain ConfigDict (fields not in common.py allowed)."""
  c = ml_collections.ConfigDict(common.get_config().data.to_dict())
  c.image_size = 0
  c.update(kw)
  return c


def write_npz(path, n=(6, 2, 4), hw=(5, 5), channels=None, labels="n", k=3, dtype=np.uint8,
              skip=()):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, m in zip(("train", "val", "test"), n):
    shape = (m,) + hw + ((channels,) if channels else ())
    arrays[f"{split}_images"] = rng.integers(0, 256, shape).astype(dtype)
    y = np.arange(m) % 2
    arrays[f"{split}_labels"] = {"n": y, "n1": y[:, None],
                                 "nk": rng.integers(0, 2, (m, k))}[labels].astype(np.uint8)
  for key in skip:
    arrays.pop(key)
  np.savez(path, **arrays)
  return arrays


# ----------------------------------------------------------------------- digits


def test_digits_split_is_the_stratified_random_state_0_split():
  from PIL import Image
  from sklearn import datasets, model_selection
  ds = data.load(common.get_config().data)  # digits, 16 px
  d = datasets.load_digits()
  tr, te = model_selection.train_test_split(np.arange(1797), test_size=0.2, random_state=0,
                                            stratify=d.target)
  raw = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  expect = np.asarray(Image.fromarray(raw[te[3]]).resize((16, 16), Image.BILINEAR))
  assert ds.train_images.shape == (1437, 16, 16, 1) and ds.test_images.shape == (360, 16, 16, 1)
  assert ds.train_images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_labels, d.target[tr])
  np.testing.assert_array_equal(ds.test_ids, [f"digits:{i}" for i in te])
  np.testing.assert_array_equal(ds.test_images[3, ..., 0], expect)


# --------------------------------------------------------------------- MedMNIST


def test_breastmnist_official_split_and_duplicate_pair(shared_data):
  path = shared_data / "breastmnist.npz"
  if not path.is_file():
    pytest.skip("breastmnist.npz is not present")
  ds = data.load(data_config(source="medmnist", path=str(path), image_size=28))
  assert ds.train_images.shape == (546 + 78, 28, 28, 1)
  assert ds.test_images.shape == (156, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [147 + 21, 399 + 57])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [42, 114])
  raw = np.load(path)
  i = list(ds.train_ids).index("breastmnist:train:115")
  j = list(ds.test_ids).index("breastmnist:test:76")
  np.testing.assert_array_equal(ds.train_images[i, ..., 0], raw["train_images"][115])
  np.testing.assert_array_equal(ds.train_images[i], ds.test_images[j])
  assert (ds.train_labels[i], ds.test_labels[j]) == (0, 1)
  # Training is train followed by val, in file order.
  np.testing.assert_array_equal(ds.train_images[546:, ..., 0], raw["val_images"])


@pytest.mark.parametrize("labels", ["n", "n1", "nk"])
def test_medmnist_label_layouts(tmp_path, labels):
  arrays = write_npz(tmp_path / "chestmnist.npz", labels=labels, channels=3)
  ds = data.load(data_config(source="medmnist", path=str(tmp_path / "chestmnist.npz")))
  assert ds.train_images.shape == (8, 5, 5, 3) and ds.test_images.shape == (4, 5, 5, 3)
  want = np.concatenate([arrays["train_labels"], arrays["val_labels"]])
  if labels == "n1":
    want = want[:, 0]
  np.testing.assert_array_equal(ds.train_labels, want)
  assert ds.train_labels.dtype == np.int64
  assert ds.is_multilabel == (labels == "nk")


def test_medmnist_file_lookup_in_dir_by_size(tmp_path):
  write_npz(tmp_path / "bloodmnist.npz", hw=(28, 28))
  write_npz(tmp_path / "bloodmnist_64.npz", hw=(64, 64))
  write_npz(tmp_path / "bloodmnist_224.npz", hw=(224, 224), n=(2, 1, 1))
  assert medmnist.find_file(cfg(name="bloodmnist", dir=str(tmp_path), image_size=64)).endswith(
      "bloodmnist_64.npz")
  assert medmnist.find_file(cfg(name="bloodmnist", dir=str(tmp_path), image_size=28)).endswith(
      "bloodmnist.npz")
  assert medmnist.find_file(cfg(name="bloodmnist", dir=str(tmp_path), image_size=100)).endswith(
      "bloodmnist_224.npz")
  ds = data.load(cfg(source="medmnist", name="bloodmnist", dir=str(tmp_path), image_size=64))
  assert ds.train_images.shape == (8, 64, 64, 1)


def test_medmnist_custom_splits(tmp_path):
  write_npz(tmp_path / "x.npz")
  ds = data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), train_split="train",
                     test_split="val"))
  assert len(ds.train_images) == 6 and len(ds.test_images) == 2
  assert ds.test_ids[0] == "x:val:0"


def test_medmnist_bad_inputs(tmp_path):
  with pytest.raises(data.DataError, match="data.path.*or.*data.dir"):
    data.load(cfg(source="medmnist", name="breastmnist"))
  with pytest.raises(data.DataError, match="no such file"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "missing.npz")))
  with pytest.raises(data.DataError, match="no breastmnist file"):
    data.load(cfg(source="medmnist", name="breastmnist", dir=str(tmp_path)))
  write_npz(tmp_path / "nolabels.npz", skip=("test_labels",))
  with pytest.raises(data.DataError, match=r"split 'test' does not exist.*test_labels"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "nolabels.npz")))
  write_npz(tmp_path / "ok.npz")
  with pytest.raises(data.DataError, match="split 'validation' does not exist.*'train', 'val'"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "ok.npz"), test_split="validation"))
  np.savez(tmp_path / "shape.npz", train_images=np.zeros((4, 5), np.uint8),
           train_labels=np.zeros(4), test_images=np.zeros((2, 5, 5), np.uint8),
           test_labels=np.zeros(2))
  with pytest.raises(data.DataError, match=r"expected shape \(N, H, W\)"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "shape.npz")))
  np.savez(tmp_path / "count.npz", train_images=np.zeros((4, 5, 5), np.uint8),
           train_labels=np.zeros(3), test_images=np.zeros((2, 5, 5), np.uint8),
           test_labels=np.zeros(2))
  with pytest.raises(data.DataError, match="3 labels for 4 images"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "count.npz")))
  np.savez(tmp_path / "empty.npz", train_images=np.zeros((0, 5, 5), np.uint8),
           train_labels=np.zeros(0), test_images=np.zeros((2, 5, 5), np.uint8),
           test_labels=np.zeros(2))
  with pytest.raises(data.DataError, match="no images"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "empty.npz")))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(data.DataError, match="cannot read"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "junk.npz")))


def test_filters_classes_and_max_examples(tmp_path):
  write_npz(tmp_path / "x.npz", n=(20, 0, 10))
  ds = data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), classes=(1,)))
  assert set(ds.train_labels) == {1} and set(ds.test_labels) == {1}
  assert len(ds.train_images) == 10 and len(ds.test_images) == 5
  ds = data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), max_examples=7))
  assert len(ds.train_images) == 7 and len(ds.test_images) == 7
  assert len(set(ds.train_ids)) == 7
  with pytest.raises(data.DataError, match=r"classes without any image: \[5\]"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), classes=(1, 5)))
  with pytest.raises(data.DataError, match="max_examples must be positive"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), max_examples=0))


def test_resize_and_channels_on_load(tmp_path):
  write_npz(tmp_path / "x.npz", channels=3)
  ds = data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), image_size=9, channels=1))
  assert ds.train_images.shape == (8, 9, 9, 1) and ds.test_images.shape == (4, 9, 9, 1)
  with pytest.raises(data.DataError, match="data.channels must be 1, 3"):
    data.load(cfg(source="medmnist", path=str(tmp_path / "x.npz"), channels=2))


# -------------------------------------------------------------- intensity scaling


def test_intensity_minmax_window_per_image_by_hand():
  x = np.array([[[100, 200], [300, 500]], [[300, 300], [400, 500]]], np.uint16)
  # Dataset range 100..500: v -> 255 * (v - 100) / 400.
  np.testing.assert_array_equal(convert.to_uint8(x, "minmax")[0], [[0, 64], [128, 255]])
  # Window (200, 400): clipped outside.
  np.testing.assert_array_equal(convert.to_uint8(x, "window", (200, 400))[0], [[0, 0], [128, 255]])
  # Per image: the second image spans 300..500.
  np.testing.assert_array_equal(convert.to_uint8(x, "per_image")[1], [[0, 0], [128, 255]])
  # A given range (the training split's) is used for other images, clipped.
  np.testing.assert_array_equal(convert.to_uint8(x, "minmax", vrange=(300, 400))[0],
                                [[0, 0], [0, 255]])
  # Constant images become 0; uint8 passes through; bool becomes 0/255.
  assert convert.to_uint8(np.full((1, 2, 2), 7.0), "per_image").max() == 0
  u = np.arange(4, dtype=np.uint8).reshape(1, 2, 2)
  assert convert.to_uint8(u, "window", (0, 1)) is u
  np.testing.assert_array_equal(convert.to_uint8(np.array([[True, False]]), "minmax"), [[255, 0]])


def test_float_arrays_scaled_with_training_range_for_test():
  train = np.linspace(-1.0, 1.0, 2 * 4 * 4).reshape(2, 4, 4)
  test = np.full((1, 4, 4), 3.0)
  ds = data.from_arrays(train, test_images=test)
  assert ds.intensity_range == (-1.0, 1.0)
  assert ds.train_images.min() == 0 and ds.train_images.max() == 255
  assert (ds.test_images == 255).all()  # clipped to the training range
  ds = data.from_arrays(train, intensity="window", window=(0.0, 1.0))
  assert (ds.train_images[0] == 0).all()


def test_intensity_bad_inputs():
  with pytest.raises(data.DataError, match="NaN or infinite"):
    data.from_arrays(np.array([[[0.0, np.nan]]]))
  with pytest.raises(data.DataError, match="unsupported dtype complex"):
    data.from_arrays(np.zeros((2, 3, 3), np.complex64))
  with pytest.raises(data.DataError, match="unsupported dtype"):
    data.from_arrays(np.array([["a", "b"]]))
  with pytest.raises(data.DataError, match="window=\\(low, high\\)"):
    data.from_arrays(np.zeros((2, 3, 3), np.float32), intensity="window")
  with pytest.raises(data.DataError, match="unknown data.intensity"):
    data.from_arrays(np.zeros((2, 3, 3), np.float32), intensity="log")


# ------------------------------------------------------------------------ arrays


def test_from_arrays_layouts_labels_and_ids():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 6, 6)).astype(np.uint8)
  ds = data.from_arrays(images, labels=np.arange(12) % 3, ids=[f"f{i}.png" for i in range(12)])
  assert ds.train_images.shape == (12, 6, 6, 1) and ds.test_images.shape == (0, 6, 6, 1)
  np.testing.assert_array_equal(ds.train_images[..., 0], images)
  assert ds.train_ids[5] == "f5.png" and ds.test_labels.shape == (0,)
  ds = data.from_arrays(images, test_fraction=0.25, image_size=4)
  assert ds.train_images.shape == (9, 4, 4, 1) and ds.test_images.shape == (3, 4, 4, 1)
  assert (ds.train_labels == -1).all() and not ds.is_labelled
  rgb = rng.integers(0, 256, (4, 5, 5, 3)).astype(np.uint8)
  ds = data.from_arrays(rgb, labels=rng.integers(0, 2, (4, 5)), test_images=rgb[:2],
                        test_labels=rng.integers(0, 2, (2, 5)), channels=1)
  assert ds.train_images.shape == (4, 5, 5, 1) and ds.train_labels.shape == (4, 5)
  assert ds.test_ids[1] == "arrays:test:1"


def test_from_arrays_bad_inputs():
  x = np.zeros((4, 5, 5), np.uint8)
  with pytest.raises(data.DataError, match="3 labels for 4 images"):
    data.from_arrays(x, labels=[0, 1, 0])
  with pytest.raises(data.DataError, match="labels must be integers"):
    data.from_arrays(x, labels=[0.5, 1, 0, 1])
  with pytest.raises(data.DataError, match="multi-label.*0 or 1"):
    data.from_arrays(x, labels=np.full((4, 3), 2))
  with pytest.raises(data.DataError, match="looks like one"):
    data.from_arrays(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(data.DataError, match="alpha"):
    data.from_arrays(np.zeros((2, 5, 5, 4), np.uint8))
  with pytest.raises(data.DataError, match="no images"):
    data.from_arrays(np.zeros((0, 5, 5), np.uint8))
  with pytest.raises(data.DataError, match="expected 4 ids"):
    data.from_arrays(x, ids=["a"])
  with pytest.raises(data.DataError, match="both images and test_images"):
    data.from_arrays(x, labels=[0, 1, 0, 1], test_images=x)


def test_arrays_source_npz_and_python(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (10, 6, 6, 3)).astype(np.uint8)
  np.savez(tmp_path / "a.npz", images=x, labels=np.arange(10) % 2)
  ds = data.load(cfg(source="arrays", path=str(tmp_path / "a.npz"), test_fraction=0.2))
  assert len(ds.train_images) == 8 and len(ds.test_images) == 2 and ds.name == "a"
  ds = data.load(cfg(source="arrays", image_size=4), arrays={"images": x})
  assert ds.train_images.shape == (10, 4, 4, 3)
  with pytest.raises(data.DataError, match="from_arrays"):
    data.load(cfg(source="arrays"))
  np.savez(tmp_path / "b.npz", pixels=x)
  with pytest.raises(data.DataError, match="no 'images' array"):
    data.load(cfg(source="arrays", path=str(tmp_path / "b.npz")))
  with pytest.raises(data.DataError, match="unknown data.source"):
    data.load(cfg(source="hdf5"))


def test_prepare_images_matches_training_preprocessing():
  x = np.random.default_rng(1).uniform(0, 4000, (6, 10, 10)).astype(np.float32)
  ds = data.from_arrays(x, image_size=8, channels=3)
  again = data.prepare_images(x, vrange=ds.intensity_range, image_size=8, channels=3)
  np.testing.assert_array_equal(again, ds.train_images)


# ---------------------------------------------------------------------------- IDX


def _idx_bytes(array, code):
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_source(tmp_path, gz):
  rng = np.random.default_rng(0)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (7, 4, 5)).astype(np.uint8),
            "train-labels-idx1-ubyte": (np.arange(7) % 3).astype(np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 5)).astype(np.uint8),
            "t10k-labels-idx1-ubyte": np.arange(3).astype(np.uint8)}
  for name, a in arrays.items():
    raw = _idx_bytes(a, 0x08)
    (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
  ds = data.load(cfg(source="idx", path=str(tmp_path)))
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])
  f = np.arange(6, dtype=np.float32).reshape(2, 3)
  (tmp_path / "f.idx").write_bytes(_idx_bytes(f, 0x0D))
  np.testing.assert_array_equal(idx_lib.read_idx(str(tmp_path / "f.idx")), f)


def test_idx_bad_inputs(tmp_path):
  with pytest.raises(data.DataError, match="not a folder"):
    data.load(cfg(source="idx", path=str(tmp_path / "nope")))
  with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
    data.load(cfg(source="idx", path=str(tmp_path)))
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(data.DataError, match="not an IDX file"):
    idx_lib.read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_from_the_debian_package():
  import os
  from jaxembed.configs import fashion_mnist
  c = fashion_mnist.get_config("smoke")
  if not os.path.isdir(c.data.path):
    pytest.skip("dataset-fashion-mnist is not installed")
  ds = data.load(c.data)
  assert ds.train_images.shape == (256, 8, 8, 1) and ds.test_images.shape == (256, 8, 8, 1)
  assert set(np.unique(ds.train_labels)) <= set(range(10))
