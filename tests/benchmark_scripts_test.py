"""Smoke tests of scripts/benchmark_train.py and scripts/benchmark_scaling.py in --quick mode.

Both scripts run at once, each in its own subprocess (they start further
subprocesses per case), with tiny models; the test checks that their JSON has
every field, positive where it must be, and that the loss of the train step
agrees between one and two devices.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark_train  # noqa: E402  pylint: disable=g-import-not-at-top


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices would only slow the train script down
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  train_out, scaling_out = tmp / "train.json", tmp / "scaling.json"
  procs = [
      subprocess.Popen([sys.executable, "scripts/benchmark_train.py", "--quick",
                        "--peak_flops=1e11", f"--out={train_out}"],
                       cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True),
      subprocess.Popen([sys.executable, "scripts/benchmark_scaling.py", "--quick", "--devices=1,2",
                        f"--out={scaling_out}"],
                       cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True),
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  return (json.loads(train_out.read_text()), outputs[0],
          json.loads(scaling_out.read_text()), outputs[1])


def test_train_json_fields(results):
  data, stdout, _, _ = results
  assert data["backend"] == "cpu" and data["epoch_images"] == 50_000
  (row,) = data["rows"]
  assert "error" not in row, row
  for field in ("compile_s", "step_s", "steps_per_s", "images_per_s", "s_per_epoch",
                "flops_per_step_per_device", "flops_per_image", "peak_flops_per_device", "mfu",
                "peak_bytes", "xla_temp_bytes", "params"):
    assert row[field] > 0, (field, row[field])
  assert row["loss_finite"] and math.isfinite(row["final_loss"])
  assert row["batch_size"] == 16 and row["model"] == "resnet_tiny"
  assert len(row["window_step_s"]) == 2
  # The derived figures follow from the measured step time.
  assert row["images_per_s"] == pytest.approx(16 / row["step_s"])
  assert row["s_per_epoch"] == pytest.approx((50_000 // 16) * row["step_s"])
  assert row["mfu"] == pytest.approx(row["flops_per_step_per_device"] / row["step_s"] / 1e11)
  assert "common_resnet_tiny_b16_8px_float32" in stdout  # the printed table


def test_scaling_json_fields_and_agreement(results):
  _, _, data, stdout = results
  rows = data["rows"]
  assert [r["num_devices"] for r in rows] == [1, 2]
  for r in rows:
    assert "error" not in r, r
    assert r["jax_device_count"] == r["num_devices"]  # the subprocess really had N devices
    assert r["images_per_s"] > 0 and r["step_s"] > 0 and r["compile_s"] > 0
    assert len(r["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["losses"])
    assert r["bad_step"] == -1
  # Same seed, global batch: the losses agree up to reduction order.
  assert data["max_rel_loss_diff"] < 1e-4
  assert rows[1]["losses"] != [] and "max relative loss difference" in stdout


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 495e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("cpu", "float32", None),
])
def test_peak_flops_by_device_kind(kind, dtype, expected):
  assert benchmark_train.peak_flops_for(kind, dtype) == expected
  assert benchmark_train.peak_flops_for(kind, dtype, override=5e12) == 5e12


def test_bad_flags_are_reported():
  with pytest.raises(ValueError, match="--batch_sizes"):
    benchmark_train._ints("256,abc", "--batch_sizes")  # pylint: disable=protected-access
  with pytest.raises(SystemExit):
    benchmark_train.parse_args(["--steps=0"])
  proc = subprocess.run([sys.executable, "scripts/benchmark_scaling.py", "--devices=1,3",
                         "--batch_size=16"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 2 and "not divisible" in proc.stderr
