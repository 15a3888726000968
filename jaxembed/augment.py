"""On-device image augmentation for contrastive training: pure, jit-able, vmapped.

Every op is a pure function of (key, image). :func:`augment_batch` splits one
key per image, draws every random parameter of each view from its own key
(:func:`sample_view`, vmapped) and applies them (:func:`apply_view`): vmapped
over the batch, or on CPU devices for images of 64x64 pixels and more scanned
one at a time with real branches, each device over its own shard (see
:func:`_map_views`). No Python runs per image. :func:`augment_views` makes
several views of a batch at once, image-major.

Pipeline of one view (the order of the reference's torchvision transforms):

1. Geometry, composed into **one** affine map and sampled once (bilinear):
   rot90 by a random multiple, rotation by a uniform angle, random resized crop
   to the input size, horizontal flip, vertical flip. Pixels that fall outside
   the image take the fill: ``constant`` / ``border_mean`` (the colour in
   ``fill_value``) or ``reflect`` (half-sample symmetric, like
   ``scipy.ndimage`` mode ``reflect``).
2. Colour jitter (brightness, contrast, saturation, hue) in a random order per
   image, the whole jitter applied with probability ``jitter_p``.
3. Random grayscale (ITU-R 601 weights 0.299/0.587/0.114).
4. Optional Gaussian blur (separable, reflect padding) and solarisation.

Semantics follow torchvision (``RandomResizedCrop``, ``ColorJitter``,
``RandomGrayscale``, ``RandomRotation``, ``GaussianBlur``, ``RandomSolarize``).
Deliberate differences (see also docs/augment.md):

* Geometric ops are composed and interpolated once (bilinear) instead of
  resampling after each op; torchvision's ``RandomRotation`` defaults to
  nearest-neighbour, here rotation is bilinear like the crop.
* Pixels are float32 in [0, 1] throughout; torchvision on PIL images rounds to
  uint8 after every op.
* ``rot90``: when applied (probability ``rot90_p``) the multiple k is uniform in
  {1, 2, 3}, so ``rot90_p`` is the probability that the image is turned.
* Gaussian blur's kernel is truncated at 3 sigma of ``blur_sigma``'s upper
  end (torchvision takes an explicit kernel size).
"""

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxembed import parallel
from jaxembed.parallel import DATA_AXIS

# Every configuration field (configs/common.py, ``config.aug``) and its value
# in each preset. ``tsimcne`` is the reference default (Böhm et al., ICLR 2023,
# package ``tsimcne``): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3),
# horizontal flip p=0.5, ColorJitter(.4, .4, .4, .1) p=0.8, grayscale p=0.2, no
# blur. ``medical`` is the 28x28 medical variant: rot90 p=0.5, rotation +-45
# degrees filled with the data's mean border colour, the same crop, horizontal
# and vertical flips, jitter and grayscale. ``none`` is the identity (export).
_TSIMCNE = dict(
    crop_p=1.0,
    crop_scale=(0.2, 1.0),
    crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
    hflip_p=0.5,
    vflip_p=0.0,
    rot90_p=0.0,
    rotate_p=0.0,
    rotate_degrees=0.0,
    fill="constant",
    fill_value=None,
    jitter_p=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    grayscale_p=0.2,
    blur_p=0.0,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    solarize_threshold=0.5,
)
PRESETS = {
    "tsimcne": dict(_TSIMCNE),
    "medical": dict(
        _TSIMCNE,
        vflip_p=0.5,
        rot90_p=0.5,
        rotate_p=1.0,
        rotate_degrees=45.0,
        fill="border_mean",
    ),
    "none": dict(
        _TSIMCNE,
        crop_p=0.0,
        hflip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
    ),
}
FIELDS = tuple(_TSIMCNE)
FILLS = ("constant", "border_mean", "reflect")
# Uniform draws per view: 29 geometry, 9 jitter, grayscale, blur (2), solarise.
_N_UNIFORMS = 42
# On CPU devices, images of at least this many pixels are augmented one at a
# time, where their random ops can branch (see _map_views).
_CPU_BRANCH_PIXELS = 2**12

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------ config


def _as_dict(aug_config) -> dict:
  if aug_config is None:
    return {}
  if hasattr(aug_config, "to_dict"):  # ml_collections.ConfigDict
    return dict(aug_config.to_dict())
  if isinstance(aug_config, Mapping):
    return dict(aug_config)
  raise TypeError(
      f"aug_config must be a ConfigDict or a dict of augmentation fields, got "
      f"{type(aug_config).__name__}")


def _prob(name, v):
  v = float(v)
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"aug.{name} must be a probability in [0, 1], got {v}")
  return v


def _nonneg(name, v):
  v = float(v)
  if not (v >= 0.0 and math.isfinite(v)):
    raise ValueError(f"aug.{name} must be a finite number >= 0, got {v}")
  return v


