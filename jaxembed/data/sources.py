"""Data sources: each turns a config into train/test uint8 images with labels and ids.

``load(config.data)`` dispatches on ``data.source`` (the ``SOURCES``
registry); every source returns a :class:`Dataset`, and ``load`` then
resizes the images to ``data.image_size`` and converts them to
``data.channels``. docs/data.md describes each source and its fields.
"""

import dataclasses

import numpy as np

from jaxembed.data import convert
from jaxembed.data.convert import DataError, resize_images  # noqa: F401  (public names)

_to_channels = convert.to_channels


@dataclasses.dataclass
class Dataset:
  """Images as uint8 (N, H, W, C); labels (N,) int64 or (N, k) multi-label; ids (N,) str.

  Unlabelled images have the label -1. ``class_names`` maps label i to a
  name where the source knows one (class folders, TFDS); ``intensity_range``
  is the (lo, hi) that non-uint8 source pixels were scaled from (None for
  uint8 sources or per-image scaling), to scale later images the same way.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  train_ids: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_ids: np.ndarray
  name: str = ""
  class_names: tuple = ()
  intensity_range: tuple | None = None

  @property
  def image_shape(self):
    return self.train_images.shape[1:]

  @property
  def is_labelled(self):
    """True when every training image has a single class label (metrics make sense)."""
    return self.train_labels.ndim == 1 and bool((self.train_labels >= 0).all())

  @property
  def is_multilabel(self):
    return self.train_labels.ndim == 2


def _select(images, labels, ids, data_config, seed):
  """Applies the ``classes`` and ``max_examples`` filters."""
  if data_config.get("classes") is not None:
    if labels.ndim != 1:
      raise DataError("data.classes filters single-label data only; this dataset is multi-label")
    wanted = np.asarray(data_config.classes)
    present = np.unique(labels)
    missing = [int(c) for c in wanted if c not in present]
    if missing:
      raise DataError(f"data.classes={tuple(data_config.classes)} includes classes without "
                      f"any image: {missing}; labels present: {sorted(present.tolist())}")
    keep = np.isin(labels, wanted)
    images, labels, ids = images[keep], labels[keep], ids[keep]
  max_n = data_config.get("max_examples")
  if max_n is not None and max_n < 1:
    raise DataError(f"data.max_examples must be positive, got {max_n}")
  if max_n is not None and len(images) > max_n:
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(images), max_n, replace=False))
    images, labels, ids = images[keep], labels[keep], ids[keep]
  return images, labels, ids


def load_digits_source(data_config):
  """scikit-learn's 1,797 8x8 digits, stratified 80/20 split with random_state=0 (DESIGN 3c)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Pixel values are 0..16; stretch them to 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  ids = np.array([f"digits:{i}" for i in range(len(images))])
  return _split(images, labels, ids, data_config, name="digits")


def _split(images, labels, ids, data_config, name):
  """Stratified train/test split (random_state=0) for sources without a test split."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  images, labels, ids = _select(images, labels, ids, data_config, seed=0)
  frac = data_config.get("test_fraction", 0.2)
  if not 0.0 < frac < 1.0:
    raise DataError(f"data.test_fraction must be in (0, 1), got {frac}")
  stratify = labels if labels.ndim == 1 and np.bincount(labels).min() >= 2 else None
  tr, te = model_selection.train_test_split(
      np.arange(len(images)), test_size=frac, random_state=0, stratify=stratify)
  return Dataset(images[tr], labels[tr], ids[tr], images[te], labels[te], ids[te], name=name)


# ------------------------------------------------------- shared by the other sources


def empty_like(images, labels):
  """A zero-length split with the image and label layout of ``images`` / ``labels``."""
  return (np.zeros((0,) + images.shape[1:], images.dtype),
          np.zeros((0,) + labels.shape[1:], np.int64), np.zeros((0,), str))


def split_off_test(images, labels, ids, data_config, name, class_names=()):
  """A source without a test split: filters, then a test_fraction split (random_state=0).

  Stratified by label where every class has two images; ``data.test_fraction
  = 0`` keeps every image for training (the test split is then empty and
  the trainer has nothing to score).
  """
  images, labels, ids = _select(images, labels, ids, data_config, seed=0)
  frac = data_config.get("test_fraction", 0.2)
  if not 0.0 <= frac < 1.0:
    raise DataError(f"data.test_fraction must be in [0, 1), got {frac}")
  vr = convert.value_range(images, data_config.get("intensity", "minmax"),
                           data_config.get("window"))
  images = _to_uint8(images, data_config, vr)
  tr, te = split_indices(labels, frac)
  if not len(te):
    return Dataset(images, labels, ids, *empty_like(images, labels), name=name,
                   class_names=tuple(class_names), intensity_range=vr)
  return Dataset(images[tr], labels[tr], ids[tr], images[te], labels[te], ids[te], name=name,
                 class_names=tuple(class_names), intensity_range=vr)


def split_indices(labels, frac):
  """(train, test) indices of a ``frac`` hold-out, random_state=0, stratified where possible."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  index = np.arange(len(labels))
  if frac == 0 or len(labels) < 2:
    return index, index[:0]
  stratify = None
  if labels.ndim == 1 and (labels >= 0).all():
    counts = np.unique(labels, return_counts=True)[1]
    if counts.min() >= 2:
      stratify = labels
  try:
    return model_selection.train_test_split(index, test_size=frac, random_state=0,
                                            stratify=stratify)
  except ValueError:  # too few test images for one per class: split without strata
    return model_selection.train_test_split(index, test_size=frac, random_state=0)


