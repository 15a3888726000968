"""One t-SimCNE training step on the CPU: jaxembed beside the reference PyTorch package, as a ratio.

A step is what a training iteration costs: two augmented views of every
image of the batch, the forward pass of both, the Cauchy InfoNCE loss, the
backward pass and the SGD update (momentum 0.9, weight decay 5e-4,
gradient clipping by value 4: the reference recipe). Both sides run
ResNet-18 with the CIFAR stem, the 512-1024-128 projector, on the same
uint8 images:

* jaxembed: the jitted step of jaxembed.train_step.make_train_step, built
  by jaxembed.train_state.setup_stage as the trainer builds it
  (configs/common.py, the reference recipe), on device-resident images gathered by index, augmentation inside
  the step.
* tsimcne (in the torch interpreter, scripts/torch_side.py): its
  ``PLtSimCNE`` model, ``InfoNCECauchy`` loss and optimiser, its
  ``TransformedPairDataset`` with its torchvision augmentation through a
  DataLoader, ``torch.set_num_threads(--threads)``.

Each side runs in its own process; both are started and warmed up (jaxembed
compiles), then they take turns, so that one never runs while the other
does: ``--rounds`` rounds of ``--steps`` steps each; the figure is the
median step time. The reference's augmentation is timed apart (its
DataLoader would run it in worker processes, which on a machine with no
spare cores compete with the compute), so two ratios are given: with and
without it. Cases: ``cifar`` (32 px, batch 256, synthetic photo-like
images) and ``digits`` (the digits split at 16 px repeated to RGB, batch
128, still ResNet-18: jaxembed's resnet_tiny default is not comparable).
Prints a table, writes scripts/results/benchmark_reference_step.json
(after every case, so a stopped run keeps the finished ones). On 2 shared
CPU cores a ResNet-18 step of jaxembed (XLA:CPU) takes minutes at 16 px
and batch 128; the cifar case (8x the work) is for a quieter machine.

  python scripts/benchmark_reference_step.py --torch_python /work/torchvenv/bin/python \
      [--cases cifar,digits] [--rounds 3] [--threads 2]
"""

import argparse
import datetime
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

import torch_side
import results_io

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "scripts", "results")
CASES = {"cifar": dict(size=32, batch=256), "digits": dict(size=16, batch=128)}


# ------------------------------------------------------------ the jax worker


