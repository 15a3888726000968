"""Image files on disk: a folder of class subfolders (labelled), a flat folder or a file list (unlabelled).

``data.path`` is one of
  * a folder whose subfolders are classes (``cells/neutrophil/*.png``,
    searched recursively; labels follow the sorted subfolder names);
  * a folder of image files without subfolders: unlabelled (label -1);
  * a text file with one image path per line (relative paths are taken
    from the list's folder; blank lines and ``#`` comments are skipped):
    unlabelled.
The file paths are the ids. PIL reads PNG, JPEG, TIFF (16-bit and float
too), BMP, GIF and WebP. Unreadable files are skipped with a warning that
counts them and names the first few. Mixed sizes are resized to
``data.image_size``; mixed gray and RGB are converted to ``data.channels``;
either is an error when the field is not set. Non-uint8 pixels are scaled
by ``data.intensity`` with one range over all files. There is no test split
on disk: ``data.test_fraction`` splits one off (stratified, random_state=0).

Files are decoded on a pool of threads (one per CPU core, or
$JAXEMBED_DECODE_THREADS; PIL and NumPy release the GIL) straight into one
preallocated uint8 array, in the order of the listing; a read that takes
longer than 5 s prints a progress line every 5 s.
"""

from concurrent import futures
import itertools
import os
import time

from absl import logging
import numpy as np
from PIL import Image

from jaxembed.data import convert
from jaxembed.data import dataset
from jaxembed.data.convert import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
_SHOW = 5  # unreadable paths named in the warning
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
PROGRESS_EVERY = 5.0  # seconds between progress lines while files are read
THREADS_ENV = "JAXEMBED_DECODE_THREADS"
_UINT8, _WIDE = "uint8", "wide"  # how a file was converted (read_files)
_IN_FLIGHT = 8  # files submitted per decoding thread ahead of the ones done


def _is_image(name):
  return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _walk_images(folder):
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [os.path.join(root, f) for f in sorted(files) if _is_image(f)]
  return out


def list_images(path):
  """(paths, labels, class_names) of an image folder or file list (module docstring)."""
  if not path:
    raise DataError("data.source='folder' needs --config.data.path=<folder of images, folder "
                    "of class subfolders, or a text file listing image paths>")
  if os.path.isfile(path):
    base = os.path.dirname(os.path.abspath(path))
    try:
      with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"cannot read the file list {path!r}: {e}") from None
    paths = [ln if os.path.isabs(ln) else os.path.join(base, ln)
             for ln in lines if ln and not ln.startswith("#")]
    if not paths:
      raise DataError(f"the file list {path!r} names no images")
    return paths, None, ()
  if not os.path.isdir(path):
    raise DataError(f"data.path={path!r}: no such file or folder")
  entries = sorted(os.listdir(path))
  subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e)) and not e.startswith(".")]
  top = [os.path.join(path, e) for e in entries
         if _is_image(e) and os.path.isfile(os.path.join(path, e))]
  if not subdirs:
    if not top:
      raise DataError(f"no image files ({', '.join(EXTENSIONS)}) in {path!r}")
    return top, None, ()
  if top:
    raise DataError(f"{path!r} has both image files ({os.path.basename(top[0])}, ...) and "
                    f"subfolders ({subdirs[0]}, ...); put every image in a class subfolder, "
                    "or list them in a text file")
  paths, labels = [], []
  for label, d in enumerate(subdirs):
    found = _walk_images(os.path.join(path, d))
    if not found:
      raise DataError(f"class folder {os.path.join(path, d)!r} has no image files; remove it "
                      "or add images")
    paths += found
    labels += [label] * len(found)
  return paths, np.asarray(labels, np.int64), tuple(subdirs)


