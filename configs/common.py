"""Every configuration field of jaxembed, with its default and what it means.

Each experiment file (``configs/<name>.py``) starts from :func:`get_config`
here and changes what it needs. Numbers marked "reference" come from the
t-SimCNE paper (Böhm, Berens, Kobak, ICLR 2023) and its package ``tsimcne``
(see ``../shared/DESIGN.md`` section 2).

Stages are given field by field as tuples of equal length (one entry per
stage), so that any of them can be overridden on the command line, e.g.
``--config.stages.epochs=(30,10,60)``.
"""

import ml_collections
from ml_collections import config_dict

# Bumped whenever the layout of the workdir or of config.json changes.
FORMAT_VERSION = 1


def get_config():
  """The reference t-SimCNE recipe with every field present."""
  c = ml_collections.ConfigDict()
  c.format_version = FORMAT_VERSION
  c.seed = 0
  # Global batch (both views of B images make 2B rows in the loss).
  # Reference: 1024 in the paper, 512 in the package.
  c.batch_size = 512

  # ------------------------------------------------------------ training
  c.train = ml_collections.ConfigDict()
  # Images per device per chunk of the two-pass step (DESIGN.md 3; for
  # batches whose activations do not fit): the loss and dL/dz come from the
  # whole batch, the backward pass runs chunk by chunk, so negatives stay
  # the whole batch. Must divide batch_size / devices. 0 = one pass. With
  # BatchNorm, each chunk is normalised with its own statistics.
  c.train.chunk_size = 0
  # Adds --xla_gpu_deterministic_ops=true to XLA_FLAGS before JAX starts, so
  # that a resumed GPU run repeats the uninterrupted one exactly (issue #7);
  # slower (no autotuning, no atomics). Only XLA:GPU reads the flag.
  c.train.deterministic = False

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"          # digits | medmnist | folder | tfds | idx | arrays
  c.data.path = config_dict.placeholder(str)   # file or folder for medmnist/folder
  c.data.name = config_dict.placeholder(str)   # TFDS name, or MedMNIST name with data.dir
  # A folder of MedMNIST .npz files (<name>.npz, <name>_64.npz, ...), or the TFDS data_dir.
  c.data.dir = config_dict.placeholder(str)
  # None: the source's default (medmnist "train+val", tfds "train"); "a+b" joins splits.
  c.data.train_split = config_dict.placeholder(str)
  # None: "test"; "none" splits test_fraction off the training split.
  c.data.test_split = config_dict.placeholder(str)
  c.data.image_key = "image"        # TFDS feature names
  c.data.label_key = "label"
  c.data.image_size = 16            # images are resized to this (square); 0 keeps the source size
  c.data.channels = config_dict.placeholder(int)  # 1 or 3; None keeps the source's
  # Held out for evaluation by sources without a test split: digits (0, 1);
  # others [0, 1), where 0 means no test split.
  c.data.test_fraction = 0.2
  c.data.max_examples = config_dict.placeholder(int)
  c.data.classes = config_dict.placeholder(tuple)  # keep only these labels
  c.data.intensity = "minmax"       # for non-uint8 images: minmax | per_image | window
  c.data.window = config_dict.placeholder(tuple)   # (low, high) for intensity=window
  # Read the training batches from disk each step (tf.data, transferred to
  # the devices ahead of use) instead of keeping the training images on the
  # devices: for data that do not fit in device memory (issue #9). Sources
  # folder (the same batches as in memory) and tfds (its own shuffled order).
  # The host still loads the data once for statistics, evaluation and export.
  c.data.streaming = False
  c.data.prefetch = 2               # streamed batches placed on the devices ahead of the step

  # --------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"         # see jaxembed.models.BACKBONES
  c.model.stem = "cifar"            # cifar (3x3, stride 1, no pool) | imagenet
  c.model.width_multiplier = 1.0
  c.model.stage_sizes = config_dict.placeholder(tuple)  # blocks per stage override
  c.model.widths = config_dict.placeholder(tuple)       # channels per stage override
  c.model.hidden_dim = 1024         # reference projector: 512 -> 1024 -> 128
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.pretrained = config_dict.placeholder(str)  # torchvision state dict to import
  # Input normalisation (x - mean) / std on [0, 1] pixels. None: the training
  # data's channel statistics, stored in config.json with the run.
  c.model.input_mean = config_dict.placeholder(tuple)
  c.model.input_std = config_dict.placeholder(tuple)

  # -------------------------------------------------------- augmentation
  # Fields left at None take the value of the preset (jaxembed.augment.PRESETS).
  c.aug = ml_collections.ConfigDict()
  c.aug.preset = "tsimcne"          # tsimcne | medical | none
  c.aug.crop_p = config_dict.placeholder(float)
  c.aug.crop_scale = config_dict.placeholder(tuple)
  c.aug.crop_ratio = config_dict.placeholder(tuple)
  c.aug.hflip_p = config_dict.placeholder(float)
  c.aug.vflip_p = config_dict.placeholder(float)
  c.aug.rot90_p = config_dict.placeholder(float)
  c.aug.rotate_p = config_dict.placeholder(float)
  c.aug.rotate_degrees = config_dict.placeholder(float)
  c.aug.fill = config_dict.placeholder(str)          # constant | border_mean | reflect
  c.aug.fill_value = config_dict.placeholder(tuple)  # set from the data for border_mean
  c.aug.jitter_p = config_dict.placeholder(float)
  c.aug.brightness = config_dict.placeholder(float)
  c.aug.contrast = config_dict.placeholder(float)
  c.aug.saturation = config_dict.placeholder(float)
  c.aug.hue = config_dict.placeholder(float)
  c.aug.grayscale_p = config_dict.placeholder(float)
  c.aug.blur_p = config_dict.placeholder(float)
  c.aug.blur_sigma = config_dict.placeholder(tuple)
  c.aug.solarize_p = config_dict.placeholder(float)
  c.aug.solarize_threshold = config_dict.placeholder(float)

  # ---------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "cauchy"            # cauchy | cosine
  c.loss.temperature = 0.5          # cosine only (reference SimCLR value)

  # ----------------------------------------------------------- optimiser
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"          # sgd | adamw | lars
  c.optimizer.base_lr = 0.03        # reference: lr = 0.03 * batch_size / 256
  c.optimizer.momentum = 0.9        # reference
  c.optimizer.weight_decay = 5e-4   # reference, on all parameters
  c.optimizer.clip_value = 4.0      # reference package clips gradients by value; 0 = off
  c.optimizer.b1 = 0.9              # adamw
  c.optimizer.b2 = 0.999            # adamw

  # -------------------------------------------------------------- stages
  # Reference: (1) 1000 epochs with the 128-d head; (2) 50 epochs training
  # only a new Linear(1024, 2) initialised N(0, 1); (3) 450 epochs of
  # everything at lr/1000; warm-up [10, 0, 10] epochs, cosine decay per stage.
  c.stages = ml_collections.ConfigDict()
  c.stages.epochs = (1000, 50, 450)
  c.stages.lr_scale = (1.0, 1.0, 0.001)
  c.stages.warmup_epochs = (10, 0, 10)
  # Stage lengths in optimiser steps instead of epochs (one per stage), so
  # that a run's length does not grow with the data (the `cpu` variants);
  # when set, stages.epochs is ignored. warmup_steps likewise replaces
  # warmup_epochs (None: warmup_epochs, in epochs of the data, at most the
  # stage). config.json records both, so a resumed run repeats them.
  c.stages.steps = config_dict.placeholder(tuple)
  c.stages.warmup_steps = config_dict.placeholder(tuple)
  c.stages.head_dim = (128, 2, 2)
  # How the output layer is created when the head dimension changes:
  # normal (N(0, 1), the reference) | pca (top principal directions of the
  # hidden layer on the training data) | lecun (Flax default).
  c.stages.head_init = ("lecun", "normal", "keep")
  # Standard deviation of the first coordinate of a 'pca'-initialised output.
  c.stages.pca_init_std = 10.0
  # Which parameters train: all | projector (backbone frozen) | head_out (only
  # the output layer, the reference's stage 2).
  c.stages.trainable = ("all", "head_out", "all")

  # ---------------------------------------------------------- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = "split"         # split (DESIGN 3c) | paper
  c.eval.knn_k = 15                 # reference
  c.eval.every_epochs = 0           # periodic evaluation during training; 0 = stage ends only
  c.eval.batch_size = 1024          # images per step when embedding

  # ---------------------------------------------------------- checkpoints
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2             # newest checkpoints kept besides stage ends

  # -------------------------------------------------------------- logging
  c.logging = ml_collections.ConfigDict()
  c.logging.every_steps = 50
  # tensorboard: TensorBoard's own event writer (no TensorFlow import) | clu:
  # clu.metric_writers (imports TensorFlow, ~15 s on 2 CPU cores).
  c.logging.writer = "tensorboard"

  # -------------------------------------------------------------- outputs
  c.outputs = ml_collections.ConfigDict()
  c.outputs.plots = True
  c.outputs.html_thumbnails = True  # False keeps images out of embedding.html
  return c


