"""Exact evaluation metrics of an embedding, in JAX: kNN accuracy, silhouette, neighbourhood preservation.

The t-SimCNE paper (Böhm, Berens, Kobak, ICLR 2023) scores a 2D map by the
accuracy of a kNN classifier with k=15 fit on the training points and by the
silhouette score of the map with the true labels. Both are computed here
exactly (they equal scikit-learn's `KNeighborsClassifier(15).score` and
`silhouette_score` on data without distance ties) and in chunks of query
rows, so that memory is O(chunk * n) rather than O(n^2). Query chunks are
sharded over the devices present along the mesh axis "data"; the reference
points are replicated. See docs/evaluate.md for the algorithms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Dimensions up to this are handled by summing squared coordinate differences
# directly (exact to float32 rounding); above it, by |q|^2 + |r|^2 - 2 q.r as a
# matmul, whose cancellation error is then removed by re-ranking candidates.
_DIRECT_MAX_DIM = 16

# Budget for the (chunk x n) float32 blocks of one device, in bytes.
_BLOCK_BYTES = 64 * 2**20

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------
def _as_points(x, name):
  """Returns x as a finite float32 array of shape (n, d)."""
  x = np.asarray(x)
  if x.dtype.kind not in "biuf":
    raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}.")
  if x.ndim == 1:
    raise ValueError(
        f"{name} must be 2D (n_points, n_dims), got shape {x.shape}; "
        "use x.reshape(-1, 1) for 1D points.")
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2D (n_points, n_dims), got shape {x.shape}.")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be non-empty, got shape {x.shape}.")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values; remove or fix them.")
  return x


def _as_labels(y, n, name):
  """Returns y as an int64 array of shape (n,); (n, 1) is accepted too."""
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ValueError(
        f"{name} must have shape ({n},) (one integer label per point), got "
        f"{y.shape}; multi-label targets are not supported.")
  if y.dtype.kind not in "biu":
    raise TypeError(
        f"{name} must be integers, got dtype {y.dtype}; map class names to "
        "integers first, e.g. with np.unique(y, return_inverse=True).")
  if y.shape[0] != n:
    raise ValueError(f"{name} has {y.shape[0]} labels but there are {n} points.")
  return y.astype(np.int64)


def _check_k(k, n_ref, what):
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}.")
  if k > n_ref:
    raise ValueError(f"k={k} exceeds the number of {what} ({n_ref}); pass a smaller k.")
  return int(k)


# ----------------------------------------------------------------------------
# Mesh and chunking.
# ----------------------------------------------------------------------------
def _mesh():
  """A 1D mesh over all devices, by the convention of jaxembed/parallel.py."""
  return jax.make_mesh(
      (jax.device_count(),), ("data",),
      axis_types=(jax.sharding.AxisType.Auto,))


def _chunk_rows(n_ref, n_query, n_devices, chunk_size):
  """Rows per query chunk: a multiple of the device count within the budget."""
  if chunk_size is None:
    per_device = max(8, _BLOCK_BYTES // (4 * max(n_ref, 1)))
    chunk_size = per_device * n_devices
  elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
  # No point in chunks larger than the (padded) query set.
  chunk_size = min(int(chunk_size), -(-n_query // n_devices) * n_devices)
  return -(-chunk_size // n_devices) * n_devices


def _query_chunks(q, chunk, mesh):
  """Yields (start, device array of `chunk` rows sharded on "data")."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = q.shape[0]
  for start in range(0, n, chunk):
    block = q[start:start + chunk]
    if block.shape[0] < chunk:  # Pad the last chunk; its extra rows are dropped.
      pad = np.zeros((chunk - block.shape[0],) + q.shape[1:], q.dtype)
      block = np.concatenate([block, pad])
    yield start, jax.device_put(block, sharding)


def _replicated(x, mesh):
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------
def _direct_sq_dists(q, r):
  """Squared distances (m, n) as sums of squared coordinate differences."""
  out = None
  for j in range(q.shape[1]):
    diff = q[:, j, None] - r[None, :, j]
    out = diff * diff if out is None else out + diff * diff
  return out


