"""Clusters on a map (or on backbone features), scored against labels and explained with images.

People who map an unlabelled collection next ask which groups there are and
what they are. This module answers with scikit-learn's estimators, seeded so
that a run repeats exactly:

* ``gmm``: :class:`sklearn.mixture.GaussianMixture`; the number of components
  is the minimum of the Bayesian information criterion (BIC, Schwarz 1978)
  over ``k_range`` unless ``n_clusters`` is given.
* ``kmeans``: :class:`sklearn.cluster.KMeans`; k is given, or chosen over
  ``k_range`` by the silhouette (default) or by the BIC of k spherical
  Gaussians with one shared variance (the X-means criterion, Pelleg and Moore
  2000).
* ``hdbscan``: :class:`sklearn.cluster.HDBSCAN`; the number of clusters follows
  from the density, and points in no cluster are noise (assignment -1).

Against labels it computes the adjusted Rand index, normalised mutual
information, purity and the cluster x class contingency table; to explain the
clusters it picks, per cluster, the members nearest its centre and members at
its border. :func:`write_cluster_report` writes all of it into a directory
(``clusters.json``, ``cluster_contingency.csv``, ``cluster_assignments.csv``,
``cluster_sheet.png``, ``cluster_map.png``). See docs/cluster.md.

The command line, ``jaxembed cluster --workdir DIR`` (or ``python -m
jaxembed.cluster``), is jaxembed.commands.cluster.

Cluster numbers are ordered by size (0 is the largest), so that they do not
depend on the estimator's internal order.
"""

import contextlib
import csv
import dataclasses
import io
import os
import sys

import matplotlib
from matplotlib import figure
import numpy as np
from PIL import Image
from sklearn import cluster as sk_cluster
from sklearn import decomposition
from sklearn import metrics
from sklearn import mixture
import threadpoolctl

from jaxembed import files
from jaxembed import plots

METHODS = ("gmm", "kmeans", "hdbscan")
CRITERIA = {"gmm": ("bic",), "kmeans": ("silhouette", "bic"), "hdbscan": ()}

# File names written by write_cluster_report.
JSON_FILE = "clusters.json"
CONTINGENCY_FILE = "cluster_contingency.csv"
ASSIGNMENTS_FILE = "cluster_assignments.csv"
SHEET_FILE = "cluster_sheet.png"
MAP_FILE = "cluster_map.png"

# Points used to choose k (BIC/silhouette curve) when there are more: the
# curve's minimum is stable long before every point is used, and the final
# model is then fit on all points with the chosen k.
_MAX_SELECT_POINTS = 20000
# Points used for one silhouette evaluation (it is O(n^2)).
_SILHOUETTE_SAMPLE = 4000
# Inputs with at most this many values (N * D) are clustered on one thread.
_SINGLE_THREAD_MAX_VALUES = 500_000


@dataclasses.dataclass
class ClusterResult:
  """A fitted clustering of N points.

  Attributes:
    method: "gmm", "kmeans" or "hdbscan".
    assignments: (N,) int cluster of each point, 0..n_clusters-1 ordered by
      size (0 largest); -1 marks HDBSCAN noise.
    centres: (n_clusters, D) float centre of each cluster (GMM means, k-means
      centroids, the mean of the members for HDBSCAN).
    confidence: (N,) float in [0, 1], how firmly a point belongs to its
      cluster: the GMM posterior of its component; for k-means
      ``1 - d_own / d_second`` (0 half-way between two centres); the HDBSCAN
      membership probability (0 for noise). Low values mark the border.
    k: the chosen (or given) number of components; for HDBSCAN the number of
      clusters found.
    n_clusters: clusters with at least one member (a GMM component can end
      up owning no point, so this can be below ``k``).
    criterion: how k was chosen: "bic", "silhouette", "given" or "density".
    k_values: the candidate k of the selection curve, or None.
    bic: BIC per candidate (lower is better), or None.
    silhouette: silhouette per candidate (higher is better), or None.
    select_points: points the curve was computed on (a seeded subsample of
      at most 20,000), or None.
    seed: the random seed.
    dims: the number of dimensions clustered.
  """
  method: str
  assignments: np.ndarray
  centres: np.ndarray
  confidence: np.ndarray
  k: int
  n_clusters: int
  criterion: str
  k_values: np.ndarray = None
  bic: np.ndarray = None
  silhouette: np.ndarray = None
  select_points: int = None
  seed: int = 0
  dims: int = 0

  @property
  def sizes(self):
    """(n_clusters,) number of members of each cluster (noise not counted)."""
    return np.bincount(self.assignments[self.assignments >= 0], minlength=self.n_clusters)

  @property
  def noise_fraction(self):
    return float(np.mean(self.assignments < 0))

  def to_dict(self):
    """JSON-ready summary (without the per-point arrays)."""
    curve = None
    if self.k_values is not None:
      curve = {"k": self.k_values.tolist()}
      if self.bic is not None:
        curve["bic"] = [float(v) for v in self.bic]
      if self.silhouette is not None:
        curve["silhouette"] = [float(v) for v in self.silhouette]
    return {
        "method": self.method, "k": int(self.k), "n_clusters": int(self.n_clusters),
        "criterion": self.criterion, "seed": int(self.seed), "dims": int(self.dims),
        "sizes": self.sizes.tolist(), "noise_fraction": self.noise_fraction,
        "selection_curve": curve, "select_points": self.select_points,
        "centres": np.round(self.centres, 6).tolist() if self.dims <= 8 else None,
    }


