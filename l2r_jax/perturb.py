"""Perturbations: deletion masks (soft and hard), resampling between cells and pixels, Gaussian
smoothing, reference images and blending.

Conventions: images are f32[B, H, W, C] in [0, 1] pixel space; maps and masks are f32[..., H, W];
a mask value of 1 means "replaced by the reference". Cells of a g x g grid are numbered row-major.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks

Array = jax.Array

# ImageNet mean colour in [0, 1] pixel space (METHOD.md, item 6).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
# The references a deleted pixel can be replaced by; the paper trains and evaluates with the
# first three. 'noise' is a fixed field of uniform noise, for evaluating under a replacement
# that training never saw (configs' eval.unseen_protocol).
REFERENCES = ("black", "mean", "blur", "noise")
PAPER_REFERENCES = ("black", "mean", "blur")
NOISE_SEED = 0
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- soft masks


def fraction_weights(fractions: np.ndarray, n: int) -> np.ndarray:
  """Rank-row weights f32[K, n] of a sweep: W[k, j] = clip(p_k * n - j, 0, 1).

  Row j of a soft permutation enters fraction p fully when j + 1 <= p * n and with the weight
  p * n - floor(p * n) when j = floor(p * n): exactly the floor/ceil linear interpolation of the
  cumulative row sums, written as one matrix so the sweep is a single matmul.
  """
  p = checks.fractions(fractions)
  return np.clip(p[:, None] * n - np.arange(n)[None, :], 0.0, 1.0).astype(
      np.float32)


def soft_deletion_masks(perm: Array, fractions: Sequence[float] | np.ndarray) -> Array:
  """Soft deletion masks of a sweep: f32[B, K, N], item i's share of the deleted mass.

  mask[b, k, i] = clamp(sum_j W[k, j] P[b, j, i], 0, 1) with W from `fraction_weights`: the
  cumulative sum of the first p_k * N rank rows of P, interpolated between floor and ceil.

  Args:
    perm: f32[B, N(ranks), N(items)] soft permutation, rank 0 first (`sorting.soft_sort`).
    fractions: K fractions in [0, 1], increasing (METHOD.md: linspace(0, 1, 16)).
  """
  checks.rank(perm, 3, "perm", "f32[B, N, N]")
  if perm.shape[-1] != perm.shape[-2]:
    raise ValueError(f"perm must be square in its last two dims (f32[B, N, N]), got {perm.shape}")
  w = jnp.asarray(fraction_weights(fractions, perm.shape[-1]))
  # HIGHEST: GPUs would otherwise run this f32 matmul in TF32 (10-bit mantissa); it is cheap.
  masks = jnp.einsum("kj,bji->bki", w, perm.astype(jnp.float32), precision=_HIGHEST)
  return jnp.clip(masks, 0.0, 1.0)


# ----------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """f32[out, in] averaging matrix of adaptive average pooling (PyTorch's bins:
  [floor(o * in / out), ceil((o + 1) * in / out))), so any size pools to any grid."""
  a = np.zeros((out_size, in_size), np.float32)
  for o in range(out_size):
    lo, hi = (o * in_size) // out_size, -((-(o + 1) * in_size) // out_size)
    a[o, lo:hi] = 1.0 / (hi - lo)
  return a


@functools.lru_cache(maxsize=None)
def nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """i32[out]: source index of each output position of nearest upsampling, floor(o * in / out)
  (PyTorch's `interpolate(mode='nearest')`)."""
  return ((np.arange(out_size) * in_size) // out_size).astype(np.int32)


def pool_to_grid(maps: Array, grid: int) -> Array:
  """Adaptive average pooling of maps f32[B, H, W] to cell scores f32[B, grid * grid] (row-major)."""
  checks.rank(maps, 3, "maps", "f32[B, H, W]")
  grid = checks.static_int(grid, "grid")
  _, h, w = maps.shape
  if grid > min(h, w):
    raise ValueError(f"grid must be <= the map size {min(h, w)}, got {grid}")
  ah = jnp.asarray(adaptive_pool_matrix(h, grid))
  aw = jnp.asarray(adaptive_pool_matrix(w, grid))
  cells = jnp.einsum("ih,bhw,jw->bij", ah, maps.astype(jnp.float32), aw, precision=_HIGHEST)
  return cells.reshape(maps.shape[0], grid * grid)


def upsample_cells(cells: Array, grid: int, size: tuple[int, int]) -> Array:
  """Nearest upsampling of cell values f32[..., grid * grid] to pixels f32[..., H, W]."""
  grid = checks.static_int(grid, "grid")
  if cells.shape[-1] != grid * grid:
    raise ValueError(f"cells must have shape [..., {grid * grid}] for grid {grid}, "
                     f"got {cells.shape}")
  h, w = size
  c = cells.reshape(*cells.shape[:-1], grid, grid)
  c = jnp.take(c, jnp.asarray(nearest_index(grid, h)), axis=-2)
  return jnp.take(c, jnp.asarray(nearest_index(grid, w)), axis=-1)


# ----------------------------------------------------------------------------- smoothing


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
  """f32[size] normalised Gaussian taps on offsets -(size-1)/2 .. (size-1)/2 (torchvision's)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _filter_axis(x: Array, taps: np.ndarray, axis: int) -> Array:
  """Correlates x with odd-length taps along one axis, reflect padding (no edge repeat)."""
  r = (len(taps) - 1) // 2
  n = x.shape[axis]
  if r >= n:
    raise ValueError(f"a Gaussian filter of size {len(taps)} needs a spatial size > {r} for "
                     f"reflect padding, got {n}: choose a smaller kernel size (e.g. blur_size)")
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = jnp.pad(x, pad, mode="reflect")
  out = 0.0
  for t, tap in enumerate(taps):
    out = out + float(tap) * jax.lax.slice_in_dim(xp, t, t + n, axis=axis)
  return out


def gaussian_blur(x: Array, sigma: float, size: int | None = None,
                  axes: tuple[int, int] = (-2, -1)) -> Array:
  """Separable Gaussian blur over two axes with reflect padding.

  Args:
    x: any float array; `axes` names its spatial axes ((-2, -1) for maps f32[..., H, W],
      (-3, -2) for images f32[B, H, W, C]).
    sigma: standard deviation in pixels, > 0.
    size: odd kernel size; default 2 * ceil(3 sigma) + 1.
  """
  checks.positive(sigma, "sigma")
  size = 2 * math.ceil(3 * sigma) + 1 if size is None else checks.static_int(size, "size")
  if size % 2 != 1:
    raise ValueError(f"size must be odd, got {size}")
  taps = gaussian_kernel(sigma, size)
  for axis in axes:
    x = _filter_axis(x, taps, axis)
  return x


def smooth_masks(masks: Array, sigma: float = 1.0, size: int | None = None) -> Array:
  """Gaussian-smooths pixel masks f32[..., H, W] (METHOD.md: sigma 1 px, reflect padding)."""
  return gaussian_blur(masks, sigma, size, axes=(-2, -1))


# ----------------------------------------------------------------------------- references


def reference_images(images: Array,
                     reference: str | Array = "mean",
                     *,
                     mean_color: Sequence[float] = IMAGENET_MEAN,
                     blur_size: int = 37,
                     blur_sigma: float = 37.0) -> Array:
  """The images that deleted pixels are replaced by: f32[B, H, W, C].

  Args:
    images: f32[B, H, W, C] in [0, 1].
    reference: 'black' (zeros), 'mean' (`mean_color` everywhere), 'blur' (Gaussian blur of each
      image, kernel `blur_size`, sigma `blur_sigma`, reflect padding: METHOD.md's 37 / 37),
      'noise' (one fixed field u ~ U[0, 1) per pixel and channel, drawn from NOISE_SEED, the same
      for every image of that size whatever the batch or device count), or a user array broadcastable to images' shape (f32[C], f32[H, W, C] or f32[B, H, W, C]).
  """
  checks.rank(images, 4, "images", "f32[B, H, W, C]")
  if isinstance(reference, str):
    checks.choice(reference, REFERENCES, "reference")
    if reference == "black":
      return jnp.zeros_like(images)
    if reference == "mean":
      color = jnp.asarray(mean_color, images.dtype)
      checks.shape(color, (images.shape[-1],), "mean_color", f"f32[{images.shape[-1]}]")
      # zeros_like + color, not broadcast_to: the result must vary over devices like the images
      # under shard_map (all references of a lax.switch need the same type).
      return jnp.zeros_like(images) + color
    if reference == "noise":
      field = jax.random.uniform(jax.random.key(NOISE_SEED), images.shape[1:], images.dtype)
      return jnp.zeros_like(images) + field
    return gaussian_blur(images, blur_sigma, blur_size, axes=(-3, -2))
  checks.floating(reference, "reference")
  try:
    return jnp.zeros_like(images) + jnp.broadcast_to(jnp.asarray(reference, images.dtype),
                                                      images.shape)
  except ValueError:
    raise ValueError(f"reference array must broadcast to images' shape {images.shape} "
                     f"(f32[C], f32[H, W, C] or f32[B, H, W, C]), got {np.shape(reference)}"
                     ) from None


def blend(images: Array, references: Array, masks: Array) -> Array:
  """Perturbed images x + mask * (ref - x): f32[B, K, H, W, C] for masks f32[B, K, H, W]."""
  checks.rank(images, 4, "images", "f32[B, H, W, C]")
  checks.shape(references, images.shape, "references", f"{images.shape} (like images)")
  b, h, w, _ = images.shape
  checks.shape(masks, (b, None, h, w), "masks", f"f32[{b}, K, {h}, {w}]")
  m = masks[..., None].astype(images.dtype)
  return images[:, None] + m * (references - images)[:, None]


# ----------------------------------------------------------------------------- hard masks


def unit_scores(maps: Array, unit: int = 1) -> Array:
  """Scores of the ranking units: f32[B, H // unit, W // unit], the mean of each unit x unit
  patch (unit 1 = pixels). The patch must tile the map exactly (e.g. 16 for a ViT-B/16 at 224)."""
  checks.rank(maps, 3, "maps", "f32[B, H, W]")
  unit = checks.static_int(unit, "unit")
  b, h, w = maps.shape
  if h % unit or w % unit:
    raise ValueError(f"unit {unit} must divide the map size {h} x {w}")
  if unit == 1:
    return maps
  return maps.reshape(b, h // unit, unit, w // unit, unit).mean(axis=(2, 4))


def descending_ranks(scores: Array) -> Array:
  """Rank of each item when scores f32[B, N] are sorted descending: i32[B, N], 0 = highest.

  Ties are broken by position: of equal scores, the lower (row-major) index ranks first. The same
  rule holds for the insertion order, which ranks -scores.
  """
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def deletion_counts(fractions: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
  """i32[K]: how many of n units fraction p deletes, round(p * n) (half to even, as Python)."""
  p = checks.fractions(fractions)
  return np.round(p * n).astype(np.int32)


def hard_mask_from_ranks(ranks: Array, count: Array, unit: int = 1) -> Array:
  """Mask f32[B, H, W] deleting the `count` top-ranked units, for unit ranks i32[B, h, w]."""
  m = (ranks < count).astype(jnp.float32)
  if unit > 1:
    m = jnp.repeat(jnp.repeat(m, unit, axis=-2), unit, axis=-1)
  return m


def hard_deletion_masks(maps: Array, fractions: Sequence[float] | np.ndarray,
                        unit: int = 1) -> Array:
  """Hard deletion masks f32[B, K, H, W]: fraction p deletes the round(p * n) top-ranked units.

  Args:
    maps: f32[B, H, W] attribution maps, finite; larger means more important.
    fractions: K fractions in [0, 1], increasing.
    unit: side of the square ranking unit in pixels (1 = pixel-level, the paper's protocol).
  """
  checks.finite(maps, "maps")
  s = unit_scores(maps, unit)
  b, gh, gw = s.shape
  ranks = descending_ranks(s.reshape(b, gh * gw)).reshape(b, gh, gw)
  counts = deletion_counts(fractions, gh * gw)
  return jnp.stack([hard_mask_from_ranks(ranks, int(c), unit) for c in counts], axis=1)
