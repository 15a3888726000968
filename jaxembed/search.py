"""Finding images by similarity: exact nearest neighbours, near-duplicates and outliers of a run.

``nearest`` is an exact search by jaxembed.evaluate's kNN engine (the one
that scores the maps): candidates in float32 on the devices, the queries
split over the ``data`` mesh, re-ranked by float64 distances.
``near_duplicates`` and ``outliers`` build on it and return tables (dicts of
equal-length arrays) that ``write_table`` turns into CSV.

Command line::

  python -m jaxembed.search --workdir DIR --query IMAGE_OR_ID [--k 10]
      [--space features|embedding] [--metric cosine|euclidean]

embeds the query image with the run's model (or takes the stored vectors of
an id in ``embeddings.npz``), prints the ids and distances of its nearest
neighbours and saves a PNG strip of the query and its neighbours.
"""

import csv
import os

from absl import flags
import numpy as np

from jaxembed import cli
from jaxembed import evaluate
from jaxembed import files
from jaxembed import plots
from jaxembed import runs
from jaxembed import workdir as workdir_lib
from jaxembed.data import convert

METRICS = ("euclidean", "cosine")


# ------------------------------------------------------------------- kNN search


def _check_matrix(x, name):
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {x.shape}")
  if x.dtype.kind not in "iuf":
    raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
  x = x.astype(np.float32)
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or infinite values; remove those rows first")
  return x


def nearest(index_features, query_features, k=10, metric="euclidean", mesh=None,
            query_chunk=None):
  """The exact ``k`` nearest index rows of every query row.

  Uses the kNN engine of jaxembed.evaluate (float32 candidates on the
  devices, re-ranked by float64 distances on the host); cosine distances
  rank as Euclidean distances between rows scaled to unit length.

  Args:
    index_features: (n, d) array to search in.
    query_features: (m, d) queries.
    k: neighbours per query (at most n).
    metric: "euclidean" (distance) or "cosine" (1 - cosine similarity).
    mesh: the ``data`` mesh whose devices share the queries; default all devices.
    query_chunk: queries per device call; None keeps each block of distances
      near 64 MiB per device (1 GiB on accelerators).
  Returns:
    (distances, indices): (m, k) float32 and int64, nearest first.
  """
  return _search(index_features, query_features, k, metric, mesh, query_chunk,
                 exclude_self=False)


def self_neighbours(x, k, metric="euclidean", mesh=None):
  """The k nearest *other* rows of every row of x: (distances, indices), each (n, k).

  A row is never its own neighbour; an exact duplicate of it is (at distance 0).
  """
  return _search(x, x, min(k, len(x) - 1), metric, mesh, None, exclude_self=True)


def _search(index_features, query_features, k, metric, mesh, query_chunk, exclude_self):
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  x = _check_matrix(index_features, "index_features")
  q = _check_matrix(query_features, "query_features")
  if x.shape[1] != q.shape[1]:
    raise ValueError(f"index_features have {x.shape[1]} columns but query_features "
                     f"{q.shape[1]}; both must come from the same space")
  n = len(x) - bool(exclude_self)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an integer in [1, {n}] (the index size), got {k!r}")
  if len(q) == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  if metric == "cosine":
    x, q = _unit_rows(x), _unit_rows(q)
  d, i = evaluate.nearest(q, x, int(k), exclude_self=exclude_self, chunk_size=query_chunk,
                          mesh=mesh)
  if metric == "cosine":
    d = d * d / 2.0  # |a - b|^2 = 2 - 2 cos(a, b) for unit vectors
  return d.astype(np.float32), i


def _unit_rows(x):
  """Rows scaled to unit length (in float64), as float32; zero rows stay zero."""
  x = x.astype(np.float64)
  return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------ duplicates


