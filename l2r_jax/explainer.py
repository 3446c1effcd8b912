"""The explainer: frozen backbone features + a trainable DPT-style decoder -> a dense map.

E(x, c) = decoder(levels(x), class vector c) -> h f32[B, H, W], unbounded (no sigmoid), at the
input's full resolution (METHOD.md, "Explainer"). Differences from the authors' model, and why:
- Backbone: the target's own frozen multi-level features by default (DINOv3 weights cannot be had
  here); any `levels` list works, so a separate Flax backbone can feed it.
- Class conditioning: by default the target's classifier-head row of class c, projected. The row
  exists for every class the target knows, so classes never seen in training are still
  conditioned meaningfully; the paper's learned table (Embedding(classes, d)) is the option
  conditioning='embedding'.
- Class evidence (option class_evidence, off by default): the target's own class evidence map,
  CAM = spatial features . head row of the class (for a head that average-pools the 'spatial'
  map, its mean over positions is the class logit minus the bias), standardised per image, enters
  every stage through a 1 x 1 projection and is added, upsampled and scaled by a learned scalar
  (1 at init), to the output map: the decoder starts at the target's CAM and learns a
  correction. Additive conditioning (below) cannot form this feature-by-class product itself,
  and the EfficientNet levels do not even include the map the head reads.
The authors concatenate the class vector to every stage's tokens and project; a 1x1 projection of
[features; c] equals proj(features) + proj(c), which is what `Stage` computes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2r_jax import checks

Array = jax.Array
CONDITIONINGS = ("head", "embedding")


def resize(x: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize of f[B, h, w, C] to f[B, *size, C] (antialiased when shrinking)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear")


class ResidualConvUnit(nn.Module):
  """DPT's residual unit: x + conv3x3(relu(conv3x3(relu(x))))."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(nn.Conv, self.width, (3, 3), padding=1, dtype=self.dtype)
    return x + conv()(nn.relu(conv()(nn.relu(x))))


