"""Compiling the trainer's programs ahead of time for hardware this machine does not have.

XLA compiles for a TPU slice or a GPU without one: libtpu gives compile-only
devices of a named topology (``v5e:4x4``, ``v4:2x4x4``, ...), and the CUDA
plugin gives compile-only GPUs described by a ``GpuTargetConfigProto``. Over
a mesh of such devices this module builds the trainer's own programs, by the
trainer's own code (``train_state.setup_stage(..., abstract=True)``: state
and arguments are shapes with the trainer's shardings, nothing is computed),
compiles them, and reads what they cost per chip: memory (``memory_analysis``),
flops and bytes (``cost_analysis``), and the collectives of the compiled HLO.

Platform-specific paths follow the devices compiled for
(``parallel.platform``), so a program compiled here for a TPU is the one a
TPU host would compile (ordinary convolutions, vmapped augmentation).
``scripts/aot_compile.py`` is the command line; docs/BENCHMARKS.md has results.

Before JAX starts, :func:`prepare_environment` keeps the process on the CPU
backend (compile-only devices need no accelerator backend) and stops libtpu
from searching for TPU hosts that do not exist.
"""

import dataclasses
import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from jaxembed import configlib
from jaxembed import embedding
from jaxembed import parallel
from jaxembed import schedule
from jaxembed import train_state
from jaxembed.data import pipeline


class TargetError(ValueError):
  """A target that cannot be compiled for here (unknown name, missing plugin, bad batch)."""


def prepare_environment():
  """Environment for compile-only devices; call before JAX starts its backends.

  JAX stays on the CPU backend (the compile-only devices need no other), and
  on a machine without TPU chips libtpu is told the host layout so that it
  does not look for TPU workers (it prints warnings otherwise); compile-only
  use touches no chip, so several processes may load libtpu at once.

  This module imports JAX, whose config has read ``JAX_PLATFORMS`` by then,
  so the platforms are also set in the config (unless already chosen there).
  Without that JAX would try every backend: the CUDA plugin, found installed,
  then stops on a machine without the CUDA runtime ("Unable to load CUDA"),
  though compiling for a GPU needs none.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# ----------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind: how to get its compile-only devices, and its published peaks.

  ``peak_flops`` is the dense matrix throughput in the precision XLA feeds the
  matrix units for float32 models (TPUs: one bf16 pass at DEFAULT precision;
  H100: TF32) and ``peak_flops_bf16`` for bfloat16 models.
  """
  name: str
  platform: str                 # "tpu" | "gpu"
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  peak_flops_bf16: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float        # interchip bandwidth per chip, one direction (0: unknown)
  source: str
  topology_kwargs: tuple = ()


GIB = 1 << 30
# Published per-chip figures (the pages named in ``source``, read 2026-12-02).
CHIPS = {
    # v4: 275 TFLOP/s bf16, 32 GiB HBM at 1,200 GB/s. JAX runs v4 as megacore
    # (one device per chip), which libtpu's topologies give only when asked.
    "v4": Chip("v4", "tpu", "TPU v4", 32 * GIB, 275e12, 275e12, 1200e9, 0,
               "https://cloud.google.com/tpu/docs/v4", (("chip_config_name", "megacore"),)),
    # v5e: 197 TFLOP/s bf16, 16 GiB at 819 GB/s, ICI 1,600 Gbps per chip.
    "v5e": Chip("v5e", "tpu", "TPU v5 lite", 16 * GIB, 197e12, 197e12, 819e9, 200e9,
                "https://cloud.google.com/tpu/docs/v5e"),
    # v5p: 459 TFLOP/s bf16, 95 GiB at 2,765 GB/s, ICI 4,800 Gbps per chip.
    "v5p": Chip("v5p", "tpu", "TPU v5", 95 * GIB, 459e12, 459e12, 2765e9, 600e9,
                "https://cloud.google.com/tpu/docs/v5p"),
    # v6e: 918 TFLOP/s bf16, 32 GiB at 1,640 GB/s, ICI 3,200 Gbps per chip.
    "v6e": Chip("v6e", "tpu", "TPU v6 lite", 32 * GIB, 918e12, 918e12, 1640e9, 400e9,
                "https://cloud.google.com/tpu/docs/v6e"),
    # H100 SXM: 989.4 TFLOP/s bf16 and 494.7 TF32 (dense: half the datasheet's
    # 'with sparsity' figures), 80 GB at 3.35 TB/s, NVLink 900 GB/s in all.
    "h100": Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 80 * 10**9, 494.7e12, 989.4e12,
                 3.35e12, 450e9, "https://www.nvidia.com/en-us/data-center/h100/"),
}