# ----------------------------------------------------------------- checks


def _check_points(x, name="x"):
  """x as a finite float64 (N, D) array, or a ValueError/TypeError saying what is wrong."""
  try:
    arr = np.asarray(x)
  except Exception as e:  # ragged lists and the like
    raise TypeError(f"{name} must be a numeric (N, D) array; could not convert it ({e})") from e
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                 or np.issubdtype(arr.dtype, np.bool_)):
    raise TypeError(f"{name} must be a numeric (N, D) array, got dtype {arr.dtype}")
  if arr.ndim != 2:
    hint = " (for one feature use x[:, None])" if arr.ndim == 1 else ""
    raise ValueError(f"{name} must be a 2-D (N, D) array of N points, got shape {arr.shape}{hint}")
  if arr.shape[1] == 0:
    raise ValueError(f"{name} has shape {arr.shape}: points need at least one dimension")
  if arr.shape[0] < 3:
    raise ValueError(f"too few points to cluster: {name} has {arr.shape[0]} rows, need at least 3")
  arr = arr.astype(np.float64)
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise ValueError(f"{name} has {len(rows)} row(s) with NaN or infinite values (first at row "
                     f"{rows[0]}); drop or repair them before clustering")
  return arr


def _check_int(value, name, minimum):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {value}")
  return int(value)


def _candidate_ks(k_range, n, method, criterion):
  """The k to try: k_range (inclusive) clipped to below the number of points."""
  try:
    lo, hi = k_range
  except (TypeError, ValueError) as e:
    raise ValueError(f"k_range must be a pair (k_min, k_max), got {k_range!r}") from e
  lo = _check_int(lo, "k_range[0]", 1)
  hi = _check_int(hi, "k_range[1]", 1)
  if hi < lo:
    raise ValueError(f"k_range must have k_min <= k_max, got {k_range!r}")
  if criterion == "silhouette" and lo < 2:
    raise ValueError(f"the silhouette needs at least 2 clusters; use k_range=(2, {hi}) or "
                     "criterion='bic'")
  # Each candidate needs fewer clusters than points; larger k are dropped.
  hi = min(hi, n - 1)
  if hi < lo:
    raise ValueError(f"too few points ({n}) for k_range {tuple(k_range)}: {method} needs more "
                     f"points than clusters; lower k_range or add points")
  return np.arange(lo, hi + 1)


# ------------------------------------------------------------------ fitting


