"""What a user had before t-SimCNE, beside its map: PCA-2, t-SNE and UMAP of backbone features.

For a finished run, :func:`compute_baselines` embeds the run's images with
the backbone the run started from, the network of ``config.model.pretrained``
imported exactly as the trainer imports it (jaxembed.train_state.setup_stage
with ``load_pretrained=True``, the trainer's initialisation key), and takes
its pooled features. It maps them to 2-D with scikit-learn's PCA, t-SNE (PCA
to 50 dimensions first, perplexity 30, PCA initialisation) and UMAP
(umap-learn, the ``baselines`` extra; skipped with a note where it is not
installed), and scores every map and feature space like the trainer scores
t-SimCNE (DESIGN.md 3c), plus the similar-image search:

* kNN accuracy (k = ``eval.knn_k``) fitted on the train points and scored on
  the test points (``eval.protocol="paper"``: a stratified 10% hold-out of
  all points, random_state=0, as the trainer does);
* silhouette of the test points (of all points under the paper protocol);
* precision@10 of the search: for every scored point, the fraction of its 10
  nearest *other* points (of all the run's points, as ``jaxembed search
  --query ID`` answers) that carry its label.

Backbone features are compared by cosine distance (rows scaled to unit
length, as ``jaxembed search`` does), pixels and maps by Euclidean distance. PCA, t-SNE and
UMAP see train and test points together (transductive), which favours them
over t-SimCNE, whose test points were never trained on.

A run without ``model.pretrained`` has no "before": its own trained backbone
features stand in (labelled so), and the raw pixels are mapped as well, the
baseline of no network at all. :func:`write_outputs` writes baselines.json,
baselines.npz (every map) and baselines.png (the maps side by side). The
command line, ``jaxembed baselines``, is jaxembed.commands.baselines.
"""

import os
import platform
import sys
import time

import jax
import numpy as np
from sklearn import decomposition
from sklearn import manifold
from sklearn import model_selection

from jaxembed import configlib
from jaxembed import evaluate
from jaxembed import files
from jaxembed import parallel
from jaxembed import plots
from jaxembed import runs
from jaxembed import schedule
from jaxembed import search
from jaxembed import train_state
from jaxembed import workdir as workdir_lib
from jaxembed.data import pipeline

METHODS = ("pca", "tsne", "umap")
METHOD_NAMES = {"pca": "PCA-2", "tsne": "t-SNE", "umap": "UMAP"}
UMAP_EXTRA = 'pip install "jaxembed[baselines]"'
SEARCH_K = 10
TSNE_PCA_DIMS = 50
JSON_FILE = "baselines.json"
NPZ_FILE = "baselines.npz"
PNG_FILE = "baselines.png"


class MissingUmap(ImportError):
  """umap-learn is not installed; the message names the extra."""


def umap_module():
  """The ``umap`` module of umap-learn, or MissingUmap naming the extra to install."""
  try:
    # Deferred: umap imports numba and pynndescent (seconds), and is optional.
    import umap  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  except ImportError:
    raise MissingUmap(f"UMAP skipped: umap-learn is not installed ({UMAP_EXTRA})") from None
  return umap


# ------------------------------------------------------------------------- maps