class Stage(nn.Module):
  """One backbone level, class-conditioned: proj(features) + proj(class vector)
  [+ proj(class evidence map resized to the level)]."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array, condition: Array, evidence: Array | None = None) -> Array:
    x = nn.Conv(self.width, (1, 1), dtype=self.dtype, name="features")(features)
    c = nn.Dense(self.width, dtype=self.dtype, name="condition")(condition)
    x = x + c[:, None, None, :]
    if evidence is not None:
      e = resize(evidence[..., None], features.shape[1:3]).astype(self.dtype)
      x = x + nn.Conv(self.width, (1, 1), dtype=self.dtype, name="evidence")(e)
    return x


def class_activation(spatial: Array, class_vectors: Array) -> Array:
  """The class activation map (CAM) f32[B, h, w] = spatial . class vector (baselines' 'cam' is
  this map upsampled).

  Args:
    spatial: the target's 'spatial' features f[B, h, w, D] (the map its head pools).
    class_vectors: f32[B, D], the head rows of the explained classes.
  """
  checks.rank(spatial, 4, "spatial", "f[B, h, w, D]")
  b, _, _, d = spatial.shape
  checks.shape(class_vectors, (b, d), "class_vectors",
               f"f32[{b}, {d}] (one head row per image, as wide as the 'spatial' features)")
  return jnp.einsum("bhwd,bd->bhw", spatial.astype(jnp.float32),
                    class_vectors.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def class_evidence(spatial: Array, class_vectors: Array) -> Array:
  """The class activation map standardised per image, f32[B, h, w]: zero mean, unit standard
  deviation over positions (a constant map stays zero). Arguments as `class_activation`."""
  cam = class_activation(spatial, class_vectors)
  cam = cam - jnp.mean(cam, axis=(1, 2), keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(cam), axis=(1, 2), keepdims=True))
  return cam / jnp.maximum(std, 1e-6)


class Explainer(nn.Module):
  """DPT-style decoder: class-conditioned stages, reassembled to a pyramid, fused top-down with
  residual units, upsampled to the input size and refined to one channel.

  Attributes:
    width: decoder channels.
    conditioning: 'head' (project the target's head row of the class, default) or 'embedding'
      (a learned table over `num_classes`, the paper's).
    num_classes: needed for conditioning='embedding'.
    class_evidence: take the target's class evidence map (`class_evidence`) as an input of every
      stage and as the output's starting point (see the module docstring).
    dtype: computation dtype; parameters and the output map are float32.
  """
  width: int = 64
  conditioning: str = "head"
  num_classes: int | None = None
  class_evidence: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[Array], image_size: tuple[int, int],
               class_vectors: Array | None = None, classes: Array | None = None,
               evidence: Array | None = None) -> Array:
    """Maps f32[B, H, W] for `image_size` (H, W).

    Args:
      levels: backbone features, shallow to deep, each f[B, h, w, C] (sizes may differ).
      image_size: (H, W) of the output map (the input image's size), static.
      class_vectors: f32[B, D] head rows of the explained classes (conditioning='head').
      classes: i32[B] explained classes (conditioning='embedding').
      evidence: f32[B, h, w] class evidence maps (class_evidence=True), any h, w.
    """
    checks.choice(self.conditioning, CONDITIONINGS, "conditioning")
    if not levels:
      raise ValueError("levels must hold at least one feature map f[B, h, w, C]")
    for i, level in enumerate(levels):
      checks.rank(level, 4, f"levels[{i}]", "f[B, h, w, C]")
    b = levels[0].shape[0]
    if self.conditioning == "head":
      if class_vectors is None:
        raise ValueError("conditioning='head' needs class_vectors f32[B, D] (the target's head "
                         "rows of the explained classes)")
      checks.shape(class_vectors, (b, None), "class_vectors", f"f32[{b}, D]")
      condition = class_vectors.astype(self.dtype)
    else:
      if classes is None or self.num_classes is None:
        raise ValueError("conditioning='embedding' needs num_classes and classes i32[B]")
      checks.shape(classes, (b,), "classes", f"i32[{b}]")
      condition = nn.Embed(self.num_classes, self.width, dtype=self.dtype, name="embedding")(
          classes)

    if self.class_evidence:
      if evidence is None:
        raise ValueError("class_evidence=True needs evidence f32[B, h, w] (explainer."
                         "class_evidence of the target's 'spatial' map and head rows)")
      checks.shape(evidence, (b, None, None), "evidence", f"f32[{b}, h, w]")
      evidence = evidence.astype(jnp.float32)
    elif evidence is not None:
      raise ValueError("evidence given to an explainer built with class_evidence=False")
    xs = [Stage(self.width, self.dtype, name=f"stage{i}")(level.astype(self.dtype), condition,
                                                          evidence)
          for i, level in enumerate(levels)]
    # A ViT gives every level on one grid: reassemble them into a pyramid (DPT: x4, x2, x1, x0.5
    # for four levels). A CNN's levels already form one.
    if len({tuple(x.shape[1:3]) for x in xs}) == 1 and len(xs) > 1:
      h, w = xs[0].shape[1:3]
      n = len(xs)
      xs = [resize(x, (max(1, round(h * 2.0**(n - 2 - i))), max(1, round(w * 2.0**(n - 2 - i)))))
            for i, x in enumerate(xs)]
    y = ResidualConvUnit(self.width, self.dtype, name="fuse_top")(xs[-1])
    for i in range(len(xs) - 2, -1, -1):
      skip = ResidualConvUnit(self.width, self.dtype, name=f"skip{i}")(xs[i])
      y = resize(y, xs[i].shape[1:3]) + skip
      y = ResidualConvUnit(self.width, self.dtype, name=f"fuse{i}")(y)
    y = resize(y, tuple(image_size))
    half = max(1, self.width // 2)
    y = nn.relu(nn.Conv(half, (3, 3), padding=1, dtype=self.dtype, name="refine0")(y))
    y = nn.relu(nn.Conv(half, (3, 3), padding=1, dtype=self.dtype, name="refine1")(y))
    y = nn.Conv(1, (3, 3), padding=1, dtype=self.dtype, name="out")(y)[..., 0].astype(jnp.float32)
    if self.class_evidence:
      scale = self.param("evidence_scale", nn.initializers.ones, (), jnp.float32)
      y = y + scale * resize(evidence[..., None], tuple(image_size))[..., 0]
    return y


def _features(model: Any, variables: Any, images: Array) -> dict[str, Any]:
  """The frozen features of `model` (any Target) for [0, 1] images, resized to its input size when
  it differs from the images' (e.g. a 224 px backbone explaining a 32 px target)."""
  size = tuple(model.input_size)
  if tuple(images.shape[1:3]) != size:
    images = jax.image.resize(images, (images.shape[0], *size, images.shape[-1]), "bilinear")
    images = jnp.clip(images, 0.0, 1.0)
  return jax.lax.stop_gradient(model.features(variables, images))


def _inputs(explainer: Explainer, target: Any, target_variables: Any, images: Array,
            classes: Array, backbone: Any, backbone_variables: Any) -> dict[str, Any]:
  """The explainer's inputs besides image_size: levels, class vectors, classes, evidence."""
  if backbone is None:
    backbone, backbone_variables = target, target_variables
  feats = _features(backbone, backbone_variables, images)
  rows = jax.lax.stop_gradient(target.head(target_variables)[0])
  vectors = jnp.take(rows, classes, axis=0)
  evidence = None
  if explainer.class_evidence:
    spatial = (feats if backbone is target else
               _features(target, target_variables, images))["spatial"]
    evidence = class_evidence(spatial, vectors)
  return dict(levels=feats["levels"], class_vectors=vectors, classes=classes, evidence=evidence)


def explain(explainer: Explainer, params: Any, target: Any, target_variables: Any,
            images: Array, classes: Array, backbone: Any = None,
            backbone_variables: Any = None) -> Array:
  """Attribution maps f32[B, H, W] of `classes` i32[B] for [0, 1] images f32[B, H, W, 3].

  The features come from `backbone` (a Target with its own variables; default: the target's own
  levels), the class vectors (and with class_evidence, the evidence map) from the target. All
  enter behind stop_gradient: gradients reach the decoder only, whatever the caller
  differentiates.
  """
  checks.rank(images, 4, "images", "f32[B, H, W, 3]")
  checks.shape(classes, (images.shape[0],), "classes", f"i32[{images.shape[0]}]")
  checks.integer(classes, "classes")
  inputs = _inputs(explainer, target, target_variables, images, classes, backbone,
                   backbone_variables)
  return explainer.apply(params, image_size=tuple(images.shape[1:3]), **inputs)


def init(explainer: Explainer, rng: Array, target: Any, target_variables: Any,
         images: Array, classes: Array, backbone: Any = None,
         backbone_variables: Any = None) -> Any:
  """The explainer's initial params for `target` (and `backbone`, default the target) on example
  images and classes."""
  inputs = _inputs(explainer, target, target_variables, images, classes, backbone,
                   backbone_variables)
  return explainer.init(rng, image_size=tuple(images.shape[1:3]), **inputs)
