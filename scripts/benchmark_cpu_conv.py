"""XLA:CPU convolutions with and without jaxembed's workaround (jaxembed.models.cpu_conv), side by side.

For each ResNet layer shape: forward, input gradient and filter gradient of a
3x3 stride-1 convolution, timed with ``lax.conv_general_dilated`` and with
``cpu_conv.conv_general_dilated`` in the same process; then forward +
backward of a whole ResNet-18 (CIFAR stem) both ways. Prints a table and
writes scripts/results/benchmark_cpu_conv.json.

  python scripts/benchmark_cpu_conv.py [--batch 64] [--image_size 32] [--repeats 3]
"""

import argparse
import datetime
import os
import platform
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxembed.models import cpu_conv

import results_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NHWC = ("NHWC", "HWIO", "NHWC")


def _median_seconds(fn, args, repeats):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _conv_times(conv, x, w, repeats):
  pads = ((1, 1), (1, 1))
  f = lambda x, w: conv(x, w, (1, 1), pads, dimension_numbers=NHWC)
  return {"forward": _median_seconds(f, (x, w), repeats),
          "input_grad": _median_seconds(jax.grad(lambda x, w: f(x, w).sum(), 0), (x, w), repeats),
          "filter_grad": _median_seconds(jax.grad(lambda x, w: f(x, w).sum(), 1), (x, w),
                                         repeats)}


def _resnet_seconds(batch, size, repeats):
  from jaxembed.configs import common  # pylint: disable=g-import-not-at-top
  from jaxembed import models  # pylint: disable=g-import-not-at-top
  c = common.get_config()
  c.model.name = "resnet18"
  model = models.create_model(c.model, head_dim=128)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)

  def loss(params, batch_stats, x):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.mean(out["z"] ** 2)

  return _median_seconds(jax.grad(loss), (variables["params"], variables["batch_stats"], x),
                         repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(REPO, "scripts", "results",
                                                    "benchmark_cpu_conv.json"))
  args = parser.parse_args()
  if jax.default_backend() != "cpu":
    raise SystemExit("the workaround only acts on the CPU backend; run with JAX_PLATFORMS=cpu")
  rng = np.random.default_rng(0)
  rows = []
  size, channels = args.image_size, 64
  while size >= 2:
    x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.01, jnp.float32)
    row = {"height": size, "channels": channels,
           "gflop": args.batch * size * size * 9 * channels * channels * 2 / 1e9,
           "xla": _conv_times(lax.conv_general_dilated, x, w, args.repeats),
           "jaxembed": _conv_times(cpu_conv.conv_general_dilated, x, w, args.repeats)}
    rows.append(row)
    print(f"{size:>3}x{size:<3} {channels:>4} ch  " + "  ".join(
        f"{k} {row['xla'][k] * 1e3:7.1f} -> {row['jaxembed'][k] * 1e3:7.1f} ms"
        for k in row["xla"]), flush=True)
    size, channels = size // 2, min(channels * 2, 512)

  original = cpu_conv._path  # pylint: disable=protected-access
  with_fix = _resnet_seconds(args.batch, args.image_size, args.repeats)
  cpu_conv._path = lambda *a, **k: "xla"  # pylint: disable=protected-access
  try:
    without = _resnet_seconds(args.batch, args.image_size, args.repeats)
  finally:
    cpu_conv._path = original  # pylint: disable=protected-access
  print(f"ResNet-18 forward+backward, batch {args.batch}, {args.image_size} px: "
        f"XLA convolutions {without:.2f} s, with the workaround {with_fix:.2f} s "
        f"({without / with_fix:.2f}x)")
  result = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores",
            "load_average_1min": os.getloadavg()[0], "jax": jax.__version__,
            "command": "python scripts/benchmark_cpu_conv.py " + " ".join(
                f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
            "layers": rows,
            "resnet18": {"batch": args.batch, "image_size": args.image_size,
                         "xla_seconds": without, "jaxembed_seconds": with_fix,
                         "speedup": without / with_fix}}
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
