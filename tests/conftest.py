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


@pytest.fixture
def lax_map_lengths(monkeypatch):
  """The length of every ``jax.lax.map`` traced during the test, in order.

  Shows whether jaxembed.augment took its per-image scan (and over how many
  views) rather than the vmap.
  """
  import jax  # pylint: disable=g-import-not-at-top

  lengths = []
  real_map = jax.lax.map

  def spy_map(f, xs, **kw):
    lengths.append(xs.shape[0])
    return real_map(f, xs, **kw)

  monkeypatch.setattr(jax.lax, "map", spy_map)
  return lengths
