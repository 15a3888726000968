"""MedMNIST-style .npz files: ``{split}_images`` / ``{split}_labels`` arrays per split.

Every 2D dataset of MedMNIST v2 (Yang et al. 2023) at every size it comes
in: ``<name>.npz`` (28x28) and ``<name>_64.npz``, ``<name>_128.npz``,
``<name>_224.npz`` (MedMNIST+). Training uses train + val and the test split
is test (DESIGN.md 3c); ``data.train_split`` / ``data.test_split`` choose
others ("train", "val", "test", joined with "+"). Labels may be (N,),
(N, 1) or (N, k) multi-label (ChestMNIST).
"""

import os
import zipfile

import numpy as np

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

# name: (channels, number of classes or labels, task) for the 2D datasets of
# MedMNIST v2 (Yang et al., Scientific Data 2023, Table 1).
DATASETS = {
    "pathmnist": (3, 9, "multi-class"),
    "chestmnist": (1, 14, "multi-label"),
    "dermamnist": (3, 7, "multi-class"),
    "octmnist": (1, 4, "multi-class"),
    "pneumoniamnist": (1, 2, "binary"),
    "retinamnist": (3, 5, "ordinal"),
    "breastmnist": (1, 2, "binary"),
    "bloodmnist": (3, 8, "multi-class"),
    "tissuemnist": (1, 8, "multi-class"),
    "organamnist": (1, 11, "multi-class"),
    "organcmnist": (1, 11, "multi-class"),
    "organsmnist": (1, 11, "multi-class"),
}
SIZES = (28, 64, 128, 224)


def file_name(name, size=28):
  """The file name MedMNIST uses for ``name`` at ``size`` (no suffix for 28)."""
  return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def find_file(data_config):
  """``data.path``, or the file for ``data.name`` in ``data.dir``.

  In ``data.dir`` the size matching ``data.image_size`` is preferred, then
  the smallest larger one, then the largest present (it is resized).
  """
  path = data_config.get("path")
  if path:
    if not os.path.isfile(path):
      raise DataError(f"data.path={path!r}: no such file; give the MedMNIST .npz file "
                      "(e.g. breastmnist.npz from medmnist.com / Zenodo)")
    return path
  name, folder = data_config.get("name"), data_config.get("dir")
  if not folder or not name:
    raise DataError("data.source='medmnist' needs the file: --config.data.path=/path/to/"
                    "<name>.npz, or --config.data.dir=/folder/with/npz-files and "
                    "--config.data.name=<name> (e.g. breastmnist)")
  if not os.path.isdir(folder):
    raise DataError(f"data.dir={folder!r}: no such folder")
  present = {s: os.path.join(folder, file_name(name, s)) for s in SIZES
             if os.path.isfile(os.path.join(folder, file_name(name, s)))}
  if not present:
    raise DataError(f"no {name} file in data.dir={folder!r}; expected one of "
                    f"{[file_name(name, s) for s in SIZES]}")
  want = data_config.get("image_size") or 28
  larger = [s for s in sorted(present) if s >= want]
  return present[larger[0] if larger else max(present)]


def _parse_split(spec, default):
  spec = spec or default
  return [s.strip() for s in spec.split("+") if s.strip()]


def read_npz(path, name, train_split=None, test_split=None):
  """Reads the splits of a MedMNIST-style file: ((images, labels, ids), (images, labels, ids)).

  Images are checked as (N, H, W[, C]) of any numeric dtype; labels as (N,),
  (N, 1) or (N, k); ids are ``<name>:<split>:<index in that split>``.
  """
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"cannot read {path!r} as an .npz file: {e}") from None
  with npz:
    keys = set(npz.files)
    splits = sorted({k[:-len("_images")] for k in keys if k.endswith("_images")})
    out = []
    for spec, default in ((train_split, "train+val"), (test_split, "test")):
      parts = _parse_split(spec, default)
      if spec is None and default == "train+val" and "val_images" not in keys:
        parts = ["train"]
      xs, ys, ids = [], [], []
      for s in parts:
        missing = [k for k in (f"{s}_images", f"{s}_labels") if k not in keys]
        if missing:
          raise DataError(
              f"{path}: split {s!r} does not exist (missing {missing}); splits present: "
              f"{splits}. A MedMNIST .npz has train_images, train_labels, val_images, "
              f"val_labels, test_images, test_labels; found keys {sorted(keys)}")
        try:
          x = convert.check_images(npz[f"{s}_images"], f"{path}: {s}_images", allow_empty=True)
          y = convert.check_labels(npz[f"{s}_labels"], len(x), f"{path}: {s}_labels")
        except ValueError as e:
          if isinstance(e, DataError):
            raise
          raise DataError(f"{path}: cannot read split {s!r}: {e}") from None
        xs.append(x)
        ys.append(y)
        ids.append(np.array([f"{name}:{s}:{i}" for i in range(len(x))]))
      shapes = {x.shape[1:] for x in xs}
      if len(shapes) > 1:
        raise DataError(f"{path}: splits {parts} have different image shapes {sorted(shapes)}")
      if len({y.shape[1:] for y in ys}) > 1:
        raise DataError(f"{path}: splits {parts} have different label layouts "
                        f"{[y.shape for y in ys]}")
      if default == "train+val" and not sum(len(x) for x in xs):
        raise DataError(f"{path}: no images in the training split(s) {parts}")
      out.append((np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)))
  return out[0], out[1]


def load_medmnist(data_config):
  """The MedMNIST source (module docstring)."""
  path = find_file(data_config)
  name = data_config.get("name") or os.path.splitext(os.path.basename(path))[0]
  train, test = read_npz(path, name, data_config.get("train_split"),
                         data_config.get("test_split"))
  return dataset.with_test(train, test, data_config, name=name)
