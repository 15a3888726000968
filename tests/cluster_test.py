"""Tests of jaxembed.cluster on data with known structure, against hand and NumPy computations."""

import csv
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from jaxembed import cluster
from jaxembed.commands import cluster as cluster_command


def blobs(n_per=60, k=4, dims=2, spread=0.3, seed=0):
  """k well-separated Gaussian blobs (centres 10 apart on a grid) and their labels."""
  rng = np.random.default_rng(seed)
  centres = np.array(list(itertools.product(range(3), repeat=dims))[:k], float) * 10.0
  x = np.concatenate([c + spread * rng.standard_normal((n_per, dims)) for c in centres])
  y = np.repeat(np.arange(k), n_per)
  return x, y


# ------------------------------------------------------------------ fitting


@pytest.mark.parametrize("method,criterion", [("gmm", None), ("kmeans", "silhouette"),
                                              ("kmeans", "bic"), ("hdbscan", None)])
def test_separated_blobs_are_found_exactly(method, criterion):
  x, y = blobs()
  r = cluster.fit_clusters(x, method, k_range=(2, 8), criterion=criterion)
  m = cluster.cluster_metrics(r.assignments, y)
  assert r.k == 4 and r.n_clusters == 4
  assert m["ari"] == pytest.approx(1.0) and m["nmi"] == pytest.approx(1.0)
  assert m["purity"] == 1.0
  assert (r.assignments >= 0).all()
  # Each centre sits at its blob's mean.
  for c in range(4):
    np.testing.assert_allclose(r.centres[c], x[r.assignments == c].mean(axis=0), atol=0.05)


def test_selection_curve_minimum_is_the_chosen_k():
  x, _ = blobs(k=5)
  r = cluster.fit_clusters(x, "gmm", k_range=(2, 9))
  np.testing.assert_array_equal(r.k_values, np.arange(2, 10))
  assert r.k == r.k_values[np.argmin(r.bic)] == 5
  r = cluster.fit_clusters(x, "kmeans", k_range=(2, 9))
  assert r.k == r.k_values[np.argmax(r.silhouette)] == 5 and r.bic is None


def test_given_k_and_size_order():
  x, _ = blobs(n_per=40, k=3)
  x = np.concatenate([x, x[:40] + 0.01])  # blob 0 twice as large
  for method in ("gmm", "kmeans"):
    r = cluster.fit_clusters(x, method, n_clusters=3)
    assert r.criterion == "given" and r.k == 3 and r.k_values is None
    np.testing.assert_array_equal(r.sizes, [80, 40, 40])
    assert (r.assignments[:40] == 0).all()


def test_same_seed_same_result_and_seed_is_used():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 2))  # no structure: the result depends on the seed
  a = cluster.fit_clusters(x, "gmm", k_range=(2, 6), seed=3)
  b = cluster.fit_clusters(x, "gmm", k_range=(2, 6), seed=3)
  np.testing.assert_array_equal(a.assignments, b.assignments)
  np.testing.assert_array_equal(a.bic, b.bic)
  k1 = cluster.fit_clusters(x, "kmeans", n_clusters=5, seed=0, n_init=1)
  k2 = cluster.fit_clusters(x, "kmeans", n_clusters=5, seed=0, n_init=1)
  np.testing.assert_array_equal(k1.assignments, k2.assignments)
  others = [cluster.fit_clusters(x, "kmeans", n_clusters=5, seed=s, n_init=1).centres
            for s in range(1, 6)]
  assert any(c.shape != k1.centres.shape or not np.allclose(c, k1.centres) for c in others)


def test_subsampled_selection_assigns_every_point():
  x, y = blobs(n_per=100, k=3)
  r = cluster.fit_clusters(x, "gmm", k_range=(2, 5), max_select_points=120)
  assert r.select_points == 120 and r.k == 3
  assert cluster.cluster_metrics(r.assignments, y)["ari"] == pytest.approx(1.0)