def read_image(path):
  """One image file as an (H, W, C) array: uint8 for 8-bit, uint16/int32/float32 otherwise.

  Palette, alpha and CMYK images become RGB (alpha dropped); 1-bit and
  gray+alpha become gray. Raises OSError/ValueError for unreadable files.
  """
  with Image.open(path) as img:
    img.load()
    mode = img.mode
    if mode == "1" or mode == "LA":
      img = img.convert("L")
    elif mode in ("P", "PA"):
      img = img.convert("RGBA").convert("RGB")
    elif mode not in ("L", "RGB", "I", "F") and not mode.startswith("I;16"):
      img = img.convert("RGB")
    arr = np.asarray(img)
  if arr.dtype.byteorder == ">":  # I;16B
    arr = arr.astype(arr.dtype.newbyteorder("="))
  if mode.startswith("I;16"):
    arr = arr.astype(np.uint16)
  return arr[..., None] if arr.ndim == 2 else arr


def prepare(arr, data_config, vrange=None, what="image"):
  """One decoded file -> uint8 (S, S, C): intensity scaling, resize, channels (docs/data.md).

  The one conversion of a file for every path (in memory, streamed batches,
  thumbnails), so that they agree bit for bit. ``vrange`` is the dataset's
  (lo, hi) for ``intensity="minmax"`` of non-uint8 files.
  """
  x = convert.to_uint8(arr[None], data_config.get("intensity", "minmax"),
                       data_config.get("window"), vrange=vrange, what=what)
  size = data_config.get("image_size")
  if size:
    x = convert.resize_images(x, size)
  return convert.to_channels(x, data_config.get("channels"))[0]


def decode_threads():
  """Threads that decode files: $JAXEMBED_DECODE_THREADS, else one per CPU core."""
  value = os.environ.get(THREADS_ENV, "").strip()
  if not value:
    return os.cpu_count() or 1
  if not value.isdigit() or int(value) < 1:
    raise DataError(f"{THREADS_ENV}={value!r}: give a number of threads >= 1, or unset it "
                    "for one per CPU core")
  return int(value)


class Progress:
  """Prints "reading <what>: 12,000 of 30,000 (2,950 files/s, 6 s left)" every ``every`` seconds.

  Nothing is printed for work that ends within the first ``every`` seconds;
  once a line was printed, :meth:`finish` prints the total time.
  """

  def __init__(self, total, what, every=None, clock=time.monotonic):
    self.total, self.what, self.clock = total, what, clock
    self.every = PROGRESS_EVERY if every is None else every
    self.start = self.last = clock()
    self.printed = False

  def update(self, done):
    now = self.clock()
    if now - self.last < self.every or done >= self.total:
      return
    rate = done / max(now - self.start, 1e-9)
    left = f"{(self.total - done) / rate:,.0f} s left" if rate > 0 else "time left unknown"
    _say(f"reading {self.what}: {done:,} of {self.total:,} ({rate:,.0f} files/s, {left})")
    self.last, self.printed = now, True

  def finish(self, done):
    if self.printed:
      seconds = self.clock() - self.start
      _say(f"read {done:,} {self.what} in {seconds:,.0f} s "
           f"({done / max(seconds, 1e-9):,.0f} files/s)")


def _say(line):
  # Printed like the trainer's progress lines (absl INFO is hidden at the CLI's default
  # verbosity; the estimator silences stdout when not verbose), and logged for log files.
  logging.info(line)
  print(line, flush=True)


def _run_parallel(task, items, threads, progress):
  """Calls ``task(item)`` for every item on ``threads`` threads; returns the results in order.

  At most ``_IN_FLIGHT`` tasks per thread are submitted at a time (the
  futures of all 30,000 files of scripts/benchmark_folder_load.py at once
  took 65 MB), and the first exception raised by a task is raised here once
  the running tasks end.
  """
  results = [None] * len(items)
  if threads <= 1:
    for j, item in enumerate(items):
      results[j] = task(item)
      progress.update(j + 1)
    return results
  todo = iter(enumerate(items))
  running, done = {}, 0
  with futures.ThreadPoolExecutor(max_workers=threads) as pool:
    try:
      while True:
        for j, item in itertools.islice(todo, threads * _IN_FLIGHT - len(running)):
          running[pool.submit(task, item)] = j
        if not running:
          return results
        finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
        for f in finished:
          results[running.pop(f)] = f.result()
        done += len(finished)
        progress.update(done)
    finally:
      for f in running:
        f.cancel()


