"""Dataset statistics that augmentation and input normalisation need, computed once."""

import numpy as np


def compute_stats(images):
  """Channel mean and std on [0, 1] pixels and the mean border colour of uint8 (N, H, W, C) images.

  The border colour (mean over the one-pixel frame of every image) is what
  the medical recipe fills rotated corners with.
  """
  x = images.astype(np.float64) / 255.0
  border = np.concatenate([x[:, 0].reshape(-1, x.shape[-1]), x[:, -1].reshape(-1, x.shape[-1]),
                           x[:, 1:-1, 0].reshape(-1, x.shape[-1]),
                           x[:, 1:-1, -1].reshape(-1, x.shape[-1])])
  std = x.std(axis=(0, 1, 2))
  return {
      "mean": tuple(float(v) for v in x.mean(axis=(0, 1, 2))),
      "std": tuple(float(max(v, 1e-3)) for v in std),
      "border_mean": tuple(float(v) for v in border.mean(axis=0)),
  }
