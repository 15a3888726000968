"""Training metrics to TensorBoard event files and to stdout.

The default writer writes TensorBoard's event files itself (records of
``Event`` protos, tensorboard's own RecordWriter), with neither TensorFlow
nor clu: tensorboard's EventFileWriter opens its file through
``tensorboard.compat.tf``, which imports TensorFlow whenever it is installed
(12 s and TensorFlow's start-up lines on two CPU cores, docs/BENCHMARKS.md),
and ``clu.metric_writers`` imports TensorFlow on import.
``logging.writer = "clu"`` selects clu's default writer (TensorFlow summaries
plus absl logging) instead, which needs the ``tf`` extra; both write the
same tags.
"""

import io
import itertools
import json
import os
import socket
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.summary.writer import record_writer

from jaxembed import extras

# Tells apart event files that one process opens in the same second.
_FILE_NUMBERS = itertools.count()


class TensorBoardWriter:
  """Writes scalars, images and the config as TensorBoard events (no TensorFlow needed)."""

  def __init__(self, logdir):
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard's own naming, which it sorts by (EventFileWriter does the same).
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_NUMBERS)}")
    self._file = open(os.path.join(logdir, name), "wb")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def _write(self, event):
    self._records.write(event.SerializeToString())

  def _add(self, step, values):
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, **v) for t, v in values])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step, scalars):
    self._add(step, [(k, {"simple_value": float(v)}) for k, v in scalars.items()])

  def write_images(self, step, images):
    """``images``: tag -> uint8 (N, H, W, 3) array; the first image of each is written."""
    values = []
    for tag, arr in images.items():
      img = np.asarray(arr)[0]
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="PNG")
      values.append((tag, {"image": summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2],
          encoded_image_string=buf.getvalue())}))
    self._add(step, values)

  def write_hparams(self, hparams):
    """The config, as a text summary (readable in TensorBoard's Text tab)."""
    text = "```\n" + json.dumps(hparams, indent=1, sort_keys=True, default=str) + "\n```"
    tensor = tensor_pb2.TensorProto(
        dtype=7, string_val=[text.encode()],  # 7 = DT_STRING
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]))
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    self._add(0, [("config", {"tensor": tensor, "metadata": meta})])

  def flush(self):
    self._records.flush()

  def close(self):
    self._records.close()


class NullWriter:
  """What processes other than the first write: nothing."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir, kind="tensorboard", main_process=True):
  """The metric writer of a run: ``tensorboard`` (default) or ``clu``."""
  if not main_process:
    return NullWriter()
  if kind == "tensorboard":
    return TensorBoardWriter(workdir)
  if kind == "clu":
    return extras.clu_metric_writers().create_default_writer(workdir, asynchronous=True)
  raise ValueError(f"unknown logging.writer {kind!r}; use 'tensorboard' or 'clu'")