def _pair(name, v, low, high, low_open=False):
  try:
    a, b = (float(x) for x in v)
  except (TypeError, ValueError):
    raise ValueError(
        f"aug.{name} must be a pair (min, max) of numbers, got {v!r}") from None
  ok_low = a > low if low_open else a >= low
  if not (ok_low and a <= b <= high):
    lo_s = f"> {low}" if low_open else f">= {low}"
    raise ValueError(
        f"aug.{name} must satisfy min {lo_s}, min <= max <= {high}; got {v!r}")
  return (a, b)


def resolve(aug_config) -> dict:
  """The full augmentation settings: a preset with field-by-field overrides.

  Args:
    aug_config: ``config.aug`` (an ``ml_collections.ConfigDict``), a plain dict
      of the same fields, or the dict this function returned. ``preset``
      (default ``"tsimcne"``) picks the base values; every other field that is
      not None overrides the preset's value.

  Returns:
    A dict with ``preset`` and every field of :data:`FIELDS`, as plain Python
    values (tuples for pairs), safe to close over in a jitted function.

  Raises:
    ValueError: unknown preset or field, or a value out of range.
    TypeError: ``aug_config`` is not a mapping.
  """
  given = _as_dict(aug_config)
  preset = given.pop("preset", None) or "tsimcne"
  if preset not in PRESETS:
    raise ValueError(
        f"unknown augmentation preset {preset!r}; choose one of {sorted(PRESETS)}")
  unknown = sorted(set(given) - set(FIELDS))
  if unknown:
    raise ValueError(
        f"unknown augmentation field(s) {unknown}; known fields: {list(FIELDS)}")
  cfg = dict(PRESETS[preset])
  cfg.update({k: v for k, v in given.items() if v is not None})

  out = {"preset": preset}
  for name in ("crop_p", "hflip_p", "vflip_p", "rot90_p", "rotate_p",
               "jitter_p", "grayscale_p", "blur_p", "solarize_p",
               "solarize_threshold"):
    out[name] = _prob(name, cfg[name])
  out["crop_scale"] = _pair("crop_scale", cfg["crop_scale"], 0.0, 1.0,
                            low_open=True)
  out["crop_ratio"] = _pair("crop_ratio", cfg["crop_ratio"], 0.0, math.inf,
                            low_open=True)
  for name in ("rotate_degrees", "brightness", "contrast", "saturation"):
    out[name] = _nonneg(name, cfg[name])
  hue = float(cfg["hue"])
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f"aug.hue must be in [0, 0.5] (as torchvision), got {hue}")
  out["hue"] = hue
  out["blur_sigma"] = _pair("blur_sigma", cfg["blur_sigma"], 0.0, 1e3,
                            low_open=True)
  fill = str(cfg["fill"])
  if fill not in FILLS:
    raise ValueError(f"aug.fill must be one of {FILLS}, got {fill!r}")
  out["fill"] = fill
  fv = cfg["fill_value"]
  if fv is not None:
    if np.ndim(fv) == 0:
      fv = (fv,)
    fv = tuple(float(x) for x in fv)
    if len(fv) not in (1, 3) or not all(0.0 <= x <= 1.0 for x in fv):
      raise ValueError(
          f"aug.fill_value must be 1 or 3 numbers in [0, 1] (one per channel), "
          f"got {cfg['fill_value']!r}")
  out["fill_value"] = fv
  return out


# ---------------------------------------------------------------- geometry


def _rotation_inverse(theta, cx, cy):
  """(2, 3) map from output to input pixel coordinates of a rotation by theta.

  Positive theta turns the content counter-clockwise on screen (y points
  down), as torchvision and ``np.rot90``; the centre is the image centre.
  """
  c, s = jnp.cos(theta), jnp.sin(theta)
  # input = R(-theta) (out - centre) + centre, in y-down coordinates.
  return jnp.array([
      [c, -s, cx - c * cx + s * cy],
      [s, c, cy - s * cx - c * cy],
  ])


