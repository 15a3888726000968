"""Setting up what a stage trains: model, optimiser, replicated train state and jitted step.

:func:`setup_stage` is the one place that builds them, for the trainer (at
the start and at every stage change), for loading a trained run
(jaxembed.runs), for the benchmarks and for compiling ahead of time for
another platform (``abstract=True``: shapes and shardings only). The state
is a pytree ``{params, batch_stats, opt_state, step, bad_step}``; a stage
change swaps the projector's output layer (:func:`variables_for_stage`) and
starts a new optimiser.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import configlib
from jaxembed import embedding
from jaxembed import losses
from jaxembed import models
from jaxembed import parallel
from jaxembed import schedule
from jaxembed import train_step


# Parameter initialisation runs once; XLA's optimisation passes cost more time
# compiling it (3-4x on a 2-core CPU) than they could ever save running it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_variables(model, key, image_shape):
  """``{"params", "batch_stats"}`` of ``model``, initialised from ``key`` for ``image_shape``."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init = jax.jit(lambda k: model.init(k, dummy, train=False))
  try:
    variables = init.lower(key).compile(compiler_options=FAST_COMPILE)(key)
  except Exception:  # a backend without these options  # pylint: disable=broad-except
    variables = init(key)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def new_head(kind, key, hidden, head_dim, old_out, pca_std=10.0):
  """Parameters {"kernel", "bias"} of a new output layer of width ``head_dim``.

  normal: N(0, 1) entries, the reference's stage-2 initialisation.
  pca: the top principal directions of the hidden layer on the training
    images, scaled so that the first coordinate has standard deviation
    ``pca_std``: a map that starts from the PCA of the learnt representation,
    as t-SNE benefits from PCA initialisation.
  keep: the previous output layer.
  """
  if kind == "keep":
    return old_out
  h_dim = hidden.shape[1] if hidden is not None else old_out["kernel"].shape[0]
  if kind == "normal":
    return {"kernel": jax.random.normal(key, (h_dim, head_dim), jnp.float32),
            "bias": jnp.zeros((head_dim,), jnp.float32)}
  if kind == "lecun":
    kernel = jax.nn.initializers.lecun_normal()(key, (h_dim, head_dim), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((head_dim,), jnp.float32)}
  if kind == "pca":
    mean = hidden.mean(axis=0)
    _, s, vt = np.linalg.svd(hidden - mean, full_matrices=False)
    directions = vt[:head_dim].T                                   # (h_dim, head_dim)
    # Fix the sign of each direction so the initialisation is deterministic.
    directions *= np.sign(directions[np.argmax(np.abs(directions), axis=0), range(head_dim)])
    scale = pca_std / max(s[0] / np.sqrt(len(hidden)), 1e-12)
    kernel = directions * scale
    return {"kernel": jnp.asarray(kernel, jnp.float32),
            "bias": jnp.asarray(-mean @ kernel, jnp.float32)}
  raise configlib.ConfigError(f"unknown head_init {kind!r}")


def make_state(params, batch_stats, tx, step):
  """The train state: variables, the optimiser's state, the step and the first bad step (-1)."""
  return {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
          "step": jnp.asarray(step, jnp.int32), "bad_step": jnp.asarray(-1, jnp.int32)}


@dataclasses.dataclass
class StageSetup:
  """What a stage trains with.

  Attributes:
    model: the t-SimCNE model with the stage's head width, built for the
      platform of the mesh's devices.
    tx: the stage's optimiser (its schedule and trainable parameters).
    state: the train state at the stage's first step, replicated over the
      mesh (or ShapeDtypeStructs with those shardings when abstract).
    step: the jitted train step (jaxembed.train_step.make_train_step), or None.
  """
  model: Any
  tx: Any
  state: Any
  step: Any