# XLA:GPU needs a description of the GPU to compile for (a GpuTargetConfigProto).
# These are the H100 SXM's figures from XLA's published spec
# (openxla/xla: xla/backends/gpu/target_config/specs/h100_sxm.txtpb): limits,
# 132 SMs, 3.35 TB/s, 50 MiB L2, 1.98 GHz, 79.1 GiB of device memory.
_H100_FIELDS = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32,
    "shared_memory_per_block": 49152, "shared_memory_per_core": 233472,
    "threads_per_core_limit": 2048, "core_count": 132, "fpus_per_core": 128,
    "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "memory_bandwidth": 3352320000000, "l2_cache_size": 52428800, "clock_rate_ghz": 1.98,
    "device_memory_size": 84942979072, "shared_memory_per_block_optin": 232448,
    "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
}
# Of the GPU's memory, what JAX lets XLA use by default (it preallocates 75%;
# XLA_PYTHON_CLIENT_MEM_FRACTION, docs.jax.dev gpu_memory_allocation).
GPU_MEMORY_FRACTION = 0.75


def h100_target_config():
  """The GpuTargetConfigProto text of an H100 SXM (jax-cuda12 0.10's plugin accepts it)."""
  lines = [f"  {k}: {v}" for k, v in _H100_FIELDS.items()]
  return ("gpu_device_info {\n" + "\n".join(lines)
          + "\n  cuda_compute_capability { major: 9 minor: 0 }\n}\n"
          'platform_name: "CUDA"\n'
          "dnn_version_info { major: 9 minor: 8 }\n"
          'device_description_str: "NVIDIA H100 80GB HBM3"\n')


@dataclasses.dataclass
class Target:
  """Compile-only devices of a named target, and what they are."""
  name: str
  chip: Chip
  devices: list

  @property
  def hosts(self):
    return len({d.process_index for d in self.devices})

  @property
  def chips(self):
    return len(self.devices)

  @property
  def usable_bytes(self):
    """Memory a program may use per chip: the TPU compiler's limit, JAX's share on a GPU."""
    if self.chip.platform == "tpu":
      return self.chip.hbm_bytes * 63 // 64  # v5e's compiler allows 15.75 of 16 GiB
    return int(_H100_FIELDS["device_memory_size"] * GPU_MEMORY_FRACTION)


def target(name):
  """Compile-only devices for ``v5e:2x2``, ``v4:2x4x4``, ``v5p:2x4x4``, ``h100``, ``h100:1x1x8``...

  A TPU name is libtpu's ``<chip>:<shape>`` (chips per axis). ``h100`` is one
  GPU; ``h100:PxHxD`` is P partitions of H hosts of D GPUs (``1x1x8``: one
  8-GPU machine).

  Raises:
    TargetError: an unknown chip or shape, or libtpu / the CUDA plugin missing.
  """
  family, _, shape = name.partition(":")
  if family not in CHIPS:
    raise TargetError(f"unknown target {name!r}; use <chip>:<shape> with chip one of "
                      f"{sorted(CHIPS)}, e.g. v5e:4x4, v4:2x4x4, v5p:2x4x4, h100, h100:1x1x8")
  chip = CHIPS[family]
  if chip.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    raise TargetError(f"compiling for {name} needs libtpu; install it with "
                      f"pip install \"jax[tpu]=={jax.__version__}\"")
  if chip.platform == "gpu" and importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise TargetError(f"compiling for {name} needs the CUDA plugin; install it with "
                      f"pip install jax-cuda12-plugin=={jax.__version__} "
                      f"jax-cuda12-pjrt=={jax.__version__}")
  try:
    if chip.platform == "tpu":
      if not shape:
        raise TargetError(f"--topology {name!r} needs a shape, e.g. {family}:2x2")
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                          **dict(chip.topology_kwargs))
    else:
      desc = topologies.get_topology_desc(topology_name="", platform="cuda",
                                          target_config=h100_target_config(),
                                          topology=shape or "1x1x1")
  except TargetError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (libtpu and the plugin raise anything)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TargetError(f"cannot make {name} devices: {text}") from None
  return Target(name=name, chip=chip, devices=list(desc.devices))


