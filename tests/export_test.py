"""Tests of jaxembed.export: the run's data and new images, files written, no overwrite, CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxembed import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  import api_test  # the shared tiny run (trained once per session)
  return api_test.tiny_fit(tmp_path_factory)


def test_export_run_data_matches_training_outputs(run, tmp_path):
  est, _ = run
  out = str(tmp_path / "e" / "embeddings.npz")
  res = export.export(est.workdir_, out=out, verbose=False)
  with np.load(os.path.join(est.workdir_, "embeddings.npz")) as a, np.load(out) as b:
    for key in ("ids", "split", "labels"):
      np.testing.assert_array_equal(a[key], b[key])
    for key in ("embedding", "head", "features"):
      # Other chunk shapes may round differently in the last bits.
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
  names = sorted(os.listdir(tmp_path / "e"))
  assert names == ["duplicates.csv", "embedding.html", "embedding.png", "embeddings.csv",
                   "embeddings.npz", "outliers.csv"]
  with open(tmp_path / "e" / "embeddings.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0][:5] == ["id", "split", "label", "x", "y"] and len(rows) == 161
  assert res["step"] == est.step_
  # Never replaced without overwrite=True.
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(est.workdir_, out=out, verbose=False)
  export.export(est.workdir_, out=out, overwrite=True, plots=False, tables=False, verbose=False)


def test_export_new_images_from_files(run, tmp_path):
  est, images = run
  # 16x16 RGB versions of images 0..5: resized and converted to the run's 8x8 gray.
  rgb = np.repeat(np.kron(images[:6], np.ones((2, 2), np.uint8))[..., None], 3, axis=-1)
  folder = tmp_path / "imgs" / "cls_a"
  folder.mkdir(parents=True)
  (tmp_path / "imgs" / "cls_b").mkdir()
  for i in range(6):
    Image.fromarray(rgb[i]).save(folder.parent / ("cls_a" if i < 4 else "cls_b") / f"{i}.png")
  res = export.export(est.workdir_, data=str(tmp_path / "imgs"), out=str(tmp_path / "f.npz"),
                      plots=False, verbose=False)
  assert res["embedding"].shape == (6, 2)
  np.testing.assert_array_equal(res["labels"], [0, 0, 0, 0, 1, 1])
  assert res["ids"][0].endswith(os.path.join("cls_a", "0.png"))
  assert (tmp_path / "f_duplicates.csv").exists() and (tmp_path / "f_outliers.csv").exists()
  # The same pixels through the estimator (converted in memory) give the same map.
  np.testing.assert_allclose(res["embedding"], est.transform(rgb), rtol=1e-5, atol=1e-5)
  # A MedMNIST-style .npz: every split, labels (N, 1).
  np.savez(tmp_path / "m.npz", train_images=images[:4], train_labels=np.ones((4, 1), int),
           test_images=images[4:7], test_labels=np.zeros((3, 1), int))
  res = export.export(est.workdir_, data=str(tmp_path / "m.npz"), plots=False, tables=False,
                      out=str(tmp_path / "m_out.npz"), verbose=False)
  np.testing.assert_array_equal(res["split"], ["train"] * 4 + ["test"] * 3)
  np.testing.assert_array_equal(res["labels"], [1] * 4 + [0] * 3)
  np.testing.assert_allclose(res["embedding"], est.embedding_[:7], rtol=1e-5, atol=1e-5)


def test_export_cli(run, tmp_path):
  est, images = run
  np.save(tmp_path / "new.npy", images[10:13])
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "jaxembed.export", "--workdir", est.workdir_,
         "--data", str(tmp_path / "new.npy"), "--out", str(tmp_path / "o" / "new.npz"),
         "--nothumbnails"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  with np.load(tmp_path / "o" / "new.npz") as z:
    np.testing.assert_allclose(z["embedding"], est.embedding_[10:13], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z["ids"], ["new:0", "new:1", "new:2"])
  page = (tmp_path / "o" / "new.html").read_text()
  assert "data:image/png" not in page  # --nothumbnails keeps images out of the page
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2
  assert r.stderr.startswith("error: ") and "--overwrite" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