def fit_clusters(x, method="gmm", n_clusters=None, k_range=(2, 20), seed=0, *, criterion=None,
                 covariance_type="full", min_cluster_size=None, min_samples=None, n_init=None,
                 max_select_points=_MAX_SELECT_POINTS):
  """Clusters N points with a seeded scikit-learn estimator.

  Args:
    x: (N, D) points, e.g. the 2D map or backbone features; finite values.
    method: "gmm" (Gaussian mixture, k by BIC), "kmeans" or "hdbscan".
    n_clusters: a fixed number of clusters for gmm/kmeans; None chooses it
      over ``k_range``. Not used by hdbscan (set ``min_cluster_size``).
    k_range: (k_min, k_max), inclusive, the candidates when choosing k; k_max
      is lowered to N-1 where there are fewer points.
    seed: random seed of the estimators and of any subsampling.
    criterion: how to choose k: gmm "bic"; kmeans "silhouette" (default) or
      "bic" (spherical, shared variance).
    covariance_type: GaussianMixture's ("full", "tied", "diag", "spherical").
    min_cluster_size: HDBSCAN's smallest cluster; default max(5, N // 100).
    min_samples: HDBSCAN's density neighbourhood; default min_cluster_size.
    n_init: initialisations per fit (best kept); default 1 for gmm, 3 for
      kmeans.
    max_select_points: points (a seeded subsample) used for the selection
      curve; the final model is fit on all points.

  Returns:
    A :class:`ClusterResult`.

  Raises:
    ValueError/TypeError: bad shapes, NaNs, too few points, unknown method or
      criterion, or arguments that the method does not use.
  """
  if method not in METHODS:
    raise ValueError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")
  x = _check_points(x)
  with _threads_for(x.size):
    return _fit(x, method, n_clusters, k_range, seed, criterion, covariance_type,
                min_cluster_size, min_samples, n_init, max_select_points)


def _threads_for(size):
  """One BLAS/OpenMP thread for small inputs, the library default for large ones.

  On small data (a few thousand points) thread start-up and contention cost
  more than the work: on the shared 2-core test machine, choosing k for 600
  points took 16 s with default threads and 1.1 s with one.
  """
  if size > _SINGLE_THREAD_MAX_VALUES:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1)


def _fit(x, method, n_clusters, k_range, seed, criterion, covariance_type, min_cluster_size,
         min_samples, n_init, max_select_points):
  """fit_clusters after the input checks."""
  n, d = x.shape
  seed = _check_int(seed, "seed", 0)
  if method == "hdbscan":
    if n_clusters is not None:
      raise ValueError("hdbscan finds the number of clusters itself; leave n_clusters=None and "
                       "set min_cluster_size, or use method='gmm' or 'kmeans'")
    if criterion is not None:
      raise ValueError("hdbscan takes no criterion; leave criterion=None")
    return _fit_hdbscan(x, seed, min_cluster_size, min_samples)
  if criterion is None:
    criterion = CRITERIA[method][0]
  if criterion not in CRITERIA[method]:
    raise ValueError(f"unknown criterion {criterion!r} for {method}; use one of "
                     f"{', '.join(CRITERIA[method])}")
  if n_init is None:
    n_init = 1 if method == "gmm" else 3
  n_init = _check_int(n_init, "n_init", 1)
  make = _gmm_factory(covariance_type, seed, n_init) if method == "gmm" else _kmeans_factory(
      seed, n_init)

  curve = {}
  sub_n = None
  if n_clusters is not None:
    k = _check_int(n_clusters, "n_clusters", 1)
    if k >= n:
      raise ValueError(f"too few points ({n}) for n_clusters={k}; need more points than clusters")
    model = make(k).fit(x)
    criterion = "given"
  else:
    ks = _candidate_ks(k_range, n, method, criterion)
    xs = x
    if n > max_select_points:
      rng = np.random.default_rng(seed)
      xs = x[np.sort(rng.choice(n, max_select_points, replace=False))]
      sub_n = len(xs)
    models, scores = [], []
    for kk in ks:
      m = make(int(kk)).fit(xs)
      models.append(m)
      scores.append(_score(m, xs, method, criterion, seed))
    scores = np.asarray(scores)
    best = int(np.argmax(scores) if criterion == "silhouette" else np.argmin(scores))
    k = int(ks[best])
    curve = {"k_values": ks, criterion: scores, "select_points": sub_n}
    model = models[best] if sub_n is None else make(k).fit(x)

  if method == "gmm":
    assign = model.predict(x)
    confidence = model.predict_proba(x).max(axis=1)
    centres = model.means_
  else:
    dist = model.transform(x)  # Euclidean distances to every centre
    assign = dist.argmin(axis=1)
    confidence = _margin_confidence(dist, assign)
    centres = model.cluster_centers_
  assign, centres = _order_by_size(np.asarray(assign), np.asarray(centres))
  return ClusterResult(
      method=method, assignments=assign, centres=centres, confidence=confidence, k=k,
      n_clusters=len(centres), criterion=criterion, k_values=curve.get("k_values"),
      bic=curve.get("bic"), silhouette=curve.get("silhouette"),
      select_points=curve.get("select_points"), seed=seed, dims=d)


