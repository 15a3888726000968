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
  # The gradients stay sharded like the views: each device keeps its own rows.
  for g in got_g:
    assert g.shape == (32, 2) and g.sharding.is_equivalent_to(sh, 2), g.sharding
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_bad_shapes_are_reported():
  with pytest.raises(ValueError, match="views"):
    losses.cauchy_infonce(jnp.zeros((4, 2)), jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("triplet")


# ------------------------------------------- blocked and sharded evaluation


LOSSES = {"cauchy": (losses.cauchy_infonce, cauchy),
          "cosine": (lambda a, b, **kw: losses.cosine_infonce(a, b, 0.5, **kw), cosine(0.5))}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("d", [2, 16])
def test_row_blocked_matches_naive_loop(name, d):
  # 2B = 14 rows in blocks of 3: the last block is padded.
  loss, sim = LOSSES[name]
  rng = np.random.default_rng(10 + d)
  z1, z2 = rng.normal(size=(7, d)) * 3, rng.normal(size=(7, d)) * 3
  got = float(loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), block_size=3))
  assert got == pytest.approx(naive_infonce(z1, z2, sim), rel=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_row_blocked_gradient_matches_finite_differences(name):
  loss = LOSSES[name][0]
  rng = np.random.default_rng(5)
  z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  with jax.enable_x64(True):
    f = lambda a, b: loss(a, b, block_size=4)
    g1, _ = jax.grad(f, argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
    eps = 1e-6
    for i, j in [(0, 0), (4, 2)]:
      zp, zm = z1.copy(), z1.copy()
      zp[i, j] += eps
      zm[i, j] -= eps
      fd = (float(f(jnp.asarray(zp), jnp.asarray(z2))) - float(f(jnp.asarray(zm), jnp.asarray(z2))))
      assert float(g1[i, j]) == pytest.approx(fd / (2 * eps), rel=1e-5, abs=1e-8)


def _sharded_value_and_grads(fn, z1, z2, mesh):
  sh = parallel.batch_sharding(mesh)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(jax.device_put(z1, sh),
                                                         jax.device_put(z2, sh))


@pytest.mark.parametrize("num_devices", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("variant", ["plain", "sharded", "sharded_blocked"])
def test_meshes_of_2_4_8_devices_equal_single_device(num_devices, name, variant):
  """The global-batch loss on n devices equals the plain loss of the whole batch on one."""
  loss = LOSSES[name][0]
  rng = np.random.default_rng(num_devices)
  z1 = jnp.asarray(rng.normal(size=(48, 2)) * 5, jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(48, 2)) * 5, jnp.float32)
  want_v, want_g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(z1, z2)  # one device
  mesh = parallel.make_mesh(num_devices)
  kw = {"plain": {}, "sharded": {"mesh": mesh},
        "sharded_blocked": {"mesh": mesh, "block_size": 5}}[variant]
  got_v, got_g = _sharded_value_and_grads(lambda a, b: loss(a, b, **kw), z1, z2, mesh)
  np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
  for g, w in zip(got_g, want_g):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_context_mesh_shards_the_loss():
  """Under jax.set_mesh the loss takes the shard_map path without a mesh argument."""
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(6)
  z1 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  want = float(losses.cauchy_infonce(z1, z2))
  lowered = jax.jit(losses.cauchy_infonce).lower(z1, z2)
  assert "all-gather" not in lowered.as_text() and "all_gather" not in lowered.as_text()
  with jax.set_mesh(mesh):
    lowered = jax.jit(losses.cauchy_infonce).lower(z1, z2)
    assert "all_gather" in lowered.as_text() or "all-gather" in lowered.as_text()
    got = float(jax.jit(losses.cauchy_infonce)(z1, z2))
  assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kw", [{"block_size": 4}, {"mesh": "mesh", "block_size": 2}])
def test_blocked_and_sharded_are_stable(kw):
  kw = {k: parallel.make_mesh(4) if v == "mesh" else v for k, v in kw.items()}
  loss = jax.jit(lambda a, b: losses.cauchy_infonce(a, b, **kw))
  far = jnp.array([[0.0, 0.0], [1e4, 0.0], [0.0, -1e4], [-1e4, 1e4]], jnp.float32)
  value, grad = jax.value_and_grad(lambda a: loss(a, a + 1.0))(far)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  # One class collapsed to a point: every similarity is 1, the loss is log(2B - 1).
  same = jnp.ones((8, 2), jnp.float32)
  value, grad = jax.value_and_grad(lambda a: loss(a, a))(same)
  assert float(value) == pytest.approx(np.log(15), rel=1e-6)
  assert np.isfinite(np.asarray(grad)).all()
  z = jnp.asarray(np.random.default_rng(7).normal(size=(8, 2)) * 50, jnp.bfloat16)
  value = loss(z, z + 1)
  assert value.dtype == jnp.float32 and np.isfinite(float(value))


def test_automatic_blocking_threshold():
  n = 2 * 8192
  assert losses._auto_block_size(2048, 2048, None) is None  # B = 1024: plain
  bs = losses._auto_block_size(n, n, None)
  assert bs * n <= losses.AUTO_BLOCK_ELEMENTS < 2 * bs * n
  assert losses._auto_block_size(64, 128, 16) == 16
  assert losses._auto_block_size(64, 128, 64) is None


def test_memory_of_8192_on_8_devices_stays_small():
  """Peak per-device temporaries of loss + gradients at B = 8192 (2B = 16384 rows).

  The plain 2B x 2B float32 matrix alone is 1 GiB; on one device the plain
  loss and gradient need several times that. The sharded, row-blocked
  evaluation must stay far below it on each of 8 devices. Sizes come from
  XLA's memory analysis of the compiled program (the CPU has no
  Device.memory_stats()).
  """
  mesh = parallel.make_mesh(8)
  spec = jax.ShapeDtypeStruct((8192, 2), jnp.float32, sharding=parallel.batch_sharding(mesh))
  matrix_bytes = 16384**2 * 4

  def temp_bytes(**kw):
    f = jax.jit(jax.value_and_grad(lambda a, b: losses.cauchy_infonce(a, b, **kw), argnums=(0, 1)))
    return f.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes

  sharded = temp_bytes(mesh=mesh)
  assert sharded < matrix_bytes / 8
  plain_one_device = jax.jit(jax.value_and_grad(
      lambda a, b: losses.cauchy_infonce(a, b, block_size=10**9), argnums=(0, 1))).lower(
          jax.ShapeDtypeStruct((8192, 2), jnp.float32),
          jax.ShapeDtypeStruct((8192, 2), jnp.float32)).compile().memory_analysis()
  assert plain_one_device.temp_size_in_bytes >= matrix_bytes


def test_bad_block_size_mesh_and_batch_are_reported():
  z = jnp.zeros((6, 2))
  with pytest.raises(ValueError, match="block_size"):
    losses.cauchy_infonce(z, z, block_size=0)
  with pytest.raises(ValueError, match="not divisible"):
    losses.cauchy_infonce(z, z, mesh=parallel.make_mesh(4))
  other = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                        devices=jax.devices()[:2])
  with pytest.raises(ValueError, match="'data'"):
    losses.cauchy_infonce(z, z, mesh=other)
  with pytest.raises(ValueError, match="temperature"):
    losses.cosine_infonce(z, z, temperature=0.0)
