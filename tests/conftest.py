"""Test set-up: eight fake CPU devices, so that sharding code runs as on a pod.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os
import pathlib

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
