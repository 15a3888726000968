"""Throughput of the real t-SimCNE train step: steps/s, images/s, s/epoch, MFU and peak memory.

The step timed is the trainer's own, built by
``jaxembed.train_state.setup_stage`` as the trainer builds it (config
validated and resolved against the data, the stage-1 model, optimiser,
state and jitted step of ``jaxembed.train_step``): index the device-resident images, augment two
views on the device, Cauchy InfoNCE on the global batch, optimiser update.
The images are random uint8 (the step's cost does not depend on their
content) unless ``--config digits``, which loads the digits default.

Every case runs in its own subprocess, so XLA flags apply per case and the
peak device memory of one case is not inflated by the previous one. Per case:
compile (timed apart), ``--warmup`` steps, then ``--windows`` windows of
``--steps`` steps each, every window ended by ``block_until_ready``; the
figure is the median window. FLOPs come from XLA's cost analysis of the
compiled step (the whole step: augmentation, loss and update included), MFU
divides them by the step time and by the device's peak FLOP/s for the
compute dtype (``PEAK_FLOPS``, or ``--peak_flops``; n/a on CPU by default).

Usage:
  python scripts/benchmark_train.py                         # accelerator: the issue #11 grid
  python scripts/benchmark_train.py --cpu_budget            # CPU sizes (default on CPU)
  python scripts/benchmark_train.py --quick                 # smoke run, tiny model
  python scripts/benchmark_train.py --profile /tmp/prof     # also a jax.profiler trace per case
  python scripts/benchmark_train.py --compare_xla_flags     # CPU: XLA flags side by side
Writes scripts/results/benchmark_train_<backend>.json (or --out) and prints a table.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "scripts", "results")

# The epoch that s/epoch refers to: CIFAR-10's 50,000 training images.
EPOCH_IMAGES = 50_000

# Peak dense FLOP/s per device (vendor data sheets), by a substring of
# ``device.device_kind`` (first match wins) and compute dtype. GPU float32
# uses the TF32 tensor-core peak because XLA's default precision runs float32
# convolutions and matmuls as TF32 on Ampere and later; the plain float32
# (non-tensor) peak of an H100 SXM is ~67e12. TPUs run float32 matmuls as
# bfloat16 passes at default precision, so both entries are the bf16 peak.
PEAK_FLOPS = [
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100", {"bfloat16": 989e12, "float32": 495e12}),     # SXM (HBM3), also GH200
    ("h200", {"bfloat16": 989e12, "float32": 495e12}),
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
    ("l4", {"bfloat16": 121e12, "float32": 60e12}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),    # per chip (one JAX device)
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),     # v5p
    ("tpu v6", {"bfloat16": 918e12, "float32": 918e12}),     # v6e (Trillium)
]

# Per model: input size and stem of the issue #11 grid. ResNet-18 with the
# CIFAR stem is the reference backbone (t-SimCNE paper); EfficientNet-B0 keeps
# its published stride-2 stem.
MODEL_DEFAULTS = {
    "resnet18": {"image_size": 32, "stem": "cifar"},
    "efficientnet_b0": {"image_size": 64, "stem": "imagenet"},
}

# Candidate XLA:CPU flags (all exist in jax 0.10.2's XLA: an unknown flag in
# XLA_FLAGS aborts the process, and each of these was accepted).
XLA_CPU_CANDIDATES = [
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet18,efficientnet_b0",
                 help="comma-separated backbone names (jaxembed.models.BACKBONES)")
  p.add_argument("--batch_sizes", default=None,
                 help="global batch sizes (default 512,1024; --cpu_budget: 256)")
  p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes (config.model.dtype)")
  p.add_argument("--image_size", type=int, default=None,
                 help="input size for every model (default: resnet18 32, efficientnet_b0 64)")
  p.add_argument("--stem", default=None, help="cifar | imagenet for every model (default per model)")
  p.add_argument("--config", default="common", choices=("common", "digits"),
                 help="base config: configs/common.py (random images) or configs/digits.py "
                      "(the digits default: its model, batch and data)")
  p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 10)")
  p.add_argument("--windows", type=int, default=None, help="timed windows; the median is reported")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling")
  p.add_argument("--num_devices", type=int, default=None, help="devices in the mesh (default all)")
  p.add_argument("--peak_flops", type=float, default=None,
                 help="peak FLOP/s per device for MFU (default: PEAK_FLOPS by device kind)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: resnet_tiny (widths 4-8), 8 px, batch 16, float32, 2x2 steps")
  p.add_argument("--cpu_budget", action="store_true",
                 help="CPU sizes (the default on a CPU backend): ResNet-18 batch 128, "
                      "EfficientNet-B0 batch 16, 2 windows of 1 step after 1 warm-up step")
  p.add_argument("--compare_xla_flags", action="store_true",
                 help="time the digits default step and ResNet-18 (batch 256, 32 px) without and "
                      "with each of XLA_CPU_CANDIDATES (or --xla_flags), side by side")
  p.add_argument("--compare_bases", default="digits,resnet18",
                 help="steps compared by --compare_xla_flags: digits (the digits default) and/or "
                      "resnet18 (batch 256, 32 px, float32)")
  p.add_argument("--xla_flags", default=None,
                 help="';'-separated XLA flag sets for --compare_xla_flags; pass as "
                      "--xla_flags=--xla_cpu_...=value (with =, as the value starts with --)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="also run --profile_steps steps of each case under jax.profiler.trace(DIR/<case>)")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON path (default scripts/results/benchmark_train_<backend>.json)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one case as JSON
  args = p.parse_args(argv)
  for name in ("steps", "windows", "warmup", "profile_steps", "num_devices"):
    value = getattr(args, name)
    if value is not None and value < (0 if name == "warmup" else 1):
      p.error(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")
  if args.peak_flops is not None and not args.peak_flops > 0:
    p.error(f"--peak_flops must be positive, got {args.peak_flops}")
  return args


def _ints(text, flag):
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
  if not values or min(values) < 2:
    raise ValueError(f"{flag} needs integers >= 2, got {text!r}")
  return values


# ------------------------------------------------------------------ one case


def build_config(case):
  """The run's ConfigDict for ``case`` (a dict of the fields below), before data resolution."""
  from jaxembed.configs import common, digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config() if case.get("config") == "digits" else common.get_config()
  with config.unlocked():
    for field in ("name", "stem", "dtype", "widths", "stage_sizes", "hidden_dim"):
      if case.get(field) is not None:
        config.model[field] = tuple(case[field]) if isinstance(case[field], list) else case[field]
    if case.get("batch_size"):
      config.batch_size = int(case["batch_size"])
    if case.get("image_size"):
      config.data.image_size = int(case["image_size"])
  return config


