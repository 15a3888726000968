"""The two-pass gradient for batches whose activations do not fit: full-batch loss, chunked backward.

Gradient accumulation over micro-batches (e.g. ``optax.MultiSteps``) would
restrict each anchor's negatives to its micro-batch and so change the
t-SimCNE objective (DESIGN.md section 3: big batches never shrink the
negatives). Instead, as in GradCache (Gao et al., 2021), the step runs

1. pass 1: embed every chunk of the batch without gradients, keeping only
   the (2B, d) outputs; compute the loss on the whole batch and its
   gradient dL/dz with respect to those outputs;
2. pass 2: for each chunk, recompute its forward pass with ``jax.vjp`` and
   back-propagate the cached dL/dz of its rows; the parameter gradients of
   the chunks add up to the gradient of the full-batch loss.

Memory holds the activations of one chunk at a time plus the (2B, d)
outputs, at the price of a second forward pass.

A chunk takes ``c`` images from *every* device (the rows ``k*c .. (k+1)*c-1``
of each device's block of the batch), so all devices work on every chunk
and no image moves between devices.

BatchNorm: in training mode a chunk is normalised with the statistics of
its own ``2 * c * num_devices`` views, not of the whole batch (the standard
GradCache behaviour). Pass 1 and pass 2 see the same chunk, so they agree
with each other, and the gradient is exactly that of the loss of those
per-chunk-normalised outputs; it equals the one-pass gradient only for a
model without BatchNorm (or with one chunk). The running statistics are
the mean over chunks of each chunk's update, which moves their mean exactly
as a full-batch update would (equal chunks) and their variance by the
within-chunk part only.
"""

import jax
from jax import lax
import jax.numpy as jnp


def to_chunks(x, num_devices, num_chunks):
  """(B, ...) batch -> (num_chunks, B / num_chunks, ...), chunk k = rows k*c..(k+1)*c-1 per device.

  The batch is laid out as ``num_devices`` contiguous blocks (its
  ``P("data")`` sharding); chunk k takes the same ``c`` rows of every block,
  so a chunk sharded ``P(None, "data")`` keeps each row on its device.
  """
  b = x.shape[0]
  if b % (num_devices * num_chunks):
    raise ValueError(f"a batch of {b} rows does not split into {num_chunks} chunks on "
                     f"{num_devices} devices; choose a chunk size that divides the per-device "
                     "batch")
  c = b // (num_devices * num_chunks)
  x = x.reshape((num_devices, num_chunks, c) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((num_chunks, num_devices * c) + x.shape[3:])


def from_chunks(x, num_devices):
  """The inverse of :func:`to_chunks`: (num_chunks, n*c, ...) -> (B, ...)."""
  k, nc = x.shape[:2]
  c = nc // num_devices
  x = x.reshape((k, num_devices, c) + x.shape[2:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((k * nc,) + x.shape[3:])


def loss_and_grads(embed, loss_fn, params, inputs, *, num_chunks, num_devices=1,
                   chunk_sharding=None):
  """Loss, parameter gradients and mean auxiliary output of the full batch, by two passes.

  Args:
    embed: ``embed(params, chunk, index) -> ((z1, z2), aux)``: the two views'
      outputs (m, d) each for a chunk of m images, and an auxiliary pytree
      (the updated BatchNorm statistics). ``chunk`` is ``inputs`` restricted
      to the chunk's rows, ``index`` the chunk number (for per-chunk
      randomness such as dropout, which must be the same in both passes).
      It must be deterministic given its arguments.
    loss_fn: ``loss_fn(z1, z2) -> scalar`` on the whole batch (B, d) x (B, d).
    params: the pytree to differentiate.
    inputs: pytree of arrays with leading dimension B (images, per-image keys).
    num_chunks: chunks per step (B / num_chunks rows each).
    num_devices: devices the batch is sharded over (its row blocks).
    chunk_sharding: optional sharding of a stacked chunk array
      (``NamedSharding(mesh, P(None, "data"))``), imposed on the chunked
      inputs so that each device keeps its own rows.

  Returns:
    ``(loss, grads, aux)``: grads like ``params``; aux the mean over chunks.
  """
  def constrain(x):
    return x if chunk_sharding is None else lax.with_sharding_constraint(x, chunk_sharding)

  chunks = jax.tree.map(lambda x: constrain(to_chunks(x, num_devices, num_chunks)), inputs)
  index = jnp.arange(num_chunks)

  # Pass 1: outputs only; nothing is kept for a backward pass.
  def forward(_, xs):
    chunk, i = xs
    (z1, z2), aux = embed(params, chunk, i)
    return None, (z1, z2, aux)

  _, (z1, z2, aux) = lax.scan(forward, None, (chunks, index))
  z1, z2 = from_chunks(z1, num_devices), from_chunks(z2, num_devices)
  aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
  # Every anchor meets every negative of the batch here.
  loss, (g1, g2) = jax.value_and_grad(loss_fn, argnums=(0, 1))(z1, z2)
  g1 = constrain(to_chunks(g1, num_devices, num_chunks))
  g2 = constrain(to_chunks(g2, num_devices, num_chunks))

  # Pass 2: per chunk, the forward again and the backward of the cached dL/dz.
  def backward(total, xs):
    chunk, i, c1, c2 = xs
    _, pullback, _ = jax.vjp(lambda p: embed(p, chunk, i), params, has_aux=True)
    (grads,) = pullback((c1, c2))
    return jax.tree.map(jnp.add, total, grads), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = lax.scan(backward, zeros, (chunks, index, g1, g2))
  return loss, grads, aux
