"""Checking and resolving a run's configuration before any computation.

Every problem is reported as a :class:`ConfigError` naming the field and
what to set instead; the command line turns it into one line and exit 2.
"""

import json

from absl import logging
import jax
import ml_collections

from jaxembed import augment
from jaxembed import models
from jaxembed.data.convert import DataError

OPTIMIZERS = ("sgd", "adamw", "lars")
LOSSES = ("cauchy", "cosine")
HEAD_INITS = ("lecun", "normal", "pca", "keep")
TRAINABLE = ("all", "projector", "head_out")
DTYPES = ("float32", "bfloat16")


# config.train fields and the value a run behaved as before the field existed
# (a config.json written by an older version lacks it).
TRAIN_DEFAULTS = {"chunk_size": 0, "deterministic": False}


class ConfigError(ValueError):
  """An invalid configuration value."""


def train_option(config, name):
  """``config.train.<name>``, or its default (``TRAIN_DEFAULTS``) where the config lacks it."""
  return config.get("train", {}).get(name, TRAIN_DEFAULTS[name])


def stages(config):
  """The stages as a list of dicts (one per stage), after checking their fields agree.

  Each dict has the per-stage fields of ``config.stages`` plus ``steps`` and
  ``warmup_steps``: the stage's length and warm-up in steps when
  ``stages.steps`` (and ``stages.warmup_steps``) fix them, else None (the
  length follows from the epochs and the data; jaxembed.schedule.build_stages).
  """
  fields = ("epochs", "lr_scale", "warmup_epochs", "head_dim", "head_init", "trainable")
  values = {f: tuple(config.stages[f]) for f in fields}
  n = len(values["epochs"])
  # Stages in steps (a config.json written before these fields existed lacks them: epochs).
  steps = _steps_field(config, "steps", n)
  warmup_steps = _steps_field(config, "warmup_steps", n)
  if warmup_steps is not None and steps is None:
    raise ConfigError("stages.warmup_steps needs stages.steps (stage lengths in steps); set "
                      "both, or use stages.warmup_epochs with stages.epochs")
  bad = {f: len(v) for f, v in values.items() if len(v) != n}
  if n == 0 or bad:
    raise ConfigError(f"config.stages fields must all have one entry per stage; got lengths "
                      f"{ {f: len(v) for f, v in values.items()} }")
  out = [{f: values[f][i] for f in fields} for i in range(n)]
  for i, s in enumerate(out, 1):
    s["steps"] = None if steps is None else steps[i - 1]
    s["warmup_steps"] = None if warmup_steps is None else warmup_steps[i - 1]
    where = f"stage {i}"
    if not isinstance(s["epochs"], int) or s["epochs"] < 0:
      raise ConfigError(f"{where}: epochs must be a non-negative integer, got {s['epochs']!r}")
    if s["steps"] is None:
      if s["warmup_epochs"] < 0 or s["warmup_epochs"] > max(s["epochs"], 0):
        raise ConfigError(f"{where}: warmup_epochs={s['warmup_epochs']} must be in "
                          f"[0, epochs={s['epochs']}]")
    elif s["warmup_steps"] is not None and s["warmup_steps"] > s["steps"]:
      raise ConfigError(f"{where}: warmup_steps={s['warmup_steps']} must be in "
                        f"[0, steps={s['steps']}]")
    if not s["lr_scale"] > 0:
      raise ConfigError(f"{where}: lr_scale must be positive, got {s['lr_scale']}")
    if not isinstance(s["head_dim"], int) or s["head_dim"] < 1:
      raise ConfigError(f"{where}: head_dim must be a positive integer, got {s['head_dim']!r}")
    if s["head_init"] not in HEAD_INITS:
      raise ConfigError(f"{where}: head_init {s['head_init']!r} unknown; use one of {HEAD_INITS}")
    if s["trainable"] not in TRAINABLE:
      raise ConfigError(f"{where}: trainable {s['trainable']!r} unknown; use one of {TRAINABLE}")
    if i == 1 and s["head_init"] == "keep":
      raise ConfigError("stage 1: head_init 'keep' needs a previous stage; use 'lecun' or 'normal'")
    if i > 1 and s["head_init"] == "keep" and s["head_dim"] != out[i - 2]["head_dim"]:
      raise ConfigError(f"{where}: head_init 'keep' but head_dim changes from "
                        f"{out[i - 2]['head_dim']} to {s['head_dim']}; choose 'normal' or 'pca'")
    if s["head_init"] == "pca" and i == 1:
      raise ConfigError("stage 1: head_init 'pca' needs a trained hidden layer; use it from stage 2 on")
  if not config.stages.get("pca_init_std", 1.0) > 0:
    raise ConfigError(f"stages.pca_init_std must be positive, got {config.stages.pca_init_std}")
  if steps is None and sum(s["epochs"] for s in out) == 0:
    raise ConfigError("config.stages.epochs are all 0: nothing to train")
  if steps is not None and sum(steps) == 0:
    raise ConfigError("config.stages.steps are all 0: nothing to train")
  return out