def near_duplicates(features, threshold=None, metric="cosine", k=5, images=None, ids=None,
                    labels=None, split=None, mesh=None, relative_threshold=0.1, knn=None):
  """Pairs of near-identical images: exact copies and slightly altered ones.

  Candidates are each image's ``k`` nearest neighbours in ``features``; a
  pair is reported when its distance is at most ``threshold``. With
  ``images``, byte-identical copies are found by hashing as well, whatever
  their feature distance.

  Args:
    features: (n, d) backbone features (or any vectors).
    threshold: the largest distance that counts as a duplicate (cosine
      distance 1 - cos by default). None: ``relative_threshold`` times the
      median distance of an image to its nearest other image, which adapts
      to how spread out a model's features are.
    metric: "cosine" or "euclidean".
    k: neighbours examined per image.
    images: optional (n, ...) images, for the ``identical`` column and hashing.
    ids, labels, split: optional (n,) columns; labels may be (n, k) multi-label.
    mesh: device mesh for the search.
    relative_threshold: the fraction of the median nearest-neighbour
      distance used when ``threshold`` is None.
    knn: optional precomputed ``self_neighbours(features, k, metric)``
      (saves a search where the caller has one).
  Returns:
    A table (dict of equal-length arrays) sorted by distance: ``i``, ``j``
    (i < j), ``distance``, ``score`` (1 - distance for cosine, 1 / (1 +
    distance) for Euclidean), ``identical`` (byte-identical images),
    ``cross_split`` (the two sit in different splits: train/test leakage),
    ``label_conflict`` (their labels differ), and ``id_i``/``id_j``,
    ``label_i``/``label_j``, ``split_i``/``split_j`` where given.
  """
  x = _check_matrix(features, "features")
  n = len(x)
  if threshold is not None and not threshold >= 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}")
  pairs = {}
  if n >= 2:
    d, nb = knn if knn is not None else self_neighbours(x, min(k, n - 1), metric, mesh)
    if threshold is None:
      threshold = relative_threshold * float(np.median(d[:, 0]))
    for r, c in zip(*np.nonzero(d <= threshold)):
      a, b = sorted((int(r), int(nb[r, c])))
      pairs[(a, b)] = float(d[r, c])
  identical = set()
  if images is not None:
    images = np.asarray(images)
    if len(images) != n:
      raise ValueError(f"{len(images)} images for {n} feature rows; pass one image per row")
    groups = {}
    for idx in range(n):
      groups.setdefault(images[idx].tobytes(), []).append(idx)
    for members in groups.values():
      for a_pos, a in enumerate(members):
        for b in members[a_pos + 1:]:
          identical.add((a, b))
          if (a, b) not in pairs:
            pairs[(a, b)] = _distance(x[a], x[b], metric)
  keys = sorted(pairs, key=lambda p: (pairs[p], p))
  i = np.array([p[0] for p in keys], np.int64)
  j = np.array([p[1] for p in keys], np.int64)
  dist = np.array([pairs[p] for p in keys], np.float32)
  table = {"i": i, "j": j, "distance": dist,
           "score": (1.0 - dist) if metric == "cosine" else 1.0 / (1.0 + dist),
           "identical": np.array([p in identical for p in keys], bool)}
  if split is not None:
    split = np.asarray(split).astype(str)
    table["cross_split"] = split[i] != split[j]
  else:
    table["cross_split"] = np.zeros(len(i), bool)
  if labels is not None:
    labels = np.asarray(labels)
    lab = labels.reshape(len(labels), -1)
    table["label_conflict"] = (lab[i] != lab[j]).any(axis=1)
  else:
    table["label_conflict"] = np.zeros(len(i), bool)
  _add_columns(table, i, j, ids=ids, labels=labels, split=split)
  return table


def _distance(a, b, metric):
  if metric == "cosine":
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(1.0 - a @ b / max(na * nb, 1e-12))
  return float(np.linalg.norm(a - b))


def _add_columns(table, i, j, ids=None, labels=None, split=None):
  if ids is not None:
    ids = np.asarray(ids).astype(str)
    table["id_i"], table["id_j"] = ids[i], ids[j]
  if labels is not None:
    lab = files.label_strings(labels)
    table["label_i"], table["label_j"] = lab[i], lab[j]
  if split is not None:
    table["split_i"], table["split_j"] = split[i], split[j]


# -------------------------------------------------------------------- outliers


