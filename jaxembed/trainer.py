"""The t-SimCNE training run: stages, jitted train step, checkpoints, evaluation and outputs.

Reads top to bottom: setup, data, schedule, model and state, restore, the
stage loop, final evaluation and outputs. Randomness comes from one root
key: ``fold_in(root, step)`` per step and a (seed, epoch) permutation of
the data, so a resumed run repeats the uninterrupted one exactly.
"""

import dataclasses
import functools
import os
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxembed import augment
from jaxembed import checkpoint
from jaxembed import configlib
from jaxembed import data as data_lib
from jaxembed import embedding
from jaxembed import evaluate
from jaxembed import losses
from jaxembed import models
from jaxembed import parallel
from jaxembed import plots
from jaxembed import summary
from jaxembed import twopass
from jaxembed import workdir as workdir_lib
from jaxembed.data import pipeline


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, incompatible workdir)."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the schedule, with its place in the global step count."""
  index: int            # 0-based
  epochs: int
  lr_scale: float
  warmup_epochs: int
  head_dim: int
  head_init: str
  trainable: str
  first_step: int       # global step at which the stage starts
  num_steps: int

  @property
  def last_step(self):
    return self.first_step + self.num_steps


def build_stages(stage_dicts, steps_per_epoch):
  out, start = [], 0
  for i, s in enumerate(stage_dicts):
    n = s["epochs"] * steps_per_epoch
    out.append(Stage(index=i, first_step=start, num_steps=n, **s))
    start += n
  return out


def stage_of_step(stages, step):
  """The stage a checkpoint at ``step`` belongs to (a stage end belongs to its stage)."""
  for s in stages:
    if step <= s.last_step and (step > s.first_step or s.index == 0):
      return s
  return stages[-1]


# --------------------------------------------------------------------- optimiser


def learning_rate(config, stage, steps_per_epoch):
  """Warm-up then cosine decay within the stage; peak base_lr * B / 256 * lr_scale (reference)."""
  peak = config.optimizer.base_lr * config.batch_size / 256 * stage.lr_scale
  total = max(stage.num_steps, 1)
  warmup = min(stage.warmup_epochs * steps_per_epoch, total - 1)
  if warmup <= 0:
    return optax.cosine_decay_schedule(peak, total)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)


def make_optimizer(opt_config, lr, trainable, params):
  """SGD (reference: momentum 0.9, decoupled-from-nothing weight decay 5e-4), AdamW or LARS."""
  parts = []
  if opt_config.clip_value > 0:
    parts.append(optax.clip(opt_config.clip_value))
  if opt_config.name == "sgd":
    # PyTorch's SGD adds weight_decay * p to the gradient before momentum.
    parts += [optax.add_decayed_weights(opt_config.weight_decay),
              optax.sgd(lr, momentum=opt_config.momentum)]
  elif opt_config.name == "adamw":
    parts.append(optax.adamw(lr, b1=opt_config.b1, b2=opt_config.b2,
                             weight_decay=opt_config.weight_decay))
  elif opt_config.name == "lars":
    parts.append(optax.lars(lr, weight_decay=opt_config.weight_decay,
                            momentum=opt_config.momentum))
  else:
    raise configlib.ConfigError(f"unknown optimizer {opt_config.name!r}")
  tx = optax.chain(*parts)
  if trainable == "all":
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if is_trainable(path, trainable) else "freeze", params)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def is_trainable(path, trainable):
  """Whether the parameter at ``path`` trains: all | projector (backbone frozen) | head_out."""
  keys = [getattr(p, "key", None) for p in path]
  if trainable == "all":
    return True
  if trainable == "projector":
    return keys[:1] == ["projector"]
  if trainable == "head_out":
    return keys[:2] == ["projector", "out"]
  raise configlib.ConfigError(f"unknown trainable {trainable!r}; use one of {configlib.TRAINABLE}")


# ------------------------------------------------------------------- train step


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
    train_mask = [is_trainable(path, trainable) for path, _ in leaves]
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


# ----------------------------------------------------------------- determinism


