"""Out-of-sample quality: train on part of digits, embed the rest, compare kNN accuracy in and out.

The estimator is fitted on the stratified 80% training split of
scikit-learn's digits (random_state=0, DESIGN.md 3c) with a reduced digits
schedule, then embeds the 20% it never saw. In-sample accuracy is the
leave-one-out kNN accuracy (k=15) on the training map; held-out accuracy is
kNN fitted on the training map and scored on the embedded held-out images.
Held-out accuracy should lie within two standard errors of in-sample. It
also reports feature-space search on the held-out images (how often the
nearest training images share the query's label) and save/load equality.

  python scripts/out_of_sample.py [--epochs 20,5,20] [--out scripts/results/out_of_sample.json]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np  # noqa: E402


def loo_knn_accuracy(x, y, k):
  """kNN accuracy of each training point from its k nearest *other* training points."""
  from sklearn import neighbors  # pylint: disable=g-import-not-at-top
  nn = neighbors.NearestNeighbors(n_neighbors=k + 1).fit(x)
  _, idx = nn.kneighbors(x)
  idx = idx[:, 1:]
  votes = y[idx]
  pred = np.array([np.bincount(v, minlength=y.max() + 1).argmax() for v in votes])
  return float(np.mean(pred == y))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", default="20,5,20", help="epochs of the three stages")
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--widths", default="8,16,32", help="ResNet stage widths")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "out_of_sample.json"))
  args = ap.parse_args()

  from sklearn import datasets, model_selection, neighbors  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxembed  # pylint: disable=g-import-not-at-top
  from jaxembed import search  # pylint: disable=g-import-not-at-top

  d = datasets.load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  labels = d.target
  tr, te = model_selection.train_test_split(np.arange(len(images)), test_size=0.2,
                                            random_state=0, stratify=labels)
  epochs = tuple(int(e) for e in args.epochs.split(","))
  # The digits recipe (configs/digits.py) with a shorter schedule and a narrower network.
  overrides = {"model.widths": tuple(int(w) for w in args.widths.split(",")),
               "model.stage_sizes": (1, 1, 1), "model.hidden_dim": 256,
               "stages.lr_scale": (1.0, 1.0, 0.5), "stages.warmup_epochs": (2, 0, 2),
               "stages.head_init": ("lecun", "pca", "keep"), "checkpoint.every_steps": 200,
               "logging.every_steps": 50}
  k = 15  # reference kNN k
  with tempfile.TemporaryDirectory() as tmp:
    est = jaxembed.TSimCNE(model="resnet_tiny", batch_size=args.batch_size, epochs=epochs,
                           image_size=16, workdir=os.path.join(tmp, "run"),
                           config_overrides=overrides, verbose=True)
    t0 = time.time()
    est.fit(images[tr], labels[tr])
    fit_s = time.time() - t0
    train_map = est.embedding_
    t0 = time.time()
    out = est.embed(images[te])
    embed_s = time.time() - t0
    test_map = out["z"]
    in_acc = loo_knn_accuracy(train_map, labels[tr], k)
    clf = neighbors.KNeighborsClassifier(n_neighbors=k).fit(train_map, labels[tr])
    out_acc = float(clf.score(test_map, labels[te]))
    # Standard errors of the two proportions; their difference has SE sqrt(se_in^2 + se_out^2).
    se_in = np.sqrt(in_acc * (1 - in_acc) / len(tr))
    se_out = np.sqrt(out_acc * (1 - out_acc) / len(te))
    se_diff = float(np.sqrt(se_in ** 2 + se_out ** 2))
    # Feature-space search of held-out queries among the training images.
    train_feats = est.embed(images[tr])["features"]
    _, nb = search.nearest(train_feats, out["features"], 10, metric="cosine")
    precision_at_10 = float(np.mean(labels[tr][nb] == labels[te][:, None]))
    precision_at_1 = float(np.mean(labels[tr][nb[:, 0]] == labels[te]))
    # Save / load: the same map, bit for bit.
    saved = est.save(os.path.join(tmp, "saved"))
    loaded = jaxembed.TSimCNE.load(saved)
    bit_equal = bool(np.array_equal(loaded.transform(images[te]), est.transform(images[te])))
  result = {
      "dataset": "sklearn digits, stratified 80/20 split (random_state=0)",
      "n_train": int(len(tr)), "n_heldout": int(len(te)), "epochs": list(epochs),
      "batch_size": args.batch_size, "widths": overrides["model.widths"], "k": k,
      "knn_in_sample_loo": round(in_acc, 4), "knn_heldout": round(out_acc, 4),
      "difference": round(out_acc - in_acc, 4), "se_difference": round(se_diff, 4),
      "within_two_se": bool(abs(out_acc - in_acc) <= 2 * se_diff),
      "feature_search_precision_at_1": round(precision_at_1, 4),
      "feature_search_precision_at_10": round(precision_at_10, 4),
      "save_load_bit_equal": bit_equal,
      "fit_seconds": round(fit_s, 1), "embed_heldout_seconds": round(embed_s, 2),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
      "date": time.strftime("%Y-%m-%d"),
      "command": "python scripts/out_of_sample.py " + " ".join(sys.argv[1:]),
  }
  print()
  print(f"{'quantity':<34} value")
  for key in ("knn_in_sample_loo", "knn_heldout", "difference", "se_difference",
              "within_two_se", "feature_search_precision_at_1",
              "feature_search_precision_at_10", "save_load_bit_equal", "fit_seconds"):
    print(f"{key:<34} {result[key]}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
