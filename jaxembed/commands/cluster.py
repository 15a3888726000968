"""Clusters of a finished run: ``jaxembed cluster --workdir DIR [--method gmm|kmeans|hdbscan]``.

Clusters the run's 2-D map (and its backbone features) with scikit-learn,
scores the clusters against the labels and writes the cluster report into
the workdir (or ``--outdir``): clusters.json, cluster_contingency.csv,
cluster_assignments.csv, cluster_sheet.png and cluster_map.png
(docs/cluster.md). ``python -m jaxembed.cluster`` is the same command.
"""

import argparse
import os
import time

from jaxembed import cli


def parser():
  p = cli.ArgumentParser(description=__doc__.replace("``", ""),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a finished training workdir")
  p.add_argument("--outdir", default=None, help="where to write (default: the workdir)")
  p.add_argument("--method", default="gmm", choices=["gmm", "kmeans", "hdbscan"],
                 help="the estimator (default gmm; docs/cluster.md)")
  p.add_argument("--n_clusters", type=int, default=None,
                 help="fixed k (gmm, kmeans); default: chosen over --k_min..--k_max")
  p.add_argument("--k_min", type=int, default=2, help="smallest k tried (default 2)")
  p.add_argument("--k_max", type=int, default=20, help="largest k tried (default 20)")
  p.add_argument("--criterion", default=None, help="kmeans: silhouette (default) or bic")
  p.add_argument("--min_cluster_size", type=int, default=None, help="hdbscan's minimum size")
  p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  p.add_argument("--no_features", action="store_true", help="cluster the map only")
  p.add_argument("--no_images", action="store_true", help="do not re-load the dataset")
  return p


def run(argv=None):
  """``jaxembed cluster`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
  args = parser().parse_args(argv)
  # Deferred: jaxembed.cluster imports scikit-learn and matplotlib, jaxembed.runs JAX and Orbax
  # (3.8 s on 2 idle cores); help and flag errors answer without them.
  from jaxembed import cluster  # pylint: disable=g-import-not-at-top
  from jaxembed import runs  # pylint: disable=g-import-not-at-top
  try:
    arrays, images = runs.load_embeddings(args.workdir, with_images=not args.no_images)
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
    cli.fail(str(e))

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
