"""Contrastive losses against a naive NumPy loop, finite differences, and across 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxembed import losses, parallel


def naive_infonce(z1, z2, sim):
  """Loop over the 2B anchors: -log(s(i, pos) / sum_{j != i} s(i, j)), averaged."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n, b = len(z), len(z1)
  total = 0.0
  for i in range(n):
    denom = sum(sim(z[i], z[j]) for j in range(n) if j != i)
    total += -np.log(sim(z[i], z[(i + b) % n]) / denom)
  return total / n


def cauchy(a, b):
  return 1.0 / (1.0 + np.sum((a - b) ** 2))


def cosine(tau):
  return lambda a, b: np.exp(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) / tau)


@pytest.mark.parametrize("d", [2, 16])
def test_cauchy_matches_naive_loop(d):
  rng = np.random.default_rng(d)
  z1, z2 = rng.normal(size=(7, d)) * 3, rng.normal(size=(7, d)) * 3
  got = float(losses.cauchy_infonce(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)))
  assert got == pytest.approx(naive_infonce(z1, z2, cauchy), rel=1e-5)


def test_cosine_matches_naive_loop():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  got = float(losses.cosine_infonce(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                    temperature=0.5))
  assert got == pytest.approx(naive_infonce(z1, z2, cosine(0.5)), rel=1e-5)


@pytest.mark.parametrize("loss", [losses.cauchy_infonce,
                                  lambda a, b: losses.cosine_infonce(a, b, 0.5)])
def test_gradient_matches_finite_differences(loss):
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  with jax.enable_x64(True):
    f = lambda a, b: loss(a, b)
    g1, g2 = jax.grad(f, argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
    eps = 1e-6
    for (which, i, j) in [(0, 0, 0), (0, 3, 2), (1, 1, 1), (1, 2, 0)]:
      zp = [z1.copy(), z2.copy()]
      zm = [z1.copy(), z2.copy()]
      zp[which][i, j] += eps
      zm[which][i, j] -= eps
      fd = (float(f(*map(jnp.asarray, zp))) - float(f(*map(jnp.asarray, zm)))) / (2 * eps)
      analytic = float((g1, g2)[which][i, j])
      assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_stable_for_far_identical_and_bf16_points():
  far = jnp.array([[0.0, 0.0], [1e4, 0.0], [0.0, -1e4]], jnp.float32)
  assert np.isfinite(float(losses.cauchy_infonce(far, far + 1.0)))
  same = jnp.ones((8, 2), jnp.float32)
  # All points identical: every similarity is 1, the loss is log(2B - 1).
  assert float(losses.cauchy_infonce(same, same)) == pytest.approx(np.log(15), rel=1e-6)
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(16, 2)) * 50, jnp.bfloat16)
  value, grad = jax.value_and_grad(lambda a: losses.cauchy_infonce(a, a + 1))(z)
  assert value.dtype == jnp.float32 and np.isfinite(float(value))
  assert np.isfinite(np.asarray(grad, np.float32)).all()
  big = jnp.asarray(rng.normal(size=(8, 4)) * 1e3, jnp.float32)
  assert np.isfinite(float(losses.cosine_infonce(big, big, 0.01)))


@pytest.mark.parametrize("loss", [losses.cauchy_infonce,
                                  lambda a, b: losses.cosine_infonce(a, b, 0.5)])
def test_sharded_over_8_devices_equals_single_device(loss):
  assert jax.device_count() == 8
  rng = np.random.default_rng(4)
  z1 = jnp.asarray(rng.normal(size=(32, 2)) * 5, jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(32, 2)) * 5, jnp.float32)
  fn = jax.value_and_grad(loss, argnums=(0, 1))
  want_v, want_g = jax.jit(fn)(z1, z2)
  mesh = parallel.make_mesh()
  sh = NamedSharding(mesh, P("data"))
  got_v, got_g = jax.jit(fn)(jax.device_put(z1, sh), jax.device_put(z2, sh))
  assert got_g[0].sharding.is_equivalent_to(sh, 2) or got_g[0].shape == (32, 2)
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_bad_shapes_are_reported():
  with pytest.raises(ValueError, match="views"):
    losses.cauchy_infonce(jnp.zeros((4, 2)), jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("triplet")
