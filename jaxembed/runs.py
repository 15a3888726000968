"""A trained run, read back from its workdir: the model at a checkpoint, its record, its images.

Export, search and the estimator use it: :func:`load_trained` restores the
model and variables of a checkpoint (on any backend and number of
devices), :func:`run_record` reads what training recorded beside the
config (image shape, data statistics, sizes), and :func:`load_source`
reads images, the run's own or new ones, in the run's layout. Queries for
search (an image file, or an id of the embeddings) are loaded here too.
"""

import json
import os
import sys
import zipfile

import jax
import numpy as np

from jaxembed import checkpoint
from jaxembed import configlib
from jaxembed import data as data_lib
from jaxembed import embedding
from jaxembed import parallel
from jaxembed import schedule
from jaxembed import train_state
from jaxembed import workdir as workdir_lib
from jaxembed.data import arrays
from jaxembed.data import convert
from jaxembed.data import folder
from jaxembed.data import pipeline

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


# -------------------------------------------------------------- the trained model


def run_record(workdir):
  """The ``run`` part of config.json: image shape, data statistics, sizes, versions, data hash.

  Training writes it (jaxembed.workdir.new_run_record) beside the config.
  """
  with open(os.path.join(workdir, workdir_lib.CONFIG)) as f:
    return json.load(f)["run"]


def load_trained(workdir, step=None, mesh=None, warn=None):
  """The model and variables of a run's checkpoint: the newest intact one, or ``step``.

  A damaged newest checkpoint is skipped (it is left where it is: export and search only
  read) and ``warn`` gets one line naming it, its reason and the step used instead (default:
  printed to stderr). An explicit ``step`` that is damaged is an error.

  Returns ``(model, variables, config, step)``; ``variables`` holds
  ``params`` and ``batch_stats`` replicated over ``mesh`` (default: all
  devices). Works for a run trained on any backend and number of devices.
  """
  config = workdir_lib.load_config(workdir)
  run = run_record(workdir)
  mesh = mesh or parallel.make_mesh()
  spe = pipeline.steps_per_epoch(run["num_train"], config.batch_size)
  stages = schedule.build_stages(configlib.stages(config), spe)
  setups = {}

  def setup_for(s):
    stage = schedule.stage_of_step(stages, s)
    if stage.index not in setups:
      setups[stage.index] = train_state.setup_stage(
          config, stage, mesh, spe, image_shape=run["image_shape"], key=jax.random.key(0),
          with_step=False)
    return setups[stage.index]

  with checkpoint.closing(checkpoint.open_manager(
      os.path.join(os.path.abspath(workdir), "checkpoints"))) as manager:
    steps = manager.all_steps()
    if not steps:
      raise workdir_lib.WorkdirError(f"no checkpoint in {workdir}/checkpoints; train first")
    if step is not None:
      if step not in steps:
        raise workdir_lib.WorkdirError(f"no checkpoint at step {step} in {workdir}; "
                                       f"available: {sorted(steps)}")
      state = checkpoint.restore(manager, step, setup_for(step).state)
    else:
      step, state = checkpoint.restore_newest_intact(
          manager, lambda s: setup_for(s).state, warn or _warn, move_aside=False,
          if_none="train the run again in a new --workdir")
  return setup_for(step).model, {"params": state["params"], "batch_stats": state["batch_stats"]}, \
      config, step


def _warn(line):
  print(line, file=sys.stderr, flush=True)


def embed_images(model, variables, images, config, mesh=None, batch_size=None):
  """``embedding.embed`` with the run's eval batch size: dict of z, features, hidden."""
  mesh = mesh or parallel.make_mesh()
  return embedding.embed(model, variables, images, mesh,
                         batch_size or config.eval.get("batch_size", 1024))


# ------------------------------------------------------------------------ images


def _prepare(images, config, run, what):
  """Images converted to the run's (S, S, C) uint8 layout."""
  size, _, channels = run["image_shape"]
  return arrays.prepare_images(images, config.data, image_size=int(size),
                               channels=int(channels), what=what)


