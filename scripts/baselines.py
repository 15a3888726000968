"""Baselines for a finished run: t-SNE of its pixels and of its backbone features, same metrics.

For the images of a run (its train and test splits) it computes 2-D maps
with scikit-learn's TSNE (PCA initialisation, perplexity 30) of (a) the raw
pixels and (b) the backbone features in the run's ``embeddings.npz``, plus
openTSNE and UMAP where those are installed, and scores every map exactly
as the trainer scores t-SimCNE (DESIGN.md 3c): kNN accuracy (k=15) fitted on
the train points and scored on the test points, silhouette of the test
points. t-SNE is transductive (it embeds train and test together), which
favours it over t-SimCNE's held-out protocol.

  python scripts/baselines.py --workdir DIR [--out scripts/results/baselines.json]
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np  # noqa: E402


def score(xy, labels, split, k):
  from jaxembed import evaluate  # pylint: disable=g-import-not-at-top
  tr, te = split == "train", split == "test"
  out = {}
  if labels.ndim == 1 and te.any() and (labels >= 0).all():
    out["knn_accuracy"] = round(float(evaluate.knn_accuracy(
        xy[tr], labels[tr], xy[te], labels[te], k=min(k, int(tr.sum())))), 4)
    if len(np.unique(labels[te])) > 1:
      out["silhouette"] = round(float(evaluate.silhouette_score(xy[te], labels[te])), 4)
  return out


def tsne(x, seed):
  from sklearn import decomposition, manifold  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float32)
  if x.shape[1] > 50:  # the usual PCA to 50 dimensions before t-SNE
    x = decomposition.PCA(50, random_state=seed).fit_transform(x)
  return manifold.TSNE(2, perplexity=30, init="pca", random_state=seed).fit_transform(x)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a finished run of jaxembed.train")
  ap.add_argument("--out", default=None, help="JSON file (default "
                  "scripts/results/baselines_<run name>.json)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  from jaxembed import export  # pylint: disable=g-import-not-at-top
  from jaxembed import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  emb_path = os.path.join(args.workdir, workdir_lib.EMBEDDINGS)
  if not os.path.isfile(emb_path):
    sys.exit(f"error: {emb_path} not found; the run must be finished")
  config = workdir_lib.load_config(args.workdir)
  with np.load(emb_path, allow_pickle=False) as z:
    stored = {key: z[key] for key in z.files}
  src = export.load_source(None, config, export.run_info(args.workdir))
  if not np.array_equal(src["ids"], stored["ids"].astype(str)):
    sys.exit("error: the run's data no longer matches its embeddings.npz (ids differ)")
  labels, split = stored["labels"], stored["split"].astype(str)
  k = config.eval.get("knn_k", 15)
  pixels = src["images"].reshape(len(src["images"]), -1).astype(np.float32) / 255.0
  rows = [("t-SimCNE (this run, held-out test split)", None, stored["embedding"])]
  jobs = [("t-SNE of pixels (sklearn)", pixels), ("t-SNE of backbone features (sklearn)",
                                                  stored["features"])]
  for name, x in jobs:
    t0 = time.time()
    rows.append((name, time.time() - t0, tsne(x, args.seed)))
    rows[-1] = (name, round(time.time() - t0, 1), rows[-1][2])
  try:
    import openTSNE  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    for name, x in jobs:
      t0 = time.time()
      xy = np.asarray(openTSNE.TSNE(random_state=args.seed).fit(np.asarray(x, np.float64)))
      rows.append((name.replace("sklearn", "openTSNE"), round(time.time() - t0, 1), xy))
  except ImportError:
    pass
  try:
    import umap  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    for name, x in jobs:
      t0 = time.time()
      xy = umap.UMAP(random_state=args.seed).fit_transform(x)
      rows.append((name.replace("t-SNE", "UMAP").replace(" (sklearn)", ""),
                   round(time.time() - t0, 1), xy))
  except ImportError:
    pass
  results = []
  print(f"{'method':<44} {'kNN acc':>8} {'silhouette':>10} {'seconds':>8}")
  for name, seconds, xy in rows:
    m = score(np.asarray(xy, np.float32), labels, split, k)
    results.append(dict(method=name, seconds=seconds, **m))
    print(f"{name:<44} {m.get('knn_accuracy', float('nan')):>8.4f} "
          f"{m.get('silhouette', float('nan')):>10.4f} "
          f"{'' if seconds is None else seconds:>8}")
  run_name = os.path.basename(os.path.normpath(args.workdir))
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"baselines_{run_name}.json")
  record = {"workdir": os.path.abspath(args.workdir), "data": config.data.to_dict(),
            "n": int(len(labels)), "n_test": int((split == "test").sum()), "k": k,
            "protocol": "kNN fit on train points, scored on test points; silhouette of test "
                        "points; t-SNE/UMAP embed train and test together (transductive)",
            "results": results,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d"),
            "command": "python scripts/baselines.py " + " ".join(sys.argv[1:])}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=2, default=str)
    f.write("\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