def sample_crop(u, height, width, scale, ratio):
  """Crop box (top, left, h, w) as torchvision's RandomResizedCrop.get_params.

  Ten attempts of area ~ U(scale) * H * W and log-uniform aspect ratio; the
  first one that fits is taken (position uniform over the valid offsets),
  otherwise the centre crop clamped to the ratio range. All vectorised, so it
  runs under jit and vmap.

  Args:
    u: (22,) independent U(0, 1) draws (10 areas, 10 ratios, 2 offsets).
    height, width: the image size (static).
    scale, ratio: the (min, max) ranges of area fraction and aspect ratio.

  Returns:
    int32 scalars (top, left, h, w).
  """
  area = float(height * width)
  log_r = (math.log(ratio[0]), math.log(ratio[1]))
  target = area * (scale[0] + (scale[1] - scale[0]) * u[0:10])
  aspect = jnp.exp(log_r[0] + (log_r[1] - log_r[0]) * u[10:20])
  # Python's round() is half-to-even, like jnp.round.
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  any_ok = jnp.any(ok)

  # Fallback: whole image, cut to the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fw, fh = int(round(height * max(ratio))), height
  else:
    fw, fh = width, height

  hh = jnp.where(any_ok, h[first], fh)
  ww = jnp.where(any_ok, w[first], fw)
  # randint(0, H - h + 1) in torchvision: uniform over the valid offsets.
  top = jnp.floor(u[20] * (height - hh + 1)).astype(jnp.int32)
  left = jnp.floor(u[21] * (width - ww + 1)).astype(jnp.int32)
  top = jnp.where(any_ok, jnp.minimum(top, height - hh), (height - fh) // 2)
  left = jnp.where(any_ok, jnp.minimum(left, width - ww), (width - fw) // 2)
  return top, left, hh, ww


def geometry(height, width, theta=0.0, box=None, hflip=False, vflip=False):
  """The composed geometric transform of one view, from explicit parameters.

  Forward order (as the reference's transforms): rotation by ``theta`` radians
  (rot90 included), crop ``box`` = (top, left, h, w) of the rotated image
  resized to (height, width), horizontal flip, vertical flip.

  Returns:
    ``(inner, lo, hi, outer)``: ``inner`` (2, 3) maps an output pixel (x, y)
    to the crop's frame (the rotated image); the result is clamped to the box
    ``[lo, hi]`` (x, y order), which is what resizing the cropped image does
    at its edges (torchvision crops, then resizes); ``outer`` (2, 3) maps the
    rotated image back to the input image.
  """
  if box is None:
    box = (0, 0, height, width)
  top, left, h, w = (jnp.asarray(v, jnp.float32) for v in box)
  # Flips act on the output: x -> W - 1 - x.
  fx = jnp.where(hflip, -1.0, 1.0)
  fy = jnp.where(vflip, -1.0, 1.0)
  ox = jnp.where(hflip, width - 1.0, 0.0)
  oy = jnp.where(vflip, height - 1.0, 0.0)
  # Resize with pixel centres aligned (align_corners=False, as torchvision):
  # x_crop = left + (x_out + 0.5) * w / W - 0.5.
  sx, sy = w / width, h / height
  inner = jnp.array([
      [sx * fx, 0.0, sx * ox + left + 0.5 * sx - 0.5],
      [0.0, sy * fy, sy * oy + top + 0.5 * sy - 0.5],
  ])
  lo = jnp.stack([left, top])
  hi = jnp.stack([left + w - 1.0, top + h - 1.0])
  outer = _rotation_inverse(jnp.asarray(theta, jnp.float32),
                            (width - 1) / 2.0, (height - 1) / 2.0)
  return inner, lo, hi, outer


def _rotates(cfg):
  return cfg["rot90_p"] > 0 or (cfg["rotate_p"] > 0 and
                                cfg["rotate_degrees"] > 0)


def sample_geometry(u, height, width, cfg):
  """Samples one view's geometry (see :func:`geometry`).

  Args:
    u: (29,) independent U(0, 1) draws: 22 for the crop box, then crop_p,
      rot90 (p, k), rotation (p, angle), hflip, vflip.
    height, width: the image size (static).
    cfg: the dict from :func:`resolve`.
  """
  theta = jnp.zeros(())
  if cfg["rot90_p"] > 0:
    k = jnp.minimum(1 + jnp.floor(3.0 * u[24]), 3.0)  # uniform in {1, 2, 3}
    theta = theta + jnp.where(u[23] < cfg["rot90_p"], k, 0.0) * (jnp.pi / 2)
  if cfg["rotate_p"] > 0 and cfg["rotate_degrees"] > 0:
    deg = cfg["rotate_degrees"]
    a = -deg + 2.0 * deg * u[26]
    theta = theta + jnp.deg2rad(jnp.where(u[25] < cfg["rotate_p"], a, 0.0))
  box = None
  if cfg["crop_p"] > 0:
    top, left, h, w = sample_crop(u[:22], height, width, cfg["crop_scale"],
                                  cfg["crop_ratio"])
    apply = u[22] < cfg["crop_p"]
    box = (jnp.where(apply, top, 0), jnp.where(apply, left, 0),
           jnp.where(apply, h, height), jnp.where(apply, w, width))
  hflip = u[27] < cfg["hflip_p"]
  vflip = u[28] < cfg["vflip_p"]
  return geometry(height, width, theta, box, hflip, vflip)


def _reflect_coord(x, n):
  """Half-sample symmetric reflection of a coordinate into [-0.5, n - 0.5]."""
  period = 2.0 * n
  y = jnp.mod(x + 0.5, period)
  y = jnp.where(y >= n, period - y, y) - 0.5
  # Within half a pixel of the edge the reflected image is flat, so clamping
  # gives the same bilinear value and keeps both neighbours inside.
  return jnp.clip(y, 0.0, n - 1.0)


def _axis_taps(scale, offset, lo, hi, n):
  """Bilinear taps along one axis of an axis-aligned warp: (i0, i1, frac)."""
  s = jnp.clip(scale * jnp.arange(n, dtype=jnp.float32) + offset, lo, hi)
  i0 = jnp.floor(s)
  frac = s - i0
  i0 = i0.astype(jnp.int32)
  # s <= hi <= n - 1, so i1 is clamped only where frac is 0.
  return i0, jnp.minimum(i0 + 1, n - 1), frac[:, None, None]


def _warp_axis_aligned(image, inner, lo, hi):
  """Crop and flips: resampled one axis at a time by gathering whole rows.

  The source coordinates of output pixel (y, x) are (ys[y], xs[x]), all inside
  the image, so bilinear sampling is a blend of two gathered columns followed
  by a blend of two gathered rows. Each gather copies a contiguous row of the
  (transposed) image instead of one pixel per tap: 2-3x faster on CPUs than
  the four-tap pixel gather, and faster than matrix products at every size.
  A uint8 image is gathered as bytes and converted after the first pass.
  """
  height, width, _ = image.shape
  x0, x1, fx = _axis_taps(inner[0, 0], inner[0, 2], lo[0], hi[0], width)
  y0, y1, fy = _axis_taps(inner[1, 1], inner[1, 2], lo[1], hi[1], height)
  columns = image.transpose(1, 0, 2)  # (W, H, C): a column is one row here
  c0, c1 = _to_float(columns[x0]), _to_float(columns[x1])
  rows = (c0 + fx * (c1 - c0)).transpose(1, 0, 2)  # (H, W_out, C)
  r0, r1 = rows[y0], rows[y1]
  return r0 + fy * (r1 - r0)


def warp(image, geom, fill="constant", fill_value=0.0, rotates=True):
  """Samples ``image`` once, bilinearly, through the geometry ``geom``.

  Args:
    image: (H, W, C) float32 in [0, 1] or uint8.
    geom: ``(inner, lo, hi, outer)`` from :func:`geometry`.
    fill: ``constant`` / ``border_mean`` (neighbours outside the image take
      ``fill_value``) or ``reflect`` (half-sample symmetric).
    fill_value: (C,) or scalar colour for points outside the image.
    rotates: static; False when ``outer`` is the identity. Then the warp is
      axis-aligned (crop and flips only, no point outside the image) and is
      resampled one axis at a time (:func:`_warp_axis_aligned`); the values
      are the same as the general four-tap gather's.

  Returns:
    (H, W, C) float32 in [0, 1].
  """
  height, width, _ = image.shape
  inner, lo, hi, outer = geom
  if not rotates:
    return _warp_axis_aligned(image, inner, lo, hi)

  image = _to_float(image)
  yy, xx = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  cx = jnp.clip(inner[0, 0] * xx + inner[0, 2], lo[0], hi[0])
  cy = jnp.clip(inner[1, 1] * yy + inner[1, 2], lo[1], hi[1])
  sx = outer[0, 0] * cx + outer[0, 1] * cy + outer[0, 2]
  sy = outer[1, 0] * cx + outer[1, 1] * cy + outer[1, 2]
  if fill == "reflect":
    sx, sy = _reflect_coord(sx, width), _reflect_coord(sy, height)
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  fill_value = jnp.asarray(fill_value, jnp.float32)

  def tap(y, x):
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    v = image[jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)]
    return jnp.where(inside[..., None], v, fill_value)

  return ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)) +
          fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))


