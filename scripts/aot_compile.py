"""Compiles the trainer's steps for a TPU slice or GPUs this machine does not have, and reports the cost.

  pip install "jax[tpu]==<jax version>"        # libtpu, for TPU targets
  python scripts/aot_compile.py --config configs/cifar10.py --topology v5e:2x2 --out a.json
  python scripts/aot_compile.py --config configs/cifar10.py --topology v5e:16x16 --max_batch \\
      --out scripts/results/aot_tpu.json --append
  python scripts/aot_compile.py --config configs/cifar10.py --topology h100:1x1x8 ...   # GPUs
      (needs jax-cuda12-plugin and jax-cuda12-pjrt of the same version, and ptxas)

It compiles exactly what the trainer runs (jaxembed.aot, built by
train_state.setup_stage, the trainer's own builder): the stage-1 step (the
first stage's head, 128-d in the paper recipe, everything trainable), the
stage-3 step (the 2-d head) and the evaluation embedding step, sharded as the
trainer shards them, over a mesh of the target's compile-only devices (hosts
as the topology implies). Nothing runs. One JSON row per step: the target
(platform, device kind, chips, hosts), the batch, compile time, memory per
chip (arguments, outputs, temporaries, the peak the chip holds, its HBM),
flops and bytes per step, a roofline step time and epoch times for CIFAR-10
(50,000 images) and ImageNet-1k (1,281,167), and the collectives of the
compiled HLO (count and bytes per kind, and the loss's gather of the global
batch named). With ``--max_batch`` it also searches the largest global batch
whose stage-1 step fits.

The roofline is an estimate, not a measurement: max(flops / peak compute,
bytes / peak HBM bandwidth) from each chip's published figures
(jaxembed.aot.CHIPS, with the pages they come from), plus, in
``with_collectives_s``, the collective bytes over the chip's interchip
bandwidth. XLA's own ``optimal_seconds`` is kept raw and never used as a time:
it comes out negative for v5e and v4 programs.
"""

import json
import os
import sys
import time

from jaxembed import aot

aot.prepare_environment()  # before JAX starts: CPU backend only, libtpu quiet

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxembed import cli  # noqa: E402
from jaxembed import parallel  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:args].", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target: v5e:2x2, v5e:4x4, v5e:16x16, "
                                "v4:2x4x4, v5p:2x4x4, v6e:4x4, h100, h100:1x1x8 ...")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_list("steps", ["stage1", "stage3", "embed"],
                           "Programs to compile: stage1, stage2, stage3, embed.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Training images of the dataset (default: "
                                   "known for the configs' datasets, DATASETS).")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "Also find the largest global batch whose "
                               "stage-1 step fits in the chip's memory.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 8, "Compiles the batch search may use.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")
_APPEND = flags.DEFINE_bool("append", False, "Add the rows to --out instead of replacing it.")
_LABEL = flags.DEFINE_string("label", None, "A name for these rows (default: config and target).")

# Training images and their shape for the datasets the configs name (no data is read).
DATASETS = {("tfds", "cifar10"): (50_000, 32, 3), ("tfds", "imagenet2012"): (1_281_167, 224, 3),
            ("digits", None): (1_437, 8, 1), ("medmnist", None): (89_996, 28, 3)}
EPOCH_IMAGES = (50_000, 1_281_167)  # CIFAR-10 and ImageNet-1k training splits
STEP_INDEX = {"stage1": 0, "stage2": 1, "stage3": 2}


class UsageError(ValueError):
  """Bad input: reported in one line, exit status 2."""


def dataset_shape(config):
  """(number of training images, (H, W, C)) the config would train on."""
  key = (config.data.source, config.data.get("name") if config.data.source == "tfds" else None)
  n, size, channels = DATASETS.get(key, (None, None, None))
  n = _NUM_IMAGES.value or n
  if n and config.data.get("max_examples"):
    n = min(n, config.data.max_examples)
  size = config.data.image_size or size
  channels = config.data.channels or channels
  if None in (n, size, channels):
    raise UsageError(f"the size of dataset {key} is not known here; pass --num_images and set "
                     "--config.data.image_size and --config.data.channels")
  return n, (size, size, channels)


