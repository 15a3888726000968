"""Writing files so that a reader never sees half of one, and labels as text for tables.

Every output of jaxembed (config.json, metrics, embeddings, plots, tables)
is written to a temporary name beside its destination and renamed into
place once complete, so an interrupted process leaves either the old file
or the new one, never a truncated file that looks complete.
"""

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode="w"):
  """Opens a temporary file next to ``path`` and renames it onto ``path`` on success."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_bytes(path, data):
  """Writes ``data`` (bytes) to ``path`` atomically."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_json(path, obj):
  """Writes ``obj`` as indented, key-sorted JSON (NumPy scalars and arrays allowed), atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")


def _json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def label_strings(labels):
  """Labels as strings for CSV/HTML: ints as is, multi-label rows joined by ';'."""
  labels = np.asarray(labels)
  if labels.ndim == 2:
    return np.array([";".join(str(int(v)) for v in row) for row in labels])
  return np.array([str(v) for v in labels.tolist()])
