"""Tests of jaxembed.augment against NumPy, colorsys, scipy and PIL, and statistically.

Each op is compared with an independent computation of torchvision's
definition of it; random parameters are checked against the distribution the
reference samples from.
"""

import colorsys
import itertools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from PIL import Image

from jaxembed import augment
from jaxembed import parallel

# Every op off; tests switch single ops on from here.
OFF = dict(preset="none")


def _images(n=8, height=12, width=12, channels=3, seed=0):
  return np.random.RandomState(seed).randint(
      0, 256, (n, height, width, channels)).astype(np.uint8)


def _float_image(height, width, channels=3, seed=0):
  return np.random.RandomState(seed).rand(height, width, channels).astype(
      np.float32)


def _augment(key, images, cfg):
  """augment_batch under jit (one compilation instead of op-by-op dispatch)."""
  cfg = augment.resolve(cfg)
  return jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))(key, images)


@pytest.fixture(scope="module")
def tsimcne_fn():
  cfg = augment.resolve({"preset": "tsimcne"})
  return jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))


# ------------------------------------------------------------------ config


def test_resolve_presets_and_overrides():
  cfg = augment.resolve({"preset": "tsimcne", "hflip_p": None, "hue": 0.2})
  assert cfg["hflip_p"] == 0.5 and cfg["hue"] == 0.2
  assert cfg["crop_scale"] == (0.2, 1.0) and cfg["jitter_p"] == 0.8
  assert augment.resolve(cfg) == cfg  # idempotent
  med = augment.resolve({"preset": "medical"})
  assert med["rotate_degrees"] == 45.0 and med["fill"] == "border_mean"
  assert med["rot90_p"] == 0.5 and med["vflip_p"] == 0.5
  assert augment.resolve(None)["preset"] == "tsimcne"
  for bad, match in [({"preset": "bogus"}, "preset"),
                     ({"hflip_p": 1.5}, "hflip_p"),
                     ({"hflp_p": 0.5}, "unknown augmentation field"),
                     ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
                     ({"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
                     ({"fill": "wrap"}, "fill"),
                     ({"fill_value": (0.1, 2.0, 0.0)}, "fill_value"),
                     ({"hue": 0.7}, "hue"),
                     ({"brightness": -1.0}, "brightness")]:
    with pytest.raises(ValueError, match=match):
      augment.resolve(bad)
  with pytest.raises(TypeError, match="aug_config"):
    augment.resolve(["tsimcne"])


def test_resolve_config_dict():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from jaxembed.configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_config()
  assert augment.resolve(c.aug) == augment.resolve({"preset": "tsimcne"})
  c.aug.preset = "medical"
  c.aug.rotate_degrees = 10.0
  c.aug.fill_value = (0.5, 0.25, 0.0)
  cfg = augment.resolve(c.aug)
  assert cfg["rotate_degrees"] == 10.0 and cfg["vflip_p"] == 0.5
  assert cfg["fill_value"] == (0.5, 0.25, 0.0)


def test_bad_inputs():
  with pytest.raises(ValueError, match="channels"):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 8, 2), np.uint8),
                          OFF)
  with pytest.raises(ValueError, match="channels"):
    augment.augment_batch(jax.random.key(0), np.zeros((8, 8, 3), np.uint8), OFF)
  with pytest.raises(TypeError, match="dtype"):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 8, 3), np.int32),
                          OFF)
  with pytest.raises(ValueError, match="square"):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 6, 1), np.uint8),
                          dict(OFF, rot90_p=0.5))
  with pytest.raises(ValueError, match="fill_value"):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 8, 1), np.uint8),
                          dict(OFF, rotate_p=1.0, rotate_degrees=10.0,
                               fill_value=(0.1, 0.2, 0.3)))


# ---------------------------------------------------------------- geometry


