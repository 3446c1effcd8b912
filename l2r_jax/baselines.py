"""Attribution baselines on a frozen target: gradients, integrated gradients, SmoothGrad, Grad-CAM,
attention rollout, RISE and random maps, all in JAX.

`attribute(method, target, variables, images, classes)` returns maps f32[B, H, W] (larger = more
important) of `classes` for [0, 1] pixel-space images; gradients are taken with respect to those
pixels (the target normalises internally). The definitions, with x the image, c its class, f_c
the class LOGIT (what captum's attributions of a model's outputs differentiate), m = 1..3 the
colour channel:

  random                       u ~ U[0, 1) per pixel, from the image's key.
  gradient                     max_m |d f_c / d x_m|  (Simonyan et al. 2014; captum Saliency).
  gradient_x_input             |sum_m x_m d f_c / d x_m|  (abs of the channel sum).
  integrated_gradients         sum_m |IG_m|, with IG = (x - x') * sum_k w_k grad f_c(x' + a_k (x - x'))
                               (Sundararajan et al. 2017) and the black baseline x' = 0; the
                               nodes a_k and weights w_k are `Options.ig_rule`, by default the
                               midpoint Riemann sum a_k = (k + 1/2) / n, w_k = 1 / n.
  integrated_gradients_signed  sum_m IG_m  (signed).
  smoothgrad                   (1 / n) sum_i max_m |grad f_c(x + e_i)|_m, e_i ~ N(0, sigma^2) per
                               pixel and channel, sigma a fraction of the [0, 1] range, noisy
                               copies not clipped (Smilkov et al. 2017): the mean 'gradient' map.
  gradcam                      up(relu(sum_k w_k A_k)), w_k = mean over h, w of d f_c / d A_k,
                               A f[h, w, K] the features' 'spatial' map (a ViT: the last block's
                               norm1 token grid), up = bilinear resize to H x W with half-pixel
                               centres (cv2.resize, as pytorch-grad-cam). Not min-max normalised:
                               pytorch-grad-cam's map is this one scaled and shifted per image.
  cam                          up(sum_k r_k A_k), r the head row of class c (Zhou et al. 2016's class
                               activation map, no relu): the class evidence the explainer's
                               class_evidence option starts from. For a head that average-pools
                               A (the CNNs), the mean of sum_k r_k A_k over h, w is f_c minus the
                               bias, and Grad-CAM is up(relu(.)) / (h w) of the same map.
  rollout                      ViTs only (Abnar & Zuidema 2020): R = prod_l normrows(0.5 I +
                               0.5 mean_heads(A_l)) from the last layer on the left, the class
                               token's row over the patches as the grid, upsampled as Grad-CAM.
                               `rollout_discard` > 0 zeroes that fraction of each layer's
                               smallest fused attentions first (never the class token's
                               self-attention), as jacobgil/vit-explain.
  rise                         (1 / (N p)) sum_i softmax_c(f(x * M_i)) M_i (Petsiuk et al. 2018):
                               M_i a random s x s grid of cells kept with probability p, resized
                               bilinearly to (s + 1) * ceil(H / s) and cropped H x W at a random
                               shift in [0, ceil(H / s)); masked pixels go to 0 in pixel space
                               (black). The same masks for every image of a call.

Integrated gradients, SmoothGrad and RISE evaluate many images per input; they go through the
target `Options.batch_size` images at a time (a `lax.scan` over chunks of (image, step) pairs), so
memory is bounded for any number of steps. Each method is one compiled function, cached per
(target module, normalisation, options): calling `attribute` batch after batch compiles once.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks
from l2r_jax import explainer as explainer_lib
from l2r_jax.targets import base

Array = jax.Array

METHODS = ("random", "gradient", "gradient_x_input", "integrated_gradients",
           "integrated_gradients_signed", "smoothgrad", "gradcam", "cam", "rollout", "rise")
# Methods that draw random numbers and so need a key.
STOCHASTIC = ("random", "smoothgrad", "rise")
# Quadrature rules of integrated gradients over alpha in [0, 1] (captum's names; captum's
# default is 'gausslegendre').
IG_RULES = ("riemann_middle", "riemann_trapezoid", "gausslegendre")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of the baselines; the defaults are each method's paper's.

  Attributes:
    ig_steps: integration steps of integrated gradients (50; black baseline).
    ig_rule: the quadrature over alpha, one of IG_RULES: 'riemann_middle' (nodes (k + 1/2) / n,
      weights 1 / n), 'riemann_trapezoid' (nodes k / (n - 1), end weights halved; n >= 2) or
      'gausslegendre' (captum's default).
    smoothgrad_samples: noisy copies per image (50).
    smoothgrad_sigma: noise std as a fraction of the [0, 1] pixel range (0.15).
    rise_masks: RISE masks N (4000 for 224 px in the paper).
    rise_grid: RISE grid side s (7).
    rise_p: probability p that a RISE cell is kept (0.5).
    batch_size: images per target call for integrated gradients, SmoothGrad and RISE.
    rollout_discard: fraction of each layer's smallest head-averaged attentions set to 0 before
      the rollout (0: Abnar & Zuidema's rollout).
  """
  ig_steps: int = 50
  smoothgrad_samples: int = 50
  smoothgrad_sigma: float = 0.15
  rise_masks: int = 4000
  rise_grid: int = 7
  rise_p: float = 0.5
  batch_size: int = 64
  rollout_discard: float = 0.0
  ig_rule: str = "riemann_middle"

  def __post_init__(self):
    checks.choice(self.ig_rule, IG_RULES, "ig_rule")
    checks.static_int(self.ig_steps, "ig_steps",
                      minimum=2 if self.ig_rule == "riemann_trapezoid" else 1)
    checks.static_int(self.smoothgrad_samples, "smoothgrad_samples")
    checks.static_int(self.rise_masks, "rise_masks")
    checks.static_int(self.rise_grid, "rise_grid")
    checks.static_int(self.batch_size, "batch_size")
    checks.non_negative(self.smoothgrad_sigma, "smoothgrad_sigma")
    if not 0 < self.rise_p <= 1:
      raise ValueError(f"rise_p must lie in (0, 1], got {self.rise_p}")
    if not 0 <= self.rollout_discard < 1:
      raise ValueError(f"rollout_discard must lie in [0, 1), got {self.rollout_discard}")


