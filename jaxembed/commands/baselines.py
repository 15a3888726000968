"""Baselines of a finished run: ``jaxembed baselines --workdir DIR [--methods pca,tsne,umap]``.

What the run's images looked like before t-SimCNE, beside its map: the
backbone of ``model.pretrained`` as imported before training embeds the
images, and PCA-2, t-SNE and UMAP map its pooled features. Every map and
feature space is scored as the trainer scores t-SimCNE (kNN accuracy,
silhouette) and by precision@10 of the similar-image search by label. A run
without ``model.pretrained`` uses its own trained backbone features instead
and maps the pixels too. Writes baselines.json, baselines.npz and
baselines.png (the maps side by side) into the workdir (or ``--outdir``)
and prints the table (docs/usage.md). UMAP needs the ``baselines`` extra:
pip install "jaxembed[baselines]". ``python -m jaxembed.baselines`` is the
same command.
"""

import argparse
import os

from jaxembed import cli

# jaxembed.baselines.METHODS (tests/baselines_test.py checks that they agree).
METHODS = ("pca", "tsne", "umap")


def parser():
  p = cli.ArgumentParser(description=__doc__.replace("``", ""),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a finished training workdir")
  p.add_argument("--outdir", default=None, help="where to write (default: the workdir)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated maps to make (default {','.join(METHODS)})")
  p.add_argument("--pretrained", default=None,
                 help="weight file of the backbone before training (default: the run's "
                      "model.pretrained)")
  pix = p.add_mutually_exclusive_group()
  pix.add_argument("--pixels", dest="pixels", action="store_true", default=None,
                   help="map the raw pixels too (default: only without model.pretrained)")
  pix.add_argument("--no_pixels", dest="pixels", action="store_false",
                   help="never map the pixels")
  p.add_argument("--max_points", type=int, default=None,
                 help="score a random subsample of this many images (t-SNE of 60,000 takes "
                      "long on a CPU); default all")
  p.add_argument("--seed", type=int, default=0, help="seed of the maps and subsample (default 0)")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier baselines.*")
  return p


def run(argv=None):
  """``jaxembed baselines`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
  args = parser().parse_args(argv)
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    cli.fail(f"--methods {args.methods!r}: choose from {','.join(METHODS)}")
  if not os.path.isdir(args.workdir):
    cli.fail(f"--workdir {args.workdir}: no such directory")
  outdir = args.outdir or args.workdir
  # Deferred: jaxembed.baselines imports JAX, Flax, Orbax and scikit-learn (3-4 s on 2 cores);
  # help and flag errors answer without them.
  from jaxembed import baselines  # pylint: disable=g-import-not-at-top
  from jaxembed import parallel  # pylint: disable=g-import-not-at-top
  paths = baselines.output_paths(outdir)
  existing = [p for p in paths.values() if os.path.exists(p)]
  if existing and not args.overwrite:
    cli.fail(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --outdir")
  parallel.initialize()
  print(baselines.table_header())
  try:
    record, maps, labels = baselines.compute_baselines(
        args.workdir, methods=methods, pixels=args.pixels, pretrained=args.pretrained,
        seed=args.seed, max_points=args.max_points)
    os.makedirs(outdir, exist_ok=True)
    baselines.write_outputs(outdir, record, maps, labels)
  except cli.USER_ERRORS + (OSError,) as e:
    cli.fail(str(e))
  for note in record["notes"]:
    print(f"note: {note}")
  print(f"{record['n']} images, {record['seconds']} s; wrote {', '.join(paths.values())}")
  return 0
