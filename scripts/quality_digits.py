"""Quality of the default job beside t-SNE of the raw pixels, on the same split and metrics.

Runs ``python -m jaxembed.train --config configs/digits.py`` (plus any
``--config.x=y`` overrides given here) in a fresh workdir, times it, and
puts scikit-learn's t-SNE of the pixels (all images embedded; kNN with k=15
fit on the train points and scored on the test points; silhouette of the
test points, as DESIGN.md 3c) beside it. Prints a table and writes JSON.

  python scripts/quality_digits.py [--workdir runs/quality] [--config.x=y ...]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

import results_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tsne_baseline(train_x, train_y, test_x, test_y, seed=0):
  from sklearn import manifold, metrics, neighbors  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  x = np.concatenate([train_x, test_x]).reshape(len(train_x) + len(test_x), -1).astype(np.float32)
  z = manifold.TSNE(2, init="pca", random_state=seed).fit_transform(x)
  ztr, zte = z[:len(train_x)], z[len(train_x):]
  knn = neighbors.KNeighborsClassifier(15).fit(ztr, train_y).score(zte, test_y)
  return {"knn_accuracy": float(knn), "silhouette": float(metrics.silhouette_score(zte, test_y)),
          "seconds": round(time.time() - t0, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quality_digits"))
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--out", default=os.path.join(REPO, "scripts", "results",
                                                    "quality_digits.json"))
  args, overrides = parser.parse_known_args()
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  cmd = [sys.executable, "-m", "jaxembed.train", "--config", args.config,
         "--workdir", args.workdir] + overrides
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, check=False)
  wall = time.time() - t0
  if proc.returncode != 0:
    sys.exit(f"training failed with exit status {proc.returncode}")
  with open(os.path.join(args.workdir, "metrics.json")) as f:
    metrics = json.load(f)

  from jaxembed import data  # pylint: disable=g-import-not-at-top
  from jaxembed import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(args.workdir)
  raw = dict(config.data)
  raw["image_size"] = None  # t-SNE of the original 8x8 pixels
  import ml_collections  # pylint: disable=g-import-not-at-top
  ds = data.load(ml_collections.ConfigDict(raw))
  tsne = tsne_baseline(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)

  result = {
      "command": " ".join(cmd[1:]),
      "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
      "date": time.strftime("%Y-%m-%d"),
      "jaxembed": {"knn_accuracy": metrics["knn_accuracy"], "silhouette": metrics["silhouette"],
                   "wall_seconds": round(wall, 1), "stages": metrics.get("stages")},
      "tsne_pixels": tsne,
  }
  print(f"{'method':<22}{'kNN (k=15)':>12}{'silhouette':>12}{'seconds':>10}")
  print(f"{'jaxembed t-SimCNE':<22}{metrics['knn_accuracy']:>12.4f}{metrics['silhouette']:>12.4f}"
        f"{wall:>10.1f}")
  print(f"{'t-SNE of pixels':<22}{tsne['knn_accuracy']:>12.4f}{tsne['silhouette']:>12.4f}"
        f"{tsne['seconds']:>10.1f}")
  results_io.write_json(args.out, result, indent=2)


if __name__ == "__main__":
  main()
