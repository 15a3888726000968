"""Tests of jaxembed.search: exact kNN against NumPy, near-duplicates, outliers, tables, CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import neighbors

from jaxembed import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_knn(x, q, k, metric):
  if metric == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = 1.0 - qn.astype(np.float64) @ xn.T.astype(np.float64)
  else:
    d = np.sqrt(((q[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,k,chunk", [(1003, 5, 16), (9, 9, None), (50, 1, 7)])
def test_nearest_matches_numpy(metric, n, k, chunk):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  q = rng.normal(size=(23, 6)).astype(np.float32)
  d, i = search.nearest(x, q, k, metric=metric, query_chunk=chunk)
  d_ref, i_ref = numpy_knn(x, q, k, metric)
  np.testing.assert_array_equal(i, i_ref)
  np.testing.assert_allclose(d, d_ref, atol=2e-5)
  assert d.dtype == np.float32 and i.shape == (23, k)


def test_nearest_bad_input():
  x = np.zeros((5, 3), np.float32)
  with pytest.raises(ValueError, match="k must be"):
    search.nearest(x, x, 6)
  with pytest.raises(ValueError, match="same space"):
    search.nearest(x, np.zeros((2, 4)), 2)
  with pytest.raises(ValueError, match="metric"):
    search.nearest(x, x, 2, metric="manhattan")
  with pytest.raises(ValueError, match="NaN"):
    search.nearest(np.full((3, 2), np.nan), x[:, :2], 1)


def test_near_duplicates_finds_copies_and_flags():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(200, 16)).astype(np.float32)
  images = rng.integers(0, 256, size=(200, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, size=200)
  split = np.array(["train"] * 150 + ["test"] * 50)
  feats[170] = feats[10]                       # exact copy, across splits
  images[170] = images[10]
  labels[170] = (labels[10] + 1) % 3           # ... with another label
  feats[20] = feats[30] + 1e-3 * rng.normal(size=16)   # slightly altered, same split
  labels[20] = labels[30]
  images[40] = images[41]                      # identical pixels, unrelated features
  table = search.near_duplicates(feats, threshold=1e-3, images=images, labels=labels,
                                 split=split, ids=[f"im{i}" for i in range(200)])
  pairs = {(int(a), int(b)): r for r, (a, b) in enumerate(zip(table["i"], table["j"]))}
  assert set(pairs) == {(10, 170), (20, 30), (40, 41)}
  r = pairs[(10, 170)]
  assert table["identical"][r] and table["cross_split"][r] and table["label_conflict"][r]
  assert table["distance"][r] < 1e-5 and table["id_j"][r] == "im170"
  r = pairs[(20, 30)]
  assert not table["identical"][r] and not table["cross_split"][r]
  assert not table["label_conflict"][r]
  # Cosine distance checked independently.
  a, b = feats[20].astype(np.float64), feats[30].astype(np.float64)
  ref = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  assert abs(table["distance"][r] - ref) < 2e-6
  assert table["identical"][pairs[(40, 41)]]
  assert list(table["distance"]) == sorted(table["distance"])


def test_breastmnist_leak_pair(shared_data):
  with np.load(shared_data / "breastmnist.npz") as z:
    parts = [(s, z[f"{s}_images"], z[f"{s}_labels"].reshape(-1)) for s in ("train", "val", "test")]
  images = np.concatenate([p[1] for p in parts])
  labels = np.concatenate([p[2] for p in parts])
  split = np.concatenate([[p[0]] * len(p[1]) for p in parts])
  ids = np.concatenate([[f"{p[0]}:{i}" for i in range(len(p[1]))] for p in parts])
  feats = images.reshape(len(images), -1).astype(np.float32)
  table = search.near_duplicates(feats, threshold=1e-6, images=images, labels=labels,
                                 split=split, ids=ids)
  leaks = {(a, b) for a, b, c, l in zip(table["id_i"], table["id_j"], table["cross_split"],
                                        table["label_conflict"]) if c and l}
  assert ("train:115", "test:76") in leaks
  n_train = len(parts[0][1])
  assert labels[115] == 0 and labels[n_train + len(parts[1][1]) + 76] == 1


def test_outliers_mislabel_and_isolated():
  rng = np.random.default_rng(1)
  centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
  labels = np.repeat(np.arange(3), 60)
  xy = centres[labels] + rng.normal(scale=0.7, size=(180, 2)).astype(np.float32)
  labels[5] = 2                                # a point of cluster 0 labelled 2
  xy = np.vstack([xy, [[40.0, 40.0]]]).astype(np.float32)
  labels = np.append(labels, 1)                # far from everything
  table = search.outliers(xy, labels, k=15, ids=[f"p{i}" for i in range(181)])
  flagged = dict(zip(table["index"].tolist(), table["reason"]))
  assert 5 in flagged and "label 2" in flagged[5] and "mostly 0" in flagged[5]
  assert 180 in flagged and "isolated" in flagged[180]
  # The disagreement fraction agrees with scikit-learn's neighbours.
  nn = neighbors.NearestNeighbors(n_neighbors=16).fit(xy)
  _, idx = nn.kneighbors(xy)
  frac5 = np.mean(labels[idx[5, 1:]] != labels[5])
  row = int(np.flatnonzero(table["index"] == 5)[0])
  assert table["disagreement"][row] == pytest.approx(frac5)
  assert len(flagged) < 10                     # clean points stay unflagged
  assert list(table["score"]) == sorted(table["score"], reverse=True)
  unlabelled = search.outliers(xy, None, k=15)
  assert 180 in unlabelled["index"] and 5 not in unlabelled["index"]


def test_write_table_roundtrip(tmp_path):
  table = {"i": np.array([1, 2]), "d": np.array([0.5, 0.25], np.float32),
           "flag": np.array([True, False]), "id": np.array(["a,b", "c"])}
  search.write_table(str(tmp_path / "t.csv"), table)
  with open(tmp_path / "t.csv") as f:
    rows = list(csv.reader(f))
  assert rows == [["i", "d", "flag", "id"], ["1", "0.5", "true", "a,b"],
                  ["2", "0.25", "false", "c"]]


@pytest.mark.slow
def test_search_cli(tmp_path_factory, tmp_path):
  from PIL import Image
  import api_test  # the shared tiny run
  est, images = api_test.tiny_fit(tmp_path_factory)
  query = tmp_path / "q.png"
  Image.fromarray(images[7]).save(query)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out_png = tmp_path / "strip.png"
  r = subprocess.run([sys.executable, "-m", "jaxembed.search", "--workdir", est.workdir_,
                      "--query", str(query), "--k", "4", "--out", str(out_png)],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
  # The query is training image 7 itself: its own features are the nearest.
  assert len(lines) == 4 and lines[0].split()[-1] == "7" and float(lines[0].split()[1]) < 1e-5
  assert out_png.stat().st_size > 0
  # By id: the image itself is left out of its neighbours.
  r = subprocess.run([sys.executable, "-m", "jaxembed.search", "--workdir", est.workdir_,
                      "--query", "7", "--k", "3", "--space", "embedding",
                      "--out", str(tmp_path / "s2.png")],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  ranks = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
  emb = est.embedding_
  ref = np.argsort(np.linalg.norm(emb - emb[7], axis=1), kind="stable")[1:4]
  assert [row[-1] for row in ranks] == [str(j) for j in ref]
  r = subprocess.run([sys.executable, "-m", "jaxembed.search", "--workdir", est.workdir_,
                      "--query", "no-such-id"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 2 and r.stderr.startswith("error: --query 'no-such-id'")


def test_self_neighbours_with_exact_duplicates():
  # Rows 0 and 1 coincide: each must get the other, never itself, whatever the tie order.
  x = np.array([[0, 0], [0, 0], [1, 1], [5, 5]], np.float32)
  d, i = search.self_neighbours(x, 2)
  np.testing.assert_array_equal(i[:2, 0], [1, 0])
  assert (i != np.arange(4)[:, None]).all()
  np.testing.assert_allclose(d[:, 0], [0, 0, np.sqrt(2), np.sqrt(32)], rtol=1e-6)
