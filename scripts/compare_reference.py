"""jaxembed and the reference t-SimCNE package (``tsimcne``) on the same data, side by side.

Trains jaxembed (``python -m jaxembed.train``, a config plus overrides) and
then, in a torch interpreter (``--torch_python``; a separate environment,
since torch and tsimcne are never dependencies of jaxembed), the reference's
``tsimcne.TSimCNE`` on exactly the training images jaxembed used (its split,
written to a temporary .npz), with the same epochs per stage and batch size.
Both 2-D maps are scored the same way, with scikit-learn: kNN accuracy
(k=15, fit on the train points, scored on the test points) and the
silhouette of the test points (DESIGN.md 3c). Prints a table and writes
scripts/results/compare_reference.json.

Each side keeps its own recipe otherwise: jaxembed the config's model,
optimiser and stage settings; tsimcne its defaults (ResNet-18 with the
CIFAR stem, SGD at lr 0.03 * B / 256 per stage [1, 1, 1/1000], its
augmentation, grey images repeated to RGB as its model takes three
channels), with warm-up epochs matched to the config's.

  python scripts/compare_reference.py --torch_python /work/torchvenv/bin/python \
      [--config configs/digits.py] [--epochs 2,1,2] [--batch_size 128] \
      [--config.model.name=resnet18 ...]   # further jaxembed overrides

Without --torch_python, the current interpreter serves if it has torch,
torchvision and tsimcne; otherwise only jaxembed runs (the table says so).
An explicit --torch_python without them exits with status 2.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch_side
import results_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "scripts", "results")


def scores(train_xy, train_y, test_xy, test_y, k=15):
  """kNN accuracy (train -> test) and test silhouette, with scikit-learn for both sides."""
  from sklearn import metrics, neighbors  # pylint: disable=g-import-not-at-top
  knn = neighbors.KNeighborsClassifier(n_neighbors=k).fit(train_xy, train_y)
  return {"knn_accuracy": float(knn.score(test_xy, test_y)),
          "silhouette": float(metrics.silhouette_score(test_xy, test_y))}


def run_jaxembed(args, overrides, workdir):
  cmd = [sys.executable, "-m", "jaxembed.train", "--config", args.config, "--workdir", workdir]
  if args.epochs:
    cmd.append(f"--config.stages.epochs=({args.epochs},)")
  if args.batch_size:
    cmd.append(f"--config.batch_size={args.batch_size}")
  cmd += overrides
  print("jaxembed:", " ".join(cmd[1:]), flush=True)
  t0 = time.time()
  with open(os.path.join(os.path.dirname(workdir), "jaxembed.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
  wall = time.time() - t0
  if proc.returncode != 0:
    with open(log.name) as f:
      tail = f.read()[-3000:]
    sys.exit(f"jaxembed training failed (exit {proc.returncode}):\n{tail}")
  return cmd, wall


def jaxembed_outputs(workdir):
  """The run's resolved config, its data split and its 2-D points (from the workdir)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxembed import data  # pylint: disable=g-import-not-at-top
  from jaxembed import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir)
  ds = data.load(ml_collections.ConfigDict(dict(config.data)))
  emb = np.load(os.path.join(workdir, "embeddings.npz"), allow_pickle=False)
  split = emb["split"].astype(str)
  points = {"train": emb["embedding"][split == "train"], "test": emb["embedding"][split == "test"]}
  labels = {"train": emb["labels"][split == "train"], "test": emb["labels"][split == "test"]}
  # The export keeps the source order within each split; check it is the loaded split.
  if not (np.array_equal(labels["train"], ds.train_labels)
          and np.array_equal(labels["test"], ds.test_labels)):
    sys.exit("the workdir's embeddings do not follow jaxembed.data.load's split order")
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  return config, ds, points, metrics


