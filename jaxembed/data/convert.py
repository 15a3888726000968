"""Turning raw arrays into canonical images: shape and label checks, intensity scaling to uint8, channels, size.

Every source ends up here, so that a 16-bit TIFF folder, a float NumPy array
and a MedMNIST file all become uint8 (N, H, W, C) images with int64 labels
by the same documented rules (docs/data.md).

Intensity scaling (``data.intensity``) of images that are not uint8:
  minmax     v' = floor(255 * (v - lo) / (hi - lo) + 0.5) with lo, hi the minimum
             and maximum over the whole dataset (the training split's range
             is reused for the test split and for later images, clipped);
  per_image  the same with lo, hi of each image on its own;
  window     the same with (lo, hi) = ``data.window``, values outside clipped
             (e.g. a CT window).
uint8 images are used as they are; boolean images become 0 / 255. A constant
image (hi == lo) becomes 0.
"""

import numpy as np
from PIL import Image


class DataError(ValueError):
  """A problem with the user's data or data configuration."""


INTENSITY_MODES = ("minmax", "per_image", "window")
# ITU-R BT.601 luma weights, as PIL's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CHUNK = 4096  # images per chunk when scaling, to bound float temporaries


def check_images(images, what="images", allow_empty=False):
  """Returns ``images`` as an (N, H, W, C) array with C in {1, 3}; raises DataError otherwise."""
  a = np.asarray(images)
  if a.dtype == object or a.dtype.kind in "USMmVc":
    raise DataError(f"{what}: unsupported dtype {a.dtype}; pass uint8, uint16, int or float "
                    "pixel values")
  if a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) > 4:
    raise DataError(f"{what}: shape {a.shape} looks like one (H, W, C) image; pass a batch of "
                    "shape (N, H, W) or (N, H, W, C), e.g. images[None]")
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4:
    raise DataError(f"{what}: expected shape (N, H, W) or (N, H, W, C), got {a.shape}")
  if a.shape[-1] == 4:
    raise DataError(f"{what}: 4 channels (RGBA?) are not supported; drop the alpha channel "
                    "with images[..., :3]")
  if a.shape[-1] not in (1, 3):
    raise DataError(f"{what}: {a.shape[-1]} channels in shape {a.shape}; images must have "
                    "1 (gray) or 3 (RGB) channels in the last axis")
  if a.shape[0] == 0 and not allow_empty:
    raise DataError(f"{what}: no images (shape {a.shape})")
  if a.shape[1] == 0 or a.shape[2] == 0:
    raise DataError(f"{what}: images of zero size (shape {a.shape})")
  return a


def check_labels(labels, n, what="labels"):
  """Labels as int64 (n,) or (n, k) multi-label; None gives -1 for every image (unlabelled)."""
  if labels is None:
    return np.full((n,), -1, np.int64)
  y = np.asarray(labels)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
    raise DataError(f"{what}: expected shape (N,), (N, 1) or (N, k) multi-label, got {y.shape}")
  if len(y) != n:
    raise DataError(f"{what}: {len(y)} labels for {n} images; there must be one label (row) "
                    "per image")
  if y.dtype == bool:
    y = y.astype(np.int64)
  if y.dtype.kind == "f":
    if not np.isfinite(y).all() or (y != np.round(y)).any():
      raise DataError(f"{what}: labels must be integers; got non-integer float values")
  elif y.dtype.kind not in "iu":
    raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
  y = y.astype(np.int64)
  if y.ndim == 2 and not np.isin(y, (0, 1)).all():
    raise DataError(f"{what}: multi-label (N, k) labels must be 0 or 1")
  return y


def check_ids(ids, n, default_prefix, what="ids"):
  """Ids as a (n,) str array; None gives ``<prefix><index>``."""
  if ids is None:
    return np.array([f"{default_prefix}{i}" for i in range(n)])
  ids = np.asarray(ids).astype(str)
  if ids.shape != (n,):
    raise DataError(f"{what}: expected {n} ids (one per image), got shape {ids.shape}")
  return ids


def _check_finite(a, what):
  if a.dtype.kind == "f":
    bad = a.size - int(np.isfinite(a).sum())
    if bad:
      raise DataError(f"{what}: {bad} pixel values are NaN or infinite; fix or mask them "
                      "before loading")


def value_range(images, intensity="minmax", window=None, what="images"):
  """The (lo, hi) that ``to_uint8`` maps to (0, 255); None for uint8/bool data and per_image."""
  a = np.asarray(images)
  if a.dtype in (np.uint8, np.bool_):
    return None
  if intensity not in INTENSITY_MODES:
    raise DataError(f"unknown data.intensity {intensity!r}; use one of {INTENSITY_MODES}")
  if a.dtype.kind not in "iuf":
    raise DataError(f"{what}: unsupported dtype {a.dtype}; pass uint8, uint16, int or float "
                    "pixel values")
  _check_finite(a, what)
  if intensity == "window":
    if window is None or len(window) != 2 or not float(window[0]) < float(window[1]):
      raise DataError(f"data.intensity='window' needs data.window=(low, high) with low < high, "
                      f"got {window!r}")
    return float(window[0]), float(window[1])
  if intensity == "per_image":
    return None
  return float(a.min()), float(a.max())


def to_uint8(images, intensity="minmax", window=None, vrange=None, what="images"):
  """Scales images of any numeric dtype to uint8 (module docstring); uint8 passes through.

  Args:
    images: (N, ...) array.
    intensity: minmax | per_image | window.
    window: (low, high) for intensity="window".
    vrange: (lo, hi) to use for "minmax" instead of the data's own range (the
      training split's range, for test images or images embedded later).
    what: how error messages name the images.
  Returns:
    uint8 array of the same shape.
  """
  a = np.asarray(images)
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * np.uint8(255)
  rng = value_range(a, intensity, window, what)
  if intensity == "minmax" and vrange is not None:
    rng = (float(vrange[0]), float(vrange[1]))
  out = np.empty(a.shape, np.uint8)
  for s in range(0, max(len(a), 1), _CHUNK):
    x = a[s:s + _CHUNK].astype(np.float64)
    if intensity == "per_image":
      axes = tuple(range(1, x.ndim))
      lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    else:
      lo, hi = rng
    span = np.maximum(np.asarray(hi, np.float64) - lo, 0.0)
    # Multiply before dividing so that exact halves stay exact; halves round up.
    y = (np.clip(x, lo, hi) - lo) * 255.0 / np.where(span > 0, span, np.inf)
    out[s:s + _CHUNK] = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
  return out


def to_channels(images, channels):
  """Converts uint8 (N, H, W, C) images to 1 (luma, BT.601) or 3 (repeated gray) channels."""
  c = images.shape[-1]
  if channels is None or channels == c:
    return images
  if channels == 3 and c == 1:
    return np.repeat(images, 3, axis=-1)
  if channels == 1 and c == 3:
    gray = images.astype(np.float32) @ _LUMA
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
  raise DataError(f"cannot convert {c}-channel images to {channels} channels; use data.channels=1 or 3")


def resize_images(images, size):
  """Resizes uint8 (N, H, W, C) images to (N, size, size, C) with bilinear filtering (PIL)."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  out = np.empty((n, size, size, c), np.uint8)
  for i in range(n):
    img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
    arr = np.asarray(img.resize((size, size), Image.BILINEAR))
    out[i] = arr[..., None] if c == 1 else arr
  return out
