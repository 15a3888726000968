"""Clusters a finished run's map (and features) and writes the cluster report into its workdir.

Usage:
  python scripts/cluster_report.py --workdir DIR [--method gmm|kmeans|hdbscan]
      [--n_clusters K] [--k_min 2] [--k_max 20] [--seed 0] [--no_features] [--no_images]
      [--outdir OUT]

Reads DIR/embeddings.npz (embedding, features, labels, split, ids) and, for
the images of the cluster sheet, re-loads the dataset named in DIR/config.json
(train then test images, the order of embeddings.npz). Writes clusters.json,
cluster_contingency.csv, cluster_assignments.csv, cluster_sheet.png and
cluster_map.png into DIR (or OUT) and prints the metrics.
"""

import argparse
import os
import sys
import time

import numpy as np


def load_run(workdir, with_images=True):
  """(arrays of embeddings.npz, images or None) of a finished run."""
  from jaxembed import data, workdir as wd  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, wd.EMBEDDINGS)
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found: --workdir must hold a finished run (embeddings.npz "
                     "is written at its end)")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  images = None
  if with_images:
    config = wd.load_config(workdir)
    ds = data.load(config.data)
    images = np.concatenate([ds.train_images, ds.test_images])
    if len(images) != len(arrays["embedding"]):
      raise ValueError(f"the dataset of {workdir}/config.json has {len(images)} images but "
                       f"embeddings.npz has {len(arrays['embedding'])} rows; the data changed "
                       "since the run (use --no_images)")
    ids = np.concatenate([ds.train_ids, ds.test_ids]).astype(str)
    if "ids" in arrays and not np.array_equal(ids, arrays["ids"].astype(str)):
      raise ValueError("the re-loaded dataset's ids differ from those in embeddings.npz; the data "
                       "changed since the run (use --no_images)")
  return arrays, images


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished training workdir")
  p.add_argument("--outdir", default=None, help="where to write (default: the workdir)")
  p.add_argument("--method", default="gmm", choices=["gmm", "kmeans", "hdbscan"])
  p.add_argument("--n_clusters", type=int, default=None, help="fixed k (gmm, kmeans)")
  p.add_argument("--k_min", type=int, default=2)
  p.add_argument("--k_max", type=int, default=20)
  p.add_argument("--criterion", default=None, help="kmeans: silhouette (default) or bic")
  p.add_argument("--min_cluster_size", type=int, default=None, help="hdbscan")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_features", action="store_true", help="cluster the map only")
  p.add_argument("--no_images", action="store_true", help="do not re-load the dataset")
  args = p.parse_args(argv)

  from jaxembed import cluster  # pylint: disable=g-import-not-at-top
  try:
    arrays, images = load_run(args.workdir, with_images=not args.no_images)
    outdir = args.outdir or args.workdir
    os.makedirs(outdir, exist_ok=True)
    kw = {}
    if args.criterion is not None:
      kw["criterion"] = args.criterion
    if args.min_cluster_size is not None:
      kw["min_cluster_size"] = args.min_cluster_size
    t0 = time.perf_counter()
    rep = cluster.write_cluster_report(
        outdir, arrays["embedding"], images=images, labels=arrays.get("labels"),
        ids=arrays.get("ids"), features=None if args.no_features else arrays.get("features"),
        method=args.method, n_clusters=args.n_clusters, k_range=(args.k_min, args.k_max),
        seed=args.seed, **kw)
    seconds = time.perf_counter() - t0
  except (ValueError, TypeError, OSError) as e:
    print(f"cluster_report: error: {e}", file=sys.stderr)
    return 2

  print(f"{args.method} clusters of {args.workdir} ({rep['n_points']} points, "
        f"{seconds:.1f} s)")
  print(f"{'space':<10} {'dims':>5} {'k':>4} {'clusters':>8} {'noise':>6} {'ARI':>7} "
        f"{'NMI':>7} {'purity':>7}")
  for space in ("map", "features"):
    if space not in rep:
      continue
    r = rep[space]
    m = r.get("metrics", {})
    fmt = lambda v: f"{v:7.3f}" if v is not None else f"{'-':>7}"  # noqa: E731
    dims = f"{r['dims']}" + (f"/{r['input_dims']}" if "input_dims" in r else "")
    print(f"{space:<10} {dims:>5} {r['k']:>4} {r['n_clusters']:>8} {r['noise_fraction']:>6.3f} "
          f"{fmt(m.get('ari'))} {fmt(m.get('nmi'))} {fmt(m.get('purity'))}")
  if "features" in rep:
    print(f"ARI between map and feature clusters: {rep['features']['ari_with_map_clusters']:.3f}")
  print(f"Wrote {', '.join(rep['files'].values())} to {os.path.abspath(outdir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