def run_tsimcne(python, npz, config, args, tmp):
  epochs = ",".join(str(int(e)) for e in config.stages.epochs)
  warmup = ",".join(str(int(w)) for w in config.stages.warmup_epochs)
  out = os.path.join(tmp, "tsimcne_embedding.npz")
  cmd = [python, torch_side.HERE, "fit", "--data", npz, "--out", out, "--epochs", epochs,
         "--batch_size", str(int(config.batch_size)), "--warmup", warmup,
         "--workers", str(args.torch_workers), "--threads", str(args.torch_threads),
         "--seed", str(int(config.seed))]
  print("tsimcne: ", " ".join(cmd[1:]), flush=True)
  t0 = time.time()
  # Lightning writes lightning_logs/ into its working directory: the temporary one.
  with open(os.path.join(tmp, "tsimcne.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=log, text=True,
                          check=False)
  wall = time.time() - t0
  info = torch_side._result_line(proc.stdout)  # pylint: disable=protected-access
  if proc.returncode != 0 or info is None:
    with open(log.name) as f:
      tail = f.read()[-3000:]
    sys.exit(f"tsimcne failed (exit {proc.returncode}):\n{tail}")
  emb = np.load(out)
  return cmd, wall, info, {"train": emb["train"], "test": emb["test"]}


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="Arguments not listed here (--config.FIELD=VALUE) are passed to jaxembed.train.")
  parser.add_argument("--config", default="configs/digits.py", help="jaxembed config file[:args]")
  parser.add_argument("--epochs", default=None,
                      help="epochs per stage for both sides, e.g. 2,1,2 (default: the config's)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="batch size for both sides (default: the config's)")
  parser.add_argument("--torch_python", default=None,
                      help="Python with torch, torchvision and tsimcne (default: this one if it "
                           "has them, else jaxembed only)")
  parser.add_argument("--torch_workers", type=int, default=os.cpu_count(),
                      help="DataLoader workers of tsimcne (its default is 8; one per core here)")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--workdir", default=None, help="jaxembed workdir (default: temporary)")
  parser.add_argument("--out", default=os.path.join(RESULTS, "compare_reference.json"))
  args, overrides = parser.parse_known_args()
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad}; jaxembed overrides look like "
                 "--config.FIELD=VALUE")

  # The torch side is checked first, so a wrong interpreter fails in seconds.
  python, torch_info = torch_side.resolve(args.torch_python, ["torch", "torchvision", "tsimcne"])
  if python is None:
    print(f"tsimcne side skipped: {torch_info}", flush=True)

  tmp = tempfile.mkdtemp(prefix="compare_reference_")
  try:
    workdir = args.workdir or os.path.join(tmp, "jaxembed")
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    jax_cmd, jax_wall = run_jaxembed(args, overrides, workdir)
    config, ds, jax_points, jax_metrics = jaxembed_outputs(workdir)
    k = int(config.eval.knn_k)
    rows = {"jaxembed": dict(
        scores(jax_points["train"], ds.train_labels, jax_points["test"], ds.test_labels, k),
        wall_seconds=jax_wall, train_seconds=jax_metrics.get("train_seconds_this_invocation"),
        own_metrics={m: jax_metrics.get(m) for m in ("knn_accuracy", "silhouette")},
        command=" ".join(jax_cmd[1:]), model=config.model.name,
        optimizer=config.optimizer.name, stages=config.stages.to_dict())}
    if python is not None:
      npz = os.path.join(tmp, "split.npz")
      np.savez(npz, train_images=ds.train_images, train_labels=ds.train_labels,
               test_images=ds.test_images, test_labels=ds.test_labels)
      t_cmd, t_wall, t_info, t_points = run_tsimcne(python, npz, config, args, tmp)
      rows["tsimcne"] = dict(
          scores(t_points["train"], ds.train_labels, t_points["test"], ds.test_labels, k),
          wall_seconds=t_wall, train_seconds=t_info["fit_seconds"],
          command=" ".join(t_cmd[1:]).replace(tmp, "$TMP"), **t_info)
  finally:
    if not args.workdir:
      shutil.rmtree(tmp, ignore_errors=True)

  print(f"\ndata: {config.data.source}, {len(ds.train_images)} train / {len(ds.test_images)} test "
        f"images {ds.image_shape}; epochs per stage {tuple(config.stages.epochs)}, batch "
        f"{config.batch_size}; kNN k={k} (train -> test) and silhouette (test), scikit-learn")
  print(f"{'':10s}{'model':>16s}{'kNN':>8s}{'silh.':>8s}{'train s':>9s}{'wall s':>8s}")
  for name, r in rows.items():
    model = r.get("model") or r.get("backbone")
    print(f"{name:10s}{model:>16s}{r['knn_accuracy']:8.3f}{r['silhouette']:8.3f}"
          f"{r['train_seconds'] or float('nan'):9.1f}{r['wall_seconds']:8.1f}")
  if "tsimcne" not in rows:
    print("tsimcne: not run (no interpreter with torch, torchvision and tsimcne)")
  else:
    print(f"wall-time ratio tsimcne / jaxembed: "
          f"{rows['tsimcne']['wall_seconds'] / rows['jaxembed']['wall_seconds']:.2f}")

  result = dict(
      what="jaxembed vs tsimcne on the same split, epochs and batch; sklearn kNN/silhouette",
      date=datetime.date.today().isoformat(),
      machine=f"{platform.platform()}, {os.cpu_count()} CPU cores",
      load_average_1min=os.getloadavg()[0],
      command="python scripts/compare_reference.py " + " ".join(sys.argv[1:]),
      data=dict(source=config.data.source, image_shape=list(ds.image_shape),
                num_train=len(ds.train_images), num_test=len(ds.test_images)),
      epochs=list(config.stages.epochs), batch_size=int(config.batch_size), knn_k=k,
      torch_side=torch_info if python else f"not run: {torch_info}",
      rows=rows)
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
