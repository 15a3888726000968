"""Data sources: each turns a config into train/test uint8 images with labels and ids."""

import dataclasses

import numpy as np


class DataError(ValueError):
  """A problem with the user's data or data configuration."""


@dataclasses.dataclass
class Dataset:
  """Images as uint8 (N, H, W, C); labels (N,) int or (N, k) multi-label; ids (N,) str."""
  train_images: np.ndarray
  train_labels: np.ndarray
  train_ids: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_ids: np.ndarray
  name: str = ""

  @property
  def image_shape(self):
    return self.train_images.shape[1:]


def resize_images(images, size):
  """Resizes uint8 (N, H, W, C) images to (N, size, size, C) with bilinear filtering (PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  out = np.empty((n, size, size, c), np.uint8)
  for i in range(n):
    img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
    arr = np.asarray(img.resize((size, size), Image.BILINEAR))
    out[i] = arr[..., None] if c == 1 else arr
  return out


def _to_channels(images, channels):
  """Converts (N, H, W, C) uint8 images to the requested number of channels."""
  c = images.shape[-1]
  if channels is None or channels == c:
    return images
  if channels == 3 and c == 1:
    return np.repeat(images, 3, axis=-1)
  if channels == 1 and c == 3:
    gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
  raise DataError(f"cannot convert {c}-channel images to {channels} channels; use data.channels=1 or 3")


def _select(images, labels, ids, data_config, seed):
  """Applies the ``classes`` and ``max_examples`` filters."""
  if data_config.get("classes") is not None:
    if labels.ndim != 1:
      raise DataError("data.classes filters single-label data only; this dataset is multi-label")
    keep = np.isin(labels, np.asarray(data_config.classes))
    if not keep.any():
      raise DataError(f"no image has a label in data.classes={tuple(data_config.classes)}; "
                      f"labels present: {sorted(np.unique(labels).tolist())}")
    images, labels, ids = images[keep], labels[keep], ids[keep]
  max_n = data_config.get("max_examples")
  if max_n is not None and len(images) > max_n:
    if max_n < 1:
      raise DataError(f"data.max_examples must be positive, got {max_n}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(images), max_n, replace=False))
    images, labels, ids = images[keep], labels[keep], ids[keep]
  return images, labels, ids


def load_digits_source(data_config):
  """scikit-learn's 1,797 8x8 digits, stratified 80/20 split with random_state=0 (DESIGN 3c)."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
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


SOURCES = {
    "digits": load_digits_source,
}


def load(data_config):
  """Loads the source named by ``data_config.source`` and resizes it to ``image_size``."""
  name = data_config.source
  if name not in SOURCES:
    raise DataError(f"unknown data.source {name!r}; known: {sorted(SOURCES)}")
  ds = SOURCES[name](data_config)
  if len(ds.train_images) == 0:
    raise DataError(f"the {name} training split is empty after filtering")
  size = data_config.get("image_size")
  channels = data_config.get("channels")
  for split in ("train", "test"):
    imgs = getattr(ds, f"{split}_images")
    if size:
      imgs = resize_images(imgs, size)
    setattr(ds, f"{split}_images", _to_channels(imgs, channels))
  return ds
