"""TensorFlow Datasets by name and split, read from a local ``data_dir`` (never downloaded).

``data.name`` is the TFDS name ("cifar10", "mnist", "oxford_flowers102");
``data.dir`` the TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets);
``data.train_split`` (default "train") and ``data.test_split`` (default
"test"; "none" splits ``data.test_fraction`` off the training split) take any
TFDS split expression ("train+validation", "train[:10%]").
``data.image_key`` / ``data.label_key`` name the features (default "image",
"label"; a dataset without the label feature is unlabelled). Images of
varying size are resized to ``data.image_size`` inside tf.data. TensorFlow
Datasets is imported inside the functions that read it, so the other sources
never load TensorFlow (8-9 s to import on the 2-core VM).
"""

import re

import numpy as np

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError


def _split_names(split):
  """The base split names in a TFDS split expression: "train[:10%]+validation" -> [train, validation]."""
  return [re.sub(r"\[.*\]$", "", s.strip()) for s in str(split).split("+")]


def builder(data_config):
  """The TFDS builder of ``data.name`` (checked: it exists and is prepared)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.get("name")
  if not name:
    raise DataError("data.source='tfds' needs --config.data.name=<TFDS name>, e.g. cifar10")
  data_dir = data_config.get("dir")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends  # pylint: disable=broad-except
    raise DataError(f"TFDS has no dataset {name!r}: {str(e).splitlines()[0]}") from None


def check_split(b, split, data_config):
  """Raises DataError when ``split`` names a split that the prepared dataset lacks."""
  known = list(b.info.splits.keys())
  if not known:  # metadata unknown (e.g. under tfds.testing.mock_data): TFDS decides
    return
  bad = [s for s in _split_names(split) if s not in known]
  if bad:
    raise DataError(f"TFDS dataset {data_config.get('name')!r} has no split {bad[0]!r}; "
                    f"its splits: {sorted(known)}")


def read_split(data_config, split, image_size=None):
  """(images, labels, ids) of one TFDS split as NumPy arrays (labels -1 when there are none)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = builder(data_config)
  check_split(b, split, data_config)
  name = data_config.get("name")
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  try:
    ds = tfds.load(name, split=split, data_dir=data_config.get("dir"), download=False,
                   shuffle_files=False, read_config=tfds.ReadConfig(add_tfds_id=True))
  except AssertionError as e:  # TFDS's "could not find data" is an AssertionError
    raise DataError(f"TFDS dataset {name!r} is not prepared in data.dir="
                    f"{data_config.get('dir')!r}; nothing is downloaded at run time: prepare it "
                    f"where there is internet (`tfds build {name} --data_dir DIR`) and set "
                    f"--config.data.dir=DIR ({str(e).splitlines()[0]})") from None
  except ValueError as e:  # unknown split
    raise DataError(f"TFDS dataset {name!r}, split {split!r}: {str(e).splitlines()[0]}") from None
  spec = ds.element_spec
  if image_key not in spec:
    raise DataError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: "
                    f"{sorted(spec)}; set data.image_key")
  has_labels = label_key in spec
  shape = spec[image_key].shape
  fixed = shape.is_fully_defined()
  if not fixed and not image_size:
    raise DataError(f"TFDS dataset {name!r} has images of varying size {shape}; set "
                    "data.image_size to resize them")

  def pick(ex):
    img = ex[image_key]
    if len(img.shape) == 2:
      img = img[..., None]
    if not fixed:
      img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
          img, (image_size, image_size), method="bilinear", antialias=True)), 0, 255), tf.uint8)
    out = {"image": img, "id": ex.get("tfds_id", tf.constant(""))}
    if has_labels:
      out["label"] = ex[label_key]
    return out

  xs, ys, ids = [], [], []
  for batch in tfds.as_numpy(ds.map(pick).batch(1024)):
    xs.append(batch["image"])
    ids.append(batch["id"].astype(str))
    if has_labels:
      ys.append(batch["label"])
  if not xs:
    raise DataError(f"TFDS dataset {name!r}, split {split!r} is empty")
  x = convert.check_images(np.concatenate(xs), f"{name}[{split}] images")
  y = convert.check_labels(np.concatenate(ys) if has_labels else None, len(x),
                           f"{name}[{split}] labels")
  i = np.concatenate(ids)
  if not all(i):
    i = np.array([f"{name}:{split}:{k}" for k in range(len(x))])
  return x, y, i


def class_names(data_config):
  try:
    feature = builder(data_config).info.features[data_config.get("label_key", "label")]
    return tuple(feature.names)
  except Exception:  # pylint: disable=broad-except
    return ()


def load_tfds(data_config):
  """The TFDS source (module docstring)."""
  size = data_config.get("image_size")
  name = data_config.get("name")
  train = read_split(data_config, data_config.get("train_split") or "train", size)
  test_split = data_config.get("test_split") or "test"
  names = class_names(data_config)
  if test_split == "none":
    return dataset.split_off_test(*train, data_config, name=name, class_names=names)
  test = read_split(data_config, test_split, size)
  return dataset.with_test(train, test, data_config, name=name, class_names=names)
