"""Batches for training and evaluation.

Training data live on the device as uint8 (uploaded once, replicated); each
step receives only the indices of its images, a slice of a permutation that
depends on (seed, epoch) alone, so a resumed run sees the same batches.
The images are gathered inside the jitted step, which keeps host-to-device
traffic at a few bytes per image. Data too large for device memory are
streamed instead (jaxembed.data.streaming, same batches for folders).
"""

import numpy as np


def epoch_permutation(seed, epoch, n):
  """The order of the n training images in ``epoch`` (deterministic)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n, batch_size):
  """Training drops the last partial batch."""
  return n // batch_size


def batch_indices(seed, step, n, batch_size):
  """Indices of the images of global training ``step`` (0-based)."""
  spe = steps_per_epoch(n, batch_size)
  epoch, i = divmod(step, spe)
  perm = epoch_permutation(seed, epoch, n)
  return perm[i * batch_size:(i + 1) * batch_size].astype(np.int32)


def padded_chunks(n, chunk, multiple):
  """Splits range(n) into chunks whose length is a multiple of ``multiple``.

  Yields (start, stop, padded_length): every example is covered exactly once;
  the last chunk is padded (by repeating index 0) and the padding is dropped
  after the computation.
  """
  chunk = max(multiple, chunk - chunk % multiple)
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    length = stop - start
    yield start, stop, -(-length // multiple) * multiple


def host_batch_indices(seed, step, n, batch_size, process_index=0, process_count=1):
  """This process's rows of global training ``step``: its contiguous 1/process_count slice.

  ``jax.make_array_from_process_local_data`` concatenates the processes'
  rows in process order, so the global batch equals ``batch_indices``.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
  per = batch_size // process_count
  idx = batch_indices(seed, step, n, batch_size)
  return idx[process_index * per:(process_index + 1) * per]