def test_hdbscan_marks_scattered_points_as_noise():
  x, y = blobs(n_per=50, k=3, spread=0.2)
  far = np.array([[-40.0, -40.0], [60.0, -35.0], [-30.0, 70.0], [80.0, 80.0], [-50.0, 20.0]])
  xs = np.concatenate([x, far])
  ys = np.concatenate([y, [0, 1, 2, 0, 1]])
  r = cluster.fit_clusters(xs, "hdbscan", min_cluster_size=10)
  assert r.n_clusters == 3 and r.criterion == "density"
  np.testing.assert_array_equal(r.assignments[-5:], -1)
  assert (r.assignments[:-5] >= 0).all()
  assert (r.confidence[-5:] == 0).all()
  m = cluster.cluster_metrics(r.assignments, ys)
  assert m["noise_fraction"] == pytest.approx(5 / 155)
  # Purity counts noise as wrong; on the clustered points alone everything is right.
  assert m["purity"] == pytest.approx(150 / 155)
  assert m["clustered"] == {"ari": pytest.approx(1.0), "nmi": pytest.approx(1.0), "purity": 1.0}
  clusters, _, table = cluster.contingency_table(r.assignments, ys)
  assert clusters[-1] == -1 and table[-1].sum() == 5


def test_kmeans_confidence_is_the_distance_margin():
  x = np.array([[0.0, 0], [0, 1], [0, -1], [10, 0], [10, 1], [10, -1], [5, 0]])
  r = cluster.fit_clusters(x, "kmeans", n_clusters=2)
  own = np.linalg.norm(x - r.centres[r.assignments], axis=1)
  other = np.linalg.norm(x - r.centres[1 - r.assignments], axis=1)
  np.testing.assert_allclose(r.confidence, 1 - own / other, atol=1e-12)


def test_kmeans_bic_matches_mixture_likelihood():
  x, _ = blobs(n_per=30, k=3, dims=3, spread=0.7)
  a = np.repeat(np.arange(3), 30)
  a[0] = 1  # one unequal cluster size
  centres = np.stack([x[a == c].mean(0) for c in range(3)])
  n, d = x.shape
  var = np.sum((x - centres[a]) ** 2) / (n * d)
  weights = np.bincount(a) / n
  loglik = sum(np.log(weights[a[i]]) + stats.multivariate_normal.logpdf(
      x[i], centres[a[i]], var * np.eye(d)) for i in range(n))
  expected = -2 * loglik + (2 + 3 * d + 1) * np.log(n)
  assert cluster.kmeans_bic(x, a, centres) == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------ scoring


def test_shuffled_labels_give_ari_near_zero():
  x, y = blobs(n_per=100, k=4)
  r = cluster.fit_clusters(x, "kmeans", n_clusters=4)
  m = cluster.cluster_metrics(r.assignments, np.random.default_rng(0).permutation(y))
  assert abs(m["ari"]) < 0.02 and m["nmi"] < 0.03
  assert m["purity"] < 0.35


def _ari_by_pairs(a, b):
  """ARI from pair counts (Hubert and Arabie 1985), written out."""
  n = len(a)
  table = {}
  for u, v in zip(a, b):
    table[(u, v)] = table.get((u, v), 0) + 1
  rows, cols = {}, {}
  for (u, v), c in table.items():
    rows[u] = rows.get(u, 0) + c
    cols[v] = cols.get(v, 0) + c
  index = sum(math.comb(c, 2) for c in table.values())
  sr, sc = sum(math.comb(c, 2) for c in rows.values()), sum(math.comb(c, 2) for c in cols.values())
  expected = sr * sc / math.comb(n, 2)
  return (index - expected) / ((sr + sc) / 2 - expected)


def _nmi_by_entropies(a, b):
  """I(a; b) / ((H(a) + H(b)) / 2) from probabilities, in NumPy."""
  _, ai = np.unique(a, return_inverse=True)
  _, bi = np.unique(b, return_inverse=True)
  p = np.zeros((ai.max() + 1, bi.max() + 1))
  np.add.at(p, (ai, bi), 1.0 / len(a))
  pa, pb = p.sum(1), p.sum(0)
  nz = p > 0
  mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz]))
  h = lambda q: -np.sum(q[q > 0] * np.log(q[q > 0]))  # noqa: E731
  return mi / ((h(pa) + h(pb)) / 2)


