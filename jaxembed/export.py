"""Embedding images with a trained run: any data in, coordinates, features, tables and plots out.

Command line::

  python -m jaxembed.export --workdir DIR [--data SOURCE] [--out FILE.npz] [--step N]

loads the newest (or the chosen) checkpoint of DIR and embeds the run's own
train and test images (default) or new images never seen in training:
``--data`` is an image folder (class subfolders give labels), a text file
listing image paths, a MedMNIST-style ``.npz`` (every split), an ``.npz``
with an ``images`` array, a ``.npy`` array or a single image file. Images
are resized and converted to the run's size and channels. It writes
``FILE.npz`` / ``FILE.csv`` (2-D coordinates, head outputs, backbone
features, labels where known, splits and ids), a scatter PNG, the
interactive HTML page and the near-duplicate and outlier tables beside it.
Existing files are never replaced without ``--overwrite``. Inference is
batched, jitted and sharded over all devices; a checkpoint written on GPUs
loads on a CPU.
"""

import os

import numpy as np

from jaxembed import embedding
from jaxembed import parallel
from jaxembed import workdir as workdir_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


# ---------------------------------------------------------------- loading data


def run_info(workdir):
  """The ``run`` record of config.json (image shape, statistics, sizes)."""
  return workdir_lib.load_run_record(workdir)


def _prepare(images, config, run, what):
  """Images converted to the run's (S, S, C) uint8 layout."""
  from jaxembed.data import arrays  # pylint: disable=g-import-not-at-top
  size, _, channels = run["image_shape"]
  return arrays.prepare_images(images, config.data, image_size=int(size),
                               channels=int(channels), what=what)


def load_source(data, config, run):
  """Images of ``data`` (see the module docstring) in the run's layout.

  Args:
    data: None for the run's own data (``data.load(config.data)``), or a path.
    config: the run's config.
    run: the run record (``run_info``).
  Returns:
    dict with ``images`` uint8 (N, S, S, C), ``labels`` ((N,) or (N, k) int,
    -1 where unknown), ``split`` (N,) str and ``ids`` (N,) str, ``name``
    and ``class_names`` (names of the labels where the source has them).
  """
  from jaxembed import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxembed.data import convert  # pylint: disable=g-import-not-at-top
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
    raise data_lib.DataError(f"--data {path!r}: no such file or folder")
  lower = path.lower()
  class_names = ()
  if os.path.isdir(path) or lower.endswith(".txt"):
    from jaxembed.data import folder  # pylint: disable=g-import-not-at-top
    paths, labels, class_names = folder.list_images(path)
    arrs, kept = folder.read_images(paths, what="image files")
    cfg = {"image_size": run["image_shape"][0], "channels": run["image_shape"][2],
           "intensity": config.data.get("intensity", "minmax"),
           "window": config.data.get("window")}
    images, _ = folder.stack_images(arrs, [paths[i] for i in kept], cfg)
    labels = convert.check_labels(None if labels is None else labels[kept], len(images))
    ids = np.array([os.path.normpath(paths[i]) for i in kept])
    split = np.array(["new"] * len(images))
  elif lower.endswith(".npz"):
    images, labels, ids, split = _read_npz(path, name)
  elif lower.endswith(".npy"):
    try:
      arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise data_lib.DataError(f"cannot read {path!r} as a .npy array: {e}") from None
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] > 4):
      arr = arr[None]  # one image
    images, labels = arr, None
    ids = np.array([f"{name}:{i}" for i in range(len(arr))])
    split = np.array(["new"] * len(arr))
  elif lower.endswith(IMAGE_EXTENSIONS):
    from jaxembed.data import folder  # pylint: disable=g-import-not-at-top
    try:
      images = folder.read_image(path)[None]
    except (OSError, ValueError) as e:
      raise data_lib.DataError(f"cannot read the image {path!r}: {e}") from None
    labels, ids, split = None, np.array([os.path.normpath(path)]), np.array(["new"])
  else:
    raise data_lib.DataError(
        f"--data {path!r}: unknown kind; give an image folder, a text file of image paths, a "
        f".npz (MedMNIST layout or an 'images' array), a .npy array or an image file "
        f"({', '.join(IMAGE_EXTENSIONS)})")
  images = _prepare(images, config, run, path)
  labels = convert.check_labels(labels, len(images))
  return {"images": images, "labels": labels, "split": np.asarray(split).astype(str),
          "ids": np.asarray(ids).astype(str), "name": name, "class_names": tuple(class_names)}


