"""Time and quality of the `cpu` config variants, whose stages have fixed lengths in steps.

Trains, side by side (one ``jaxembed train`` process each, started together):
  * ``medmnist:breastmnist,cpu`` on ../shared/data/breastmnist.npz (624 training images);
  * ``fashion_mnist:cpu`` on 10,000 training images of Fashion-MNIST
    (``apt-get install dataset-fashion-mnist``; data.max_examples=10000 per split).
Each run's wall time, the trainer's early "Expected duration" line, its measured images/s,
the final kNN accuracy and silhouette (DESIGN.md 3c) and the machine's load average go to
scripts/results/benchmark_cpu_variant.json. The two runs share the machine's cores (and, on
the shared 2-core VM, other people's jobs): the wall times are what a user would see in that
situation, not the uncontended speed.

  python scripts/benchmark_cpu_variant.py [--steps 100,100,300] [--out PATH]
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import results_io

BREAST = os.path.join(results_io.ROOT, "..", "shared", "data", "breastmnist.npz")
FASHION = "/usr/share/datasets/fashion-mnist"


def run_side_by_side(runs, timeout):
  """Starts ``jaxembed train`` for every (name, args) of ``runs`` at once; waits for all.

  Returns {name: {"seconds", "returncode", "expected_duration", "metrics", "workdir"}}.
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the machine's real devices
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  root = tempfile.mkdtemp(prefix="bench_")
  procs = {}
  for name, args in runs:
    workdir = os.path.join(root, name)
    log = open(os.path.join(root, f"{name}.log"), "w")  # pylint: disable=consider-using-with
    cmd = [sys.executable, "-m", "jaxembed.train", "--workdir", workdir, *args]
    procs[name] = (subprocess.Popen(cmd, cwd=results_io.ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT), time.time(), workdir, log, cmd)
  out = {}
  for name, (proc, start, workdir, log, cmd) in procs.items():
    try:
      code = proc.wait(timeout=max(timeout - (time.time() - start), 1))
    except subprocess.TimeoutExpired:
      proc.terminate()
      code = proc.wait()
    seconds = time.time() - start
    log.close()
    with open(log.name) as f:
      text = f.read()
    expected = re.search(r"^Expected duration: .*$", text, re.M)
    metrics_path = os.path.join(workdir, "metrics.json")
    metrics = None
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        metrics = json.load(f)
    out[name] = {"command": " ".join(["jaxembed train", *cmd[3:]]), "returncode": code,
                 "seconds": round(seconds, 1),
                 "expected_duration_line": expected.group(0) if expected else None,
                 "metrics": metrics, "workdir": workdir,
                 "log_tail": text.strip().splitlines()[-3:] if code else None}
    print(f"{name}: exit {code}, {seconds:.0f} s; "
          + (f"kNN {metrics.get('knn_accuracy'):.3f}, silhouette {metrics.get('silhouette'):.3f}"
             if metrics else "no metrics"), flush=True)
  return out


def summary(result):
  """The figures of one run for the table: seconds, kNN, silhouette, steps, images/s."""
  m = result["metrics"] or {}
  ips = None
  if result["expected_duration_line"]:
    found = re.search(r"at ([\d,]+) images/s", result["expected_duration_line"])
    ips = int(found.group(1).replace(",", "")) if found else None
  return {"seconds": result["seconds"], "knn_accuracy": m.get("knn_accuracy"),
          "silhouette": m.get("silhouette"), "steps": m.get("steps"),
          "images_per_second_first_steps": ips,
          "stages": [{k: s.get(k) for k in ("knn_accuracy", "silhouette")}
                     for s in m.get("stages", [])]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", default=None,
                      help="stage steps, e.g. 100,100,300 (default: the variants' own)")
  parser.add_argument("--timeout", type=float, default=3600)
  parser.add_argument("--out", default=os.path.join(results_io.ROOT, "scripts", "results",
                                                    "benchmark_cpu_variant.json"))
  args = parser.parse_args()
  extra = []
  if args.steps:
    steps = [int(x) for x in args.steps.split(",")]
    # The variants warm up for 20 steps (a fifth of stage 1); shorter stages for a fifth.
    warmup = [min(20, s // 5) if i != 1 else 0 for i, s in enumerate(steps)]
    extra = [f"--config.stages.steps=({args.steps})",
             f"--config.stages.warmup_steps=({','.join(map(str, warmup))})"]
  runs = [
      ("breastmnist", ["--config", "medmnist:breastmnist,cpu",
                       f"--config.data.path={os.path.abspath(BREAST)}", *extra]),
      ("fashion_mnist_10k", ["--config", "fashion_mnist:cpu", f"--config.data.path={FASHION}",
                             "--config.data.max_examples=10000", *extra]),
  ]
  load_before = os.getloadavg()
  results = run_side_by_side(runs, args.timeout)
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                 "(shared VM; the runs ran side by side)",
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()],
      "summary": {name: summary(r) for name, r in results.items()},
      "runs": results,
  }
  results_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
