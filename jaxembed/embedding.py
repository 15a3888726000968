"""Batched, jitted, sharded inference: images in, features / hidden / 2-D (or d-D) outputs out."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import parallel
from jaxembed.data import pipeline


@functools.lru_cache(maxsize=16)
def embed_fn(model, mesh):
  """The jitted ``fn(variables, images) -> {"features", "hidden", "z"}`` that :func:`embed` runs.

  Variables replicated, images (uint8 or float in [0, 1]) and outputs split
  over the mesh's ``data`` axis.
  """

  def fn(variables, images):
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
    return model.apply(variables, x, train=False)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


def embed(model, variables, images, mesh, batch_size=1024, process_rows=False):
  """Runs ``model`` in eval mode over all images; returns a dict of NumPy arrays.

  Every image is embedded exactly once: the last chunk is padded to a
  multiple of the device count and the padding is dropped. With
  ``process_rows``, ``images`` are this process's rows only (a contiguous
  share of the split, jaxembed.data.streaming.ProcessShare) and every
  process gets all processes' rows back, in process order.
  """
  if process_rows and jax.process_count() > 1:
    return _embed_process_rows(model, variables, images, mesh, batch_size)
  n = len(images)
  ndev = mesh.devices.size
  fn = embed_fn(model, mesh)
  parts = []
  for start, stop, padded in pipeline.padded_chunks(n, batch_size, ndev):
    chunk = np.asarray(images[start:stop])
    if padded > len(chunk):
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], padded - len(chunk), axis=0)])
    out = fn(variables, parallel.global_from_full(mesh, chunk))
    parts.append({k: parallel.to_host(v)[:stop - start] for k, v in out.items()})
  if not parts:
    raise ValueError("no images to embed")
  return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}


def _embed_process_rows(model, variables, local, mesh, batch_size):
  """:func:`embed` of the rows each process holds: every process feeds its own, gets all back."""
  pc, ldev = jax.process_count(), jax.local_device_count()
  counts = parallel.gather_rows(np.array([len(local)], np.int64))
  # Rows per process per call: its share of the batch, a multiple of its devices.
  per = max(ldev, batch_size // pc - (batch_size // pc) % ldev)
  calls = -(-int(counts.max()) // per)
  if not calls:
    raise ValueError("no images to embed")
  fn = embed_fn(model, mesh)
  parts = [[] for _ in range(pc)]
  for c in range(calls):
    rows = np.asarray(local[c * per:(c + 1) * per])
    # The last call: as few rows as the longest share needs, the same on every process.
    width = min(per, -(-(int(counts.max()) - c * per) // ldev) * ldev)
    pad = np.zeros((width - len(rows),) + tuple(local.shape[1:]), local.dtype)
    if len(rows):
      pad[:] = rows[:1]
    out = fn(variables, parallel.shard_batch(mesh, np.concatenate([rows, pad])))
    host = parallel.to_host(out)  # (pc * width, ...) in process order
    for p in range(pc):
      got = min(max(int(counts[p]) - c * per, 0), width)
      parts[p].append({k: v[p * width:p * width + got] for k, v in host.items()})
  keys = parts[0][0].keys()
  return {k: np.concatenate([x[k] for p in range(pc) for x in parts[p]]).astype(np.float32)
          for k in keys}
