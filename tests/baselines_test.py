"""Tests of jaxembed.baselines and of a run on image files: search by path, the page's clusters.

The library parts are checked against independent computations (NumPy's SVD
for PCA, brute-force NumPy for precision@10, scikit-learn for kNN accuracy
and the silhouette, the torch import applied by hand for the backbone). One
tiny run on a folder of JPEGs in class subfolders, started from imported
weights, serves the end-to-end tests (trained once per session).
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
from safetensors import numpy as st_numpy
from sklearn import metrics as sk_metrics
from sklearn import model_selection
from sklearn import neighbors

from jaxembed import baselines
from jaxembed import models
from jaxembed import runs
from jaxembed import workdir as workdir_lib
from jaxembed.commands import baselines as baselines_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"widths": (4, 8), "stage_sizes": (1, 1), "stem": "cifar"}


def numpy_pca2(x):
  x = np.asarray(x, np.float64)
  u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
  return u[:, :2] * s[:2]


def assert_same_up_to_sign(a, b, atol):
  for j in range(2):
    sign = np.sign(np.dot(a[:, j], b[:, j])) or 1.0
    np.testing.assert_allclose(a[:, j], sign * b[:, j], atol=atol)


def numpy_precision(x, labels, queries, k, cosine=False):
  x = np.asarray(x, np.float64)
  if cosine:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  d = np.sqrt(((x[queries][:, None] - x[None]) ** 2).sum(-1))
  d[np.arange(len(queries)), queries] = np.inf  # the query itself is not an answer
  nb = np.argsort(d, axis=1, kind="stable")[:, :k]
  return float(np.mean(labels[nb] == labels[queries][:, None]))


# ------------------------------------------------------------------ library


def test_pca_map_is_the_top_two_principal_components():
  x = np.random.default_rng(0).normal(size=(120, 9)) * np.arange(1, 10)
  assert_same_up_to_sign(baselines.map_2d(x, "pca"), numpy_pca2(x), atol=1e-3)


def test_tsne_and_umap_separate_far_apart_blobs():
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1, 2], 40)
  x = rng.normal(size=(120, 60)) + 30.0 * np.eye(60)[labels * 7]
  split = np.where(np.arange(120) % 4 == 0, "test", "train")
  rows, why = baselines.scoring_rows(labels, split)
  assert why is None
  methods = ["tsne"]
  try:
    baselines.umap_module()
    methods.append("umap")
  except baselines.MissingUmap:
    pass
  for method in methods:
    xy = baselines.map_2d(x, method, seed=0)
    assert xy.shape == (120, 2) and xy.dtype == np.float32
    m = baselines.score(xy, labels, rows, k=5)
    assert m["knn_accuracy"] == 1.0 and m["precision_at_10"] == 1.0, (method, m)


def test_missing_umap_is_a_note_naming_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "umap", None)  # import umap raises ImportError
  with pytest.raises(baselines.MissingUmap, match=r'pip install "jaxembed\[baselines\]"'):
    baselines.map_2d(np.zeros((10, 3)), "umap")


def test_precision_at_10_matches_brute_force():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  labels = rng.integers(0, 3, 300)
  x[:, 0] += labels  # some structure, so the answer is not just chance
  queries = np.arange(0, 300, 7)
  for cosine in (False, True):
    expected = numpy_precision(x, labels, queries, 10, cosine)
    got = baselines.precision_at_k(baselines.unit_rows(x) if cosine else x, labels, queries, 10)
    assert got == pytest.approx(expected, abs=1e-12)
  assert 0.4 < expected < 0.95


def test_score_is_the_trainer_protocol_against_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, 200)
  x = rng.normal(size=(200, 2)) + labels[:, None]
  split = np.where(rng.random(200) < 0.25, "test", "train")
  rows, _ = baselines.scoring_rows(labels, split)
  m = baselines.score(x, labels, rows, k=15)
  tr, te = split == "train", split == "test"
  knn = neighbors.KNeighborsClassifier(15).fit(x[tr], labels[tr]).score(x[te], labels[te])
  assert m["knn_accuracy"] == pytest.approx(knn, abs=1e-4)
  assert m["silhouette"] == pytest.approx(sk_metrics.silhouette_score(x[te], labels[te]),
                                          abs=1e-4)
  assert m["precision_at_10"] == pytest.approx(
      numpy_precision(x, labels, np.flatnonzero(te), 10), abs=1e-4)
  # The paper protocol: the trainer's stratified 10% hold-out of every point.
  (fit, scored, sil), _ = baselines.scoring_rows(labels, split, "paper")
  ref_fit, ref_scored = model_selection.train_test_split(
      np.arange(200), test_size=0.1, random_state=0, stratify=labels)
  np.testing.assert_array_equal(fit, np.sort(ref_fit))
  np.testing.assert_array_equal(scored, np.sort(ref_scored))
  np.testing.assert_array_equal(sil, np.arange(200))


@pytest.mark.parametrize("labels,split,reason", [
    (np.full(6, -1), ["train"] * 3 + ["test"] * 3, "no labels"),
    (np.zeros((6, 3), int), ["train"] * 3 + ["test"] * 3, "multi-label"),
    (np.array([0, 1] * 3), ["train"] * 6, "no train and test split"),
    (np.zeros(6, int), ["train"] * 3 + ["test"] * 3, "one class"),
])
def test_no_metrics_says_why(labels, split, reason):
  rows, why = baselines.scoring_rows(labels, np.array(split))
  assert rows is None and reason in why


def test_maps_png_checks_panels(tmp_path):
  from jaxembed import plots  # pylint: disable=g-import-not-at-top
  xy = np.random.default_rng(0).normal(size=(30, 2))
  png = plots.maps_png(str(tmp_path / "m.png"), [("a", xy), ("b", xy * 2), ("c", xy)],
                       np.arange(30) % 3, class_names=("x", "y", "z"), title="t")
  assert png[:4] == b"\x89PNG" and (tmp_path / "m.png").stat().st_size == len(png)
  with pytest.raises(ValueError, match="points"):
    plots.maps_png(str(tmp_path / "m.png"), [("a", xy), ("b", xy[:5])])


def test_command_methods_are_the_library_s():
  assert baselines_command.METHODS == baselines.METHODS


def test_row_of_file_matches_real_paths_not_strings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("imgs/a")
  for name in ("x.jpg", "y.jpg"):
    (tmp_path / "imgs" / "a" / name).write_bytes(b"")
  os.symlink(tmp_path / "imgs" / "a" / "x.jpg", tmp_path / "other_name.jpg")
  ids = np.array(["imgs/a/y.jpg", "imgs/a/x.jpg", "digits:3"])
  assert runs.row_of_file(str(tmp_path / "imgs" / "a" / ".." / "a" / "x.jpg"), ids) == 1
  assert runs.row_of_file("./imgs/a/y.jpg", ids) == 0
  assert runs.row_of_file("other_name.jpg", ids) == 1  # a link to a file of the run
  (tmp_path / "x.jpg").write_bytes(b"")
  assert runs.row_of_file("x.jpg", ids) is None  # the same name, another file
  assert runs.row_of_file("digits:3", ids) is None


# ---------------------------------------------------- a run on image files


def _write_folder(root):
  """Two classes of 16x16 RGB JPEGs in class subfolders: reddish and bluish noise."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(("bluish", "reddish")):
    os.makedirs(root / "imgs" / name, exist_ok=True)
    for i in range(24):
      img = rng.integers(0, 90, size=(16, 16, 3))
      img[..., 2 if c == 0 else 0] += 150
      Image.fromarray(img.astype(np.uint8)).save(root / "imgs" / name / f"{i:02d}.jpg",
                                                 quality=95)


