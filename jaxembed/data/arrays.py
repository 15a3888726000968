"""NumPy arrays as a data source: the Python API (``from_arrays``) and ``.npz`` files for the CLI.

``from_arrays(images, labels=None, ...)`` is how a program hands images in
(the estimator API does): (N, H, W) or (N, H, W, C) arrays of uint8, any
other integer dtype, float or bool; non-uint8 pixels are scaled to uint8 by
``intensity`` (``docs/data.md``). ``prepare_images`` applies the same
preprocessing to images that arrive later (``transform`` of new images).
"""

import os
import zipfile

import numpy as np

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

_KEYS = ("images", "labels", "ids", "test_images", "test_labels", "test_ids")


def _get(data_config, name, default):
  if data_config is None:
    return default
  return data_config.get(name, default)


def prepare_images(images, data_config=None, vrange=None, *, image_size=None, channels=None,
                   intensity=None, window=None, what="images"):
  """Checks and converts images to the canonical uint8 (N, S, S, C) of a run.

  Args:
    images: (N, H, W) or (N, H, W, C) array (C 1 or 3) of a numeric dtype.
    data_config: the run's ``data`` config; its image_size, channels,
      intensity and window are used unless given as keyword arguments.
    vrange: (lo, hi) of ``intensity="minmax"`` scaling, normally
      ``Dataset.intensity_range`` of the training data, so that new images
      are scaled like the training images. None: the images' own range.
    image_size, channels, intensity, window: override ``data_config``.
    what: how error messages name the images.
  Returns:
    uint8 array (N, image_size, image_size, channels); source size and
    channels where those are None / 0.
  """
  size = image_size if image_size is not None else _get(data_config, "image_size", None)
  channels = channels if channels is not None else _get(data_config, "channels", None)
  intensity = intensity or _get(data_config, "intensity", "minmax")
  window = window if window is not None else _get(data_config, "window", None)
  x = convert.check_images(images, what)
  x = convert.to_uint8(x, intensity, window, vrange=vrange, what=what)
  if size:
    x = convert.resize_images(x, size)
  return convert.to_channels(x, channels)


def from_arrays(images, labels=None, ids=None, test_images=None, test_labels=None,
                test_ids=None, *, data_config=None, name="arrays", test_fraction=0.0,
                image_size=None, channels=None, intensity=None, window=None):
  """A :class:`Dataset` from NumPy arrays.

  Args:
    images: (N, H, W) or (N, H, W, C) training images, C 1 or 3; uint8, any
      integer dtype, float (no NaN) or bool.
    labels: None (unlabelled: every label -1), (N,) or (N, 1) int, or (N, k)
      0/1 multi-label.
    ids: (N,) names of the images (file names, database keys); default
      ``"<name>:train:<i>"``.
    test_images, test_labels, test_ids: an optional held-out split, same
      layouts. Without it the test split is empty (``test_fraction=0``) or
      split off the images (stratified, random_state=0).
    data_config: a ``data`` config: its classes, max_examples, image_size,
      channels, intensity and window apply (not its test_fraction).
    name: the dataset's name in outputs.
    test_fraction: fraction of the images held out when no test images are
      given.
    image_size, channels, intensity, window: override ``data_config``
      (image_size: resize to image_size x image_size; None / 0 keeps).
  Returns:
    Dataset with uint8 (N, S, S, C) images; ``intensity_range`` holds the
    (lo, hi) that non-uint8 images were scaled from.
  """
  cfg = dict(data_config.items()) if data_config is not None else {}
  for key, value in (("image_size", image_size), ("channels", channels),
                     ("intensity", intensity), ("window", window)):
    if value is not None:
      cfg[key] = value
  cfg["test_fraction"] = test_fraction
  x = convert.check_images(images, "images")
  y = convert.check_labels(labels, len(x), "labels")
  i = convert.check_ids(ids, len(x), f"{name}:train:", "ids")
  if test_images is None:
    if test_labels is not None or test_ids is not None:
      raise DataError("test_labels / test_ids were given without test_images")
    ds = dataset.split_off_test(x, y, i, cfg, name=name)
  else:
    tx = convert.check_images(test_images, "test_images")
    ty = convert.check_labels(test_labels, len(tx), "test_labels")
    if (labels is None) != (test_labels is None):
      raise DataError("give labels for both images and test_images, or for neither")
    ti = convert.check_ids(test_ids, len(tx), f"{name}:test:", "test_ids")
    ds = dataset.with_test((x, y, i), (tx, ty, ti), cfg, name=name)
  for split in ("train", "test"):
    imgs = getattr(ds, f"{split}_images")
    if cfg.get("image_size"):
      imgs = convert.resize_images(imgs, cfg["image_size"])
    setattr(ds, f"{split}_images", convert.to_channels(imgs, cfg.get("channels")))
  if len(ds.train_images) == 0:
    raise DataError("no training images left after filtering")
  return ds


def load_arrays_file(data_config):
  """``source="arrays"`` from the CLI: an .npz with ``images`` and optional ``labels``, ``ids``,
  ``test_images``, ``test_labels``, ``test_ids``; without test images ``data.test_fraction``
  splits one off."""
  path = data_config.get("path")
  if not path:
    raise DataError("data.source='arrays' takes NumPy arrays from Python "
                    "(jaxembed.data.from_arrays or load(config.data, arrays={...})), or an .npz "
                    "file with an 'images' array via --config.data.path")
  if not os.path.isfile(path):
    raise DataError(f"data.path={path!r}: no such file")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in _KEYS if k in npz.files}
      keys = sorted(npz.files)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"cannot read {path!r} as an .npz file: {e}") from None
  if "images" not in arrays:
    raise DataError(f"{path} has no 'images' array (keys: {keys}); data.source='arrays' needs "
                    f"'images' and optionally {list(_KEYS[1:])}")
  name = data_config.get("name") or os.path.splitext(os.path.basename(path))[0]
  frac = 0.0 if "test_images" in arrays else data_config.get("test_fraction", 0.2)
  return from_arrays(**arrays, data_config=data_config, name=name, test_fraction=frac)