def _gram_sq_dists(q, r):
  """Squared distances (m, n) by the matmul expansion; fast, less exact."""
  qq = jnp.sum(q * q, axis=1)
  rr = jnp.sum(r * r, axis=1)
  qr = jnp.dot(q, r.T, precision=_HIGHEST)
  return jnp.maximum(qq[:, None] + rr[None, :] - 2.0 * qr, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _knn_chunk(q, q_index, ref, k, exclude_self):
  """Indices (m, k) of the k nearest rows of `ref` to each row of `q`.

  Args:
    q: (m, d) queries.
    q_index: (m,) index of each query within `ref` (used if exclude_self).
    ref: (n, d) reference points.
    k: number of neighbours.
    exclude_self: whether ref[q_index[i]] is excluded for query i.
  """
  n, d = ref.shape
  if d <= _DIRECT_MAX_DIM:
    d2 = _direct_sq_dists(q, ref)
    kk = k
  else:
    d2 = _gram_sq_dists(q, ref)
    kk = min(n, 2 * k + 8)  # Candidates to re-rank with exact distances.
  if exclude_self:
    d2 = jnp.where(jnp.arange(n)[None, :] == q_index[:, None], jnp.inf, d2)
  _, idx = jax.lax.top_k(-d2, kk)
  if kk != k:
    cand = ref[idx]  # (m, kk, d)
    diff = cand - q[:, None, :]
    exact = jnp.sum(diff * diff, axis=-1)
    if exclude_self:
      exact = jnp.where(idx == q_index[:, None], jnp.inf, exact)
    _, order = jax.lax.top_k(-exact, k)
    idx = jnp.take_along_axis(idx, order, axis=1)
  return idx


@functools.partial(jax.jit, static_argnames=("k", "n_classes"))
def _knn_predict_chunk(q, ref, ref_codes, k, n_classes):
  """Majority vote of the k nearest neighbours; ties go to the smallest class."""
  idx = _knn_chunk(q, jnp.zeros(q.shape[0], jnp.int32), ref, k, False)
  votes = jnp.sum(jax.nn.one_hot(ref_codes[idx], n_classes, dtype=jnp.int32), axis=1)
  return jnp.argmax(votes, axis=1)  # First maximum, as np.argmax in sklearn.


@functools.partial(jax.jit, static_argnames=("block",))
def _cluster_distance_sums(q, q_index, ref, onehot, block):
  """Sum of distances from each query to the members of each cluster.

  The reference set is walked in blocks of `block` columns; per block, the
  (m, block) distance matrix is reduced by cluster with a matmul against the
  one-hot label matrix (block, C), and block partials are accumulated with
  Kahan compensation so that sums over 10^5-10^6 points keep float32 accuracy.

  Args:
    q: (m, d) queries.
    q_index: (m,) index of each query within `ref`; its self-distance is 0.
    ref: (nb * block, d) all points (zero-padded).
    onehot: (nb * block, C) float32 one-hot labels (zero rows for padding).
    block: columns per block.

  Returns:
    (m, C) float32 sums.
  """
  n, d = ref.shape
  n_classes = onehot.shape[1]
  nb = n // block
  ref_blocks = ref.reshape(nb, block, d)
  oh_blocks = onehot.reshape(nb, block, n_classes)
  starts = jnp.arange(nb) * block

  def body(carry, xs):
    total, comp = carry
    r, oh, start = xs
    if d <= _DIRECT_MAX_DIM:
      d2 = _direct_sq_dists(q, r)
    else:
      d2 = _gram_sq_dists(q, r)
      # The expansion leaves a rounding residue on the self-distance.
      cols = start + jnp.arange(block)
      d2 = jnp.where(cols[None, :] == q_index[:, None], 0.0, d2)
    part = jnp.dot(jnp.sqrt(d2), oh, precision=_HIGHEST)
    y = part - comp
    t = total + y
    comp = (t - total) - y
    return (t, comp), None

  zeros = jnp.zeros((q.shape[0], n_classes), jnp.float32)
  (total, _), _ = jax.lax.scan(body, (zeros, zeros), (ref_blocks, oh_blocks, starts))
  return total


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------
def knn_predict(train_x, train_y, test_x, k=15, *, chunk_size=None):
  """Predicts labels of test points by majority vote of their k nearest train points.

  Exact Euclidean neighbours; uniform weights; among tied vote counts the
  smallest label wins, as in scikit-learn's KNeighborsClassifier.

  Args:
    train_x: (n_train, d) train points.
    train_y: (n_train,) integer labels (any integers).
    test_x: (n_test, d) test points.
    k: number of neighbours.
    chunk_size: test rows per step (rounded up to a multiple of the device
      count); None picks one that keeps each block near 64 MiB per device.

  Returns:
    (n_test,) predicted labels, same dtype as train_y.
  """
  train_x = _as_points(train_x, "train_x")
  train_y_in = np.asarray(train_y)
  train_y = _as_labels(train_y, train_x.shape[0], "train_y")
  test_x = _as_points(test_x, "test_x")
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f"train_x has {train_x.shape[1]} dimensions but test_x has {test_x.shape[1]}.")
  k = _check_k(k, train_x.shape[0], "train points")
  classes, codes = np.unique(train_y, return_inverse=True)
  # Centring does not change distances but shrinks the norms, and with them
  # the rounding error of the matmul expansion used in high dimensions.
  centre = train_x.mean(axis=0)
  mesh = _mesh()
  ref = _replicated(train_x - centre, mesh)
  ref_codes = _replicated(codes.astype(np.int32), mesh)
  chunk = _chunk_rows(train_x.shape[0], test_x.shape[0], mesh.size, chunk_size)
  preds = np.empty(test_x.shape[0], np.int64)
  for start, q in _query_chunks(test_x - centre, chunk, mesh):
    out = _knn_predict_chunk(q, ref, ref_codes, k=k, n_classes=len(classes))
    stop = min(start + chunk, test_x.shape[0])
    preds[start:stop] = np.asarray(out)[:stop - start]
  return classes[preds].astype(train_y_in.dtype, copy=False)


