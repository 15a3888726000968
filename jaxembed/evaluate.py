"""Exact evaluation metrics of an embedding, in JAX: kNN accuracy, silhouette, neighbourhoods.

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

# Budget for the (chunk x n) float32 blocks of brute-force kNN on one device,
# in bytes: cache-friendly on CPUs, larger on accelerators to amortise steps.
_BLOCK_BYTES = {"cpu": 64 * 2**20}
_BLOCK_BYTES_ACCELERATOR = 1024 * 2**20

# Leaf search (see _leaf_knn), used for points of at most _LEAF_MAX_DIM
# dimensions and more than _LEAF_MIN_POINTS reference points: reference
# leaves of at most _LEAF_SIZE points, query leaves of _QUERY_LEAF_SIZE,
# about _LEAF_CANDIDATES candidates per query, a pool of _LEAF_POOL_FACTOR
# times as many leaves per query leaf, and _LEAF_GROUP query leaves per device
# and step.
_LEAF_MAX_DIM = 3
_LEAF_MIN_POINTS = 2048
_LEAF_SIZE = 32
_QUERY_LEAF_SIZE = 32
_LEAF_CANDIDATES = 256
_LEAF_GROUP = 64
_LEAF_POOL_FACTOR = 4

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
    budget = _BLOCK_BYTES.get(jax.devices()[0].platform, _BLOCK_BYTES_ACCELERATOR)
    per_device = max(8, budget // (4 * max(n_ref, 1)))
    chunk_size = per_device * n_devices
  elif (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
  # No point in chunks much larger than the query set; powers of two keep
  # the number of distinct shapes, and so of compilations, small.
  chunk_size = min(int(chunk_size), n_devices * 2**int(np.ceil(np.log2(-(-n_query // n_devices)))))
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


def _fetch(x):
  """A device array as NumPy, also one that spans the devices of several processes."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


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
  """Indices (m, k) of the k nearest rows of `ref` to each row of `q` (float32).

  Args:
    q: (m, d) queries.
    q_index: (m,) index of each query within `ref` (used if exclude_self).
    ref: (n, d) reference points.
    k: number of neighbours.
    exclude_self: whether ref[q_index[i]] is excluded for query i.
  """
  n, d = ref.shape
  d2 = _direct_sq_dists(q, ref) if d <= _DIRECT_MAX_DIM else _gram_sq_dists(q, ref)
  if exclude_self:
    d2 = jnp.where(jnp.arange(n)[None, :] == q_index[:, None], jnp.inf, d2)
  return _top_k(-d2, k)[1]


def _top_k(x, k):
  """jax.lax.top_k over the last axis of a rank-2 x, kept on XLA:CPU's TopK kernel.

  XLA:CPU lowers top_k to a full sort (with a comparator call per comparison,
  many times slower) when the operand has another rank or when later slices
  of the outputs get merged into the sort's; the barrier prevents the latter.
  """
  return jax.lax.optimization_barrier(jax.lax.top_k(x, k))


def _box_sq_dists(a_lo, a_hi, b_lo, b_hi):
  """Squared distances between boxes whose (..., d) corners broadcast.

  A loop over the few dimensions, not a reduction over a minor axis of size
  d, which XLA:CPU vectorises poorly.
  """
  out = None
  for j in range(a_lo.shape[-1]):
    gap = jnp.maximum(0.0, jnp.maximum(b_lo[..., j] - a_hi[..., j], a_lo[..., j] - b_hi[..., j]))
    out = gap * gap if out is None else out + gap * gap
  return out


@functools.partial(
    jax.jit, static_argnames=("k", "k_out", "n_pool", "n_search", "exclude_self"))
