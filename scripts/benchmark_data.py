"""Images per second delivered to the device: the in-memory path versus the streaming path.

In-memory: uint8 images uploaded once; per step the host computes the
(seed, epoch) permutation slice, sends the indices batch-sharded, and a
jitted gather forms the batch on the device (what the trainer does).
Streaming: tf.data reads and decodes PNG files of a class folder (PIL, as
the in-memory folder source does) and the batches are sharded onto the
devices with prefetch (jaxembed.data.streaming). Both deliver the same
global uint8 batches. Prints a table and writes
scripts/results/benchmark_data.json.

  python scripts/benchmark_data.py [--n 4096] [--batch 512] [--steps 12]
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

from jaxembed import parallel
from jaxembed.data import pipeline
from jaxembed.data import streaming


def in_memory(images, batch, steps, mesh):
  images_all = parallel.replicate(mesh, images)
  gather = jax.jit(lambda x, i: x[i], in_shardings=(parallel.replicated(mesh),
                                                    parallel.batch_sharding(mesh)),
                   out_shardings=parallel.batch_sharding(mesh))
  n = len(images)
  gather(images_all, parallel.global_from_full(mesh, pipeline.batch_indices(0, 0, n, batch)))
  t = time.perf_counter()
  for step in range(steps):
    idx = pipeline.batch_indices(0, step, n, batch)
    out = gather(images_all, parallel.global_from_full(mesh, idx))
  out.block_until_ready()
  return steps * batch / (time.perf_counter() - t)


def streamed(folder, size, batch, steps, mesh):
  c = ml_collections.ConfigDict({"source": "folder", "path": folder, "image_size": size,
                                 "channels": None, "test_fraction": 0.0, "intensity": "minmax",
                                 "window": None, "classes": None, "max_examples": None})
  it = streaming.stream_batches(c, batch, mesh, num_steps=steps + 1)
  next(it).block_until_ready()  # start-up (tf.data graph, first decode) excluded
  t = time.perf_counter()
  for b in it:
    b.block_until_ready()
  return steps * batch / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--size", type=int, default=28)
  args = p.parse_args()
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  rows = []
  for channels in (1, 3):
    shape = (args.n, args.size, args.size) + ((3,) if channels == 3 else ())
    images = rng.integers(0, 256, shape).astype(np.uint8)
    mem = in_memory(images if channels == 3 else images[..., None], args.batch, 50, mesh)
    with tempfile.TemporaryDirectory() as d:
      for i, img in enumerate(images):
        cls = os.path.join(d, f"c{i % 10}")
        os.makedirs(cls, exist_ok=True)
        Image.fromarray(img).save(os.path.join(cls, f"{i}.png"))
      stream = streamed(d, args.size, args.batch, args.steps, mesh)
    rows.append({"images": f"{args.size}x{args.size}x{channels}", "in_memory_img_s": mem,
                 "streaming_png_img_s": stream, "ratio": mem / stream})
  print(f"{'images':>10} | {'in-memory img/s':>16} | {'streaming (PNG) img/s':>22} | ratio")
  for r in rows:
    print(f"{r['images']:>10} | {r['in_memory_img_s']:16,.0f} | {r['streaming_png_img_s']:22,.0f}"
          f" | {r['ratio']:.0f}x")
  out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
         "devices": [str(d) for d in jax.devices()], "date": time.strftime("%Y-%m-%d"),
         "args": vars(args), "rows": rows}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "benchmark_data.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