def apply_args(config, arg, variants):
  """Applies comma-separated variants of ``arg`` (e.g. "smoke") to ``config``.

  ``variants`` maps a variant name to a function that edits the config in place.
  """
  for name in [a.strip() for a in (arg or "").split(",") if a.strip()]:
    if name not in variants:
      raise ValueError(f"unknown config variant {name!r}; known: {sorted(variants)}")
    variants[name](config)
  return config


# Optimiser steps of the three stages of the `cpu` variants (batch 128; docs/BENCHMARKS.md,
# "The cpu variants"): ~0.55-0.7 s per full step at 28 px on two idle cores (stage 2, projector
# only, ~5x faster), about 5 minutes of steps; medmnist:breastmnist,cpu took 550 s with
# compilation and evaluations at load average ~2.3.
CPU_STEPS = (100, 100, 300)


def cpu(config, short, steps):
  """The `cpu` variant of an image config: minutes on two CPU cores, whatever the data.

  Takes the small ResNet, optimiser and stage settings of ``short`` (the
  default job, configs/digits.py) and gives the stages fixed lengths in
  steps, so that the run does not grow with the number of images (the
  digits schedule in epochs made 460 epochs: 100 min for PneumoniaMNIST).
  ``steps`` are the optimiser steps of the three stages.
  """
  config.model.name = short.model.name
  config.model.stem = short.model.stem
  config.model.widths = short.model.widths
  config.model.stage_sizes = short.model.stage_sizes
  config.model.hidden_dim = short.model.hidden_dim
  config.batch_size = short.batch_size
  config.optimizer = short.optimizer
  config.stages = short.stages
  config.stages.steps = tuple(steps)
  # The digits' 2-epoch warm-ups (of 11 steps each) in steps.
  config.stages.warmup_steps = tuple(min(20, s) if w else 0
                                     for s, w in zip(steps, short.stages.warmup_epochs))


def smoke(config):
  """Shrinks any config to a run of a few seconds (tests, quick checks)."""
  config.batch_size = 32
  config.data.max_examples = 256
  config.data.image_size = 8
  config.model.name = "resnet_tiny"
  config.model.widths = (4, 8)
  config.model.stage_sizes = (1, 1)
  config.model.hidden_dim = 16
  config.stages.epochs = (1, 1, 1)
  config.stages.warmup_epochs = (0, 0, 0)
  config.stages.steps = None          # epochs, also after a variant in steps (cpu)
  config.stages.warmup_steps = None
  config.checkpoint.every_steps = 4
  config.logging.every_steps = 2
  config.eval.batch_size = 128
