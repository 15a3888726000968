"""Forward+backward throughput (images/s) of every backbone at its natural input size.

One jitted step per backbone: forward in training mode (BatchNorm batch statistics, stochastic
depth and dropout on), the gradient of a scalar of the features with respect to all parameters.
Parameters are random (drawn with NumPy into the shapes ``jax.eval_shape`` gives; compiling the
initialisers would take longer than the benchmark). Compile time is reported apart.

Usage (on CPU the defaults, batch 2 and 1 timed step, take 3-5 minutes on 2 cores):
  python scripts/benchmark_models.py
  python scripts/benchmark_models.py --batch_size=128 --steps=20 --dtype=bfloat16   # GPU
Writes scripts/results/benchmark_models.json (or --out) and prints a table.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import models  # noqa: E402  pylint: disable=g-import-not-at-top
import results_io  # noqa: E402  pylint: disable=g-import-not-at-top


def random_variables(module, shape, seed=0):
  """He-scaled random parameters and unit BatchNorm statistics, drawn with NumPy."""
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("var", "scale"):
      return np.ones(leaf.shape, np.float32)
    if name in ("mean", "bias"):
      return np.zeros(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def benchmark(name, batch_size, steps, image_size, dtype):
  """Returns a dict of timings for one backbone."""
  net = models.create_backbone(name, stem="imagenet" if name != "resnet_tiny" else "cifar",
                               dtype=dtype)
  shape = (batch_size, image_size, image_size, 3)
  variables = jax.device_put(random_variables(net, shape))
  x = jax.device_put(np.random.default_rng(1).uniform(size=shape).astype(np.float32))

  @jax.jit
  def step(params, batch_stats, x, key):
    def loss_fn(params):
      features, updates = net.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})
      return jnp.mean(features ** 2), updates["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_stats, grads

  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(variables["params"], variables["batch_stats"], x, key).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables["params"], variables["batch_stats"], x, key))  # warm-up
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables["params"], variables["batch_stats"], x,
                                   jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {
      "backbone": name, "image_size": image_size, "batch_size": batch_size, "dtype": dtype,
      "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"]))),
      "features": int(net.num_features), "compile_s": round(compile_s, 2),
      "step_s_median": round(step_s, 4), "images_per_s": round(batch_size / step_s, 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbones", default=None,
                      help="comma-separated names (default: all; on CPU B0 and B3 stand for "
                      "the EfficientNets, whose depthwise-conv gradients XLA:CPU runs slowly)")
  parser.add_argument("--batch_size", type=int, default=None, help="default 2 on CPU, 64 else")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps after one warm-up; default 1 on CPU, 10 else")
  parser.add_argument("--image_size", type=int, default=None,
                      help="override every backbone's natural input size")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "benchmark_models.json"))
  args = parser.parse_args(argv)
  cpu = jax.default_backend() == "cpu"
  if args.backbones is None:
    args.backbones = ",".join(n for n in sorted(models.BACKBONES) if not (
        cpu and n in ("efficientnet_b1", "efficientnet_b2")))
  args.batch_size = args.batch_size or (2 if cpu else 64)
  args.steps = args.steps or (1 if cpu else 10)
  names = [n.strip() for n in args.backbones.split(",") if n.strip()]
  unknown = [n for n in names if n not in models.BACKBONES]
  if unknown:
    parser.error(f"unknown backbones {unknown}; known: {sorted(models.BACKBONES)}")
  if args.batch_size < 1 or args.steps < 1:
    parser.error("--batch_size and --steps must be at least 1")

  rows = []
  print(f"{'backbone':<17}{'size':>5}{'batch':>6}{'params':>12}{'compile s':>11}"
        f"{'step s':>9}{'images/s':>10}", flush=True)
  for name in names:
    size = args.image_size or models.NATURAL_IMAGE_SIZE[name]
    r = benchmark(name, args.batch_size, args.steps, size, args.dtype)
    rows.append(r)
    print(f"{name:<17}{size:>5}{r['batch_size']:>6}{r['params']:>12,}{r['compile_s']:>11.1f}"
          f"{r['step_s_median']:>9.3f}{r['images_per_s']:>10.1f}", flush=True)
  result = {
      "benchmark": "forward+backward of each backbone (train mode), images/s",
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": "python scripts/benchmark_models.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:1],
      "device_count": jax.device_count(), "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__, "results": rows,
  }
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