# ----------------------------------------------------------------------------- entry points


def attribute(method: str, target: base.Target, variables: base.Variables, images: Array,
              classes: Array, *, key: Array | None = None,
              options: Options = Options()) -> Array:
  """Attribution maps of `classes` by a baseline `method` (one of METHODS, module docstring).

  Args:
    method: one of METHODS.
    target: the frozen classifier.
    variables: its variables (e.g. target.variables, possibly replicated over devices).
    images: f32[B, H, W, 3] in [0, 1] pixel space.
    classes: i32[B], the class explained for each image.
    key: a PRNG key; required by the STOCHASTIC methods ('random', 'smoothgrad', 'rise').
      'random' and 'smoothgrad' also take keys[B], one per image, so that an image's draw does
      not depend on the batch it comes in; 'rise' takes one key, its masks being shared by every
      image (as in the paper).
    options: the methods' settings.
  Returns:
    maps f32[B, H, W], larger = more important.
  Raises:
    ValueError for an unknown method, malformed images or classes, a missing key, and
    'rollout' on a target without attention maps (CNNs).
  """
  checks.choice(method, METHODS, "method")
  images, classes = _check_inputs(target, images, classes)
  if method in STOCHASTIC and key is None:
    raise ValueError(f"method {method!r} draws random numbers: pass key=jax.random.key(seed)")
  if method in STOCHASTIC:
    if checks.per_image_key(key, images.shape[0]):
      if method == "rise":
        raise ValueError("method 'rise' shares one set of masks between all images: pass one "
                         "key, not one per image")
    elif method != "rise":  # one key: a key per image from it, by position
      key = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(images.shape[0]))
  if method == "random":
    return jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:3], jnp.float32))(key)
  static = _static(target)
  if method in ("gradient", "gradient_x_input"):
    grads = _gradient_kernel(static, variables, images, classes)
    if method == "gradient":
      return jnp.max(jnp.abs(grads), axis=-1)
    return jnp.abs(jnp.sum(grads * images, axis=-1))
  if method in ("integrated_gradients", "integrated_gradients_signed"):
    ig = _ig_kernel(static, options, variables, images, classes)
    return jnp.sum(jnp.abs(ig) if method == "integrated_gradients" else ig, axis=-1)
  if method == "smoothgrad":
    return _smoothgrad_kernel(static, options, variables, images, classes, key)
  if method == "gradcam":
    return _gradcam_kernel(static, variables, images, classes)
  if method == "cam":
    return _cam_kernel(static, variables, images, classes)
  if method == "rollout":
    return _rollout_kernel(static, options, variables, images)
  return _rise_kernel(static, options, variables, images, classes, key)


