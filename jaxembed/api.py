"""The scikit-learn-style estimator: ``TSimCNE().fit(images).transform(images)``, save and load.

``fit`` builds a config from ``configs/common.py`` (the reference recipe)
with the estimator's parameters and ``config_overrides``, hands the images
to the trainer as an ``arrays`` data source (an ``.npz`` in the run's
workdir, so the run can be resumed and exported like any other) and runs
``trainer.train_and_evaluate``. ``transform`` embeds images with the
trained model (batched, jitted, sharded). ``save`` copies the run's config
and final checkpoint into a folder; ``load`` restores it, and ``transform``
then gives bit-identical results.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import tempfile

import numpy as np
from sklearn import base

from jaxembed.configs import common
from jaxembed import files
from jaxembed import preempt
from jaxembed import runs
from jaxembed import trainer
from jaxembed import workdir as workdir_lib
from jaxembed.data import arrays
from jaxembed.data import convert

ESTIMATOR_FILE = "estimator.json"
FIT_DATA = "fit_data.npz"


class NotFittedError(ValueError, AttributeError):
  """``transform`` or ``save`` before ``fit`` (subclasses what scikit-learn's does)."""


class TSimCNE(base.TransformerMixin, base.BaseEstimator):
  """t-SimCNE: contrastive learning that maps images to 2-D (Böhm, Berens, Kobak, ICLR 2023).

  The parameters mirror the config fields (``configs/common.py``); anything
  else is set through ``config_overrides``, a dict of dotted field names,
  e.g. ``{"model.widths": (16, 32, 64), "stages.lr_scale": (1, 1, 0.5)}``.

  Args:
    model: backbone name (``model.name``), e.g. "resnet18" (reference) or
      "resnet_tiny".
    batch_size: global batch (reference: 1024 in the paper, 512 in the package).
    epochs: epochs per stage (``stages.epochs``); the reference's three
      stages are (1000, 50, 450). A single number or a 1-tuple trains one
      stage directly with a 2-D output.
    image_size: images are resized to this square size; None keeps the
      size of the fitted images (which must then be square).
    channels: 1 or 3 to convert the images; None keeps theirs.
    aug: augmentation preset, "tsimcne" (reference), "medical" or "none".
    loss: "cauchy" (t-SimCNE) or "cosine" (SimCLR).
    base_lr: learning rate per 256 images (reference 0.03).
    test_fraction: fraction of the fitted images held out for metrics
      (kNN accuracy, silhouette) when labels are given; 0 trains on all.
    seed: the root seed.
    workdir: where the run is written (checkpoints, config.json, metrics,
      plots); None uses a temporary folder removed with the estimator.
    config_overrides: dict of further config fields (dotted names).
    verbose: print the trainer's progress.

  Attributes (after ``fit`` or ``load``):
    embedding_: (N, 2) map of the fitted images, in their order.
    config_: the resolved ConfigDict of the run.
    model_, variables_: the Flax model and its variables.
    step_: the checkpoint step.
    metrics_: the run's metrics.json (held-out kNN and silhouette where
      labels and a held-out split were given), or None.
    workdir_: the run's directory.
  """

  def __init__(self, model="resnet18", batch_size=512, epochs=(1000, 50, 450), image_size=None,
               channels=None, aug="tsimcne", loss="cauchy", base_lr=0.03, test_fraction=0.0,
               seed=0, workdir=None, config_overrides=None, verbose=False):
    self.model = model
    self.batch_size = batch_size
    self.epochs = epochs
    self.image_size = image_size
    self.channels = channels
    self.aug = aug
    self.loss = loss
    self.base_lr = base_lr
    self.test_fraction = test_fraction
    self.seed = seed
    self.workdir = workdir
    self.config_overrides = config_overrides
    self.verbose = verbose

  # ------------------------------------------------------------------ config

  def make_config(self, image_shape):
    """The run's ConfigDict for images of ``image_shape`` (H, W, C)."""
    c = common.get_config()
    h, w = image_shape[:2]
    size = self.image_size
    if size is None:
      if h != w:
        raise ValueError(f"images are {h}x{w}, not square; pass image_size=<side> to resize "
                         "them to a square")
      size = int(h)
    c.model.name = self.model
    c.batch_size = int(self.batch_size)
    epochs = (self.epochs,) if np.isscalar(self.epochs) else tuple(self.epochs)
    if len(epochs) == 1:
      # One stage straight to 2-D: everything trains from the start.
      c.stages.epochs, c.stages.lr_scale, c.stages.warmup_epochs = epochs, (1.0,), (0,)
      c.stages.head_dim, c.stages.head_init, c.stages.trainable = (2,), ("lecun",), ("all",)
    elif len(epochs) == len(c.stages.epochs):
      c.stages.epochs = epochs
      c.stages.warmup_epochs = tuple(min(wu, e) for wu, e in zip(c.stages.warmup_epochs, epochs))
    else:
      c.stages.epochs = epochs  # the other stage fields must come from config_overrides
    c.data.image_size = size
    c.data.channels = self.channels
    c.aug.preset = self.aug
    c.loss.name = self.loss
    c.optimizer.base_lr = float(self.base_lr)
    c.seed = int(self.seed)
    if not 0.0 <= float(self.test_fraction) < 1.0:
      raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
    c.data.test_fraction = float(self.test_fraction)
    for key, value in (self.config_overrides or {}).items():
      _set_field(c, key, value)
    c.data.source = "arrays"
    return c

  # --------------------------------------------------------------------- fit

  def fit(self, images, labels=None):
    """Trains on ``images`` ((N, H, W) or (N, H, W, C) uint8); ``labels`` only score the map.

    Returns:
      self.
    """
    images = _check_images(images)
    if labels is not None:
      labels = np.asarray(labels)
      if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images; pass one label per "
                         "image, or labels=None")
    config = self.make_config(images.shape[1:])
    if self.workdir is None:
      # Removed when the estimator is garbage-collected.
      self._tmp = tempfile.TemporaryDirectory(  # pylint: disable=consider-using-with
          prefix="tsimcne_")
      workdir = self._tmp.name
    else:
      workdir = self.workdir
      workdir_lib.prepare_workdir(workdir)
    data_path = os.path.join(os.path.abspath(workdir), FIT_DATA)
    arrays = {"images": images, "ids": np.array([str(i) for i in range(len(images))])}
    if labels is not None:
      arrays["labels"] = labels
    _write_npz_if_changed(data_path, arrays)
    with config.unlocked():
      config.data.path = data_path
      config.data.name = "arrays"
    try:
      with _quiet(not self.verbose):
        metrics = trainer.train_and_evaluate(config, workdir)
    except preempt.Stopped as e:
      raise preempt.Stopped(e.signum, self._stopped_message(e), e.step, e.total_steps,
                            e.directory) from None
    self._restore(workdir)
    self.metrics_ = metrics if any(k in metrics for k in ("knn_accuracy", "silhouette")) else None
    # The map of the fitted images in their order, from the run's embeddings.npz.
    with np.load(os.path.join(workdir, workdir_lib.EMBEDDINGS), allow_pickle=False) as z:
      self.embedding_ = in_input_order(z["ids"], z["embedding"], len(images))
    return self

  def fit_transform(self, images, labels=None):  # pylint: disable=arguments-differ
    """``fit`` and the map of the fitted images (``embedding_``)."""
    return self.fit(images, labels).embedding_

  # --------------------------------------------------------------- transform

  def transform(self, images):
    """The (N, 2) map coordinates of ``images`` (new or fitted ones)."""
    return self.embed(images)["z"]

  def embed(self, images, batch_size=None):
    """All outputs for ``images``: ``z`` (the 2-D head output), ``features``, ``hidden``."""
    self._check_fitted()
    x = arrays.prepare_images(_check_images(images), self.config_.data,
                              vrange=self.intensity_range_,
                              image_size=int(self.image_shape_[0]),
                              channels=int(self.image_shape_[2]))
    return runs.embed_images(self.model_, self.variables_, x, self.config_,
                             batch_size=batch_size)

  # -------------------------------------------------------------- save/load

  def save(self, path, overwrite=False):
    """Writes a folder with config.json, the final checkpoint and the estimator's parameters."""
    self._check_fitted()
    if os.path.exists(path) and os.listdir(path) and not overwrite:
      raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or choose "
                            "another path")
    if os.path.exists(path) and overwrite:
      shutil.rmtree(path)
    os.makedirs(os.path.join(path, "checkpoints"))
    src = self.workdir_
    shutil.copy2(os.path.join(src, workdir_lib.CONFIG), path)
    for name in (workdir_lib.METRICS,):
      if os.path.isfile(os.path.join(src, name)):
        shutil.copy2(os.path.join(src, name), path)
    shutil.copytree(os.path.join(src, "checkpoints", str(self.step_)),
                    os.path.join(path, "checkpoints", str(self.step_)))
    params = self.get_params()
    state = {"params": {k: _jsonable(v) for k, v in params.items()},
             "step": int(self.step_), "embedding": self.embedding_.tolist(),
             "intensity_range": self.intensity_range_}
    files.write_json(os.path.join(path, ESTIMATOR_FILE), state)
    return path

  @classmethod
  def load(cls, path):
    """An estimator restored from a folder written by ``save`` (or a training workdir)."""
    est_file = os.path.join(path, ESTIMATOR_FILE)
    state = {}
    if os.path.isfile(est_file):
      with open(est_file) as f:
        state = json.load(f)
    # JSON has no tuples: the tuple-valued parameters come back as lists.
    params = {k: _tuples(v) for k, v in state.get("params", {}).items()}
    est = cls(**params)
    est._restore(path, state.get("step"))  # pylint: disable=protected-access
    if "intensity_range" in state:
      est.intensity_range_ = state["intensity_range"]
    if "embedding" in state:
      est.embedding_ = np.asarray(state["embedding"], np.float32)
    elif os.path.isfile(os.path.join(path, workdir_lib.EMBEDDINGS)):
      with np.load(os.path.join(path, workdir_lib.EMBEDDINGS)) as z:
        est.embedding_ = z["embedding"]
    metrics_path = os.path.join(path, workdir_lib.METRICS)
    est.metrics_ = None
    if os.path.isfile(metrics_path):
      metrics = workdir_lib.read_metrics(path)
      if any(k in metrics for k in ("knn_accuracy", "silhouette")):
        est.metrics_ = metrics
    return est

  # ---------------------------------------------------------------- helpers

  def _restore(self, workdir, step=None):
    with _quiet(True):
      self.model_, self.variables_, self.config_, self.step_ = runs.load_trained(workdir, step)
    run = runs.run_record(workdir)
    self.image_shape_ = tuple(run["image_shape"])
    self.intensity_range_ = None
    data_path = os.path.join(workdir, FIT_DATA)
    if os.path.isfile(data_path):
      # Non-uint8 images are scaled with the range of the fitted images.
      with np.load(data_path, allow_pickle=False) as z:
        vr = convert.value_range(z["images"], self.config_.data.get("intensity", "minmax"),
                                 self.config_.data.get("window"))
      self.intensity_range_ = list(vr) if vr is not None else None
    self.workdir_ = workdir

  def _stopped_message(self, stopped):
    """What a stopped fit means for the caller of the estimator (not a command to rerun)."""
    name = signal.Signals(stopped.signum).name
    if stopped.step is None:
      return f"fit stopped by {name} before training started; nothing was trained"
    if self.workdir is None:
      return (f"fit stopped by {name} at step {stopped.step} of {stopped.total_steps}; it ran "
              "in a temporary workdir, so it cannot be resumed: pass workdir= to TSimCNE to be "
              "able to resume an interrupted fit")
    return (f"fit stopped by {name} at step {stopped.step} of {stopped.total_steps}; the "
            f"checkpoint is saved in {stopped.directory}: call fit() again with the same images "
            f"and workdir={self.workdir!r} to resume")

  def _check_fitted(self):
    if not hasattr(self, "model_"):
      raise NotFittedError("this TSimCNE is not fitted yet; call fit(images) or "
                           "TSimCNE.load(path) first")