def _leaf_knn(q, q_index, q_lo, q_hi, ref, ref_index, ref_lo, ref_hi, k, k_out,
              n_pool, n_search, exclude_self):
  """kNN of groups of nearby queries among the nearest leaves (see _leaves).

  Every query leaf takes a pool of the `n_pool` reference leaves whose boxes
  come closest to its own box; every query then searches exhaustively the
  `n_search` leaves of the pool whose boxes come closest to the query point.
  The k-th neighbour of a query is certified exact when it is nearer than any
  unsearched point can be: nearer than the point-to-box distance of every
  other leaf of the pool and than the box-to-box distance of the first leaf
  outside the pool. Uncertified queries are redone by brute force by the
  caller.

  Args:
    q: (n_chunks, G, Q, d) query leaves; ref: (L, d, B) reference leaves,
      coordinate-major.
    q_index, ref_index: (n_chunks, G, Q) and (L, B) point indices, -1 for
      padding (q_index is the index within ref when exclude_self).
    q_lo, q_hi: (n_chunks, G, d) query leaf boxes; ref_lo, ref_hi: (L, d).
    k: neighbours that must be certified.
    k_out: candidates returned per query (>= k), nearest first.
    n_pool: reference leaves considered per query leaf.
    n_search: reference leaves searched per query (< n_pool unless L is).
    exclude_self: whether ref point q_index is excluded for its query.

  Returns:
    (n_chunks, G, Q, k_out) neighbour indices into ref (-1 where there are
    fewer candidates) and (n_chunks, G, Q) booleans: certified or not.
  """
  n_leaves, d, leaf = ref.shape

  def one(args):
    q, qi, qlo, qhi = args
    g, nq, _ = q.shape
    lb2 = _box_sq_dists(qlo[:, None], qhi[:, None], ref_lo[None], ref_hi[None])  # (G, L)
    if n_pool < n_leaves:
      neg, pool = _top_k(-lb2, n_pool + 1)
      bound = jnp.broadcast_to(-neg[:, -1:], (g, nq))
      pool = pool[:, :n_pool]
    else:
      pool = jnp.broadcast_to(jnp.arange(n_leaves), (g, n_leaves))
      bound = jnp.full((g, nq), jnp.inf)
    # Point-to-box distances of each query to the leaves of its pool.
    point_box = _box_sq_dists(q[:, :, None], q[:, :, None], ref_lo[pool][:, None],
                              ref_hi[pool][:, None])  # (G, Q, n_pool)
    n_rank = min(n_search + 1, pool.shape[1])
    neg, local = _top_k(-point_box.reshape(g * nq, -1), n_rank)
    if n_rank > n_search:
      bound = jnp.minimum(bound, -neg[:, -1].reshape(g, nq))
    local = local[:, :n_search].reshape(g, nq, n_search)
    leaves = jnp.take_along_axis(jnp.broadcast_to(pool[:, None], (g, nq, pool.shape[1])),
                                 local, axis=-1)  # (G, Q, n_search)
    cand = jnp.moveaxis(ref[leaves], 3, 2).reshape(g, nq, d, -1)  # (G, Q, d, S*B)
    cidx = ref_index[leaves].reshape(g, nq, -1)
    d2 = None
    for j in range(d):
      diff = q[:, :, j, None] - cand[:, :, j]
      d2 = diff * diff if d2 is None else d2 + diff * diff
    invalid = cidx < 0
    if exclude_self:
      invalid = invalid | (cidx == qi[:, :, None])
    d2 = jnp.where(invalid, jnp.inf, d2)
    neg_d2, pos = _top_k(-d2.reshape(g * nq, -1), k_out)
    neg_d2, pos = neg_d2.reshape(g, nq, k_out), pos.reshape(g, nq, k_out)
    nn = jnp.take_along_axis(cidx, pos, axis=-1)
    nn = jnp.where(jnp.isinf(neg_d2), -1, nn)
    # A small relative margin absorbs float32 rounding of both sides.
    ok = -neg_d2[..., k - 1] < bound * (1.0 - 1e-5)
    return nn, ok

  return jax.lax.map(one, (q, q_index, q_lo, q_hi))


