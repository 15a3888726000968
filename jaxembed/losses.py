"""Contrastive losses of t-SimCNE over the global batch: Cauchy- and cosine-kernel InfoNCE.

For a batch of B images with two views, the 2B outputs ``z = [z1; z2]``
are the anchors. Anchor i's positive is its twin ``(i + B) mod 2B``; every
other row except i itself is a negative. With a similarity ``s`` the loss is

    L = mean_i [ -log s(i, pos(i)) + log sum_{j != i} s(i, j) ],

where the denominator contains the positive (DESIGN.md section 2). In
log-space ``log s`` is ``-log1p(d2)`` for the Cauchy kernel
``s = 1 / (1 + |z_i - z_j|^2)`` (no temperature), and ``cos / tau`` for the
SimCLR kernel ``s = exp(cos(z_i, z_j) / tau)`` (reference tau = 0.5).
Both are evaluated with a log-sum-exp in float32, so bf16 inputs, huge
distances or identical points give finite values.

Every row of the loss needs all 2B columns, so the 2B x 2B log-similarity
matrix is the memory cost (1 GiB in float32 at B = 8192). Three evaluations
give the same value and gradients:

* plain: the whole matrix at once. Called inside ``jax.jit`` with the batch
  sharded on the ``data`` axis of an Auto mesh (parallel.py), XLA partitions
  it across devices by itself, so negatives come from every device and host.
* row-blocked: ``lax.map`` over blocks of anchor rows, each block against all
  columns, rematerialised in the backward pass (``jax.checkpoint``), so at
  most ``block_size x 2B`` entries exist at a time.
* sharded: with a ``mesh``, ``jax.shard_map`` over ``data``: each device
  all-gathers z (2B x d, small) and computes the rows of its own anchors (both
  views of its own images, so the positive is local), row-blocked if large;
  one ``psum`` adds the rows up. Per device that is ``2B/n x 2B`` entries.

``block_size=None`` picks automatically: rows are blocked once a program
would hold more than ``AUTO_BLOCK_ELEMENTS`` matrix entries.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxembed import parallel
from jaxembed.parallel import DATA_AXIS  # the batch axis of parallel.make_mesh


# Matrix entries one program may hold before its rows are blocked: 2^22
# float32 entries are 16 MiB, and the backward pass keeps about four such
# buffers. The plain matrix stays below it up to 2B = 2048 rows (B = 1024,
# the paper's batch). Blocking costs no time on the CPU (scripts/benchmark_loss.py).
AUTO_BLOCK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------ kernels


def _pair_squared_distances(a, b):
  """|a_i - b_j|^2 for rows a (r, d) and b (n, d), in the dtype of the inputs."""
  if a.shape[1] <= 8:
    # Low dimensions (the 2-D map): exact differences; the Gram form would
    # cancel catastrophically for points far from the origin.
    return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)
  sa = jnp.sum(a * a, axis=1)
  sb = jnp.sum(b * b, axis=1)
  # |a - b|^2 via one matmul, clipped at 0 against round-off.
  return jnp.maximum(sa[:, None] + sb[None, :] - 2.0 * jnp.dot(a, b.T, precision="highest"), 0.0)


def squared_distances(z):
  """Pairwise squared Euclidean distances of the rows of z, (n, d) -> (n, n)."""
  return _pair_squared_distances(z, z)


def _cauchy_logits(a, b):
  return -jnp.log1p(_pair_squared_distances(a, b))


def _cosine_logits(a, b, temperature):
  # Rows are unit vectors already (normalised once in cosine_infonce).
  return jnp.dot(a, b.T, precision="highest") / temperature


def _normalise(z):
  return z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------- row losses


def _rows_loss(logits_fn, anchors, anchor_index, z, weight=None):
  """Sum over anchors of ``lse_{j != i} logit(i, j) - logit(i, pos(i))``.

  Args:
    logits_fn: log-similarity of rows, (r, d) x (n, d) -> (r, n).
    anchors: (r, d) anchor rows.
    anchor_index: (r,) their rows in ``z``, which masks the self-pair and
      locates the positive ``(i + n/2) mod n``.
    z: (n, d) all rows of the global batch.
    weight: optional (r,) 0/1 row weights (padding rows get 0).
  """
  n = z.shape[0]
  logits = logits_fn(anchors, z)
  cols = jnp.arange(n)
  logits = jnp.where(cols[None, :] == anchor_index[:, None], -jnp.inf, logits)
  positive = jnp.take_along_axis(logits, ((anchor_index + n // 2) % n)[:, None], axis=1)[:, 0]
  per_row = jax.nn.logsumexp(logits, axis=1) - positive
  if weight is not None:
    per_row = jnp.where(weight > 0, per_row, 0.0)
  return jnp.sum(per_row)


def _blocked_rows_loss(logits_fn, anchors, anchor_index, z, block_size):
  """``_rows_loss`` over row blocks of ``block_size``: one block's matrix at a time."""
  r, d = anchors.shape
  num_blocks = -(-r // block_size)
  pad = num_blocks * block_size - r
  weight = jnp.concatenate([jnp.ones((r,), anchors.dtype), jnp.zeros((pad,), anchors.dtype)])
  anchors = jnp.pad(anchors, ((0, pad), (0, 0)))
  anchor_index = jnp.pad(anchor_index, (0, pad))

  # Remat: the backward pass recomputes each block's matrix instead of
  # keeping all of them, which would cost as much as the plain matrix.
  @jax.checkpoint
  def block(args):
    a, i, w = args
    return _rows_loss(logits_fn, a, i, z, w)

  sums = lax.map(block, (anchors.reshape(num_blocks, block_size, d),
                         anchor_index.reshape(num_blocks, block_size),
                         weight.reshape(num_blocks, block_size)))
  return jnp.sum(sums)


def _auto_block_size(rows, n, block_size):
  """Rows per block, or None for the plain (unblocked) evaluation."""
  if block_size is None:
    if rows * n <= AUTO_BLOCK_ELEMENTS:
      return None
    block_size = max(AUTO_BLOCK_ELEMENTS // n, 8)
  if block_size >= rows:
    return None
  return block_size


def _local_rows_loss(logits_fn, anchors, anchor_index, z, block_size):
  bs = _auto_block_size(anchors.shape[0], z.shape[0], block_size)
  if bs is None:
    return _rows_loss(logits_fn, anchors, anchor_index, z)
  return _blocked_rows_loss(logits_fn, anchors, anchor_index, z, bs)


# ----------------------------------------------------------------- InfoNCE


def _stack_views(z1, z2):
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f"expected two (B, d) views of the same shape, got {z1.shape} and {z2.shape}")
  dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
  # At least float32 (bf16 inputs are promoted); float64 stays float64.
  return jnp.asarray(z1).astype(dtype), jnp.asarray(z2).astype(dtype)


def _data_mesh(mesh):
  """The mesh to shard the loss over: ``mesh``, else a context mesh with a ``data`` axis."""
  if mesh is None:
    context = jax.sharding.get_abstract_mesh()
    if context is None or context.empty or DATA_AXIS not in context.axis_names:
      return None
    mesh = context
  return mesh


def _infonce(logits_fn, z1, z2, block_size, mesh):
  """Mean InfoNCE over the 2B anchors of ``[z1; z2]``, plain, row-blocked or sharded."""
  if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None (automatic), got {block_size!r}")
  b = z1.shape[0]
  n = 2 * b
  mesh = _data_mesh(mesh)
  num_shards = (1 if mesh is None else
                parallel.data_axis_size(mesh, b, "the loss", " or pass mesh=None"))
  if num_shards <= 1:
    z = jnp.concatenate([z1, z2])
    return _local_rows_loss(logits_fn, z, jnp.arange(n), z, block_size) / n

  def per_shard(z1_local, z2_local):
    # This device's images, both views: anchors whose positives are local too.
    rows = z1_local.shape[0]
    first = lax.axis_index(DATA_AXIS) * rows
    z = jnp.concatenate([lax.all_gather(z1_local, DATA_AXIS, tiled=True),
                         lax.all_gather(z2_local, DATA_AXIS, tiled=True)])
    own = first + jnp.arange(rows)
    anchors = jnp.concatenate([z1_local, z2_local])
    anchor_index = jnp.concatenate([own, own + b])
    return lax.psum(_local_rows_loss(logits_fn, anchors, anchor_index, z, block_size), DATA_AXIS)

  total = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
                        out_specs=P())(z1, z2)
  return total / n


