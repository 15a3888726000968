"""The files of a run's workdir (DESIGN.md 3b): config.json, metrics, embeddings and their checks.

Every file is written to a temporary name and renamed into place, so an
interrupted run never leaves a half-written file that looks complete;
``metrics.json`` is written last and marks a finished run.
"""

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxembed.configs import common
from jaxembed import configlib
from jaxembed import files
from jaxembed import plots
from jaxembed import version


class WorkdirError(ValueError):
  """The workdir cannot be used (a file, not writable, or holding a different run)."""


# Fields that may change between invocations of one run: they change how a run
# is logged, checkpointed, fed or computed in memory, not what it trains.
RESUME_FREE_FIELDS = ("logging.", "checkpoint.every_steps", "checkpoint.keep", "outputs.",
                      "data.prefetch", "train.chunk_size")

CONFIG = "config.json"
METRICS = "metrics.json"
STAGE_METRICS = "stage_metrics.json"
EMBEDDINGS = "embeddings.npz"


def prepare_workdir(path):
  """Creates ``path`` if needed and checks that it is a writable directory."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} is a file, not a directory; give a directory path")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {path}: {e.strerror}; choose a writable location") from e
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir {path} is not writable ({e.strerror}); choose another directory "
                       "or fix its permissions") from e
  return path


class FirstStepGuard:
  """Undoes what a run creates in its workdir if it fails before its first training step.

  A bad model option, unreadable weights, a data error found late or a signal before training
  would otherwise leave config.json and checkpoints/ behind, and the corrected command would be
  refused as "a run with a different configuration". Entered before the workdir is prepared,
  it records whether the workdir existed and what it held; if the block raises before
  :meth:`commit`, it removes the workdir if it is new, else only the entries that are new.
  Entries that existed are never touched (a damaged checkpoint set aside inside an existing
  checkpoints/ stays aside). Only the main process removes anything. Close the checkpoint
  manager and the metric writer before leaving the block: nothing may still write.
  """

  def __init__(self, workdir, main=True):
    self.workdir = os.path.abspath(workdir)
    self.main = main
    self.existed = os.path.isdir(self.workdir)
    self.entries = set(os.listdir(self.workdir)) if self.existed else set()
    self.committed = False

  def commit(self):
    """The first step has run: from now on the workdir holds the run."""
    self.committed = True

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None or self.committed or not self.main or not os.path.isdir(self.workdir):
      return False
    if not self.existed:
      shutil.rmtree(self.workdir, ignore_errors=True)
      return False
    for name in sorted(set(os.listdir(self.workdir)) - self.entries):
      path = os.path.join(self.workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.remove(path)
    return False


def data_hash(ds):
  """SHA-256 over the images and labels of both splits: identifies the data a run used."""
  if ds.process_rows:  # no process holds every image: each hashes its own, then all together
    return ds.fingerprint()
  h = hashlib.sha256()
  for arr in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
    arr = np.ascontiguousarray(arr)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def new_run_record(config, ds, stats):
  """What config.json keeps beside the config: versions, data hash and statistics."""
  return {
      "format_version": config.format_version,
      "seed": config.seed,
      "data_hash": data_hash(ds),
      "data_stats": stats,
      "num_train": int(ds.num_train),
      "num_test": int(ds.num_test),
      "image_shape": list(ds.image_shape),
      "versions": {
          "jaxembed": version.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?"),
          "python": platform.python_version(),
      },
  }


def check_or_write_config(workdir, config, run_info, write=True):
  """Writes config.json, or checks that an existing one describes the same run.

  Resuming with another config or other data would mix two runs in one
  workdir, so that is refused with the list of differing fields.
  """
  path = os.path.join(workdir, CONFIG)
  new = json.loads(configlib.to_json(config))
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise WorkdirError(f"{path} exists but cannot be read ({e}); use a new --workdir") from e
    old_run = old.pop("run", {})
    diff = sorted(d for d in _diff(old, new, defaults=_defaults())
                  if not d.startswith(RESUME_FREE_FIELDS))
    if old_run.get("data_hash") not in (None, run_info["data_hash"]):
      diff.append("the training data (data hash)")
    if diff:
      raise WorkdirError(
          f"--workdir {workdir} holds a run with a different configuration ({', '.join(diff[:8])}"
          f"{', ...' if len(diff) > 8 else ''}); use a new --workdir, or the original config to "
          "resume it")
    return
  if write:
    files.write_json(path, dict(new, run=run_info))


def _defaults():
  """Every field at its default (configs/common.py), as config.json stores them."""
  return json.loads(configlib.to_json(common.get_config()))


def _diff(a, b, prefix="", defaults=None):
  """Dotted names of the fields that differ; a field one side lacks counts as its default.

  A config.json written before a field existed lacks it, and the run it
  describes behaved as the field's default does.
  """
  defaults = defaults or {}
  missing = "<missing>"
  for k in set(a) | set(b):
    default = defaults.get(k, missing)
    va, vb = a.get(k, default), b.get(k, default)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f"{prefix}{k}.", default if isinstance(default, dict) else None)
    elif va != vb:
      yield f"{prefix}{k}"


def load_config(workdir):
  """The resolved ConfigDict of a run from its config.json."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(path):
    raise WorkdirError(f"{path} not found: --workdir must be a directory written by "
                       "`python -m jaxembed.train`")
  with open(path) as f:
    return configlib.from_json(f.read())