def _torchvision_crop_params(rng, height, width, scale, ratio):
  """RandomResizedCrop.get_params, re-written in NumPy from its definition."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _crop_samples(n, height, width, scale, ratio):
  u = jax.random.uniform(jax.random.key(0), (n, 22))
  f = jax.jit(jax.vmap(lambda v: augment.sample_crop(v, height, width, scale,
                                                     ratio)))
  return [np.asarray(a) for a in f(u)]


def test_crop_distribution_matches_torchvision():
  height, width, n = 24, 32, 4000
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  top, left, h, w = _crop_samples(n, height, width, scale, ratio)
  rng = np.random.default_rng(0)
  ref = np.array([_torchvision_crop_params(rng, height, width, scale, ratio)
                  for _ in range(n)])
  assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
  assert np.all((top + h <= height) & (left + w <= width))
  area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (
      height * width)
  assert scipy.stats.ks_2samp(area, ref_area).pvalue > 1e-3
  assert scipy.stats.ks_2samp(w / h, ref[:, 3] / ref[:, 2]).pvalue > 1e-3
  # Offsets uniform over the valid positions: the mean of the relative
  # position is 1/2 and both ends occur.
  rel = top[h < height] / (height - h[h < height])
  assert abs(rel.mean() - 0.5) < 0.03
  assert scipy.stats.ks_2samp(top, ref[:, 0]).pvalue > 1e-3


def test_crop_fallback_is_torchvision_centre_crop():
  # Area >= 90% with ratio 3..4 never fits a 10x10 image: centre fallback.
  rng = np.random.default_rng(0)
  expected = _torchvision_crop_params(rng, 10, 10, (0.9, 1.0), (3.0, 4.0))
  got = _crop_samples(50, 10, 10, (0.9, 1.0), (3.0, 4.0))
  for g, e in zip(got, expected):
    assert np.all(g == e), (g, e)


def _pil_resized_crop(image, box, out_h, out_w):
  """torchvision's resized_crop on PIL: crop, then bilinear resize."""
  top, left, h, w = box
  chans = []
  for c in range(image.shape[-1]):
    im = Image.fromarray(image[..., c].astype(np.float32), mode="F")
    im = im.crop((left, top, left + w, top + h)).resize((out_w, out_h),
                                                        Image.BILINEAR)
    chans.append(np.asarray(im))
  return np.stack(chans, -1)


@pytest.mark.parametrize("rotates,dtype", [(False, np.float32), (True, np.float32),
                                            (False, np.uint8), (True, np.uint8)])
def test_crop_warp_matches_pil(rotates, dtype):
  # rotates=False takes the axis-aligned path (row gathers; uint8 converted
  # after the first pass), True the general four-tap gather.
  height, width = 9, 11
  img = _float_image(height, width)
  if dtype == np.uint8:
    img = np.round(img * 255).astype(np.uint8)
  fn = jax.jit(lambda img, box, hf, vf: augment.warp(
      img, augment.geometry(height, width, box=box, hflip=hf, vflip=vf),
      "constant", 0.7, rotates=rotates))
  as_float = img / 255.0 if dtype == np.uint8 else img
  for box, hf, vf in [((0, 0, 9, 11), False, False), ((2, 3, 4, 5), True, False),
                      ((0, 0, 3, 3), False, True), ((5, 7, 4, 4), True, True),
                      ((1, 0, 8, 11), False, False), ((3, 2, 1, 6), True, False)]:
    got = np.asarray(fn(img, jnp.asarray(box), hf, vf))
    assert got.dtype == np.float32
    expected = _pil_resized_crop(as_float, box, height, width)
    expected = expected[::-1 if vf else 1, ::-1 if hf else 1]
    np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=str(box))


def test_composition_matches_sequential_ops():
  # rot90, crop+resize, hflip, vflip applied one after the other in NumPy/PIL.
  n = 10
  img = _float_image(n, n, seed=1)
  fn = jax.jit(lambda img, *g: augment.warp(img, augment.geometry(n, n, *g)))
  for k, box, hf, vf in [(1, (2, 1, 6, 7), True, False),
                         (2, (0, 3, 10, 5), False, True),
                         (3, (4, 4, 3, 5), True, True),
                         (0, (1, 2, 8, 8), True, False)]:
    expected = _pil_resized_crop(np.rot90(img, k), box, n, n)
    if hf:
      expected = expected[:, ::-1]
    if vf:
      expected = expected[::-1]
    got = fn(img, k * np.pi / 2, jnp.asarray(box), hf, vf)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


@pytest.mark.parametrize("fill,mode", [("constant", "grid-constant"),
                                       ("border_mean", "grid-constant"),
                                       ("reflect", "reflect")])
