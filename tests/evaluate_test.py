"""Tests of jaxembed.evaluate against scikit-learn and NumPy."""

import os

import jax
import numpy as np
import pytest
from sklearn import datasets
from sklearn import metrics
from sklearn import neighbors

from jaxembed import evaluate
from jaxembed import parallel


def _random(rng, n, d, n_classes, offset=0):
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, n_classes, size=n) + offset
  return x, y


def _blobs(n, d, n_classes, seed, offset=0):
  x, y = datasets.make_blobs(
      n_samples=n, n_features=d, centers=n_classes, cluster_std=1.5, random_state=seed)
  return x.astype(np.float32), y + offset


def _sk_knn(train_x, train_y, test_x, test_y, k):
  clf = neighbors.KNeighborsClassifier(n_neighbors=k).fit(train_x, train_y)
  return clf.score(test_x, test_y)


def test_eight_devices():
  # conftest.py asks for 8 fake CPU devices; the sharded paths rely on them.
  assert jax.device_count() == 8


# ----------------------------------------------------------------------------
# knn_accuracy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n_train,n_test,d,n_classes,k,offset,chunk_size",
    [
        (200, 77, 2, 10, 15, 0, None),
        (301, 123, 2, 3, 15, -7, 8),     # odd sizes, negative labels, 16 chunks
        (150, 41, 1, 4, 5, 100, 16),     # 1D points
        (97, 13, 3, 2, 1, 1, None),      # k=1
        (120, 50, 64, 5, 15, 3, 24),     # high dimension: matmul + re-ranking
        (400, 99, 2, 60, 7, 1000, 40),   # many classes
        (40, 9, 2, 3, 40, 0, None),      # k = n_train
    ])
def test_knn_accuracy_random_matches_sklearn(n_train, n_test, d, n_classes, k, offset,
                                             chunk_size):
  rng = np.random.default_rng(n_train + d)
  train_x, train_y = _random(rng, n_train, d, n_classes, offset)
  test_x, test_y = _random(rng, n_test, d, n_classes, offset)
  got = evaluate.knn_accuracy(train_x, train_y, test_x, test_y, k=k, chunk_size=chunk_size)
  assert isinstance(got, float)
  assert got == pytest.approx(_sk_knn(train_x, train_y, test_x, test_y, k), abs=1e-12)


@pytest.mark.parametrize("d", [2, 5, 40])
def test_knn_predict_clustered_matches_sklearn(d):
  x, y = _blobs(1003, d, 7, seed=d, offset=3)
  train_x, train_y, test_x = x[:800], y[:800], x[800:]
  got = evaluate.knn_predict(train_x, train_y, test_x, k=15, chunk_size=32)
  want = neighbors.KNeighborsClassifier(15).fit(train_x, train_y).predict(test_x)
  np.testing.assert_array_equal(got, want)


def test_knn_vote_ties_go_to_smallest_label():
  # Query at 0; neighbours at distances 1, 2, 3, 4 with labels 9, 5, 5, 9:
  # k=2 and k=4 give tied votes, which sklearn resolves to the smaller label 5.
  train_x = np.array([[1.0], [-2.0], [3.0], [-4.0], [10.0]], np.float32)
  train_y = np.array([9, 5, 5, 9, 9])
  test_x = np.array([[0.0]], np.float32)
  for k in (2, 4):
    got = evaluate.knn_predict(train_x, train_y, test_x, k=k)
    want = neighbors.KNeighborsClassifier(k).fit(train_x, train_y).predict(test_x)
    assert got[0] == want[0] == 5
  assert evaluate.knn_predict(train_x, train_y, test_x, k=1)[0] == 9


def test_knn_high_dim_near_neighbours_exact():
  # Points sharing a large offset, with neighbours much closer than the norms:
  # the matmul expansion alone would misorder them; re-ranking must not.
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 32)) * 100.0
  train_x = (base + rng.normal(size=(300, 32)) * 1e-2).astype(np.float32)
  train_y = rng.integers(0, 4, 300)
  test_x = (base + rng.normal(size=(60, 32)) * 1e-2).astype(np.float32)
  got = evaluate.knn_predict(train_x, train_y, test_x, k=3)
  want = neighbors.KNeighborsClassifier(3).fit(train_x, train_y).predict(test_x)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["blobs", "outliers", "grid1d"])