def is_complete(workdir):
  return all(os.path.isfile(os.path.join(workdir, f)) for f in (METRICS, EMBEDDINGS))


def read_metrics(workdir):
  with open(os.path.join(workdir, METRICS)) as f:
    return json.load(f)


def read_stage_metrics(workdir):
  path = os.path.join(workdir, STAGE_METRICS)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_stage_metrics(workdir, stage_metrics):
  files.write_json(os.path.join(workdir, STAGE_METRICS), stage_metrics)


def write_embeddings(path_npz, out, labels, split, ids):
  """Writes ``embeddings.npz`` and the same columns (without features) as ``.csv``.

  ``out`` holds ``z`` (the head output), ``features`` and optionally ``hidden``.
  """
  z = np.asarray(out["z"], np.float32)
  arrays = {"embedding": z[:, :2] if z.shape[1] >= 2 else z, "head": z,
            "features": np.asarray(out["features"], np.float32),
            "labels": np.asarray(labels), "split": np.asarray(split).astype(str),
            "ids": np.asarray(ids).astype(str)}
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  with files.atomic_open(path_npz, "wb") as f:
    f.write(buf.getvalue())
  path_csv = os.path.splitext(path_npz)[0] + ".csv"
  with files.atomic_open(path_csv, "w") as f:
    w = csv.writer(f)
    w.writerow(["id", "split", "label", "x", "y"] + [f"head_{i}" for i in range(z.shape[1])])
    lab = files.label_strings(labels)
    emb = arrays["embedding"]
    for i in range(len(z)):
      xy = [f"{emb[i, 0]:.6g}", f"{emb[i, 1]:.6g}" if emb.shape[1] > 1 else ""]
      w.writerow([arrays["ids"][i], arrays["split"][i], lab[i]] + xy
                 + [f"{v:.6g}" for v in z[i]])
  return arrays


def write_run_outputs(workdir, config, ds, train_out, test_out, metrics):
  """The final files of a training run; metrics.json last.

  Returns:
    The PNG bytes of the map (embedding.png), or None without plots.
  """
  out = {k: np.concatenate([train_out[k], test_out[k]]) for k in ("z", "features")}
  labels = np.concatenate([ds.train_labels, ds.test_labels])
  split = np.array(["train"] * len(ds.train_labels) + ["test"] * len(ds.test_labels))
  ids = np.concatenate([ds.train_ids, ds.test_ids])
  png = None
  arrays = write_embeddings(os.path.join(workdir, EMBEDDINGS), out, labels, split, ids)
  if config.outputs.plots:
    images = ds.all_images()
    title = f"t-SimCNE, {ds.name}: kNN {metrics.get('knn_accuracy', float('nan')):.3f}, " \
            f"silhouette {metrics.get('silhouette', float('nan')):.3f} (test split)"
    png = plots.scatter_png(os.path.join(workdir, "embedding.png"), arrays["embedding"], labels,
                            title=title)
    plots.embedding_html(os.path.join(workdir, "embedding.html"), arrays["embedding"], labels,
                         arrays["ids"], split,
                         images=images if config.outputs.html_thumbnails else None, title=title)
  files.write_json(os.path.join(workdir, METRICS), metrics)
  return png


def print_summary(workdir, metrics):
  """The end-of-run lines: metrics and where the outputs are."""
  parts = [f"{k} {metrics[k]:.4f}" for k in ("knn_accuracy", "silhouette") if k in metrics]
  print(f"Final ({metrics.get('protocol', 'split')} protocol, test split): " + ", ".join(parts),
        flush=True)
  print(f"Outputs in {os.path.abspath(workdir)}: " + ", ".join(
      f for f in sorted(os.listdir(workdir))
      if not f.startswith(".") and f != "checkpoints") + ", checkpoints/", flush=True)
  sys.stdout.flush()
