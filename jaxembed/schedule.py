"""The t-SimCNE schedule: stages in steps; each stage's learning rate, optimiser, trainable part.

Reference (Böhm, Berens, Kobak, ICLR 2023; the ``tsimcne`` package): three
stages (1000 epochs with a 128-d output; 50 epochs training only a new 2-d
output layer; 450 epochs of everything at lr/1000), SGD with momentum 0.9 and
weight decay 5e-4, base learning rate 0.03 * B / 256, linear warm-up then
cosine decay within each stage. ``configs/common.py`` holds the fields.
"""

import dataclasses
from typing import Optional

import jax
import optax

from jaxembed import configlib


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the schedule, with its place in the global step count."""
  index: int            # 0-based
  epochs: int           # passes over the data (with stages.steps: the passes its steps span)
  lr_scale: float
  warmup_epochs: int
  head_dim: int
  head_init: str
  trainable: str
  first_step: int       # global step at which the stage starts
  num_steps: int
  warmup_steps: Optional[int] = None  # stages.warmup_steps; None: warmup_epochs
  in_steps: bool = False  # the length came from stages.steps, not from epochs

  @property
  def last_step(self):
    return self.first_step + self.num_steps


def build_stages(stage_dicts, steps_per_epoch):
  """The stages of ``configlib.stages`` placed on the global step count.

  A stage lasts ``steps`` steps (with warm-up ``warmup_steps``, or
  ``warmup_epochs`` epochs when that is None) where ``stages.steps`` sets it,
  so that its length does not grow with the data (the CPU variants); else
  ``epochs * steps_per_epoch`` steps with ``warmup_epochs`` epochs of warm-up
  (the reference's epochs).
  """
  out, start = [], 0
  for i, s in enumerate(stage_dicts):
    s = dict(s)
    steps = s.pop("steps", None)
    if steps is None:
      n = s["epochs"] * steps_per_epoch
    else:
      n = steps
      s["epochs"] = -(-n // steps_per_epoch)
    out.append(Stage(index=i, first_step=start, num_steps=n, in_steps=steps is not None, **s))
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
  warmup = stage.warmup_steps
  if warmup is None:
    warmup = stage.warmup_epochs * steps_per_epoch
  warmup = min(warmup, total - 1)
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