def test_knn_leaf_search_matches_sklearn(kind):
  # Over 2048 reference points in <= 3 dimensions the leaf search runs, with
  # brute force for the queries it cannot certify (e.g. far outliers).
  rng = np.random.default_rng(7)
  if kind == "blobs":
    x, y = _blobs(6001, 2, 10, seed=1, offset=-2)
  elif kind == "outliers":
    x, y = _blobs(5003, 3, 4, seed=2)
    x[:40] *= 50.0
  else:
    x = rng.uniform(size=(4500, 1)).astype(np.float32)
    y = rng.integers(0, 3, 4500)
  perm = rng.permutation(len(x))
  test, train = perm[:1000], perm[1000:]
  got = evaluate.knn_predict(x[train], y[train], x[test], k=15)
  want = neighbors.KNeighborsClassifier(15).fit(x[train], y[train]).predict(x[test])
  np.testing.assert_array_equal(got, want)


def test_leaf_neighbours_equal_sklearn_sets():
  x, _ = _blobs(4097, 2, 6, seed=4)
  x[:20] += 100.0  # a far-away group forces the brute-force fallback
  leaves = evaluate._leaves(x, evaluate._LEAF_SIZE)
  _, certified = evaluate._leaf_nearest(x, np.arange(len(x)), leaves, 10, 18,
                                        parallel.make_mesh())
  assert 0.5 < certified.mean() < 1.0  # the retry is exercised
  got = evaluate._neighbours(x, 10, None)
  want = neighbors.NearestNeighbors(n_neighbors=11).fit(x).kneighbors(
      x, return_distance=False)[:, 1:]
  np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))


def test_knn_leaf_search_brute_force_fallback(monkeypatch):
  # With a tiny search budget most queries fail both leaf passes and are
  # redone by brute force; the answer must not change.
  monkeypatch.setattr(evaluate, "_LEAF_CANDIDATES", 8)
  monkeypatch.setattr(evaluate, "_HOST_MAX_PAIRS", 0)
  calls = []
  brute = evaluate._brute_nearest
  monkeypatch.setattr(evaluate, "_brute_nearest",
                      lambda q, *a: calls.append(len(q)) or brute(q, *a))
  x, y = _blobs(2601, 2, 5, seed=6)
  got = evaluate.knn_predict(x[:2100], y[:2100], x[2100:], k=15)
  want = neighbors.KNeighborsClassifier(15).fit(x[:2100], y[:2100]).predict(x[2100:])
  np.testing.assert_array_equal(got, want)
  assert calls and calls[0] > 50


def test_knn_host_fallback_matches_sklearn(monkeypatch):
  # Uncertified queries finished on the host (float64 brute force), none on
  # the devices; self-exclusion included.
  monkeypatch.setattr(evaluate, "_LEAF_CANDIDATES", 8)
  monkeypatch.setattr(evaluate, "_HOST_MAX_PAIRS", 10**9)
  calls = []
  host = evaluate._host_nearest
  monkeypatch.setattr(evaluate, "_host_nearest",
                      lambda q, *a: calls.append(len(q)) or host(q, *a))
  x, _ = _blobs(2201, 2, 5, seed=8)
  x[:10] += 60.0
  got = evaluate._neighbours(x, 9, None)
  want = neighbors.NearestNeighbors(n_neighbors=10).fit(x).kneighbors(
      x, return_distance=False)[:, 1:]
  np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))
  assert calls and calls[0] > 50


