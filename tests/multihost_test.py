"""Two processes on 127.0.0.1 with 4 CPU devices each against one process with 8 devices.

Each test launches the processes of a 2-process run (jax.distributed over
a local coordinator) and compares their results with the same computation
in one process: the loss and its gradients (tests/multihost_worker.py), and
a short ``python -m jaxembed.train`` run, whose final parameters are read
back from both workdirs with ``runs.load_trained``. Sums over devices are
grouped differently in the two layouts, so results agree to rounding, not
bit for bit.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from jaxembed import losses
from jaxembed import parallel
from jaxembed import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import multihost_worker  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# The paper's stage-3 learning rate (lr / 1000): the smoke preset's lr / 2
# makes the first stage-3 steps so sensitive that float32 rounding
# differences of 1e-7 grow to 1e-3 within four steps, in any two layouts.
# The digits default trains with AdamW, whose normalised steps also blow up
# rounding differences of near-zero gradients; the reference SGD is used here.
TRAIN_ARGS = ["--config", "configs/digits.py:smoke", "--config.stages.lr_scale=(1.0,1.0,0.001)",
              "--config.optimizer.name=sgd", "--config.optimizer.base_lr=0.03",
              "--config.optimizer.weight_decay=0.0005",
              "--config.data.max_examples=128", "--config.outputs.plots=False"]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices, process_id=None, port=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXEMBED_")}
  # Exactly this many fake CPU devices: not the parent's flag for 8.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  if process_id is not None:
    env.update(JAXEMBED_COORDINATOR=f"127.0.0.1:{port}", JAXEMBED_NUM_PROCESSES="2",
               JAXEMBED_PROCESS_ID=str(process_id))
  return env


def run_processes(args, num_processes, timeout=240):
  """Runs ``num_processes`` copies of ``python args`` (2: a distributed run); waits for all."""
  port = free_port()
  devices = 8 // num_processes
  procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=child_env(devices, i if num_processes > 1 else None, port))
           for i in range(num_processes)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:  # a process left waiting for its peer would hang forever
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], outputs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_compute_the_loss_and_gradients_of_one(tmp_path):
  out = tmp_path / "two.npz"
  codes, logs = run_processes([WORKER, "loss", str(out)], 2)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  got = np.load(out)
  assert int(got["process_count"]) == 2 and int(got["device_count"]) == 8

  # The reference: this process, 8 devices, the same global batch.
  assert jax.device_count() == 8
  mesh = parallel.make_mesh()
  z1, z2 = (parallel.global_from_full(mesh, z) for z in multihost_worker.global_batch())
  for name, fn in [("cauchy", losses.cauchy_infonce),
                   ("cosine", lambda a, b: losses.cosine_infonce(a, b, 0.5))]:
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z1, z2)
    for variant in (name, name + "_sharded"):
      assert float(got[variant]) == pytest.approx(float(value), rel=1e-5), variant
      for i, g in enumerate(grads, 1):
        g = np.asarray(g)
        np.testing.assert_allclose(got[f"{variant}_grad{i}"], g, rtol=1e-5,
                                   atol=1e-5 * np.abs(g).max(), err_msg=variant)


def flat_params(workdir):
  _, variables, _, step = runs.load_trained(str(workdir))
  leaves = jax.tree.leaves(variables["params"])
  return step, np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_training_ends_with_the_parameters_of_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  codes, logs = run_processes(["-m", "jaxembed.train", *TRAIN_ARGS, "--workdir", str(one)], 1)
  assert codes == [0], logs[0][-3000:]
  codes, logs = run_processes(["-m", "jaxembed.train", *TRAIN_ARGS, "--workdir", str(two)], 2)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

  # Only process 0 writes the run's files.
  assert (two / "metrics.json").is_file() and (two / "embeddings.npz").is_file()
  assert "Outputs in" in logs[0] and "Outputs in" not in logs[1]
  step_one, want = flat_params(one)
  step_two, got = flat_params(two)
  assert step_one == step_two > 0
  # Relative to the whole parameter vector (tiny BatchNorm biases of 1e-3
  # carry absolute rounding of 1e-9, relatively large on their own).
  assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
  assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
  a, b = np.load(one / "embeddings.npz"), np.load(two / "embeddings.npz")
  np.testing.assert_allclose(b["embedding"], a["embedding"], rtol=0,
                             atol=1e-5 * np.abs(a["embedding"]).max())

  # A preempted slice that comes back in another shape: the two-process run's
  # checkpoint at the end of stage 1 (2 processes x 4 devices) resumes in ONE
  # process with 4 devices and trains on with the same global batch to the
  # same parameters, up to the rounding of sums grouped over other devices.
  moved = tmp_path / "moved"
  shutil.copytree(two, moved)
  step = rewind(moved)
  proc = subprocess.run([sys.executable, "-m", "jaxembed.train", *TRAIN_ARGS, "--workdir",
                         str(moved)], cwd=REPO, env=child_env(4), capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {step} (stage 1)" in proc.stdout
  step_moved, got = flat_params(moved)
  assert step_moved == step_one
  assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
  assert json.loads((moved / "config.json").read_text())["batch_size"] == json.loads(
      (two / "config.json").read_text())["batch_size"]


def rewind(workdir):
  """Turns a finished workdir back into one stopped at its first checkpoint; returns its step."""
  ckpt = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  for s in steps[1:]:
    shutil.rmtree(ckpt / str(s))
  for name in ("metrics.json", "embeddings.npz", "embeddings.csv", "stage_metrics.json"):
    (workdir / name).unlink(missing_ok=True)
  return steps[0]


def make_folder(root, n_per_class=25):
  """Two class folders of small random RGB PNGs (odd counts: unequal shares)."""
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n_per_class):
      Image.fromarray(rng.integers(0, 256, (10, 10, 3)).astype(np.uint8)).save(
          root / c / f"{i}.png")
  return root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streamed_processes_each_hold_only_their_rows_and_train_as_one(tmp_path):
  # data.streaming from a folder: no process loads the whole dataset; each
  # holds a contiguous share of each split for its part of the statistics and
  # of the evaluation. Two such processes end with the parameters and map of
  # one process holding everything.
  folder = make_folder(tmp_path / "images")
  args = ["-m", "jaxembed.train", "--config", "configs/digits.py:smoke",
          "--config.data.source=folder", f"--config.data.path={folder}",
          "--config.data.max_examples=1000", "--config.data.test_fraction=0.2",
          "--config.data.streaming=True", "--config.batch_size=16",
          "--config.stages.lr_scale=(1.0,1.0,0.001)", "--config.optimizer.name=sgd",
          "--config.optimizer.base_lr=0.03", "--config.outputs.plots=False",
          "--config.aug.preset=none", "--config.aug.grayscale_p=0.5"]
  one, two = tmp_path / "one", tmp_path / "two"
  codes, logs = run_processes([*args, "--workdir", str(one)], 1)
  assert codes == [0], logs[0][-3000:]
  codes, logs = run_processes([*args, "--workdir", str(two)], 2)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  # 50 images: 40 train (stratified 80/20), 10 test; each process reads half of each split.
  assert "Process 0 of 2 holds training images 0-19 of 40 and test images 0-4 of 10" in logs[0]
  assert "Process 1 of 2 holds training images 20-39 of 40 and test images 5-9 of 10" in logs[1]
  step_one, want = flat_params(one)
  step_two, got = flat_params(two)
  assert step_one == step_two > 0
  assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
  a, b = np.load(one / "embeddings.npz"), np.load(two / "embeddings.npz")
  np.testing.assert_array_equal(b["ids"], a["ids"])
  np.testing.assert_allclose(b["embedding"], a["embedding"], rtol=0,
                             atol=1e-5 * np.abs(a["embedding"]).max())
  config_one = json.loads((one / "config.json").read_text())
  config_two = json.loads((two / "config.json").read_text())
  # The statistics summed over the processes equal one process's, exactly.
  assert config_two["run"]["data_stats"] == config_one["run"]["data_stats"]
  assert config_two["run"]["data_hash"] == config_one["run"]["data_hash"]