def outliers(embedding, labels=None, k=15, disagreement=0.5, isolation=3.0, ids=None,
             mesh=None):
  """Images whose 2-D neighbours disagree with their label, or that sit isolated on the map.

  Both are candidates for mislabels and artefacts. For every point the
  ``k`` nearest other points on the map are found. A labelled point is
  flagged ``label`` when more than ``disagreement`` of its neighbours carry
  another label (the majority of them one label that is not its own). A
  point is flagged ``isolated`` when its mean distance to its neighbours is
  more than ``isolation`` times the median of that over all points.

  Args:
    embedding: (n, 2) map (any (n, d) works).
    labels: optional (n,) int labels; -1 means unknown and is never flagged
      as a label disagreement. Multi-label (n, k) rows compare as a whole.
    k: neighbours per point (the reference's kNN k, 15).
    disagreement: fraction of neighbours with another label above which a
      point is flagged.
    isolation: ratio of the mean neighbour distance to its median above
      which a point is flagged.
    ids: optional (n,) ids, copied into the table.
    mesh: device mesh for the search.
  Returns:
    A table (dict of arrays) of the flagged points sorted by ``score``
    (highest first): ``index``, ``score`` in [0, 1] (the disagreeing
    fraction for label flags, 1 - 1/ratio for isolation; the larger where
    both apply), ``reason`` (text), ``disagreement`` (fraction), ``isolation``
    (ratio), ``neighbour_label`` (the most common neighbour label, -1 without
    labels) and ``label``/``id`` where given.
  """
  x = _check_matrix(embedding, "embedding")
  n = len(x)
  if n < 2:
    raise ValueError(f"outliers need at least 2 points, got {n}")
  k = min(k, n - 1)
  dist, nb = self_neighbours(x, k, "euclidean", mesh)
  mean_d = dist.mean(axis=1)
  ratio = mean_d / max(float(np.median(mean_d)), 1e-12)
  frac = np.zeros(n, np.float32)
  nb_label = np.full(n, -1, np.int64)
  known = np.zeros(n, bool)
  label_strs = None
  if labels is not None:
    labels = np.asarray(labels)
    if len(labels) != n:
      raise ValueError(f"{len(labels)} labels for {n} points; pass one label per point")
    label_strs = files.label_strings(labels)
    codes = np.unique(label_strs, return_inverse=True)[1].reshape(-1)
    known = (labels.reshape(n, -1) >= 0).all(axis=1)
    frac = (codes[nb] != codes[:, None]).mean(axis=1).astype(np.float32)
    votes = np.zeros((n, codes.max() + 1), np.int32)
    np.add.at(votes, (np.repeat(np.arange(n), k), codes[nb].reshape(-1)), 1)
    nb_label = votes.argmax(axis=1)  # the most common neighbour label (lowest on ties)
    # Report the neighbours' majority label in the user's terms where single-label.
    if labels.ndim == 1:
      code_to_label = np.zeros(codes.max() + 1, labels.dtype)
      code_to_label[codes] = labels
      nb_label = code_to_label[nb_label]
  # More than half disagreeing means the own label is not the neighbours' majority.
  flag_label = known & (frac > disagreement)
  flag_iso = ratio > isolation
  score = np.maximum(np.where(flag_label, frac, 0.0),
                     np.where(flag_iso, 1.0 - 1.0 / np.maximum(ratio, 1e-12), 0.0))
  flagged = np.flatnonzero(flag_label | flag_iso)
  flagged = flagged[np.lexsort((flagged, -score[flagged]))]
  reasons = []
  for r in flagged:
    parts = []
    if flag_label[r]:
      parts.append(f"label {label_strs[r]}: {int(round(frac[r] * k))}/{k} map neighbours "
                   f"differ (mostly {nb_label[r]})")
    if flag_iso[r]:
      parts.append(f"isolated: neighbours {ratio[r]:.1f}x farther than typical")
    reasons.append("; ".join(parts))
  table = {"index": flagged.astype(np.int64), "score": score[flagged].astype(np.float32),
           "reason": np.array(reasons, dtype=str).reshape(-1),
           "disagreement": frac[flagged], "isolation": ratio[flagged].astype(np.float32),
           "neighbour_label": nb_label[flagged]}
  if labels is not None:
    table["label"] = label_strs[flagged]
  if ids is not None:
    table["id"] = np.asarray(ids).astype(str)[flagged]
  return table


# ---------------------------------------------------------------------- tables


def write_table(path, table):
  """Writes a table (dict of equal-length 1-D arrays) as CSV, atomically."""
  cols = list(table)
  n = len(table[cols[0]]) if cols else 0
  with files.atomic_open(path, "w") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in range(n):
      row = []
      for c in cols:
        v = table[c][r]
        if isinstance(v, (float, np.floating)):
          row.append(f"{float(v):.6g}")
        elif isinstance(v, (bool, np.bool_)):
          row.append(str(bool(v)).lower())
        else:
          row.append(str(v))
      w.writerow(row)


# ------------------------------------------------------------------------- CLI