def read_files(paths, data_config, what="image files", *, skip_unreadable=True, threads=None,
               combine_range=None, progress_every=None):
  """Decodes and converts image files, in parallel, into one preallocated uint8 array.

  Each file becomes uint8 (S, S, C) by :func:`prepare`, written into its
  row of the output as soon as it is decoded (no list of decoded files, so
  host memory is the output array plus one file per thread). The rows are
  in the order of ``paths`` whatever the number of threads. Non-uint8 files
  with ``intensity="minmax"`` need the range over all files first: they are
  read twice, once for their range and once for their pixels.

  Args:
    paths: the files.
    data_config: ``image_size``, ``channels``, ``intensity``, ``window``.
      Without ``image_size`` every file must have the size of the first
      readable one, without ``channels`` its number of channels.
    what: how the progress line and messages name the files.
    skip_unreadable: skip files that cannot be decoded, with one warning
      that counts them and names the first few (an error if none can be
      read); False: the first one raises DataError.
    threads: decoding threads; None: :func:`decode_threads`.
    combine_range: for ``intensity="minmax"``, called once with this
      call's (lo, hi) over its non-uint8 files, or None without any; returns
      the range to scale with (several processes: a collective over all).
    progress_every: seconds between progress lines (default 5).
  Returns:
    (images uint8 (k, S, S, C), kept indices into ``paths`` (k,) int64,
    the intensity range used or None).
  """
  threads = decode_threads() if threads is None else threads
  intensity, window = data_config.get("intensity", "minmax"), data_config.get("window")
  size, channels = data_config.get("image_size"), data_config.get("channels")
  if channels not in (None, 1, 3):
    raise DataError(f"data.channels must be 1, 3 or None, got {channels!r}")
  if size is not None and size < 0:
    raise DataError(f"data.image_size must be positive (or 0 to keep the source's size), "
                    f"got {size}")
  if not paths:
    raise DataError(f"no {what} to read")
  bad = {}
  first = first_arr = None
  for i, p in enumerate(paths):  # the first readable file sets the shape of a plain folder
    try:
      first_arr, first = read_image(p), i
      break
    except READ_ERRORS as e:
      if not skip_unreadable:
        raise DataError(f"cannot read {p}: {e}") from None
      bad[i] = e
  if first is None:
    raise DataError(f"none of the {len(paths)} {what} could be read; the first: "
                    + "; ".join(f"{paths[i]}: {e}" for i, e in list(bad.items())[:_SHOW]))
  h, w, c = first_arr.shape
  shape = (size or h, size or w, channels or c)
  out = np.empty((len(paths),) + shape, np.uint8)
  scale_later = intensity == "minmax"  # non-uint8 files wait for the range over all files

  def check(arr, i):
    if channels is None and arr.shape[-1] != c:
      gray, rgb = (paths[first], paths[i]) if c == 1 else (paths[i], paths[first])
      raise DataError(f"the folder mixes gray and RGB images (e.g. {gray} and {rgb}); set "
                      "--config.data.channels=1 or 3 to convert them")
    if not size and arr.shape[:2] != (h, w):
      raise DataError(f"the folder mixes image sizes ({h}, {w}) ({paths[first]}) and "
                      f"{arr.shape[:2]} ({paths[i]}); set --config.data.image_size to resize "
                      "them")

  def decode(i):
    """Writes row i: returns _UINT8 or _WIDE; or the read error, or the (lo, hi) of a file
    that waits for the range of all files."""
    if i in bad:
      return bad[i]
    try:
      arr = first_arr if i == first else read_image(paths[i])
    except READ_ERRORS as e:
      if not skip_unreadable:
        raise DataError(f"cannot read {paths[i]}: {e}") from None
      return e
    check(arr, i)
    if scale_later and arr.dtype not in (np.uint8, np.bool_):
      return convert.value_range(arr[None], intensity, window, what=paths[i])
    out[i] = prepare(arr, data_config, what=paths[i])
    return _UINT8 if arr.dtype in (np.uint8, np.bool_) else _WIDE

  progress = Progress(len(paths), what, progress_every)
  results = _run_parallel(decode, range(len(paths)), threads, progress)
  bad.update((i, r) for i, r in enumerate(results) if isinstance(r, Exception))
  later = [i for i, r in enumerate(results) if isinstance(r, tuple)]
  first_arr = None  # decode() is done with it
  vrange = None
  if scale_later:
    local = ((min(results[i][0] for i in later), max(results[i][1] for i in later))
             if later else None)
    vrange = combine_range(local) if combine_range else local
  elif intensity == "window" and _WIDE in results:
    vrange = (float(window[0]), float(window[1]))
  if later:
    def scale(i):
      try:
        arr = read_image(paths[i])
      except READ_ERRORS as e:
        raise DataError(f"cannot read {paths[i]} a second time: {e}") from None
      out[i] = prepare(arr, data_config, vrange, what=paths[i])

    _run_parallel(scale, later, threads, Progress(len(later), f"{what} (scaling)",
                                                  progress_every))
  progress.finish(len(paths))
  kept = np.array([i for i in range(len(paths)) if i not in bad], np.int64)
  if bad:
    names = [paths[i] for i in sorted(bad)]
    msg = (f"skipped {len(bad)} of {len(paths)} {what} that could not be read: "
           + ", ".join(names[:_SHOW]) + (", ..." if len(bad) > _SHOW else ""))
    logging.warning(msg)
    print(f"warning: {msg}", flush=True)
    for j, i in enumerate(kept):  # close the gaps in place (rows only move up)
      if i != j:
        out[j] = out[i]
    out = out[:len(kept)]
  return out, kept, vrange