def _cluster_distance_sums(q, q_index, ref, onehot, block):
  """Sum of distances from each query to the members of each cluster.

  The reference set is walked in blocks of `block` columns; per block, the
  (m, block) distance matrix is reduced by cluster with a matmul against the
  one-hot label matrix (block, C), which turns the segment sum into a GEMM,
  and block partials are accumulated with Kahan compensation so that sums
  over 10^5-10^6 points keep float32 accuracy.

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
    # HIGHEST: a TF32 matmul on GPUs would round the distances to 10 bits.
    part = jnp.dot(jnp.sqrt(d2), oh, precision=_HIGHEST)
    y = part - comp
    t = total + y
    comp = (t - total) - y
    return (t, comp), None

  zeros = jnp.zeros((q.shape[0], n_classes), jnp.float32)
  (total, _), _ = jax.lax.scan(body, (zeros, zeros), (ref_blocks, oh_blocks, starts))
  return total


@functools.partial(jax.jit, static_argnames=("block",))
def _all_cluster_distance_sums(queries, query_index, ref, onehot, block):
  """_cluster_distance_sums over (n_chunks, chunk, d) queries, chunk by chunk."""
  return jax.lax.map(
      lambda args: _cluster_distance_sums(args[0], args[1], ref, onehot, block),
      (queries, query_index))


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
      count); None picks one that keeps each block near 64 MiB per device
      (1 GiB on accelerators).

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
  nn = _nearest(test_x, train_x, k, None, chunk_size)
  # Majority vote; np.argmax takes the first maximum, i.e. the smallest
  # class among tied counts, as KNeighborsClassifier does.
  n_classes = len(classes)
  flat = (np.arange(nn.shape[0])[:, None] * n_classes + codes[nn]).ravel()
  votes = np.bincount(flat, minlength=nn.shape[0] * n_classes)
  preds = np.argmax(votes.reshape(nn.shape[0], n_classes), axis=1)
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
      count); None takes 2048 rows per device on CPUs, 8192 on accelerators.

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
  if x.shape[1] > _DIRECT_MAX_DIM:
    # Centring shrinks the norms, and so the rounding error of the matmul
    # expansion; the direct differences of low dimensions need no help.
    x = x - x.mean(axis=0)
  sums = _cluster_sums(x, codes, n_classes, chunk_size)
  return _silhouette_from_sums(sums, codes, counts)


def _tile_sizes():
  """(query rows per device and chunk, reference columns per block).

  On a CPU a 2048 x 2048 float32 block (16 MiB) stays near the caches and
  keeps both the distance pass and the matmul busy; accelerators want larger
  tiles to fill the chip.
  """
  if jax.devices()[0].platform == "cpu":
    return 2048, 2048
  return 8192, 8192


def _cluster_sums(x, codes, n_classes, chunk_size):
  """(n, C) float64 sums of distances from every point to every cluster."""
  n, d = x.shape
  mesh = _mesh()
  rows, block = _tile_sizes()
  if chunk_size is None:
    chunk_size = rows * mesh.size
  chunk = _chunk_rows(n, n, mesh.size, chunk_size)
  block = min(block, -(-n // 8) * 8)
  n_pad = -(-n // block) * block
  ref = np.zeros((n_pad, d), np.float32)
  ref[:n] = x
  onehot = np.zeros((n_pad, n_classes), np.float32)
  onehot[np.arange(n), codes] = 1.0
  n_chunks = -(-n // chunk)
  queries = np.zeros((n_chunks * chunk, d), np.float32)
  queries[:n] = x
  index = np.arange(n_chunks * chunk, dtype=np.int32)
  # Each device takes its share of the rows of every chunk.
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  out = _all_cluster_distance_sums(
      jax.device_put(queries.reshape(n_chunks, chunk, d), sharded),
      jax.device_put(index.reshape(n_chunks, chunk), sharded),
      _replicated(ref, mesh), _replicated(onehot, mesh), block=block)
  return _fetch(out).astype(np.float64).reshape(-1, n_classes)[:n]


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
  high_nn = _neighbours(high_x, k, chunk_size)
  low_nn = _neighbours(low_x, k, chunk_size)
  kept = 0
  for start in range(0, n, 4096):  # Bounded memory for the k x k comparison.
    h = high_nn[start:start + 4096]
    l = low_nn[start:start + 4096]
    kept += int(np.sum(np.any(h[:, :, None] == l[:, None, :], axis=2)))
  return kept / (n * k)


def _neighbours(x, k, chunk_size):
  """(n, k) indices of the k nearest other points of every point."""
  return _nearest(x, x, k, np.arange(x.shape[0]), chunk_size)


def _nearest(queries, ref, k, query_index, chunk_size):
  """(m, k) indices of the k nearest rows of `ref` to each query, nearest first.

  Candidates are found in float32 on the devices: low-dimensional points by
  the leaf search, with brute force for the queries it cannot certify,
  others by brute force alone. A few more candidates than k are kept and
  re-ranked by float64 distances on the host, as scikit-learn computes them,
  so that float32 rounding does not reorder near-equal neighbours.
  If `query_index` is given, query i is ref[query_index[i]] and excluded.
  """
  n_ref, d = ref.shape
  available = n_ref - (query_index is not None)
  # The matmul expansion of high dimensions is less exact: keep more.
  k_out = min(available, k + 8 if d <= _DIRECT_MAX_DIM else 2 * k + 8)
  if d > _LEAF_MAX_DIM or n_ref <= _LEAF_MIN_POINTS:
    if d > _DIRECT_MAX_DIM:
      # Centring shrinks the norms, and so the expansion's rounding error.
      centre = ref.mean(axis=0)
      cand = _brute_nearest(queries - centre, query_index, ref - centre, k_out, chunk_size)
    else:
      cand = _brute_nearest(queries, query_index, ref, k_out, chunk_size)
  else:
    ref_leaves = _leaves(ref, _LEAF_SIZE)
    cand, ok = _leaf_nearest(queries, query_index, ref_leaves, k, k_out)
    redo = np.flatnonzero(~ok)
    if redo.size:
      # A second, wider search with a pool per query certifies most of the
      # rest (outliers, cluster edges) far more cheaply than brute force.
      sub = None if query_index is None else query_index[redo]
      cand_r, ok_r = _leaf_nearest(queries[redo], sub, ref_leaves, k, k_out, query_leaf=1,
                                   candidates=4 * _LEAF_CANDIDATES)
      cand[redo[ok_r]] = cand_r[ok_r]
      redo = redo[~ok_r]
    if redo.size:
      cand[redo] = _brute_nearest(
          queries[redo], None if query_index is None else query_index[redo], ref,
          k_out, chunk_size)
  return _rerank(queries, ref, cand, k, query_index)


def _rerank(queries, ref, cand, k, query_index):
  """The k nearest of the candidate indices by float64 distances."""
  out = np.empty((cand.shape[0], k), np.int64)
  step = max(1, 2**22 // (cand.shape[1] * ref.shape[1]))  # bounded host memory
  for start in range(0, cand.shape[0], step):
    c = cand[start:start + step]
    q = queries[start:start + step].astype(np.float64)
    d2 = np.sum((ref[np.maximum(c, 0)].astype(np.float64) - q[:, None, :]) ** 2, axis=-1)
    bad = c < 0
    if query_index is not None:
      bad |= c == np.asarray(query_index)[start:start + step, None]
    d2[bad] = np.inf
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    out[start:start + step] = np.take_along_axis(c, order, axis=1)
  return out


def _brute_nearest(queries, query_index, ref, k, chunk_size):
  """Exact kNN by chunks of (chunk x n_ref) float32 distances; see _nearest."""
  m = queries.shape[0]
  mesh = _mesh()
  chunk = _chunk_rows(ref.shape[0], m, mesh.size, chunk_size)
  ref_d = _replicated(ref, mesh)
  exclude_self = query_index is not None
  index = (np.zeros(m, np.int32) if query_index is None
           else np.asarray(query_index, np.int32))[:, None]
  out = np.empty((m, k), np.int64)
  for (start, q), (_, qi) in zip(_query_chunks(queries, chunk, mesh),
                                 _query_chunks(index, chunk, mesh)):
    idx = _knn_chunk(q, qi[:, 0], ref_d, k=k, exclude_self=exclude_self)
    stop = min(start + chunk, m)
    out[start:stop] = _fetch(idx)[:stop - start]
  return out


def _leaves(x, size):
  """Packs points into leaves of `size` nearby points (sort-tile-recursive).

  The points are sorted along the first dimension and cut into slabs of
  equal count, each slab is sorted along the second dimension and cut again,
  and so on; runs of `size` consecutive points then form leaves with compact
  bounding boxes. It costs d sorts, far less than a k-d tree.

  Returns:
    points (L, size, d) float32, index (L, size) int32 with -1 for padding,
    and the leaf boxes lo, hi (L, d).
  """
  n, d = x.shape
  n_leaves = -(-n // size)
  per_dim = int(np.ceil(n_leaves ** (1.0 / d) - 1e-9))
  leaf_of = np.arange(n) // size  # leaf of each sorted position
  order = np.argsort(x[:, 0], kind="stable")
  for j in range(1, d):
    slab = leaf_of // per_dim ** (d - j)
    order = order[np.lexsort((x[order, j], slab))]
  points = np.zeros((n_leaves * size, d), np.float32)
  points[:n] = x[order]
  index = np.full(n_leaves * size, -1, np.int32)
  index[:n] = order
  starts = np.arange(n_leaves) * size
  lo = np.minimum.reduceat(x[order], starts, axis=0)
  hi = np.maximum.reduceat(x[order], starts, axis=0)
  return points.reshape(n_leaves, size, d), index.reshape(n_leaves, size), lo, hi


def _leaf_nearest(queries, query_index, ref_leaves, k, k_out,
                  query_leaf=_QUERY_LEAF_SIZE, candidates=None):
  """Leaf kNN (see _leaf_knn): (m, k_out) indices, (m,) certified flags.

  Args:
    queries: (m, d) points; query_index: their indices in the reference set
      (excluded from their own neighbours), or None.
    ref_leaves: _leaves() of the reference points.
    k, k_out: neighbours to certify and candidates to return.
    query_leaf: queries per query leaf; 1 gives every query its own pool.
    candidates: about how many points each query searches (default
      _LEAF_CANDIDATES).
  """
  m, d = queries.shape
  mesh = _mesh()
  ref_pts, ref_idx, ref_lo, ref_hi = ref_leaves
  q_pts, q_pos, q_lo, q_hi = _leaves(queries, query_leaf)
  q_idx = q_pos if query_index is None else np.where(
      q_pos >= 0, np.asarray(query_index, np.int32)[np.maximum(q_pos, 0)], -1)
  # Query leaves go in chunks of G per device (about _LEAF_GROUP *
  # _QUERY_LEAF_SIZE queries); each device takes its share of every chunk.
  n_qleaves = q_pts.shape[0]
  per_device = _LEAF_GROUP * _QUERY_LEAF_SIZE // query_leaf
  group = min(per_device, -(-n_qleaves // mesh.size)) * mesh.size
  n_chunks = -(-n_qleaves // group)
  if query_leaf == 1:  # Retries come in varying numbers: few shapes to compile.
    n_chunks = 2**int(np.ceil(np.log2(n_chunks)))
  pad = n_chunks * group - n_qleaves

  def chunked(a, fill):
    a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)])
    return jax.device_put(
        a.reshape((n_chunks, group) + a.shape[1:]),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))

  leaf = ref_pts.shape[1]
  n_leaves = ref_pts.shape[0]
  candidates = _LEAF_CANDIDATES if candidates is None else candidates
  n_search = min(-(-max(candidates, 2 * k_out) // leaf), n_leaves)
  n_pool = min(n_search * _LEAF_POOL_FACTOR, n_leaves)
  nn, ok = _leaf_knn(
      chunked(q_pts, 0), chunked(q_idx, -1), chunked(q_lo, 0), chunked(q_hi, 0),
      _replicated(np.ascontiguousarray(np.moveaxis(ref_pts, 2, 1)), mesh),
      _replicated(ref_idx, mesh), _replicated(ref_lo, mesh), _replicated(ref_hi, mesh),
      k=k, k_out=k_out, n_pool=n_pool, n_search=n_search,
      exclude_self=query_index is not None)
  nn = _fetch(nn).reshape(-1, q_pts.shape[1], k_out)[:n_qleaves]
  ok = _fetch(ok).reshape(-1, q_pts.shape[1])[:n_qleaves]
  valid = q_pos >= 0
  out = np.empty((m, k_out), np.int64)
  out[q_pos[valid]] = nn[valid]
  certified = np.empty(m, bool)
  certified[q_pos[valid]] = ok[valid]
  return out, certified
