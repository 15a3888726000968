"""The two-pass step (jaxembed.twopass): same gradients as one pass, chunk layout, BatchNorm, config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxembed.configs import common
from jaxembed import augment, configlib, losses, parallel, schedule, train_state, train_step
from jaxembed import twopass
from jaxembed.models import heads


def mesh_of(n):
  return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


class NoBatchNorm(nn.Module):
  """A tiny conv net without BatchNorm: chunked and one-pass gradients must agree exactly."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    h = nn.relu(nn.Dense(8, name="hidden")(h.mean(axis=(1, 2))))
    return {"z": nn.Dense(3, name="out")(h)}


def aug_config():
  # Random grayscale and solarisation make the views of an image differ (per-image keys
  # decide them) and compile in a moment; warps and colour jitter would take far longer.
  c = common.get_config().aug
  c.preset, c.grayscale_p, c.solarize_p = "none", 0.5, 0.5
  return c


def images(n=32, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def compiled(jitted, *args):
  """``jitted`` compiled for ``args`` without XLA's slow optimisation passes (test time)."""
  return jitted.lower(*args).compile(compiler_options=train_state.FAST_COMPILE)


def grads_of(model, variables, num_chunks, mesh, imgs, trainable="all", hlo=None):
  """(loss, grads, batch_stats) of the step's gradient function; ``hlo`` (a list) gets its HLO."""
  fn = train_step.make_loss_and_grads(model, losses.get_loss("cauchy"), aug_config(), trainable,
                                      num_chunks, mesh)
  repl = parallel.replicated(mesh)
  jitted = jax.jit(fn, in_shardings=(repl, repl, parallel.batch_sharding(mesh), repl))
  args = (variables["params"], variables.get("batch_stats", {}),
          parallel.global_from_full(mesh, imgs), jax.random.key(3))
  if hlo is not None:
    hlo.append(jitted.lower(*args).as_text())
  return compiled(jitted, *args)(*args)


def assert_trees_close(a, b, rtol, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_chunk_layout_follows_the_devices():
  x = np.arange(24)
  chunks = np.asarray(twopass.to_chunks(jnp.asarray(x), num_devices=4, num_chunks=3))
  # Device d holds rows 6d..6d+5; chunk k takes rows 6d + 2k, 6d + 2k + 1 of every device.
  want = np.array([[6 * d + 2 * k + j for d in range(4) for j in range(2)] for k in range(3)])
  np.testing.assert_array_equal(chunks, want)
  np.testing.assert_array_equal(np.asarray(twopass.from_chunks(jnp.asarray(chunks), 4)), x)
  with pytest.raises(ValueError, match="does not split into 5 chunks"):
    twopass.to_chunks(jnp.asarray(x), num_devices=4, num_chunks=5)


def test_loss_and_grads_equal_autodiff_of_the_full_batch():
  """A plain function of the parameters: the two passes give jax.grad of the whole-batch loss."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  a, b = (jnp.asarray(rng.normal(size=(12, 5)), jnp.float32) for _ in range(2))

  def f(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]

  def embed(p, chunk, index):
    del index
    return (f(p, chunk[0]), f(p, chunk[1])), {"m": chunk[0].mean()}

  loss, grads, aux = jax.jit(lambda p: twopass.loss_and_grads(
      embed, losses.cauchy_infonce, p, (a, b), num_chunks=3, num_devices=2))(params)
  want_loss, want_grads = jax.jit(jax.value_and_grad(
      lambda p: losses.cauchy_infonce(f(p, a), f(p, b))))(params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(aux["m"]), float(a.mean()), rtol=1e-5)


@pytest.mark.parametrize("num_devices, num_chunks", [(1, 4), (8, 2)])
def test_trainer_gradients_match_one_pass_without_batchnorm(num_devices, num_chunks):
  mesh = mesh_of(num_devices)
  model = NoBatchNorm()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  imgs = images(32)
  loss1, grads1, _ = grads_of(model, variables, 1, mesh, imgs)
  loss2, grads2, _ = grads_of(model, variables, num_chunks, mesh, imgs)
  np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
  assert_trees_close(grads2, grads1, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(grads1["conv"]["kernel"]).max()) > 0


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_trainer_with_per_device_augmentation_scans(monkeypatch, num_chunks):
  # On CPU devices, images of augment._CPU_BRANCH_PIXELS or more are augmented
  # by a scan on each device of the mesh (shard_map); forced here at 8 px, the
  # step's loss and gradients equal those of the vmapped augmentation.
  mesh = mesh_of(4)
  model = NoBatchNorm()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  imgs = images(32)
  vmapped, scanned = [], []
  want_loss, want_grads, _ = grads_of(model, variables, num_chunks, mesh, imgs, hlo=vmapped)
  monkeypatch.setattr(augment, "_CPU_BRANCH_PIXELS", 8 * 8)
  loss, grads, _ = grads_of(model, variables, num_chunks, mesh, imgs, hlo=scanned)
  # The forced path adds a loop over each device's images inside a per-device
  # (manual, shard_map) computation per chunk; the vmap has neither.
  assert "manual_computation" not in vmapped[0]
  assert scanned[0].count("manual_computation") == num_chunks
  assert scanned[0].count("stablehlo.while") > vmapped[0].count("stablehlo.while")
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-7)


class WithBatchNorm(nn.Module):
  """Conv + BatchNorm backbone and the package's projector (parameter names as the model's)."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(4, (3, 3), name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
    features = nn.relu(h).mean(axis=(1, 2))
    hidden, z = heads.Projector(hidden_dim=8, head_dim=4, name="projector")(features)
    return {"features": features, "hidden": hidden, "z": z}


def tiny_bn_model():
  return WithBatchNorm()


def test_batchnorm_chunks_equal_the_same_chunk_forward():
  """With BatchNorm, the gradient is that of the loss of per-chunk-normalised outputs.

  The reference differentiates, by plain autodiff, a forward that normalises
  each chunk (the same rows of every device) separately and puts the outputs
  back in batch order.
  """
  mesh = mesh_of(8)
  model = tiny_bn_model()
  variables = train_state.init_variables(model, jax.random.key(0), (8, 8, 3))
  imgs = images(32)
  loss, grads, stats = grads_of(model, variables, 2, mesh, imgs)

  k1, k2 = jax.random.split(jax.random.key(3))  # as make_loss_and_grads splits its key
  v1 = augment.augment_batch(k1, jnp.asarray(imgs), aug_config())
  v2 = augment.augment_batch(k2, jnp.asarray(imgs), aug_config())
  per_device, chunk = 4, 2
  rows = [np.array([d * per_device + k * chunk + j for d in range(8) for j in range(chunk)])
          for k in range(2)]

  def reference(params):
    z1 = jnp.zeros((32, 4))
    z2 = jnp.zeros((32, 4))
    new_stats = []
    for r in rows:
      out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             jnp.concatenate([v1[r], v2[r]]), train=True,
                             mutable=["batch_stats"])
      z1 = z1.at[r].set(out["z"][:len(r)])
      z2 = z2.at[r].set(out["z"][len(r):])
      new_stats.append(upd["batch_stats"])
    mean_stats = jax.tree.map(lambda *s: sum(s) / len(s), *new_stats)
    return losses.cauchy_infonce(z1, z2), mean_stats

  (want_loss, want_stats), want_grads = compiled(
      jax.jit(jax.value_and_grad(reference, has_aux=True)), variables["params"])(
          variables["params"])
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
  assert_trees_close(stats, want_stats, rtol=1e-5, atol=1e-7)
  # And it is not the one-pass gradient: the chunk statistics differ from the batch's.
  _, one_pass, _ = grads_of(model, variables, 1, mesh, imgs)
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(one_pass), jax.tree.leaves(grads)))
  assert diff > 1e-6


