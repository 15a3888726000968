"""Image sources and the device-resident batch pipeline.

``load(config.data)`` returns a :class:`Dataset` with uint8 (N, H, W, C)
train and test images, labels and ids; ``from_arrays`` builds one from
NumPy arrays; ``pipeline`` turns it into sharded batches, and
``streaming.stream_batches`` streams batches from disk for data that do not
fit in device memory (imported on use: it loads TensorFlow).
Sources: digits, medmnist, folder, tfds, idx, arrays (docs/data.md).
"""

from jaxembed.data import pipeline
from jaxembed.data.arrays import from_arrays, prepare_images
from jaxembed.data.convert import DataError
from jaxembed.data.dataset import Dataset
from jaxembed.data.sources import SOURCES, load
from jaxembed.data.stats import compute_stats

__all__ = ["Dataset", "DataError", "SOURCES", "load", "from_arrays", "prepare_images",
           "compute_stats", "pipeline"]
