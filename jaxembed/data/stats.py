"""Dataset statistics that augmentation and input normalisation need, computed once.

The trainer stores them in the run's config.json (``run.data_stats``, and
``model.input_mean`` / ``input_std`` / ``aug.fill_value`` where those are
left at None), so a resumed run or an export reuses them without the data.
They are built from exact integer sums (:func:`partial_sums`), so processes
that each hold part of the data add theirs up (:func:`from_sums`) and get the
statistics of the whole, bit for bit.
"""

import numpy as np

_CHUNK = 8192  # images per chunk: integer sums need no float copy of the dataset


def partial_sums(images):
  """Exact integer sums of uint8 (N, H, W, C) images: {"pixels", "squares", "border", counts}.

  ``pixels`` and ``squares`` hold, per channel, the sum of the pixel values
  and of their squares; ``border`` the sum over the one-pixel frame of every
  image. Sums of several parts add up to those of the whole.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"compute_stats needs uint8 (N, H, W, C) images, got shape {images.shape}")
  n, h, w, c = images.shape
  s = np.zeros(c, object)
  ss = np.zeros(c, object)
  b = np.zeros(c, object)
  for start in range(0, n, _CHUNK):
    x = images[start:start + _CHUNK].astype(np.int64)
    s += x.sum(axis=(0, 1, 2)).astype(object)
    ss += (x * x).sum(axis=(0, 1, 2)).astype(object)
    frame = x[:, 0].sum(axis=(0, 1)) + (x[:, -1].sum(axis=(0, 1)) if h > 1 else 0)
    if h > 2:
      frame = frame + x[:, 1:-1, 0].sum(axis=(0, 1))
      if w > 1:
        frame = frame + x[:, 1:-1, -1].sum(axis=(0, 1))
    b += np.asarray(frame).astype(object)
  frame_pixels = n * ((2 if h > 1 else 1) * w + (max(h - 2, 0) * (2 if w > 1 else 1)))
  return {"pixels": [int(v) for v in s], "squares": [int(v) for v in ss],
          "border": [int(v) for v in b], "count": n * h * w, "border_count": frame_pixels}


def add_sums(parts):
  """The sums of several parts (partial_sums of each), as those of their union."""
  out = {k: [sum(vals) for vals in zip(*(p[k] for p in parts))]
         for k in ("pixels", "squares", "border")}
  out["count"] = sum(p["count"] for p in parts)
  out["border_count"] = sum(p["border_count"] for p in parts)
  return out


def from_sums(sums):
  """Channel mean and std on [0, 1] pixels and the mean border colour, from :func:`partial_sums`."""
  count, s, ss = sums["count"], sums["pixels"], sums["squares"]
  if not count:
    raise ValueError("compute_stats needs at least one image")
  mean = [float(v) / (count * 255.0) for v in s]
  # Var = (count * ss - s^2) / count^2, exact in integers.
  var = [float(count * q - p * p) / (count * count * 255.0 * 255.0) for p, q in zip(s, ss)]
  return {
      "mean": tuple(mean),
      "std": tuple(float(max(np.sqrt(max(v, 0.0)), 1e-3)) for v in var),
      "border_mean": tuple(float(v) / (sums["border_count"] * 255.0) for v in sums["border"]),
  }


def compute_stats(images):
  """Channel mean and std on [0, 1] pixels and the mean border colour of uint8 (N, H, W, C) images.

  The border colour (mean over the one-pixel frame of every image) is what
  the medical recipe fills rotated corners with. Sums of pixel values and of
  their squares are accumulated as exact integers, so the result does not
  depend on the chunking and the memory use stays at one chunk.

  Returns:
    {"mean": (C,), "std": (C,) (population std, at least 1e-3), "border_mean": (C,)}
    as tuples of Python floats.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"compute_stats needs uint8 (N, H, W, C) images, got shape {images.shape}")
  return from_sums(partial_sums(images))