def test_metrics_against_hand_computation():
  a = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, -1])
  y = np.array(["a", "a", "b", "b", "b", "b", "c", "c", "a", "c"])
  m = cluster.cluster_metrics(a, y)
  # Majorities: cluster 0 -> a (2), 1 -> b (3), 2 -> 1; the noise point counts as wrong.
  assert m["purity"] == pytest.approx((2 + 3 + 1) / 10)
  assert m["ari"] == pytest.approx(_ari_by_pairs(a, y), abs=1e-12)
  assert m["nmi"] == pytest.approx(_nmi_by_entropies(a, y), abs=1e-12)
  assert m["clustered"]["purity"] == pytest.approx(6 / 9)
  assert m["clustered"]["ari"] == pytest.approx(_ari_by_pairs(a[:-1], y[:-1]), abs=1e-12)
  rng = np.random.default_rng(5)
  a, y = rng.integers(0, 6, 400), rng.integers(0, 4, 400)
  m = cluster.cluster_metrics(a, y)
  assert m["ari"] == pytest.approx(_ari_by_pairs(a, y), abs=1e-12)
  assert m["nmi"] == pytest.approx(_nmi_by_entropies(a, y), abs=1e-12)
  assert "clustered" not in m


def test_contingency_table_matches_direct_count():
  rng = np.random.default_rng(2)
  a = rng.integers(-1, 5, 500)
  y = rng.choice([3, 7, 11], 500)
  clusters, classes, table = cluster.contingency_table(a, y)
  np.testing.assert_array_equal(clusters, [0, 1, 2, 3, 4, -1])
  np.testing.assert_array_equal(classes, [3, 7, 11])
  for i, c in enumerate(clusters):
    for j, l in enumerate(classes):
      assert table[i, j] == sum(1 for u, v in zip(a, y) if u == c and v == l)


def test_multilabel_and_column_labels():
  a = np.array([0, 0, 1, 1])
  multi = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]])
  _, classes, table = cluster.contingency_table(a, multi)
  np.testing.assert_array_equal(classes, ["0;2", "1", "none"])
  np.testing.assert_array_equal(table, [[2, 0, 0], [0, 1, 1]])
  m = cluster.cluster_metrics(a, np.array([[4], [4], [5], [5]]))
  assert m["ari"] == 1.0 and m["n_classes"] == 2


def test_describe_picks_central_and_border_members():
  x, y = blobs(n_per=50, k=3, spread=1.0)
  r = cluster.fit_clusters(x, "gmm", n_clusters=3)
  desc = cluster.describe_clusters(r, x, y, n_central=5, n_border=3)
  assert [d["cluster"] for d in desc] == [0, 1, 2]
  for d in desc:
    members = np.flatnonzero(r.assignments == d["cluster"])
    assert d["size"] == len(members) and set(d["central"]) <= set(members)
    dist = np.linalg.norm(x - r.centres[d["cluster"]], axis=1)
    rest = np.setdiff1d(members, d["central"])
    assert dist[d["central"]].max() <= dist[rest].min()
    rest = np.setdiff1d(rest, d["border"])
    assert r.confidence[d["border"]].max() <= r.confidence[rest].min()
    label, count, frac = d["top_labels"][0]
    assert count == np.sum(y[members] == label) and frac == count / len(members)


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("x,match", [
    (np.zeros(10), "2-D"),
    (np.zeros((10, 2, 2)), "2-D"),
    (np.zeros((10, 0)), "at least one dimension"),
    (np.zeros((2, 2)), "too few points"),
    (np.array([[0.0, 1.0]] * 5 + [[np.nan, 0.0]]), "NaN"),
    (np.array([[0.0, 1.0]] * 5 + [[np.inf, 0.0]]), "row 5"),
])
def test_bad_points(x, match):
  with pytest.raises(ValueError, match=match):
    cluster.fit_clusters(x)


