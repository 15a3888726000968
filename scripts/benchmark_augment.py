"""Throughput of jaxembed.augment: source images/s, two views each.

For each image size (28, 32, 64, 224 px) one batch of 1024 RGB uint8 images
is augmented twice (two views in one array, ``augment.augment_views``, the
t-SimCNE training input as the trainer makes it) with the
``tsimcne`` and ``medical`` presets on the present JAX backend, jitted, after
a warm-up call that compiles. Beside it, in the same run and on the same
images:

* the reference's torchvision pipeline (tsimcne's own
  ``get_transforms_unnormalized(size, "contrastive")``: RandomResizedCrop
  (scale .2-1), horizontal flip, ColorJitter(.4, .4, .4, .1) p=.8,
  RandomGrayscale p=.2, ToTensor, on PIL images), run in a torch interpreter
  (``--torch_python``; scripts/torch_side.py) on the same images, timed two
  ways: one process, one image at a time (what one DataLoader worker does),
  and a DataLoader with one worker per core (how the reference trains);
  without an interpreter that has torch and torchvision it says so;
* a naive per-image NumPy/PIL pipeline of the same ops (the CPU baseline),
  timed on a subset and reported as images/s.

Ratios are JAX images/s over baseline images/s, on the same cores (the goal
of issue #5: JAX at least 3x the reference's DataLoader). ``--devices N``
gives JAX N CPU devices (one per core, as the loader has one worker per
core); the batch is sharded over them and each augments its own shard.
Prints a table and writes scripts/results/benchmark_augment.json.

  python scripts/benchmark_augment.py [--sizes 28,32,64,224] [--batch 1024] \
      [--torch_python /work/torchvenv/bin/python] [--devices 2]

An explicit --torch_python without torch and torchvision exits with status 2.
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance

import results_io
import torch_side

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def synthetic_images(n, size, seed=0):
  """Smooth random colour fields with edges (not white noise, so jitter,
  grayscale and crops act as on photos)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    f = rng.uniform(1, 4, (3, 2))
    p = rng.uniform(0, 2 * np.pi, (3,))
    img = 0.5 + 0.5 * np.sin(2 * np.pi * (f[:, :1, None] * xx + f[:, 1:, None]
                                          * yy) + p[:, None, None])
    img = img.transpose(1, 2, 0)
    cx, cy, r = rng.uniform(0.2, 0.8, 3)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < (r / 3) ** 2] = rng.uniform(0, 1, 3)
    out[i] = (img * 255).astype(np.uint8)
  return out


# --------------------------------------------------------------- baselines


def _pil_hue(img, shift):
  # As torchvision's PIL adjust_hue: shift the H channel of PIL's HSV (uint8).
  h, s, v = img.convert("HSV").split()
  h = np.asarray(h).astype(np.int16) + np.int16(round(shift * 255))
  h = Image.fromarray((h % 256).astype(np.uint8), "L")
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def naive_view(img, rng):
  """One tsimcne view of one PIL image with PIL/NumPy, per image."""
  width, height = img.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(0.2, 1.0)
    ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < w <= width and 0 < h <= height:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      break
  else:
    top, left, h, w = 0, 0, height, width
  img = img.crop((left, top, left + w, top + h)).resize((width, height),
                                                        Image.BILINEAR)
  if rng.uniform() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  if rng.uniform() < 0.8:
    for op in rng.permutation(4):
      if op == 0:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
      elif op == 1:
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
      elif op == 2:
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
      else:
        img = _pil_hue(img, rng.uniform(-0.1, 0.1))
  if rng.uniform() < 0.2:
    img = img.convert("L").convert("RGB")
  return np.asarray(img, np.float32) / 255.0


def time_per_image(fn, images, budget_s):
  """Images/s of fn(PIL image) over as many images as fit in budget_s."""
  pils = [Image.fromarray(x) for x in images]
  fn(pils[0])
  n, t0 = 0, time.perf_counter()
  while n < len(pils) and (n < 8 or time.perf_counter() - t0 < budget_s):
    fn(pils[n])
    fn(pils[n])  # two views
    n += 1
  return n / (time.perf_counter() - t0), n