def map_2d(x, method, seed=0):
  """A 2-D map of the rows of ``x`` by ``method`` ("pca", "tsne" or "umap"): (n, 2) float32."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) < 3:
    raise ValueError(f"a map needs an (n, d) array with n >= 3 rows, got shape {x.shape}")
  if method == "pca":
    return decomposition.PCA(2, random_state=seed).fit_transform(x).astype(np.float32)
  if method == "tsne":
    dims = min(TSNE_PCA_DIMS, *x.shape)
    if x.shape[1] > dims:  # the usual PCA to 50 dimensions before t-SNE
      x = decomposition.PCA(dims, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3.0)  # sklearn needs perplexity < n
    return manifold.TSNE(2, perplexity=perplexity, init="pca",
                         random_state=seed).fit_transform(x).astype(np.float32)
  if method == "umap":
    # Seeded, UMAP runs single-threaded (n_jobs=1 says so, without umap's warning).
    reducer = umap_module().UMAP(n_components=2, n_neighbors=min(15, len(x) - 1),
                                 random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), np.float32)
  raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


# ---------------------------------------------------------------------- metrics


def scoring_rows(labels, split, protocol="split"):
  """(fit rows, scored rows, silhouette rows) of the trainer's protocol, or a reason there are none.

  Returns:
    ``(rows, None)`` with ``rows`` a tuple of three int arrays, or ``(None,
    reason)`` when the labels do not allow the metrics (unlabelled or
    multi-label points, no test split, one class).
  """
  labels = np.asarray(labels)
  split = np.asarray(split).astype(str)
  if labels.ndim != 1:
    return None, "multi-label data: kNN accuracy, silhouette and precision@10 need one class " \
                 "per image"
  if not len(labels) or not (labels >= 0).all():
    return None, "no labels (or some unknown): kNN accuracy, silhouette and precision@10 skipped"
  if len(np.unique(labels)) < 2:
    return None, "one class only: the metrics need two or more"
  n = len(labels)
  if protocol == "paper":
    fit, scored = model_selection.train_test_split(np.arange(n), test_size=0.1, random_state=0,
                                                   stratify=labels)
    return (np.sort(fit), np.sort(scored), np.arange(n)), None
  fit, scored = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
  if not len(scored) or not len(fit):
    return None, "no train and test split: the metrics are fitted on train and scored on test"
  return (fit, scored, scored), None


def unit_rows(x):
  """Rows scaled to unit length (cosine distance ranks as Euclidean distance between them)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def precision_at_k(x, labels, queries, k=SEARCH_K, metric="euclidean"):
  """Mean fraction of the ``k`` nearest other rows of each query row that share its label.

  The search is jaxembed.search.nearest over all rows of ``x``; the query
  row itself is left out (an identical other row is not).
  """
  labels = np.asarray(labels)
  queries = np.asarray(queries, np.int64)
  k = min(k, len(x) - 1)
  if k < 1 or not len(queries):
    raise ValueError(f"precision@k needs k >= 1 other points and queries; got {len(x)} points "
                     f"and {len(queries)} queries")
  _, nb = search.nearest(x, np.asarray(x)[queries], k + 1, metric=metric)
  hits = []
  for q, row in zip(queries, nb):
    others = row[row != q][:k]
    hits.append(np.mean(labels[others] == labels[q]))
  return float(np.mean(hits))


def score(x, labels, rows, k, metric="euclidean", search_k=SEARCH_K):
  """kNN accuracy, silhouette and precision@``search_k`` of points ``x`` (see module docstring).

  Args:
    x: (n, d) points: a map or features.
    labels: (n,) int labels.
    rows: (fit rows, scored rows, silhouette rows) from :func:`scoring_rows`.
    k: kNN k (``eval.knn_k``).
    metric: "euclidean", or "cosine" (every metric on rows scaled to unit length).
  Returns:
    dict with ``knn_accuracy``, ``precision_at_{search_k}`` and, where the
    silhouette rows hold 2..n-1 classes, ``silhouette``.
  """
  x = np.asarray(x, np.float32)
  if metric == "cosine":
    x = unit_rows(x)
  labels = np.asarray(labels)
  fit, scored, sil = rows
  out = {"knn_accuracy": evaluate.knn_accuracy(x[fit], labels[fit], x[scored], labels[scored],
                                               k=min(k, len(fit)))}
  if 1 < len(np.unique(labels[sil])) < len(sil):
    out["silhouette"] = evaluate.silhouette_score(x[sil], labels[sil])
  out[f"precision_at_{search_k}"] = precision_at_k(x, labels, scored, search_k)
  return {key: round(float(v), 4) for key, v in out.items()}


# --------------------------------------------------------------- the backbone


def pretrained_features(config, run, images, mesh=None, pretrained=None):
  """Pooled backbone features of ``images`` from the network the run started from.

  The stage-1 model and variables are built as the trainer builds them for a
  new run (same initialisation key, ``config.model.pretrained`` imported
  into the backbone), and the images embedded in inference mode.

  Args:
    config: the run's config (config.json).
    run: the run record (jaxembed.runs.run_record).
    images: uint8 (N, S, S, C) images in the run's layout.
    mesh: device mesh (default: all devices).
    pretrained: another weight file to import instead of ``config.model.pretrained``.
  Returns:
    (N, D) float32 features.
  """
  if pretrained:
    config = config.copy_and_resolve_references()
    config.model.pretrained = str(pretrained)
  path = config.model.get("pretrained")
  if not path:
    raise ValueError("the run has no model.pretrained; pass --pretrained FILE")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.pretrained {path!r} not found (relative paths are taken from "
                            "the current directory); pass --pretrained FILE")
  mesh = mesh or parallel.make_mesh()
  spe = pipeline.steps_per_epoch(run["num_train"], config.batch_size)
  first = schedule.build_stages(configlib.stages(config), spe)[0]
  setup = train_state.setup_stage(
      config, first, mesh, spe, image_shape=run["image_shape"],
      key=jax.random.fold_in(jax.random.key(config.seed), 0), load_pretrained=True,
      with_step=False)
  variables = {"params": setup.state["params"], "batch_stats": setup.state["batch_stats"]}
  return np.asarray(runs.embed_images(setup.model, variables, images, config, mesh)["features"],
                    np.float32)