def with_test(train, test, data_config, name, class_names=()):
  """A source with its own test split: filters per split, then intensity scaling.

  ``train`` and ``test`` are (images, labels, ids) with checked layouts. The
  ``classes`` filter applies to both splits; ``max_examples`` caps each
  split (a seeded random subset, kept in source order). Non-uint8 images of
  both splits are scaled with the training split's range.
  """
  (tr_x, tr_y, tr_i), (te_x, te_y, te_i) = train, test
  if tr_x.shape[1:] != te_x.shape[1:] and len(te_x):
    raise DataError(f"{name}: train images are {tr_x.shape[1:]} but test images are "
                    f"{te_x.shape[1:]}; both splits must have one image shape")
  if tr_y.shape[1:] != te_y.shape[1:]:
    raise DataError(f"{name}: train labels have shape {tr_y.shape} but test labels "
                    f"{te_y.shape}; both splits must use the same label layout")
  tr_x, tr_y, tr_i = _select(tr_x, tr_y, tr_i, data_config, seed=0)
  if len(te_x):
    if data_config.get("classes") is not None:
      keep = np.isin(te_y, np.asarray(data_config.classes))
      te_x, te_y, te_i = te_x[keep], te_y[keep], te_i[keep]
    max_n = data_config.get("max_examples")
    if max_n is not None and len(te_x) > max_n:
      keep = np.sort(np.random.default_rng(1).choice(len(te_x), max_n, replace=False))
      te_x, te_y, te_i = te_x[keep], te_y[keep], te_i[keep]
  vr = convert.value_range(tr_x, data_config.get("intensity", "minmax"),
                           data_config.get("window"), what=f"{name} train images")
  if len(te_x):
    convert.value_range(te_x, data_config.get("intensity", "minmax"),
                        data_config.get("window"), what=f"{name} test images")
  return Dataset(_to_uint8(tr_x, data_config, vr), tr_y, tr_i, _to_uint8(te_x, data_config, vr),
                 te_y, te_i, name=name, class_names=tuple(class_names), intensity_range=vr)


def _to_uint8(images, data_config, vr):
  return convert.to_uint8(images, data_config.get("intensity", "minmax"),
                          data_config.get("window"), vrange=vr)


# ------------------------------------------------------------------ registry


def _medmnist(data_config):
  from jaxembed.data import medmnist  # pylint: disable=g-import-not-at-top
  return medmnist.load_medmnist(data_config)


def _folder(data_config):
  from jaxembed.data import folder  # pylint: disable=g-import-not-at-top
  return folder.load_folder(data_config)


def _tfds(data_config):
  from jaxembed.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.load_tfds(data_config)


def _idx(data_config):
  from jaxembed.data import idx  # pylint: disable=g-import-not-at-top
  return idx.load_idx(data_config)


def _arrays(data_config):
  from jaxembed.data import arrays  # pylint: disable=g-import-not-at-top
  return arrays.load_arrays_file(data_config)


SOURCES = {
    "digits": load_digits_source,
    "medmnist": _medmnist,
    "folder": _folder,
    "tfds": _tfds,
    "idx": _idx,
    "arrays": _arrays,
}


def load(data_config, arrays=None):
  """Loads the source named by ``data_config.source`` and resizes it to ``image_size``.

  Args:
    data_config: the ``data`` part of a config (ConfigDict or dict-like).
    arrays: for ``source="arrays"`` from Python: a dict of the keyword
      arguments of :func:`jaxembed.data.arrays.from_arrays` (``images``,
      ``labels``, ``ids``, ``test_images``, ...).
  """
  name = data_config.get("source", "digits")
  if name not in SOURCES:
    raise DataError(f"unknown data.source {name!r}; known: {sorted(SOURCES)}")
  if arrays is not None:
    if name != "arrays":
      raise DataError(f"arrays were passed but data.source is {name!r}; use source='arrays'")
    from jaxembed.data import arrays as arrays_lib  # pylint: disable=g-import-not-at-top
    ds = arrays_lib.from_arrays(data_config=data_config, **arrays)
  else:
    ds = SOURCES[name](data_config)
  if len(ds.train_images) == 0:
    raise DataError(f"the {name} training split is empty after filtering")
  size = data_config.get("image_size")
  channels = data_config.get("channels")
  if channels not in (None, 1, 3):
    raise DataError(f"data.channels must be 1, 3 or None, got {channels!r}")
  if size is not None and size < 0:
    raise DataError(f"data.image_size must be positive (or 0 to keep the source's size), "
                    f"got {size}")
  for split in ("train", "test"):
    imgs = getattr(ds, f"{split}_images")
    if size:
      imgs = resize_images(imgs, size)
    setattr(ds, f"{split}_images", _to_channels(imgs, channels))
  return ds
