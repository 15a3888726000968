"""The t-SimCNE training run: the recipe from data to a 2-D map, with checkpoints and outputs.

:func:`train_and_evaluate` (its body is ``_train_and_evaluate``) reads top
to bottom as the recipe: setup, data, schedule, state (restored from the
newest intact checkpoint if there is one), the stage loop, final evaluation
and outputs. The pieces it puts together live below it in the package: the
schedule and optimiser (jaxembed.schedule), the state and jitted step of a
stage (jaxembed.train_state, jaxembed.train_step), the workdir's files
(jaxembed.workdir). Randomness comes from one root key: ``fold_in(root,
step)`` per step and a (seed, epoch) permutation of the data, so a resumed
run repeats the uninterrupted one exactly. A signal stops the loop at the
end of a step with a checkpoint of it (jaxembed.preempt), and a run that
fails before its first step leaves the workdir as it found it.
"""

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import model_selection

from jaxembed import checkpoint
from jaxembed import configlib
from jaxembed import data as data_lib
from jaxembed import embedding
from jaxembed import evaluate
from jaxembed import parallel
from jaxembed import plots
from jaxembed import preempt
from jaxembed import schedule
from jaxembed import summary
from jaxembed import train_state
from jaxembed import workdir as workdir_lib
from jaxembed.data import pipeline
from jaxembed.data import streaming as streaming_lib


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, incompatible workdir)."""


@dataclasses.dataclass
class _Run:
  """What the stages of one run share: its data, devices, schedule and writers."""
  config: Any
  workdir: str
  ds: Any                      # jaxembed.data.Dataset
  mesh: Any
  stages: list                 # jaxembed.schedule.Stage, in order
  steps_per_epoch: int
  step_key: Any                # the key every step folds its step number into
  root_key: Any
  manager: Any                 # Orbax CheckpointManager
  writer: Any                  # jaxembed.summary writer
  main: bool                   # this process writes files and prints
  images_all: Any = None       # device-resident training images (None when streaming)
  stop: Any = None             # jaxembed.preempt.StopRequest
  guard: Any = None            # jaxembed.workdir.FirstStepGuard
  record: Any = None           # what config.json keeps beside the config (new_run_record)
  estimate: Any = None         # _DurationEstimate of the main process

  @property
  def total_steps(self):
    return self.stages[-1].last_step

  @property
  def streaming(self):
    return self.images_all is None


def train_and_evaluate(config, workdir):
  """Trains (or resumes) the run of ``config`` in ``workdir`` and writes its outputs.

  Returns the final metrics dict (also written to ``workdir/metrics.json``).

  Raises:
    jaxembed.preempt.Stopped: SIGTERM or SIGINT; the checkpoint of the step reached is saved.
    jaxembed.checkpoint.CheckpointError: a save failed, or no checkpoint can be read.
  """
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config, workdir, cleanup):
  """The recipe; ``cleanup`` closes what it opens, in reverse order, however it ends.

  The checkpoint manager finishes its save in flight and the writer closes before the guard
  removes what a run that failed before its first step created; the signal handlers go last.
  """
  # ---- setup
  t_start = time.time()
  config = config.copy_and_resolve_references()
  deterministic = configlib.train_option(config, "deterministic")
  if deterministic:
    deterministic = parallel.enable_deterministic_ops()  # before validate() starts the backend
  stage_dicts = configlib.validate(config)
  main = parallel.is_main_process()
  stop = cleanup.enter_context(preempt.StopRequest(every=config.logging.every_steps))
  guard = cleanup.enter_context(workdir_lib.FirstStepGuard(workdir, main))
  workdir_lib.prepare_workdir(workdir)
  mesh = parallel.make_mesh()
  if deterministic and main:
    print(f"Deterministic XLA ops: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  # ---- data: all of it on every process, or, streamed from a folder, this process's share
  streaming = bool(config.data.get("streaming", False))
  if streaming and config.data.source == "folder":
    ds = streaming_lib.load_process_share(config.data)
    stats = ds.stats()
    print(f"Process {jax.process_index()} of {jax.process_count()} holds training images "
          f"{ds.train_rows[0]}-{ds.train_rows[1] - 1} of {ds.num_train} and test images "
          f"{ds.test_rows[0]}-{ds.test_rows[1] - 1} of {ds.num_test} (data.streaming).",
          flush=True)
  else:
    ds = data_lib.load(config.data)
    stats = data_lib.compute_stats(ds.train_images)
  config = configlib.resolve_config(config, ds.num_train, stats, mesh.devices.size)
  record = workdir_lib.new_run_record(config, ds, stats)
  # Only checked here: config.json is written once the first step has run.
  workdir_lib.check_or_write_config(workdir, config, record, write=False)

  # ---- schedule
  spe = pipeline.steps_per_epoch(ds.num_train, config.batch_size)
  stages = schedule.build_stages(stage_dicts, spe)
  root_key = jax.random.key(config.seed)
  ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
  for path in checkpoint.remove_unfinished(ckdir):
    if main:
      print(f"Removed {path}, an unfinished save of an earlier run.", flush=True)
  manager = cleanup.enter_context(checkpoint.closing(checkpoint.create_manager(
      ckdir, config.checkpoint.keep, [s.last_step for s in stages])))
  newest = manager.latest_step()
  if newest is not None and newest >= stages[-1].last_step and workdir_lib.is_complete(workdir):
    metrics = workdir_lib.read_metrics(workdir)
    if main:
      print(f"Run in {workdir} is already finished (step {newest}); nothing to train.", flush=True)
      workdir_lib.print_summary(workdir, metrics)
    return metrics

  # ---- state for the stage we start in: the newest intact checkpoint, else a new one
  setups = {}

  def setup_for(step):
    """The model, optimiser and state of the stage of ``step`` (None: the start)."""
    s = schedule.stage_of_step(stages, step) if step is not None else stages[0]
    if s.index not in setups:
      # Pretrained weights only for a new run: a resumed one must not need the file.
      setups[s.index] = train_state.setup_stage(
          config, s, mesh, spe, image_shape=ds.image_shape, key=jax.random.fold_in(root_key, 0),
          load_pretrained=step is None, streaming=streaming)
    return setups[s.index]

  latest, restored = checkpoint.restore_newest_intact(
      manager, lambda step: setup_for(step).state, warn=_warn if main else lambda line: None,
      if_none=f"to start over, use a new --workdir or move {ckdir} away")
  stage = schedule.stage_of_step(stages, latest) if latest is not None else stages[0]
  setup = setup_for(latest)
  setups.clear()  # the other stages' restore targets
  state = setup.state if latest is None else restored
  if latest is not None and main:
    print(f"Resuming from the checkpoint at step {latest} (stage {stage.index + 1}).", flush=True)
  # Device-resident data, uploaded once; or, with data.streaming, batches read
  # from disk each step (the host copy in ds serves statistics and evaluation).
  images_all = None if streaming else parallel.replicate(mesh, jnp.asarray(ds.train_images))
  writer = summary.create_writer(workdir, config.logging.writer, main)
  cleanup.callback(writer.close)
  run = _Run(config=config, workdir=workdir, ds=ds, mesh=mesh, stages=stages,
             steps_per_epoch=spe, step_key=jax.random.fold_in(root_key, 1), root_key=root_key,
             manager=manager, writer=writer, main=main, images_all=images_all, stop=stop,
             guard=guard, record=record)
  if latest is None:
    run.writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                              if isinstance(v, (int, float, str, bool))})

  # ---- the stage loop
  stage_metrics = workdir_lib.read_stage_metrics(workdir)
  last_evaluation = None
  stop.defer(int(state["step"]))
  if main:
    print(_stage_plan(stages, config.batch_size, ds.num_train, spe, int(state["step"])),
          flush=True)
  run.estimate = _DurationEstimate(int(state["step"]), run.total_steps, config.batch_size,
                                   stages) if main else None
  for s in stages[stage.index:]:
    if s.index > stage.index:
      variables = train_state.variables_for_stage(config, s, setup.model, state, ds, mesh,
                                                  root_key)
      setup = train_state.setup_stage(config, s, mesh, spe, variables=variables,
                                      streaming=streaming)
      state = setup.state
    if main:
      length = (f"{s.num_steps} steps of {config.batch_size} ({s.epochs} epochs)" if s.in_steps
                else f"{s.epochs} epochs ({s.num_steps} steps of {config.batch_size})")
      print(f"Stage {s.index + 1}/{len(stages)}: {length}, head_dim {s.head_dim}, "
            f"trains {s.trainable}, "
            f"peak lr {config.optimizer.base_lr * config.batch_size / 256 * s.lr_scale:.3g}",
            flush=True)
    state = _train_stage(run, s, setup.model, setup.step, state)
    step = int(state["step"])
    if str(s.index) in stage_metrics and step == s.last_step and latest == step:
      continue  # evaluated before the interruption
    metrics, train_out, test_out = evaluate_and_log(run, setup.model, state)
    if s is stages[-1]:
      last_evaluation = dict(metrics), train_out, test_out  # the final state: not embedded twice
    stage_metrics[str(s.index)] = metrics
    if main:
      workdir_lib.write_stage_metrics(workdir, stage_metrics)
      print(f"Stage {s.index + 1} done: " + _format_metrics(metrics), flush=True)
    if s is not stages[-1] and stop.should_stop(step):  # a signal during the evaluation
      _stop(run, s, state)
  checkpoint.wait(manager)
  _started(run, state)  # no-op unless nothing was left to train (outputs missing)

  # ---- final evaluation and outputs
  if last_evaluation is None:  # the last stage was evaluated before an interruption
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    last_evaluation = evaluate_embedding(setup.model, variables, ds, mesh, config)
  metrics, train_out, test_out = last_evaluation
  metrics["stages"] = [stage_metrics[str(s.index)] for s in stages if str(s.index) in stage_metrics]
  metrics["steps"] = int(state["step"])
  metrics["train_seconds_this_invocation"] = round(time.time() - t_start, 1)
  if main:
    png = workdir_lib.write_run_outputs(workdir, config, ds, train_out, test_out, metrics)
    if png is not None:
      run.writer.write_images(int(state["step"]), {"embedding": plots.decode_png(png)[None]})
    workdir_lib.print_summary(workdir, metrics)
  run.writer.flush()
  return metrics


def _warn(line):
  print(line, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- the loop


def _train_stage(run, stage, model, train_step, state):
  """Runs the remaining steps of ``stage``; returns the state at its end.

  Logs every ``logging.every_steps`` steps, checkpoints every
  ``checkpoint.every_steps`` steps and at the stage's end, and evaluates
  every ``eval.every_epochs`` epochs of the stage (not at its end, which the
  caller evaluates).
  """
  config = run.config
  eval_every = config.eval.every_epochs * run.steps_per_epoch
  step = int(state["step"])
  batches = None
  if run.streaming and step < stage.last_step:
    batches = streaming_lib.stream_batches(
        config.data, config.batch_size, run.mesh, seed=config.seed, start_step=step,
        num_steps=stage.last_step - step, prefetch=config.data.get("prefetch", 2),
        vrange=run.ds.intensity_range)
  progress = _Progress(step)
  while step < stage.last_step:
    if batches is None:
      idx = pipeline.batch_indices(config.seed, step, run.ds.num_train, config.batch_size)
      state, step_metrics = train_step(state, run.images_all,
                                       parallel.global_from_full(run.mesh, idx), run.step_key)
    else:
      state, step_metrics = train_step(state, next(batches), run.step_key)
    step += 1
    _started(run, state)
    if run.estimate is not None:
      run.estimate.after_step(step, state)
    at_end = step == stage.last_step
    if step % config.logging.every_steps == 0 or at_end:
      checkpoint.poll(run.manager)  # a background save that failed stops the run here
      _check_finite(state, stage, run.stages)
      _log_progress(run, stage, step, step_metrics, progress)
    if at_end or step % config.checkpoint.every_steps == 0:
      _check_finite(state, stage, run.stages)
      checkpoint.save(run.manager, step, state)
    if eval_every and not at_end and (step - stage.first_step) % eval_every == 0:
      evaluate_and_log(run, model, state, announce=True)
      progress.restart(step)  # evaluation time is not training throughput
    if run.stop.should_stop(step):  # the same answer on every process at this step
      _stop(run, stage, state)
  return state


def _started(run, state):
  """After the first step of this invocation: the workdir now holds the run (config.json).

  Until then a failure leaves the workdir as it was (jaxembed.workdir.FirstStepGuard).
  """
  if run.guard.committed:
    return
  jax.block_until_ready(state["step"])  # the first step's errors surface before the commit
  workdir_lib.check_or_write_config(run.workdir, run.config, run.record, write=run.main)
  run.guard.commit()


def _stop(run, stage, state):
  """Saves the checkpoint of the step reached (unless it is saved) and raises preempt.Stopped."""
  step = int(state["step"])
  if step not in run.manager.all_steps():
    _check_finite(state, stage, run.stages)
    checkpoint.save(run.manager, step, state)
  checkpoint.wait(run.manager)  # the line printed next must not claim an unfinished checkpoint
  run.writer.flush()
  raise run.stop.stopped(step, run.total_steps, run.manager.directory)


class _Progress:
  """Images per second since the last report, and the time left at that rate.

  (clu's ``periodic_actions.ReportProgress`` would do this, but importing
  clu.periodic_actions imports clu.metric_writers and with it TensorFlow:
  8.7 s and TensorFlow's start-up lines, measured on the 2-core VM.)
  """

  def __init__(self, step):
    self.restart(step)

  def restart(self, step):
    self.time, self.step = time.time(), step

  def report(self, step, batch_size):
    """(images/s, seconds per step) since the last report; starts the next interval."""
    now = time.time()
    steps = max(step - self.step, 1)
    ips = (step - self.step) * batch_size / max(now - self.time, 1e-9)
    seconds_per_step = (now - self.time) / steps
    self.restart(step)
    return ips, seconds_per_step


def _stage_plan(stages, batch_size, num_train, steps_per_epoch, step):
  """One line: the stages' lengths in steps and epochs, and where this invocation starts."""
  total = stages[-1].last_step
  parts = " + ".join(f"{s.num_steps:,}" for s in stages)
  epochs = total / max(steps_per_epoch, 1)
  line = (f"Stage plan: {len(stages)} stages, {total:,} steps of {batch_size} images ({parts}), "
          f"{epochs:,.1f} epochs of the {num_train:,} training images")
  if step:
    line += f"; resuming at step {step:,}"
  return line + "; the expected duration follows the first timed steps."


class _DurationEstimate:
  """Prints, once, the expected training time from the first steps timed after compilation.

  The window starts after the first step of this invocation or of a stage
  (the step that compiled) and lasts ``steps`` steps, or ends with its stage
  when at least 3 steps were timed (else the next stage's steps are timed);
  the device is synchronised at its two ends only, which changes no number.
  The estimate is for the training steps left at the measured rate: stages
  that train only the projector run faster, evaluations add to it.
  """

  def __init__(self, step, total_steps, batch_size, stages, steps=10):
    self.start_step, self.total, self.batch = step, total_steps, batch_size
    self.stages, self.window = stages, steps
    self.t0 = self.s0 = None
    self.done = False

  def after_step(self, step, state):
    if self.done:
      return
    stage = schedule.stage_of_step(self.stages, step)
    if step in (self.start_step + 1, stage.first_step + 1):  # the step that compiled
      jax.block_until_ready(state["step"])
      self.t0, self.s0 = time.time(), step
      return
    timed = step - self.s0 if self.t0 is not None else 0
    if timed < self.window and not (step == stage.last_step and timed >= 3):
      return
    jax.block_until_ready(state["step"])
    seconds_per_step = (time.time() - self.t0) / timed
    left = self.total - step
    faster = any(s.trainable != stage.trainable for s in self.stages if s.last_step > step)
    print(f"Expected duration: about {_fmt_time(left * seconds_per_step)} for the {left:,} steps "
          f"left at {self.batch / seconds_per_step:,.0f} images/s ({seconds_per_step:.3g} s per "
          f"step, measured on steps {self.s0 + 1}-{step} after compilation"
          + ("; stages that train less than everything run faster" if faster else "")
          + "; evaluations add to it)", flush=True)
    self.done = True


def _log_progress(run, stage, step, step_metrics, progress):
  """The scalars of ``step`` to the writer and, on the main process, one progress line."""
  config = run.config
  loss = float(step_metrics["loss"])
  ips, seconds_per_step = progress.report(step, config.batch_size)
  # The optimiser holds its own schedule; this one is for the log.
  lr = float(schedule.learning_rate(config, stage, run.steps_per_epoch)(
      step - stage.first_step - 1))
  scalars = {"train/loss": loss, "train/lr": lr, "train/images_per_sec": ips,
             "train/step_seconds": seconds_per_step,
             "train/grad_norm": float(step_metrics["grad_norm"])}
  mem = _device_memory()
  if mem is not None:
    scalars["train/device_memory_bytes"] = mem
  run.writer.write_scalars(step, scalars)
  if run.main:
    eta = (run.total_steps - step) * config.batch_size / max(ips, 1e-9)
    print(f"stage {stage.index + 1}/{len(run.stages)} | step {step}/{run.total_steps} "
          f"(epoch {(step - stage.first_step - 1) // run.steps_per_epoch + 1}/{stage.epochs}) | "
          f"loss {loss:.4f} | lr {lr:.3g} | {ips:,.0f} img/s | ETA {_fmt_time(eta)}",
          flush=True)


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


# ------------------------------------------------------------------- evaluation


def evaluate_embedding(model, variables, ds, mesh, config):
  """Embeds train and test images; kNN accuracy (train -> test) and silhouette of test (DESIGN 3c).

  Metrics need single-label data: unlabelled (-1) or multi-label runs are
  embedded but not scored, and a run without a test split is scored only
  under the paper protocol.
  """
  embed = lambda images: embedding.embed(model, variables, images, mesh,  # noqa: E731
                                         config.eval.batch_size, process_rows=ds.process_rows)
  train = embed(ds.train_images)
  test = embed(ds.test_images) if ds.num_test else {k: v[:0] for k, v in train.items()}
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


def evaluate_and_log(run, model, state, announce=False):
  """Evaluates the current state and logs it: eval/ scalars, and a 2-D map as an image summary.

  Returns what :func:`evaluate_embedding` returns: (metrics, train, test).
  """
  ds, config = run.ds, run.config
  step = int(state["step"])
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  metrics, train, test = evaluate_embedding(model, variables, ds, run.mesh, config)
  run.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                                  if isinstance(v, float)})
  if run.main and config.outputs.plots and metrics["head_dim"] == 2:
    split = test if ds.num_test else train
    labels = ds.test_labels if ds.num_test else ds.train_labels
    png = plots.scatter_image(split["z"], labels if labels.ndim == 1 else None,
                              title=f"step {step}")
    run.writer.write_images(step, {"eval/map": plots.decode_png(png)[None]})
  if run.main and announce:
    print(f"evaluation at step {step}: " + _format_metrics(metrics), flush=True)
  return metrics, train, test


def _paper_metrics(train, test, ds, config):
  """The paper's protocol: everything embedded; kNN on a stratified 10% hold-out of it."""
  z = np.concatenate([train["z"], test["z"]])
  y = np.concatenate([ds.train_labels, ds.test_labels])
  tr, te = model_selection.train_test_split(np.arange(len(z)), test_size=0.1, random_state=0,
                                            stratify=y)
  return {"knn_accuracy": float(evaluate.knn_accuracy(z[tr], y[tr], z[te], y[te],
                                                      k=config.eval.knn_k)),
          "silhouette": float(evaluate.silhouette_score(z, y))}


# ----------------------------------------------------------------- formatting


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
