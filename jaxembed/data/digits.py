"""scikit-learn's digits, the embedded default data: 1,797 8x8 handwritten digits."""

import numpy as np
from sklearn import datasets
from sklearn import model_selection

from jaxembed.data import dataset
from jaxembed.data.convert import DataError


def load_digits_source(data_config):
  """scikit-learn's 1,797 8x8 digits, stratified 80/20 split with random_state=0 (DESIGN 3c)."""
  digits = datasets.load_digits()
  # Pixel values are 0..16; stretch them to 0..255.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  ids = np.array([f"digits:{i}" for i in range(len(images))])
  return _split(images, labels, ids, data_config, name="digits")


def _split(images, labels, ids, data_config, name):
  """Stratified train/test split (random_state=0) for sources without a test split."""
  images, labels, ids = dataset.select(images, labels, ids, data_config, seed=0)
  frac = data_config.get("test_fraction", 0.2)
  if not 0.0 < frac < 1.0:
    raise DataError(f"data.test_fraction must be in (0, 1), got {frac}")
  stratify = labels if labels.ndim == 1 and np.bincount(labels).min() >= 2 else None
  tr, te = model_selection.train_test_split(
      np.arange(len(images)), test_size=frac, random_state=0, stratify=stratify)
  return dataset.Dataset(images[tr], labels[tr], ids[tr], images[te], labels[te], ids[te],
                         name=name)
