"""Reading a folder of JPEGs into memory: one decoding thread versus the thread pool.

Generates ``--n`` (default 30,000) 300×300 JPEGs of mixed content (smooth
colour fields, shapes, noise; quality 90) in three class subfolders, in a
temporary folder that is removed afterwards (``--dir`` keeps and reuses
one), reads every file once so that all arms find them in the page cache,
then reads them with ``jaxembed.data.folder.read_files`` (the folder
source's reader) in a fresh interpreter per arm: files/s, wall time and the
peak host memory (RSS) above the interpreter's before reading, CPU time per
file and the cores kept busy (CPU time / wall time). Arms: target
size 64 (the 30,000×64×64×3 array is 369 MB) with 1 thread and with the
pool; target size 300 (no resize, 270 KB an image) on ``--n300`` files.
Prints a table and writes scripts/results/benchmark_folder_load.json.

  python scripts/benchmark_folder_load.py [--n 30000] [--dir /tmp/jpegs] [--sequential-n N]
"""

import argparse
from concurrent import futures
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw
import psutil

from jaxembed.data import folder as folder_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ("c0", "c1", "c2")
OUT = os.path.join(results_io.ROOT, "scripts", "results", "benchmark_folder_load.json")


_NOISE = {}  # size -> one (2 size, 2 size, 3) noise field that images crop their noise from


def make_image(i, size):
  """Image i: a smooth colour field, a few shapes and sensor-like noise (JPEGs of ~25 KB)."""
  if size not in _NOISE:
    _NOISE[size] = np.random.default_rng(-1 % 2**32).normal(0, 6, (2 * size, 2 * size, 3)).astype(
        np.int16)
  rng = np.random.default_rng(i)
  field = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8))
  img = field.resize((size, size), Image.BICUBIC)
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(2, 6))):
    x0, y0 = rng.integers(0, size - 20, 2)
    x1, y1 = x0 + rng.integers(10, size // 2), y0 + rng.integers(10, size // 2)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
  y, x = rng.integers(0, size, 2)
  noisy = np.asarray(img, np.int16) + _NOISE[size][y:y + size, x:x + size]
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def generate(folder, n, size, threads):
  """Writes n JPEGs (quality 90) into class subfolders; reuses a complete earlier set.

  Returns (seconds the generation took, whether this call reused an earlier set)."""
  marker = os.path.join(folder, "generated.json")
  want = {"n": n, "size": size, "quality": 90, "classes": list(CLASSES)}
  if os.path.exists(marker):
    with open(marker) as f:
      earlier = json.load(f)
    if {k: earlier.get(k) for k in want} == want:
      return earlier.get("seconds"), True
  for c in CLASSES:
    os.makedirs(os.path.join(folder, c), exist_ok=True)

  def write(i):
    make_image(i, size).save(os.path.join(folder, CLASSES[i % 3], f"{i:06d}.jpg"), quality=90)

  t = time.perf_counter()
  with futures.ThreadPoolExecutor(threads) as pool:
    for done, _ in enumerate(pool.map(write, range(n)), 1):
      if done % 5000 == 0:
        print(f"generated {done:,} of {n:,} JPEGs", flush=True)
  seconds = time.perf_counter() - t
  with open(marker, "w") as f:
    json.dump(dict(want, seconds=seconds), f)
  return seconds, False


def read_draft(path, size):
  """A JPEG decoded by PIL's draft mode at 1/2, 1/4 or 1/8 scale (at least ``size``), then
  resized as the loader resizes: what the loader would give with draft mode (it does not use it)."""
  with Image.open(path) as img:
    img.draft(None, (size, size))
    img.load()
    arr = np.asarray(img.convert("RGB"))
  return folder_lib.prepare(arr, {"image_size": size, "channels": 3})


def draft_arm(paths, size, threads):
  """Files/s of draft decoding on the pool, and its pixels against the loader's (first 1,000)."""
  out = np.empty((len(paths), size, size, 3), np.uint8)

  def read(i):
    out[i] = read_draft(paths[i], size)

  t = time.perf_counter()
  with futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(read, range(len(paths))))
  seconds = time.perf_counter() - t
  m = min(1000, len(paths))
  ref, _, _ = folder_lib.read_files(paths[:m], {"image_size": size, "channels": 3},
                                    threads=threads)
  diff = np.abs(out[:m].astype(np.int16) - ref)
  return {"files": len(paths), "image_size": size, "threads": threads, "draft": True,
          "seconds": seconds, "files_per_s": len(paths) / seconds,
          "vs_loader_mean_abs_diff": float(diff.mean()), "vs_loader_max_abs_diff": int(diff.max()),
          "vs_loader_share_of_pixels_off_by_more_than_4": float((diff > 4).mean()),
          "compared_files": m}