# XLA:GPU's switch for run-to-run identical results (jaxlib 0.10 still has it;
# it implies --xla_gpu_exclude_nondeterministic_ops, openxla/xla#12520): no
# atomics-based scatters and reductions, and no autotuning, whose kernel
# choice can change between runs. Only XLA:GPU reads it.
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_deterministic_ops():
  """Adds XLA's deterministic-ops flag to ``XLA_FLAGS`` (``train.deterministic``).

  XLA reads ``XLA_FLAGS`` once, when JAX starts its backend (the first
  computation, or ``jax.devices()``), so this must run before that:
  ``python -m jaxembed.train`` calls it first thing. Called later, the
  flag can no longer take effect: on a GPU that is an error (exact resume
  was asked for and cannot be given); elsewhere it only warns, since only
  XLA:GPU reads the flag.

  Returns:
    True if the flag is in effect for this process's backend.

  Raises:
    configlib.ConfigError: the backend already runs on GPUs without the flag.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if any(tok in (DETERMINISTIC_FLAG, "--xla_gpu_deterministic_ops")
         for tok in current.split()):
    return True
  if _backend_started():
    if any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices()):
      raise configlib.ConfigError(
          "train.deterministic=True needs XLA_FLAGS set before JAX starts its GPU backend, "
          "and it has started already; set XLA_FLAGS=" + DETERMINISTIC_FLAG + " in the "
          "environment, or call jaxembed.trainer.enable_deterministic_ops() before any JAX "
          "computation")
    logging.warning("train.deterministic: the JAX backend has started, so %s cannot take "
                    "effect; the %s backend does not read it", DETERMINISTIC_FLAG,
                    jax.default_backend())
    return False
  os.environ["XLA_FLAGS"] = (current + " " + DETERMINISTIC_FLAG).strip()
  return True


def _backend_started():
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another jax: assume the worst
    return True


# ------------------------------------------------------------------ state set-up


# Parameter initialisation runs once; XLA's optimisation passes cost more time
# compiling it (3-4x on a 2-core CPU) than they could ever save running it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_variables(model, key, image_shape):
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
  return {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
          "step": jnp.asarray(step, jnp.int32), "bad_step": jnp.asarray(-1, jnp.int32)}


# ------------------------------------------------------------------- evaluation


def evaluate_embedding(model, variables, ds, mesh, config):
  """Embeds train and test images; kNN accuracy (train -> test) and silhouette of test (DESIGN 3c).

  Metrics need single-label data: unlabelled (-1) or multi-label runs are
  embedded but not scored, and a run without a test split is scored only
  under the paper protocol.
  """
  train = embedding.embed(model, variables, ds.train_images, mesh, config.eval.batch_size)
  test = (embedding.embed(model, variables, ds.test_images, mesh, config.eval.batch_size)
          if len(ds.test_images) else {k: v[:0] for k, v in train.items()})
  metrics = {"protocol": config.eval.protocol, "head_dim": int(train["z"].shape[1])}
  labelled = ds.train_labels.ndim == 1 and bool(np.all(ds.train_labels >= 0))
  if not labelled:
    return metrics, train, test
  if config.eval.protocol == "paper":
    metrics.update(_paper_metrics(train, test, ds, config))
  elif len(ds.test_labels):
    k = min(config.eval.knn_k, len(ds.train_labels))
    metrics["knn_accuracy"] = float(evaluate.knn_accuracy(
        train["z"], ds.train_labels, test["z"], ds.test_labels, k=k))
    if 1 < len(np.unique(ds.test_labels)) < len(ds.test_labels):
      metrics["silhouette"] = float(evaluate.silhouette_score(test["z"], ds.test_labels))
  return metrics, train, test


def evaluate_and_log(model, state, ds, mesh, config, writer, main, announce=False):
  """Evaluates the current state and logs it: eval/ scalars, and a 2-D map as an image summary.

  Returns what :func:`evaluate_embedding` returns: (metrics, train, test).
  """
  step = int(state["step"])
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  metrics, train, test = evaluate_embedding(model, variables, ds, mesh, config)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
  if main and config.outputs.plots and metrics["head_dim"] == 2:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "map.png")
      split = test if len(ds.test_images) else train
      labels = ds.test_labels if len(ds.test_images) else ds.train_labels
      plots.scatter_png(path, split["z"], labels if labels.ndim == 1 else None,
                        title=f"step {step}")
      writer.write_images(step, {"eval/map": plots.read_png(path)[None]})
  if main and announce:
    print(f"evaluation at step {step}: " + _format_metrics(metrics), flush=True)
  return metrics, train, test


def _paper_metrics(train, test, ds, config):
  """The paper's protocol: everything embedded; kNN on a stratified 10% hold-out of it."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  z = np.concatenate([train["z"], test["z"]])
  y = np.concatenate([ds.train_labels, ds.test_labels])
  tr, te = model_selection.train_test_split(np.arange(len(z)), test_size=0.1, random_state=0,
                                            stratify=y)
  return {"knn_accuracy": float(evaluate.knn_accuracy(z[tr], y[tr], z[te], y[te],
                                                      k=config.eval.knn_k)),
          "silhouette": float(evaluate.silhouette_score(z, y))}


