"""Tests of jaxembed.augment against NumPy/colorsys/scipy and statistically."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed import augment

# All ops off: a base to switch single ops on.
OFF = dict(preset="none")


def _images(n=8, size=12, channels=3, seed=0):
  return np.random.RandomState(seed).randint(
      0, 256, (n, size, size, channels)).astype(np.uint8)


@pytest.fixture(scope="module")
def tsimcne_fn():
  cfg = augment.resolve({"preset": "tsimcne"})
  return jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))


def test_resolve_presets_and_overrides():
  cfg = augment.resolve({"preset": "tsimcne", "hflip_p": None, "hue": 0.2})
  assert cfg["hflip_p"] == 0.5 and cfg["hue"] == 0.2
  assert cfg["crop_scale"] == (0.2, 1.0)
  assert augment.resolve(cfg) == cfg
  med = augment.resolve({"preset": "medical"})
  assert med["rotate_degrees"] == 45.0 and med["fill"] == "border_mean"
  with pytest.raises(ValueError, match="preset"):
    augment.resolve({"preset": "bogus"})
  with pytest.raises(ValueError, match="hflip_p"):
    augment.resolve({"hflip_p": 1.5})
  with pytest.raises(ValueError, match="unknown augmentation field"):
    augment.resolve({"hflp_p": 0.5})
  with pytest.raises(ValueError, match="crop_scale"):
    augment.resolve({"crop_scale": (0.5, 0.2)})


def test_resolve_config_dict():
  import sys, pathlib  # noqa: E401
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs import common
  c = common.get_config()
  c.aug.preset = "medical"
  c.aug.rotate_degrees = 10.0
  cfg = augment.resolve(c.aug)
  assert cfg["rotate_degrees"] == 10.0 and cfg["vflip_p"] == 0.5


def test_tsimcne_deterministic_shapes_range(tsimcne_fn):
  x = _images()
  a = tsimcne_fn(jax.random.key(1), x)
  b = tsimcne_fn(jax.random.key(1), x)
  c = tsimcne_fn(jax.random.key(2), x)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Images of one batch get different parameters: identical inputs, different views.
  same = np.repeat(x[:1], 8, axis=0)
  v = np.asarray(tsimcne_fn(jax.random.key(3), same))
  assert len({v[i].tobytes() for i in range(8)}) == 8


def test_none_is_identity_uint8_and_float():
  x = _images()
  out = augment.augment_batch(jax.random.key(0), x, OFF)
  np.testing.assert_allclose(np.asarray(out), x / 255.0, atol=1e-6)
  xf = (x / 255.0).astype(np.float32)
  out = augment.augment_batch(jax.random.key(0), xf, OFF)
  np.testing.assert_allclose(np.asarray(out), xf, atol=1e-6)


def test_hflip_matches_numpy():
  x = _images(n=64)
  out = np.asarray(augment.augment_batch(jax.random.key(0), x,
                                         dict(OFF, hflip_p=0.5)))
  flipped = np.isclose(out, x[:, :, ::-1] / 255.0, atol=1e-6).all(axis=(1, 2, 3))
  kept = np.isclose(out, x / 255.0, atol=1e-6).all(axis=(1, 2, 3))
  assert np.all(flipped | kept)
  assert 15 < flipped.sum() < 49  # Binomial(64, 0.5): 32 +- 4 sd


def test_border_mean():
  x = np.zeros((2, 4, 5, 3), np.uint8)
  x[:, 1:-1, 1:-1] = 255  # interior must not count
  x[0, 0, :, 0] = 255     # top row of image 0, red
  got = augment.border_mean(x)
  n_border = 2 * (4 * 5 - 2 * 3)
  np.testing.assert_allclose(got, (5 / n_border, 0.0, 0.0))