# --------------------------------------------------------------------- the run


def compute_baselines(workdir, methods=METHODS, pixels=None, pretrained=None, seed=0,
                      max_points=None, mesh=None, log=print):
  """Maps and metrics of a finished run and of its baselines (module docstring).

  Args:
    workdir: a finished training workdir (embeddings.npz and metrics.json).
    methods: some of ``METHODS``.
    pixels: also map the raw pixels; None: only when the run has no
      ``model.pretrained`` (and none is given).
    pretrained: a weight file to use instead of the run's ``model.pretrained``.
    seed: seed of PCA, t-SNE, UMAP and the subsample.
    max_points: score a random subsample of this many points (every map,
      t-SimCNE's too, on the same points); None: all.
    mesh: device mesh (default: all devices).
    log: called with each progress line.
  Returns:
    (record, maps, labels): the dict written to baselines.json, {row name:
    (n, 2) map} in the order of the figure, and the labels of the points.
  """
  t_start = time.perf_counter()
  methods = tuple(methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"--methods {','.join(methods)}: choose from {','.join(METHODS)}")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir}: no such directory")
  if not workdir_lib.is_complete(workdir):
    raise ValueError(f"{workdir} is not a finished run (no {workdir_lib.METRICS} or "
                     f"{workdir_lib.EMBEDDINGS}); train it to the end first")
  config = workdir_lib.load_config(workdir)
  run = runs.run_record(workdir)
  arrays, _ = runs.load_embeddings(workdir, with_images=False)
  train_metrics = workdir_lib.read_metrics(workdir)
  src = runs.load_source(None, config, run)
  ids = arrays["ids"].astype(str)
  if not np.array_equal(src["ids"], ids):
    raise ValueError(f"the data of {workdir}/config.json no longer matches its embeddings.npz "
                     "(other images or ids); baselines need the run's own images")
  labels, split = np.asarray(arrays["labels"]), arrays["split"].astype(str)
  images = src["images"]
  n_all = len(ids)
  keep = np.arange(n_all)
  if max_points is not None:
    if max_points < 10:
      raise ValueError(f"--max_points must be at least 10, got {max_points}")
    if max_points < n_all:
      keep = np.sort(np.random.default_rng(seed).choice(n_all, max_points, replace=False))
  labels, split, images, ids = labels[keep], split[keep], images[keep], ids[keep]
  protocol = config.eval.get("protocol", "split")
  k = int(config.eval.get("knn_k", 15))
  rows, no_metrics = scoring_rows(labels, split, protocol)
  notes = []
  if no_metrics:
    notes.append(no_metrics)

  # ---- the inputs: the backbone before training (or the trained one), pixels
  pretrained = pretrained or config.model.get("pretrained")
  spaces = []
  if pretrained:
    log(f"Embedding {len(images)} images with the imported backbone {pretrained} ...")
    t0 = time.perf_counter()
    feats = pretrained_features(config, run, images, mesh, pretrained)
    spaces.append({"key": "pretrained", "name": "imported backbone before training",
                   "short": "imported backbone", "x": feats,
                   "file": str(pretrained), "seconds": round(time.perf_counter() - t0, 1)})
  else:
    notes.append("the run has no model.pretrained, so there is no backbone from before "
                 "training: the run's own trained backbone features stand in, and the pixels "
                 "are mapped as well")
    spaces.append({"key": "trained", "name": "t-SimCNE backbone features (after training)",
                   "short": "trained backbone", "x": arrays["features"][keep], "seconds": None})
  if pixels or (pixels is None and not pretrained):
    spaces.append({"key": "pixels", "name": "pixels", "short": "pixels",
                   "x": images.reshape(len(images), -1).astype(np.float32) / 255.0,
                   "seconds": None})

  results, maps = [], {}

  def add(name, method, source, x, metric, seconds):
    entry = {"name": name, "method": method, "input": source, "dims": int(x.shape[1]),
             "metric": metric, "seconds": seconds}
    if rows is not None:
      entry.update(score(x, labels, rows, k, metric))
    results.append(entry)
    log(_row_text(entry))
    return entry

  # ---- t-SimCNE: its map and its search space
  tsimcne = add("t-SimCNE map", "t-SimCNE", "images (trained run)", arrays["embedding"][keep],
                "euclidean", train_metrics.get("train_seconds_this_invocation"))
  maps[tsimcne["name"]] = arrays["embedding"][keep]
  add("t-SimCNE backbone features", "features", "images (trained run)", arrays["features"][keep],
      "cosine", None)

  # ---- the baselines
  skipped = []
  for space in spaces:
    if space["key"] != "trained":
      add(f"{space['name']} ({space['x'].shape[1]}-d)", "features", space["name"], space["x"],
          "cosine" if space["key"] != "pixels" else "euclidean", space["seconds"])
    for method in methods:
      t0 = time.perf_counter()
      try:
        xy = map_2d(space["x"], method, seed)
      except MissingUmap as e:
        if str(e) not in skipped:
          skipped.append(str(e))
          log(str(e))
        continue
      name = f"{METHOD_NAMES[method]} of {space['short']}"
      add(name, METHOD_NAMES[method], space["name"], xy, "euclidean",
          round(time.perf_counter() - t0, 1))
      maps[name] = xy

  record = {
      "workdir": os.path.abspath(workdir), "data": src["name"],
      "n": int(len(ids)), "n_run": int(n_all),
      "n_train": int((split == "train").sum()), "n_test": int((split == "test").sum()),
      "labelled": rows is not None, "eval_protocol": protocol, "knn_k": k, "search_k": SEARCH_K,
      "protocol": ("kNN accuracy fitted on train points, scored on test points; silhouette of "
                   "the test points; precision@10: every test point searched among all other "
                   "points" if protocol != "paper" else
                   "paper: kNN accuracy on a stratified 10% hold-out of all points "
                   "(random_state=0), silhouette of all points, precision@10 of the hold-out "
                   "points searched among all other points")
                  + "; maps and pixels by Euclidean, backbone features by cosine distance; "
                  "PCA, t-SNE and UMAP fit "
                  "on train and test points together (transductive)",
      "backbone": {"kind": spaces[0]["key"], "name": spaces[0]["name"],
                   "file": spaces[0].get("file"), "dims": int(spaces[0]["x"].shape[1]),
                   "embed_seconds": spaces[0]["seconds"]},
      "t_simcne_metrics": {key: train_metrics[key] for key in ("knn_accuracy", "silhouette")
                           if key in train_metrics},
      "results": results, "notes": notes, "skipped": skipped,
      "class_names": list(src.get("class_names") or ()),
      "seconds": round(time.perf_counter() - t_start, 1),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"{jax.default_backend()} backend",
      "date": time.strftime("%Y-%m-%d"),
  }
  return record, maps, labels


