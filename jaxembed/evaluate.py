"""Exact evaluation metrics of an embedding, in JAX: kNN accuracy, silhouette, neighbourhoods.

The t-SimCNE paper (Böhm, Berens, Kobak, ICLR 2023) scores a 2D map by the
accuracy of a kNN classifier with k=15 fit on the training points and by the
silhouette score of the map with the true labels. Both are computed here
exactly (they equal scikit-learn's `KNeighborsClassifier(15).score` and
`silhouette_score` on data without distance ties) in bounded memory: kNN in
chunks of query rows (O(chunk * n)), the silhouette in tiles of points that
each hold one cluster, visiting each pair of tiles once (O(tile^2 + C * n)).
The work is sharded over the devices present along the mesh axis "data";
the reference points are replicated. See docs/evaluate.md for the
algorithms.
"""

import concurrent.futures
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxembed import parallel

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
# Uncertified queries are finished on the host, in float64, while their
# number times the reference points is at most this (8 MiB of distances:
# about 12 queries of a 10k-point set, where it saves compiling a second
# kernel); beyond it by a second leaf pass and brute force on the devices,
# which is faster in steady state (measured at 60k: 53 queries, 20-30 ms on
# the host against 5 ms for the second pass).
_HOST_MAX_PAIRS = 2**20

_HIGHEST = jax.lax.Precision.HIGHEST