def cauchy_infonce(z1, z2, *, block_size=None, mesh=None):
  """Cauchy-kernel InfoNCE of t-SimCNE; z1, z2: (B, d) views of the same B images.

  Args:
    z1: (B, d) outputs of the first views.
    z2: (B, d) outputs of the second views; row i is the twin of ``z1[i]``.
    block_size: anchor rows per block; None blocks automatically above
      ``AUTO_BLOCK_ELEMENTS`` matrix entries per program.
    mesh: a mesh with a ``data`` axis to shard the rows over with
      ``shard_map``; None uses the context mesh (``jax.set_mesh``) if it has
      one, else leaves the partitioning to XLA.

  Returns:
    The scalar loss in float32 (float64 for float64 inputs).
  """
  z1, z2 = _stack_views(z1, z2)
  return _infonce(_cauchy_logits, z1, z2, block_size, mesh)


def cosine_infonce(z1, z2, temperature=0.5, *, block_size=None, mesh=None):
  """SimCLR's InfoNCE with similarity exp(cos / temperature) (reference temperature 0.5).

  ``block_size`` and ``mesh`` are as in ``cauchy_infonce``.
  """
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  z1, z2 = _stack_views(z1, z2)
  return _infonce(functools.partial(_cosine_logits, temperature=temperature),
                  _normalise(z1), _normalise(z2), block_size, mesh)


def get_loss(name, temperature=0.5, *, block_size=None, mesh=None):
  """The loss function ``f(z1, z2)`` named in the config (``cauchy`` or ``cosine``).

  ``block_size`` and ``mesh`` are passed on (see ``cauchy_infonce``); the
  trainer passes its mesh so each device computes only its own rows.
  """
  if name == "cauchy":
    return functools.partial(cauchy_infonce, block_size=block_size, mesh=mesh)
  if name == "cosine":
    return functools.partial(cosine_infonce, temperature=temperature, block_size=block_size,
                             mesh=mesh)
  raise ValueError(f"unknown loss {name!r}; use 'cauchy' or 'cosine'")
