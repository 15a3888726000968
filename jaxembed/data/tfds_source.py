"""TensorFlow Datasets by name and split, read from a local ``data_dir`` (never downloaded).

``data.name`` is the TFDS name ("cifar10", "mnist", "oxford_flowers102");
``data.dir`` the TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets);
``data.train_split`` (default "train") and ``data.test_split`` (default
"test"; "none" splits ``data.test_fraction`` off the training split) take any
TFDS split expression ("train+validation", "train[:10%]").
``data.image_key`` / ``data.label_key`` name the features (default "image",
"label"; a dataset without the label feature is unlabelled). Images of
varying size are resized to ``data.image_size``.

A dataset prepared as array_record (``tfds build NAME
--file_format=array_record``) or parquet is read through TFDS's
random-access data source, without TensorFlow (images decoded by PIL). One
prepared as TFRecord files (TFDS's default) is read through tf.data, which
needs the ``tf`` extra; without it the error says so in one line. TensorFlow
Datasets is imported inside the functions that read it (0.7 s), so the other
sources never load it.
"""

import io
import re

import numpy as np
from PIL import Image

from jaxembed import extras
from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

READ_CHUNK = 1024  # examples fetched from a data source at a time


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


def random_access(b):
  """True when the prepared dataset has a format TFDS reads without TensorFlow (array_record...)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  formats = set(tfds.core.file_adapters.FileFormat.with_random_access())
  try:
    available = set(b.info.available_file_formats()) or {b.info.file_format}
  except AttributeError:  # older TFDS: one format per prepared dataset
    available = {b.info.file_format}
  return bool(available & formats)


def _not_prepared(data_config):
  name = data_config.get("name")
  return (f"TFDS dataset {name!r} is not prepared in data.dir={data_config.get('dir')!r}; nothing "
          "is downloaded at run time: prepare it where there is internet (`tfds build "
          f"{name} --file_format=array_record --data_dir DIR`) and set --config.data.dir=DIR")


def read_split(data_config, split, image_size=None):
  """(images, labels, ids) of one TFDS split as NumPy arrays (labels -1 when there are none)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = builder(data_config)
  check_split(b, split, data_config)
  if b.info.splits and random_access(b):
    return read_split_source(b, data_config, split, image_size)
  # Prepared as TFRecord files, or not prepared (or mocked by tfds.testing.mock_data, which
  # generates examples through tf.data): tf.data, which needs TensorFlow.
  name = data_config.get("name")
  if b.info.splits:
    tf = extras.tensorflow(
        f"TFDS dataset {name!r} is prepared as TFRecord files; reading them",
        alternative=f"prepare it as array_record, read without TensorFlow: `tfds build {name} "
        f"--file_format=array_record` (or `tfds convert_format --dataset_dir DIR/{name} "
        "--out_file_format=array_record`)")
  else:
    try:
      tf = extras.tensorflow(f"TFDS dataset {name!r}")
    except extras.MissingExtra:
      raise DataError(_not_prepared(data_config)) from None
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  try:
    ds = tfds.load(name, split=split, data_dir=data_config.get("dir"), download=False,
                   shuffle_files=False, read_config=tfds.ReadConfig(add_tfds_id=True))
  except AssertionError as e:  # TFDS's "could not find data" is an AssertionError
    raise DataError(f"{_not_prepared(data_config)} ({str(e).splitlines()[0]})") from None
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


def data_source(b, data_config, split):
  """TFDS's random-access source of ``split`` (no TensorFlow) and a decoder of its examples.

  Returns ``(source, decode, fixed)``: ``source[i]`` / ``source.__getitems__(idx)``
  give raw examples, ``decode(example)`` the uint8 (H, W, C) image and the label
  (None when the dataset has none), and ``fixed`` says whether the feature
  declares one image size. Image features come as their PNG/JPEG bytes
  and are decoded by PIL here: TFDS would decode them with OpenCV or log a
  warning that it falls back to PIL.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.get("name")
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  features = b.info.features
  if image_key not in features:
    raise DataError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: "
                    f"{sorted(features)}; set data.image_key")
  has_labels = label_key in features
  feature = features[image_key]
  encoded = isinstance(feature, tfds.features.Image)
  channels = feature.shape[-1] if encoded and feature.shape else None
  try:
    source = b.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()} if encoded else None)
  except ValueError as e:
    raise DataError(f"TFDS dataset {name!r}, split {split!r}: {str(e).splitlines()[0]}") from None

  def decode(example):
    img = example[image_key]
    if encoded:
      pil = Image.open(io.BytesIO(img))
      if channels in (1, 3) and pil.mode != ("L" if channels == 1 else "RGB"):
        pil = pil.convert("L" if channels == 1 else "RGB")
      img = np.asarray(pil)
    img = np.asarray(img)
    return (img[..., None] if img.ndim == 2 else img), (example[label_key] if has_labels else None)
  return source, decode, None not in tuple(feature.shape)[:2]


def read_split_source(b, data_config, split, image_size=None):
  """``read_split`` of a dataset prepared as array_record or parquet: no TensorFlow."""
  name = data_config.get("name")
  source, decode, fixed = data_source(b, data_config, split)
  if not fixed and not image_size:
    raise DataError(f"TFDS dataset {name!r} has images of varying size; set data.image_size to "
                    "resize them")
  xs, ys = [], []
  for start in range(0, len(source), READ_CHUNK):
    for example in source.__getitems__(list(range(start, min(start + READ_CHUNK, len(source))))):
      img, label = decode(example)
      xs.append(img)
      ys.append(label)
  if not xs:
    raise DataError(f"TFDS dataset {name!r}, split {split!r} is empty")
  if not fixed:  # as the tf.data path: every image to image_size, whatever sizes this split has
    xs = [convert.resize_images(x[None], image_size)[0] for x in xs]
  x = convert.check_images(np.stack(xs), f"{name}[{split}] images")
  has_labels = ys[0] is not None
  y = convert.check_labels(np.asarray(ys) if has_labels else None, len(x),
                           f"{name}[{split}] labels")
  return x, y, np.array([f"{name}:{split}:{k}" for k in range(len(x))])


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
