"""A frozen imported backbone versus fine-tuning everything: quality and wall time, side by side.

Both runs start from torchvision's ImageNet ResNet-18 (../shared/fixtures/resnet18.safetensors,
imported with model.pretrained; docs/pretrained.md) in the ``images`` config (64 px, 3
channels, ImageNet stem and normalisation, the medical augmentation) on BreastMNIST
(../shared/data/breastmnist.npz, medmnist source: 624 training, 156 test images; 28 px
upsampled to --image-size), with the paper's stages and optimiser on a short schedule in steps:
  * ``images:medical,frozen``: the backbone's weights never train (projector only);
  * ``images:medical``: every parameter trains in stages 1 and 3 (the paper's recipe).
The two ``jaxembed train`` processes start together and share the cores; each one's wall
time, first-steps images/s, and final kNN accuracy and silhouette (DESIGN.md 3c) go to
scripts/results/benchmark_frozen.json, with the ratio of the wall times.

  python scripts/benchmark_frozen.py [--steps 40,20,40] [--batch 64] [--image-size 64] [--out PATH]
"""

import argparse
import datetime
import os
import platform

import benchmark_cpu_variant
import results_io

BREAST = os.path.join(results_io.ROOT, "..", "shared", "data", "breastmnist.npz")
WEIGHTS = os.path.join(results_io.ROOT, "..", "shared", "fixtures", "resnet18.safetensors")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", default="40,20,40", help="optimiser steps of the three stages")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--timeout", type=float, default=3600)
  parser.add_argument("--out", default=os.path.join(results_io.ROOT, "scripts", "results",
                                                    "benchmark_frozen.json"))
  args = parser.parse_args()
  steps = tuple(int(s) for s in args.steps.split(","))
  warmup = tuple(max(s // 10, 1) if i != 1 else 0 for i, s in enumerate(steps))
  common = ["--config.data.source=medmnist", "--config.data.name=breastmnist",
            f"--config.data.path={os.path.abspath(BREAST)}",
            f"--config.model.pretrained={os.path.abspath(WEIGHTS)}",
            # ImageNet's statistics, which the imported network was trained with (the frozen
            # variant sets them too), so that only the trainable parts differ.
            "--config.model.input_mean=(0.485,0.456,0.406)",
            "--config.model.input_std=(0.229,0.224,0.225)",
            f"--config.batch_size={args.batch}", f"--config.data.image_size={args.image_size}",
            f"--config.stages.steps=({','.join(map(str, steps))})",
            f"--config.stages.warmup_steps=({','.join(map(str, warmup))})"]
  runs = [("frozen", ["--config", "images:medical,frozen", *common]),
          ("fine_tuned", ["--config", "images:medical", *common])]
  load_before = os.getloadavg()
  results = benchmark_cpu_variant.run_side_by_side(runs, args.timeout)
  summary = {name: benchmark_cpu_variant.summary(r) for name, r in results.items()}
  ratio = None
  if all(r["returncode"] == 0 for r in results.values()):
    ratio = round(summary["fine_tuned"]["seconds"] / summary["frozen"]["seconds"], 2)
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                 "(shared VM; the two runs ran side by side)",
      "steps": steps, "warmup_steps": warmup, "batch_size": args.batch,
      "image_size": args.image_size,
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()],
      "fine_tuned_over_frozen_seconds": ratio,
      "summary": summary,
      "runs": results,
  }
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