def integrated_gradients(target: base.Target, variables: base.Variables, images: Array,
                         classes: Array, options: Options = Options()) -> Array:
  """Integrated gradients per pixel and channel, f32[B, H, W, 3], before the channel reduction:
  IG = x * sum_k w_k grad f_c(a_k x) (black baseline; nodes and weights by `options.ig_rule`).
  Completeness: IG summed over pixels and channels ~= f_c(x) - f_c(0)."""
  images, classes = _check_inputs(target, images, classes)
  return _ig_kernel(_static(target), options, variables, images, classes)


def ig_nodes(steps: int, rule: str = "riemann_middle") -> tuple[np.ndarray, np.ndarray]:
  """(alphas f64[steps], weights f64[steps]) of the quadrature `rule` (IG_RULES) over [0, 1];
  the weights sum to 1."""
  checks.choice(rule, IG_RULES, "ig_rule")
  if rule == "riemann_middle":
    return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
  if rule == "riemann_trapezoid":
    checks.static_int(steps, "ig_steps", minimum=2)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    return np.linspace(0.0, 1.0, steps), weights
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  return (nodes + 1.0) / 2.0, weights / 2.0


def attention_rollout(attentions: Sequence[Array], grid: tuple[int, int],
                      discard: float = 0.0) -> Array:
  """The class token's rollout over the patches, f32[B, h, w].

  Args:
    attentions: per layer, attention probabilities f32[B, heads, T, T], token 0 the class token
      and then the h * w patches row-major.
    grid: (h, w).
    discard: fraction of each layer's smallest head-averaged attentions set to 0 first (never
      the class token's attention to itself), as jacobgil/vit-explain; 0 in Abnar & Zuidema.
  Returns:
    R[:, 0, 1:] as a grid, R = prod_l normrows(0.5 I + 0.5 mean_heads(A_l)), the last layer
    leftmost. Identity attention gives zeros; uniform attention (1 / T) over L layers gives
    (1 - 0.5^L) / T at every patch.
  """
  h, w = grid
  t = attentions[0].shape[-1]
  if t != 1 + h * w:
    raise ValueError(f"attentions over {t} tokens do not fit a class token plus a {h} x {w} "
                     f"grid ({1 + h * w} tokens)")
  eye = jnp.eye(t, dtype=jnp.float32)
  rollout = jnp.broadcast_to(eye, (attentions[0].shape[0], t, t))
  for a in attentions:
    checks.rank(a, 4, "attentions[l]", "f32[B, heads, T, T]")
    fused = jnp.mean(a.astype(jnp.float32), axis=1)
    if discard > 0:
      fused = _discard_smallest(fused, discard)
    a = 0.5 * eye + 0.5 * fused
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    rollout = jnp.matmul(a, rollout, precision=_HIGHEST)
  return jnp.reshape(rollout[:, 0, 1:], (-1, h, w))


