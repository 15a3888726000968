"""Similar images: ``jaxembed search --workdir DIR --query IMAGE_OR_ID [--k 10]``.

Embeds the query image with the run's model (or takes the stored vectors of
an id in ``embeddings.npz``, or of an image file that is one of the run's
own, which is then listed first, at distance 0), prints the ids (for a run
on files: the paths) and distances of its nearest neighbours (exact,
jaxembed.search.nearest) in backbone-feature space
(``--space features``, cosine) or on the 2-D map (``--space embedding``,
euclidean) and saves a PNG strip of the query and its neighbours.
``python -m jaxembed.search`` is the same command.
"""

import os

from absl import flags
import numpy as np

from jaxembed import cli
from jaxembed import files
from jaxembed import plots

# jaxembed.search.METRICS (tests/cli_test.py checks that they agree).
METRICS = ("euclidean", "cosine")


def _define_flags():
  flags.DEFINE_string("workdir", None, "Run directory written by jaxembed train.")
  flags.DEFINE_string("query", None, "Image file (PNG, JPEG, ...), .npy of one image, or an id "
                      "from the embeddings file.")
  flags.DEFINE_integer("k", 10, "Number of neighbours.")
  flags.DEFINE_enum("space", "features", ["features", "embedding"],
                    "Search in backbone-feature space or on the 2-D map.")
  flags.DEFINE_enum("metric", None, list(METRICS),
                    "Distance; default cosine for features, euclidean for the map.")
  flags.DEFINE_string("embeddings", None, "Embeddings file to search (default "
                      "DIR/embeddings.npz, or one written by jaxembed export).")
  flags.DEFINE_string("data", None, "Data source of the embeddings file's images, for the "
                      "picture (default: the run's data).")
  flags.DEFINE_string("out", None, "PNG strip of the query and its neighbours (default "
                      "DIR/search/<query>.png).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a run directory written by jaxembed train)")
  if not f.query:
    cli.fail("--query is required: an image file, a .npy image, or an id from embeddings.npz")
  emb_path = f.embeddings or os.path.join(f.workdir, "embeddings.npz")
  if not os.path.isfile(emb_path):
    cli.fail(f"{emb_path} not found; train the run to the end or run jaxembed export first "
             "(or pass --embeddings)")
  # Deferred: jaxembed.search and .runs import JAX, Flax and Orbax (2.5 s on 2 idle cores); help
  # and flag errors answer without them.
  from jaxembed import runs  # pylint: disable=g-import-not-at-top
  from jaxembed import search  # pylint: disable=g-import-not-at-top
  with np.load(emb_path, allow_pickle=False) as z:
    stored = {key: z[key] for key in z.files}
  ids = stored["ids"].astype(str)
  key = "features" if f.space == "features" else "embedding"
  metric = f.metric or ("cosine" if f.space == "features" else "euclidean")
  index = stored[key]
  # A file of the run is answered from its stored vectors, itself first (rank 0, distance 0).
  own_row = runs.row_of_file(f.query, ids) if os.path.isfile(f.query) else None
  k = min(f.k, len(index) - 1 if f.query in ids or own_row is not None else len(index))
  if k < 1:
    cli.fail(f"--k must be >= 1, got {f.k}")
  query_image = None
  model_step = ""
  if own_row is not None or (f.query in ids and not os.path.exists(f.query)):
    q_row = own_row if own_row is not None else int(np.flatnonzero(ids == f.query)[0])
    query = index[q_row][None]
    d, nb = search.nearest(index, query, min(k + 1, len(index)), metric=metric)
    keep = nb[0] != q_row
    d, nb = d[0][keep][:k], nb[0][keep][:k]
  else:
    q_row = None
    if not os.path.exists(f.query):
      cli.fail(f"--query {f.query!r} is neither a file nor an id in {emb_path} "
               f"(ids look like {ids[0]!r})")
    model, variables, config, step = runs.load_trained(f.workdir, f.step)
    model_step = f", query embedded with the checkpoint at step {step}"
    query_image = runs.read_query_image(f.query, config, runs.run_record(f.workdir))
    out = runs.embed_images(model, variables, query_image, config)
    query = out["features"] if f.space == "features" else out["z"][:, :2]
    if query.shape[1] != index.shape[1]:
      cli.fail(f"the model's {f.space} have {query.shape[1]} dimensions but {emb_path} has "
               f"{index.shape[1]}; was it written by this run?")
    d, nb = search.nearest(index, query, k, metric=metric)
    d, nb = d[0], nb[0]
    query_image = query_image[0]
  print(f"query: {f.query}  ({f.space}, {metric}, {len(index)} images{model_step})")
  print(f"{'rank':>4}  {'distance':>10}  {'label':>6}  {'split':>6}  id")
  labels = stored.get("labels")
  lab = files.label_strings(labels) if labels is not None else [""] * len(ids)
  split = stored.get("split", np.array([""] * len(ids))).astype(str)
  if own_row is not None:
    print(f"{0:>4}  {0.0:>10.5f}  {lab[own_row]:>6}  {split[own_row]:>6}  {ids[own_row]}  "
          "(the query itself: a file of the run)")
  for r, (dist, j) in enumerate(zip(d, nb), 1):
    print(f"{r:>4}  {dist:>10.5f}  {lab[j]:>6}  {split[j]:>6}  {ids[j]}")
  # The picture: the images behind the ids.
  try:
    images_by_id = runs.images_for_ids(f.workdir, [ids[j] for j in nb]
                                       + ([ids[q_row]] if q_row is not None else []),
                                       data=f.data)
  except (ValueError, OSError) as e:
    print(f"warning: no picture: cannot load the images ({e})", flush=True)
    return
  if q_row is not None:
    query_image = images_by_id[ids[q_row]]
  name = os.path.splitext(os.path.basename(str(f.query)))[0] or "query"
  name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
  out_png = f.out or os.path.join(f.workdir, "search", f"{name}.png")
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  plots.neighbour_strip(out_png, query_image, [images_by_id[ids[j]] for j in nb],
                        [f"{dist:.3g} / {lab[j]}" for dist, j in zip(d, nb)])
  print(f"Picture of the query and its neighbours: {out_png}")


def run(argv=None):
  """``jaxembed search`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
  _define_flags()
  return cli.run(main, None if argv is None else [cli.prog(), *argv])