def compile_step(kind, config, stage_dicts, tgt, mesh, num_images, image_shape):
  """One JSON row: lower and compile ``kind`` for the target, and read its costs."""
  t = time.perf_counter()
  if kind == "embed":
    lowered, info = aot.lower_embed_step(config, stage_dicts, mesh, image_shape)
  else:
    lowered, info = aot.lower_train_step(config, stage_dicts, STEP_INDEX[kind], mesh,
                                         num_images, image_shape)
  lower_s = time.perf_counter() - t
  t, cpu = time.perf_counter(), time.process_time()
  compiled, error = None, None
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA reports running out of memory so)
    error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
  b = info["global_batch"]
  row = {"label": _LABEL.value, "step": kind, "topology": tgt.name,
         "platform": tgt.chip.platform, "device_kind": tgt.devices[0].device_kind,
         "chips": tgt.chips, "hosts": tgt.hosts, "per_chip_batch": b // tgt.chips,
         "model": config.model.name, "dtype": config.model.dtype,
         "image_size": image_shape[0], **info,
         "compiled": compiled is not None, "lower_s": round(lower_s, 1),
         "compile_s": round(time.perf_counter() - t, 1),
         # CPU seconds of this process: the wall time an idle machine would take.
         "compile_cpu_s": round(time.process_time() - cpu, 1),
         "hbm_bytes_per_chip": tgt.chip.hbm_bytes, "usable_bytes_per_chip": tgt.usable_bytes,
         "chip_source": tgt.chip.source}
  if error:
    row["error"] = error
    oom = aot.out_of_memory(error)
    row["fits"] = False if oom or "RESOURCE_EXHAUSTED" in error else None
    if oom:
      row["needed_temp_bytes"] = oom[0]
    return row
  mem = aot.memory(compiled)
  row.update({"argument_bytes": mem["argument_size_in_bytes"],
              "output_bytes": mem["output_size_in_bytes"],
              "alias_bytes": mem["alias_size_in_bytes"], "temp_bytes": mem["temp_size_in_bytes"],
              "xla_peak_memory_bytes": mem["peak_memory_in_bytes"],
              "peak_bytes_per_chip": mem["peak_bytes"]})
  row["fits"] = mem["peak_bytes"] <= tgt.usable_bytes
  row.update(aot.cost(compiled, lowered, tgt.chips))
  summary, ops = aot.collectives(compiled.as_text(), tgt.chips, info["head_dim"], b)
  row["collectives"] = summary
  row["loss_gather"] = [o for o in ops if o["role"].startswith("loss")]
  row["collective_roles"] = {}
  for o in ops:
    r = row["collective_roles"].setdefault(o["role"], {"count": 0, "operand_bytes": 0})
    r["count"] += 1
    r["operand_bytes"] += o["operand_bytes"]
  if row.get("flops_per_step"):
    sent = sum(v["operand_bytes"] for v in summary.values())
    rl = aot.roofline(tgt.chip, row["flops_per_step"], row.get("bytes_accessed"),
                      config.model.dtype, sent)
    row["roofline"] = rl
    row["cost_model_step_s"] = rl["step_s"]
    steps = (lambda n: n // b) if kind != "embed" else (lambda n: -(-n // b))
    row["est_epoch_s"] = {str(n): round(steps(n) * rl["step_s"], 3) for n in EPOCH_IMAGES}
  return row


def find_max_batch(config_in, tgt, mesh, num_images, image_shape, first, on_row=None):
  """Largest global batch whose stage-1 step fits, and the compiles that show it.

  Memory grows about linearly with the per-chip batch, so the stage-1 rows at
  the batch and at twice it give a first guess; near the limit the compilers
  rematerialise activations to fit, so the line is a lower bound, and the
  search then grows the batch and bisects between the largest batch that fit
  and the smallest that did not (a TPU compile that does not fit fails in
  seconds). Batches are multiples of 8 per chip; with device-resident data the
  batch is at most the dataset (the trainer clamps it). ``on_row(rows)`` is
  called after each compile.
  """
  n = tgt.chips
  quantum = 8 * n
  limit = None if config_in.data.get("streaming", False) else num_images // quantum * quantum
  rows = []

  def fits(batch):
    config, stage_dicts = aot.abstract_config(config_in, batch, n, image_shape)
    row = compile_step("stage1", config, stage_dicts, tgt, mesh, num_images, image_shape)
    row["search"] = True
    rows.append(row)
    if on_row:
      on_row(rows)
    print(json.dumps({k: row.get(k) for k in ("global_batch", "compiled", "fits",
                                              "peak_bytes_per_chip", "compile_s")}), flush=True)
    return bool(row.get("fits"))

  def snap(batch):
    batch = max(quantum, int(batch) // quantum * quantum)
    return min(batch, limit) if limit else batch

  lo, hi = (first["global_batch"], None) if first.get("fits") else (None, first["global_batch"])
  if lo is None:
    hi_try = snap(first["global_batch"] // 2)
    while hi_try >= quantum and not fits(hi_try) and len(rows) < _MAX_COMPILES.value:
      hi, hi_try = hi_try, snap(hi_try // 2)
    lo = hi_try if rows and rows[-1].get("fits") else None
  elif lo != limit:
    second = snap(2 * lo)
    if fits(second):
      y0, y1 = first["peak_bytes_per_chip"], rows[-1]["peak_bytes_per_chip"]
      slope = (y1 - y0) / (second - lo)
      lo = second
      guess = snap(lo * 2 if slope <= 0 else (tgt.usable_bytes - (y0 - slope * first[
          "global_batch"])) / slope)
      if guess > lo:
        if fits(guess):
          lo = guess
        else:
          hi = guess
    else:
      hi = second
  while lo is not None and hi is None and lo != limit and len(rows) < _MAX_COMPILES.value:
    nxt = snap(lo * 1.5)
    if nxt <= lo:
      break
    if fits(nxt):
      lo = nxt
    else:
      hi = nxt
  while (lo is not None and hi is not None and hi - lo > max(quantum, lo // 16)
         and len(rows) < _MAX_COMPILES.value):
    mid = snap((lo + hi) // 2)
    if mid in (lo, hi):
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  summary = {"label": _LABEL.value, "step": "stage1 largest batch", "topology": tgt.name,
             "chips": tgt.chips, "model": config_in.model.name, "image_size": image_shape[0],
             "max_global_batch": lo, "per_chip_batch": None if lo is None else lo // n,
             "smallest_failing_batch": hi,
             "limited_by": "the dataset" if lo is not None and lo == limit else "memory",
             "usable_bytes_per_chip": tgt.usable_bytes,
             "compiles": [(r["global_batch"], r.get("fits"), r.get("peak_bytes_per_chip"))
                          for r in rows]}
  return rows, summary


def read_old():
  """The rows already in --out that --append keeps."""
  if _OUT.value and _APPEND.value and os.path.isfile(_OUT.value):
    with open(_OUT.value) as f:
      return json.load(f)
  return []


def write(old, rows):
  """--out: the rows kept and these (after every compile, so an interrupted run keeps its rows)."""
  if not _OUT.value:
    return
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  tmp = _OUT.value + ".tmp"
  with open(tmp, "w") as f:
    json.dump(old + rows, f, indent=1)
  os.replace(tmp, _OUT.value)


def run():
  config_in = cli.load_config(_CONFIG)  # a file that fails to load: one line, exit 2
  if config_in is None:
    raise UsageError("--config is required, e.g. --config configs/cifar10.py")
  if not _TOPOLOGY.value:
    raise UsageError("--topology is required, e.g. --topology v5e:2x2")
  unknown = [s for s in _STEPS.value if s not in STEP_INDEX and s != "embed"]
  if unknown:
    raise UsageError(f"unknown --steps {unknown}; use stage1, stage2, stage3, embed")
  t0 = time.perf_counter()
  tgt = aot.target(_TOPOLOGY.value)
  mesh = parallel.make_mesh(devices=tgt.devices)
  num_images, image_shape = dataset_shape(config_in)
  config, stage_dicts = aot.abstract_config(config_in, _BATCH.value, tgt.chips, image_shape)
  if not config.data.get("streaming", False) and config.batch_size > num_images:
    raise UsageError(f"batch size {config.batch_size} is larger than the {num_images} training "
                     "images; the trainer would clamp it (or set --config.data.streaming=True)")
  if _LABEL.value is None:
    flags.FLAGS.label = f"{config.model.name} {image_shape[0]}px on {tgt.name}"
  print(f"# {tgt.name}: {tgt.chips} x {tgt.devices[0].device_kind} on {tgt.hosts} host(s); "
        f"batch {config.batch_size}; {num_images} images of {image_shape}; jax "
        f"{jax.__version__}; set-up {time.perf_counter() - t0:.1f} s", flush=True)
  old, rows = read_old(), []
  for kind in _STEPS.value:
    row = compile_step(kind, config, stage_dicts, tgt, mesh, num_images, image_shape)
    rows.append(row)
    write(old, rows)
    print(json.dumps({k: v for k, v in row.items() if k not in ("loss_gather",)}), flush=True)
  if _MAX_BATCH.value:
    first = next((r for r in rows if r["step"] == "stage1"), None) or compile_step(
        "stage1", config, stage_dicts, tgt, mesh, num_images, image_shape)
    extra, summary = find_max_batch(config_in, tgt, mesh, num_images, image_shape, first,
                                    lambda extra: write(old, rows + extra))
    rows += extra + [summary]
    print(json.dumps(summary), flush=True)
  write(old, rows)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    run()
  except (UsageError, aot.TargetError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