def knn_accuracy(train_x, train_y, test_x, test_y, k=15, *, chunk_size=None):
  """Accuracy of a kNN classifier fit on (train_x, train_y), scored on the test set.

  Equals `KNeighborsClassifier(k).fit(train_x, train_y).score(test_x, test_y)`
  on data without distance ties. The paper's protocol uses k=15.

  Args:
    train_x: (n_train, d) train points, e.g. the 2D embedding.
    train_y: (n_train,) integer labels (any integers, need not start at 0).
    test_x: (n_test, d) test points.
    test_y: (n_test,) integer labels; labels absent from train_y count as errors.
    k: number of neighbours.
    chunk_size: test rows per step; see knn_predict.

  Returns:
    The fraction of test points whose predicted label equals test_y, a float.
  """
  test_x = _as_points(test_x, "test_x")
  test_y = _as_labels(test_y, test_x.shape[0], "test_y")
  preds = knn_predict(train_x, train_y, test_x, k, chunk_size=chunk_size)
  return float(np.mean(preds.astype(np.int64) == test_y))


def silhouette_score(x, labels, *, chunk_size=None):
  """Mean silhouette coefficient of points `x` under `labels`, Euclidean, exact.

  Same definition as sklearn.metrics.silhouette_score: for point i with mean
  distance a to the other members of its cluster and smallest mean distance b
  to the members of another cluster, s = (b - a) / max(a, b); a point alone in
  its cluster scores 0; the result is the mean of s over all points.

  Args:
    x: (n, d) points.
    labels: (n,) integer cluster or class labels.
    chunk_size: query rows per step (rounded up to a multiple of the device
      count); None picks one that keeps each block near 64 MiB per device.

  Returns:
    The silhouette score, a float in [-1, 1].

  Raises:
    ValueError: if the number of distinct labels is not within 2..n-1.
  """
  x = _as_points(x, "x")
  labels = _as_labels(labels, x.shape[0], "labels")
  n = x.shape[0]
  classes, codes = np.unique(labels, return_inverse=True)
  n_classes = len(classes)
  if not 2 <= n_classes <= n - 1:
    raise ValueError(
        f"silhouette_score needs between 2 and n_points - 1 = {n - 1} distinct "
        f"labels, got {n_classes}.")
  counts = np.bincount(codes, minlength=n_classes)
  sums = _cluster_sums(x - x.mean(axis=0), codes, n_classes, chunk_size)
  return _silhouette_from_sums(sums, codes, counts)