# -------------------------------------------------------------------- programs


def abstract_config(config, batch_size, num_devices, image_shape):
  """``config`` with its batch and the data-dependent fields a run would fill from the data.

  The normalisation and border colour get placeholder values of the right
  length (values do not change the program). Returns (config, stage dicts).
  """
  config = config.copy_and_resolve_references()
  channels = image_shape[-1]
  with config.unlocked():
    if batch_size:
      config.batch_size = int(batch_size)
    if config.model.input_mean is None:
      config.model.input_mean = (0.5,) * channels
    if config.model.input_std is None:
      config.model.input_std = (0.25,) * channels
    if config.aug.fill_value is None:
      config.aug.fill_value = (0.5,) * channels
  if config.batch_size % num_devices:
    raise TargetError(f"batch size {config.batch_size} does not split over the {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  return config, configlib.validate(config, num_devices)


def lower_train_step(config, stage_dicts, stage_index, mesh, num_images, image_shape):
  """The trainer's step of stage ``stage_index`` (0-based), lowered for ``mesh``.

  The arguments are what a run passes: the replicated state, the
  device-resident training images (``num_images``, replicated, as the trainer
  uploads them) and the batch's indices split over ``data``; or, with
  ``data.streaming``, the batch itself split over ``data``.

  Returns:
    (lowered, info) where info has the stage's head, what it trains, the
    global batch and the bytes of data per chip.
  """
  spe = max(pipeline.steps_per_epoch(num_images, config.batch_size), 1)
  stage = schedule.build_stages(stage_dicts, spe)[stage_index]
  streaming = bool(config.data.get("streaming", False))
  setup = train_state.setup_stage(config, stage, mesh, spe, image_shape=image_shape,
                                  streaming=streaming, abstract=True)
  key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(config.seed), 1))
  b = config.batch_size
  if streaming:
    images = jax.ShapeDtypeStruct((b,) + tuple(image_shape), jnp.uint8)
    args, data_bytes = (setup.state, images, key), b * _prod(image_shape) // mesh.size
  else:
    images_all = jax.ShapeDtypeStruct((num_images,) + tuple(image_shape), jnp.uint8)
    idx = jax.ShapeDtypeStruct((b,), jnp.int32)
    args, data_bytes = (setup.state, images_all, idx, key), num_images * _prod(image_shape)
  info = {"head_dim": stage.head_dim, "trainable": stage.trainable, "global_batch": b,
          "data": "streamed batch" if streaming else "device-resident training images",
          "data_bytes_per_chip": data_bytes}
  return setup.step.lower(*args), info


