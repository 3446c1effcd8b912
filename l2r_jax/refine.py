"""Test-time refinement: a few gradient steps of the training objective on one image's map.

The paper's abstract promises an optional few-step refinement at test time (the authors' code
does not contain it; METHOD.md). Starting from a map (the explainer's, or any method's), the map
itself is the parameter: each step draws `num_samples` soft deletion / insertion sweeps of the
image (Gumbel noise, grid sizes and references cycled over the samples), and Adam descends
w AUC_del + (1 - AUC_ins) + peak penalty for the explained class (w: the objective's
deletion_weight, 1 as in the paper's loss). steps = 0 returns the map as it is, so the
single-pass explainer is the special case.

The starting map is standardised per image ((h - mean) / std, which keeps its ranking), so maps
of any scale (gradients ~1e-3, logits ~10) start from the same place. Adam moves that
standardised map z; the loss sees `scale` x z. The scale sets how sharp the soft sort is
against the Gumbel noise (of scale 1): the anchors' cost 2 a_j s_i separates two cells by
2 |s_i - s_k|, so at scale 1 neighbouring cells swap freely, while the explainer ends its
training with maps of std ~8 to 17 (EfficientNet-Lite0 on ImageNet), where the sort is sharp. With
ObjectiveConfig.normalize_scores the cell scores are min-max normalised onto the anchors' [0, 1]
first, and only the peak penalty (quadratic in the map) feels the scale.

With a `mesh`, the samples of each step are spread over its devices (`shard_map`): the images and
the map are replicated, each device runs its share of the samples' soft sweeps and their
backward pass, and the losses and gradients are summed over the devices (psum), so every device
takes the same Adam step and 1 or 8 devices refine to the same map. That is the parallelism for
fewer images than devices (one image on a pod slice); it is worth it while num_samples is at
least about the device count, since a device holds whole samples.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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
  # The loss sees scale x the standardised map (module docstring); the learning rate is in
  # units of the standardised map whatever the scale.
  scale: float = 1.0
  references: tuple[str, ...] = perturb.PAPER_REFERENCES
  mean_color: tuple[float, ...] = perturb.IMAGENET_MEAN
  blur_size: int = 37
  blur_sigma: float = 37.0
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig(num_fractions=16,
                                                                     normalize_scores=True)

  def __post_init__(self):
    checks.static_int(self.steps, "refine steps", minimum=0)
    checks.static_int(self.num_samples, "refine num_samples")
    checks.positive(self.learning_rate, "refine learning_rate")
    if not self.grids:
      raise ValueError("refine grids must hold at least one grid size")
    for g in self.grids:
      checks.static_int(g, "refine grids")
    if not self.references:
      raise ValueError(f"refine references must name at least one of {perturb.REFERENCES}")
    for r in self.references:
      checks.choice(r, perturb.REFERENCES, "refine references")
    checks.positive(self.tau, "refine tau")
    checks.positive(self.scale, "refine scale")


def _samples(config: RefineConfig) -> list[tuple[int, str]]:
  """(grid, reference) of each sample: grids and references cycled over the samples."""
  return [(config.grids[i % len(config.grids)], config.references[i % len(config.references)])
          for i in range(config.num_samples)]


def _split(keys: Array, n: int) -> Array:
  """n keys for each image from keys[B]: [n, B]."""
  return jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(keys)


def _references(images: Array, config: RefineConfig) -> dict[str, Array]:
  """The reference images f32[B, H, W, C] of each reference the samples use."""
  kw = dict(mean_color=config.mean_color, blur_size=config.blur_size,
            blur_sigma=config.blur_sigma)
  return {r: perturb.reference_images(images, r, **kw) for r in sorted(set(config.references))}


def _sample_loss(apply_fn: ApplyFn, images: Array, maps: Array, references: Array,
                 classes: Array, keys: Array, grid: int, config: RefineConfig) -> Array:
  """w AUC_del + (1 - AUC_ins) of one sample (keys[B], one grid and reference), w the
  objective's deletion_weight: f32[B]."""
  curves = objectives.soft_curves(apply_fn, images, maps, references, classes[:, None],
                                  key=keys, grid=grid,
                                  tau=config.tau, config=config.objective)
  auc = objectives.trapezoid_auc(curves, config.objective.fractions)[:, :, 0]  # [B, 2]
  return config.objective.deletion_weight * auc[:, 0] + 1.0 - auc[:, 1]


def _peak_loss(maps: Array, config: RefineConfig) -> Array:
  """peak_weight x the peak penalty of each map: f32[B]."""
  peak = jax.vmap(lambda m: objectives.peak_penalty(m[None], config.objective.peak_window))(maps)
  return config.objective.peak_weight * peak


def objective(apply_fn: ApplyFn, images: Array, maps: Array, classes: Array, key: Array,
              config: RefineConfig = RefineConfig()) -> Array:
  """The refinement loss of each image, f32[B]: the mean over the samples of
  w AUC_del + (1 - AUC_ins) of `classes` i32[B] (w: config.objective.deletion_weight), plus the
  peak penalty of its map. `key`: one PRNG key, or one per image (keys[B], `refine`)."""
  refs = _references(images, config)
  keys = _split(_image_keys(key, images.shape[0]), config.num_samples)
  total = jnp.zeros(images.shape[0], jnp.float32)
  for (grid, ref), k in zip(_samples(config), keys):
    total = total + _sample_loss(apply_fn, images, maps, refs[ref], classes, k, grid, config)
  return total / config.num_samples + _peak_loss(maps, config)


def _value_and_grad(apply_fn: ApplyFn, images: Array, classes: Array, config: RefineConfig
                    ) -> Callable[[Array, Array], tuple[Array, Array]]:
  """(maps, keys[B]) -> (`objective` f32[B], its gradient w.r.t. each image's map f32[B, H, W]).

  One sample's backward pass at a time (a `lax.scan` over the samples of each grid): only one
  sample's target activations are live, not all num_samples' (differentiating the whole
  `objective` at once asked for 26.8 GB with EfficientNet-Lite0 at 224 px, batch 4, 6 samples).
  """
  samples = _samples(config)
  refs = _references(images, config)
  names = list(refs)
  stacked = jnp.stack([refs[n] for n in names])  # [R, B, H, W, C]

  def value_and_grad(maps, key):
    keys = _split(key, config.num_samples)
    loss, grads = jnp.zeros(maps.shape[0], jnp.float32), jnp.zeros_like(maps)
    for grid in sorted({g for g, _ in samples}):
      index = np.asarray([i for i, (g, _) in enumerate(samples) if g == grid])
      ref_index = jnp.asarray([names.index(samples[i][1]) for i in index], jnp.int32)

      def one_sample(carry, xs, grid=grid):
        k, r = xs
        value, vjp = jax.vjp(lambda m: _sample_loss(apply_fn, images, m, stacked[r], classes, k,
                                                    grid, config), maps)
        (g,) = vjp(jnp.ones_like(value))
        return (carry[0] + value, carry[1] + g), None

      (loss, grads), _ = jax.lax.scan(one_sample, (loss, grads), (keys[index], ref_index))
    peak, vjp = jax.vjp(lambda m: _peak_loss(m, config), maps)
    (peak_grads,) = vjp(jnp.ones_like(peak))
    return loss / config.num_samples + peak, grads / config.num_samples + peak_grads

  return value_and_grad


def sample_layout(num_samples: int, num_devices: int) -> np.ndarray:
  """i32[devices, per_device]: the sample each device runs in each of its slots, -1 for
  padding; whole samples in row-major order, ceil(num_samples / devices) slots per device."""
  per_device = -(-num_samples // num_devices)
  slots = np.arange(num_devices * per_device, dtype=np.int32)
  return np.where(slots < num_samples, slots, -1).reshape(num_devices, per_device)


def _sharded_value_and_grad(apply_fn: ApplyFn, images: Array, classes: Array,
                            config: RefineConfig, mesh: Mesh
                            ) -> Callable[[Array, Array], tuple[Array, Array]]:
  """`_value_and_grad` with the samples spread over all of the mesh's devices (module
  docstring); the same values up to the order of the sums."""
  samples = _samples(config)
  grids = sorted({g for g, _ in samples})
  refs = _references(images, config)
  names = list(refs)
  layout = sample_layout(config.num_samples, mesh.size)
  valid = layout >= 0
  sample = np.where(valid, layout, 0).astype(np.int32)
  # Per slot: the grid's branch (the last branch, zeros, for padding) and the reference's index.
  branch = np.where(valid, np.asarray([grids.index(g) for g, _ in samples])[sample],
                    len(grids)).astype(np.int32)
  ref_index = np.asarray([names.index(r) for _, r in samples], np.int32)[sample]
  axes = tuple(mesh.axis_names)  # spread over every axis of the mesh

  def per_device(images, refs, classes, maps, key, sample, branch, ref_index):
    # The map as a per-device value: differentiated here, a replicated input would get its
    # cotangent summed over devices inside each branch (a collective that the devices running
    # another branch never join); the sum over devices is the explicit psum below.
    maps = jax.lax.pcast(maps, axes, to="varying")

    def sample_value_and_grad(m, ref, key, grid):  # one sample: (f32[B], f32[B, H, W])
      loss, vjp = jax.vjp(
          lambda m: _sample_loss(apply_fn, images, m, ref, classes, key, grid, config), m)
      (grads,) = vjp(jnp.ones_like(loss))
      return loss, grads

    def padding(m, ref, key):
      return jnp.zeros_like(m[:, 0, 0]), jnp.zeros_like(m)

    # Each branch differentiates its own sample: the switch itself is never differentiated.
    branches = [functools.partial(sample_value_and_grad, grid=g) for g in grids] + [padding]
    keys = _split(key, config.num_samples)
    loss, grads = padding(maps, None, None)
    for slot in range(sample.shape[-1]):
      i, r = sample[0, slot], ref_index[0, slot]
      slot_loss, slot_grads = jax.lax.switch(branch[0, slot], branches, maps, refs[r], keys[i])
      loss, grads = loss + slot_loss, grads + slot_grads
    return (jax.lax.psum(loss, axes) / config.num_samples,
            jax.lax.psum(grads, axes) / config.num_samples)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * 5 + (P(axes),) * 3,
                          out_specs=(P(), P()))
  stacked = jnp.stack([refs[n] for n in names])  # [R, B, H, W, C]

  def value_and_grad(maps, key):
    loss, grads = sharded(images, stacked, classes, maps, key, jnp.asarray(sample),
                          jnp.asarray(branch), jnp.asarray(ref_index))
    peak, vjp = jax.vjp(lambda m: _peak_loss(m, config), maps)
    (peak_grads,) = vjp(jnp.ones_like(peak))
    return loss + peak, grads + peak_grads

  return value_and_grad


def _image_keys(key: Array, batch: int) -> Array:
  """keys[batch]: `key` itself if it holds one key per image, else split from it by position."""
  return key if checks.per_image_key(key, batch) else jax.random.split(key, batch)


def standardize(maps: Array) -> Array:
  """(h - mean) / std per map (f32[B, H, W]); a constant map becomes zeros."""
  mean = jnp.mean(maps, axis=(1, 2), keepdims=True)
  std = jnp.std(maps, axis=(1, 2), keepdims=True)
  return jnp.where(std > 0, (maps - mean) / jnp.where(std > 0, std, 1.0), 0.0)


def refine(apply_fn: ApplyFn, images: Array, maps: Array, classes: Array, key: Array,
           config: RefineConfig = RefineConfig(), mesh: Mesh | None = None
           ) -> tuple[Array, Array]:
  """Refined maps f32[B, H, W] and the loss per step f32[steps, B].

  Every image is refined on its own loss (the images only share the target calls). Jittable;
  `apply_fn` is the frozen target.

  Args:
    apply_fn: the target, images f32[M, H, W, 3] in [0, 1] -> logits f32[M, classes].
    images: f32[B, H, W, 3] in [0, 1].
    maps: f32[B, H, W] starting maps, finite (larger = more important).
    classes: i32[B] the explained class of each image.
    key: a PRNG key, or keys[B], one per image (the Gumbel noise). An image's refinement
      depends only on its own key, so with one key per image (e.g. from its index in the data
      set) it does not depend on the batch it comes in; one key gives each image
      `jax.random.split(key, B)[b]` by its position b.
    mesh: spread each step's samples over all of the mesh's devices (module docstring; for
      fewer images than devices); None: the default device.
  """
  checks.rank(images, 4, "images", "f32[B, H, W, 3]")
  b, h, w, _ = images.shape
  checks.shape(maps, (b, h, w), "maps", f"f32[{b}, {h}, {w}] (one map per image)")
  checks.finite(maps, "maps")
  checks.in_range(images, 0.0, 1.0, "images")
  checks.shape(classes, (b,), "classes", f"i32[{b}]")
  checks.integer(classes, "classes")
  keys = _image_keys(key, b)
  if config.steps == 0:
    return maps, jnp.zeros((0, b), jnp.float32)
  tx = optax.adam(config.learning_rate)
  start = standardize(maps.astype(jnp.float32))
  value_and_grad = (_value_and_grad(apply_fn, images, classes, config) if mesh is None else
                    _sharded_value_and_grad(apply_fn, images, classes, config, mesh))

  def step(carry, step_key):
    z, opt_state = carry  # the standardised map; the loss sees scale x z
    per_image, grads = value_and_grad(config.scale * z, step_key)
    updates, opt_state = tx.update(config.scale * grads, opt_state, z)
    return (optax.apply_updates(z, updates), opt_state), per_image

  (refined, _), losses = jax.lax.scan(step, (start, tx.init(start)), _split(keys, config.steps))
  return config.scale * refined, losses