def _cluster_sums(x, codes, n_classes, chunk_size):
  """(n, C) float64 sums of distances from every point to every cluster."""
  n, _ = x.shape
  mesh = _mesh()
  chunk = _chunk_rows(n, n, mesh.size, chunk_size)
  # Column blocks small enough to stay in cache on a CPU, large enough to
  # amortise the per-block matmul.
  block = min(2048, -(-n // 8) * 8)
  n_pad = -(-n // block) * block
  ref = np.zeros((n_pad, x.shape[1]), np.float32)
  ref[:n] = x
  onehot = np.zeros((n_pad, n_classes), np.float32)
  onehot[np.arange(n), codes] = 1.0
  ref_d = _replicated(ref, mesh)
  onehot_d = _replicated(onehot, mesh)
  index = np.arange(n, dtype=np.int32)[:, None]
  sums = np.empty((n, n_classes), np.float64)
  for (start, q), (_, qi) in zip(_query_chunks(x, chunk, mesh),
                                 _query_chunks(index, chunk, mesh)):
    out = _cluster_distance_sums(q, qi[:, 0], ref_d, onehot_d, block=block)
    stop = min(start + chunk, n)
    sums[start:stop] = np.asarray(out)[:stop - start]
  return sums


def _silhouette_from_sums(sums, codes, counts):
  """Silhouette score from per-point per-cluster distance sums, in float64."""
  n = sums.shape[0]
  rows = np.arange(n)
  own = counts[codes]
  a = sums[rows, codes] / np.maximum(own - 1, 1)
  means = sums / counts[None, :]
  means[rows, codes] = np.inf
  b = means.min(axis=1)
  denom = np.maximum(a, b)
  with np.errstate(invalid="ignore", divide="ignore"):
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
  s[own == 1] = 0.0  # A point alone in its cluster scores 0, by definition.
  return float(np.mean(s))


def neighbourhood_preservation(high_x, low_x, k=15, *, chunk_size=None):
  """Fraction of each point's k nearest neighbours kept by the embedding.

  For every point, the k nearest other points in `high_x` (e.g. backbone
  features) and in `low_x` (e.g. the 2D map) are found, exactly and excluding
  the point itself; the score is the size of their overlap divided by k,
  averaged over points. 1 means every neighbourhood survives the embedding.

  Args:
    high_x: (n, D) points in the original space.
    low_x: (n, d) the same points embedded.
    k: neighbours per point.
    chunk_size: query rows per step; see knn_predict.

  Returns:
    The mean preserved fraction, a float in [0, 1].
  """
  high_x = _as_points(high_x, "high_x")
  low_x = _as_points(low_x, "low_x")
  n = high_x.shape[0]
  if low_x.shape[0] != n:
    raise ValueError(
        f"high_x has {n} points but low_x has {low_x.shape[0]}; they must be "
        "the same points in the same order.")
  k = _check_k(k, n - 1, "other points")
  high_nn = _neighbours(high_x - high_x.mean(axis=0), k, chunk_size)
  low_nn = _neighbours(low_x - low_x.mean(axis=0), k, chunk_size)
  kept = 0
  for start in range(0, n, 4096):  # Bounded memory for the k x k comparison.
    h = high_nn[start:start + 4096]
    l = low_nn[start:start + 4096]
    kept += int(np.sum(np.any(h[:, :, None] == l[:, None, :], axis=2)))
  return kept / (n * k)


def _neighbours(x, k, chunk_size):
  """(n, k) indices of the k nearest other points of every point."""
  n = x.shape[0]
  mesh = _mesh()
  chunk = _chunk_rows(n, n, mesh.size, chunk_size)
  ref = _replicated(x, mesh)
  index = np.arange(n, dtype=np.int32)[:, None]
  out = np.empty((n, k), np.int64)
  for (start, q), (_, qi) in zip(_query_chunks(x, chunk, mesh),
                                 _query_chunks(index, chunk, mesh)):
    idx = _knn_chunk(q, qi[:, 0], ref, k=k, exclude_self=True)
    stop = min(start + chunk, n)
    out[start:stop] = np.asarray(idx)[:stop - start]
  return out