def lower_embed_step(config, stage_dicts, mesh, image_shape):
  """The evaluation embedding step (``embedding.embed_fn``) of the last stage's model."""
  last = schedule.build_stages(stage_dicts, 1)[-1]
  setup = train_state.setup_stage(config, last, mesh, 1, image_shape=image_shape,
                                  abstract=True, with_step=False)
  variables = {"params": setup.state["params"], "batch_stats": setup.state["batch_stats"]}
  # embedding.embed's chunks: eval.batch_size, a multiple of the devices.
  b = max(mesh.size, config.eval.batch_size - config.eval.batch_size % mesh.size)
  images = jax.ShapeDtypeStruct((b,) + tuple(image_shape), jnp.uint8)
  lowered = embedding.embed_fn(setup.model, mesh).lower(variables, images)
  return lowered, {"head_dim": last.head_dim, "global_batch": b, "data": "evaluation batch",
                   "data_bytes_per_chip": b * _prod(image_shape) // mesh.size}


def _prod(shape):
  out = 1
  for s in shape:
    out *= int(s)
  return out


# -------------------------------------------------------------------- analysis


def memory(compiled):
  """Bytes per chip from ``memory_analysis``, and what the chip holds during the step.

  ``peak_bytes`` = arguments + outputs - aliased (the donated state) +
  temporaries, as MaxText's train_compile counts it; XLA's own
  ``peak_memory_in_bytes`` is kept beside it (on small TPU programs it can be
  below the temporaries).
  """
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def cost(compiled, lowered, num_devices):
  """Flops and bytes accessed per chip and per step, and where they come from.

  A TPU program reports them itself (per device). XLA:GPU's compiled programs
  have no cost analysis: flops then come from the lowered (global) program
  divided by the devices, bytes from the optimized per-device module, both
  by XLA's HloCostAnalysis run with the CPU client (a private JAX entry point,
  kept here in one place).
  """
  c = compiled.cost_analysis()
  if isinstance(c, list):
    c = c[0] if c else None
  if c:
    return {"flops_per_step": c.get("flops"), "bytes_accessed": c.get("bytes accessed"),
            "xla_optimal_seconds_raw": c.get("optimal_seconds"),
            "cost_source": "compiled.cost_analysis() (per device)"}
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top  (private; GPU only)
  client = jax.devices("cpu")[0].client
  module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
  global_cost = _jax.hlo_module_cost_analysis(client, module)
  optimized = _jax.hlo_module_cost_analysis(client, compiled.runtime_executable().hlo_modules()[0])
  return {"flops_per_step": global_cost.get("flops", 0) / num_devices,
          "bytes_accessed": optimized.get("bytes accessed"),
          "cost_source": "flops: lowered program / devices; bytes: optimized module "
                         "(XLA HloCostAnalysis on the CPU client)"}


def roofline(chip, flops, bytes_accessed, dtype, collective_bytes=0):
  """Step time from published peaks: max(flops / compute, bytes / HBM bandwidth).

  An estimate, not a measurement: it assumes the matrix units and HBM run at
  their datasheet peaks and ignores latency. ``with_collectives_s`` adds
  the collective bytes over the chip's interchip bandwidth (no overlap).
  """
  peak = chip.peak_flops_bf16 if dtype == "bfloat16" else chip.peak_flops
  compute = flops / peak if flops else 0.0
  mem = bytes_accessed / chip.hbm_bytes_per_s if bytes_accessed else 0.0
  step = max(compute, mem)
  out = {"compute_s": compute, "memory_s": mem, "step_s": step,
         "bound": "compute" if compute >= mem else "memory",
         "peak_flops_per_s": peak, "hbm_bytes_per_s": chip.hbm_bytes_per_s}
  if chip.ici_bytes_per_s:
    out["with_collectives_s"] = step + collective_bytes / chip.ici_bytes_per_s
  return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# One HLO instruction: %name = SHAPE opcode(operands), attributes.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<shape>.*?) (?P<op>[\w\-]+)\("
                    r"(?P<operands>[^)]*)\)(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) \(.*\{\s*$")


def _bytes_of(shape_text):
  total = 0
  for dtype, dims in _SHAPE.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _dims(shape_text):
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(shape_text)]


