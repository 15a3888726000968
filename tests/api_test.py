"""Tests of the TSimCNE estimator: fit, transform, save/load, parameters and bad input.

One tiny run (``tiny_fit``) is trained once per test session and shared
with export_test.py and search_test.py.
"""

import os

import numpy as np
import pytest
from sklearn import base
from sklearn import datasets

import jaxembed
from jaxembed import api

# A run of a few steps: two-stage-free (one 2-D stage), widths 4-8, 8x8 images.
TINY = {"model.widths": (4, 8), "model.stage_sizes": (1, 1), "model.hidden_dim": 16,
        "checkpoint.every_steps": 100, "logging.every_steps": 100, "eval.batch_size": 64}
N_FIT = 160


def digits_images(start, stop):
  d = datasets.load_digits()
  images = np.round(d.images[start:stop] * (255.0 / 16.0)).astype(np.uint8)
  return images, d.target[start:stop]


def tiny_estimator(workdir=None):
  return jaxembed.TSimCNE(model="resnet_tiny", batch_size=32, epochs=(1,), image_size=8,
                          workdir=workdir, config_overrides=dict(TINY))


def tiny_fit(tmp_path_factory):
  """The shared tiny run: an estimator fitted (unlabelled) on 160 digits, in a session folder.

  The first caller trains (~30-60 s on 2 CPU cores); later callers find the
  finished run in the same folder and only restore it.
  """
  workdir = str(tmp_path_factory.getbasetemp() / "tiny_fit_run")
  images, _ = digits_images(0, N_FIT)
  est = tiny_estimator(workdir).fit(images)
  return est, images


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  return tiny_fit(tmp_path_factory)


@pytest.mark.slow
def test_fit_transform_matches_workdir_embeddings(fitted):
  est, images = fitted
  with np.load(os.path.join(est.workdir_, "embeddings.npz")) as z:
    stored = {k: z[k] for k in z.files}
  # The run trained on every image, in order, with ids 0..N-1.
  np.testing.assert_array_equal(stored["ids"], [str(i) for i in range(N_FIT)])
  np.testing.assert_array_equal(stored["split"], ["train"] * N_FIT)
  out = est.embed(images)
  np.testing.assert_array_equal(out["z"], stored["embedding"])
  np.testing.assert_array_equal(out["features"], stored["features"])
  np.testing.assert_array_equal(est.transform(images), est.embedding_)
  assert est.embedding_.shape == (N_FIT, 2) and np.isfinite(est.embedding_).all()
  assert est.metrics_ is None  # unlabelled: no metrics


@pytest.mark.slow
def test_transform_order_and_batching_independent(fitted):
  est, images = fitted
  perm = np.random.default_rng(0).permutation(N_FIT)[:37]
  # Another batch composition may round differently in the last bits only.
  np.testing.assert_allclose(est.transform(images[perm]), est.embedding_[perm], rtol=1e-5,
                             atol=1e-5)
  # (N, H, W, 1) and (N, H, W) are the same images; 16x16 inputs are resized to 8x8.
  np.testing.assert_array_equal(est.transform(images[:5, ..., None]), est.transform(images[:5]))
  new, _ = digits_images(1000, 1010)
  assert est.transform(new).shape == (10, 2)


@pytest.mark.slow
def test_save_load_bit_equal(fitted, tmp_path):
  est, images = fitted
  before = est.transform(images)
  path = est.save(str(tmp_path / "model"))
  assert sorted(os.listdir(path)) == ["checkpoints", "config.json", "estimator.json",
                                      "metrics.json"]
  with pytest.raises(FileExistsError):
    est.save(path)
  loaded = jaxembed.TSimCNE.load(path)
  np.testing.assert_array_equal(loaded.transform(images), before)
  np.testing.assert_array_equal(loaded.embedding_, est.embedding_)
  assert loaded.get_params() == est.get_params()
  assert loaded.step_ == est.step_


@pytest.mark.slow
def test_fit_again_in_same_workdir_resumes_without_training(fitted, tmp_path_factory, capsys):
  est, images = fitted
  again = tiny_estimator(est.workdir_)
  again.verbose = True
  again.fit(images)
  assert "already finished" in capsys.readouterr().out
  np.testing.assert_array_equal(again.embedding_, est.embedding_)


def test_params_are_stored_verbatim_and_clone():
  overrides = {"model.widths": (4, 8)}
  est = jaxembed.TSimCNE(model="resnet_tiny", epochs=(3, 1, 2), batch_size=64,
                         config_overrides=overrides)
  params = est.get_params()
  assert params["epochs"] == (3, 1, 2) and params["config_overrides"] is overrides
  clone = base.clone(est)
  assert clone.get_params()["epochs"] == (3, 1, 2)
  assert not hasattr(clone, "model_")


def test_make_config():
  est = jaxembed.TSimCNE(model="resnet_tiny", batch_size=64, epochs=(5, 2, 3), aug="medical",
                         seed=7, config_overrides={"model.widths": [4, 8], "eval.knn_k": 5})
  c = est.make_config((28, 28, 1))
  assert c.data.source == "arrays" and c.data.image_size == 28
  assert c.stages.epochs == (5, 2, 3) and c.batch_size == 64 and c.seed == 7
  assert c.aug.preset == "medical" and c.model.widths == (4, 8) and c.eval.knn_k == 5
  one = jaxembed.TSimCNE(epochs=4).make_config((8, 8, 3))
  assert one.stages.epochs == (4,) and one.stages.head_dim == (2,)


def test_bad_input():
  est = jaxembed.TSimCNE()
  with pytest.raises(api.NotFittedError, match="not fitted"):
    est.transform(np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="not square"):
    est.make_config((8, 10, 1))
  with pytest.raises(ValueError, match="unknown field 'model.widthz'"):
    jaxembed.TSimCNE(config_overrides={"model.widthz": 3}).make_config((8, 8, 1))
  with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
    est.fit(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="2 labels for 3 images"):
    est.fit(np.zeros((3, 8, 8), np.uint8), labels=[0, 1])
  with pytest.raises(ValueError, match="test_fraction"):
    jaxembed.TSimCNE(test_fraction=1.0).make_config((8, 8, 1))


def test_in_input_order():
  # A held-out split reorders the run's rows (train first); ids give each image's place.
  rows = np.array([[3.0, 3.5], [0.0, 0.5], [2.0, 2.5]], np.float32)
  out = api.in_input_order(np.array(["3", "0", "2"]), rows, 4)
  np.testing.assert_array_equal(out[[0, 2, 3]], [[0.0, 0.5], [2.0, 2.5], [3.0, 3.5]])
  assert np.isnan(out[1]).all()