def load_source(data, config, run):
  """Images of ``data`` (see the module docstring) in the run's layout.

  Args:
    data: None for the run's own data (``data.load(config.data)``), or a path.
    config: the run's config.
    run: the run record (:func:`run_record`).
  Returns:
    dict with ``images`` uint8 (N, S, S, C), ``labels`` ((N,) or (N, k) int,
    -1 where unknown), ``split`` (N,) str and ``ids`` (N,) str, ``name``
    and ``class_names`` (names of the labels where the source has them).
  """
  if data is None:
    ds = data_lib.load(config.data)
    images = np.concatenate([ds.train_images, ds.test_images])
    if tuple(images.shape[1:]) != tuple(run["image_shape"]):
      images = _prepare(images, config, run, "the run's images")
    return {"images": images,
            "labels": np.concatenate([ds.train_labels, ds.test_labels]),
            "split": np.array(["train"] * len(ds.train_images) + ["test"] * len(ds.test_images)),
            "ids": np.concatenate([ds.train_ids, ds.test_ids]).astype(str),
            "name": ds.name or config.data.source,
            "class_names": tuple(getattr(ds, "class_names", ()) or ())}
  path = str(data)
  name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  if not os.path.exists(path):
    raise convert.DataError(f"--data {path!r}: no such file or folder")
  lower = path.lower()
  class_names = ()
  if os.path.isdir(path) or lower.endswith(".txt"):
    paths, labels, class_names = folder.list_images(path)
    cfg = {"image_size": int(run["image_shape"][0]), "channels": int(run["image_shape"][2]),
           "intensity": config.data.get("intensity", "minmax"),
           "window": config.data.get("window")}
    images, kept, _ = folder.read_files(paths, cfg, what="image files")
    labels = convert.check_labels(None if labels is None else labels[kept], len(images))
    ids = np.array([os.path.normpath(paths[i]) for i in kept])
    split = np.array(["new"] * len(images))
  elif lower.endswith(".npz"):
    images, labels, ids, split = _read_npz(path, name)
  elif lower.endswith(".npy"):
    try:
      arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise convert.DataError(f"cannot read {path!r} as a .npy array: {e}") from None
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] > 4):
      arr = arr[None]  # one image
    images, labels = arr, None
    ids = np.array([f"{name}:{i}" for i in range(len(arr))])
    split = np.array(["new"] * len(arr))
  elif lower.endswith(IMAGE_EXTENSIONS):
    try:
      images = folder.read_image(path)[None]
    except (OSError, ValueError) as e:
      raise convert.DataError(f"cannot read the image {path!r}: {e}") from None
    labels, ids, split = None, np.array([os.path.normpath(path)]), np.array(["new"])
  else:
    raise convert.DataError(
        f"--data {path!r}: unknown kind; give an image folder, a text file of image paths, a "
        f".npz (MedMNIST layout or an 'images' array), a .npy array or an image file "
        f"({', '.join(IMAGE_EXTENSIONS)})")
  images = _prepare(images, config, run, path)
  labels = convert.check_labels(labels, len(images))
  return {"images": images, "labels": labels, "split": np.asarray(split).astype(str),
          "ids": np.asarray(ids).astype(str), "name": name, "class_names": tuple(class_names)}


