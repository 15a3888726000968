"""Time and memory of the contrastive loss + gradients against the global batch size.

    python scripts/benchmark_loss.py [--sizes 256,1024,4096,8192] [--dims 2,128]

For each global batch B (2B rows) and output dimension d it compiles
``value_and_grad`` of ``losses.cauchy_infonce`` for z1, z2 of shape (B, d)
in four ways and reports the compiled program's temporary memory per
device (XLA's memory analysis, which also works on the CPU, where
``Device.memory_stats()`` is None) and the time of one call:

  1dev-plain   one device, the whole 2B x 2B matrix at once
  1dev-auto    one device, rows blocked automatically above 2^22 entries
  Ndev-xla     N devices, batch sharded, partitioning left to XLA (no mesh)
  Ndev-shard   N devices, jax.shard_map: each device its own rows (mesh=...)

Programs whose temporaries exceed --max_run_gib are compiled but not run.
On the CPU, --cpu_devices fake devices stand in for N accelerators (they
share the same cores, so N-device times measure overhead, not speed-up).
Prints a table and writes scripts/results/benchmark_loss.json.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import results_io


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="256,1024,4096,8192", help="global batch sizes B")
  p.add_argument("--dims", default="2,128", help="output dimensions d")
  p.add_argument("--cpu_devices", type=int, default=8, help="fake CPU devices (CPU only)")
  p.add_argument("--max_run_gib", type=float, default=2.0,
                 help="compile but do not run programs with more temporaries than this")
  p.add_argument("--repeats", type=int, default=3, help="timed calls when one takes < 1 s")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "benchmark_loss.json"))
  return p.parse_args()


def main():
  args = parse_args()
  # Must precede the first jax import; only the host (CPU) platform reads it.
  results_io.request_cpu_devices(args.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxembed import losses, parallel  # pylint: disable=g-import-not-at-top

  n_dev = jax.device_count()
  mesh1, mesh = parallel.make_mesh(1), parallel.make_mesh()
  variants = [
      ("1dev-plain", mesh1, {"block_size": 1 << 30}),
      ("1dev-auto", mesh1, {}),
      (f"{n_dev}dev-xla", mesh, {}),
      (f"{n_dev}dev-shard", mesh, {"mesh": mesh}),
  ]
  rows = []
  print(f"{'B':>6} {'d':>4} {'variant':<12} {'temp MiB/dev':>13} {'compile s':>10} "
        f"{'loss+grad s':>12}", flush=True)
  for b in [int(s) for s in args.sizes.split(",")]:
    for d in [int(s) for s in args.dims.split(",")]:
      rng = np.random.default_rng(0)
      host = [rng.normal(size=(b, d)).astype(np.float32) * 3 for _ in range(2)]
      for name, m, kw in variants:
        sharding = parallel.batch_sharding(m)
        z1, z2 = (jax.device_put(x, sharding) for x in host)
        fn = jax.jit(jax.value_and_grad(
            lambda a, c, kw=kw: losses.cauchy_infonce(a, c, **kw), argnums=(0, 1)))
        t0 = time.perf_counter()
        compiled = fn.lower(z1, z2).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = mem.temp_size_in_bytes if mem is not None else None
        seconds = None
        if temp is None or temp <= args.max_run_gib * 2**30:
          times = []
          while len(times) < args.repeats:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(z1, z2))
            times.append(time.perf_counter() - t0)
            if times[0] > 1.0:  # big programs: one call is enough
              break
          seconds = min(times)
        stats = m.devices.flat[0].memory_stats()
        row = {"batch": b, "dim": d, "variant": name, "devices": int(m.devices.size),
               "temp_bytes_per_device": temp,
               "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
               "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
               "compile_seconds": round(compile_s, 3),
               "seconds": None if seconds is None else round(seconds, 4)}
        rows.append(row)
        temp_s = "?" if temp is None else f"{temp / 2**20:.1f}"
        time_s = "not run" if seconds is None else f"{seconds:.3f}"
        print(f"{b:>6} {d:>4} {name:<12} {temp_s:>13} {compile_s:>10.2f} {time_s:>12}",
              flush=True)
        del z1, z2, compiled

  result = {
      "benchmark": "loss_and_gradient_vs_global_batch",
      "loss": "cauchy_infonce",
      "date": datetime.date.today().isoformat(),
      "command": " ".join(["python"] + sys.argv),
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": n_dev,
      "cpu_count": os.cpu_count(),
      "machine": platform.platform(),
      "jax_version": jax.__version__,
      "auto_block_elements": losses.AUTO_BLOCK_ELEMENTS,
      "notes": "temp_bytes_per_device: XLA memory analysis of the compiled program; "
               "seconds: best of up to --repeats calls (one if the first takes > 1 s); "
               "None = compiled only (over --max_run_gib).",
      "rows": rows,
  }
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