def _gmm_factory(covariance_type, seed, n_init):
  if covariance_type not in ("full", "tied", "diag", "spherical"):
    raise ValueError(f"unknown covariance_type {covariance_type!r}; use 'full', 'tied', 'diag' "
                     "or 'spherical'")
  # reg_covar above sklearn's 1e-6: tight map islands otherwise give
  # near-singular covariances and runaway likelihoods for large k.
  return lambda k: mixture.GaussianMixture(
      n_components=k, covariance_type=covariance_type, random_state=seed, n_init=n_init,
      reg_covar=1e-5, max_iter=300)


def _kmeans_factory(seed, n_init):
  return lambda k: sk_cluster.KMeans(n_clusters=k, n_init=n_init, random_state=seed)


def _score(model, x, method, criterion, seed):
  if method == "gmm":
    return model.bic(x)
  labels = model.labels_
  if criterion == "bic":
    return kmeans_bic(x, labels, model.cluster_centers_)
  if len(np.unique(labels)) < 2:
    return -1.0  # the silhouette's lowest value: a single cluster explains nothing
  sample = min(len(x), _SILHOUETTE_SAMPLE)
  return metrics.silhouette_score(x, labels, sample_size=sample if sample < len(x) else None,
                                  random_state=seed)


def kmeans_bic(x, assignments, centres):
  """BIC of a hard clustering as k spherical Gaussians with one shared variance (lower is better).

  The model behind k-means (Pelleg and Moore 2000, X-means): mixture weights
  n_c/N, means at the centres and one variance per dimension, its maximum
  likelihood value SSE/(N D). The log-likelihood of the hard assignment is
  ``sum_c n_c log(n_c/N) - N D/2 log(2 pi var) - N D/2``, and the
  ``(k-1) + k D + 1`` parameters cost ``log N`` each.
  """
  x = np.asarray(x, np.float64)
  assignments = np.asarray(assignments)
  centres = np.asarray(centres, np.float64)
  n, d = x.shape
  k = len(centres)
  sse = float(np.sum((x - centres[assignments]) ** 2))
  var = max(sse / (n * d), 1e-12)
  counts = np.bincount(assignments, minlength=k)
  counts = counts[counts > 0]
  loglik = float(np.sum(counts * np.log(counts / n))) - 0.5 * n * d * (np.log(2 * np.pi * var) + 1)
  n_params = (k - 1) + k * d + 1
  return -2.0 * loglik + n_params * np.log(n)


def _margin_confidence(dist, assign):
  """1 - d_own / d_second for each point (1 at a centre, 0 half-way between two)."""
  if dist.shape[1] < 2:
    return np.ones(len(dist))
  own = dist[np.arange(len(dist)), assign]
  other = dist.copy()
  other[np.arange(len(dist)), assign] = np.inf
  second = other.min(axis=1)
  return np.clip(1.0 - own / np.maximum(second, 1e-300), 0.0, 1.0)


def _fit_hdbscan(x, seed, min_cluster_size, min_samples):
  n = len(x)
  if min_cluster_size is None:
    # About 1% of the points: digits' 1,797 points give 17, far below a class
    # (~180) yet above chance clumps; a fixed small value splinters big maps.
    min_cluster_size = max(5, n // 100)
  min_cluster_size = _check_int(min_cluster_size, "min_cluster_size", 2)
  if min_cluster_size > n:
    raise ValueError(f"too few points ({n}) for min_cluster_size={min_cluster_size}")
  if min_samples is not None:
    min_samples = _check_int(min_samples, "min_samples", 1)
  model = sk_cluster.HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True)
  # HDBSCAN is deterministic; the seed is recorded for the report only.
  assign = model.fit_predict(x)
  k = int(assign.max()) + 1 if (assign >= 0).any() else 0
  centres = np.stack([x[assign == c].mean(axis=0) for c in range(k)]) if k else np.zeros((0, x.shape[1]))
  assign, centres = _order_by_size(assign, centres)
  confidence = np.where(assign >= 0, model.probabilities_, 0.0)
  return ClusterResult(method="hdbscan", assignments=assign, centres=centres,
                       confidence=confidence, k=len(centres), n_clusters=len(centres),
                       criterion="density", seed=seed, dims=x.shape[1])