def test_rotation_matches_scipy(fill, mode):
  height, width = 13, 10
  img = _float_image(height, width, seed=2)
  colour = np.array([0.2, 0.5, 0.9], np.float32)
  fn = jax.jit(lambda img, theta: augment.warp(
      img, augment.geometry(height, width, theta), fill, colour))
  for degrees in (30.0, -45.0, 7.5, 180.0):
    got = np.asarray(fn(img, np.deg2rad(degrees)))
    expected = np.stack([
        ndi.rotate(img[..., c], degrees, reshape=False, order=1, mode=mode,
                   cval=colour[c]) for c in range(3)], -1)
    np.testing.assert_allclose(got, expected, atol=2e-5,
                               err_msg=f"{fill} {degrees}")


def test_rot90_exact_and_probability():
  x = _images(n=120, height=8, width=8, channels=1, seed=3)
  out = np.asarray(_augment(jax.random.key(0), x,
                                         dict(OFF, rot90_p=0.5)))
  ks = []
  for i in range(len(x)):
    match = [k for k in range(4)
             if np.allclose(out[i], np.rot90(x[i], k) / 255.0, atol=1e-6)]
    assert len(match) == 1, i
    ks.append(match[0])
  counts = np.bincount(ks, minlength=4)
  # k = 0 with probability 1/2; k = 1, 2, 3 with 1/6 each.
  assert scipy.stats.chisquare(counts, [60, 20, 20, 20]).pvalue > 1e-3


def test_rotation_angle_distribution():
  cfg = augment.resolve(dict(OFF, rotate_p=0.75, rotate_degrees=45.0))
  u = jax.random.uniform(jax.random.key(1), (3000, 29))
  geoms = jax.jit(jax.vmap(lambda v: augment.sample_geometry(v, 16, 16, cfg)))(u)
  outer = np.asarray(geoms[3])
  # outer = [[cos, -sin, .], [sin, cos, .]]
  angle = np.degrees(np.arctan2(outer[:, 1, 0], outer[:, 0, 0]))
  zero = np.abs(angle) < 1e-6
  assert abs(zero.mean() - 0.25) < 0.035
  assert scipy.stats.kstest(angle[~zero], "uniform", args=(-45, 90)).pvalue > 1e-3


def test_hflip_matches_numpy():
  x = _images(n=64)
  out = np.asarray(_augment(jax.random.key(0), x,
                                         dict(OFF, hflip_p=0.5)))
  flipped = np.isclose(out, x[:, :, ::-1] / 255.0, atol=1e-6).all(axis=(1, 2, 3))
  kept = np.isclose(out, x / 255.0, atol=1e-6).all(axis=(1, 2, 3))
  assert np.all(flipped | kept)
  assert 15 < flipped.sum() < 49  # Binomial(64, 0.5): 32 +- 4 sd


# ------------------------------------------------------------------ colour


def _np_gray(img):
  return img[..., :1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114


def _np_hue(img, shift):
  out = np.empty_like(img)
  for idx in np.ndindex(img.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*img[idx])
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


def _np_op(img, op, f):
  if op == 0:  # brightness
    return np.clip(img * f, 0, 1)
  if op == 1:  # contrast: blend with the mean of the grayscale image
    return np.clip(f * img + (1 - f) * _np_gray(img).mean(), 0, 1)
  if op == 2:  # saturation: blend with the grayscale image
    return np.clip(f * img + (1 - f) * _np_gray(img), 0, 1)
  return _np_hue(img, f)


def test_hsv_and_hue_match_colorsys():
  img = _float_image(6, 7, seed=4)
  img[0, :3] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1]]  # achromatic pixels
  img[1, :3] = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
  hsv = np.asarray(jax.jit(augment.rgb_to_hsv)(img))
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in img.reshape(-1, 3)])
  np.testing.assert_allclose(hsv.reshape(-1, 3), ref, atol=1e-6)
  hue = jax.jit(augment.adjust_hue)
  for shift in (0.3, -0.1, 0.5):
    got = np.asarray(hue(img, shift))
    np.testing.assert_allclose(got, _np_hue(img, shift), atol=1e-5)


def test_blend_ops_match_numpy():
  img = _float_image(5, 6, seed=5)
  ops = jax.jit(lambda x, f: (augment.adjust_brightness(x, f),
                              augment.adjust_contrast(x, f),
                              augment.adjust_saturation(x, f),
                              augment.rgb_to_gray(x)))
  for f in (0.6, 1.3):
    got = ops(img, f)
    for op in range(3):
      np.testing.assert_allclose(got[op], _np_op(img, op, f), atol=1e-6)
  np.testing.assert_allclose(got[3], _np_gray(img), atol=1e-6)
  gray_img = img[..., :1]
  np.testing.assert_allclose(jax.jit(augment.adjust_contrast)(gray_img, 0.5),
                             np.clip(0.5 * gray_img + 0.5 * gray_img.mean(), 0,
                                     1), atol=1e-6)