# ------------------------------------------------------------------ colour


def rgb_to_gray(image):
  """(H, W, 3) -> (H, W, 1) luma with ITU-R 601 weights; (H, W, 1) unchanged."""
  if image.shape[-1] == 1:
    return image
  # Explicit slices: XLA on CPU reduces a minor axis of 3 slowly.
  wr, wg, wb = _GRAY_WEIGHTS
  return wr * image[..., :1] + wg * image[..., 1:2] + wb * image[..., 2:3]


def _blend(image, other, factor):
  """torchvision's _blend: clip(factor * image + (1 - factor) * other)."""
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  return _blend(image, 0.0, factor)


def mean_gray(image):
  """Mean of the grayscale image, as one matrix-vector product and a sum.

  Each row of the (H, W, C) image is dotted with the luma weights repeated
  along it; on CPUs this is several times faster than reducing the gray
  image (XLA:CPU's reduction kernels are slow on these shapes).
  """
  height, width, channels = image.shape
  weights = jnp.asarray(_GRAY_WEIGHTS if channels == 3 else (1.0,), jnp.float32)
  rows = image.reshape(height, width * channels) @ jnp.tile(weights, width)
  return jnp.sum(rows) / (height * width)


def adjust_contrast(image, factor):
  # Blended with the mean of the grayscale image (torchvision).
  return _blend(image, mean_gray(image), factor)


def adjust_saturation(image, factor):
  if image.shape[-1] == 1:  # torchvision leaves 1-channel images alone
    return image
  return _blend(image, rgb_to_gray(image), factor)


def _frac(x):
  """x mod 1 (jnp.mod is several times slower on CPU)."""
  return x - jnp.floor(x)


def _rgb_to_hsv_planes(r, g, b):
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  delta = maxc - minc
  s = delta / jnp.where(maxc > 0, maxc, 1.0)
  # Sector of the largest channel (colorsys' order of ties: r, g, b).
  num = jnp.where(maxc == r, g - b,
                  jnp.where(maxc == g, 2.0 * delta + b - r, 4.0 * delta + r - g))
  h = _frac(num / (6.0 * jnp.where(delta > 0, delta, 1.0)))
  return h, s, maxc