def _order_by_size(assign, centres):
  """Renumbers clusters by decreasing size (ties: lower old number first); drops empty ones."""
  counts = np.bincount(assign[assign >= 0], minlength=len(centres))
  order = np.lexsort((np.arange(len(centres)), -counts))
  order = order[counts[order] > 0]
  new = np.full(len(centres), -1, np.int64)
  new[order] = np.arange(len(order))
  out = np.where(assign >= 0, new[np.maximum(assign, 0)], -1).astype(np.int64)
  return out, np.asarray(centres, np.float64)[order]


# ------------------------------------------------------------------ scoring


def _label_keys(labels, n):
  """Labels as (N,) hashable keys; multi-label rows become their set bits joined by ';'."""
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim == 2:
    labels = np.array([";".join(str(j) for j in np.flatnonzero(row)) or "none" for row in labels])
  if labels.ndim != 1 or len(labels) != n:
    raise ValueError(f"labels must have shape ({n},) (or ({n}, k) multi-label), one per point; "
                     f"got shape {np.asarray(labels).shape}")
  return labels


def contingency_table(assignments, labels):
  """Counts of each (cluster, class) pair.

  Returns:
    (clusters, classes, table): the sorted cluster numbers (noise -1 last),
    the sorted classes, and an int (len(clusters), len(classes)) table.
  """
  assignments = np.asarray(assignments)
  labels = _label_keys(labels, len(assignments))
  clusters, ci = np.unique(assignments, return_inverse=True)
  classes, li = np.unique(labels, return_inverse=True)
  table = np.zeros((len(clusters), len(classes)), np.int64)
  np.add.at(table, (ci.ravel(), li.ravel()), 1)
  if len(clusters) and clusters[0] < 0:  # noise to the bottom row
    clusters = np.roll(clusters, -1)
    table = np.roll(table, -1, axis=0)
  return clusters, classes, table


def cluster_metrics(assignments, labels):
  """Agreement of a clustering with labels.

  ARI and NMI (scikit-learn, arithmetic normalisation) count HDBSCAN noise as
  one more group; purity (the share of points whose cluster's most common
  class is their own) counts noise points as wrong. The same three scores
  over the clustered points only are under "clustered" where there is noise.
  Multi-label rows are compared as label combinations.
  """
  assignments = np.asarray(assignments)
  labels = _label_keys(labels, len(assignments))

  def scores(a, y):
    clusters, _, table = contingency_table(a, y)
    majority = table[clusters >= 0].max(axis=1).sum() if (clusters >= 0).any() else 0
    return {"ari": float(metrics.adjusted_rand_score(y, a)),
            "nmi": float(metrics.normalized_mutual_info_score(y, a)),
            "purity": float(majority / len(a))}

  out = scores(assignments, labels)
  out["n_points"] = int(len(assignments))
  out["n_classes"] = int(len(np.unique(labels)))
  out["noise_fraction"] = float(np.mean(assignments < 0))
  keep = assignments >= 0
  if not keep.all() and keep.sum() >= 2:
    out["clustered"] = scores(assignments[keep], labels[keep])
  return out


# --------------------------------------------------------------- explaining


def describe_clusters(result, x, labels=None, n_central=8, n_border=4, n_top_labels=3):
  """Per cluster: size, most common labels, members nearest the centre and at the border.

  ``x`` is the (N, D) data that was clustered. "Nearest the centre" is by
  Euclidean distance to the cluster's centre; "at the border" are the members
  of lowest ``result.confidence`` (closest to another cluster, or least dense
  for HDBSCAN) that are not already among the central ones. Noise (if any)
  is described last with ``cluster=-1``, a seeded random sample of it as
  "central" and no border.

  Returns:
    A list of dicts: cluster, size, fraction, top_labels [(label, count,
    fraction)], central (indices), border (indices).
  """
  x = np.asarray(x, np.float64)
  assign = result.assignments
  keys = None if labels is None else _label_keys(labels, len(assign))
  out = []
  groups = list(range(result.n_clusters)) + ([-1] if (assign < 0).any() else [])
  for c in groups:
    members = np.flatnonzero(assign == c)
    entry = {"cluster": int(c), "size": int(len(members)),
             "fraction": float(len(members) / len(assign))}
    if keys is not None:
      vals, counts = np.unique(keys[members], return_counts=True)
      order = np.lexsort((vals, -counts))[:n_top_labels]
      entry["top_labels"] = [(_plain(vals[i]), int(counts[i]), float(counts[i] / len(members)))
                             for i in order]
    if c >= 0:
      dist = np.linalg.norm(x[members] - result.centres[c], axis=1)
      central = members[np.argsort(dist, kind="stable")[:n_central]]
      rest = np.setdiff1d(members, central)
      border = rest[np.argsort(result.confidence[rest], kind="stable")[:n_border]]
    else:
      rng = np.random.default_rng(result.seed)
      central = np.sort(rng.choice(members, min(len(members), n_central), replace=False))
      border = np.zeros(0, np.int64)
    entry["central"] = central.tolist()
    entry["border"] = border.tolist()
    out.append(entry)
  return out


