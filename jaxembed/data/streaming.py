"""Streaming training batches from disk for data that do not fit in device memory.

``stream_batches`` yields the global uint8 training batches of a run, one
per step, as ``jax.Array``s sharded over the mesh's ``data`` axis. Each
process reads only its own rows (a contiguous 1/process_count of every
batch), decodes them on a pool of CPU threads a few batches ahead, and the
batches are transferred to the devices ``prefetch`` steps ahead.

* ``folder`` sources and TFDS datasets prepared as array_record or parquet
  stream exactly the in-memory batches: the same images (file listing and
  test split; TFDS's random-access data source), the same (seed, epoch)
  permutation as ``pipeline.batch_indices`` and the same decoding, resizing
  and channel conversion, so a run can switch paths without changing what it
  trains on (unreadable files raise instead of being skipped, since a
  dropped file would shift every later batch). Neither needs TensorFlow.
* TFDS datasets prepared as TFRecord files (no random access) are read by
  tf.data from ``tfds.split_for_jax_process(train_split)`` with file and
  buffer shuffling seeded by (seed, epoch): deterministic, but a different
  order than the in-memory path, and it needs the ``tf`` extra.

The trainer streams its training batches from here when ``data.streaming``
is set (positioned at the resumed step). No process then holds the whole
dataset: for a folder source, :func:`load_process_share` reads only this
process's contiguous share of each split, for its part of the statistics and
of the evaluation embeddings (labels and ids, from the file listing, are kept
whole), so host memory per process is 1/process_count of the images.
"""

import collections
from concurrent import futures
import dataclasses
import hashlib
import os

import jax
import numpy as np

from jaxembed import extras
from jaxembed import parallel
from jaxembed.data import convert
from jaxembed.data import folder as folder_lib
from jaxembed.data import pipeline
from jaxembed.data import stats as stats_lib
from jaxembed.data import tfds_source
from jaxembed.data.convert import DataError

SHUFFLE_BUFFER = 10_000  # examples in the tf.data shuffle buffer of the TFRecord path
READ_AHEAD = 2  # batches being decoded on the threads beyond the one handed out


def _epoch_seed(seed, epoch):
  return int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))


def folder_train_paths(data_config):
  """The training files of a folder source, as ``load`` splits them (without reading the files)."""
  return folder_lib.split_files(data_config)[0][0]


@dataclasses.dataclass
class ProcessShare:
  """The host data of a streamed run: this process's rows of each split, all labels and ids.

  Process p of P holds the images of rows ``[n * p // P, n * (p + 1) // P)``
  of each split (``train_rows``, ``test_rows``), decoded as the streamed
  batches decode them; labels and ids are whole. It answers what the trainer
  asks of a :class:`jaxembed.data.Dataset`: counts, the image shape, the
  statistics (:meth:`stats`, summed over the processes), a fingerprint of
  the data, and lazily read images for the page's thumbnails.
  """
  train_images: np.ndarray          # this process's rows only
  test_images: np.ndarray
  train_labels: np.ndarray          # every row
  train_ids: np.ndarray
  test_labels: np.ndarray
  test_ids: np.ndarray
  train_rows: tuple
  test_rows: tuple
  paths: list                       # every train, then test file
  data_config: object
  image_shape: tuple
  name: str = ""
  class_names: tuple = ()
  intensity_range: tuple | None = None

  process_rows = True

  @property
  def num_train(self):
    return len(self.train_labels)

  @property
  def num_test(self):
    return len(self.test_labels)

  @property
  def is_labelled(self):
    return self.train_labels.ndim == 1 and bool((self.train_labels >= 0).all())

  def stats(self):
    """jaxembed.data.compute_stats of all training images, from every process's exact sums."""
    local = stats_lib.partial_sums(self.train_images.reshape((-1,) + tuple(self.image_shape)))
    flat = np.array(local["pixels"] + local["squares"] + local["border"]
                    + [local["count"], local["border_count"]], np.int64)
    every = parallel.gather_rows(flat[None])  # (processes, fields)
    c = len(local["pixels"])
    parts = [{"pixels": list(map(int, r[:c])), "squares": list(map(int, r[c:2 * c])),
              "border": list(map(int, r[2 * c:3 * c])), "count": int(r[-2]),
              "border_count": int(r[-1])} for r in every]
    return stats_lib.from_sums(stats_lib.add_sums(parts))

  def fingerprint(self):
    """SHA-256 over every image's digest, the labels and the shape (the run record's data hash)."""
    h = hashlib.sha256(f"streamed folder {self.image_shape}".encode())
    for images, labels in ((self.train_images, self.train_labels),
                           (self.test_images, self.test_labels)):
      local = np.array([np.frombuffer(hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest(),
                                      np.uint8) for x in images], np.uint8).reshape(-1, 32)
      h.update(parallel.gather_rows(local).tobytes())
      h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()

  def all_images(self):
    """Every train, then test image, read from its file when asked for (thumbnails)."""
    return FileImages(self.paths, self.data_config, self.intensity_range, self.image_shape)