def _hsv_to_rgb_planes(h, s, v):
  # Closed form of the six-sector formula: channel n in (R, G, B) = (5, 3, 1)
  # is v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6; far fewer
  # ops than a select per sector.
  def channel(n):
    k = 6.0 * _frac((n + 6.0 * h) / 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return channel(5.0), channel(3.0), channel(1.0)


# Colour ops work on separate channel planes and stack once: XLA on CPU is
# slow at element-wise work along a minor axis of size 3.


def rgb_to_hsv(image):
  """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
  return jnp.stack(_rgb_to_hsv_planes(image[..., 0], image[..., 1],
                                      image[..., 2]), -1)


def hsv_to_rgb(hsv):
  """Inverse of :func:`rgb_to_hsv`."""
  return jnp.stack(_hsv_to_rgb_planes(hsv[..., 0], hsv[..., 1], hsv[..., 2]),
                   -1)


def _hue_rotated_planes(r, g, b, shift):
  """R, G, B planes with the hue turned by ``shift`` turns.

  The same map as ``hsv_to_rgb(rgb_to_hsv(.) + (shift, 0, 0))``, written
  without a division: a hue rotation keeps each pixel's largest channel and
  its spread delta = max - min, and the closed form of
  :func:`_hsv_to_rgb_planes` scaled by delta needs only the hue's numerator.
  In units of delta, channel n's sector position k = n + 6 h lies in
  [-3, 13), so "mod 6" is a few compares. About 3x faster on CPUs than the
  round trip, which divides twice per pixel.
  """
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
  # 6 h delta, as in _rgb_to_hsv_planes (colorsys' order of ties: r, g, b).
  num = jnp.where(maxc == r, g - b,
                  jnp.where(maxc == g, 2.0 * delta + b - r, 4.0 * delta + r - g))
  shift = shift - jnp.round(shift)  # the same turn, in [-0.5, 0.5]
  base = num + (6.0 * shift) * delta
  turn = 6.0 * delta

  def channel(n):
    k = base + n * delta
    k = (k - turn * (k >= turn) - turn * (k >= 2.0 * turn) + turn * (k < 0.0))
    return maxc - jnp.clip(jnp.minimum(k, 4.0 * delta - k), 0.0, delta)

  return channel(5.0), channel(3.0), channel(1.0)


def adjust_hue(image, shift):
  """Rotates the hue by ``shift`` turns in HSV space (torchvision adjust_hue)."""
  if image.shape[-1] == 1:
    return image
  return jnp.stack(_hue_rotated_planes(image[..., 0], image[..., 1], image[..., 2],
                                       shift), -1)


def _jitter_params(u, cfg, channels):
  """Sampled ColorJitter parameters: (apply, factors, hue shift, perm).

  ``factors`` are (brightness, contrast, saturation), each 1 where the op is
  off or the jitter is not applied; ``perm[i]`` is the op (0..3, 3 = hue)
  that comes i-th.
  """
  apply = u[0] < cfg["jitter_p"]

  def factor(v, x):
    if x <= 0:
      return jnp.ones(())
    lo = max(0.0, 1.0 - x)
    return jnp.where(apply, lo + (1.0 + x - lo) * v, 1.0)

  factors = jnp.stack([factor(u[1], cfg["brightness"]),
                       factor(u[2], cfg["contrast"]),
                       # torchvision leaves the saturation of gray images.
                       factor(u[3], cfg["saturation"] if channels == 3 else 0.0)])
  shift = cfg["hue"] * (2.0 * u[4] - 1.0)
  # Random order of the ops, as torch.randperm(4): the ranks of four
  # independent uniforms are a uniform permutation.
  return apply, factors, shift, jnp.argsort(u[5:9])


def color_jitter(u, image, cfg, branches=False):
  """ColorJitter with its four ops in a random order (torchvision semantics).

  Factors are uniform in [max(0, 1 - x), 1 + x] for brightness, contrast and
  saturation, and the hue shift in [-hue, hue].

  Args:
    u: (9,) independent U(0, 1) draws: apply, brightness, contrast,
      saturation, hue, and 4 for the order.
    image: (H, W, C) float32 in [0, 1].
    cfg: the dict from :func:`resolve`.
    branches: static. False (for use under vmap): every op of every slot is
      computed and selected arithmetically, which is what vmap makes of
      branches anyway. True (one image at a time): each of the four places
      runs only its op, and nothing runs when the jitter is not applied.
      Both give the same values.
  """
  return _apply_jitter(_jitter_params(u, cfg, image.shape[-1]), image, cfg,
                       branches)


def _apply_jitter(params, image, cfg, branches):
  """:func:`color_jitter` with its parameters from :func:`_jitter_params`."""
  apply, factors, shift, perm = params
  use_hue = cfg["hue"] > 0 and image.shape[-1] == 3
  if branches:
    ops = [lambda x: adjust_brightness(x, factors[0]),
           lambda x: adjust_contrast(x, factors[1]),
           lambda x: adjust_saturation(x, factors[2]),
           (lambda x: adjust_hue(x, shift)) if use_hue else (lambda x: x)]

    def in_order(x):
      # Unrolled: a loop would copy the image into its carry at every place.
      for i in range(4):
        x = jax.lax.switch(perm[i], ops, x)
      return x

    return jax.lax.cond(apply, in_order, lambda x: x, image)

  # Brightness, contrast and saturation are all blends (with black, the mean
  # gray, the gray image), so the three are applied through one blend whose
  # target is chosen per slot; the hue op runs once, between the blends that
  # precede and follow it in the sampled order.
  hue_pos = jnp.argmax(perm == 3)
  # The three blend ops in the order they occur, and how many precede hue.
  blend_order = perm[jnp.argsort((perm == 3).astype(jnp.int32), stable=True)][:3]
  is_contrast = (blend_order == 1).astype(jnp.float32)
  is_saturation = (blend_order == 2).astype(jnp.float32)

  def blends(img, active_slots):
    # One blend per slot; its target (black, mean gray or gray image) is
    # picked arithmetically. A loop keeps one copy of the body in the
    # compiled program.
    def body(slot, img):
      f = jnp.where(active_slots[slot], factors[blend_order[slot]], 1.0)
      gray = rgb_to_gray(img)
      # The gray image is needed here anyway, so its mean is one reduction
      # (mean_gray's product was slower inside this loop: 1.05 vs 0.81 ms per
      # 224-px jitter).
      target = (is_contrast[slot] * jnp.mean(gray) +
                is_saturation[slot] * gray)
      return _blend(img, target, f)
    return jax.lax.fori_loop(0, 3, body, img)

  slots = jnp.arange(3)
  if not use_hue:
    return blends(image, jnp.ones((3,), bool))
  image = blends(image, slots < hue_pos)
  image = jnp.where(apply, adjust_hue(image, shift), image)
  return blends(image, slots >= hue_pos)


# -------------------------------------------------------------- blur etc.


def _blur_matrix(sigma, n, radius):
  """(n, n) matrix of a 1-D Gaussian blur with reflect padding (no edge repeat).

  torchvision's gaussian_blur pads with 'reflect' (d c b | a b c d | c b a).
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  k = k / k.sum()
  src = jnp.arange(n)[:, None] + jnp.arange(-radius, radius + 1)[None, :]
  # Whole-sample reflection, iterated in case the kernel is wider than n.
  period = 2 * (n - 1) if n > 1 else 1
  src = jnp.mod(src, period)
  src = jnp.where(src >= n, period - src, src)
  return jnp.zeros((n, n)).at[jnp.arange(n)[:, None], src].add(
      jnp.broadcast_to(k, src.shape))


def gaussian_blur(image, sigma, radius):
  """Separable Gaussian blur of (H, W, C) with standard deviation ``sigma``."""
  height, width, _ = image.shape
  by = _blur_matrix(sigma, height, radius)
  bx = _blur_matrix(sigma, width, radius)
  return jnp.einsum("oh,hwc,pw->opc", by, image, bx,
                    precision=jax.lax.Precision.HIGHEST)


def solarize(image, threshold):
  """Inverts pixels at or above ``threshold`` (torchvision RandomSolarize)."""
  return jnp.where(image >= threshold, 1.0 - image, image)


# ------------------------------------------------------------------ public


def _fill_colour(cfg, channels):
  fv = cfg["fill_value"]
  if fv is None or cfg["fill"] == "reflect":
    # border_mean without statistics: black, as torchvision's default fill.
    return jnp.zeros((channels,), jnp.float32)
  if len(fv) == 1:
    fv = fv * channels
  if len(fv) != channels:
    raise ValueError(
        f"aug.fill_value has {len(fv)} values but the images have {channels} "
        f"channels; give one value per channel")
  return jnp.asarray(fv, jnp.float32)


def _maybe(pred, fn, image, branches):
  """``fn(image)`` where ``pred``, else ``image``; a real branch if ``branches``."""
  if branches:
    return jax.lax.cond(pred, fn, lambda x: x, image)
  return jnp.where(pred, fn(image), image)


def _has_geometry(cfg):
  return (cfg["crop_p"] > 0 or cfg["hflip_p"] > 0 or cfg["vflip_p"] > 0 or
          _rotates(cfg))


def _has_jitter(cfg):
  return cfg["jitter_p"] > 0 and (cfg["brightness"] > 0 or cfg["contrast"] > 0
                                  or cfg["saturation"] > 0 or cfg["hue"] > 0)


def sample_view(key, shape, cfg):
  """Every random parameter of one view of an image of ``shape`` (H, W, C).

  A pytree of small arrays (vmappable over keys); :func:`apply_view` applies
  them. Sampling the whole batch's parameters at once keeps the per-image
  work (a scan on CPUs) to the image ops themselves.
  """
  height, width, channels = shape
  # One draw of every uniform this view needs (one hash call compiles much
  # faster than a dozen split/uniform calls; the numbers are as independent).
  u = jax.random.uniform(key, (_N_UNIFORMS,))
  params = {
      "grayscale": u[38] < cfg["grayscale_p"],
      "blur": (u[40] < cfg["blur_p"],
               cfg["blur_sigma"][0] + (cfg["blur_sigma"][1] - cfg["blur_sigma"][0]) * u[39]),
      "solarize": u[41] < cfg["solarize_p"],
  }
  if _has_geometry(cfg):
    params["geometry"] = sample_geometry(u[0:29], height, width, cfg)
  if _has_jitter(cfg):
    params["jitter"] = _jitter_params(u[29:38], cfg, channels)
  return params


def apply_view(params, image, cfg, branches=False):
  """Applies the parameters from :func:`sample_view` to one image.

  Args:
    params: :func:`sample_view`'s result for this image.
    image: (H, W, C) uint8 or float in [0, 1], C = 1 or 3.
    cfg: the dict returned by :func:`resolve` (static Python values).
    branches: static. True when the image is augmented alone rather than
      under vmap: ops that are not applied to this view are skipped by real
      branches (``lax.cond``) instead of computed and discarded. The values
      are the same either way.

  Returns:
    (H, W, C) float32 in [0, 1].
  """
  height, width, channels = image.shape
  if _has_geometry(cfg):
    # The warp converts to float itself: a uint8 image after its gathers.
    image = warp(image, params["geometry"], cfg["fill"],
                 _fill_colour(cfg, channels), rotates=_rotates(cfg))
  image = _to_float(image)

  if _has_jitter(cfg):
    image = _apply_jitter(params["jitter"], image, cfg, branches)

  if cfg["grayscale_p"] > 0 and channels == 3:
    image = _maybe(params["grayscale"],
                   lambda x: jnp.broadcast_to(rgb_to_gray(x), x.shape), image,
                   branches)

  if cfg["blur_p"] > 0:
    radius = max(1, min(int(math.ceil(3.0 * cfg["blur_sigma"][1])),
                        max(height, width) - 1))
    apply, sigma = params["blur"]
    image = _maybe(apply, lambda x: gaussian_blur(x, sigma, radius), image,
                   branches)

  if cfg["solarize_p"] > 0:
    image = _maybe(params["solarize"],
                   lambda x: solarize(x, cfg["solarize_threshold"]), image,
                   branches)
  return image


def _to_float(images):
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
        f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  return images.astype(jnp.float32)


def augment_batch(key, images, aug_config, mesh=None):
  """Augments a batch, one independent view per image.

  Args:
    key: one jax PRNG key; one key per image is split from it.
    images: (B, H, W, C) uint8 (C = 1 or 3) or float in [0, 1].
    aug_config: ``config.aug``, a dict of the same fields, or :func:`resolve`'s
      result. Must be static (plain Python values), never traced.
    mesh: optional, the mesh (jaxembed.parallel.make_mesh) whose ``data``
      axis shards the batch; see :func:`augment_views`. The views are the
      same with or without it.

  Returns:
    (B, H, W, C) float32 in [0, 1].
  """
  return augment_with_keys(jax.random.split(key, images.shape[0]), images, aug_config,
                           mesh)


def augment_with_keys(keys, images, aug_config, mesh=None):
  """:func:`augment_batch` with the per-image keys given: ``keys[i]`` draws image i's view.

  The same keys give the same views whichever subset of the batch is
  augmented at once (the two-pass step re-creates views chunk by chunk).
  """
  return augment_views(keys[None], images, aug_config, mesh)


def augment_views(keys, images, aug_config, mesh=None):
  """Several views of every image of a batch, in one program.

  Args:
    keys: (V, B) jax PRNG keys; ``keys[v, i]`` draws view v of image i.
      ``augment_batch(k, images)`` equals
      ``augment_views(jax.random.split(k, B)[None], images)``.
    images: (B, H, W, C) uint8 (C = 1 or 3) or float in [0, 1].
    aug_config: as for :func:`augment_batch`.
    mesh: optional, the mesh whose ``data`` axis shards the batch (the
      trainer's, jaxembed.parallel.make_mesh). With CPU devices it lets each
      device scan its own shard (:func:`_map_views`); without it several
      devices share a vmap that the compiler partitions. B must divide
      evenly over the ``data`` axis.

  Returns:
    (B * V, H, W, C) float32 in [0, 1], image-major: row ``i * V + v`` is
    view v of image i (``out.reshape(B, V, H, W, C)[:, v]`` equals
    :func:`augment_with_keys` of ``keys[v]``). A batch sharded over the
    mesh's ``data`` axis gives views sharded the same way.
  """
  cfg = resolve(aug_config)
  images = jnp.asarray(images)
  if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)  # raw uint32 keys (jax.random.PRNGKey)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"images must be (batch, height, width, channels) with 1 or 3 "
        f"channels, got shape {tuple(images.shape)}")
  if keys.ndim != 2 or keys.shape[1] != images.shape[0]:
    raise ValueError(
        f"keys must be (views, batch) = (V, {images.shape[0]}) PRNG keys for "
        f"{images.shape[0]} images, got shape {tuple(keys.shape)}")
  if cfg["rot90_p"] > 0 and images.shape[1] != images.shape[2]:
    raise ValueError(
        f"aug.rot90_p > 0 needs square images, got {images.shape[1]}x"
        f"{images.shape[2]}; resize them (data.image_size) or set rot90_p=0")
  if mesh is not None:
    parallel.data_axis_size(mesh, images.shape[0], "augmentation")
  return _map_views(keys, images, cfg, mesh)