def _define_flags():
  flags.DEFINE_string("workdir", None, "Run directory written by jaxembed.train.")
  flags.DEFINE_string("query", None, "Image file (PNG, JPEG, ...), .npy of one image, or an id "
                      "from the embeddings file.")
  flags.DEFINE_integer("k", 10, "Number of neighbours.")
  flags.DEFINE_enum("space", "features", ["features", "embedding"],
                    "Search in backbone-feature space or on the 2-D map.")
  flags.DEFINE_enum("metric", None, list(METRICS),
                    "Distance; default cosine for features, euclidean for the map.")
  flags.DEFINE_string("embeddings", None, "Embeddings file to search (default "
                      "DIR/embeddings.npz, or one written by jaxembed.export).")
  flags.DEFINE_string("data", None, "Data source of the embeddings file's images, for the "
                      "picture (default: the run's data).")
  flags.DEFINE_string("out", None, "PNG strip of the query and its neighbours (default "
                      "DIR/search/<query>.png).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a run directory written by jaxembed.train)")
  if not f.query:
    cli.fail("--query is required: an image file, a .npy image, or an id from embeddings.npz")
  emb_path = f.embeddings or os.path.join(f.workdir, "embeddings.npz")
  if not os.path.isfile(emb_path):
    cli.fail(f"{emb_path} not found; train the run to the end or run jaxembed.export first "
             "(or pass --embeddings)")
  with np.load(emb_path, allow_pickle=False) as z:
    stored = {key: z[key] for key in z.files}
  ids = stored["ids"].astype(str)
  key = "features" if f.space == "features" else "embedding"
  metric = f.metric or ("cosine" if f.space == "features" else "euclidean")
  index = stored[key]
  k = min(f.k, len(index) - 1 if f.query in ids else len(index))
  if k < 1:
    cli.fail(f"--k must be >= 1, got {f.k}")
  query_image = None
  model_step = ""
  if f.query in ids and not os.path.exists(f.query):
    q_row = int(np.flatnonzero(ids == f.query)[0])
    query = index[q_row][None]
    d, nb = nearest(index, query, k + 1, metric=metric)
    keep = nb[0] != q_row
    d, nb = d[0][keep][:k], nb[0][keep][:k]
  else:
    q_row = None
    if not os.path.exists(f.query):
      cli.fail(f"--query {f.query!r} is neither a file nor an id in {emb_path} "
               f"(ids look like {ids[0]!r})")
    model, variables, config, step = runs.load_trained(f.workdir, f.step)
    model_step = f", query embedded with the checkpoint at step {step}"
    query_image = runs.read_query_image(f.query, config, runs.run_record(f.workdir))
    out = runs.embed_images(model, variables, query_image, config)
    query = out["features"] if f.space == "features" else out["z"][:, :2]
    if query.shape[1] != index.shape[1]:
      cli.fail(f"the model's {f.space} have {query.shape[1]} dimensions but {emb_path} has "
               f"{index.shape[1]}; was it written by this run?")
    d, nb = nearest(index, query, k, metric=metric)
    d, nb = d[0], nb[0]
    query_image = query_image[0]
  print(f"query: {f.query}  ({f.space}, {metric}, {len(index)} images{model_step})")
  print(f"{'rank':>4}  {'distance':>10}  {'label':>6}  {'split':>6}  id")
  labels = stored.get("labels")
  lab = files.label_strings(labels) if labels is not None else [""] * len(ids)
  split = stored.get("split", np.array([""] * len(ids))).astype(str)
  for r, (dist, j) in enumerate(zip(d, nb), 1):
    print(f"{r:>4}  {dist:>10.5f}  {lab[j]:>6}  {split[j]:>6}  {ids[j]}")
  # The picture: the images behind the ids.
  try:
    images_by_id = runs.images_for_ids(f.workdir, [ids[j] for j in nb]
                                       + ([ids[q_row]] if q_row is not None else []),
                                       data=f.data)
  except (ValueError, OSError) as e:
    print(f"warning: no picture: cannot load the images ({e})", flush=True)
    return
  if q_row is not None:
    query_image = images_by_id[ids[q_row]]
  name = os.path.splitext(os.path.basename(str(f.query)))[0] or "query"
  name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
  out_png = f.out or os.path.join(f.workdir, "search", f"{name}.png")
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  plots.neighbour_strip(out_png, query_image, [images_by_id[ids[j]] for j in nb],
                        [f"{dist:.3g} / {lab[j]}" for dist, j in zip(d, nb)])
  print(f"Picture of the query and its neighbours: {out_png}")


def run():
  _define_flags()
  cli.run(main, user_errors=(ValueError, TypeError, KeyError, FileNotFoundError,
                             workdir_lib.WorkdirError, convert.DataError))


if __name__ == "__main__":
  run()
