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


def embed(model, variables, images, mesh, batch_size=1024):
  """Runs ``model`` in eval mode over all images; returns a dict of NumPy arrays.

  Every image is embedded exactly once: the last chunk is padded to a
  multiple of the device count and the padding is dropped.
  """
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