def test_bad_arguments():
  x, y = blobs(n_per=10, k=2)
  with pytest.raises(TypeError, match="numeric"):
    cluster.fit_clusters(np.array([["a", "b"]] * 5))
  with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
    cluster.fit_clusters(x, "dbscan")
  with pytest.raises(ValueError, match="unknown criterion"):
    cluster.fit_clusters(x, "gmm", criterion="silhouette")
  with pytest.raises(ValueError, match="min_cluster_size"):
    cluster.fit_clusters(x, "hdbscan", n_clusters=3)
  with pytest.raises(ValueError, match="too few points"):
    cluster.fit_clusters(x, "kmeans", n_clusters=20)
  with pytest.raises(ValueError, match="too few points"):
    cluster.fit_clusters(x[:5], "gmm", k_range=(6, 9))
  with pytest.raises(ValueError, match="k_min <= k_max"):
    cluster.fit_clusters(x, k_range=(5, 2))
  with pytest.raises(ValueError, match="pair"):
    cluster.fit_clusters(x, k_range=5)
  with pytest.raises(ValueError, match="silhouette needs at least 2"):
    cluster.fit_clusters(x, "kmeans", k_range=(1, 3))
  with pytest.raises(TypeError, match="n_clusters must be an integer"):
    cluster.fit_clusters(x, n_clusters=2.5)
  with pytest.raises(ValueError, match="labels must have shape"):
    cluster.cluster_metrics(np.zeros(20, int), y[:10])
  # k_max above the number of points is lowered rather than refused.
  assert cluster.fit_clusters(x[:6], "gmm", k_range=(2, 20)).k_values.max() == 5


# ------------------------------------------------------------------- report


def test_write_cluster_report(tmp_path):
  from PIL import Image
  x, y = blobs(n_per=30, k=3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (90, 8, 8, 1), dtype=np.uint8)
  features = np.concatenate([x, rng.standard_normal((90, 6)) * 0.1], axis=1)
  ids = np.array([f"img{i}" for i in range(90)])
  rep = cluster.write_cluster_report(str(tmp_path), x, images=images, labels=y, ids=ids,
                                     features=features, method="kmeans", k_range=(2, 6))
  files = sorted(os.listdir(tmp_path))
  assert files == sorted([cluster.JSON_FILE, cluster.CONTINGENCY_FILE, cluster.ASSIGNMENTS_FILE,
                          cluster.SHEET_FILE, cluster.MAP_FILE])
  with open(tmp_path / cluster.JSON_FILE) as f:
    saved = json.load(f)
  assert saved["map"]["k"] == 3 and saved["map"]["metrics"]["ari"] == pytest.approx(1.0)
  assert saved["features"]["metrics"]["ari"] == pytest.approx(1.0)
  assert saved["features"]["ari_with_map_clusters"] == pytest.approx(1.0)
  assignments = rep.pop("assignments")
  assert rep.pop("feature_assignments").shape == (90,)
  assert saved == json.loads(json.dumps(rep))
  ref = cluster.fit_clusters(x, "kmeans", k_range=(2, 6))
  np.testing.assert_array_equal(assignments, ref.assignments)
  with open(tmp_path / cluster.ASSIGNMENTS_FILE) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["id", "cluster", "feature_cluster"]
  assert [r[0] for r in rows[1:]] == ids.tolist()
  np.testing.assert_array_equal([int(r[1]) for r in rows[1:]], ref.assignments)
  with open(tmp_path / cluster.CONTINGENCY_FILE) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["cluster", "size", "0", "1", "2"]
  counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
  assert counts[:, 0].sum() == 90 and (counts[:, 1:].sum(1) == counts[:, 0]).all()
  first = saved["map"]["clusters"][0]
  assert first["central_ids"] == ids[first["central"]].tolist()
  with Image.open(tmp_path / cluster.SHEET_FILE) as im:
    assert im.size[0] > 500 and im.size[1] > 200