@pytest.mark.parametrize("branches", [False, True])
def test_jitter_every_order_matches_sequential_numpy(branches):
  # branches=False: the vmap form (every slot computed, selected); True: the
  # one-image form (lax.switch per place).
  cfg = augment.resolve(dict(OFF, jitter_p=1.0))  # .4, .4, .4, .1
  img = _float_image(4, 5, seed=6)
  fn = jax.jit(lambda u, x: augment.color_jitter(u, x, cfg, branches))
  base = np.array([0.0, 0.1, 0.9, 0.3, 0.95])  # apply, b, c, s, hue
  factors = [0.6 + 0.8 * base[1], 0.6 + 0.8 * base[2], 0.6 + 0.8 * base[3],
             0.1 * (2 * base[4] - 1)]
  for order in itertools.permutations(range(4)):
    ranks = np.empty(4)
    ranks[list(order)] = np.arange(4) / 4 + 0.1  # op order[i] comes i-th
    u = np.concatenate([base, ranks]).astype(np.float32)
    expected = img
    for op in order:
      expected = _np_op(expected, op, factors[op])
    np.testing.assert_allclose(np.asarray(fn(u, img)), expected, atol=2e-5,
                               err_msg=str(order))
  # Not applied (u[0] >= jitter_p would need p < 1): p = 0.5, u[0] = 0.7.
  cfg_half = augment.resolve(dict(OFF, jitter_p=0.5))
  u = np.concatenate([[0.7], base[1:], [0.1, 0.2, 0.3, 0.4]]).astype(np.float32)
  np.testing.assert_allclose(jax.jit(
      lambda u, x: augment.color_jitter(u, x, cfg_half, branches))(u, img), img,
                             atol=1e-5)


def test_brightness_factor_distribution():
  # Brightness alone: out / in is the factor, U(0.6, 1.4) with probability 0.8.
  x = np.full((400, 2, 2, 3), 100, np.uint8)
  cfg = dict(OFF, jitter_p=0.8, contrast=0.0, saturation=0.0, hue=0.0)
  out = np.asarray(_augment(jax.random.key(7), x, cfg))
  factor = out[:, 0, 0, 0] / (100 / 255)
  assert np.allclose(out, out[:, :1, :1, :1], atol=1e-6)  # one factor per image
  ident = np.abs(factor - 1) < 1e-6
  assert abs(ident.mean() - 0.2) < 0.06
  assert scipy.stats.kstest(factor[~ident], "uniform",
                            args=(0.6, 0.8)).pvalue > 1e-3


def test_grayscale_probability_and_weights():
  x = _images(n=300, height=3, width=3, seed=8)
  out = np.asarray(_augment(jax.random.key(0), x,
                                         dict(OFF, grayscale_p=0.2)))
  xf = x / 255.0
  is_gray = np.isclose(out, _np_gray(xf), atol=1e-6).all(axis=(1, 2, 3))
  kept = np.isclose(out, xf, atol=1e-6).all(axis=(1, 2, 3))
  assert np.all(is_gray | kept)
  assert abs(is_gray.mean() - 0.2) < 0.07


def test_blur_and_solarize_match_scipy():
  img = _float_image(9, 12, seed=9)
  sigma, radius = 1.3, 4
  got = np.asarray(jax.jit(augment.gaussian_blur, static_argnums=2)(
      img, sigma, radius))
  # torchvision pads with 'reflect' (no edge repeat) = scipy's 'mirror'.
  expected = ndi.gaussian_filter(img, (sigma, sigma, 0), mode="mirror",
                                 truncate=radius / sigma)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(jax.jit(augment.solarize)(img, 0.5),
                             np.where(img >= 0.5, 1 - img, img))


# --------------------------------------------------------------- pipeline