def test_leaf_search_with_distance_ties_finds_the_nearest_distances():
  # Every point three times: the k-th and (k+1)-th distances tie, which the
  # leaf search cannot certify from one extra candidate; the fallback must
  # still return k points at the k smallest distances (float64).
  base, _ = _blobs(1000, 2, 4, seed=9)
  x = np.concatenate([base, base, base])
  queries = _blobs(300, 2, 4, seed=10)[0]
  k = 10
  got, got_d2 = evaluate._nearest(queries, x, k, None, None)
  d2 = ((queries[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
  want = np.sort(d2, axis=1)[:, :k]
  np.testing.assert_array_equal(np.sort(np.take_along_axis(d2, got, 1), axis=1), want)
  np.testing.assert_array_equal(np.sort(got_d2, axis=1), want)  # the distances it reports


def test_leaf_search_concurrent_calls_match_sklearn(monkeypatch):
  # On a single CPU device the query chunks are split over concurrent calls
  # from host threads (the tests have 8 devices, which split them instead).
  one = parallel.make_mesh(1)
  calls = []
  real = evaluate._concurrent_calls
  monkeypatch.setattr(evaluate, "_concurrent_calls",
                      lambda mesh: calls.append(real(mesh)) or 3)
  x, y = _blobs(5001, 2, 6, seed=12)
  got = evaluate.knn_predict(x[:4000], y[:4000], x[4000:], k=15, mesh=one)
  want = neighbors.KNeighborsClassifier(15).fit(x[:4000], y[:4000]).predict(x[4000:])
  np.testing.assert_array_equal(got, want)
  assert calls and calls[0] == min(os.cpu_count(), 4)


@pytest.mark.parametrize("n,d,exclude_self", [(3000, 2, True), (500, 40, False), (700, 5, True)])
def test_nearest_equals_sklearn_neighbours_and_distances(n, d, exclude_self):
  # The one engine behind the metrics and search: the leaf search (2-D, many
  # points), brute force with the matmul expansion (40-D) and direct (5-D).
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d)).astype(np.float32)
  q = x if exclude_self else rng.normal(size=(123, d)).astype(np.float32)
  dist, idx = evaluate.nearest(q, x, 7, exclude_self=exclude_self)
  nn = neighbors.NearestNeighbors(n_neighbors=8 if exclude_self else 7).fit(x.astype(np.float64))
  want_d, want_i = nn.kneighbors(None if exclude_self else q.astype(np.float64))
  assert dist.shape == idx.shape == (len(q), 7) and idx.dtype == np.int64
  np.testing.assert_array_equal(idx, want_i[:, :7])
  np.testing.assert_allclose(dist, want_d[:, :7], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=f"k={n} exceeds"):
    evaluate.nearest(x, x, len(x), exclude_self=True)


def test_knn_test_label_unseen_in_train_counts_as_error():
  train_x = np.array([[0.0], [1.0], [2.0]], np.float32)
  test_x = np.array([[0.1], [1.9]], np.float32)
  assert evaluate.knn_accuracy(train_x, [1, 1, 2], test_x, [1, 7], k=1) == 0.5


# ----------------------------------------------------------------------------
# silhouette_score
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,d,n_classes,offset,chunk_size,blobs",
    [
        (500, 2, 10, 0, None, True),
        (333, 2, 4, -5, 8, False),       # odd n, chunk not dividing n
        (201, 1, 3, 10, 16, True),       # 1D
        (120, 64, 6, 0, 24, True),       # high dimension: matmul path
        (257, 2, 80, 3, 40, False),      # many classes, some tiny
        (3000, 2, 10, 0, None, True),    # several column blocks
    ])
def test_silhouette_matches_sklearn(n, d, n_classes, offset, chunk_size, blobs):
  if blobs:
    x, y = _blobs(n, d, n_classes, seed=n, offset=offset)
  else:
    x, y = _random(np.random.default_rng(n), n, d, n_classes, offset)
  got = evaluate.silhouette_score(x, y, chunk_size=chunk_size)
  assert isinstance(got, float)
  assert got == pytest.approx(metrics.silhouette_score(x, y), abs=1e-5)


def test_silhouette_singletons_score_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 2)).astype(np.float32)
  y = np.r_[np.zeros(45, int), np.arange(1, 6)]  # five singleton clusters
  got = evaluate.silhouette_score(x, y)
  assert got == pytest.approx(metrics.silhouette_score(x, y), abs=1e-6)


def test_silhouette_duplicate_points():
  # Identical points give zero distances (and a = b = 0 where a cluster is one
  # repeated point), which sklearn scores 0.
  x = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [1, 1], [0, 0]], np.float32)
  y = np.array([2, 2, 3, 3, 4, 4])
  got = evaluate.silhouette_score(x, y)
  assert got == pytest.approx(metrics.silhouette_score(x, y), abs=1e-6)


