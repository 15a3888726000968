"""Image files on disk: a folder of class subfolders (labelled), a flat folder or a file list (unlabelled).

``data.path`` is one of
  * a folder whose subfolders are classes (``cells/neutrophil/*.png``,
    searched recursively; labels follow the sorted subfolder names);
  * a folder of image files without subfolders: unlabelled (label -1);
  * a text file with one image path per line (relative paths are taken
    from the list's folder; blank lines and ``#`` comments are skipped):
    unlabelled.
The file paths are the ids. PIL reads PNG, JPEG, TIFF (16-bit and float
too), BMP, GIF and WebP. Unreadable files are skipped with a warning that
counts them and names the first few. Mixed sizes are resized to
``data.image_size``; mixed gray and RGB are converted to ``data.channels``;
either is an error when the field is not set. Non-uint8 pixels are scaled
by ``data.intensity`` with one range over all files. There is no test split
on disk: ``data.test_fraction`` splits one off (stratified, random_state=0).
"""

import os

from absl import logging
import numpy as np
from PIL import Image

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
_SHOW = 5  # unreadable paths named in the warning


def _is_image(name):
  return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _walk_images(folder):
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [os.path.join(root, f) for f in sorted(files) if _is_image(f)]
  return out


def list_images(path):
  """(paths, labels, class_names) of an image folder or file list (module docstring)."""
  if not path:
    raise DataError("data.source='folder' needs --config.data.path=<folder of images, folder "
                    "of class subfolders, or a text file listing image paths>")
  if os.path.isfile(path):
    base = os.path.dirname(os.path.abspath(path))
    try:
      with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"cannot read the file list {path!r}: {e}") from None
    paths = [ln if os.path.isabs(ln) else os.path.join(base, ln)
             for ln in lines if ln and not ln.startswith("#")]
    if not paths:
      raise DataError(f"the file list {path!r} names no images")
    return paths, None, ()
  if not os.path.isdir(path):
    raise DataError(f"data.path={path!r}: no such file or folder")
  entries = sorted(os.listdir(path))
  subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")]
  top = [os.path.join(path, e) for e in entries
         if _is_image(e) and os.path.isfile(os.path.join(path, e))]
  if not subdirs:
    if not top:
      raise DataError(f"no image files ({', '.join(EXTENSIONS)}) in {path!r}")
    return top, None, ()
  if top:
    raise DataError(f"{path!r} has both image files ({os.path.basename(top[0])}, ...) and "
                    f"subfolders ({subdirs[0]}, ...); put every image in a class subfolder, "
                    "or list them in a text file")
  paths, labels = [], []
  for label, d in enumerate(subdirs):
    found = _walk_images(os.path.join(path, d))
    if not found:
      raise DataError(f"class folder {os.path.join(path, d)!r} has no image files; remove it "
                      "or add images")
    paths += found
    labels += [label] * len(found)
  return paths, np.asarray(labels, np.int64), tuple(subdirs)


def read_image(path):
  """One image file as an (H, W, C) array: uint8 for 8-bit, uint16/int32/float32 otherwise.

  Palette, alpha and CMYK images become RGB (alpha dropped); 1-bit and
  gray+alpha become gray. Raises OSError/ValueError for unreadable files.
  """
  with Image.open(path) as img:
    img.load()
    mode = img.mode
    if mode == "1" or mode == "LA":
      img = img.convert("L")
    elif mode in ("P", "PA"):
      img = img.convert("RGBA").convert("RGB")
    elif mode not in ("L", "RGB", "I", "F") and not mode.startswith("I;16"):
      img = img.convert("RGB")
    arr = np.asarray(img)
  if arr.dtype.byteorder == ">":  # I;16B
    arr = arr.astype(arr.dtype.newbyteorder("="))
  if mode.startswith("I;16"):
    arr = arr.astype(np.uint16)
  return arr[..., None] if arr.ndim == 2 else arr


def read_images(paths, what="images"):
  """Reads the files that can be read; returns (arrays, kept indices) and warns about the rest."""
  arrays, kept, bad = [], [], []
  for i, p in enumerate(paths):
    try:
      arrays.append(read_image(p))
      kept.append(i)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      bad.append((p, e))
  if bad and not arrays:
    raise DataError(f"none of the {len(paths)} {what} could be read; the first: "
                    + "; ".join(f"{p}: {e}" for p, e in bad[:_SHOW]))
  if bad:
    msg = (f"skipped {len(bad)} of {len(paths)} {what} that could not be read: "
           + ", ".join(p for p, _ in bad[:_SHOW]) + (", ..." if len(bad) > _SHOW else ""))
    logging.warning(msg)
    print(f"warning: {msg}", flush=True)
  return arrays, np.asarray(kept, np.int64)


def stack_images(arrays, paths, data_config):
  """One uint8 (N, H, W, C) array from per-file arrays of mixed dtype, size and channels."""
  channels = data_config.get("channels")
  size = data_config.get("image_size")
  kinds = {a.shape[-1] for a in arrays}
  if len(kinds) > 1 and channels is None:
    first = {c: paths[i] for i, c in reversed(list(enumerate(a.shape[-1] for a in arrays)))}
    raise DataError(f"the folder mixes gray and RGB images (e.g. {first[1]} and {first[3]}); "
                    "set --config.data.channels=1 or 3 to convert them")
  sizes = {a.shape[:2] for a in arrays}
  if len(sizes) > 1 and not size:
    raise DataError(f"the folder mixes image sizes {sorted(sizes)[:3]}; set "
                    "--config.data.image_size to resize them")
  # One intensity range over every non-uint8 file, so that files stay comparable.
  intensity, window = data_config.get("intensity", "minmax"), data_config.get("window")
  others = [a for a in arrays if a.dtype not in (np.uint8, np.bool_)]
  vr = None
  if others:
    ranges = [convert.value_range(a[None], intensity, window, what=paths[i])
              for i, a in enumerate(arrays) if a.dtype not in (np.uint8, np.bool_)]
    if intensity == "minmax":
      vr = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    elif intensity == "window":
      vr = ranges[0]
  out = []
  for a in arrays:
    x = convert.to_uint8(a[None], intensity, window, vrange=vr)
    x = convert.to_channels(x, channels if len(kinds) > 1 else None)
    if len(sizes) > 1:
      x = convert.resize_images(x, size)
    out.append(x[0])
  return np.stack(out), vr


def load_folder(data_config):
  """The folder source (module docstring)."""
  path = data_config.get("path")
  paths, labels, class_names = list_images(path)
  arrays, kept = read_images(paths, what="image files")
  images, vr = stack_images(arrays, [paths[i] for i in kept], data_config)
  ids = np.array([os.path.normpath(paths[i]) for i in kept])
  labels = convert.check_labels(None if labels is None else labels[kept], len(images))
  name = os.path.basename(os.path.normpath(path))
  ds = dataset.split_off_test(images, labels, ids, data_config, name=name,
                              class_names=class_names)
  ds.intensity_range = vr
  return ds