class FileImages:
  """Images read from their files on indexing: ``images[idx]`` -> uint8 (len(idx), H, W, C)."""

  def __init__(self, paths, data_config, vrange, image_shape):
    self.paths, self.data_config, self.vrange = list(paths), data_config, vrange
    self.shape = (len(self.paths),) + tuple(image_shape)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    if np.ndim(index) == 0:
      path = self.paths[int(index)]
      return folder_lib.prepare(folder_lib.read_image(path), self.data_config, self.vrange, path)
    return np.stack([self[i] for i in np.asarray(index).reshape(-1)])


def load_process_share(data_config):
  """This process's :class:`ProcessShare` of a folder source (``data.streaming``).

  Unreadable files raise (as the streamed batches do): a skipped file would
  shift every later row. Non-uint8 files with ``intensity="minmax"`` are
  scaled with the range of all processes' files together.
  """
  if data_config.get("source") != "folder":
    raise DataError(f"per-process loading reads data.source 'folder', not "
                    f"{data_config.get('source')!r}")
  (train_paths, train_labels), (test_paths, test_labels), class_names = folder_lib.split_files(
      data_config)
  pi, pc = jax.process_index(), jax.process_count()
  rows = [(len(p) * pi // pc, len(p) * (pi + 1) // pc) for p in (train_paths, test_paths)]
  mine = [p[a:b] for p, (a, b) in zip((train_paths, test_paths), rows)]

  def combine_range(local):
    # Every process takes part (a collective), whether or not its files need it.
    lo, hi = local if local is not None else (np.inf, -np.inf)
    every = parallel.gather_rows(np.array([[lo, hi]], np.float64))
    if np.isfinite(every[:, 0]).any():
      return float(every[:, 0].min()), float(every[:, 1].max())
    return None

  if mine[0] or mine[1]:
    images, _, vrange = folder_lib.read_files(
        mine[0] + mine[1], data_config, what="image files of this process",
        skip_unreadable=False, combine_range=combine_range)
  else:  # this process holds no image: a file gives the shape
    vrange = combine_range(None) if data_config.get("intensity", "minmax") == "minmax" else None
    path = train_paths[0]
    shape = folder_lib.prepare(folder_lib.read_image(path), data_config, vrange, path).shape
    images = np.zeros((0,) + shape, np.uint8)
  if data_config.get("intensity", "minmax") == "window":
    vrange = tuple(data_config.get("window"))
  shape = images.shape[1:]
  stacked = [images[:len(mine[0])], images[len(mine[0]):]]
  ids = [np.array([os.path.normpath(p) for p in ps]) for ps in (train_paths, test_paths)]
  return ProcessShare(
      train_images=stacked[0], test_images=stacked[1], train_labels=train_labels,
      train_ids=ids[0], test_labels=test_labels, test_ids=ids[1], train_rows=rows[0],
      test_rows=rows[1], paths=list(train_paths) + list(test_paths), data_config=data_config,
      image_shape=tuple(shape), name=os.path.basename(os.path.normpath(data_config.get("path"))),
      class_names=class_names, intensity_range=vrange)


def _read_batches(rows, read):
  """Yields ``np.stack([read(r) for r in batch])`` for each batch of ``rows``, in order.

  The reads run on a thread pool (PIL and NumPy release the GIL while they
  decode and resize), ``READ_AHEAD`` batches ahead of the consumer; a read
  that raises raises here, at its batch.
  """
  pool = futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
  pending = collections.deque()
  try:
    for batch in rows:
      pending.append([pool.submit(read, r) for r in batch])
      if len(pending) > READ_AHEAD:
        yield np.stack([f.result() for f in pending.popleft()])
    while pending:
      yield np.stack([f.result() for f in pending.popleft()])
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def _host_rows(seed, start_step, num_steps, n, batch_size):
  """This process's row indices of every step from ``start_step`` on (``num_steps`` of them)."""
  pi, pc = jax.process_index(), jax.process_count()
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    yield pipeline.host_batch_indices(seed, step, n, batch_size, pi, pc)
    step += 1


def _folder_host_batches(data_config, batch_size, seed, start_step, num_steps, vrange):
  paths = folder_train_paths(data_config)
  n = len(paths)
  spe = pipeline.steps_per_epoch(n, batch_size)
  if spe == 0:
    raise DataError(f"batch_size={batch_size} is larger than the {n} training images")
  first = folder_lib.read_image(paths[0])
  if (first.dtype != np.uint8 and data_config.get("intensity", "minmax") == "minmax"
      and vrange is None):
    raise DataError("streaming non-uint8 images with data.intensity='minmax' needs the dataset "
                    "range up front: pass vrange=(lo, hi), or use data.intensity='window' with "
                    "data.window=(lo, hi), or 'per_image'")
  shape = folder_lib.prepare(first, data_config, vrange, paths[0]).shape

  def read(i):
    try:
      arr = folder_lib.read_image(paths[i])
    except folder_lib.READ_ERRORS as e:
      raise DataError(f"cannot read {paths[i]}: {e}") from None
    x = folder_lib.prepare(arr, data_config, vrange, paths[i])
    if x.shape != shape:
      raise DataError(f"{paths[i]} has shape {x.shape} but the first image {shape}; set "
                      "data.image_size and data.channels to make them agree")
    return x

  return _read_batches(_host_rows(seed, start_step, num_steps, n, batch_size), read)


def _tfds_source_host_batches(b, data_config, batch_size, seed, start_step, num_steps):
  """The TFDS stream of a dataset with random access (array_record, parquet): no TensorFlow."""
  split = data_config.get("train_split") or "train"
  source, decode, _ = tfds_source.data_source(b, data_config, split)
  n = len(source)
  if pipeline.steps_per_epoch(n, batch_size) == 0:
    raise DataError(f"batch_size={batch_size} is larger than the training split ({n} examples)")
  size, channels = data_config.get("image_size"), data_config.get("channels")

  def read(i):
    img = decode(source[int(i)])[0]
    if img.dtype != np.uint8:
      raise DataError("the TFDS streaming path reads uint8 images only")
    # The in-memory order of jaxembed.data.load: resize, then channels.
    x = img[None]
    if size:
      x = convert.resize_images(x, size)
    return convert.to_channels(x, channels)[0]

  return _read_batches(_host_rows(seed, start_step, num_steps, n, batch_size), read)


def _tfds_host_batches(data_config, batch_size, seed, start_step, num_steps):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = data_config.get("name"), data_config.get("dir")
  split = data_config.get("train_split") or "train"
  b = tfds_source.builder(data_config)
  tfds_source.check_split(b, split, data_config)
  if b.info.splits and tfds_source.random_access(b):
    yield from _tfds_source_host_batches(b, data_config, batch_size, seed, start_step, num_steps)
    return
  tf = extras.tensorflow(
      f"TFDS dataset {name!r} is not prepared as array_record; streaming it",
      alternative=f"prepare it as array_record, read without TensorFlow: `tfds build {name} "
      "--file_format=array_record`")
  proc_split = tfds.split_for_jax_process(split, drop_remainder=True)
  host_bs = batch_size // jax.process_count()
  image_key = data_config.get("image_key", "image")
  size, channels = data_config.get("image_size"), data_config.get("channels")

  def open_split(epoch):
    try:
      return tfds.load(name, split=proc_split, data_dir=data_dir, download=False,
                       shuffle_files=True,
                       read_config=tfds.ReadConfig(shuffle_seed=_epoch_seed(seed, epoch)))
    except AssertionError as e:
      raise DataError(f"TFDS dataset {name!r} is not prepared in data.dir={data_dir!r} "
                      f"({str(e).splitlines()[0]})") from None

  def prep(ex):
    img = ex[image_key]
    if len(img.shape) == 2:
      img = img[..., None]
    if img.dtype != tf.uint8:
      raise DataError("the TFDS streaming path reads uint8 images only")
    if channels == 3 and img.shape[-1] == 1:
      img = tf.image.grayscale_to_rgb(img)
    elif channels == 1 and img.shape[-1] == 3:
      img = tf.cast(tf.clip_by_value(tf.round(tf.tensordot(
          tf.cast(img, tf.float32), tf.constant([0.299, 0.587, 0.114]), 1)), 0, 255),
                    tf.uint8)[..., None]
    if size and tuple(img.shape[:2]) != (size, size):
      img = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
      img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
    return img

  n_host = int(open_split(0).cardinality())
  if n_host < 0:
    raise DataError(f"TFDS dataset {name!r}, split {split!r}: unknown size")
  spe = n_host // host_bs
  if spe == 0:
    raise DataError(f"batch_size={batch_size} is larger than the training split "
                    f"({n_host} examples per process)")
  stop = None if num_steps is None else start_step + num_steps
  step = start_step
  while stop is None or step < stop:
    epoch, skip = divmod(step, spe)
    take = spe - skip if stop is None else min(spe - skip, stop - step)
    ds = open_split(epoch).shuffle(SHUFFLE_BUFFER, seed=_epoch_seed(seed, epoch))
    ds = ds.skip(skip * host_bs).map(prep, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(host_bs, drop_remainder=True).take(take).prefetch(tf.data.AUTOTUNE)
    for batch in ds.as_numpy_iterator():
      yield batch
    step += take


def stream_batches(data_config, batch_size, mesh, *, seed=0, start_step=0, num_steps=None,
                   prefetch=2, vrange=None):
  """Yields the global uint8 training batch of each step from ``start_step`` on.

  Args:
    data_config: the run's ``data`` config; ``source`` "folder" or "tfds".
    batch_size: the global batch (divisible by the process count and by
      the number of devices of the mesh).
    mesh: the ``data`` mesh (jaxembed.parallel.make_mesh()).
    seed: the run's seed (the data order of epoch e depends on (seed, e)).
    start_step: the first global step (resuming); epochs have
      ``n // batch_size`` steps and drop the last partial batch.
    num_steps: how many batches to yield; None: without end.
    prefetch: batches placed on the devices ahead of the consumer.
    vrange: (lo, hi) for ``intensity="minmax"`` of non-uint8 folder images
      (``Dataset.intensity_range`` of an in-memory load, or known limits).
  Yields:
    jax.Array uint8 (batch_size, S, S, C), sharded ``P("data")`` over ``mesh``.
  """
  source = data_config.get("source")
  if batch_size % mesh.devices.size:
    raise DataError(f"batch_size={batch_size} is not divisible by the {mesh.devices.size} devices")
  if source == "folder":
    host = _folder_host_batches(data_config, batch_size, seed, start_step, num_steps, vrange)
  elif source == "tfds":
    host = _tfds_host_batches(data_config, batch_size, seed, start_step, num_steps)
  else:
    raise DataError(f"streaming reads data.source 'folder' or 'tfds', not {source!r}; the other "
                    "sources fit in memory (jaxembed.data.load)")
  return _to_device(host, mesh, prefetch)


def _to_device(host_batches, mesh, prefetch):
  """Starts the transfer of up to ``prefetch`` batches before the consumer asks for them."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(parallel.shard_batch(mesh, batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


