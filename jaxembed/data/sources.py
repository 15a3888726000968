"""Data sources by name: each turns a config into train/test uint8 images with labels and ids.

``load(config.data)`` dispatches on ``data.source`` (the ``SOURCES``
registry); every source returns a :class:`jaxembed.data.dataset.Dataset`,
and ``load`` then resizes the images to ``data.image_size`` and converts
them to ``data.channels``. docs/data.md describes each source and its fields.
"""

from jaxembed.data import arrays as arrays_lib
from jaxembed.data import digits
from jaxembed.data import folder
from jaxembed.data import idx
from jaxembed.data import medmnist
from jaxembed.data import tfds_source
from jaxembed.data.convert import DataError, resize_images, to_channels

SOURCES = {
    "digits": digits.load_digits_source,
    "medmnist": medmnist.load_medmnist,
    "folder": folder.load_folder,
    "tfds": tfds_source.load_tfds,
    "idx": idx.load_idx,
    "arrays": arrays_lib.load_arrays_file,
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
    setattr(ds, f"{split}_images", to_channels(imgs, channels))
  return ds
