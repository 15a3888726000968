"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

``data.path`` is a folder holding ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), as
``apt-get install dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist and as Zalando and LeCun distribute them.
"""

import gzip
import os

import numpy as np

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# IDX type codes (yann.lecun.com/exdb/mnist): all big-endian.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
  """The array in one IDX file (gzip detected from its first two bytes)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path!r}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise DataError(f"{path!r} is not an IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
  dtype = np.dtype(_DTYPES[raw[2]])
  if len(raw) - header != int(np.prod(dims)) * dtype.itemsize:
    raise DataError(f"{path!r}: {len(raw) - header} data bytes do not match the shape {dims}")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder, stem):
  for name in (stem, stem + ".gz"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise DataError(f"{folder!r} has no {stem} or {stem}.gz; data.source='idx' needs "
                  f"{sorted(FILES.values())} (optionally .gz) in data.path")


def load_idx(data_config):
  """The IDX source (module docstring)."""
  folder = data_config.get("path")
  if not folder or not os.path.isdir(folder):
    raise DataError(f"data.path={folder!r} is not a folder; data.source='idx' needs the folder "
                    "of the IDX files (Fashion-MNIST: apt-get install dataset-fashion-mnist, "
                    "then /usr/share/datasets/fashion-mnist)")
  arrays = {k: read_idx(_find(folder, stem)) for k, stem in FILES.items()}
  name = data_config.get("name") or os.path.basename(os.path.normpath(folder))
  splits = []
  for split in ("train", "test"):
    x = convert.check_images(arrays[f"{split}_images"], f"{split} images in {folder}")
    y = convert.check_labels(arrays[f"{split}_labels"], len(x), f"{split} labels in {folder}")
    splits.append((x, y, np.array([f"{name}:{split}:{i}" for i in range(len(x))])))
  return dataset.with_test(splits[0], splits[1], data_config, name=name)