def rise_mask(key: Array, size: tuple[int, int], grid: int = 7, p: float = 0.5) -> Array:
  """One RISE mask f32[H, W] in [0, 1] (1 = pixel kept): a grid x grid binary grid, each cell 1
  with probability p, resized bilinearly (half-pixel centres, edges clamped) to (grid + 1) * cell
  with cell = ceil(H / grid) (and W likewise), then cropped H x W at a random shift in
  [0, cell) per axis (Petsiuk et al. 2018's generate_masks)."""
  h, w = size
  cell_h, cell_w = -(-h // grid), -(-w // grid)
  k_cells, k_y, k_x = jax.random.split(key, 3)
  cells = jax.random.bernoulli(k_cells, p, (grid, grid)).astype(jnp.float32)
  up = jax.image.resize(cells, ((grid + 1) * cell_h, (grid + 1) * cell_w), "bilinear")
  dy = jax.random.randint(k_y, (), 0, cell_h)
  dx = jax.random.randint(k_x, (), 0, cell_w)
  return jax.lax.dynamic_slice(up, (dy, dx), (h, w))


# ----------------------------------------------------------------------------- checks, helpers


def _check_inputs(target: base.Target, images: Any, classes: Any) -> tuple[Array, Array]:
  checks.rank(images, 4, "images", "f32[B, H, W, 3]")
  checks.floating(images, "images")
  if np.shape(images)[-1] != 3:
    raise ValueError(f"images must have 3 channels (f32[B, H, W, 3]), got shape "
                     f"{tuple(np.shape(images))}")
  checks.in_range(images, 0.0, 1.0, "images (pixel space)")
  b = np.shape(images)[0]
  checks.shape(classes, (b,), "classes", f"i32[{b}] (one class per image)")
  checks.integer(classes, "classes")
  n = target.num_classes
  checks.in_range(classes, 0, n - 1, f"classes (target {target.name!r} has {n} classes)")
  return jnp.asarray(images, jnp.float32), jnp.asarray(classes, jnp.int32)


def _static(target: base.Target) -> base.Target:
  """The target without its variables (the kernels take them as an argument) or preprocessing:
  hashable, so that a compiled kernel is reused for every call on the same module."""
  return dataclasses.replace(target, variables=None, preprocess=None, class_names=None,
                             mean=tuple(map(float, target.mean)),
                             std=tuple(map(float, target.std)))


def _class_logit_sum(target: base.Target, variables, images: Array, classes: Array) -> Array:
  """sum_b f_{classes[b]}(images[b]): its gradient is each image's class-logit gradient, since
  a frozen target (inference batch norm) treats the images of a batch independently."""
  logits = target.apply(variables, images)
  return jnp.sum(jnp.take_along_axis(logits, classes[:, None], axis=1))


def _logit_gradient(target, variables, images: Array, classes: Array) -> Array:
  """d f_c / d x, f32[B, H, W, 3]."""
  return jax.grad(functools.partial(_class_logit_sum, target, variables), argnums=0)(
      images, classes)


def _accumulate(contribution: Callable[[Array, Array, Array], Array], init: Array,
                num_images: int, num_samples: int, chunk: int) -> Array:
  """init + sum over images b and samples k of contribution(b, k): chunks of `chunk` (b, k)
  pairs, one target call each.

  contribution(b i32[n], k i32[n], valid f32[n]) -> f32[n, ...] must multiply by `valid`
  (0 for the padding of the last chunk); row j is added to init[b[j]].
  """
  total = num_images * num_samples
  chunk = min(chunk, total)
  num_chunks = -(-total // chunk)
  index = np.arange(num_chunks * chunk)
  valid = (index < total).astype(np.float32)
  index = np.where(index < total, index, 0)
  xs = tuple(jnp.asarray(a.reshape(num_chunks, chunk))
             for a in (index // num_samples, index % num_samples, valid))

  def body(acc, x):
    b, k, v = x
    return acc.at[b].add(contribution(b, k, v)), None

  return jax.lax.scan(body, init, xs)[0]


def _upsample(maps: Array, size: tuple[int, int]) -> Array:
  """f32[B, h, w] -> f32[B, H, W], bilinear with half-pixel centres (cv2.resize's)."""
  return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), "bilinear")


def _discard_smallest(fused: Array, ratio: float) -> Array:
  """fused f32[B, T, T] with its int(T * T * ratio) smallest entries per image set to 0, except
  entry (0, 0)."""
  b, t, _ = fused.shape
  count = int(t * t * ratio)
  if count == 0:
    return fused
  flat = jnp.reshape(fused, (b, t * t))
  smallest = jnp.argsort(flat, axis=-1)[:, :count]
  drop = jnp.zeros(flat.shape, bool).at[jnp.arange(b)[:, None], smallest].set(True)
  drop = drop.at[:, 0].set(False)
  return jnp.reshape(jnp.where(drop, 0.0, flat), (b, t, t))


# ----------------------------------------------------------------------------- compiled kernels


@functools.partial(jax.jit, static_argnums=0)
def _gradient_kernel(target, variables, images, classes):
  return _logit_gradient(target, variables, images, classes)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ig_kernel(target, options, variables, images, classes):
  alphas, weights = (jnp.asarray(a, jnp.float32) for a in ig_nodes(options.ig_steps,
                                                                    options.ig_rule))

  def contribution(b, k, valid):
    path = images[b] * alphas[k][:, None, None, None]  # x' + a (x - x') with x' = 0
    grads = _logit_gradient(target, variables, path, classes[b])
    return grads * (weights[k] * valid)[:, None, None, None]

  summed = _accumulate(contribution, jnp.zeros_like(images), images.shape[0], options.ig_steps,
                       options.batch_size)
  return images * summed  # (x - x') * sum_k w_k grad


@functools.partial(jax.jit, static_argnums=(0, 1))
def _smoothgrad_kernel(target, options, variables, images, classes, key):
  n, sigma = options.smoothgrad_samples, options.smoothgrad_sigma

  def contribution(b, k, valid):  # key: keys[B], one per image
    keys = jax.vmap(lambda b, k: jax.random.fold_in(key[b], k))(b, k)
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(keys)
    grads = _logit_gradient(target, variables, images[b] + sigma * noise, classes[b])
    return jnp.max(jnp.abs(grads), axis=-1) * (valid / n)[:, None, None]

  return _accumulate(contribution, jnp.zeros(images.shape[:3], jnp.float32), images.shape[0],
                     n, options.batch_size)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rise_kernel(target, options, variables, images, classes, key):
  n, p = options.rise_masks, options.rise_p
  size = images.shape[1:3]

  def contribution(b, k, valid):
    # Mask k depends on k only: every image sees the same N masks, as in the paper.
    masks = jax.vmap(lambda k: rise_mask(jax.random.fold_in(key, k), size, options.rise_grid,
                                         p))(k)
    probs = jax.nn.softmax(target.apply(variables, images[b] * masks[..., None]), axis=-1)
    scores = jnp.take_along_axis(probs, classes[b][:, None], axis=1)[:, 0]
    return masks * (scores * valid / (n * p))[:, None, None]

  return _accumulate(contribution, jnp.zeros(images.shape[:3], jnp.float32), images.shape[0],
                     n, options.batch_size)


@functools.partial(jax.jit, static_argnums=0)
def _gradcam_kernel(target, variables, images, classes):
  x = target.normalize(images)
  variables = {k: v for k, v in variables.items() if k != "perturbations"}

  def features(perturbations):
    return target.model.apply({**variables, "perturbations": perturbations}, x,
                              method="features")

  # The module's `self.perturb('spatial', .)` hook creates its (zero) perturbation when the
  # collection is mutable: its path and shape, without computing anything.
  _, state = jax.eval_shape(
      lambda v: target.model.apply(v, x, method="features", mutable="perturbations"), variables)
  found = [path for path, _ in jax.tree_util.tree_leaves_with_path(state.get("perturbations", {}))
           if getattr(path[-1], "key", None) == "spatial"]
  if len(found) != 1:
    raise ValueError(f"Grad-CAM needs d logit / d spatial: target {target.name!r}'s module must "
                     f"pass its 'spatial' map through self.perturb('spatial', .) exactly once "
                     f"(found {len(found)} such perturbations)")
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state["perturbations"])

  def class_logits(perturbations):
    feats = features(perturbations)
    logits = jnp.take_along_axis(feats["logits"], classes[:, None], axis=1)
    return jnp.sum(logits), feats["spatial"]

  grads, spatial = jax.grad(class_logits, has_aux=True)(zeros)
  grads = functools.reduce(lambda node, part: node[part.key], found[0], grads)
  if grads.shape != spatial.shape:
    raise ValueError(f"target {target.name!r}: the 'spatial' perturbation has shape "
                     f"{grads.shape}, its features' 'spatial' map {spatial.shape}")
  weights = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))  # [B, K]
  cam = jnp.einsum("bhwk,bk->bhw", spatial.astype(jnp.float32), weights, precision=_HIGHEST)
  return _upsample(jax.nn.relu(cam), images.shape[1:3])


@functools.partial(jax.jit, static_argnums=0)
def _cam_kernel(target, variables, images, classes):
  spatial = target.features(variables, images)["spatial"]
  rows = target.head(variables)[0]
  if rows.shape[1] != spatial.shape[-1]:
    raise ValueError(f"CAM needs a head that reads the 'spatial' map's channels: target "
                     f"{target.name!r}'s head rows have width {rows.shape[1]}, its 'spatial' map "
                     f"{spatial.shape[-1]} channels")
  # The map the explainer's class_evidence option starts from, upsampled.
  return _upsample(explainer_lib.class_activation(spatial, jnp.take(rows, classes, axis=0)),
                   images.shape[1:3])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rollout_kernel(target, options, variables, images):
  feats = target.features(variables, images)
  if not feats.get("attentions"):
    raise ValueError(f"attention rollout is for ViTs only: target {target.name!r} "
                     f"({type(target.model).__name__}) returns no 'attentions'")
  _, h, w, _ = feats["spatial"].shape
  maps = attention_rollout(feats["attentions"], (h, w), options.rollout_discard)
  return _upsample(maps, images.shape[1:3])