def _plain(v):
  """A NumPy scalar as a plain Python value (int where it is one) for JSON."""
  v = v.item() if hasattr(v, "item") else v
  return v


# ------------------------------------------------------------------ figures


def _thumb(img, side):
  """A uint8 (side, side, 3) thumbnail of one image (uint8 or float in [0, 1])."""
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = np.clip(np.round(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  pil = Image.fromarray(img).convert("RGB")
  # Small images (digits' 16 px) are blown up without blurring; big ones smoothed.
  scale = side / max(pil.size)
  resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
  pil = pil.resize((max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale))),
                   resample)
  out = np.full((side, side, 3), 255, np.uint8)
  h, w = pil.size[1], pil.size[0]
  out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = np.asarray(pil)
  return out


def cluster_sheet_png(path, descriptions, images=None, labels=None, ids=None, title=None,
                      thumb_px=48):
  """One PNG, a row per cluster: its size and labels, then images nearest its centre | at its border.

  Without ``images`` the rows list the ids of those points instead.
  """
  n = len(images) if images is not None else len(ids)
  keys = None if labels is None else _label_keys(labels, n)
  n_c = max([len(d["central"]) for d in descriptions] + [1])
  n_b = max([len(d["border"]) for d in descriptions] + [0])
  cell, gap, band = thumb_px + 4, thumb_px // 2, 14 if keys is not None else 0
  strip_w = (n_c + n_b) * cell + (gap if n_b else 0)
  strip_h = cell + band
  rows = max(len(descriptions), 1)
  text_in, px_in = 2.3, 0.75 / strip_h  # inches of text column; inches per strip pixel
  fig_w = text_in + strip_w * px_in + 0.2
  fig_h = rows * strip_h * px_in + (0.9 if title else 0.5)
  fig = figure.Figure(figsize=(fig_w, fig_h), dpi=110)
  top = 1.0 - (0.6 if title else 0.35) / fig_h
  row_h = (top - 0.05 / fig_h) / rows
  if title:
    fig.suptitle(title, fontsize=10, y=1.0 - 0.12 / fig_h, va="top")
  for r, desc in enumerate(descriptions):
    y0 = top - (r + 1) * row_h
    tax = fig.add_axes([0.01, y0, text_in / fig_w - 0.01, row_h])
    tax.axis("off")
    name = "noise" if desc["cluster"] < 0 else f"cluster {desc['cluster']}"
    lines = [f"{name}: {desc['size']} ({100 * desc['fraction']:.1f}%)"
             + (", a random sample" if desc["cluster"] < 0 else "")]
    if "top_labels" in desc:
      lines.append("labels: " + ", ".join(f"{lab} {100 * f:.0f}%"
                                          for lab, _, f in desc["top_labels"]))
    tax.text(0.0, 0.5, "\n".join(lines), fontsize=8, va="center", ha="left")
    sax = fig.add_axes([text_in / fig_w, y0, strip_w * px_in / fig_w, row_h])
    sax.axis("off")
    idx = list(desc["central"]) + list(desc["border"])
    if images is None:
      txt = "nearest the centre: " + ", ".join(str(ids[i]) for i in desc["central"])
      if desc["border"]:
        txt += "\nat the border: " + ", ".join(str(ids[i]) for i in desc["border"])
      sax.text(0.0, 0.5, txt, fontsize=7, va="center", ha="left", wrap=True)
      continue
    strip = np.full((strip_h, strip_w, 3), 255, np.uint8)
    for j, i in enumerate(idx):
      # The border group starts after the widest central group, in every row.
      j_b = j - len(desc["central"])
      x0 = (j * cell if j_b < 0 else (n_c + j_b) * cell + gap) + 2
      strip[2:2 + thumb_px, x0:x0 + thumb_px] = _thumb(images[i], thumb_px)
      if keys is not None:
        sax.text(x0 + thumb_px / 2, cell + band / 2, str(keys[i]), fontsize=6, ha="center",
                 va="center", color="0.2")
    if desc["border"]:
      sep = n_c * cell + gap // 2
      strip[2:cell - 2, sep - 1:sep + 1] = 150
    sax.imshow(strip, interpolation="nearest", extent=(0, strip_w, strip_h, 0))
    sax.set_xlim(0, strip_w)
    sax.set_ylim(strip_h, 0)
    if r == 0:
      sax.text(n_c * cell / 2, -2, "nearest the centre", fontsize=8, ha="center", va="bottom")
      if n_b:
        sax.text(n_c * cell + gap + n_b * cell / 2, -2, "at the border", fontsize=8,
                 ha="center", va="bottom")
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  files.write_bytes(path, buf.getvalue())


