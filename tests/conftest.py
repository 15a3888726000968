"""Test set-up: eight fake CPU devices, so that sharding code runs as on a pod.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os
import pathlib
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_data():
  """Path of ../shared/data; skips the test where it is absent."""
  path = SHARED / "data"
  if not path.is_dir():
    pytest.skip("../shared/data is not present")
  return path


@pytest.fixture
def shared_fixtures():
  """Path of ../shared/fixtures; skips the test where it is absent."""
  path = SHARED / "fixtures"
  if not path.is_dir():
    pytest.skip("../shared/fixtures is not present")
  return path


REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_train(*args, timeout=600):
  """``python -m jaxembed.train ARGS`` on the machine's real devices; the CompletedProcess."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # not the 8 fake devices of the tests
  return subprocess.run([sys.executable, "-m", "jaxembed.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted ``digits.py:smoke`` training run.

  The reference of the resume tests of several modules, trained once per session: read it,
  or copy it before changing anything.
  """
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  return workdir, _run_train("--config", "configs/digits.py:smoke", "--workdir", str(workdir))