def _scans_views(height, width, mesh):
  """Whether :func:`_map_views` scans the views one at a time (else vmaps)."""
  if height * width < _CPU_BRANCH_PIXELS:
    return False
  if mesh is None:
    return parallel.uses_cpu_paths() and jax.device_count() == 1
  return parallel.uses_cpu_paths(mesh)


def _scan_views(keys, x, cfg):
  """(B * V, H, W, C) views of ``x`` (image-major), scanned one at a time with branches."""
  views, batch = keys.shape
  # Row j = i * V + v is view v of image i.
  params = jax.vmap(lambda k: sample_view(k, x.shape[1:], cfg))(keys.T.reshape(-1))

  def one(j):
    p = jax.tree.map(lambda t: t[j], params)
    return apply_view(p, x[j // views], cfg, branches=True)

  return jax.lax.map(one, jnp.arange(batch * views))


def _map_views(keys, x, cfg, mesh=None):
  """:func:`augment_views` once the inputs are checked.

  On accelerators and for small images, the parameters of all views are
  sampled at once (vmapped, small), then applied to the images, vmapped over
  the batch. On CPU devices, images of at least ``_CPU_BRANCH_PIXELS``
  (64x64) pixels are instead scanned one at a time, unbatched, so that their
  random ops branch (:func:`apply_view`): the jitter's four places run one
  op each instead of all four, and an op not applied costs nothing. XLA:CPU
  also runs each op of a vmapped batch over the whole batch before the next,
  streaming it through memory, where one 224-px view (600 KiB) stays in
  cache across its ops. The scan walks all views into one output and reads
  the images from the uint8 batch in place. Two views, 2 cores, against the
  vmap: 1.5x faster at 64 px, 2.4x at 224 px (docs/augment.md).

  That is done on one CPU device, or on each CPU device of ``mesh`` over its
  own shard of the batch (``jax.shard_map`` over ``data``). With one XLA CPU
  device per core, each core then runs a scan of its own instead of sharing
  every op of one scan with the other cores, whose threads wait on each other
  after every op: 1.3-1.4x faster at 224 px on 2 cores (docs/augment.md).
  Several devices without ``mesh`` keep the vmap, which the compiler
  partitions. Values are those of the vmap up to float rounding of the
  compiled code.

  The output is image-major (all views of image 0, then of image 1, ...), so
  that a batch sharded over ``data`` gives views sharded the same way: each
  device's rows are the views of its own images, and nothing moves between
  devices.
  """
  views, batch = keys.shape
  height, width = x.shape[1:3]
  if _scans_views(height, width, mesh):
    if mesh is None or mesh.devices.size == 1:
      return _scan_views(keys, x, cfg)
    return jax.shard_map(lambda k, im: _scan_views(k, im, cfg), mesh=mesh,
                         in_specs=(P(None, DATA_AXIS), P(DATA_AXIS)),
                         out_specs=P(DATA_AXIS))(keys, x)

  params = jax.vmap(lambda k: sample_view(k, x.shape[1:], cfg))(keys.reshape(-1))
  apply = jax.vmap(lambda p, im: apply_view(p, im, cfg))
  out = [apply(jax.tree.map(lambda t: t[v * batch:(v + 1) * batch], params), x)
         for v in range(views)]
  return out[0] if views == 1 else jnp.stack(out, axis=1).reshape(batch * views, *x.shape[1:])


def border_mean(images) -> tuple:
  """Mean colour of the one-pixel border of every image of a dataset.

  Args:
    images: (N, H, W, C) or (N, H, W) uint8 (or float in [0, 1]).

  Returns:
    A tuple of C floats in [0, 1] (the ``fill_value`` for ``fill="border_mean"``).
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
    raise ValueError(
        f"border_mean needs images of shape (N, H, W[, C]) with H, W >= 2, got "
        f"{x.shape}")
  scale = 255.0 if x.dtype == np.uint8 else 1.0
  mask = np.zeros(x.shape[1:3], bool)
  mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
  # Sum in float64 over a few images at a time to keep memory flat.
  total = np.zeros(x.shape[-1])
  for s in range(0, x.shape[0], 4096):
    total += x[s:s + 4096][:, mask].astype(np.float64).sum(axis=(0, 1))
  mean = total / (x.shape[0] * mask.sum()) / scale
  return tuple(float(v) for v in mean)