def cluster_map_png(path, embedding, result, title=None):
  """The 2D map coloured by cluster, each cluster's number at its members' median; noise grey."""
  xy = np.asarray(embedding, np.float64)
  assign = result.assignments
  fig = figure.Figure(figsize=(7, 7), dpi=110)
  ax = fig.subplots()
  s = plots.point_size(len(xy))
  noise = assign < 0
  if noise.any():
    ax.scatter(xy[noise, 0], xy[noise, 1], s=s, c="0.8", linewidths=0, rasterized=True)
  cmap = matplotlib.colormaps["tab10" if result.n_clusters <= 10 else "tab20"]
  for c in range(result.n_clusters):
    sel = assign == c
    ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cmap(c % cmap.N), linewidths=0,
               rasterized=True)
  for c in range(result.n_clusters):
    mx, my = np.median(xy[assign == c], axis=0)
    ax.text(mx, my, str(c), fontsize=9, ha="center", va="center", fontweight="bold",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": cmap(c % cmap.N),
                  "alpha": 0.85})
  files.write_bytes(path, plots.map_figure_png(fig, ax, title))


# ------------------------------------------------------------------- report


def _pca(x, dims, seed):
  if x.shape[1] <= dims:
    return x
  return decomposition.PCA(n_components=dims, random_state=seed).fit_transform(x)