def _write_weights(path):
  """Random weights of resnet_tiny (widths 4, 8) in torchvision's layout."""
  rng = np.random.default_rng(1)
  sd = {"conv1.weight": (4, 3, 3, 3)}
  for p, c in (("bn1", 4), ("layer1.0.bn1", 4), ("layer1.0.bn2", 4), ("layer2.0.bn1", 8),
               ("layer2.0.bn2", 8), ("layer2.0.downsample.1", 8)):
    sd.update({f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,),
               f"{p}.running_var": (c,)})
  sd.update({"layer1.0.conv1.weight": (4, 4, 3, 3), "layer1.0.conv2.weight": (4, 4, 3, 3),
             "layer2.0.conv1.weight": (8, 4, 3, 3), "layer2.0.conv2.weight": (8, 8, 3, 3),
             "layer2.0.downsample.0.weight": (8, 4, 1, 1)})
  arrays = {k: (rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else
                rng.normal(0, 0.5, s)).astype(np.float32) for k, s in sd.items()}
  st_numpy.save_file(arrays, str(path))


def jaxembed(*args, cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # the machine's real devices
  code = "import sys; from jaxembed import main; sys.exit(main.main(['jaxembed'] + sys.argv[1:]))"
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """(base folder, workdir name): a smoke run on ``imgs/`` (relative ids) from imported weights."""
  base = tmp_path_factory.mktemp("folder_run")
  _write_folder(base)
  _write_weights(base / "tiny.safetensors")
  r = jaxembed("train", "--config", "digits:smoke", "--workdir", "run",
               "--config.data.source=folder", "--config.data.path=imgs",
               "--config.data.channels=3", "--config.data.test_fraction=0.25",
               "--config.model.pretrained=tiny.safetensors", cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  return base, "run"


@pytest.mark.slow
def test_baselines_command_on_a_run_with_imported_weights(folder_run):
  base, run = folder_run
  # UMAP (numba compiling for a minute) is covered by the blob test where umap-learn is installed.
  r = jaxembed("baselines", "--workdir", run, "--methods", "pca,tsne", cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  wd = base / run
  rec = json.loads((wd / baselines.JSON_FILE).read_text())
  assert rec["backbone"]["kind"] == "pretrained" and rec["backbone"]["dims"] == 8
  names = [e["name"] for e in rec["results"]]
  assert names[:3] == ["t-SimCNE map", "t-SimCNE backbone features",
                       "imported backbone before training (8-d)"]
  assert "PCA-2 of imported backbone" in names and "t-SNE of imported backbone" in names
  assert not any("pixels" in n for n in names)  # only asked for without model.pretrained
  # t-SimCNE is scored exactly as the trainer scored it.
  train_metrics = json.loads((wd / "metrics.json").read_text())
  tsimcne = rec["results"][0]
  assert tsimcne["knn_accuracy"] == pytest.approx(train_metrics["knn_accuracy"], abs=1e-4)
  assert tsimcne["silhouette"] == pytest.approx(train_metrics["silhouette"], abs=1e-4)
  with np.load(wd / "embeddings.npz") as z:
    labels, split, emb = z["labels"], z["split"], z["embedding"]
  test = np.flatnonzero(split == "test")
  assert tsimcne["precision_at_10"] == pytest.approx(
      numpy_precision(emb, labels, test, 10), abs=1e-4)
  # The backbone before training: the torch import applied by hand to the run's images.
  config = workdir_lib.load_config(str(wd))
  record = runs.run_record(str(wd))
  os.chdir(base)  # the run's relative data and weight paths
  try:
    images = runs.load_source(None, config, record)["images"]
    variables = models.load_torch_state_dict("tiny.safetensors", "resnet_tiny", **TINY)
  finally:
    os.chdir(REPO)
  backbone = models.create_backbone("resnet_tiny", **TINY)
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(config.model.input_mean)) / np.asarray(config.model.input_std)
  expected = np.asarray(jax.jit(lambda v, x: backbone.apply(v, x, train=False))(variables, x))
  with np.load(wd / baselines.NPZ_FILE) as z:
    np.testing.assert_array_equal(z["labels"], labels)
    assert_same_up_to_sign(z["PCA-2 of imported backbone"], numpy_pca2(expected), atol=1e-3)
    tsne = z["t-SNE of imported backbone"]
  entry = rec["results"][names.index("t-SNE of imported backbone")]
  assert entry["precision_at_10"] == pytest.approx(numpy_precision(tsne, labels, test, 10),
                                                   abs=1e-4)
  feats = rec["results"][2]
  assert feats["precision_at_10"] == pytest.approx(
      numpy_precision(expected, labels, test, 10, cosine=True), abs=1e-4)
  assert (wd / baselines.PNG_FILE).read_bytes()[:4] == b"\x89PNG"
  assert "t-SimCNE map" in r.stdout and "PCA-2 of imported backbone" in r.stdout
  # Nothing already written is replaced without --overwrite; a bad input is one line.
  again = jaxembed("baselines", "--workdir", run, "--methods", "pca", cwd=base)
  assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
  assert "--overwrite" in again.stderr
  unfinished = base / "unfinished"
  shutil.copytree(wd, unfinished, ignore=shutil.ignore_patterns("checkpoints", "baselines.*"))
  os.remove(unfinished / "metrics.json")
  bad = jaxembed("baselines", "--workdir", "unfinished", "--methods", "pca", cwd=base)
  assert bad.returncode == 2 and bad.stderr.startswith("error: unfinished is not a finished run")
  assert bad.stderr.strip().count("\n") == 0
  for args, message in ((["--methods", "pca,lle"], "choose from pca,tsne,umap"),
                        (["--pretrained", "absent.safetensors", "--outdir", "o"], "not found")):
    bad = jaxembed("baselines", "--workdir", run, *args, cwd=base)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_search_by_a_file_of_the_run_answers_with_itself_first(folder_run):
  base, run = folder_run
  with np.load(base / run / "embeddings.npz") as z:
    ids = z["ids"].astype(str)
  assert ids[0].startswith(os.path.join("imgs", "bluish"))  # ids are the file paths
  target = ids[5]
  # Another spelling of the same file: absolute, through a symbolic link to the folder.
  os.symlink(base / "imgs", base / "link")
  query = str(base / "link" / os.path.relpath(target, "imgs"))
  r = jaxembed("search", "--workdir", run, "--query", query, "--k", "3", "--out", "s.png",
               cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
  assert lines[0][:2] == ["0", "0.00000"] and lines[0][4] == target
  assert len(lines) == 4 and all(l[4] in ids and l[4] != target for l in lines[1:])
  with np.load(base / run / "embeddings.npz") as z:
    f = z["features"] / np.linalg.norm(z["features"], axis=1, keepdims=True)
  d = 1 - f @ f[5]
  d[5] = np.inf
  assert [l[4] for l in lines[1:]] == list(ids[np.argsort(d, kind="stable")[:3]])
  assert (base / "s.png").stat().st_size > 0
  # A file that is not one of the run's is embedded by the model and not listed as itself.
  outside = base / "new.jpg"
  shutil.copy(base / target, outside)
  r = jaxembed("search", "--workdir", run, "--query", str(outside), "--k", "2", "--out",
               "s2.png", cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
  assert [l[0] for l in lines] == ["1", "2"] and lines[0][4] == target


@pytest.mark.slow
def test_export_page_shows_images_and_clusters(folder_run):
  from jaxembed import cluster  # pylint: disable=g-import-not-at-top
  from jaxembed import export  # pylint: disable=g-import-not-at-top
  base, run = folder_run
  wd = str(base / run)
  arrays, _ = runs.load_embeddings(wd, with_images=False)
  ids = arrays["ids"].astype(str)
  assert export.cluster_colouring(wd, ids) == (None, None)  # no report yet
  os.chdir(base)
  try:
    rep = cluster.write_cluster_report(wd, arrays["embedding"], labels=arrays["labels"], ids=ids,
                                       method="kmeans", n_clusters=3)
    export.export(run, out=str(base / "exp" / "embeddings.npz"), verbose=False, tables=False)
  finally:
    os.chdir(REPO)
  page = (base / "exp" / "embedding.html").read_text()
  payload = json.loads(page.split('<script id="data" type="application/json">')[1]
                       .split("</script>")[0])
  assert payload["id"] == ids.tolist()
  # Every point of the small run has its thumbnail: hovering shows the image.
  assert len(payload["thumbs"]) == len(ids)
  assert all(v.startswith("data:image/png;base64,") for v in payload["thumbs"].values())
  # Coloured by the report's clusters (read back from cluster_assignments.csv, in id order).
  with open(os.path.join(wd, cluster.ASSIGNMENTS_FILE), newline="") as f:
    by_id = {row["id"]: int(row["cluster"]) for row in csv.DictReader(f)}
  cl = payload["cl"]
  assert [int(cl["cats"][c]) for c in cl["c"]] == [by_id[i] for i in ids]
  np.testing.assert_array_equal([by_id[i] for i in ids], rep["assignments"])
  assert cl["title"] == "kmeans cluster (3 clusters, jaxembed cluster)"
  assert 'setMode(D.cl ? "cluster" : "label")' in page and "Coloured by " in page
  # A report of other images is ignored, with a line saying so.
  lines = []
  assert export.cluster_colouring(wd, ids[:-1], warn=lines.append) == (None, None)
  assert "other images" in lines[0]