def test_tsimcne_deterministic_shapes_range(tsimcne_fn):
  x = _images()
  a = tsimcne_fn(jax.random.key(1), x)
  b = tsimcne_fn(jax.random.key(1), x)
  c = tsimcne_fn(jax.random.key(2), x)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Identical images in one batch get different parameters.
  same = np.repeat(x[:1], 8, axis=0)
  v = np.asarray(tsimcne_fn(jax.random.key(3), same))
  assert len({v[i].tobytes() for i in range(8)}) == 8
  # Float input in [0, 1] gives the same views as the uint8 it came from.
  np.testing.assert_allclose(np.asarray(tsimcne_fn(jax.random.key(1),
                                                   (x / 255.0).astype(
                                                       np.float32))),
                             np.asarray(a), atol=1e-5)


def test_gray_images(tsimcne_fn):
  x = _images(channels=1)
  out = np.asarray(tsimcne_fn(jax.random.key(0), x))
  assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
  # Saturation and hue leave 1-channel images alone (as torchvision).
  cfg = dict(OFF, jitter_p=1.0, brightness=0.0, contrast=0.0)
  np.testing.assert_allclose(
      _augment(jax.random.key(0), x, cfg), x / 255.0, atol=1e-6)


def test_none_is_identity_uint8_and_float():
  x = _images()
  out = _augment(jax.random.key(0), x, OFF)
  np.testing.assert_allclose(np.asarray(out), x / 255.0, atol=1e-6)
  xf = (x / 255.0).astype(np.float32)
  out = _augment(jax.random.key(0), xf, OFF)
  np.testing.assert_allclose(np.asarray(out), xf, atol=1e-6)


# Medical preset without colour ops, so that fill pixels can be recognised.
MEDICAL_GEOMETRY = dict(preset="medical", fill_value=(0.25, 0.5, 0.0),
                        jitter_p=0.0, grayscale_p=0.0)


@pytest.fixture(scope="module")
def medical_fn():
  cfg = augment.resolve(MEDICAL_GEOMETRY)
  return jax.jit(lambda k, x: augment.augment_batch(k, x, cfg))


def test_medical_fills_with_border_mean(medical_fn):
  # A white image rotated: pixels are white or blends with the fill colour,
  # and corners of some views are exactly the fill colour.
  x = np.full((16, 12, 12, 3), 255, np.uint8)
  out = np.asarray(medical_fn(jax.random.key(0), x))
  corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(-1, 3)
  assert np.any(np.all(np.isclose(corners, (0.25, 0.5, 0.0), atol=1e-6), axis=1))
  # Every pixel is a convex mix of white and the fill colour.
  t = (out[..., 0] - 0.25) / 0.75
  np.testing.assert_allclose(
      out, np.stack([0.25 + 0.75 * t, 0.5 + 0.5 * t, t], -1), atol=1e-5)
  assert t.min() >= -1e-6 and t.mean() < 0.99


def test_sharded_over_eight_devices_matches_single_device(medical_fn):
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:8])
  sharding = NamedSharding(mesh, P("data"))
  cfg = augment.resolve(MEDICAL_GEOMETRY)
  x = _images(n=16, seed=10)
  key = jax.random.fold_in(jax.random.key(0), 5)
  ref = np.asarray(medical_fn(key, x))
  xs = jax.device_put(x, sharding)
  got = jax.jit(lambda k, x: augment.augment_batch(k, x, cfg),
                in_shardings=(None, sharding), out_shardings=sharding)(key, xs)
  assert got.sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)


# Every op on, each with a probability strictly between 0 and 1, so both
# sides of every branch occur in a batch.
ALL_OPS = {"preset": "medical", "fill_value": (0.2, 0.4, 0.6), "jitter_p": 0.7,
           "grayscale_p": 0.4, "blur_p": 0.5, "solarize_p": 0.5}


@pytest.mark.parametrize("cfg", [
    ALL_OPS,
    {"preset": "tsimcne"},            # the axis-aligned warp
    dict(ALL_OPS, fill="reflect")])