def _row_text(entry):
  fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"  # noqa: E731
  seconds = entry.get("seconds")
  return (f"{entry['name']:<46} {entry['dims']:>5} {fmt(entry.get('knn_accuracy'))} "
          f"{fmt(entry.get('silhouette'))} {fmt(entry.get(f'precision_at_{SEARCH_K}'))} "
          f"{'' if seconds is None else seconds:>8}")


def table_header():
  return (f"{'space':<46} {'dims':>5} {'kNN acc':>8} {'silh.':>8} "
          f"{f'P@{SEARCH_K}':>8} {'seconds':>8}")


def output_paths(outdir):
  return {kind: os.path.join(outdir, name)
          for kind, name in (("json", JSON_FILE), ("npz", NPZ_FILE), ("png", PNG_FILE))}


def write_outputs(outdir, record, maps, labels):
  """Writes baselines.json, baselines.npz (each map under its row name) and baselines.png."""
  paths = output_paths(outdir)
  with files.atomic_open(paths["npz"], "wb") as f:
    np.savez_compressed(f, labels=np.asarray(labels),
                        **{name: np.asarray(xy, np.float32) for name, xy in maps.items()})
  by_name = {entry["name"]: entry for entry in record["results"]}
  panels = []
  for name, xy in maps.items():
    entry = by_name.get(name, {})
    parts = [f"kNN {entry['knn_accuracy']:.3f}"] if "knn_accuracy" in entry else []
    if "silhouette" in entry:
      parts.append(f"silh. {entry['silhouette']:.3f}")
    if f"precision_at_{SEARCH_K}" in entry:
      parts.append(f"P@{SEARCH_K} {entry[f'precision_at_{SEARCH_K}']:.3f}")
    panels.append((name + ("\n" + ", ".join(parts) if parts else ""), xy))
  labelled = record["labelled"] or bool((np.asarray(labels) >= 0).any())
  plots.maps_png(paths["png"], panels, labels if labelled else None,
                 class_names=record.get("class_names"),
                 title=f"{record['data']}: {record['n']} images" + (
                     "" if not record["labelled"] else
                     ", metrics on a 10% hold-out" if record["eval_protocol"] == "paper" else
                     f", metrics on {record['n_test']} test points"))
  files.write_json(paths["json"], dict(record, files=paths))
  return paths


if __name__ == "__main__":
  # The command line is jaxembed.commands.baselines, which imports this module once its flags
  # have parsed; `python -m jaxembed.baselines` is `jaxembed baselines`.
  from jaxembed import main  # pylint: disable=g-import-not-at-top
  sys.exit(main.run_command("baselines", prog="python -m jaxembed.baselines"))
