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

The functions see whole global arrays: called inside ``jax.jit`` with the
batch sharded on the ``data`` mesh axis, XLA computes the full 2B x 2B
similarity across devices, so negatives come from every device and host.
"""

import jax
import jax.numpy as jnp


def _infonce_from_logits(logits):
  """InfoNCE from a (2B, 2B) matrix of log-similarities."""
  n = logits.shape[0]
  b = n // 2
  idx = jnp.arange(n)
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)  # mask self-pairs
  positive = logits[idx, (idx + b) % n]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)


def _stack_views(z1, z2):
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"expected two (B, d) views of the same shape, got {z1.shape} and {z2.shape}")
  z = jnp.concatenate([z1, z2], axis=0)
  # At least float32 (bf16 inputs are promoted); float64 stays float64.
  return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def cauchy_infonce(z1, z2):
  """Cauchy-kernel InfoNCE of t-SimCNE; z1, z2: (B, d) views of the same B images."""
  z = _stack_views(z1, z2)
  return _infonce_from_logits(-jnp.log1p(squared_distances(z)))


def squared_distances(z):
  """Pairwise squared Euclidean distances of the rows of z, (n, d) -> (n, n)."""
  if z.shape[1] <= 8:
    # Low dimensions (the 2-D map): exact differences; the Gram form would
    # cancel catastrophically for points far from the origin.
    return jnp.sum(jnp.square(z[:, None, :] - z[None, :, :]), axis=-1)
  sq = jnp.sum(z * z, axis=1)
  # |a - b|^2 via the Gram matrix (one matmul), clipped at 0 against round-off.
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.dot(z, z.T, precision="highest"), 0.0)


def cosine_infonce(z1, z2, temperature=0.5):
  """SimCLR's InfoNCE with similarity exp(cos / temperature) (reference temperature 0.5)."""
  z = _stack_views(z1, z2)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return _infonce_from_logits(jnp.dot(z, z.T, precision="highest") / temperature)


def get_loss(name, temperature=0.5):
  """The loss function ``f(z1, z2)`` named in the config (``cauchy`` or ``cosine``)."""
  if name == "cauchy":
    return cauchy_infonce
  if name == "cosine":
    return lambda z1, z2: cosine_infonce(z1, z2, temperature)
  raise ValueError(f"unknown loss {name!r}; use 'cauchy' or 'cosine'")
