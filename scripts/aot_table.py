"""Markdown tables of scripts/aot_compile.py's rows (docs/BENCHMARKS.md, "Compiled for, not run on").

  python scripts/aot_table.py scripts/results/aot_tpu.json scripts/results/aot_gpu.json

Prints one row per compiled program (memory per chip against HBM, roofline
step and epoch estimates, the loss's gather), the largest batches found, and
the scaling efficiency that the estimates imply at a fixed batch per chip:
images per second per chip on N chips over that on the fewest chips.
"""

import json
import sys

GIB = 1 << 30


def load(paths):
  rows = []
  for p in paths:
    with open(p) as f:
      rows += json.load(f)
  return rows


def fmt_s(seconds):
  if seconds is None:
    return "-"
  return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def programs(rows):
  print("| target | chips / hosts | model, px | step | global batch (per chip) | compile s (CPU s) "
        "| peak GiB / HBM GiB per chip | GFLOP / GB per chip per step | roofline step "
        "(+ collectives) | est. epoch CIFAR-10 / ImageNet-1k | loss all-gathers, result per chip "
        "| BatchNorm all-reduces fwd / bwd, sent per chip |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "max_global_batch" in r or r.get("search") or not r.get("compiled"):
      continue
    rl = r.get("roofline", {})
    print(f"| {r['topology']} | {r['chips']} / {r['hosts']} | {r['model']}, {r['image_size']} "
          f"| {r['step']} | {r['global_batch']:,} ({r['per_chip_batch']:,}) "
          f"| {r['compile_s']:.0f} ({r['compile_cpu_s']:.0f}) "
          f"| {r['peak_bytes_per_chip'] / GIB:.2f} / {r['hbm_bytes_per_chip'] / GIB:.1f} "
          f"| {r['flops_per_step'] / 1e9:,.0f} / {r['bytes_accessed'] / 1e9:.1f} "
          f"| {fmt_s(rl.get('step_s'))} ({fmt_s(rl.get('with_collectives_s'))}) "
          f"| {fmt_s(r.get('est_epoch_s', {}).get('50000'))} / "
          f"{fmt_s(r.get('est_epoch_s', {}).get('1281167'))} | {gathered(r)} | {batchnorm(r)} |")


def gathered(row):
  """The loss's all-gathers of the global batch: count, and MiB each chip ends with."""
  gather = [g for g in row.get("loss_gather", []) if g["kind"] == "all-gather"]
  if gather:
    return f"{len(gather)}, {sum(g['result_bytes'] for g in gather) / 2**20:.2f} MiB"
  # Rows read back from a log lack the op list; the roles hold the bytes each chip sends.
  role = row.get("collective_roles", {}).get("loss: projections of the global batch gathered")
  if role and "loss_gather" not in row:
    return f"{role['count']}, {role['operand_bytes'] * row['chips'] / 2**20:.2f} MiB"
  return "-"


def batchnorm(row):
  """BatchNorm's all-reduces (forward / backward) and the KiB each chip sends in them."""
  roles = row.get("collective_roles", {})
  fwd, bwd = (roles.get(f"batchnorm {k}", {"count": 0, "operand_bytes": 0})
              for k in ("forward", "backward"))
  if not fwd["count"] + bwd["count"]:
    return "-"
  return (f"{fwd['count']} / {bwd['count']}, "
          f"{(fwd['operand_bytes'] + bwd['operand_bytes']) / 1024:.0f} KiB")


def largest(rows):
  print("\n| target | model, px | largest stage-1 batch that fits (per chip) | smallest that "
        "does not | limited by | compiles |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    if "max_global_batch" not in r:
      continue
    best = r["max_global_batch"]
    print(f"| {r['topology']} | {r['model']}, {r['image_size']} "
          f"| {best:,} ({r['per_chip_batch']:,}) | "
          f"{r['smallest_failing_batch'] or '-'} | {r['limited_by']} | {len(r['compiles'])} |"
          if best else f"| {r['topology']} | {r['model']} | none | - | - | {len(r['compiles'])} |")


def scaling(rows):
  """Images/s per chip at a fixed batch per chip, relative to the fewest chips (stage 1)."""
  by_per_chip = {}
  for r in rows:
    if (r.get("step") == "stage1" and r.get("compiled") and not r.get("search")
        and r["model"] == "resnet18" and r["platform"] == "tpu"
        and r["device_kind"] == "TPU v5 lite"):
      by_per_chip.setdefault(r["per_chip_batch"], {})[r["chips"]] = r
  print("\n| batch per chip | chips | roofline step | images/s per chip | efficiency | with "
        "collectives: step | efficiency |")
  print("|---|---|---|---|---|---|---|")
  for per_chip, got in sorted(by_per_chip.items()):
    if len(got) < 2:
      continue
    base = got[min(got)]
    for chips in sorted(got):
      r = got[chips]
      step, comm = r["roofline"]["step_s"], r["roofline"].get("with_collectives_s")
      eff = base["roofline"]["step_s"] / step
      eff_c = base["roofline"]["with_collectives_s"] / comm if comm else None
      print(f"| {per_chip} | {chips} | {fmt_s(step)} | {per_chip / step:,.0f} | {eff:.2f} "
            f"| {fmt_s(comm)} | {'-' if eff_c is None else f'{eff_c:.2f}'} |")


def main(paths):
  rows = load(paths)
  programs(rows)
  largest(rows)
  scaling(rows)


if __name__ == "__main__":
  main(sys.argv[1:])