def torchvision_rates(python, images_by_size, seconds, workers):
  """The reference pipeline's images/s per size, in the torch interpreter ``python``."""
  with tempfile.TemporaryDirectory(prefix="benchmark_augment_") as tmp:
    npz = os.path.join(tmp, "images.npz")
    np.savez(npz, **{f"s{size}": x for size, x in images_by_size.items()})
    cmd = [python, torch_side.HERE, "augment", "--images", npz, "--seconds", str(seconds),
           "--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False)
  result = torch_side._result_line(proc.stdout)  # pylint: disable=protected-access
  if proc.returncode != 0 or result is None:
    sys.exit(f"the torchvision side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return result


# ------------------------------------------------------------------- main


def time_jax(images, preset, reps):
  import jax  # pylint: disable=g-import-not-at-top
  from jaxembed import augment  # pylint: disable=g-import-not-at-top
  cfg = augment.resolve({"preset": preset, "fill_value": (0.5, 0.5, 0.5)})

  from jaxembed import parallel  # pylint: disable=g-import-not-at-top
  # With several devices the batch is sharded over them (the trainer's layout).
  mesh = parallel.make_mesh()

  @jax.jit
  def two_views(key, x):
    # As the trainer's step: both views of the batch in one (2B, ...) array.
    keys = jax.random.split(key, (2, x.shape[0]))
    return augment.augment_views(keys, x, cfg, mesh)

  x = jax.device_put(images, parallel.batch_sharding(mesh))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  jax.block_until_ready(two_views(key, x))
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(two_views(jax.random.fold_in(key, r + 1), x))
    times.append(time.perf_counter() - t0)
  best = min(times)
  return dict(images_per_s=len(images) / best, seconds=best,
              compile_s=compile_s, reps=reps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="28,32,64,224")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--baseline_seconds", type=float, default=3.0,
                      help="time spent on each per-image baseline per size")
  parser.add_argument("--torch_python", default=None,
                      help="Python with torch and torchvision (tsimcne optional) for the "
                           "reference's pipeline (default: this one if it has them)")
  parser.add_argument("--torch_workers", type=int, default=os.cpu_count(),
                      help="DataLoader workers of the reference's loader (default: one per core)")
  parser.add_argument("--devices", type=int, default=0,
                      help="if > 0, the number of XLA CPU devices to create (e.g. one per "
                           "core, as the loader has one worker per core); the batch is "
                           "sharded over them and each device augments its own shard")
  parser.add_argument("--out", default=str(RESULTS / "benchmark_augment.json"))
  args = parser.parse_args()
  if args.devices > 0:  # Before JAX is imported.
    results_io.request_cpu_devices(args.devices)
  # The torch side is checked first, so a wrong interpreter fails in seconds.
  tv_python, tv_info = torch_side.resolve(args.torch_python, ["torch", "torchvision"])
  tv_note = (f"torch {tv_info['torch']}, torchvision {tv_info['torchvision']} ({tv_python})"
             if tv_python else f"not run: {tv_info}")

  # JAX is imported only here, so --help and a wrong --torch_python answer at once.
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  devices = [d.device_kind for d in jax.devices()]
  print(f"backend: {backend} ({len(devices)} x {devices[0]}); "
        f"cpu cores: {os.cpu_count()}")
  if backend == "cpu":
    print("no GPU present: JAX figures are CPU figures")
  print(f"torchvision: {tv_note}")

  sizes = [int(s) for s in args.sizes.split(",")]
  images_by_size = {size: synthetic_images(args.batch, size) for size in sizes}
  rows = []
  for size in sizes:
    images = images_by_size[size]
    row = dict(size=size, batch=args.batch)
    for preset in ("tsimcne", "medical"):
      # Best of 3: the first call after compiling is slower (fresh memory).
      row[f"jax_{preset}"] = time_jax(images, preset, reps=3)
    rng = np.random.default_rng(0)
    naive, n = time_per_image(lambda im: naive_view(im, rng), images,
                              args.baseline_seconds)
    row["naive_pil"] = dict(images_per_s=naive, images_timed=n)
    rows.append(row)
  # The torch side afterwards, in its own process, so the two never share the cores.
  tv = None
  if tv_python:
    tv = torchvision_rates(tv_python, images_by_size, args.baseline_seconds, args.torch_workers)
    tv_note += f"; transform: {tv['transform']}"
    for row in rows:
      r = tv["rows"][str(row["size"])]
      row["torchvision"] = r["single_process"]
      if "dataloader" in r:
        row["torchvision_dataloader"] = r["dataloader"]

  print(f"\n{'px':>4s} {'jax tsimcne':>12s} {'jax medical':>12s} {'naive PIL':>10s} {'ratio':>6s}"
        f" {'tv 1 proc':>10s} {'ratio':>6s} {'tv loader':>10s} {'ratio':>6s}  (img/s)")
  for row in rows:
    jt = row["jax_tsimcne"]["images_per_s"]
    naive = row["naive_pil"]["images_per_s"]
    cells = []
    for key in ("torchvision", "torchvision_dataloader"):
      if key in row:
        rate = row[key]["images_per_s"]
        row[f"ratio_jax_over_{key}"] = jt / rate
        cells.append(f"{rate:10.0f} {jt / rate:5.1f}x")
      else:
        cells.append(f"{'n/a':>10s} {'n/a':>6s}")
    print(f"{row['size']:4d} {jt:12.0f} {row['jax_medical']['images_per_s']:12.0f} "
          f"{naive:10.0f} {jt / naive:5.1f}x {cells[0]} {cells[1]}")
  if tv is not None and all("torchvision_dataloader" in r for r in rows):
    worst = min(r["ratio_jax_over_torchvision_dataloader"] for r in rows)
    print(f"goal (issue #5): jax >= 3x the reference's loader on the same cores: "
          f"{'met' if worst >= 3 else 'NOT met'} (lowest ratio {worst:.1f}x)")

  result = dict(
      what="source images/s, two augmented views per image",
      date=datetime.date.today().isoformat(),
      backend=backend, devices=devices, cpu_cores=os.cpu_count(),
      machine=platform.platform(), jax=jax.__version__,
      load_average_1min=os.getloadavg()[0],
      torchvision=tv_note, gpu_present=backend == "gpu",
      command="python scripts/benchmark_augment.py " + " ".join(
          f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
      rows=rows)
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
