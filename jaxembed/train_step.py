"""The jitted t-SimCNE train step: two augmented views per image, loss on the global batch, update.

One function serves every stage (the stage decides which parameters train)
and every layout: device-resident data gathered by index, or streamed
batches; one pass over the batch, or the two-pass method of
jaxembed.twopass when the batch does not fit. The update is pure: its
randomness is ``fold_in(root_key, step)``, so a resumed run repeats the
uninterrupted one exactly.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxembed import augment
from jaxembed import configlib
from jaxembed import parallel
from jaxembed import schedule
from jaxembed import twopass


def _view_pairs(z):
  """The first and second views' outputs from augment_views' image-major rows.

  Rows 2i and 2i + 1 are image i's two views; splitting the row axis keeps
  each device's rows (the views of its own images) where they are.
  """
  z = z.reshape(z.shape[0] // 2, 2, *z.shape[1:])
  return z[:, 0], z[:, 1]


def make_loss_and_grads(model, loss_fn, aug_config, trainable="all", num_chunks=1, mesh=None):
  """``fn(params, batch_stats, images, key) -> (loss, grads, batch_stats)`` for one batch.

  Two augmented views per image (one key per image, split from ``key``),
  the loss over all 2B views, gradients for the trainable parameters
  (zeros for frozen ones) and the updated BatchNorm statistics.
  ``num_chunks > 1`` computes the same full-batch loss by the two-pass
  method (jaxembed.twopass: activations of one chunk of
  ``B / num_chunks`` images at a time); BatchNorm then normalises each chunk
  with its own statistics (see twopass). ``mesh`` gives the device layout
  of the batch that the chunks follow.
  """
  aug = augment.resolve(aug_config)
  num_devices = 1 if mesh is None else mesh.devices.size
  chunk_sharding = None if mesh is None else NamedSharding(mesh, P(None, parallel.DATA_AXIS))

  def views_of(images, keys1, keys2):
    # Image-major: rows 2i and 2i + 1 are image i's views (_view_pairs).
    return augment.augment_views(jnp.stack([keys1, keys2]), images, aug, mesh)

  def fn(params, batch_stats, images, key):
    k1, k2 = jax.random.split(key)
    b = images.shape[0]
    # The per-image keys of augment_batch(k1, .) and augment_batch(k2, .): the
    # two views of image i, however the batch is cut into chunks.
    keys1, keys2 = jax.random.split(k1, b), jax.random.split(k2, b)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    train_mask = [schedule.is_trainable(path, trainable) for path, _ in leaves]
    train_leaves = [leaf for m, (_, leaf) in zip(train_mask, leaves) if m]

    def apply(train_leaves, x, dropout_key):
      # Gradients are taken only for the parameters that train, so a frozen
      # backbone costs no backward pass.
      it = iter(train_leaves)
      full = jax.tree_util.tree_unflatten(
          treedef, [next(it) if m else leaf for m, (_, leaf) in zip(train_mask, leaves)])
      out, updated = model.apply({"params": full, "batch_stats": batch_stats}, x,
                                 train=True, mutable=["batch_stats"],
                                 rngs={"dropout": dropout_key})
      return out["z"], updated.get("batch_stats", {})

    if num_chunks == 1:
      x = views_of(images, keys1, keys2)

      def loss_of(train_leaves):
        z, stats = apply(train_leaves, x, jax.random.fold_in(key, 2))
        return loss_fn(*_view_pairs(z)), stats

      (loss, new_stats), train_grads = jax.value_and_grad(loss_of, has_aux=True)(train_leaves)
    else:
      inputs = (images, keys1, keys2)  # each view is the one-pass view

      def embed(train_leaves, chunk, index):
        imgs, keys1, keys2 = chunk
        x = views_of(imgs, keys1, keys2)
        z, stats = apply(train_leaves, x, jax.random.fold_in(jax.random.fold_in(key, 2), index))
        return _view_pairs(z), stats

      loss, train_grads, new_stats = twopass.loss_and_grads(
          embed, loss_fn, train_leaves, inputs, num_chunks=num_chunks,
          num_devices=num_devices, chunk_sharding=chunk_sharding)
    it = iter(train_grads)
    grads = jax.tree_util.tree_unflatten(
        treedef, [next(it) if m else jnp.zeros_like(leaf)
                  for m, (_, leaf) in zip(train_mask, leaves)])
    return loss, grads, new_stats

  return fn


def make_train_step(model, tx, loss_fn, aug_config, batch_size, mesh, trainable="all",
                    chunk_size=0, streaming=False):
  """The jitted step: augment two views, loss on the global batch, update.

  With ``streaming=False`` the step is ``step(state, images_all, idx,
  root_key)`` and gathers its batch from the device-resident images; with
  ``streaming=True`` it is ``step(state, images, root_key)`` with the uint8
  batch itself (sharded ``P("data")``, jaxembed.data.streaming). A
  ``chunk_size`` (images per device) below the per-device batch computes
  the gradient by the two-pass method (jaxembed.twopass).

  A step whose loss or gradients are not finite leaves the state unchanged
  and records the step in ``bad_step``; the host stops the run when it sees it.
  """
  num_chunks = configlib.num_chunks(chunk_size, batch_size, mesh.devices.size)
  grad_fn = make_loss_and_grads(model, loss_fn, aug_config, trainable, num_chunks, mesh)

  def update(state, images, root_key):
    key = jax.random.fold_in(root_key, state["step"])
    loss, grads, batch_stats = grad_fn(state["params"], state["batch_stats"], images, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": keep(params, state["params"]),
        "batch_stats": keep(batch_stats, state["batch_stats"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "bad_step": jnp.where(finite | (state["bad_step"] >= 0), state["bad_step"], state["step"]),
    }
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  if streaming:
    return jax.jit(update, in_shardings=(repl, batch, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))

  def step_fn(state, images_all, idx, root_key):
    return update(state, images_all[idx], root_key)

  return jax.jit(step_fn, in_shardings=(repl, repl, batch, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))
