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


class _NoTensorFlow:
  """A meta-path finder for which TensorFlow is not installed."""

  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
    return None


@pytest.fixture
def without_tensorflow(monkeypatch):
  """Runs the test as if TensorFlow were not installed (as in CI), whether it is or not.

  ``import tensorflow`` raises ModuleNotFoundError; an already imported
  TensorFlow leaves sys.modules for the test, so that TFDS, which checks
  sys.modules for it, takes its TensorFlow-free paths.
  """
  monkeypatch.setattr(sys, "meta_path", [_NoTensorFlow()] + sys.meta_path)
  monkeypatch.delitem(sys.modules, "tensorflow", raising=False)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted ``jaxembed train --config digits:smoke``.

  Run from a directory outside the checkout, on the machine's real devices. The reference
  of the resume tests of several modules, trained once per session: read it, or copy it
  before changing anything.
  """
  outside = tmp_path_factory.mktemp("smoke")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # not the 8 fake devices of the tests
  code = "import sys; from jaxembed import main; sys.exit(main.main(['jaxembed'] + sys.argv[1:]))"
  first = subprocess.run([sys.executable, "-c", code, "train", "--config", "digits:smoke",
                          "--workdir", "run"], cwd=outside, env=env, capture_output=True,
                         text=True, timeout=600)
  return outside / "run", first