def setup_stage(config, stage, mesh, steps_per_epoch, *, variables=None, image_shape=None,
                key=None, load_pretrained=False, streaming=False, abstract=False,
                with_step=True):
  """Builds the model, optimiser, replicated state and jitted step of ``stage``.

  Args:
    config: the resolved run config.
    stage: a :class:`jaxembed.schedule.Stage`.
    mesh: the device mesh; the model's and step's platform-specific paths
      follow the platform of its devices (jaxembed.parallel.platform).
    steps_per_epoch: for the stage's learning-rate schedule.
    variables: ``{"params", "batch_stats"}`` to start from (a previous
      stage's, with the new output layer: :func:`variables_for_stage`);
      None initialises them from ``key`` for images of ``image_shape``.
    image_shape: (H, W, C) of the images, when ``variables`` is None.
    key: the initialisation key, when ``variables`` is None.
    load_pretrained: with ``variables`` None, replace the backbone's
      initial weights by ``config.model.pretrained`` (if set).
    streaming: the step takes streamed batches instead of indices.
    abstract: shapes only (``jax.ShapeDtypeStruct`` with the trainer's
      shardings): nothing is computed or placed on devices, for compiling
      ahead of time for devices this machine does not have.
    with_step: build the jitted train step (False when only the model and
      state are wanted, e.g. to restore a checkpoint for inference on
      another number of devices, where the run's batch layout may not fit).

  Returns:
    A :class:`StageSetup`.
  """
  platform = parallel.platform(mesh)
  model = models.create_model(config.model, head_dim=stage.head_dim, platform=platform)
  if variables is None:
    if abstract:
      dummy = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
      variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                                 jax.random.key(0), dummy)
      variables = {"params": variables["params"],
                   "batch_stats": variables.get("batch_stats", {})}
    else:
      # Initial values do not depend on the platform: initialise where JAX runs.
      variables = init_variables(models.create_model(config.model, head_dim=stage.head_dim),
                                 key, image_shape)
      if load_pretrained and config.model.get("pretrained"):
        variables = models.load_pretrained(variables, config.model)
  tx = schedule.make_optimizer(config.optimizer,
                               schedule.learning_rate(config, stage, steps_per_epoch),
                               stage.trainable, variables["params"])
  if abstract:
    shapes = jax.eval_shape(
        lambda v: make_state(v["params"], v["batch_stats"], tx, stage.first_step), variables)
    replicated = parallel.replicated(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         shapes)
  else:
    state = parallel.replicate(mesh, make_state(variables["params"], variables["batch_stats"],
                                                tx, stage.first_step))
  step = None
  if with_step:
    # The loss gets the mesh: each device computes its own rows of the
    # 2B x 2B matrix (shard_map), instead of XLA partitioning the whole
    # matrix, which above B = 1024 puts collectives inside the row-block loop.
    loss_fn = losses.get_loss(config.loss.name, config.loss.temperature, mesh=mesh)
    step = train_step.make_train_step(
        model, tx, loss_fn, config.aug, config.batch_size, mesh, stage.trainable,
        chunk_size=configlib.train_option(config, "chunk_size"), streaming=streaming)
  return StageSetup(model=model, tx=tx, state=state, step=step)


def variables_for_stage(config, stage, model, state, ds, mesh, root_key):
  """The variables a new stage starts from: the previous state's, with a new output layer.

  The output layer follows ``stage.head_init`` (:func:`new_head`); its key is
  ``fold_in(fold_in(root_key, 2), stage.index)``. For ``pca`` the previous
  model embeds the training images of ``ds`` to find the hidden layer's principal
  directions.
  """
  params = dict(jax.device_get(state["params"]))
  hidden = None
  if stage.head_init == "pca":
    hidden = embedding.embed(model, {"params": state["params"],
                                     "batch_stats": state["batch_stats"]},
                             ds.train_images, mesh, config.eval.batch_size,
                             process_rows=ds.process_rows)["hidden"]
  key = jax.random.fold_in(jax.random.fold_in(root_key, 2), stage.index)
  params["projector"] = dict(params["projector"])
  params["projector"]["out"] = new_head(stage.head_init, key, hidden, stage.head_dim,
                                        params["projector"]["out"],
                                        config.stages.pca_init_std)
  return {"params": params, "batch_stats": jax.device_get(state["batch_stats"])}
