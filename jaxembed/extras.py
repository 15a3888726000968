"""Optional dependencies: imported where needed, with a one-line error naming the extra to install.

TensorFlow (the ``tf`` extra, ``pip install "jaxembed[tf]"``; 1.3 GB of a
2.6 GB environment) is needed only to read TFDS datasets prepared as
TFRecord files and for ``logging.writer = "clu"`` (clu.metric_writers
imports it). Importing it takes 8-12 s on two CPU cores, so it is imported
here, on first use, never at the top of a module.
"""

import os

TF_EXTRA = 'pip install "jaxembed[tf]"'


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message names what to install."""
  exit_status = 2  # jaxembed.cli: one line, usage error (install the extra or change the input)


def tensorflow(needed_for, alternative=None):
  """The ``tensorflow`` module, or MissingExtra: "<needed_for> needs TensorFlow ..."."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingExtra(f"{needed_for} needs TensorFlow, which is not installed: {TF_EXTRA}"
                       + (f"; or {alternative}" if alternative else "")) from None
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3":
    # The level jaxembed.cli sets for a quiet run: TensorFlow's Python warnings too
    # (tensorflow_datasets' reader prints a 3-line deprecation warning through them).
    tf.get_logger().setLevel("ERROR")
  return tf


def clu_metric_writers():
  """``clu.metric_writers``, which imports TensorFlow on import."""
  tensorflow('logging.writer="clu"')
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers
