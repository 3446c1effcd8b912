"""Test-time refinement: a few gradient steps of the training objective on one image's map.

The paper's abstract promises an optional few-step refinement at test time (the authors' code
does not contain it; METHOD.md). Starting from a map (the explainer's, or any method's), the map
itself is the parameter: each step draws `num_samples` soft deletion / insertion sweeps of the
image (Gumbel noise, grid sizes and references cycled over the samples), and Adam descends
AUC_del + (1 - AUC_ins) + peak penalty for the explained class. steps = 0 returns the map as it
is, so the single-pass explainer is the special case.

The starting map is standardised per image ((h - mean) / std, which keeps its ranking), so maps
of any scale (gradients ~1e-3, logits ~10) start from the same place; the cell scores are then
min-max normalised onto the sorter's anchors (ObjectiveConfig.normalize_scores) so the
refinement does not depend on the map's scale either.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from l2r_jax import checks
from l2r_jax import objectives
from l2r_jax import perturb

Array = jax.Array
ApplyFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Refinement settings; steps = 0 turns it off."""
  steps: int = 10
  learning_rate: float = 0.1  # Adam on the standardised map
  num_samples: int = 6  # soft sweeps per step and image (split over grids and references)
  grids: tuple[int, ...] = (7, 14)
  tau: float = 0.3  # the end of the training schedule
  references: tuple[str, ...] = perturb.REFERENCES
  mean_color: tuple[float, ...] = perturb.IMAGENET_MEAN
  blur_size: int = 37
  blur_sigma: float = 37.0
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig(num_fractions=16,
                                                                     normalize_scores=True)

  def __post_init__(self):
    checks.static_int(self.steps, "refine steps", minimum=0)
    checks.static_int(self.num_samples, "refine num_samples")
    if not self.learning_rate > 0:
      raise ValueError(f"refine learning_rate must be > 0, got {self.learning_rate}")
    if not self.grids:
      raise ValueError("refine grids must hold at least one grid size")
    for g in self.grids:
      checks.static_int(g, "refine grids")
    if not self.references:
      raise ValueError(f"refine references must name at least one of {perturb.REFERENCES}")
    for r in self.references:
      checks.choice(r, perturb.REFERENCES, "refine references")
    if self.tau <= 0:
      raise ValueError(f"refine tau must be > 0, got {self.tau}")


def _samples(config: RefineConfig) -> list[tuple[int, str]]:
  """(grid, reference) of each sample: grids and references cycled over the samples."""
  return [(config.grids[i % len(config.grids)], config.references[i % len(config.references)])
          for i in range(config.num_samples)]


def objective(apply_fn: ApplyFn, images: Array, maps: Array, classes: Array, key: Array,
              config: RefineConfig = RefineConfig()) -> Array:
  """The refinement loss of each image, f32[B]: the mean over the samples of
  AUC_del + (1 - AUC_ins) of `classes` i32[B], plus the peak penalty of its map."""
  kw = dict(mean_color=config.mean_color, blur_size=config.blur_size,
            blur_sigma=config.blur_sigma)
  refs = {r: perturb.reference_images(images, r, **kw) for r in set(config.references)}
  keys = jax.random.split(key, config.num_samples)
  total = jnp.zeros(images.shape[0], jnp.float32)
  for (grid, ref), k in zip(_samples(config), keys):
    curves = objectives.soft_curves(apply_fn, images, maps, refs[ref], classes[:, None],
                                    key=jax.random.split(k, images.shape[0]), grid=grid,
                                    tau=config.tau, config=config.objective)
    auc = objectives.trapezoid_auc(curves, config.objective.fractions)[:, :, 0]  # [B, 2]
    total = total + auc[:, 0] + 1.0 - auc[:, 1]
  peak = jax.vmap(lambda m: objectives.peak_penalty(m[None], config.objective.peak_window))(maps)
  return total / config.num_samples + config.objective.peak_weight * peak


def standardize(maps: Array) -> Array:
  """(h - mean) / std per map (f32[B, H, W]); a constant map becomes zeros."""
  mean = jnp.mean(maps, axis=(1, 2), keepdims=True)
  std = jnp.std(maps, axis=(1, 2), keepdims=True)
  return jnp.where(std > 0, (maps - mean) / jnp.where(std > 0, std, 1.0), 0.0)


def refine(apply_fn: ApplyFn, images: Array, maps: Array, classes: Array, key: Array,
           config: RefineConfig = RefineConfig()) -> tuple[Array, Array]:
  """Refined maps f32[B, H, W] and the loss per step f32[steps, B].

  Every image is refined on its own loss (the images only share the target calls). Jittable;
  `apply_fn` is the frozen target.

  Args:
    apply_fn: the target, images f32[M, H, W, 3] in [0, 1] -> logits f32[M, classes].
    images: f32[B, H, W, 3] in [0, 1].
    maps: f32[B, H, W] starting maps, finite (larger = more important).
    classes: i32[B] the explained class of each image.
    key: a PRNG key (Gumbel noise).
  """
  checks.rank(images, 4, "images", "f32[B, H, W, 3]")
  b, h, w, _ = images.shape
  checks.shape(maps, (b, h, w), "maps", f"f32[{b}, {h}, {w}] (one map per image)")
  checks.finite(maps, "maps")
  checks.in_range(images, 0.0, 1.0, "images")
  checks.shape(classes, (b,), "classes", f"i32[{b}]")
  checks.integer(classes, "classes")
  if config.steps == 0:
    return maps, jnp.zeros((0, b), jnp.float32)
  tx = optax.adam(config.learning_rate)
  start = standardize(maps.astype(jnp.float32))

  def step(carry, step_key):
    m, opt_state = carry
    per_image, vjp = jax.vjp(lambda m: objective(apply_fn, images, m, classes, step_key, config),
                             m)
    (grads,) = vjp(jnp.ones_like(per_image))
    updates, opt_state = tx.update(grads, opt_state, m)
    return (optax.apply_updates(m, updates), opt_state), per_image

  (refined, _), losses = jax.lax.scan(step, (start, tx.init(start)),
                                      jax.random.split(key, config.steps))
  return refined, losses