def worker(spec):
  """One arm in this fresh interpreter: prints RESULT {...}."""
  paths, _, _ = folder_lib.list_images(spec["dir"])
  n = spec["n"]
  paths = [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]
  if spec.get("draft"):
    print("RESULT " + json.dumps(draft_arm(paths, spec["image_size"], spec["threads"])))
    return
  cfg = {"image_size": spec["image_size"], "channels": 3, "intensity": "minmax", "window": None}
  before = psutil.Process().memory_info().rss
  t, cpu = time.perf_counter(), time.process_time()
  images, kept, _ = folder_lib.read_files(paths, cfg, threads=spec["threads"])
  seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  assert len(kept) == n and images.shape == (n, spec["image_size"], spec["image_size"], 3)
  print("RESULT " + json.dumps({
      "files": n, "image_size": spec["image_size"], "threads": spec["threads"],
      "seconds": seconds, "files_per_s": n / seconds, "array_mb": images.nbytes / 1e6,
      "peak_rss_increase_mb": (peak - before) / 1e6,
      "cpu_seconds": cpu, "cpu_ms_per_file": 1e3 * cpu / n, "cores_busy": cpu / seconds,
      "checksum": int(images[::max(1, n // 100)].astype(np.int64).sum())}), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=30_000, help="JPEGs to generate and read")
  p.add_argument("--size", type=int, default=300, help="side of the generated JPEGs")
  p.add_argument("--dir", help="folder for the JPEGs, kept and reused (default: a temporary "
                 "folder, removed afterwards)")
  p.add_argument("--sequential-n", type=int, help="files for the 1-thread arm at 64 px "
                 "(default --n)")
  p.add_argument("--n300", type=int, default=5_000, help="files for the arms at full size")
  p.add_argument("--n-draft", type=int, default=5_000,
                 help="files for the JPEG draft-mode arm (64 px, the pool)")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                 help="threads of the pool arm (default: the CPU cores, as the loader)")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per arm")
  p.add_argument("--out", default=OUT)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(json.loads(args.worker))
  folder = args.dir or tempfile.mkdtemp(prefix="jaxembed_jpegs_")
  os.makedirs(folder, exist_ok=True)
  load_before = os.getloadavg()
  try:
    gen_s, reused = generate(folder, args.n, args.size, os.cpu_count() or 1)
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg")]
    t = time.perf_counter()
    total_bytes = 0
    for path in files:  # into the page cache, so that no arm pays for the disk
      with open(path, "rb") as f:
        total_bytes += len(f.read())
    warm_s = time.perf_counter() - t
    arms = [(64, 1, args.sequential_n or args.n, False), (64, args.threads, args.n, False),
            (args.size, 1, min(args.n300, args.n), False),
            (args.size, args.threads, min(args.n300, args.n), False),
            (64, args.threads, min(args.n_draft, args.n), True)]
    rows = []
    for size, threads, n, draft in arms:
      spec = {"dir": folder, "n": n, "image_size": size, "threads": threads, "draft": draft}
      result, error = results_io.run_worker(__file__, spec, dict(os.environ), args.timeout)
      if error:
        print(f"arm {spec}: {error}", flush=True)
        rows.append(dict(spec, error=error))
        continue
      rows.append(result)
      if draft:
        print(f"{size:>4} px  {threads:>2} thread(s)  {n:>6,} files  {result['seconds']:7.1f} s  "
              f"{result['files_per_s']:7,.0f} files/s  JPEG draft mode (not used by the loader): "
              f"mean |diff| {result['vs_loader_mean_abs_diff']:.2f}, max "
              f"{result['vs_loader_max_abs_diff']}", flush=True)
        continue
      print(f"{size:>4} px  {threads:>2} thread(s)  {n:>6,} files  {result['seconds']:7.1f} s  "
            f"{result['files_per_s']:7,.0f} files/s  array {result['array_mb']:7.0f} MB  "
            f"peak RSS +{result['peak_rss_increase_mb']:7.0f} MB  "
            f"CPU {result['cpu_ms_per_file']:.2f} ms/file, {result['cores_busy']:.2f} cores busy",
            flush=True)
  finally:
    if not args.dir:
      shutil.rmtree(folder, ignore_errors=True)
  ratios = {}
  for size in (64, args.size):
    plain = [r for r in rows if r.get("image_size") == size and not r.get("draft")]
    one = [r for r in plain if r.get("threads") == 1]
    pool = [r for r in plain if r.get("threads") == args.threads and args.threads != 1]
    if one and pool and "files_per_s" in one[0] and "files_per_s" in pool[0]:
      ratios[f"{size}px_pool_over_1_thread_files_per_s"] = (pool[0]["files_per_s"]
                                                            / one[0]["files_per_s"])
  result = {
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(),
                  "memory_gb": psutil.virtual_memory().total / 1e9,
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
      "generated": {"n": args.n, "size": args.size, "quality": 90, "classes": len(CLASSES),
                    "seconds": gen_s, "files_per_s": args.n / gen_s if gen_s else None,
                    "reused": reused, "mean_file_kb": total_bytes / len(files) / 1e3,
                    "page_cache_read_s": warm_s},
      "arms": rows, "ratios": ratios,
      "note": "each arm in a fresh interpreter; files in the page cache; peak RSS is "
              "ru_maxrss minus the RSS before reading"}
  draft = [r for r in rows if r.get("draft") and "files_per_s" in r]
  pool64 = [r for r in rows if r.get("image_size") == 64 and r.get("threads") == args.threads
            and not r.get("draft") and "files_per_s" in r]
  if draft and pool64:
    ratios["64px_draft_over_loader_files_per_s"] = (draft[0]["files_per_s"]
                                                    / pool64[0]["files_per_s"])
  print(json.dumps(ratios))
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