# ------------------------------------------------------------------------- run


def resolve_config(config, ds, stats, num_devices):
  """Fills the data-dependent fields (normalisation, border colour, batch clamp) in place."""
  with config.unlocked():
    n = len(ds.train_images)
    if config.batch_size > n:
      clamped = (n // num_devices) * num_devices
      if clamped < 2:
        raise data_lib.DataError(f"only {n} training images for {num_devices} devices; "
                                 "need at least two images per step")
      logging.warning("batch_size=%d exceeds the %d training images; using %d",
                      config.batch_size, n, clamped)
      print(f"warning: batch_size={config.batch_size} is larger than the {n} training images; "
            f"using batch_size={clamped}", flush=True)
      config.batch_size = clamped
    if config.model.input_mean is None:
      config.model.input_mean = stats["mean"]
    if config.model.input_std is None:
      config.model.input_std = stats["std"]
    if config.aug.fill_value is None and augment.resolve(config.aug)["fill"] == "border_mean":
      config.aug.fill_value = stats["border_mean"]
  return config


def train_and_evaluate(config, workdir):
  """Trains (or resumes) the run of ``config`` in ``workdir`` and writes its outputs.

  Returns the final metrics dict (also written to ``workdir/metrics.json``).
  """
  # ---- setup
  t_start = time.time()
  config = config.copy_and_resolve_references()
  deterministic = _train_option(config, "deterministic", False)
  if deterministic:
    deterministic = enable_deterministic_ops()  # before validate() starts the backend
  stage_dicts = configlib.validate(config)
  main = parallel.is_main_process()
  workdir_lib.prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  if deterministic and main:
    print(f"Deterministic XLA ops: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  # ---- data
  ds = data_lib.load(config.data)
  stats = data_lib.compute_stats(ds.train_images)
  config = resolve_config(config, ds, stats, mesh.devices.size)
  # The batch may have been clamped to the data: the chunks must still divide it.
  configlib.num_chunks(_train_option(config, "chunk_size", 0), config.batch_size,
                       mesh.devices.size)
  run_info = workdir_lib.run_record(config, ds, stats)
  workdir_lib.check_or_write_config(workdir, config, run_info, write=main)

  # ---- schedule
  n_train = len(ds.train_images)
  spe = pipeline.steps_per_epoch(n_train, config.batch_size)
  stages = build_stages(stage_dicts, spe)
  total_steps = stages[-1].last_step
  loss_fn = losses.get_loss(config.loss.name, config.loss.temperature)
  root_key = jax.random.key(config.seed)
  step_key = jax.random.fold_in(root_key, 1)

  # ---- finished already?
  manager = checkpoint.create_manager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                      config.checkpoint.keep, [s.last_step for s in stages])
  latest = manager.latest_step()
  if latest is not None and latest >= total_steps and workdir_lib.is_complete(workdir):
    metrics = workdir_lib.read_metrics(workdir)
    if main:
      print(f"Run in {workdir} is already finished (step {latest}); nothing to train.", flush=True)
      workdir_lib.print_summary(workdir, metrics)
    manager.close()
    return metrics

  # ---- model and state for the stage we start in
  stage = stage_of_step(stages, latest) if latest is not None else stages[0]
  model = models.create_model(config.model, head_dim=stage.head_dim)
  variables = init_variables(model, jax.random.fold_in(root_key, 0), ds.image_shape)
  if stage.index == 0 and config.model.pretrained:
    variables = models.load_pretrained(variables, config.model)
  tx = make_optimizer(config.optimizer, learning_rate(config, stage, spe), stage.trainable,
                      variables["params"])
  state = parallel.replicate(mesh, make_state(variables["params"], variables["batch_stats"], tx,
                                              stage.first_step))
  if latest is not None:
    state = checkpoint.restore(manager, latest, state)
    if main:
      print(f"Resuming from the checkpoint at step {latest} (stage {stage.index + 1}).", flush=True)

  # Device-resident data, uploaded once; or, with data.streaming, batches read
  # from disk each step (the host copy in ds serves statistics and evaluation).
  streaming = bool(config.data.get("streaming", False))
  images_all = None if streaming else parallel.replicate(mesh, jnp.asarray(ds.train_images))
  writer = summary.create_writer(workdir, config.logging.writer, main)
  if latest is None:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  stage_metrics = workdir_lib.read_stage_metrics(workdir)

  # ---- the stage loop
  last_evaluation = None
  for s in stages[stage.index:]:
    if s.index > stage.index:
      model, state, tx = _enter_stage(config, s, model, state, ds, mesh, spe, root_key)
    train_step = make_train_step(model, tx, loss_fn, config.aug, config.batch_size, mesh,
                                 s.trainable, chunk_size=_train_option(config, "chunk_size", 0),
                                 streaming=streaming)
    if main:
      print(f"Stage {s.index + 1}/{len(stages)}: {s.epochs} epochs ({s.num_steps} steps"
            f" of {config.batch_size}), head_dim {s.head_dim}, trains {s.trainable}, "
            f"peak lr {config.optimizer.base_lr * config.batch_size / 256 * s.lr_scale:.3g}",
            flush=True)
    step = int(state["step"])
    batches = (_training_stream(config, ds, mesh, step, s.last_step - step)
               if streaming and step < s.last_step else None)
    periodic_eval = functools.partial(evaluate_and_log, model, ds=ds, mesh=mesh, config=config,
                                      writer=writer, main=main, announce=True)
    state = _run_stage(s, stages, state, train_step, images_all, batches, step_key, manager,
                       config, spe, n_train, writer, mesh, main, periodic_eval)
    step = int(state["step"])
    if str(s.index) in stage_metrics and step == s.last_step and latest == step:
      continue  # evaluated before the interruption
    metrics, train_out, test_out = evaluate_and_log(model, state, ds, mesh, config, writer, main)
    if s is stages[-1]:
      last_evaluation = dict(metrics), train_out, test_out  # the final state: not embedded twice
    stage_metrics[str(s.index)] = metrics
    if main:
      workdir_lib.write_stage_metrics(workdir, stage_metrics)
      print(f"Stage {s.index + 1} done: " + _format_metrics(metrics), flush=True)
  manager.wait_until_finished()

  # ---- final evaluation and outputs
  if last_evaluation is None:  # the last stage was evaluated before an interruption
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    last_evaluation = evaluate_embedding(model, variables, ds, mesh, config)
  metrics, train_out, test_out = last_evaluation
  metrics["stages"] = [stage_metrics[str(s.index)] for s in stages if str(s.index) in stage_metrics]
  metrics["steps"] = int(state["step"])
  metrics["train_seconds_this_invocation"] = round(time.time() - t_start, 1)
  if main:
    workdir_lib.write_run_outputs(workdir, config, ds, train_out, test_out, metrics)
    if config.outputs.plots:
      writer.write_images(int(state["step"]), {
          "embedding": plots.read_png(os.path.join(workdir, "embedding.png"))[None]})
    workdir_lib.print_summary(workdir, metrics)
  writer.flush()
  writer.close()
  manager.close()
  return metrics


def _enter_stage(config, stage, model, state, ds, mesh, spe, root_key):
  """Swaps the output layer for the new stage's and creates the stage's optimiser."""
  new_model = models.create_model(config.model, head_dim=stage.head_dim)
  params = jax.device_get(state["params"])
  hidden = None
  if stage.head_init == "pca":
    hidden = embedding.embed(model, {"params": state["params"],
                                     "batch_stats": state["batch_stats"]},
                             ds.train_images, mesh, config.eval.batch_size)["hidden"]
  key = jax.random.fold_in(jax.random.fold_in(root_key, 2), stage.index)
  params = dict(params)
  params["projector"] = dict(params["projector"])
  params["projector"]["out"] = new_head(stage.head_init, key, hidden, stage.head_dim,
                                        params["projector"]["out"],
                                        config.stages.pca_init_std)
  tx = make_optimizer(config.optimizer, learning_rate(config, stage, spe), stage.trainable, params)
  new_state = make_state(params, jax.device_get(state["batch_stats"]), tx, stage.first_step)
  return new_model, parallel.replicate(mesh, new_state), tx


def _training_stream(config, ds, mesh, start_step, num_steps):
  """The streamed uint8 batches of steps ``start_step ..`` (data.streaming), on the devices."""
  from jaxembed.data import streaming as streaming_lib  # pylint: disable=g-import-not-at-top
  return streaming_lib.stream_batches(
      config.data, config.batch_size, mesh, seed=config.seed, start_step=start_step,
      num_steps=num_steps, prefetch=config.data.get("prefetch", 2), vrange=ds.intensity_range)


def _run_stage(stage, stages, state, train_step, images_all, batches, step_key, manager, config,
               spe, n_train, writer, mesh, main, periodic_eval):
  """Runs the remaining steps of ``stage``; returns the state at its end.

  ``batches`` is None for device-resident data (``images_all`` and the
  step's indices), else the iterator of streamed batches, positioned at the
  stage's current step. ``periodic_eval(state)`` runs every
  ``config.eval.every_epochs`` epochs of the stage (not at its end, which the
  caller evaluates).
  """
  eval_every = config.eval.every_epochs * spe
  step = int(state["step"])
  t_last, step_last = time.time(), step
  total = stages[-1].last_step
  schedule = learning_rate(config, stage, spe)  # for logging; the optimiser holds its own
  while step < stage.last_step:
    if batches is None:
      idx = pipeline.batch_indices(config.seed, step, n_train, config.batch_size)
      state, step_metrics = train_step(state, images_all, parallel.global_from_full(mesh, idx),
                                       step_key)
    else:
      state, step_metrics = train_step(state, next(batches), step_key)
    step += 1
    at_end = step == stage.last_step
    if step % config.logging.every_steps == 0 or at_end:
      loss = float(step_metrics["loss"])
      _check_finite(state, stage, stages)
      now = time.time()
      ips = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
      lr = float(schedule(step - stage.first_step - 1))
      scalars = {"train/loss": loss, "train/lr": lr, "train/images_per_sec": ips,
                 "train/step_seconds": (now - t_last) / max(step - step_last, 1),
                 "train/grad_norm": float(step_metrics["grad_norm"])}
      mem = _device_memory()
      if mem is not None:
        scalars["train/device_memory_bytes"] = mem
      writer.write_scalars(step, scalars)
      if main:
        eta = (total - step) * config.batch_size / max(ips, 1e-9)
        print(f"stage {stage.index + 1}/{len(stages)} | step {step}/{total} "
              f"(epoch {(step - stage.first_step - 1) // spe + 1}/{stage.epochs}) | "
              f"loss {loss:.4f} | lr {lr:.3g} | {ips:,.0f} img/s | ETA {_fmt_time(eta)}",
              flush=True)
      t_last, step_last = now, step
    if at_end or step % config.checkpoint.every_steps == 0:
      _check_finite(state, stage, stages)
      checkpoint.save(manager, step, state)
    if eval_every and not at_end and (step - stage.first_step) % eval_every == 0:
      periodic_eval(state)
      t_last = time.time()  # evaluation time is not training throughput
  return state


def _train_option(config, name, default):
  """``config.train.<name>``, or ``default`` for a config written before the field existed."""
  return config.get("train", {}).get(name, default)


def _check_finite(state, stage, stages):
  bad = int(state["bad_step"])
  if bad >= 0:
    raise TrainingError(
        f"non-finite loss or gradient at step {bad + 1} (stage {stage.index + 1}/{len(stages)}); "
        "the run stopped and the last good checkpoint is kept. Try a lower optimizer.base_lr, "
        "optimizer.clip_value > 0, or model.dtype='float32'.")


def _device_memory():
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_in_use")


def _fmt_time(seconds):
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s"


def _format_metrics(metrics):
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# --------------------------------------------------------- loading a trained run


def load_trained(workdir, step=None, mesh=None):
  """The model and variables of a run's checkpoint (the newest, or ``step``).

  Returns ``(model, variables, config, step)``; ``variables`` holds
  ``params`` and ``batch_stats`` replicated over ``mesh``. Works for a run
  trained on any backend and number of devices.
  """
  config = workdir_lib.load_config(workdir)
  run = workdir_lib.load_run_record(workdir)
  mesh = mesh or parallel.make_mesh()
  stages = build_stages(configlib.stages(config),
                        pipeline.steps_per_epoch(run["num_train"], config.batch_size))
  manager = checkpoint.open_manager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  steps = manager.all_steps()
  if not steps:
    raise workdir_lib.WorkdirError(f"no checkpoint in {workdir}/checkpoints; train first")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise workdir_lib.WorkdirError(f"no checkpoint at step {step} in {workdir}; "
                                   f"available: {sorted(steps)}")
  stage = stage_of_step(stages, step)
  model = models.create_model(config.model, head_dim=stage.head_dim)
  variables = init_variables(model, jax.random.key(0), run["image_shape"])
  tx = make_optimizer(config.optimizer, learning_rate(config, stage, 1), stage.trainable,
                      variables["params"])
  target = parallel.replicate(mesh, make_state(variables["params"], variables["batch_stats"], tx,
                                               step))
  state = checkpoint.restore(manager, step, target)
  manager.close()
  return model, {"params": state["params"], "batch_stats": state["batch_stats"]}, config, step