def test_report_without_images_or_labels(tmp_path):
  x, _ = blobs(n_per=20, k=2)
  x = np.concatenate([x, [[50.0, 50.0]]])
  rep = cluster.write_cluster_report(str(tmp_path), x, method="hdbscan", min_cluster_size=5)
  assert rep["map"]["n_clusters"] == 2 and "metrics" not in rep["map"]
  assert rep["map"]["clusters"][-1]["cluster"] == -1
  assert not os.path.exists(tmp_path / cluster.CONTINGENCY_FILE)
  assert os.path.getsize(tmp_path / cluster.SHEET_FILE) > 0
  with pytest.raises(ValueError, match="features have 3 rows"):
    cluster.write_cluster_report(str(tmp_path), x, features=np.zeros((3, 4)))
  with pytest.raises(ValueError, match="does not exist"):
    cluster.write_cluster_report(str(tmp_path / "missing"), x)


def _fake_digits_run(path, shuffle_ids=False):
  """A workdir with the digits config and an embeddings.npz whose map separates the classes."""
  from jaxembed import configlib, data
  from jaxembed.configs import digits
  config = digits.get_config()
  config.data.image_size = 8  # no resizing: faster
  with open(path / "config.json", "w") as f:
    f.write(configlib.to_json(config))
  ds = data.load(config.data)
  labels = np.concatenate([ds.train_labels, ds.test_labels])
  ids = np.concatenate([ds.train_ids, ds.test_ids])
  if shuffle_ids:
    ids = ids[::-1]
  rng = np.random.default_rng(0)
  angles = 2 * np.pi * np.arange(10) / 10
  centres = np.stack([np.cos(angles), np.sin(angles)], 1) * 20
  emb = centres[labels] + rng.standard_normal((len(labels), 2))
  np.savez(path / "embeddings.npz", embedding=emb.astype(np.float32), head=emb,
           features=np.concatenate([emb, rng.standard_normal((len(emb), 3))], 1),
           labels=labels, split=np.array(["train"] * len(ds.train_ids) + ["test"] * len(ds.test_ids)),
           ids=ids)
  return labels


def test_cluster_command(tmp_path, capsys):
  labels = _fake_digits_run(tmp_path)
  assert cluster_command.run(["--workdir", str(tmp_path), "--method", "kmeans", "--k_max", "12",
                              "--no_features"]) == 0
  out = capsys.readouterr().out
  assert "ARI" in out and "map" in out
  with open(tmp_path / cluster.JSON_FILE) as f:
    saved = json.load(f)
  assert saved["map"]["k"] == 10 and "features" not in saved
  assert saved["map"]["metrics"]["ari"] == pytest.approx(1.0)
  assert saved["map"]["metrics"]["n_points"] == len(labels)
  assert saved["map"]["clusters"][0]["central_ids"][0].startswith("digits:")
  # Data that no longer matches the run is refused with exit status 2.
  _fake_digits_run(tmp_path, shuffle_ids=True)
  with pytest.raises(SystemExit) as exit_info:
    cluster_command.run(["--workdir", str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "ids differ" in err[0]
  with pytest.raises(SystemExit) as exit_info:
    cluster_command.run(["--workdir", str(tmp_path / "none")])
  assert exit_info.value.code == 2


def test_sheet_with_rgb_float_images(tmp_path):
  from PIL import Image
  x, y = blobs(n_per=15, k=2)
  r = cluster.fit_clusters(x, "kmeans", n_clusters=2)
  desc = cluster.describe_clusters(r, x, y, n_central=3, n_border=2)
  images = np.zeros((30, 10, 6, 3))
  images[:, :, :, 0] = 1.0  # red, not square
  cluster.cluster_sheet_png(str(tmp_path / "s.png"), desc, images=images, labels=y)
  with Image.open(tmp_path / "s.png") as im:
    pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
  assert ((pixels[:, 0] > 240) & (pixels[:, 1] < 15) & (pixels[:, 2] < 15)).sum() > 500