def build_step(case):
  """Builds the train step with the trainer's own set-up; returns what the timing loop needs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from jaxembed import configlib, data as data_lib, parallel, schedule, train_state
  from jaxembed.data import pipeline  # pylint: disable=g-import-not-at-top

  config = build_config(case).copy_and_resolve_references()
  mesh = parallel.make_mesh(case.get("num_devices"))
  stage_dicts = configlib.validate(config, mesh.devices.size)
  if case.get("config") == "digits":
    ds = data_lib.load(config.data)
  else:
    # Random images: four batches are enough, the step gathers by index.
    size, channels = config.data.image_size, int(case.get("channels") or 3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4 * config.batch_size, size, size, channels), dtype=np.uint8)
    ds = data_lib.from_arrays(images)
  stats = data_lib.compute_stats(ds.train_images)
  n_train = len(ds.train_images)
  config = configlib.resolve_config(config, n_train, stats, mesh.devices.size)

  spe = pipeline.steps_per_epoch(n_train, config.batch_size)
  stage = schedule.build_stages(stage_dicts, spe)[0]
  root_key = jax.random.key(config.seed)
  step_key = jax.random.fold_in(root_key, 1)
  setup = train_state.setup_stage(config, stage, mesh, spe, image_shape=ds.image_shape,
                                  key=jax.random.fold_in(root_key, 0))
  images_all = parallel.replicate(mesh, jnp.asarray(ds.train_images))

  def batch(step):
    idx = pipeline.batch_indices(config.seed, step, n_train, config.batch_size)
    return parallel.global_from_full(mesh, idx)

  t0 = time.perf_counter()
  lowered = setup.step.lower(setup.state, images_all, batch(0), step_key)
  # --quick compiles without XLA's optimisation passes (3-4x faster to build on
  # a 2-core CPU, train_state.FAST_COMPILE); its timings only show the script works.
  compiled = (lowered.compile(compiler_options=train_state.FAST_COMPILE)
              if case.get("fast_compile") else lowered.compile())
  compile_s = time.perf_counter() - t0
  n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(setup.state["params"])))
  return {"compiled": compiled, "state": setup.state, "images_all": images_all, "batch": batch,
          "key": step_key, "config": config, "mesh": mesh, "compile_s": compile_s,
          "params": n_params, "image_shape": tuple(ds.image_shape)}


def cost_flops(compiled):
  """FLOPs of one execution of the compiled program (per device), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_figures(compiled, device):
  """Peak device memory: the allocator's peak where the device reports it, else XLA's analysis."""
  out = {}
  try:
    m = compiled.memory_analysis()
    out["xla_argument_bytes"] = int(m.argument_size_in_bytes)
    out["xla_output_bytes"] = int(m.output_size_in_bytes)
    out["xla_alias_bytes"] = int(m.alias_size_in_bytes)
    out["xla_temp_bytes"] = int(m.temp_size_in_bytes)
    # Donated state aliases its outputs, so it is counted once. (The analysis's
    # own peak_memory_in_bytes is not filled in by every backend: on the CPU it
    # was smaller than the temporaries alone.)
    out["xla_peak_bytes"] = (out["xla_argument_bytes"] + out["xla_output_bytes"]
                             - out["xla_alias_bytes"] + out["xla_temp_bytes"])
  except Exception:  # pylint: disable=broad-except
    pass
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("peak_bytes_in_use"):
    out["peak_bytes"] = int(stats["peak_bytes_in_use"])
    out["memory_source"] = "device.memory_stats() peak_bytes_in_use"
  elif "xla_peak_bytes" in out:
    out["peak_bytes"] = out["xla_peak_bytes"]
    out["memory_source"] = "compiled.memory_analysis()"
  return out


