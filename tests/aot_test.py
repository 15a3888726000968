"""Compiling the trainer's real steps for a TPU slice this machine does not have (jaxembed.aot).

libtpu gives compile-only TPU devices (``pip install "jax[tpu]==<jax version>"``;
.ci/run installs it); the tests skip cleanly without it.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from jaxembed.configs import digits
from jaxembed import aot
from jaxembed import parallel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install jax[tpu])")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (8, 8, 1)
NUM_IMAGES = 256
# A 4-D operand of a dot_general: cpu_conv's products (einsum "nhwc,co->nhwo").
DOT_ON_4D = re.compile(r"stablehlo\.dot_general[^\n]*tensor<\d+x\d+x\d+x\d+x")


@pytest.fixture(scope="module")
def v5e_2x2():
  # libtpu reads these when it loads (the first target); the other tests'
  # subprocesses must not inherit them.
  saved, platforms = dict(os.environ), jax.config.jax_platforms
  aot.prepare_environment()
  try:
    tgt = aot.target("v5e:2x2")
    aot.target("v5e:4x4")
  finally:
    os.environ.clear()
    os.environ.update(saved)
    jax.config.update("jax_platforms", platforms)
  return tgt, parallel.make_mesh(devices=tgt.devices)


def test_prepare_environment_keeps_jax_on_the_cpu_though_jax_is_imported_first():
  # jaxembed.aot imports JAX before prepare_environment runs, so JAX_PLATFORMS
  # alone would come too late; without a platform JAX tries every backend
  # (and the CUDA plugin stops where the CUDA runtime is missing).
  code = ("import jax; from jaxembed import aot; aot.prepare_environment(); "
          "print(jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                     env=dict(env, PYTHONPATH=REPO), timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["cpu", "cpu"]


def smoke(num_devices):
  return aot.abstract_config(digits.get_config("smoke"), None, num_devices, IMAGE_SHAPE)


def test_the_target_is_a_tpu_slice(v5e_2x2):
  tgt, mesh = v5e_2x2
  assert tgt.chips == 4 and tgt.hosts == 1 and tgt.chip.name == "v5e"
  assert {d.device_kind for d in tgt.devices} == {"TPU v5 lite"}
  assert parallel.platform(mesh) == "tpu" and not parallel.uses_cpu_paths(mesh)
  with_hosts = aot.target("v5e:4x4")
  assert with_hosts.chips == 16 and with_hosts.hosts == 4  # four chips per v5e host


def test_tpu_step_has_ordinary_convolutions_and_the_cpu_step_does_not(v5e_2x2):
  # The same trainer code, lowered for the TPU slice and for this machine's
  # CPU devices: only the CPU program carries the convolution workaround
  # (matrix products of 4-D slices in place of filter gradients).
  _, mesh = v5e_2x2
  config, stages = smoke(4)
  tpu, _ = aot.lower_train_step(config, stages, 0, mesh, NUM_IMAGES, IMAGE_SHAPE)
  cpu, _ = aot.lower_train_step(config, stages, 0, parallel.make_mesh(4), NUM_IMAGES, IMAGE_SHAPE)
  tpu, cpu = tpu.as_text(), cpu.as_text()
  assert not DOT_ON_4D.search(tpu)
  assert DOT_ON_4D.search(cpu)
  # 6 convolutions: each a forward and a filter gradient, all but the first an input gradient.
  assert tpu.count("stablehlo.convolution") == 3 * 6 - 1
  assert cpu.count("stablehlo.convolution") < tpu.count("stablehlo.convolution")


def test_compiled_step_reports_memory_cost_and_global_negatives(v5e_2x2):
  tgt, mesh = v5e_2x2
  config, stages = smoke(4)
  lowered, info = aot.lower_train_step(config, stages, 0, mesh, NUM_IMAGES, IMAGE_SHAPE)
  compiled = lowered.compile()
  mem = aot.memory(compiled)
  assert mem["argument_size_in_bytes"] > NUM_IMAGES * 8 * 8  # the replicated images are in it
  assert mem["temp_size_in_bytes"] > 0 and mem["peak_bytes"] < tgt.usable_bytes
  assert aot.cost(compiled, lowered, 4)["flops_per_step"] > 0
  b, head = info["global_batch"], info["head_dim"]
  summary, ops = aot.collectives(compiled.as_text(), 4, head, b)
  # The loss sees the global batch: each view's projections are all-gathered
  # from 8 rows per chip to all B rows, over every chip.
  gathers = [o for o in ops if o["role"] == "loss: projections of the global batch gathered"]
  assert len(gathers) == 2 and all(o["group"] == 4 for o in gathers)
  assert all(o["result_bytes"] == b * head * 4 for o in gathers)
  # BatchNorm statistics are global: all-reduced over all chips, forward and backward.
  bn = [o for o in ops if o["role"].startswith("batchnorm")]
  assert bn and all(o["group"] == 4 and o["kind"] == "all-reduce" for o in bn)
  assert {o["role"] for o in bn} == {"batchnorm forward", "batchnorm backward"}
  # No collective inside a loop (one per row block of the loss would be).
  assert all(v["in_while_loops"] == 0 for v in summary.values())


def test_stage3_and_embedding_steps_compile(v5e_2x2):
  _, mesh = v5e_2x2
  config, stages = smoke(4)
  lowered, info = aot.lower_train_step(config, stages, 2, mesh, NUM_IMAGES, IMAGE_SHAPE)
  assert info["head_dim"] == 2 and lowered.compile() is not None
  lowered, info = aot.lower_embed_step(config, stages, mesh, IMAGE_SHAPE)
  assert info["global_batch"] % 4 == 0 and lowered.compile() is not None


def test_out_of_memory_is_read_from_the_compiler_message():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (16.87G) exceeds available HBM (15.75G).")
  need, have = aot.out_of_memory(msg)
  assert need == pytest.approx(16.87 * 2**30) and have == pytest.approx(15.75 * 2**30)
  assert aot.out_of_memory("something else") is None


def run_script(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "aot_compile.py"), *args],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_script_writes_rows_and_reports_bad_input_in_one_line(tmp_path):
  out = tmp_path / "a.json"
  r = run_script("--config", "configs/digits.py:smoke", "--topology", "v5e:2x2",
                 "--steps", "stage1", "--out", str(out))
  assert r.returncode == 0, r.stderr[-2000:]
  (row,) = json.loads(out.read_text())
  assert row["compiled"] and row["chips"] == 4 and row["hosts"] == 1
  assert row["platform"] == "tpu" and row["device_kind"] == "TPU v5 lite"
  assert row["per_chip_batch"] * 4 == row["global_batch"]
  assert 0 < row["peak_bytes_per_chip"] < row["hbm_bytes_per_chip"]
  assert row["flops_per_step"] > 0 and row["cost_model_step_s"] > 0
  assert set(row["est_epoch_s"]) == {"50000", "1281167"}
  assert row["loss_gather"] and row["collectives"]["all-gather"]["count"] >= 2
  for args, message in [(("--topology", "v9x:2x2"), "unknown target 'v9x:2x2'"),
                        (("--topology", "v5e:2x2", "--batch_size", "30"),
                         "does not split over the 4 devices")]:
    r = run_script("--config", "configs/digits.py:smoke", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