def _group_size(rest, num_devices):
  """Devices per replica group, from the three syntaxes compiled HLO uses."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    group = 1
    for axis in re.findall(r"'(\w+)'", m.group(2)):
      group *= int(sizes.get(axis, 1))
    return group
  return 2 if "source_target_pairs" in rest else num_devices


def collectives(hlo_text, num_devices, head_dim=None, global_batch=None):
  """The collectives of a compiled (per-device) HLO module.

  Returns (summary, ops): per kind the count and the bytes each device sends
  (``operand_bytes``) and ends with (``result_bytes``), and how many sit in
  a while loop's body (they run once per iteration, not once per step); and
  every op with its shapes, group size, the JAX op it came from (``op_name``
  metadata, where the compiler kept it) and its role: the loss's gather of
  the projections (a result of 2B rows of the head's width: every chip sees
  the global batch), BatchNorm statistics, the combined gradient all-reduce.
  Async pairs count once; an all-reduce inside an all-reduce-scatter fusion
  counts as the reduce-scatter it is.
  """
  shapes, ops, computation = {}, [], ""
  loop_bodies = set(re.findall(r" while\(.*?body=%([\w.\-]+)", hlo_text))
  global_rows = {2 * global_batch} if global_batch else set()
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      computation = c.group("name")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shapes[m.group("name")] = m.group("shape")
    op = m.group("op")
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES:
      continue
    if kind == "all-reduce" and "all-reduce-scatter" in computation:
      kind = "reduce-scatter"
    rest = m.group("rest")
    operands = [o.strip().lstrip("%") for o in re.sub(r"/\*.*?\*/", "", m.group("operands"))
                .split(",") if o.strip()]
    operand_bytes = sum(_bytes_of(shapes.get(o, "")) for o in operands)
    group = _group_size(rest, num_devices)
    result_bytes = {"all-gather": operand_bytes * group,
                    "reduce-scatter": operand_bytes // max(group, 1)}.get(kind, operand_bytes)
    name = re.search(r'op_name="([^"]*)"', rest)
    op_name = name.group(1) if name else ""
    ops.append({"kind": kind, "result": m.group("shape")[:200], "operand_bytes": operand_bytes,
                "result_bytes": result_bytes, "group": group, "op_name": op_name,
                "in_while_loop": computation in loop_bodies,
                "role": _role(kind, op_name, _dims(m.group("shape")), head_dim, global_rows,
                              len(operands))})
  summary = {}
  for kind in COLLECTIVES:
    mine = [o for o in ops if o["kind"] == kind]
    summary[kind] = {"count": len(mine),
                     "operand_bytes": sum(o["operand_bytes"] for o in mine),
                     "result_bytes": sum(o["result_bytes"] for o in mine),
                     "in_while_loops": sum(o["in_while_loop"] for o in mine)}
  return summary, ops


def _role(kind, op_name, result_dims, head_dim, global_rows, num_operands):
  if kind == "all-reduce" and num_operands > 8:
    return "gradients (combined all-reduce)"
  parts = op_name.split("/")
  if any(p.startswith("bn") or p.endswith("_bn") or "batchnorm" in p.lower() for p in parts):
    return "batchnorm " + ("backward" if "transpose(" in op_name else "forward")
  # The loss gathers the projections of the global batch: a result with B
  # (one view) or 2B (both) rows of the head's width, singleton axes aside. An
  # all-gather is the forward gather; an all-reduce or reduce-scatter of that
  # shape is its gradient (or, at a few rows per chip, a gather that XLA does
  # as an all-reduce of a zero-padded buffer).
  rows = global_rows | {r // 2 for r in global_rows}
  squeezed = [tuple(x for x in d if x != 1) for d in result_dims]
  if head_dim and any(len(d) == 2 and d[1] == head_dim and d[0] in rows for d in squeezed):
    if kind == "all-gather":
      return "loss: projections of the global batch gathered"
    if kind in ("all-reduce", "reduce-scatter"):
      return "loss: projections of the global batch (gradient, or padded gather)"
  if not op_name:
    return "unnamed"
  return "other backward" if "transpose(" in op_name else "other"


_OOM = re.compile(r"\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)")


def out_of_memory(error):
  """(bytes needed, bytes available) from a TPU compiler's RESOURCE_EXHAUSTED message, or None."""
  m = _OOM.search(error or "")
  if not m:
    return None
  unit = {"G": GIB, "M": 1 << 20, "K": 1 << 10}
  return float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]