def test_cpu_branches_equal_vmap(monkeypatch, cfg):
  # On one CPU device, images of _CPU_BRANCH_PIXELS or more go through
  # lax.map one at a time with real branches (the tests' 8 devices without a
  # mesh keep the vmap): force that path on a mesh of one CPU device and
  # compare with the vmap.
  cfg = augment.resolve(cfg)
  x = _images(n=12, seed=11)
  keys = jax.random.split(jax.random.key(3), (2, 12))
  views = jax.jit(lambda k, x: augment.augment_views(k, x, cfg))
  vmapped = np.asarray(views(keys, x))
  # Image-major rows: view v of image i is row 2 i + v, and equals the
  # single-view call with keys[v].
  single = jax.jit(lambda k, x: augment.augment_with_keys(k, x, cfg))
  np.testing.assert_allclose(
      vmapped.reshape(12, 2, *x.shape[1:]),
      np.stack([single(keys[0], x), single(keys[1], x)], axis=1), atol=1e-6)

  monkeypatch.setattr(augment, "_CPU_BRANCH_PIXELS", x.shape[1] * x.shape[2])
  one_cpu = parallel.make_mesh(1)
  branched = np.asarray(jax.jit(lambda k, x: augment.augment_views(k, x, cfg, one_cpu))(keys, x))
  # The public call gives exactly the per-image scan's views, which equal the vmap's.
  scan = augment._scan_views  # pylint: disable=protected-access
  scanned = np.asarray(jax.jit(lambda k, x: scan(k, x, cfg))(keys, x))
  np.testing.assert_array_equal(branched, scanned)
  np.testing.assert_allclose(branched, vmapped, atol=1e-5)


def test_cpu_branches_per_device_of_mesh(monkeypatch):
  # With a mesh of CPU devices, each device scans its own shard of the batch
  # (shard_map); the views equal the single-device vmap's, keep the batch's
  # sharding (image-major rows), and need no data moved between devices.
  cfg = augment.resolve(ALL_OPS)
  x = _images(n=8, seed=5)
  keys = jax.random.split(jax.random.key(7), (2, 8))
  vmapped = np.asarray(jax.jit(lambda k, x: augment.augment_views(k, x, cfg))(keys, x))

  monkeypatch.setattr(augment, "_CPU_BRANCH_PIXELS", x.shape[1] * x.shape[2])
  mesh = parallel.make_mesh(4)
  sharding = parallel.batch_sharding(mesh)
  fn = jax.jit(lambda k, x: augment.augment_views(k, x, cfg, mesh),
               in_shardings=(None, sharding), out_shardings=sharding)
  got = fn(keys, jax.device_put(x, sharding))
  # Each device's rows are the per-image scan of its own two images.
  scan = jax.jit(lambda k, x: augment._scan_views(k, x, cfg))  # pylint: disable=protected-access
  per_device = np.concatenate([np.asarray(scan(keys[:, 2 * d:2 * d + 2], x[2 * d:2 * d + 2]))
                               for d in range(4)])
  np.testing.assert_allclose(np.asarray(got), per_device, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got), vmapped, atol=1e-5)
  hlo = fn.lower(keys, jax.device_put(x, sharding)).compile().as_text()
  assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute"))

  with pytest.raises(ValueError, match="6 is not divisible by the 4 devices"):
    augment.augment_views(keys[:, :6], x[:6], cfg, mesh)
  other = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,),
                        devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="axis named 'data'"):
    augment.augment_views(keys, x, cfg, other)


def test_augment_views_bad_keys():
  x = _images(n=4)
  with pytest.raises(ValueError, match=r"keys must be \(views, batch\)"):
    augment.augment_views(jax.random.split(jax.random.key(0), 4), x, OFF)
  with pytest.raises(ValueError, match=r"keys must be \(views, batch\)"):
    augment.augment_views(jax.random.split(jax.random.key(0), (2, 3)), x, OFF)


# ------------------------------------------------------------------ stats


def test_border_mean():
  x = np.zeros((2, 4, 5, 3), np.uint8)
  x[:, 1:-1, 1:-1] = 255  # the interior must not count
  x[0, 0, :, 0] = 255     # top row of image 0, red
  n_border = 2 * (4 * 5 - 2 * 3)
  np.testing.assert_allclose(augment.border_mean(x), (5 / n_border, 0.0, 0.0))
  rnd = _images(n=5, height=6, width=7, seed=11)
  border = np.concatenate([rnd[:, 0].reshape(-1, 3), rnd[:, -1].reshape(-1, 3),
                           rnd[:, 1:-1, 0].reshape(-1, 3),
                           rnd[:, 1:-1, -1].reshape(-1, 3)])
  np.testing.assert_allclose(augment.border_mean(rnd), border.mean(0) / 255,
                             rtol=1e-12)
  assert len(augment.border_mean(rnd[..., 0])) == 1
  with pytest.raises(ValueError, match="border_mean"):
    augment.border_mean(np.zeros((3, 5)))