def _read_npz(path, name):
  """(images, labels, ids, split) of an .npz: MedMNIST layout (every split) or 'images'."""
  import zipfile  # pylint: disable=g-import-not-at-top
  from jaxembed.data import DataError  # pylint: disable=g-import-not-at-top
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"cannot read {path!r} as an .npz file: {e}") from None
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
      raise DataError(f"{path} has neither an 'images' array nor MedMNIST '<split>_images' "
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
    raise DataError(f"{path}: the splits have different image shapes {sorted(shapes)}")
  return (np.concatenate(images), np.concatenate(labels) if has_labels else None,
          np.concatenate(ids), np.concatenate(split))


def read_query_image(path, config, run):
  """One query image (file or .npy) as uint8 (1, S, S, C) in the run's layout."""
  src = load_source(path, config, run)
  if len(src["images"]) != 1:
    raise ValueError(f"--query {path!r} holds {len(src['images'])} images; give one image")
  return src["images"]


def images_for_ids(workdir, ids, data=None):
  """{id: image} for the given ids, read from ``data`` (default: the run's data)."""
  config = workdir_lib.load_config(workdir)
  src = load_source(data, config, run_info(workdir))
  where = {i: r for r, i in enumerate(src["ids"])}
  missing = [i for i in ids if i not in where]
  if missing:
    raise ValueError(f"ids {missing[:3]} are not in the data; pass --data with the images "
                     "the embeddings file was made from")
  return {i: src["images"][where[i]] for i in ids}


# ------------------------------------------------------------------- embedding


def embed_images(model, variables, images, config, mesh=None, batch_size=None):
  """``embedding.embed`` with the run's eval batch size: dict of z, features, hidden."""
  mesh = mesh or parallel.make_mesh()
  return embedding.embed(model, variables, images, mesh,
                         batch_size or config.eval.get("batch_size", 1024))


# ---------------------------------------------------------------------- export


def output_paths(out):
  """Every file an export to ``out`` (an .npz path) writes, by kind."""
  base, _ = os.path.splitext(out)
  folder, stem = os.path.split(base)
  # The default name gives the workdir's own file names (DESIGN.md 3b).
  prefix = "" if stem == "embeddings" else stem + "_"
  plot_stem = "embedding" if stem == "embeddings" else stem
  return {"npz": base + ".npz", "csv": base + ".csv",
          "png": os.path.join(folder, plot_stem + ".png"),
          "html": os.path.join(folder, plot_stem + ".html"),
          "duplicates": os.path.join(folder, prefix + "duplicates.csv"),
          "outliers": os.path.join(folder, prefix + "outliers.csv")}


def export(workdir, data=None, out=None, step=None, overwrite=False, plots=True,
           thumbnails=True, tables=True, duplicate_threshold=None, batch_size=None, mesh=None,
           verbose=True):
  """Embeds ``data`` with the checkpoint of ``workdir`` and writes the files of ``output_paths``.

  Args:
    workdir: a run directory written by ``jaxembed.train``.
    data: None (the run's own train and test images) or a path (module docstring).
    out: the .npz to write; default ``DIR/export/embeddings.npz`` for the
      run's data and ``DIR/export/<data name>.npz`` for other data.
    step: checkpoint step; default the newest.
    overwrite: replace existing output files.
    plots: write the PNG and HTML.
    thumbnails: embed image thumbnails in the HTML (False keeps images out).
    tables: write the near-duplicate and outlier tables.
    duplicate_threshold: cosine distance of backbone features at or below
      which two images count as near-duplicates; None: a tenth of the
      median distance of an image to its nearest neighbour (byte-identical
      images are always reported).
    batch_size: images per inference step (default ``eval.batch_size``).
    mesh: device mesh (default: all devices).
    verbose: print what was written.
  Returns:
    dict: the arrays written to the .npz plus ``paths`` (the files written)
    and ``step``.
  """
  from jaxembed import plots as plots_lib  # pylint: disable=g-import-not-at-top
  from jaxembed import search  # pylint: disable=g-import-not-at-top
  from jaxembed import trainer  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  run = run_info(workdir)
  if out is None:
    name = "embeddings" if data is None else os.path.splitext(
        os.path.basename(os.path.normpath(str(data))))[0]
    out = os.path.join(workdir, "export", name + ".npz")
  if not str(out).endswith(".npz"):
    raise ValueError(f"--out {out!r} must end in .npz (the .csv and plots go beside it)")
  paths = output_paths(out)
  wanted = ["npz", "csv"] + (["png", "html"] if plots else []) + (
      ["duplicates", "outliers"] if tables else [])
  paths = {k: paths[k] for k in wanted}
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing[0]} exists{' (and more)' if len(existing) > 1 else ''}; "
                          "pass --overwrite to replace, or choose another --out")
  mesh = mesh or parallel.make_mesh()
  model, variables, config, step = trainer.load_trained(workdir, step, mesh=mesh)
  src = load_source(data, config, run)
  out_arrays = embed_images(model, variables, src["images"], config, mesh, batch_size)
  os.makedirs(os.path.dirname(os.path.abspath(paths["npz"])), exist_ok=True)
  arrays = workdir_lib.write_embeddings(paths["npz"], out_arrays, src["labels"], src["split"],
                                        src["ids"])
  labels = src["labels"]
  labelled = bool((np.asarray(labels) >= 0).any())
  # One feature-space search serves the duplicate table and the page's neighbour lists.
  knn = None
  if len(src["images"]) > 1 and (tables or plots):
    knn = search.self_neighbours(arrays["features"], min(10, len(src["images"]) - 1),
                                 metric="cosine", mesh=mesh)
  if tables:
    dup = search.near_duplicates(arrays["features"], threshold=duplicate_threshold, knn=knn,
                                 images=src["images"], ids=src["ids"],
                                 labels=labels if labelled else None, split=src["split"],
                                 mesh=mesh)
    search.write_table(paths["duplicates"], dup)
    if len(src["images"]) >= 2:
      outl = search.outliers(arrays["embedding"], labels if labelled else None,
                             k=config.eval.get("knn_k", 15), ids=src["ids"], mesh=mesh)
      search.write_table(paths["outliers"], outl)
    else:
      paths.pop("outliers")
  if plots:
    title = f"t-SimCNE {src['name']} (step {step}, {len(src['images'])} images)"
    plots_lib.scatter_png(paths["png"], arrays["embedding"], labels if labelled else None,
                          title=title, images=src["images"],
                          num_thumbnails=min(40, len(src["images"]) // 25))
    neighbours = knn[1] if knn is not None else None
    plots_lib.embedding_html(paths["html"], arrays["embedding"], labels if labelled else None,
                             src["ids"], src["split"],
                             images=src["images"] if thumbnails else None, title=title,
                             neighbours=neighbours, class_names=src["class_names"])
  if verbose:
    print(f"Embedded {len(src['images'])} images with the checkpoint at step {step}.")
    if tables:
      print(f"Near-duplicate pairs: {len(dup['i'])} ({int(dup['cross_split'].sum())} across "
            f"splits, {int(dup['label_conflict'].sum())} with different labels)")
    print("Wrote " + ", ".join(paths.values()), flush=True)
  return dict(arrays, paths=paths, step=step)


# ------------------------------------------------------------------------- CLI


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run directory written by jaxembed.train.")
  flags.DEFINE_string("data", None, "Images to embed: a folder, a .txt list of image paths, a "
                      ".npz (MedMNIST layout or 'images'), a .npy or an image file. Default: "
                      "the run's own train and test data.")
  flags.DEFINE_string("out", None, "Output .npz (a .csv, plots and tables go beside it); "
                      "default DIR/export/embeddings.npz or DIR/export/<data name>.npz.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.DEFINE_bool("plots", True, "Write the scatter PNG and the HTML page.")
  flags.DEFINE_bool("thumbnails", True, "Embed image thumbnails in the HTML page (--nothumbnails "
                    "keeps every image out of it, e.g. for patient data).")
  flags.DEFINE_bool("tables", True, "Write the near-duplicate and outlier tables.")
  flags.DEFINE_float("duplicate_threshold", None, "Cosine distance of backbone features at or "
                     "below which two images count as near-duplicates (default: a tenth of the "
                     "median nearest-neighbour distance; identical images are always listed).")
  flags.DEFINE_integer("batch_size", None, "Images per inference step (default: the run's "
                       "eval.batch_size).")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxembed import cli  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a run directory written by jaxembed.train)")
  if not os.path.isdir(f.workdir):
    cli.fail(f"--workdir {f.workdir}: no such directory")
  if f.batch_size is not None and f.batch_size < 1:
    cli.fail(f"--batch_size must be positive, got {f.batch_size}")
  parallel.initialize()
  export(f.workdir, data=f.data, out=f.out, step=f.step, overwrite=f.overwrite, plots=f.plots,
         thumbnails=f.thumbnails, tables=f.tables, duplicate_threshold=f.duplicate_threshold,
         batch_size=f.batch_size)


def run():
  from jaxembed import cli  # pylint: disable=g-import-not-at-top
  from jaxembed.data import DataError  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, user_errors=(ValueError, TypeError, KeyError, FileNotFoundError,
                             FileExistsError, workdir_lib.WorkdirError, DataError))


if __name__ == "__main__":
  run()