def jax_worker(args):
  """The jaxembed side: READY after a compiled warm-up step, then ``run N`` requests."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxembed.configs import common  # pylint: disable=g-import-not-at-top
  from jaxembed import configlib, parallel, schedule, train_state  # pylint: disable=g-import-not-at-top
  from jaxembed import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxembed.data import pipeline  # pylint: disable=g-import-not-at-top

  images = np.load(args.images)["images"]
  n = len(images)
  config = common.get_config()  # the reference recipe: resnet18, cifar stem, SGD, clip 4
  config.batch_size = args.batch
  config.data.image_size = images.shape[1]
  stats = data_lib.compute_stats(images)
  config.model.input_mean, config.model.input_std = stats["mean"], stats["std"]
  mesh = parallel.make_mesh()
  spe = pipeline.steps_per_epoch(n, config.batch_size)
  stage = schedule.build_stages(configlib.stages(config), spe)[0]
  root_key = jax.random.key(config.seed)
  setup = train_state.setup_stage(config, stage, mesh, spe, image_shape=images.shape[1:],
                                  key=jax.random.fold_in(root_key, 0))
  state, train_step = setup.state, setup.step
  images_all = parallel.replicate(mesh, jnp.asarray(images))
  step_key = jax.random.fold_in(root_key, 1)
  step = 0

  def one_step():
    nonlocal state, step
    t0 = time.perf_counter()
    idx = pipeline.batch_indices(config.seed, step, n, config.batch_size)
    state, metrics = train_step(state, images_all, parallel.global_from_full(mesh, idx), step_key)
    loss = float(metrics["loss"])  # waits for the step
    jax.block_until_ready(state)
    step += 1
    return time.perf_counter() - t0, loss

  t0 = time.perf_counter()
  first = one_step()
  warm = [first[0]] + [one_step()[0] for _ in range(args.warmup - 1)]
  torch_side.emit("READY", dict(
      jax=jax.__version__, backend=jax.default_backend(), devices=len(jax.devices()),
      image_size=int(images.shape[1]), batch=args.batch, channels=int(images.shape[-1]),
      first_step_seconds=first[0], warmup_seconds=warm, setup_seconds=time.perf_counter() - t0,
      parameters=int(sum(x.size for x in jax.tree.leaves(state["params"])))))
  for line in sys.stdin:
    parts = line.split()
    if not parts or parts[0] == "quit":
      break
    times = [one_step() for _ in range(int(parts[1]))]
    torch_side.emit("RESULT", dict(total=[t for t, _ in times], loss=[l for _, l in times]))


# ------------------------------------------------------------------- images


def case_images(name, n):
  """uint8 RGB images for a case: photo-like synthetic ones, or the digits split."""
  if name == "cifar":
    import benchmark_augment  # pylint: disable=g-import-not-at-top
    return benchmark_augment.synthetic_images(n, CASES[name]["size"])
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxembed.configs import digits  # pylint: disable=g-import-not-at-top
  from jaxembed import data  # pylint: disable=g-import-not-at-top
  data_config = ml_collections.ConfigDict(dict(digits.get_config().data))
  data_config.image_size = CASES[name]["size"]  # upsampled, whatever the default job uses
  ds = data.load(data_config)
  return np.repeat(ds.train_images, 3, axis=-1)[:n]


# --------------------------------------------------------------------- main


def run_case(name, args, python, tmp):
  size, batch = CASES[name]["size"], CASES[name]["batch"]
  images = case_images(name, max(4 * batch, 1024))
  assert images.shape[1] == size, images.shape
  npz = os.path.join(tmp, f"{name}.npz")
  np.savez(npz, images=images)
  env_threads = str(args.threads)
  print(f"[{name}] {len(images)} images {images.shape[1:]}, batch {batch}: "
        "starting and warming up both sides", flush=True)
  jax_cmd = [sys.executable, HERE, "--_worker", "--images", npz, "--batch", str(batch),
             "--warmup", str(args.warmup)]
  torch_cmd = [python, torch_side.HERE, "step", "--images", npz, "--batch", str(batch),
               "--warmup", str(args.warmup), "--threads", env_threads, "--seed", "0"]
  # One after the other, so the warm-ups do not compete for the cores either.
  jax_proc, jax_info = torch_side.start_worker(jax_cmd, cwd=REPO)
  torch_proc = None
  try:
    torch_proc, torch_info = torch_side.start_worker(torch_cmd, cwd=tmp)
    jax_times, torch_total, torch_aug, torch_compute = [], [], [], []
    for r in range(args.rounds):
      j = torch_side.ask_worker(jax_proc, args.steps)
      t = torch_side.ask_worker(torch_proc, args.steps)
      jax_times += j["total"]
      torch_total += t["total"]
      torch_aug += t["augment"]
      torch_compute += t["compute"]
      print(f"[{name}] round {r + 1}/{args.rounds}: jaxembed {statistics.median(j['total']):.2f}"
            f" s/step, tsimcne {statistics.median(t['total']):.2f} s/step "
            f"(augmentation {statistics.median(t['augment']):.2f} s)", flush=True)
  finally:
    torch_side.stop_worker(jax_proc)
    if torch_proc is not None:
      torch_side.stop_worker(torch_proc)
  jm, tm = statistics.median(jax_times), statistics.median(torch_total)
  tc = statistics.median(torch_compute)
  return dict(
      case=name, image_size=size, batch=batch, views=2 * batch,
      jaxembed=dict(median_step_s=jm, step_s=jax_times, info=jax_info),
      tsimcne=dict(median_step_s=tm, median_augment_s=statistics.median(torch_aug),
                   median_compute_s=tc, step_s=torch_total, augment_s=torch_aug,
                   compute_s=torch_compute, info=torch_info),
      ratio=tm / jm, ratio_without_reference_augmentation=tc / jm,
      jaxembed_images_per_s=batch / jm, tsimcne_images_per_s=batch / tm)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_python", default=None,
                      help="Python with torch, torchvision and tsimcne (default: this one)")
  parser.add_argument("--cases", default="cifar,digits", help=f"of {sorted(CASES)}")
  parser.add_argument("--rounds", type=int, default=3, help="turns each side takes")
  parser.add_argument("--steps", type=int, default=1, help="timed steps per turn")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the turns")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--out", default=os.path.join(RESULTS, "benchmark_reference_step.json"))
  parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--images", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:  # pylint: disable=protected-access
    jax_worker(args)
    return
  # A terminated run still stops its two workers (the finally blocks run).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [c for c in cases if c not in CASES]
  if unknown or not cases:
    parser.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
  if min(args.rounds, args.steps, args.warmup) < 1:
    parser.error("--rounds, --steps and --warmup must be at least 1")
  python, info = torch_side.resolve(args.torch_python, ["torch", "torchvision", "tsimcne"])
  if python is None:
    print(f"error: {info}", file=sys.stderr)
    sys.exit(torch_side.USAGE_ERROR)

  rows = []

  def write():
    # After every case, so a run stopped during a long case keeps the finished ones.
    result = dict(
        what="median seconds per training step (2 views, forward, Cauchy loss, backward, "
             "SGD), ResNet-18 CIFAR stem, alternating processes",
        date=datetime.date.today().isoformat(),
        machine=f"{platform.platform()}, {os.cpu_count()} CPU cores",
        load_average_1min=os.getloadavg()[0], torch_side=info, torch_threads=args.threads,
        command="python scripts/benchmark_reference_step.py " + " ".join(sys.argv[1:]),
        cases_requested=cases, rows=rows)
    results_io.write_json(args.out, result, verbose=False)

  with tempfile.TemporaryDirectory(prefix="reference_step_") as tmp:
    for name in cases:
      rows.append(run_case(name, args, python, tmp))
      write()

  print(f"\n{'case':8s}{'px':>4s}{'batch':>6s}{'jaxembed s':>12s}{'tsimcne s':>11s}"
        f"{'(aug s)':>9s}{'ratio':>7s}{'w/o aug':>9s}")
  for r in rows:
    print(f"{r['case']:8s}{r['image_size']:4d}{r['batch']:6d}"
          f"{r['jaxembed']['median_step_s']:12.2f}{r['tsimcne']['median_step_s']:11.2f}"
          f"{r['tsimcne']['median_augment_s']:9.2f}{r['ratio']:7.2f}"
          f"{r['ratio_without_reference_augmentation']:9.2f}")
  print("ratio = tsimcne step time / jaxembed step time (>1: jaxembed faster); "
        "'w/o aug' leaves the reference's augmentation out")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