def _steps_field(config, name, num_stages):
  """``config.stages.<name>`` (steps or warmup_steps) as a tuple of ints, or None where unset."""
  value = config.stages.get(name)
  if value is None:
    return None
  value = tuple(value)
  if (len(value) != num_stages
      or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
    raise ConfigError(f"stages.{name} must be None or {num_stages} non-negative integers (one per "
                      f"stage, as stages.epochs), got {value!r}")
  return value


def num_chunks(chunk_size, batch_size, num_devices):
  """Chunks per step of ``train.chunk_size`` images per device (0, or the whole batch: one pass).

  Raises ConfigError when the chunk does not divide the per-device batch.
  """
  per_device = batch_size // num_devices
  if not chunk_size or chunk_size >= per_device:
    return 1
  if per_device % chunk_size:
    raise ConfigError(f"train.chunk_size={chunk_size} does not divide the per-device batch "
                      f"{per_device} (batch_size {batch_size} / {num_devices} devices); use a "
                      f"divisor of {per_device}, or 0 for one pass")
  return per_device // chunk_size


def none_placeholders(config, prefix=""):
  """Reads a tuple field given as ``(None,)`` as None, in place; returns the dotted names.

  ml_collections parses ``--config.model.stage_sizes=None`` for a tuple
  field as the tuple ``(None,)``; no tuple field has a use for that value,
  and None is what the user asked for (a placeholder back at its default).
  """
  changed = []
  with config.unlocked():
    for key in list(config.keys()):
      value = config[key]
      if isinstance(value, ml_collections.ConfigDict):
        changed += none_placeholders(value, f"{prefix}{key}.")
      elif isinstance(value, (tuple, list)) and len(value) == 1 and value[0] is None:
        config[key] = None
        changed.append(f"{prefix}{key}")
  return changed


def resolve_backbone(config):
  """Fits the backbone options of ``config.model`` to ``model.name``, in place.

  ``model.stage_sizes`` and ``model.widths`` mean different things for a
  ResNet and an EfficientNet (jaxembed.models.FAMILIES). Switching the
  backbone on the command line (``--config digits
  --config.model.name=efficientnet_b0``) leaves the config file's values
  for the other family behind; they are reset to None (the backbone's own)
  with one printed line. Values the backbone can use are kept, with a line
  when they change a published net. Stage sizes and widths of different
  lengths are a ConfigError naming the override that works.
  """
  model = config.model
  name = model.name
  if name not in models.BACKBONES:
    raise ConfigError(f"unknown model.name {name!r}; known: {sorted(models.BACKBONES)}")
  own = models.own_options(name)
  reset = [f for f in models.FAMILY_OPTIONS
           if model.get(f) is not None and not models.option_fits(name, f, model.get(f))]
  if reset:
    old = " and ".join(f"model.{f} {tuple(model[f])}" for f in reset)
    mine = " and ".join(str(own[f]) for f in reset)
    _say(f"model.name={name}: reset {old}, written for a backbone of another family, to "
         f"{name}'s own {mine}")
    with config.unlocked():
      for f in reset:
        model[f] = None
  sizes, widths = model.get("stage_sizes"), model.get("widths")
  if models.FAMILIES[name] == "resnet" and (sizes is None) != (widths is None):
    have, missing = ("stage_sizes", "widths") if widths is None else ("widths", "stage_sizes")
    if len(tuple(model[have])) != len(own[missing]):
      raise ConfigError(
          f"model.{have} {tuple(model[have])} has {len(tuple(model[have]))} stages but "
          f"{name}'s own {missing} {own[missing]} has {len(own[missing])}; set "
          f"--config.model.{missing}=<{len(tuple(model[have]))} numbers> or "
          f"--config.model.{have}=None")
  elif sizes is not None and widths is not None and len(tuple(sizes)) != len(tuple(widths)):
    raise ConfigError(
        f"model.stage_sizes {tuple(sizes)} and model.widths {tuple(widths)} differ in length "
        f"(one entry per stage); give both with equal lengths, or --config.model.stage_sizes=None "
        f"--config.model.widths=None for {name}'s own {own['stage_sizes']} and {own['widths']}")
  changed = [f for f in models.FAMILY_OPTIONS
             if model.get(f) is not None and tuple(model[f]) != own[f]]
  if changed and name not in models.CONFIGURABLE:
    _say(f"model.name={name} with " + " and ".join(
        f"model.{f} {tuple(model[f])}" for f in changed) + f": not {name} as published ("
        + " and ".join(str(own[f]) for f in changed) + "); "
        + " ".join(f"--config.model.{f}=None" for f in changed) + " builds it")
  return config


def _say(line):
  logging.info(line)
  print(line, flush=True)


def validate(config, num_devices=None):
  """Raises ConfigError for impossible values; called before any data or model is built.

  Tuple fields given as ``(None,)`` become None and the backbone options are
  fitted to ``model.name`` first, in place (:func:`none_placeholders`,
  :func:`resolve_backbone`). Returns the stages (:func:`stages`).
  """
  num_devices = num_devices or jax.device_count()
  none_placeholders(config)
  resolve_backbone(config)
  if not isinstance(config.batch_size, int) or config.batch_size < 2:
    raise ConfigError(f"batch_size must be an integer >= 2, got {config.batch_size!r}")
  if config.batch_size % num_devices:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")
  chunk = train_option(config, "chunk_size")
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ConfigError(f"train.chunk_size must be an integer >= 0 (images per device; 0 = one "
                      f"pass), got {chunk!r}")
  num_chunks(chunk, config.batch_size, num_devices)
  if not isinstance(train_option(config, "deterministic"), bool):
    raise ConfigError(f"train.deterministic must be True or False, got "
                      f"{train_option(config, 'deterministic')!r}")
  data = config.data
  if data.get("streaming", False):
    if data.source not in ("folder", "tfds"):
      raise ConfigError(f"data.streaming reads data.source 'folder' or 'tfds', not "
                        f"{data.source!r}; the other sources fit in memory: set "
                        "data.streaming=False")
    if data.source == "tfds" and (data.get("max_examples") is not None
                                  or data.get("classes") is not None
                                  or data.get("test_split") == "none"):
      raise ConfigError("data.streaming with TFDS streams the whole training split, so it "
                        "cannot apply data.max_examples, data.classes or "
                        "data.test_split='none'; unset them or set data.streaming=False")
  if not isinstance(data.get("prefetch", 2), int) or data.get("prefetch", 2) < 0:
    raise ConfigError(f"data.prefetch must be an integer >= 0, got {data.get('prefetch')!r}")
  if config.eval.batch_size < 1:
    raise ConfigError(f"eval.batch_size must be positive, got {config.eval.batch_size}")
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype {config.model.dtype!r} unknown; use one of {DTYPES}")
  if config.optimizer.name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer.name {config.optimizer.name!r}; use one of {OPTIMIZERS}")
  if not config.optimizer.base_lr > 0:
    raise ConfigError(f"optimizer.base_lr must be positive, got {config.optimizer.base_lr}")
  if config.optimizer.clip_value < 0 or config.optimizer.weight_decay < 0:
    raise ConfigError("optimizer.clip_value and optimizer.weight_decay must be >= 0")
  if config.loss.name not in LOSSES:
    raise ConfigError(f"unknown loss.name {config.loss.name!r}; use one of {LOSSES}")
  if config.loss.temperature <= 0:
    raise ConfigError(f"loss.temperature must be positive, got {config.loss.temperature}")
  if config.eval.protocol not in ("split", "paper"):
    raise ConfigError(f"eval.protocol {config.eval.protocol!r} unknown; use 'split' or 'paper'")
  every = config.eval.every_epochs
  if not isinstance(every, int) or isinstance(every, bool) or every < 0:
    raise ConfigError(f"eval.every_epochs must be an integer >= 0 (0 = at stage ends only), "
                      f"got {every!r}")
  if config.eval.knn_k < 1:
    raise ConfigError(f"eval.knn_k must be >= 1, got {config.eval.knn_k}")
  if config.logging.writer not in ("tensorboard", "clu"):
    raise ConfigError(f"logging.writer {config.logging.writer!r} unknown; use 'tensorboard' or 'clu'")
  if config.checkpoint.every_steps < 1 or config.logging.every_steps < 1:
    raise ConfigError("checkpoint.every_steps and logging.every_steps must be >= 1")
  try:
    augment.resolve(config.aug)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.aug: {e}") from e
  out = stages(config)
  if all(s["trainable"] != "all" for s in out) and not config.model.get("pretrained"):
    raise ConfigError("no stage trains the backbone (stages.trainable has no 'all') and "
                      "model.pretrained is not set, so the backbone would stay random; pass "
                      "--config.model.pretrained=FILE (docs/pretrained.md) or train it in a "
                      "stage ('all')")
  return out


def resolve_config(config, num_train, stats, num_devices):
  """Fills the data-dependent fields (normalisation, border colour, batch clamp) in place.

  Args:
    config: the run's config (changed in place and returned).
    num_train: the number of training images.
    stats: jaxembed.data.compute_stats of the training images.
    num_devices: devices the batch is split over.

  Raises:
    DataError: too few images for the devices.
    ConfigError: train.chunk_size does not divide the clamped batch.
  """
  with config.unlocked():
    n = num_train
    if config.batch_size > n:
      clamped = (n // num_devices) * num_devices
      if clamped < 2:
        raise DataError(f"only {n} training images for {num_devices} devices; "
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
  # The batch may have been clamped to the data: the chunks must still divide it.
  num_chunks(train_option(config, "chunk_size"), config.batch_size, num_devices)
  return config


def to_json(config):
  """The config as JSON text (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text):
  """Re-creates a ConfigDict from :func:`to_json` output (lists back to tuples)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    return x
  data = tuples(json.loads(text))
  data.pop("run", None)
  return ml_collections.ConfigDict(data)
