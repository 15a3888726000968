"""The Dataset every source returns, and the filters and splits the sources share.

A source reads its files into uint8 (N, H, W, C) images with labels and
ids and hands them to :func:`with_test` (it has a test split) or
:func:`split_off_test` (it has not), which apply ``data.classes`` and
``data.max_examples``, split where needed (stratified, ``random_state=0``,
DESIGN.md 3c) and scale non-uint8 pixels to uint8.
"""

import dataclasses

import numpy as np
from sklearn import model_selection

from jaxembed.data import convert
from jaxembed.data.convert import DataError


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

  # The images of every split are all here (a streamed run's host data holds
  # only this process's rows instead: jaxembed.data.streaming.ProcessShare).
  process_rows = False

  @property
  def image_shape(self):
    return self.train_images.shape[1:]

  @property
  def num_train(self):
    return len(self.train_images)

  @property
  def num_test(self):
    return len(self.test_images)

  def all_images(self):
    """The train, then the test images (the rows of embeddings.npz)."""
    return np.concatenate([self.train_images, self.test_images])

  @property
  def is_labelled(self):
    """True when every training image has a single class label (metrics make sense)."""
    return self.train_labels.ndim == 1 and bool((self.train_labels >= 0).all())

  @property
  def is_multilabel(self):
    return self.train_labels.ndim == 2


def select(images, labels, ids, data_config, seed):
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
  images, labels, ids = select(images, labels, ids, data_config, seed=0)
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
  tr_x, tr_y, tr_i = select(tr_x, tr_y, tr_i, data_config, seed=0)
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