def test_frozen_parameters_get_zero_gradients_in_two_passes():
  mesh = mesh_of(8)
  model = tiny_bn_model()
  variables = train_state.init_variables(model, jax.random.key(0), (8, 8, 3))
  _, grads, _ = grads_of(model, variables, 2, mesh, images(32), trainable="head_out")
  assert float(jnp.abs(grads["projector"]["out"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["projector"]["hidden"]["kernel"]).max()) == 0
  assert float(jnp.abs(grads["conv"]["kernel"]).max()) == 0


def test_short_training_run_with_chunks_ends_with_the_same_parameters():
  mesh = mesh_of(8)
  model = NoBatchNorm()
  # On the host: the step donates its state, which must not alias these.
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  c = common.get_config()
  imgs = parallel.replicate(mesh, jnp.asarray(images(48)))
  ends = []
  for chunk_size in (0, 1):
    tx = schedule.make_optimizer(c.optimizer, 0.05, "all", variables["params"])
    state = parallel.replicate(mesh, train_state.make_state(variables["params"], {}, tx, 0))
    step = train_step.make_train_step(model, tx, losses.get_loss("cauchy"), aug_config(), 16, mesh,
                                   chunk_size=chunk_size)
    batches = [parallel.global_from_full(mesh, np.arange(16 * i, 16 * (i + 1), dtype=np.int32))
               for i in range(3)]
    step = compiled(step, state, imgs, batches[0], jax.random.key(1))
    for idx in batches:
      state, metrics = step(state, imgs, idx, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    ends.append(jax.device_get(state["params"]))
  assert_trees_close(ends[1], ends[0], rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ends[0], variables["params"])
  assert max(jax.tree.leaves(moved)) > 1e-4


@pytest.mark.parametrize("chunk, message", [
    (-1, "integer >= 0"), (3, "does not divide the per-device batch 4")])
def test_chunk_size_validation(chunk, message):
  c = common.get_config()
  common.smoke(c)
  c.train.chunk_size = chunk
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.validate(c, num_devices=8)


def test_chunk_size_that_divides_validates():
  c = common.get_config()
  common.smoke(c)
  for chunk in (0, 1, 2, 4, 8):
    c.train.chunk_size = chunk
    configlib.validate(c, num_devices=8)
  assert configlib.num_chunks(1, 32, 8) == 4
  assert configlib.num_chunks(4, 32, 8) == 1 and configlib.num_chunks(0, 32, 8) == 1