def peak_flops_for(device_kind, dtype, override=None):
  if override:
    return float(override)
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return peaks[dtype]
  return None


def run_case(case):
  """Compiles and times one case; returns its row (a JSON-able dict)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  built = build_step(case)
  compiled, state, images_all, batch, key = (built[k] for k in
                                             ("compiled", "state", "images_all", "batch", "key"))
  config, mesh = built["config"], built["mesh"]
  device = mesh.devices.flat[0]
  step = 0

  def run(n):
    nonlocal state, step
    metrics = None
    for _ in range(n):
      state, metrics = compiled(state, images_all, batch(step), key)
      step += 1
    jax.block_until_ready((state, metrics))
    return metrics

  t0 = time.perf_counter()
  if case["warmup"]:
    run(case["warmup"])
  warmup_s = time.perf_counter() - t0
  window_s = []
  for _ in range(case["windows"]):
    t0 = time.perf_counter()
    metrics = run(case["steps"])
    window_s.append((time.perf_counter() - t0) / case["steps"])
  loss = float(metrics["loss"])
  if case.get("profile"):
    trace_dir = os.path.join(case["profile"], case_name(case))
    with jax.profiler.trace(trace_dir):
      run(case["profile_steps"])

  step_s = float(np.median(window_s))
  n_dev = mesh.devices.size
  flops = cost_flops(compiled)
  dtype = config.model.dtype
  peak = peak_flops_for(device.device_kind, dtype, case.get("peak_flops"))
  if device.platform == "cpu" and not case.get("peak_flops"):
    peak = None  # no meaningful peak for a shared CPU
  b = config.batch_size
  row = {
      "case": case_name(case), "config": case.get("config", "common"),
      "model": config.model.name, "stem": config.model.stem, "dtype": dtype,
      "batch_size": b, "image_shape": list(built["image_shape"]), "params": built["params"],
      "backend": jax.default_backend(), "device_kind": device.device_kind, "num_devices": n_dev,
      "xla_flags": case.get("xla_flags", ""),
      "compile_s": round(built["compile_s"], 2), "warmup_steps": case["warmup"],
      "warmup_s": round(warmup_s, 3), "steps_per_window": case["steps"],
      "window_step_s": [round(t, 5) for t in window_s],
      "step_s": step_s, "steps_per_s": 1.0 / step_s, "images_per_s": b / step_s,
      # The trainer drops the last partial batch: 50,000 // B steps per epoch.
      "s_per_epoch": (EPOCH_IMAGES // b) * step_s,
      "flops_per_step_per_device": flops,
      "flops_per_image": flops * n_dev / b if flops else None,
      "peak_flops_per_device": peak,
      "mfu": flops / step_s / peak if (flops and peak) else None,
      "final_loss": loss, "loss_finite": bool(np.isfinite(loss)),
  }
  row.update(memory_figures(compiled, device))
  return row


def case_name(case):
  parts = [case.get("config", "common"), case.get("name") or "default",
           f"b{case.get('batch_size') or 'default'}", f"{case.get('image_size') or 'default'}px",
           case.get("dtype") or "float32"]
  if case.get("xla_flags"):
    parts.append(case["xla_flags"].replace("--xla_cpu_", "").replace(" ", "+"))
  return "_".join(str(p) for p in parts)


# ------------------------------------------------------------ orchestration


def run_in_subprocess(case, timeout):
  """Runs one case in a fresh interpreter with the case's XLA flags; returns its row or an error."""
  env = dict(os.environ)
  if case.get("xla_flags"):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + case["xla_flags"]).strip()
  result, error = results_io.run_worker(__file__, case, env, timeout)
  return result if error is None else {"case": case_name(case), "error": error}


