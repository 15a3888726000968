"""Embedding with a trained run: ``jaxembed export --workdir DIR [--data SOURCE] [--out FILE.npz]``.

Loads the newest (or ``--step``) checkpoint of DIR and embeds the run's own
train and test images (default) or new images never seen in training:
``--data`` is an image folder (class subfolders give labels), a text file
listing image paths, a MedMNIST-style ``.npz`` (every split), an ``.npz``
with an ``images`` array, a ``.npy`` array or a single image file. Images
are resized and converted to the run's size and channels. It writes
``FILE.npz`` / ``FILE.csv`` (2-D coordinates, head outputs, backbone
features, labels where known, splits and ids), a scatter PNG, the
interactive HTML page and the near-duplicate and outlier tables beside it
(docs/usage.md). Existing files are never replaced without ``--overwrite``.
``python -m jaxembed.export`` is the same command.
"""

import os

from absl import flags

from jaxembed import cli


def _define_flags():
  flags.DEFINE_string("workdir", None, "Run directory written by jaxembed train.")
  flags.DEFINE_string("data", None, "Images to embed: a folder, a .txt list of image paths, a "
                      ".npz (MedMNIST layout or 'images'), a .npy or an image file. Default: "
                      "the run's own train and test data.")
  flags.DEFINE_string("out", None, "Output .npz (a .csv, plots and tables go beside it); "
                      "default DIR/export/embeddings.npz or DIR/export/<data name>.npz.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.DEFINE_bool("plots", True, "Write the scatter PNG and the HTML page.")
  flags.DEFINE_bool("thumbnails", True, "Embed image thumbnails in the HTML page (--nothumbnails "
                    "keeps every image out of it, e.g. for patient data).")
  flags.DEFINE_bool("tables", True, "Write the near-duplicate and outlier tables.")
  flags.DEFINE_float("duplicate_threshold", None, "Cosine distance of backbone features at or "
                     "below which two images count as near-duplicates (default: a tenth of the "
                     "median nearest-neighbour distance; identical images are always listed).")
  flags.DEFINE_integer("batch_size", None, "Images per inference step (default: the run's "
                       "eval.batch_size).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a run directory written by jaxembed train)")
  if not os.path.isdir(f.workdir):
    cli.fail(f"--workdir {f.workdir}: no such directory")
  if f.batch_size is not None and f.batch_size < 1:
    cli.fail(f"--batch_size must be positive, got {f.batch_size}")
  # Deferred: jaxembed.export imports JAX, Flax and Orbax (2.7 s on 2 idle cores); help and flag
  # errors answer without it.
  from jaxembed import export  # pylint: disable=g-import-not-at-top
  from jaxembed import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize()
  export.export(f.workdir, data=f.data, out=f.out, step=f.step, overwrite=f.overwrite,
                plots=f.plots, thumbnails=f.thumbnails, tables=f.tables,
                duplicate_threshold=f.duplicate_threshold, batch_size=f.batch_size)


def run(argv=None):
  """``jaxembed export`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
  _define_flags()
  return cli.run(main, None if argv is None else [cli.prog(), *argv])