def test_cluster_sums_precise_over_many_tiles():
  # Tiles of 8 points: every sum adds about 170 tile partials per cluster in
  # float32; the Kahan-compensated accumulation keeps it near float64.
  rng = np.random.default_rng(0)
  n = 4096
  x = (rng.normal(size=(n, 2)) * 10 + 100).astype(np.float32)
  codes = rng.integers(0, 3, n)
  got = evaluate._cluster_sums(x, codes, 3, chunk_size=8)
  x64 = x.astype(np.float64)
  dist = np.sqrt(((x64[:, None] - x64[None]) ** 2).sum(-1))
  want = np.stack([dist[:, codes == c].sum(1) for c in range(3)], 1)
  np.testing.assert_allclose(got, want, rtol=2e-7)


def test_tile_size_limits_padding():
  # Ten clusters of 1000: 512-point tiles would pad by 24%, 256 by 12%.
  counts = np.full(10, 1000)
  one = parallel.make_mesh(1)
  tile = evaluate._tile_size(counts, one, None)
  n_pad = evaluate._n_tiles(counts, tile, 1) * tile
  assert n_pad <= 1.15 * counts.sum()
  assert evaluate._tile_size(counts, one, 24) == 24


@pytest.mark.parametrize("labels,match", [
    (np.zeros(10, int), "distinct labels"),
    (np.arange(10), "distinct labels"),
])
def test_silhouette_label_count_errors(labels, match):
  x = np.random.default_rng(0).normal(size=(10, 2))
  with pytest.raises(ValueError, match=match):
    evaluate.silhouette_score(x, labels)


# ----------------------------------------------------------------------------
# neighbourhood_preservation
# ----------------------------------------------------------------------------
def _np_neighbours(x, k):
  x = x.astype(np.float64)
  d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("n,high_d,k,chunk_size", [(301, 50, 15, 16), (64, 3, 5, None)])
def test_neighbourhood_preservation_matches_numpy(n, high_d, k, chunk_size):
  rng = np.random.default_rng(n)
  high = rng.normal(size=(n, high_d)).astype(np.float32)
  low = (high[:, :2] + 0.3 * rng.normal(size=(n, 2))).astype(np.float32)
  h, l = _np_neighbours(high, k), _np_neighbours(low, k)
  want = np.mean([len(set(a) & set(b)) / k for a, b in zip(h, l)])
  got = evaluate.neighbourhood_preservation(high, low, k=k, chunk_size=chunk_size)
  assert got == pytest.approx(want, abs=1e-12)
  assert 0.0 < got < 1.0


def test_neighbourhood_preservation_of_isometry_is_one():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(100, 2)).astype(np.float32)
  rot = np.array([[0.6, -0.8], [0.8, 0.6]], np.float32)
  assert evaluate.neighbourhood_preservation(x, x @ rot.T + 3.0, k=10) == 1.0


# ----------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
  x = np.zeros((5, 2), np.float32)
  y = np.arange(5)
  with pytest.raises(TypeError, match="integers"):
    evaluate.knn_accuracy(x, y.astype(float), x, y)
  with pytest.raises(ValueError, match="exceeds"):
    evaluate.knn_accuracy(x, y, x, y, k=6)
  with pytest.raises(ValueError, match="positive integer"):
    evaluate.knn_accuracy(x, y, x, y, k=0)
  with pytest.raises(ValueError, match="dimensions"):
    evaluate.knn_accuracy(x, y, np.zeros((3, 3)), y[:3])
  with pytest.raises(ValueError, match="labels but there are"):
    evaluate.knn_accuracy(x, y[:4], x, y)
  with pytest.raises(ValueError, match="2D"):
    evaluate.silhouette_score(np.zeros(5), y)
  with pytest.raises(ValueError, match="NaN"):
    evaluate.silhouette_score(np.full((5, 2), np.nan), y % 2)
  with pytest.raises(ValueError, match="same points"):
    evaluate.neighbourhood_preservation(x, x[:4])
