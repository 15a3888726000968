"""Image sources and the device-resident batch pipeline.

``load(config.data)`` returns a :class:`Dataset` with uint8 (N, H, W, C)
train and test images, labels and ids; ``pipeline`` turns it into sharded
batches.
"""

from jaxembed.data.sources import Dataset, DataError, load
from jaxembed.data.stats import compute_stats
from jaxembed.data import pipeline

__all__ = ["Dataset", "DataError", "load", "compute_stats", "pipeline"]