def in_input_order(ids, rows, n):
  """Rows of embeddings.npz (train split, then test) back in the order of the fitted images.

  The fit names image i ``"i"``; images that filters dropped stay NaN.
  """
  out = np.full((n,) + rows.shape[1:], np.nan, np.float32)
  out[np.asarray(ids).astype(int)] = rows
  return out


def _set_field(config, dotted, value):
  """Sets ``config.a.b = value`` for ``"a.b"``, with a clear error for unknown fields."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise ValueError(f"config_overrides: unknown field {dotted!r} (no {p!r}); fields are in "
                       "jaxembed/configs/common.py")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"config_overrides: unknown field {dotted!r}; fields are in "
                     "jaxembed/configs/common.py")
  with node.ignore_type():
    node[leaf] = tuple(value) if isinstance(value, list) else value


def _check_images(images):
  if isinstance(images, (list, tuple)):
    images = np.stack([np.asarray(x) for x in images])
  images = np.asarray(images)
  if images.dtype == object:
    raise TypeError("images must be a numeric array of shape (N, H, W) or (N, H, W, C)")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C) with C 1 or 3, got "
                     f"{images.shape}")
  if len(images) == 0:
    raise ValueError("no images (an empty array)")
  return images


def _jsonable(v):
  if isinstance(v, tuple):
    return list(v)
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in v.items()}
  return v


def _tuples(v):
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  return v


def _write_npz_if_changed(path, arrays):
  """Writes the fit data; an identical file is kept, so that a given workdir resumes."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  data = buf.getvalue()
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  files.write_bytes(path, data)


@contextlib.contextmanager
def _quiet(enabled):
  """Silences the trainer's progress lines (stdout) when the estimator is not verbose."""
  if not enabled:
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()):
    yield