def split_files(data_config):
  """The train and test files of a folder source, before any is read.

  ``data.classes`` and ``data.max_examples`` (seed 0), then the
  ``data.test_fraction`` split (stratified, random_state=0), on the file
  listing; the in-memory and the streamed paths both split here.
  Returns:
    ((train paths, train labels), (test paths, test labels), class names).
  """
  paths, labels, class_names = list_images(data_config.get("path"))
  labels = convert.check_labels(labels, len(paths))
  index, labels, _ = dataset.select(np.arange(len(paths)), labels,
                                     np.asarray(paths), data_config, seed=0)
  frac = data_config.get("test_fraction", 0.2)
  if not 0.0 <= frac < 1.0:
    raise DataError(f"data.test_fraction must be in [0, 1), got {frac}")
  train, test = dataset.split_indices(labels, frac)
  return (([paths[i] for i in index[train]], labels[train]),
          ([paths[i] for i in index[test]], labels[test]), tuple(class_names))


def load_folder(data_config):
  """The folder source (module docstring).

  The files are split first (:func:`split_files`), then read in parallel
  into one array whose first rows are the training images: the splits are
  views of it, so host memory is the images once. An unreadable file
  leaves its split.
  """
  (train_paths, train_labels), (test_paths, test_labels), class_names = split_files(data_config)
  paths = train_paths + test_paths
  images, kept, vrange = read_files(paths, data_config, what="image files")
  n = int((kept < len(train_paths)).sum())
  labels = np.concatenate([train_labels, test_labels])[kept]
  ids = np.array([os.path.normpath(p) for p in paths])[kept]
  return dataset.Dataset(images[:n], labels[:n], ids[:n], images[n:], labels[n:], ids[n:],
                         name=os.path.basename(os.path.normpath(data_config.get("path"))),
                         class_names=class_names, intensity_range=vrange)