def _read_npz(path, name):
  """(images, labels, ids, split) of an .npz: MedMNIST layout (every split) or 'images'."""
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise convert.DataError(f"cannot read {path!r} as an .npz file: {e}") from None
  if "images" in arrays:
    parts = [("new", "images", "labels", "ids")]
    if "test_images" in arrays:
      parts = [("train", "images", "labels", "ids"),
               ("test", "test_images", "test_labels", "test_ids")]
  else:
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    splits += sorted(k[:-len("_images")] for k in arrays
                     if k.endswith("_images") and k[:-len("_images")] not in splits)
    if not splits:
      raise convert.DataError(f"{path} has neither an 'images' array nor MedMNIST '<split>_images' "
                      f"arrays (keys: {sorted(arrays)})")
    parts = [(s, f"{s}_images", f"{s}_labels", None) for s in splits]
  images, labels, ids, split = [], [], [], []
  has_labels = all(lab in arrays for _, _, lab, _ in parts)
  for s, key_x, key_y, key_id in parts:
    x = arrays[key_x]
    if x.ndim == 3 and x.shape[-1] not in (1, 3):
      x = x[..., None]
    images.append(x)
    if has_labels:
      y = arrays[key_y]
      labels.append(y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y)
    if key_id and key_id in arrays:
      ids.append(arrays[key_id].astype(str))
    else:
      prefix = f"{name}:{s}:" if s != "new" else f"{name}:"
      ids.append(np.array([f"{prefix}{i}" for i in range(len(x))]))
    split.append(np.array([s] * len(x)))
  shapes = {x.shape[1:] for x in images}
  if len(shapes) > 1:
    raise convert.DataError(f"{path}: the splits have different image shapes {sorted(shapes)}")
  return (np.concatenate(images), np.concatenate(labels) if has_labels else None,
          np.concatenate(ids), np.concatenate(split))


def read_query_image(path, config, run):
  """One query image (file or .npy) as uint8 (1, S, S, C) in the run's layout."""
  src = load_source(path, config, run)
  if len(src["images"]) != 1:
    raise ValueError(f"--query {path!r} holds {len(src['images'])} images; give one image")
  return src["images"]


def row_of_file(path, ids):
  """The row of ``ids`` (image paths, for a run on files) naming the file ``path``, or None.

  Paths are compared by their real paths (absolute, symbolic links resolved),
  not as strings: ``./imgs/a.png``, ``imgs/a.png`` and a link to it are one file.
  Only existing files match: ids that are not paths never do.
  """
  if not os.path.isfile(path):
    return None
  target = os.path.realpath(path)
  ids = np.asarray(ids).astype(str)
  # Only ids ending in the query's name or its target's name can be the file (one pass of
  # string tests, not a real path for each of 60,000 ids); the id may be a link of that name.
  names = {os.path.basename(path), os.path.basename(target)}
  for r in np.flatnonzero(np.isin(np.array([os.path.basename(i) for i in ids]), list(names))):
    if os.path.realpath(ids[r]) == target and os.path.isfile(ids[r]):
      return int(r)
  return None


def images_for_ids(workdir, ids, data=None):
  """{id: image} for the given ids, read from ``data`` (default: the run's data)."""
  config = workdir_lib.load_config(workdir)
  src = load_source(data, config, run_record(workdir))
  where = {i: r for r, i in enumerate(src["ids"])}
  missing = [i for i in ids if i not in where]
  if missing:
    raise ValueError(f"ids {missing[:3]} are not in the data; pass --data with the images "
                     "the embeddings file was made from")
  return {i: src["images"][where[i]] for i in ids}


def load_embeddings(workdir, with_images=True):
  """The arrays of a finished run's embeddings.npz and, optionally, the images behind its rows.

  The images are re-loaded from the dataset of config.json (train, then test
  images: the order of embeddings.npz); a dataset that no longer matches the
  rows (another count, other ids) is an error.

  Returns:
    (dict of arrays, images (N, H, W, C) uint8 or None).
  """
  path = os.path.join(workdir, workdir_lib.EMBEDDINGS)
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found: --workdir must hold a finished run (embeddings.npz "
                     "is written at its end)")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  images = None
  if with_images:
    config = workdir_lib.load_config(workdir)
    ds = data_lib.load(config.data)
    images = np.concatenate([ds.train_images, ds.test_images])
    if len(images) != len(arrays["embedding"]):
      raise ValueError(f"the dataset of {workdir}/config.json has {len(images)} images but "
                       f"embeddings.npz has {len(arrays['embedding'])} rows; the data changed "
                       "since the run (use --no_images)")
    ids = np.concatenate([ds.train_ids, ds.test_ids]).astype(str)
    if "ids" in arrays and not np.array_equal(ids, arrays["ids"].astype(str)):
      raise ValueError("the re-loaded dataset's ids differ from those in embeddings.npz; the data "
                       "changed since the run (use --no_images)")
  return arrays, images
