"""Draws docs/augmentations.png: originals and augmented views for both presets.

Rows are images: four scikit-learn digits (8x8, upsampled to 32x32 gray) and
two synthetic RGB images (32x32). Column 0 is the original; then six views
with the ``tsimcne`` preset and six with ``medical`` (its fill colour is the
mean border colour of each group of images, as the trainer computes it).
Nothing is downloaded.

  python scripts/make_augmentation_figure.py [--out docs/augmentations.png]
"""

import argparse
import pathlib

import jax
import matplotlib
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from jaxembed import augment

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE = 32
VIEWS = 6


def digits(n=4):
  d = load_digits()
  idx = [int(np.flatnonzero(d.target == t)[0]) for t in (0, 3, 4, 7)][:n]
  out = []
  for i in idx:
    im = (d.images[i] / 16.0 * 255).astype(np.uint8)
    im = Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)
    out.append(np.asarray(im)[..., None])
  return np.stack(out)


def synthetic_rgb():
  """A coloured 'house' (an arrow-like asymmetric shape) and colour bars."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
  a = np.zeros((SIZE, SIZE, 3))
  a[..., 2] = 0.35 + 0.4 * yy  # sky-blue gradient background
  a[..., 1] = 0.25 + 0.3 * yy
  body = (xx > 0.2) & (xx < 0.7) & (yy > 0.45) & (yy < 0.9)
  a[body] = (0.85, 0.25, 0.15)
  roof = (yy > 0.15) & (yy <= 0.45) & (np.abs(xx - 0.45) < (yy - 0.15) * 0.9)
  a[roof] = (0.95, 0.8, 0.1)
  a[(xx > 0.75) & (xx < 0.9) & (yy > 0.1) & (yy < 0.25)] = (1, 1, 0.6)  # sun
  b = np.zeros((SIZE, SIZE, 3))
  for k, c in enumerate([(1, 0, 0), (1, 0.6, 0), (1, 1, 0), (0, 0.8, 0),
                         (0, 0.4, 1), (0.6, 0, 0.9)]):
    b[(xx * 6).astype(int).clip(0, 5) == k] = c
  b *= (0.4 + 0.6 * (1 - yy))[..., None]
  return (np.stack([a, b]) * 255).astype(np.uint8)


def views(images, preset, seed):
  cfg = {"preset": preset}
  if preset == "medical":
    cfg["fill_value"] = augment.border_mean(images)
  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))
  key = jax.random.key(seed)
  return np.stack([np.asarray(fn(jax.random.fold_in(key, v), images))
                   for v in range(VIEWS)], 1)  # (N, VIEWS, H, W, C)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(
      pathlib.Path(__file__).resolve().parents[1] / "docs" / "augmentations.png"))
  args = parser.parse_args()

  rows = []
  for group in (digits(), synthetic_rgb()):
    orig = group / 255.0
    t = views(group, "tsimcne", 0)
    m = views(group, "medical", 1)
    for i in range(len(group)):
      rows.append([orig[i]] + list(t[i]) + list(m[i]))

  ncol = 1 + 2 * VIEWS
  fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 0.9, len(rows) * 0.95))
  for r, row in enumerate(rows):
    for c, im in enumerate(row):
      ax = axes[r, c]
      if im.shape[-1] == 1:
        ax.imshow(im[..., 0], cmap="gray", vmin=0, vmax=1)
      else:
        ax.imshow(np.clip(im, 0, 1))
      ax.set_xticks([])
      ax.set_yticks([])
      for side in ax.spines.values():
        side.set_visible(c == 0)
  axes[0, 0].set_title("original", fontsize=8)
  axes[0, 1 + VIEWS // 2].set_title("tsimcne preset", fontsize=8)
  axes[0, 1 + VIEWS + VIEWS // 2].set_title("medical preset", fontsize=8)
  fig.subplots_adjust(wspace=0.06, hspace=0.06, left=0.01, right=0.99,
                      top=0.95, bottom=0.01)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
