"""Embedding images with a trained run: any data in, coordinates, features, tables and plots out.

``export`` loads the newest (or the chosen) checkpoint of a workdir and
embeds the run's own train and test images or new images never seen in
training (a folder, a list of paths, an ``.npz``, a ``.npy`` or an image
file; resized and converted to the run's size and channels). It writes the
2-D coordinates, head outputs, backbone features, labels, splits and ids as
``.npz`` and ``.csv``, a scatter PNG, the interactive HTML page (coloured
by cluster where ``jaxembed cluster`` left its report in the workdir) and
the near-duplicate and outlier tables. Inference is batched, jitted and sharded
over all devices; a checkpoint written on GPUs loads on a CPU. The command
line, ``jaxembed export``, is jaxembed.commands.export.
"""

import csv
import json
import os
import sys

import numpy as np

from jaxembed import cluster as cluster_lib
from jaxembed import parallel
from jaxembed import plots as plots_lib
from jaxembed import runs
from jaxembed import search
from jaxembed import workdir as workdir_lib


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
  config = workdir_lib.load_config(workdir)
  run = runs.run_record(workdir)
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
  model, variables, config, step = runs.load_trained(workdir, step, mesh=mesh)
  src = runs.load_source(data, config, run)
  out_arrays = runs.embed_images(model, variables, src["images"], config, mesh, batch_size)
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
    clusters, clusters_title = None, None
    if data is None:  # a cluster report describes the run's own images
      clusters, clusters_title = cluster_colouring(workdir, src["ids"],
                                                   warn=print if verbose else None)
    plots_lib.embedding_html(paths["html"], arrays["embedding"], labels if labelled else None,
                             src["ids"], src["split"],
                             images=src["images"] if thumbnails else None, title=title,
                             neighbours=neighbours, class_names=src["class_names"],
                             clusters=clusters, clusters_title=clusters_title)
  if verbose:
    print(f"Embedded {len(src['images'])} images with the checkpoint at step {step}.")
    if tables:
      print(f"Near-duplicate pairs: {len(dup['i'])} ({int(dup['cross_split'].sum())} across "
            f"splits, {int(dup['label_conflict'].sum())} with different labels)")
    print("Wrote " + ", ".join(paths.values()), flush=True)
  return dict(arrays, paths=paths, step=step)


def cluster_colouring(workdir, ids, warn=None):
  """The clusters of ``jaxembed cluster``'s report in ``workdir`` for the rows ``ids``.

  Returns:
    ``(clusters, title)``: (N,) int clusters in the order of ``ids`` and a
    legend title naming the method and count, or ``(None, None)`` when the
    workdir holds no report or one of other images (``warn`` gets a line).
  """
  path = os.path.join(workdir, cluster_lib.ASSIGNMENTS_FILE)
  if not os.path.isfile(path):
    return None, None
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    by_id = {r["id"]: int(r["cluster"]) for r in rows}
  except (OSError, KeyError, ValueError, csv.Error) as e:
    if warn:
      warn(f"{path} unreadable ({e}); the page is coloured by label")
    return None, None
  ids = np.asarray(ids).astype(str)
  if len(by_id) != len(ids) or any(i not in by_id for i in ids):
    if warn:
      warn(f"{path} lists other images than the run's; the page is coloured by label (run "
           "jaxembed cluster again)")
    return None, None
  clusters = np.array([by_id[i] for i in ids], np.int64)
  title = "cluster"
  try:
    with open(os.path.join(workdir, cluster_lib.JSON_FILE)) as f:
      summary = json.load(f)["map"]
    title = f"{summary['method']} cluster ({summary['n_clusters']} clusters, jaxembed cluster)"
  except (OSError, KeyError, ValueError, TypeError):
    pass
  return clusters, title


if __name__ == "__main__":
  # The command line is jaxembed.commands.export, which imports this module once its flags
  # have parsed; `python -m jaxembed.export` is `jaxembed export`.
  from jaxembed import main  # pylint: disable=g-import-not-at-top
  sys.exit(main.run_command("export", prog="python -m jaxembed.export"))
