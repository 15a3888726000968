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
  """The stages as a list of dicts (one per stage), after checking their fields agree."""
  fields = ("epochs", "lr_scale", "warmup_epochs", "head_dim", "head_init", "trainable")
  values = {f: tuple(config.stages[f]) for f in fields}
  n = len(values["epochs"])
  bad = {f: len(v) for f, v in values.items() if len(v) != n}
  if n == 0 or bad:
    raise ConfigError(f"config.stages fields must all have one entry per stage; got lengths "
                      f"{ {f: len(v) for f, v in values.items()} }")
  out = [{f: values[f][i] for f in fields} for i in range(n)]
  for i, s in enumerate(out, 1):
    where = f"stage {i}"
    if not isinstance(s["epochs"], int) or s["epochs"] < 0:
      raise ConfigError(f"{where}: epochs must be a non-negative integer, got {s['epochs']!r}")
    if s["warmup_epochs"] < 0 or s["warmup_epochs"] > max(s["epochs"], 0):
      raise ConfigError(f"{where}: warmup_epochs={s['warmup_epochs']} must be in [0, epochs={s['epochs']}]")
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
  if sum(s["epochs"] for s in out) == 0:
    raise ConfigError("config.stages.epochs are all 0: nothing to train")
  return out


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


def validate(config, num_devices=None):
  """Raises ConfigError for impossible values; called before any data or model is built."""
  num_devices = num_devices or jax.device_count()
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
  if config.model.name not in models.BACKBONES:
    raise ConfigError(f"unknown model.name {config.model.name!r}; known: {sorted(models.BACKBONES)}")
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
  return stages(config)


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
