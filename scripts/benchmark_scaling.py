"""Images/s of the real train step on 1, 2, 4 and 8 fake CPU devices, and whether their losses agree.

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and the mesh of
``jaxembed.parallel.make_mesh``; the step is ``jaxembed.trainer``'s, built by
``benchmark_train.build_step`` (tiny ResNet, random images, fixed global
batch). The fake devices share the same CPU cores, so the images/s column
measures the overhead of partitioning, not a speed-up; the point is
correctness: every run starts from the same seed, and the losses of the first
``--loss_steps`` steps must agree across device counts (the loss and the
BatchNorm statistics see the global batch, and augmentation keys are per
image, so only the order of floating-point reductions differs).

Usage:
  python scripts/benchmark_scaling.py                 # 1, 2, 4, 8 devices, ~1-2 min on 2 cores
  python scripts/benchmark_scaling.py --quick --devices 1,2
Writes scripts/results/benchmark_scaling.json (or --out) and prints a table.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import results_io

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated fake CPU device counts")
  p.add_argument("--batch_size", type=int, default=64,
                 help="global batch, the same for every device count (a multiple of each)")
  p.add_argument("--image_size", type=int, default=16)
  p.add_argument("--widths", default="8,16", help="resnet_tiny channels per stage")
  p.add_argument("--loss_steps", type=int, default=3, help="steps whose losses are compared")
  p.add_argument("--steps", type=int, default=5, help="steps per timed window")
  p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: batch 16, 8 px, widths 4-8, 2 loss steps, 1 window of 2 steps, "
                      "compiled without XLA's optimisation passes")
  p.add_argument("--out", default=os.path.join(SCRIPTS, "results", "benchmark_scaling.json"))
  p.add_argument("--timeout", type=float, default=900, help="seconds allowed per device count")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run as JSON
  args = p.parse_args(argv)
  if args.quick:
    args.batch_size, args.image_size, args.widths = 16, 8, "4,8"
    args.loss_steps, args.steps, args.windows = 2, 2, 1
  try:
    args.device_counts = [int(d) for d in args.devices.split(",") if d.strip()]
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
  except ValueError:
    p.error(f"--devices and --widths must be comma-separated integers, got {args.devices!r}, "
            f"{args.widths!r}")
  if not args.device_counts or min(args.device_counts) < 1:
    p.error(f"--devices needs positive integers, got {args.devices!r}")
  bad = [n for n in args.device_counts if args.batch_size % n]
  if bad:
    p.error(f"--batch_size={args.batch_size} is not divisible by the device counts {bad}; "
            "use a multiple of each")
  if not widths or min(widths) < 1:
    p.error(f"--widths needs positive integers, got {args.widths!r}")
  for name in ("loss_steps", "steps", "windows"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  args.width_list = widths
  return args


def worker(spec):
  """One device count: the losses of the first steps, then timed windows. Returns a row."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import benchmark_train  # pylint: disable=g-import-not-at-top

  built = benchmark_train.build_step(spec["case"])
  compiled, state, images_all, batch, key = (built[k] for k in
                                             ("compiled", "state", "images_all", "batch", "key"))
  step = 0

  def run(n):
    nonlocal state, step
    losses = []
    for _ in range(n):
      state, metrics = compiled(state, images_all, batch(step), key)
      losses.append(metrics["loss"])
      step += 1
    jax.block_until_ready(state)
    return [float(x) for x in losses]

  losses = run(spec["loss_steps"])
  window_s = []
  for _ in range(spec["windows"]):
    t0 = time.perf_counter()
    run(spec["steps"])
    window_s.append((time.perf_counter() - t0) / spec["steps"])
  step_s = float(np.median(window_s))
  b = built["config"].batch_size
  return {"num_devices": built["mesh"].devices.size, "jax_device_count": jax.device_count(),
          "batch_size": b, "compile_s": round(built["compile_s"], 2), "losses": losses,
          "window_step_s": [round(t, 5) for t in window_s], "step_s": step_s,
          "images_per_s": b / step_s, "bad_step": int(state["bad_step"])}


def run_in_subprocess(spec, n, timeout):
  env = dict(os.environ)
  # Replace any device count already in XLA_FLAGS (pytest's conftest sets 8).
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  result, error = results_io.run_worker(__file__, spec, env, timeout)
  return result if error is None else {"num_devices": n, "error": error}


def max_relative_difference(losses, reference):
  """max_i |a_i - b_i| / |b_i| over the steps both have."""
  pairs = list(zip(losses, reference))
  return max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs) if pairs else None


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
    return 0

  case = {"config": "common", "name": "resnet_tiny", "widths": args.width_list,
          "stage_sizes": [1] * len(args.width_list), "hidden_dim": 32,
          "batch_size": args.batch_size, "image_size": args.image_size, "dtype": "float32",
          "fast_compile": args.quick}
  spec = {"case": case, "loss_steps": args.loss_steps, "steps": args.steps,
          "windows": args.windows}
  rows = []
  for n in args.device_counts:
    t0 = time.perf_counter()
    row = run_in_subprocess(dict(spec, case=dict(case, num_devices=n)), n, args.timeout)
    rows.append(row)
    status = row.get("error") or f"{row['images_per_s']:.1f} img/s"
    print(f"  {n} device(s): {status} ({time.perf_counter() - t0:.0f} s)", flush=True)

  ok = [r for r in rows if "error" not in r]
  ref = next((r for r in ok if r["num_devices"] == min(x["num_devices"] for x in ok)), None)
  for r in ok:
    r["max_rel_loss_diff_vs_fewest_devices"] = max_relative_difference(r["losses"], ref["losses"])
    r["speedup_vs_fewest_devices"] = r["images_per_s"] / ref["images_per_s"]

  print(f"\nbatch {args.batch_size}, resnet_tiny widths {args.widths}, {args.image_size} px, "
        f"float32; losses of the first {args.loss_steps} steps from seed 0")
  head = (f"{'devices':>7s} {'compile s':>9s} {'step s':>8s} {'img/s':>9s} {'vs fewest':>9s} "
          f"{'max rel loss diff':>17s}  losses")
  print(head)
  print("-" * (len(head) + 20))
  for r in rows:
    if "error" in r:
      print(f"{r['num_devices']:7d} ERROR {r['error']}")
      continue
    print(f"{r['num_devices']:7d} {r['compile_s']:9.1f} {r['step_s']:8.4f} "
          f"{r['images_per_s']:9.1f} {r['speedup_vs_fewest_devices']:9.2f} "
          f"{r['max_rel_loss_diff_vs_fewest_devices']:17.2e}  "
          + " ".join(f"{x:.6f}" for x in r["losses"]))
  diffs = [r["max_rel_loss_diff_vs_fewest_devices"] for r in ok]
  result = {
      "script": "scripts/benchmark_scaling.py", "argv": sys.argv[1:] if argv is None else argv,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "host": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "case": case, "loss_steps": args.loss_steps, "rows": rows,
      "max_rel_loss_diff": max(diffs) if diffs else None,
  }
  print(f"\nmax relative loss difference across device counts: "
        f"{result['max_rel_loss_diff']:.2e}" if diffs else "\nno run finished")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return 1 if len(ok) < len(rows) or any(r["bad_step"] >= 0 for r in ok) else 0


if __name__ == "__main__":
  sys.exit(main())