def write_cluster_report(outdir, embedding, images=None, labels=None, ids=None, features=None,
                         method="gmm", n_clusters=None, k_range=(2, 20), seed=0,
                         feature_dims=16, n_central=8, n_border=4, title=None, **fit_kwargs):
  """Clusters a map (and optionally the features) and writes the report files into ``outdir``.

  Files: ``clusters.json`` (the chosen k and selection curve, sizes, metrics
  against the labels, per cluster its top labels and the ids of its central
  and border members; the same for the features where given),
  ``cluster_contingency.csv`` (cluster x class counts; only with labels),
  ``cluster_assignments.csv`` (id, cluster[, feature_cluster]),
  ``cluster_sheet.png`` (a row per cluster) and ``cluster_map.png``.

  Args:
    outdir: an existing, writable directory (a workdir or an export folder).
    embedding: (N, 2) map.
    images: optional (N, H, W, C) images in the same order, for the sheet.
    labels: optional (N,) or (N, k) labels; metrics and label columns need them.
    ids: optional (N,) ids; default "0".."N-1".
    features: optional (N, D) backbone features, clustered as well after PCA
      to ``feature_dims`` dimensions (the same method and k selection).
    method, n_clusters, k_range, seed, **fit_kwargs: as :func:`fit_clusters`.
    feature_dims: PCA dimensions for the features. A full covariance in
      512-d is slow and its many parameters make BIC choose too few
      components: on a digits run (64-d features) BIC picked k=10, 9, 7 at
      10, 16, 24 dimensions (ARI 0.58, 0.58, 0.54; docs/cluster.md).
    n_central, n_border: images per row of the sheet.
    title: title of the figures; default names the method and k.

  Returns:
    The dict written to clusters.json, plus ``assignments`` ((N,) int, -1
    noise) and ``feature_assignments`` (or None), which the JSON leaves out.
  """
  if not os.path.isdir(outdir):
    raise ValueError(f"output directory {outdir} does not exist; create it first")
  embedding = _check_points(embedding, "embedding")
  n = len(embedding)
  if images is not None:
    if not hasattr(images, "shape") or len(images) != n or np.asarray(images[:1]).ndim not in (3, 4):
      raise ValueError(f"images must be an (N, H, W[, C]) array with N={n} like the embedding; "
                       f"got shape {getattr(images, 'shape', type(images))}")
  if labels is not None:
    _label_keys(labels, n)
  if ids is None:
    ids = np.arange(n).astype(str)
  ids = np.asarray(ids).astype(str)
  if ids.shape != (n,):
    raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
  if features is not None:
    features = _check_points(features, "features")
    if len(features) != n:
      raise ValueError(f"features have {len(features)} rows but the embedding has {n}; pass the "
                       "features of the same points in the same order")

  result = fit_clusters(embedding, method=method, n_clusters=n_clusters, k_range=k_range,
                        seed=seed, **fit_kwargs)
  desc = describe_clusters(result, embedding, labels, n_central=n_central, n_border=n_border)
  report = {"map": result.to_dict(), "n_points": n, "files": {}}
  if labels is not None:
    report["map"]["metrics"] = cluster_metrics(result.assignments, labels)
  report["map"]["clusters"] = [
      dict(d, central_ids=ids[d["central"]].tolist(), border_ids=ids[d["border"]].tolist())
      for d in desc]

  feat_result = None
  if features is not None:
    fx = _pca(features, feature_dims, seed)
    feat_result = fit_clusters(fx, method=method, n_clusters=n_clusters, k_range=k_range,
                               seed=seed, **fit_kwargs)
    report["features"] = feat_result.to_dict()
    report["features"]["input_dims"] = int(features.shape[1])
    if labels is not None:
      report["features"]["metrics"] = cluster_metrics(feat_result.assignments, labels)
    # How far the map's clusters agree with the feature-space clusters.
    report["features"]["ari_with_map_clusters"] = float(
        _ari(result.assignments, feat_result.assignments))

  # cluster_assignments.csv
  path = os.path.join(outdir, ASSIGNMENTS_FILE)
  with files.atomic_open(path, "w") as f:
    w = csv.writer(f)
    w.writerow(["id", "cluster"] + (["feature_cluster"] if feat_result is not None else []))
    for i in range(n):
      row = [ids[i], int(result.assignments[i])]
      if feat_result is not None:
        row.append(int(feat_result.assignments[i]))
      w.writerow(row)
  report["files"]["assignments"] = ASSIGNMENTS_FILE

  if labels is not None:
    clusters, classes, table = contingency_table(result.assignments, labels)
    path = os.path.join(outdir, CONTINGENCY_FILE)
    with files.atomic_open(path, "w") as f:
      w = csv.writer(f)
      w.writerow(["cluster", "size"] + [str(_plain(c)) for c in classes])
      for c, row in zip(clusters, table):
        w.writerow(["noise" if c < 0 else int(c), int(row.sum())] + row.tolist())
    report["map"]["contingency"] = {"clusters": clusters.tolist(),
                                    "classes": [_plain(c) for c in classes],
                                    "table": table.tolist()}
    report["files"]["contingency"] = CONTINGENCY_FILE

  if title is None:
    title = f"{method}: {result.n_clusters} clusters" + (
        f" (chosen by {result.criterion})" if result.criterion in ("bic", "silhouette") else "")
    if labels is not None:
      m = report["map"]["metrics"]
      title += f"; ARI {m['ari']:.3f}, NMI {m['nmi']:.3f}, purity {m['purity']:.3f}"
  cluster_sheet_png(os.path.join(outdir, SHEET_FILE), desc, images=images, labels=labels,
                    ids=ids, title=title)
  report["files"]["sheet"] = SHEET_FILE
  cluster_map_png(os.path.join(outdir, MAP_FILE), embedding, result, title=title)
  report["files"]["map"] = MAP_FILE
  report["files"]["json"] = JSON_FILE
  files.write_json(os.path.join(outdir, JSON_FILE), report)
  # The per-point clusters for callers (plots.embedding_html), not in the JSON.
  return dict(report, assignments=result.assignments,
              feature_assignments=None if feat_result is None else feat_result.assignments)


def _ari(a, b):
  return metrics.adjusted_rand_score(a, b)


if __name__ == "__main__":
  # The command line is jaxembed.commands.cluster, which imports this module once its flags
  # have parsed; `python -m jaxembed.cluster` is `jaxembed cluster`.
  from jaxembed import main  # pylint: disable=g-import-not-at-top
  sys.exit(main.run_command("cluster", prog="python -m jaxembed.cluster"))