# XLA options for the kernels on CPUs; see _jit_for.
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


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
def _chunk_rows(n_ref, n_query, mesh, chunk_size):
  """Rows per query chunk: a multiple of the device count within the budget."""
  n_devices = mesh.size
  if chunk_size is None:
    budget = _BLOCK_BYTES.get(parallel.platform(mesh), _BLOCK_BYTES_ACCELERATOR)
    per_device = max(8, budget // (4 * max(n_ref, 1)))
    chunk_size = per_device * n_devices
  elif (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
  # No point in chunks much larger than the query set; powers of two keep
  # the number of distinct shapes, and so of compilations, small.
  chunk_size = min(int(chunk_size), n_devices * 2**int(np.ceil(np.log2(-(-n_query // n_devices)))))
  return -(-chunk_size // n_devices) * n_devices


def _bucket(count):
  """count rounded up to a multiple of a quarter of its power of two (<= 25% more)."""
  step = max(1, 2**int(np.floor(np.log2(max(count, 1)))) // 4)
  return -(-count // step) * step


def _query_chunks(q, chunk, mesh):
  """Yields (start, device array of `chunk` rows sharded on "data")."""
  sharding = parallel.batch_sharding(mesh)
  n = q.shape[0]
  for start in range(0, n, chunk):
    block = q[start:start + chunk]
    if block.shape[0] < chunk:  # Pad the last chunk; its extra rows are dropped.
      pad = np.zeros((chunk - block.shape[0],) + q.shape[1:], q.dtype)
      block = np.concatenate([block, pad])
    yield start, jax.device_put(block, sharding)


def _concurrent_calls(mesh):
  """How many calls of a kernel to run at once, from as many host threads.

  XLA:CPU runs the TopK custom call that dominates the leaf search on one
  thread, and a program's independent ops one after another, but separate
  executions run in parallel: on a single CPU device two concurrent calls
  over halves of the queries took 5.1 ms where one call took 9.5 ms (2
  cores). Elsewhere the devices already split the work.
  """
  if mesh.size > 1 or jax.process_count() > 1 or not parallel.uses_cpu_paths(mesh):
    return 1
  return max(1, min(os.cpu_count() or 1, 4))


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
    if k_out > k:
      # The k nearest are a certain set when the next candidate is clearly
      # farther; their order does not matter to the callers (votes, overlap).
      ok = ok & (-neg_d2[..., k] > -neg_d2[..., k - 1] * (1.0 + 1e-5))
    return nn, ok

  return jax.lax.map(one, (q, q_index, q_lo, q_hi))


def _tile_distances(a, b, same):
  """Euclidean distances (R, R) between the rows of two tiles.

  Args:
    a, b: (R, d) points.
    same: whether a and b are the same tile (its diagonal is then 0).
  """
  d = a.shape[1]
  if d <= _DIRECT_MAX_DIM:
    # Exact to float32 rounding; self-distances come out exactly 0.
    return jnp.sqrt(_direct_sq_dists(a, b))
  d2 = _gram_sq_dists(a, b)
  # The expansion leaves a rounding residue on the self-distances.
  eye = jnp.arange(a.shape[0])[:, None] == jnp.arange(b.shape[0])[None, :]
  return jnp.sqrt(jnp.where(same & eye, 0.0, d2))


def _kahan_add_row(total, comp, row, value):
  """total[row] += value with Kahan compensation kept in comp; both (C, R)."""
  t_row = jax.lax.dynamic_index_in_dim(total, row, keepdims=False)
  c_row = jax.lax.dynamic_index_in_dim(comp, row, keepdims=False)
  y = value - c_row
  t = t_row + y
  comp = jax.lax.dynamic_update_index_in_dim(comp, (t - t_row) - y, row, 0)
  total = jax.lax.dynamic_update_index_in_dim(total, t, row, 0)
  return total, comp


def _symmetric_cluster_sums(block_ids, points, weights, tile_cluster, n_classes):
  """Per-device part of the sums of distances from every point to every cluster.

  The points come sorted by cluster and cut into tiles of R points that each
  hold one cluster (padded with zero-weight points), so that the distances of
  a pair of tiles (I, J) reduce to sums per cluster by two matrix-vector
  products: D @ w_J adds to the sums of I's points towards J's cluster, and
  w_I @ D to those of J's points towards I's cluster. Each unordered pair of
  tiles is visited once (the upper triangle: half the square roots of the
  full matrix): row tile i pairs with tiles i+1 .. i+nb/2 (cyclically), which
  gives every row tile the same amount of work.

  Args:
    block_ids: (m,) the row tiles this device handles.
    points: (nb, R, d) all points, tiled; weights: (nb, R) 1 for real points,
      0 for padding; tile_cluster: (nb,) the cluster of each tile.
    n_classes: number of clusters C.

  Returns:
    (1, C, nb * R) sums and (1, C, nb * R) Kahan compensations (the sum is
    total - comp), this device's share; the caller adds the devices' shares.
  """
  nb, tile, _ = points.shape
  n_partners = nb // 2

  def row_tile(carry, i):
    total, comp = carry
    xi = points[i]
    wi = weights[i]

    def pair(inner, s):
      racc, rcomp, cols = inner
      j = (i + s) % nb
      # With an even nb, the pairs (i, i + nb/2) would come up twice.
      valid = (2 * s < nb) | ((2 * s == nb) & (i < nb // 2))
      dist = _tile_distances(xi, points[j], s == 0)
      # HIGHEST: a TF32 matmul on GPUs would round the distances to 10 bits.
      row_sums = jnp.dot(dist, weights[j], precision=_HIGHEST)
      col_sums = jnp.dot(wi, dist, precision=_HIGHEST)
      racc, rcomp = _kahan_add_row(racc, rcomp, tile_cluster[j],
                                   jnp.where(valid, row_sums, 0.0))
      # The diagonal tile (s = 0) is counted once, by its row sums.
      cols = jax.lax.dynamic_update_index_in_dim(
          cols, jnp.where(valid & (s > 0), col_sums, 0.0), j, 0)
      return (racc, rcomp, cols), None

    zeros = jnp.zeros((n_classes, tile), jnp.float32)
    (racc, rcomp, cols), _ = jax.lax.scan(
        pair, (zeros, zeros, jnp.zeros((nb, tile), jnp.float32)),
        jnp.arange(n_partners + 1))
    # Column sums of this row tile's pairs all belong to cluster tile_cluster[i].
    total, comp = _kahan_add_row(total, comp, tile_cluster[i], cols.reshape(-1))
    # Row sums of tile i: columns i*R .. (i+1)*R of every cluster's row.
    t_blk = jax.lax.dynamic_slice_in_dim(total, i * tile, tile, axis=1)
    c_blk = jax.lax.dynamic_slice_in_dim(comp, i * tile, tile, axis=1)
    y = (racc - rcomp) - c_blk
    t = t_blk + y
    comp = jax.lax.dynamic_update_slice_in_dim(comp, (t - t_blk) - y, i * tile, axis=1)
    total = jax.lax.dynamic_update_slice_in_dim(total, t, i * tile, axis=1)
    return (total, comp), None

  zeros = jnp.zeros((n_classes, nb * tile), jnp.float32)
  (total, comp), _ = jax.lax.scan(row_tile, (zeros, zeros), block_ids)
  return total[None], comp[None]


def _sharded_cluster_sums(block_ids, points, weights, tile_cluster, n_classes, mesh):
  """_symmetric_cluster_sums with the row tiles split over the mesh's devices."""
  rep, data = P(), P(parallel.DATA_AXIS)
  # check_vma=False: the scans start from zeros that the type system calls
  # replicated and end device-varying; each device's share is meant to vary.
  return jax.shard_map(
      functools.partial(_symmetric_cluster_sums, n_classes=n_classes), mesh=mesh,
      in_specs=(data, rep, rep, rep), out_specs=(data, data), check_vma=False)(
          block_ids, points, weights, tile_cluster)


@functools.lru_cache(maxsize=None)
def _jit_for(fn, platform, static_argnames):
  """jax.jit(fn), on CPUs at the LLVM optimisation level that suits the kernels.

  XLA:CPU's default backend optimisation level compiles the distance tiles
  into code about 3x slower than level 1 does (measured: 1.3-1.4 s vs
  0.4-0.5 s for the 2.1e8 pairs of 20,480 2D points on 2 busy cores), and
  takes longer to compile.
  """
  options = _CPU_COMPILER_OPTIONS if platform == "cpu" else None
  return jax.jit(fn, static_argnames=static_argnames, compiler_options=options)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------
def knn_predict(train_x, train_y, test_x, k=15, *, chunk_size=None, mesh=None):
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
    mesh: the ``data`` mesh whose devices share the work (default: all devices).

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
  nn, _ = _nearest(test_x, train_x, k, None, chunk_size, mesh)
  # Majority vote; np.argmax takes the first maximum, i.e. the smallest
  # class among tied counts, as KNeighborsClassifier does.
  n_classes = len(classes)
  flat = (np.arange(nn.shape[0])[:, None] * n_classes + codes[nn]).ravel()
  votes = np.bincount(flat, minlength=nn.shape[0] * n_classes)
  preds = np.argmax(votes.reshape(nn.shape[0], n_classes), axis=1)
  return classes[preds].astype(train_y_in.dtype, copy=False)


def knn_accuracy(train_x, train_y, test_x, test_y, k=15, *, chunk_size=None, mesh=None):
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
    mesh: see knn_predict.

  Returns:
    The fraction of test points whose predicted label equals test_y, a float.
  """
  test_x = _as_points(test_x, "test_x")
  test_y = _as_labels(test_y, test_x.shape[0], "test_y")
  preds = knn_predict(train_x, train_y, test_x, k, chunk_size=chunk_size, mesh=mesh)
  return float(np.mean(preds.astype(np.int64) == test_y))


def silhouette_score(x, labels, *, chunk_size=None, mesh=None):
  """Mean silhouette coefficient of points `x` under `labels`, Euclidean, exact.

  Same definition as sklearn.metrics.silhouette_score: for point i with mean
  distance a to the other members of its cluster and smallest mean distance b
  to the members of another cluster, s = (b - a) / max(a, b); a point alone in
  its cluster scores 0; the result is the mean of s over all points.

  Args:
    x: (n, d) points.
    labels: (n,) integer cluster or class labels.
    chunk_size: points per tile: each cluster is padded to a multiple of it
      and pairs of tiles are the unit of work; None picks up to 512 on CPUs
      (up to 4096 on accelerators) by the amount of padding it costs.
    mesh: the ``data`` mesh whose devices share the work (default: all devices).

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
  sums = _cluster_sums(x, codes, n_classes, chunk_size, mesh)
  return _silhouette_from_sums(sums, codes, counts)


def _tile_size(counts, mesh, chunk_size):
  """Points per silhouette tile, R; each cluster is padded to a multiple of R.

  Larger tiles cost less per pair (fewer loop steps, longer matrix-vector
  products) but pad each cluster by up to R - 1 points; the choice minimises
  padded_n^2 * (1 + overhead / R). R at most 512 on a CPU keeps a distance
  tile (1 MiB) near the L2 cache; accelerators want larger tiles to fill the
  chip.
  """
  if chunk_size is not None:
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1):
      raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    return int(chunk_size)
  if parallel.uses_cpu_paths(mesh):
    sizes, overhead = [512, 256, 128, 64, 32, 16, 8], 64.0
  else:
    sizes, overhead = [4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8], 1024.0

  def cost(tile):
    n_pad = _n_tiles(counts, tile, mesh.size) * tile
    return n_pad**2 * (1.0 + overhead / tile)

  return min(sizes, key=cost)


def _n_tiles(counts, tile, n_devices):
  """Tiles of `tile` points holding each cluster, rounded up to the devices."""
  nb = int(np.sum(-(-counts // tile)))
  return -(-nb // n_devices) * n_devices


def _cluster_sums(x, codes, n_classes, chunk_size, mesh=None):
  """(n, C) float64 sums of distances from every point to every cluster."""
  n, d = x.shape
  mesh = mesh or parallel.make_mesh()
  counts = np.bincount(codes, minlength=n_classes)
  tile = _tile_size(counts, mesh, chunk_size)
  nb = _n_tiles(counts, tile, mesh.size)
  # Sort by cluster; cluster c starts at a tile boundary, tile_start[c].
  tiles_per_cluster = -(-counts // tile)
  tile_start = np.concatenate([[0], np.cumsum(tiles_per_cluster)[:-1]])
  order = np.argsort(codes, kind="stable")
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(n) - first[codes[order]]
  pos = np.empty(n, np.int64)
  pos[order] = tile_start[codes[order]] * tile + rank
  points = np.zeros((nb * tile, d), np.float32)
  points[pos] = x
  weights = np.zeros(nb * tile, np.float32)
  weights[pos] = 1.0
  # Tiles past the last cluster (device rounding) hold only zero weights.
  tile_cluster = np.zeros(nb, np.int32)
  tile_cluster[:tiles_per_cluster.sum()] = np.repeat(np.arange(n_classes), tiles_per_cluster)
  kernel = _jit_for(_sharded_cluster_sums, parallel.platform(mesh), ("n_classes", "mesh"))
  total, comp = kernel(
      jax.device_put(np.arange(nb, dtype=np.int32), parallel.batch_sharding(mesh)),
      parallel.replicate(mesh, points.reshape(nb, tile, d)),
      parallel.replicate(mesh, weights.reshape(nb, tile)),
      parallel.replicate(mesh, tile_cluster), n_classes=n_classes, mesh=mesh)
  total, comp = parallel.to_host((total, comp))
  sums = (total.astype(np.float64) - comp.astype(np.float64)).sum(axis=0)
  return sums[:, pos].T


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


def nearest(queries, reference, k, *, exclude_self=False, chunk_size=None, mesh=None):
  """The exact k nearest reference points of every query (Euclidean), nearest first.

  The one kNN engine of jaxembed: the metrics above and similar-image search
  (jaxembed.search) use it. Candidates are found in float32 on the devices
  (a leaf search for points of up to 3 dimensions, brute force otherwise)
  and re-ranked by float64 distances on the host, as scikit-learn computes
  them (see :func:`_nearest`).

  Args:
    queries: (m, d) points.
    reference: (n, d) points to search.
    k: neighbours per query (at most n, or n - 1 with ``exclude_self``).
    exclude_self: the queries are the reference points themselves, in order:
      query i does not count reference point i (other points at distance 0,
      duplicates, still do).
    chunk_size: query rows per step; see knn_predict.
    mesh: the ``data`` mesh whose devices share the queries (default: all).

  Returns:
    (distances, indices): (m, k) float64 Euclidean distances and int64
    indices into ``reference``.
  """
  queries = _as_points(queries, "queries")
  reference = _as_points(reference, "reference")
  if queries.shape[1] != reference.shape[1]:
    raise ValueError(f"reference has {reference.shape[1]} dimensions but queries have "
                     f"{queries.shape[1]}; both must come from the same space.")
  if exclude_self and queries.shape[0] != reference.shape[0]:
    raise ValueError(f"exclude_self needs the reference points as queries; got "
                     f"{queries.shape[0]} queries for {reference.shape[0]} points.")
  k = _check_k(k, reference.shape[0] - bool(exclude_self),
               "other points" if exclude_self else "reference points")
  query_index = np.arange(queries.shape[0]) if exclude_self else None
  idx, d2 = _nearest(queries, reference, k, query_index, chunk_size, mesh)
  return np.sqrt(d2), idx


def _neighbours(x, k, chunk_size):
  """(n, k) indices of the k nearest other points of every point."""
  return _nearest(x, x, k, np.arange(x.shape[0]), chunk_size)[0]


def _nearest(queries, ref, k, query_index, chunk_size, mesh=None):
  """(m, k) indices of the k nearest rows of `ref` to each query, nearest first, and
  their (m, k) float64 squared distances.

  Candidates are found in float32 on the devices: low-dimensional points by
  the leaf search, which certifies the set of the k nearest (k + 1
  candidates suffice), with float64 host or float32 brute force for the
  queries it cannot certify; others by brute force alone, keeping a few more
  candidates than k. The candidates are re-ranked by float64 distances on
  the host, as scikit-learn computes them, so that float32 rounding does not
  reorder near-equal neighbours.
  If `query_index` is given, query i is ref[query_index[i]] and excluded.
  """
  n_ref, d = ref.shape
  mesh = mesh or parallel.make_mesh()
  available = n_ref - (query_index is not None)
  # The matmul expansion of high dimensions is less exact: keep more.
  k_out = min(available, k + 8 if d <= _DIRECT_MAX_DIM else 2 * k + 8)
  if d > _LEAF_MAX_DIM or n_ref <= _LEAF_MIN_POINTS:
    if d > _DIRECT_MAX_DIM:
      # Centring shrinks the norms, and so the expansion's rounding error.
      centre = ref.mean(axis=0)
      cand = _brute_nearest(queries - centre, query_index, ref - centre, k_out, chunk_size,
                            mesh)
    else:
      cand = _brute_nearest(queries, query_index, ref, k_out, chunk_size, mesh)
  else:
    # The leaf search certifies the set of the k nearest (see _leaf_knn), so
    # one more candidate suffices; selecting fewer is most of its cost.
    k_leaf = min(available, k + 1)
    ref_leaves = _pad_leaves(_leaves(ref, _LEAF_SIZE))
    cand, ok = _leaf_nearest(queries, query_index, ref_leaves, k, k_leaf, mesh)
    redo = np.flatnonzero(~ok)
    if redo.size and redo.size * n_ref <= _HOST_MAX_PAIRS:
      # A few uncertified queries (typical below 10^5 points) cost less on
      # the host than a second kernel, which would also compile on first use.
      # Its float64 distances are scikit-learn's: the k nearest are exact.
      cand[redo] = _host_nearest(
          queries[redo], None if query_index is None else query_index[redo], ref, k_leaf)
      redo = redo[:0]
    if redo.size:
      # A second, wider search with a pool per query certifies most of the
      # rest (outliers, cluster edges) far more cheaply than brute force.
      sub = None if query_index is None else query_index[redo]
      cand_r, ok_r = _leaf_nearest(queries[redo], sub, ref_leaves, k, k_leaf, mesh, query_leaf=1,
                                   candidates=4 * _LEAF_CANDIDATES)
      cand[redo[ok_r]] = cand_r[ok_r]
      redo = redo[~ok_r]
    if redo.size:
      # Brute force in float32 needs the wider margin of candidates.
      cand = np.concatenate([cand, np.full((cand.shape[0], k_out - k_leaf), -1, cand.dtype)], 1)
      cand[redo] = _brute_nearest(
          queries[redo], None if query_index is None else query_index[redo], ref,
          k_out, chunk_size, mesh)
  return _rerank(queries, ref, cand, k, query_index)


def _host_nearest(queries, query_index, ref, k):
  """(m, k) indices of the k nearest rows of `ref`, nearest first, in NumPy float64.

  Brute force for the few queries that the leaf search cannot certify; if
  `query_index` is given, ref[query_index[i]] is excluded for query i.
  """
  q = queries.astype(np.float64)
  d2 = sum((q[:, j, None] - ref[None, :, j].astype(np.float64)) ** 2
           for j in range(ref.shape[1]))
  if query_index is not None:
    d2[np.arange(q.shape[0]), np.asarray(query_index)] = np.inf
  idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
  order = np.argsort(np.take_along_axis(d2, idx, axis=1), axis=1, kind="stable")
  return np.take_along_axis(idx, order, axis=1)


def _rerank(queries, ref, cand, k, query_index):
  """The k nearest of the candidate indices by float64 distances.

  The candidates arrive nearest first by float32 distances, so most rows are
  already in float64 order; only the others are sorted (stably, so that
  equal distances keep the device's order either way).

  Returns:
    (m, k) indices, nearest first, and their (m, k) float64 squared distances.
  """
  out = np.empty((cand.shape[0], k), np.int64)
  out_d2 = np.empty((cand.shape[0], k), np.float64)
  if ref.shape[1] <= _DIRECT_MAX_DIM:
    ref_columns = [ref[:, j].astype(np.float64) for j in range(ref.shape[1])]
  step = max(1, 2**22 // (cand.shape[1] * ref.shape[1]))  # bounded host memory
  for start in range(0, cand.shape[0], step):
    c = cand[start:start + step]
    q = queries[start:start + step].astype(np.float64)
    safe = np.maximum(c, 0)
    if ref.shape[1] <= _DIRECT_MAX_DIM:
      # Coordinate by coordinate: NumPy sums over a short last axis slowly.
      d2 = sum((ref_columns[j][safe] - q[:, j, None]) ** 2 for j in range(ref.shape[1]))
    else:
      d2 = np.sum((ref[safe].astype(np.float64) - q[:, None, :]) ** 2, axis=-1)
    bad = c < 0
    if query_index is not None:
      bad |= c == np.asarray(query_index)[start:start + step, None]
    d2[bad] = np.inf
    block, block_d2 = c[:, :k].copy(), d2[:, :k].copy()
    unsorted = np.flatnonzero(np.any(d2[:, 1:] < d2[:, :-1], axis=1))
    order = np.argsort(d2[unsorted], axis=1, kind="stable")[:, :k]
    block[unsorted] = np.take_along_axis(c[unsorted], order, axis=1)
    block_d2[unsorted] = np.take_along_axis(d2[unsorted], order, axis=1)
    out[start:start + step] = block
    out_d2[start:start + step] = block_d2
  return out, out_d2


def _brute_nearest(queries, query_index, ref, k, chunk_size, mesh):
  """Exact kNN by chunks of (chunk x n_ref) float32 distances; see _nearest."""
  m = queries.shape[0]
  chunk = _chunk_rows(ref.shape[0], m, mesh, chunk_size)
  ref_d = parallel.replicate(mesh, ref)
  exclude_self = query_index is not None
  index = (np.zeros(m, np.int32) if query_index is None
           else np.asarray(query_index, np.int32))[:, None]
  out = np.empty((m, k), np.int64)
  for (start, q), (_, qi) in zip(_query_chunks(queries, chunk, mesh),
                                 _query_chunks(index, chunk, mesh)):
    idx = _knn_chunk(q, qi[:, 0], ref_d, k=k, exclude_self=exclude_self)
    stop = min(start + chunk, m)
    out[start:stop] = parallel.to_host(idx)[:stop - start]
  return out


def _leaves(x, size):
  """Packs points into leaves of `size` nearby points (sort-tile-recursive).

  The points are sorted along the first dimension and cut into slabs of
  equal count, each slab is sorted along the second dimension and cut again,
  and so on; runs of `size` consecutive points then form leaves with compact
  bounding boxes. It costs d sorts, far less than a k-d tree (the later
  ones as row-wise sorts of a matrix, twice as fast as np.lexsort).

  Returns:
    points (L, size, d) float32, index (L, size) int32 with -1 for padding,
    and the leaf boxes lo, hi (L, d).
  """
  n, d = x.shape
  n_leaves = -(-n // size)
  per_dim = int(np.ceil(n_leaves ** (1.0 / d) - 1e-9))
  order = np.argsort(x[:, 0])
  for j in range(1, d):
    # Slabs are runs of `width` consecutive positions: sort each run along
    # dimension j, as rows of a matrix (the last one padded with +inf).
    width = size * per_dim ** (d - j)
    rows = -(-n // width)
    key = np.full(rows * width, np.inf, np.float32)
    key[:n] = x[order, j]
    within = np.argsort(key.reshape(rows, width), axis=1)
    within = (within + (np.arange(rows) * width)[:, None]).ravel()
    order = order[within[within < n]]
  points = np.zeros((n_leaves * size, d), np.float32)
  points[:n] = x[order]
  index = np.full(n_leaves * size, -1, np.int32)
  index[:n] = order
  starts = np.arange(n_leaves) * size
  lo = np.minimum.reduceat(x[order], starts, axis=0)
  hi = np.maximum.reduceat(x[order], starts, axis=0)
  return points.reshape(n_leaves, size, d), index.reshape(n_leaves, size), lo, hi


def _pad_leaves(leaves):
  """Appends empty leaves up to _bucket(L) leaves, so that shapes repeat across n.

  Their boxes are inverted (lo = +inf, hi = -inf): every box distance to them
  is infinite, so they are never searched before a real leaf and bound
  nothing; their points carry index -1 (padding).
  """
  points, index, lo, hi = leaves
  extra = _bucket(points.shape[0]) - points.shape[0]
  if not extra:
    return leaves
  return (np.concatenate([points, np.zeros((extra,) + points.shape[1:], points.dtype)]),
          np.concatenate([index, np.full((extra,) + index.shape[1:], -1, index.dtype)]),
          np.concatenate([lo, np.full((extra, lo.shape[1]), np.inf, lo.dtype)]),
          np.concatenate([hi, np.full((extra, hi.shape[1]), -np.inf, hi.dtype)]))


def _leaf_nearest(queries, query_index, ref_leaves, k, k_out, mesh,
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
  ref_pts, ref_idx, ref_lo, ref_hi = ref_leaves
  q_pts, q_pos, q_lo, q_hi = _leaves(queries, query_leaf)
  q_idx = q_pos if query_index is None else np.where(
      q_pos >= 0, np.asarray(query_index, np.int32)[np.maximum(q_pos, 0)], -1)
  # Query leaves go in chunks of G per device (about _LEAF_GROUP *
  # _QUERY_LEAF_SIZE queries); each device takes its share of every chunk.
  # Counts of leaves are rounded up to a few sizes per octave, so that calls
  # with other numbers of points mostly reuse compiled code.
  n_qleaves = q_pts.shape[0]
  per_device = _LEAF_GROUP * _QUERY_LEAF_SIZE // query_leaf
  parts = _concurrent_calls(mesh)
  group = min(per_device, -(-_bucket(n_qleaves) // (mesh.size * parts))) * mesh.size
  n_chunks = -(-n_qleaves // group)
  if query_leaf == 1:  # Retries come in varying numbers: few shapes to compile.
    n_chunks = 2**int(np.ceil(np.log2(n_chunks)))
  n_chunks = -(-n_chunks // parts) * parts
  pad = n_chunks * group - n_qleaves

  def chunked(a, fill):
    a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)])
    return a.reshape((n_chunks, group) + a.shape[1:])

  leaf = ref_pts.shape[1]
  n_leaves = ref_pts.shape[0]
  candidates = _LEAF_CANDIDATES if candidates is None else candidates
  n_search = min(-(-max(candidates, 2 * k_out) // leaf), n_leaves)
  n_pool = min(n_search * _LEAF_POOL_FACTOR, n_leaves)
  by_chunk = jax.sharding.NamedSharding(mesh, P(None, parallel.DATA_AXIS))
  replicated = parallel.replicated(mesh)
  # One transfer call for all operands: at 10^4 points the per-call overhead
  # of separate transfers was a fifth of the run time.
  query_side = [chunked(q_pts, 0), chunked(q_idx, -1), chunked(q_lo, 0), chunked(q_hi, 0)]
  step = n_chunks // parts
  operands = jax.device_put(
      [a[i * step:(i + 1) * step] for i in range(parts) for a in query_side] +
      [np.ascontiguousarray(np.moveaxis(ref_pts, 2, 1)), ref_idx, ref_lo, ref_hi],
      [by_chunk] * (4 * parts) + [replicated] * 4)

  def run(i):
    return parallel.to_host(_leaf_knn(
        *operands[4 * i:4 * i + 4], *operands[-4:], k=k, k_out=k_out, n_pool=n_pool,
        n_search=n_search, exclude_self=query_index is not None))

  if parts == 1:
    results = [run(0)]
  else:
    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
      results = list(pool.map(run, range(parts)))
  nn = np.concatenate([r[0] for r in results])
  ok = np.concatenate([r[1] for r in results])
  nn = nn.reshape(-1, q_pts.shape[1], k_out)[:n_qleaves]
  ok = ok.reshape(-1, q_pts.shape[1])[:n_qleaves]
  valid = q_pos >= 0
  out = np.empty((m, k_out), np.int64)
  out[q_pos[valid]] = nn[valid]
  certified = np.empty(m, bool)
  certified[q_pos[valid]] = ok[valid]
  return out, certified