def probe_backend():
  """Backend and device kind, asked of a subprocess so this process never claims the accelerator."""
  code = ("import jax; d = jax.devices(); "
          "print('PROBE', jax.default_backend(), len(d), d[0].device_kind, sep='\\t')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("PROBE\t"):
      _, backend, n, kind = line.split("\t", 3)
      return backend, int(n), kind
  raise RuntimeError("could not start jax: " + proc.stderr.strip()[-500:])


def plan_cases(args, backend):
  """The list of cases (dicts) the flags ask for."""
  common = {"config": args.config, "num_devices": args.num_devices, "peak_flops": args.peak_flops,
            "profile": os.path.abspath(args.profile) if args.profile else None,
            "profile_steps": args.profile_steps}
  cpu_budget = args.cpu_budget or (backend == "cpu" and not args.quick and args.batch_sizes is None)
  if args.quick:
    timing = {"steps": 2, "windows": 2, "warmup": 1, "fast_compile": True}
  elif cpu_budget:
    timing = {"steps": 1, "windows": 2, "warmup": 1}
  else:
    timing = {"steps": 10, "windows": 5, "warmup": 3}
  for k in ("steps", "windows", "warmup"):
    if getattr(args, k) is not None:
      timing[k] = getattr(args, k)
  common.update(timing)

  if args.compare_xla_flags:
    flag_sets = ([""] + ([f.strip() for f in args.xla_flags.split(";") if f.strip()]
                         if args.xla_flags else XLA_CPU_CANDIDATES) + [""])  # baseline twice
    known = {"digits": {"config": "digits"},
             "resnet18": {"config": "common", "name": "resnet18", "stem": "cifar",
                          "batch_size": 256, "image_size": 32, "dtype": "float32"}}
    names = [b.strip() for b in args.compare_bases.split(",") if b.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
      raise ValueError(f"--compare_bases {args.compare_bases!r}: use digits and/or resnet18")
    bases = [known[b] for b in names]
    if args.quick:
      bases = [{"config": "common", "name": "resnet_tiny", "widths": [4, 8], "stage_sizes": [1, 1],
                "hidden_dim": 16, "batch_size": 16, "image_size": 8, "dtype": "float32"}]
    return [dict(common, **base, xla_flags=f) for base in bases for f in flag_sets]

  if args.quick:
    return [dict(common, config="common", name="resnet_tiny", widths=[4, 8], stage_sizes=[1, 1],
                 hidden_dim=16, batch_size=16, image_size=8, dtype="float32")]
  if args.config == "digits":
    return [dict(common, dtype=d) for d in args.dtypes.split(",")]

  cases = []
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    defaults = MODEL_DEFAULTS.get(name, {"image_size": 32, "stem": "cifar"})
    if args.batch_sizes:
      sizes = _ints(args.batch_sizes, "--batch_sizes")
    elif cpu_budget:
      # ResNet-18 at batch 256 did not finish compile + 5 steps within 30 min
      # on the shared 2-core VM (load average 10-15); XLA:CPU's depthwise-
      # convolution backward pass makes EfficientNet slower still per image
      # (docs/BENCHMARKS.md, backbones).
      sizes = [16] if name.startswith("efficientnet") else [128]
    else:
      sizes = [512, 1024]
    for b in sizes:
      for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cases.append(dict(common, name=name, batch_size=b, dtype=dtype,
                          image_size=args.image_size or defaults["image_size"],
                          stem=args.stem or defaults["stem"]))
  return cases


def _fmt(value, spec):
  return "n/a" if value is None else format(value, spec)


def print_table(rows):
  head = (f"{'case':58s} {'compile s':>9s} {'step s':>8s} {'steps/s':>8s} {'img/s':>9s} "
          f"{'s/epoch':>9s} {'GFLOP/img':>9s} {'MFU':>6s} {'peak MiB':>9s}")
  print(head)
  print("-" * len(head))
  for r in rows:
    if "error" in r:
      print(f"{r['case']:58s} ERROR {r['error']}")
      continue
    gflop = r["flops_per_image"] / 1e9 if r.get("flops_per_image") else None
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mib = r["peak_bytes"] / 2**20 if r.get("peak_bytes") else None
    print(f"{r['case']:58s} {r['compile_s']:9.1f} {r['step_s']:8.3f} {r['steps_per_s']:8.2f} "
          f"{r['images_per_s']:9.1f} {r['s_per_epoch']:9.1f} {_fmt(gflop, '9.3f')} {mfu:>6s} "
          f"{_fmt(mib, '9.1f')}")


def print_flag_ratios(rows):
  """Each flag set's step time relative to the mean of the two baseline runs of the same base."""
  print("\nXLA flags, step time relative to the baseline (<1 is faster):")
  groups = {}
  for r in rows:
    if "error" not in r:
      groups.setdefault((r["config"], r["model"], r["batch_size"]), []).append(r)
  ratios = {}
  for key, group in groups.items():
    base = [r["step_s"] for r in group if not r["xla_flags"]]
    if not base:
      continue
    ref = sum(base) / len(base)
    print(f"  {key[0]} {key[1]} batch {key[2]}: baseline {ref:.4f} s/step "
          f"(two runs: {', '.join(f'{t:.4f}' for t in base)})")
    for r in group:
      if r["xla_flags"]:
        ratio = r["step_s"] / ref
        ratios.setdefault(r["xla_flags"], {})[f"{key[0]}/{key[1]}/b{key[2]}"] = ratio
        print(f"    {r['xla_flags']:78s} {ratio:6.3f}")
  return ratios


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    row = run_case(json.loads(args.worker))
    print("RESULT " + json.dumps(row), flush=True)
    return 0

  # --quick plans the same cases on every backend, so it skips the probe (seconds).
  backend, n_dev, kind = (None, None, None) if args.quick else probe_backend()
  try:
    cases = plan_cases(args, backend)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"backend {backend or '(not probed)'}, {n_dev or '?'} x {kind or '?'}; {len(cases)} "
        "case(s), one subprocess each", flush=True)
  rows = []
  for case in cases:
    t0 = time.perf_counter()
    row = run_in_subprocess(case, args.timeout)
    rows.append(row)
    status = row.get("error") or f"{row['images_per_s']:.1f} img/s"
    print(f"  {case_name(case)}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
  print()
  print_table(rows)
  done = [r for r in rows if "error" not in r]
  if backend is None and done:
    backend, n_dev, kind = done[0]["backend"], done[0]["num_devices"], done[0]["device_kind"]
  result = {
      "script": "scripts/benchmark_train.py", "argv": sys.argv[1:] if argv is None else argv,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "host": platform.node(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "backend": backend, "num_devices": n_dev, "device_kind": kind,
      "epoch_images": EPOCH_IMAGES, "rows": rows,
  }
  if args.compare_xla_flags:
    result["xla_flag_ratios"] = print_flag_ratios(rows)
  suffix = "_xla_flags" if args.compare_xla_flags else ""
  out = args.out or os.path.join(RESULTS, f"benchmark_train_{backend}{suffix}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {out}")
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
