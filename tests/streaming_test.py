"""Training from streamed batches (data.streaming): same run as in memory, resume, config checks."""

import numpy as np
import pytest
from PIL import Image

from jaxembed.configs import digits
from jaxembed import checkpoint, configlib, trainer
from jaxembed.data import streaming


def make_folder(root, n_per_class=24):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n_per_class):
      pixels = rng.integers(0, 256, (10, 10, 3)).astype(np.uint8)
      Image.fromarray(pixels).save(root / c / f"{i}.png")
  return root


def folder_config(path, streaming):
  """One stage of 2 epochs on 36 training images: 8 steps of 8, checkpoints at 4 and 8."""
  c = digits.get_config("smoke")
  c.data.source = "folder"
  c.data.path = str(path)
  c.data.max_examples = None
  c.data.test_fraction = 0.25
  c.data.image_size = 8
  c.data.streaming = streaming
  c.batch_size = 8
  c.stages.epochs = (2,)
  c.stages.lr_scale = (1.0,)
  c.stages.warmup_epochs = (0,)
  c.stages.head_dim = (2,)
  c.stages.head_init = ("lecun",)
  c.stages.trainable = ("all",)
  c.checkpoint.every_steps = 4
  c.logging.every_steps = 4
  c.outputs.plots = False
  # Per-image random views that compile in a moment (warps and jitter take far longer).
  c.aug.preset, c.aug.grayscale_p, c.aug.solarize_p = "none", 0.5, 0.5
  return c


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("stream")
  folder = make_folder(root / "images")
  metrics = trainer.train_and_evaluate(folder_config(folder, True), str(root / "streamed"))
  return folder, root / "streamed", metrics


def embeddings(workdir):
  with np.load(workdir / "embeddings.npz") as f:
    return {k: f[k] for k in ("embedding", "head", "features", "ids")}


@pytest.mark.slow
def test_streamed_folder_run_equals_the_in_memory_run(streamed_run, tmp_path):
  folder, streamed, metrics = streamed_run
  assert metrics["steps"] == 8
  in_memory = tmp_path / "in_memory"
  trainer.train_and_evaluate(folder_config(folder, False), str(in_memory))
  a, b = embeddings(streamed), embeddings(in_memory)
  np.testing.assert_array_equal(a["ids"], b["ids"])
  for key in ("embedding", "head", "features"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  # Trained: the map is not the initial one (a different seed gives another).
  assert np.abs(a["embedding"]).max() > 0


class Interrupted(Exception):
  pass


@pytest.mark.slow
def test_streamed_run_resumes_at_the_checkpointed_step(streamed_run, tmp_path, monkeypatch):
  folder, streamed, _ = streamed_run
  workdir = tmp_path / "resumed"
  save = checkpoint.save

  def save_then_stop(manager, step, state):
    save(manager, step, state)
    if step == 4:
      manager.wait_until_finished()
      raise Interrupted

  monkeypatch.setattr(checkpoint, "save", save_then_stop)
  with pytest.raises(Interrupted):
    trainer.train_and_evaluate(folder_config(folder, True), str(workdir))
  monkeypatch.setattr(checkpoint, "save", save)
  assert not (workdir / "metrics.json").exists()

  started = []
  stream = streaming.stream_batches
  monkeypatch.setattr(streaming, "stream_batches", lambda *a, **kw: started.append(
      (kw["start_step"], kw["num_steps"])) or stream(*a, **kw))
  metrics = trainer.train_and_evaluate(folder_config(folder, True), str(workdir))
  assert started == [(4, 4)]          # the stream restarts at step 4 for the last 4 steps
  assert metrics["steps"] == 8
  a, b = embeddings(streamed), embeddings(workdir)
  for key in ("embedding", "head", "features"):
    np.testing.assert_array_equal(b[key], a[key])


@pytest.mark.parametrize("changes, message", [
    ({"source": "digits"}, "'folder' or 'tfds', not 'digits'"),
    ({"source": "tfds", "name": "mnist", "max_examples": 100}, "whole training split"),
    ({"source": "folder", "path": "x", "prefetch": -1}, "data.prefetch"),
])
def test_streaming_config_errors(changes, message):
  c = digits.get_config("smoke")
  c.data.streaming = True
  c.data.max_examples = None
  for key, value in changes.items():
    c.data[key] = value
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.validate(c, num_devices=8)
