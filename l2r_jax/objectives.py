"""The training objective: differentiable deletion and insertion AUC of a frozen classifier.

A score map h f32[B, H, W] is average-pooled to a g x g grid, the cells are soft-sorted
(Gumbel-Sinkhorn), and a sweep of K soft deletion masks (most important first for deletion, least
important first for insertion) perturbs the image towards a reference. The target classifier
scores every perturbed image in ONE forward pass, and the probabilities of all requested classes
are read from it. The AUCs are trapezoids over the fractions; the loss is
AUC_del + (1 - AUC_ins) + peak_weight * peak_penalty(h) (METHOD.md, items 3-8).

The target enters as a pure function `apply_fn(images f32[M, H, W, C]) -> logits f32[M, classes]`
on [0, 1] pixel-space images, so any classifier works.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks
from l2r_jax import perturb
from l2r_jax import sorting

Array = jax.Array
ApplyFn = Callable[[Array], Array]
SCORES = ("prob", "logit")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Protocol of the training objective; defaults are the paper's (METHOD.md)."""
  num_fractions: int = 16  # fractions linspace(0, 1, num_fractions)
  num_iters: int = 30  # Sinkhorn iterations
  normalize_scores: bool = False  # min-max cell scores onto the anchors' [0, 1] first
  smoothing_sigma: float = 1.0  # Gaussian smoothing of pixel masks; 0 turns it off
  peak_weight: float = 0.0025
  peak_window: int = 15  # side of the local-mean window of the peak penalty
  score: str = "prob"  # 'prob': softmax probability of the class; 'logit': its logit
  # Weight of the deletion AUC in the loss (the paper's 1.0): one map serves both sweeps, so
  # where they ask for different rankings this sets the trade-off.
  deletion_weight: float = 1.0
  # Weight of every class after the first (the explained one, top-1) in the mean over an image's
  # classes (the paper's 1.0: top-1 and the second class count alike, METHOD.md item 8). The
  # map is the top-1 class's; the evaluation scores that class only, so 0 trains for it alone.
  second_class_weight: float = 1.0
  # Straight-through sweeps (not the paper's): the target sees the HARD masks of the cells'
  # ranking (what the evaluation deletes, at cell level), and the gradient flows through the
  # Gumbel-Sinkhorn masks as if they had been used. The soft masks alone are far from the hard
  # ones (Gumbel noise of scale 1 against anchor gaps of 2 |s| / N), so the loss they give
  # barely tracks the metric (BENCHMARKS.md, issue 9, "straight-through"). Measured on the demo
  # and in refinement: worse than the soft sweeps on most columns, so off by default.
  straight_through: bool = False

  def __post_init__(self):
    checks.static_int(self.num_fractions, "num_fractions", minimum=2)
    checks.static_int(self.num_iters, "num_iters")
    checks.static_int(self.peak_window, "peak_window")
    for field in ("smoothing_sigma", "peak_weight", "deletion_weight", "second_class_weight"):
      checks.non_negative(getattr(self, field), field)
    checks.choice(self.score, SCORES, "score")

  @property
  def fractions(self) -> np.ndarray:
    return np.linspace(0.0, 1.0, self.num_fractions)


def trapezoid_auc(curves: Array, fractions: Array | np.ndarray) -> Array:
  """Area under curves f32[..., K] sampled at fractions f32[K] (trapezoid rule): f32[...]."""
  p = jnp.asarray(fractions, jnp.float32)
  if curves.shape[-1] != p.shape[0]:
    raise ValueError(f"curves must have shape [..., {p.shape[0]}] to match fractions, "
                     f"got {curves.shape}")
  return jnp.sum(0.5 * (curves[..., 1:] + curves[..., :-1]) * jnp.diff(p), axis=-1)


def peak_penalty(maps: Array, window: int = 15) -> Array:
  """mean(relu(h - local_mean(h))^2) over maps f32[B, H, W]: a scalar.

  The local mean is a window x window box average, zero-padded and always divided by
  window^2 (PyTorch's avg_pool2d(k, stride=1, padding=k // 2) default). It discourages isolated
  spikes that rank first without carrying evidence.
  """
  checks.rank(maps, 3, "maps", "f32[B, H, W]")
  window = checks.static_int(window, "window")
  r = window // 2
  h = maps.astype(jnp.float32)
  box = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, window, window), (1, 1, 1),
                              ((0, 0), (r, window - 1 - r), (r, window - 1 - r)))
  return jnp.mean(jnp.square(jax.nn.relu(h - box / window**2)))


def select_classes(logits: Array, labels: Array | None = None) -> Array:
  """The two classes trained per image: i32[B, 2] = (top-1, second).

  The second class is the top-2 prediction when top-1 equals the label (or no labels are given),
  else the ground-truth label (METHOD.md, item 1).

  Args:
    logits: f32[B, classes] of the clean images, classes >= 2.
    labels: optional i32[B] ground-truth labels in [0, classes).
  """
  checks.rank(logits, 2, "logits", "f32[B, classes]")
  if logits.shape[1] < 2:
    raise ValueError(f"logits need >= 2 classes to pick two, got shape {logits.shape}")
  _, top2 = jax.lax.top_k(logits, 2)
  top1, second = top2[:, 0], top2[:, 1]
  if labels is not None:
    checks.shape(labels, (logits.shape[0],), "labels", f"i32[{logits.shape[0]}]")
    checks.integer(labels, "labels")
    checks.in_range(labels, 0, logits.shape[1] - 1, "labels")
    second = jnp.where(top1 == labels, second, labels)
  return jnp.stack([top1, second], axis=1).astype(jnp.int32)


def class_scores(logits: Array, classes: Array, score: str = "prob") -> Array:
  """Scores f32[M, C] of classes i32[M, C] from logits f32[M, classes]: softmax or raw logit."""
  checks.choice(score, SCORES, "score")
  x = logits.astype(jnp.float32)
  if score == "prob":
    x = jax.nn.softmax(x, axis=-1)
  return jnp.take_along_axis(x, classes, axis=-1)


def hard_cell_masks(cells: Array, fractions: np.ndarray) -> Array:
  """The hard counterpart of `perturb.soft_deletion_masks`: f32[B, K, N] for cell scores
  f32[B, N], i.e. those masks of the exact permutation matrix of the descending sort (ties to the
  lower index, as the evaluation's `perturb.descending_ranks`): cell i of rank r_i is deleted at
  fraction p with weight clip(p * N - r_i, 0, 1), so the fractional cell of a fraction between
  two cell counts is partly deleted, as in the soft sweep. No gradient (ranks are integers)."""
  checks.rank(cells, 2, "cells", "f32[B, N]")
  ranks = perturb.descending_ranks(jax.lax.stop_gradient(cells))
  weights = jnp.asarray(perturb.fraction_weights(fractions, cells.shape[-1]))  # [K, N(ranks)]
  return jnp.moveaxis(weights[:, ranks], 0, 1)


def soft_sweep_masks(maps: Array,
                     *,
                     key: Array | None,
                     grid: int,
                     tau: float | Array,
                     config: ObjectiveConfig = ObjectiveConfig()) -> Array:
  """Pixel masks of the deletion and insertion sweeps: f32[B, 2, K, H, W].

  [:, 0] deletes the most important cells first (sort of h), [:, 1] the least important first
  (sort of -h), each with its own Gumbel noise from `key` (one key, or keys[B], one per image, so
  that the noise does not depend on how a batch is split over devices; None: no noise). `grid`
  must be static (it sets shapes). With config.straight_through the values are the hard cell
  masks (`hard_cell_masks`) and the derivatives those of the soft ones.
  """
  checks.rank(maps, 3, "maps", "f32[B, H, W]")
  checks.finite(maps, "maps")
  _, h, w = maps.shape
  cells = perturb.pool_to_grid(maps, grid)
  # One key, or one per image (keys[B]); each splits into deletion and insertion noise.
  if key is None:
    keys = (None, None)
  elif not checks.per_image_key(key, maps.shape[0]):
    keys = tuple(jax.random.split(key))
  else:
    keys = tuple(jax.vmap(jax.random.split)(key).swapaxes(0, 1))
  sweeps = []
  for sign, k in zip((1.0, -1.0), keys):
    perm = sorting.soft_sort(sign * cells, key=k, tau=tau, num_iters=config.num_iters,
                             normalize=config.normalize_scores)
    cell_masks = perturb.soft_deletion_masks(perm, config.fractions)
    if config.straight_through:
      hard = hard_cell_masks(sign * cells, config.fractions)
      cell_masks = hard + (cell_masks - jax.lax.stop_gradient(cell_masks))
    sweeps.append(perturb.upsample_cells(cell_masks, grid, (h, w)))
  masks = jnp.stack(sweeps, axis=1)
  if config.smoothing_sigma > 0:
    masks = perturb.smooth_masks(masks, config.smoothing_sigma)
  return masks


def soft_curves(apply_fn: ApplyFn,
                images: Array,
                maps: Array,
                references: Array,
                classes: Array,
                *,
                key: Array | None,
                grid: int,
                tau: float | Array,
                config: ObjectiveConfig = ObjectiveConfig()) -> Array:
  """Class scores along both soft sweeps: f32[B, 2(deletion, insertion), C, K].

  All B * 2 * K perturbed images go through `apply_fn` in one call; the C classes of each image
  are read from that one pass.

  Args:
    apply_fn: the frozen target, images f32[M, H, W, C] -> logits f32[M, classes].
    images: f32[B, H, W, C] in [0, 1].
    maps: f32[B, H, W] attribution maps (unbounded).
    references: f32[B, H, W, C] (`perturb.reference_images`).
    classes: i32[B, C] classes to score per image (`select_classes`).
  """
  checks.rank(images, 4, "images", "f32[B, H, W, C]")
  b, h, w, _ = images.shape
  checks.shape(maps, (b, h, w), "maps", f"f32[{b}, {h}, {w}] (one map per image)")
  checks.rank(classes, 2, "classes", "i32[B, C]")
  checks.shape(classes, (b, None), "classes", f"i32[{b}, C]")
  checks.integer(classes, "classes")
  masks = soft_sweep_masks(maps, key=key, grid=grid, tau=tau, config=config)
  return masked_curves(apply_fn, images, masks, references, classes, config.score)


def masked_curves(apply_fn: ApplyFn, images: Array, masks: Array, references: Array,
                  classes: Array, score: str = "prob") -> Array:
  """Class scores of images blended toward `references` by masks f32[B, S, K, H, W] (S sweeps of
  K masks each, 1 = the reference): f32[B, S, C, K] for classes i32[B, C], all B * S * K images
  in one `apply_fn` call (`soft_curves` with its soft masks, or any others, e.g. hard ones)."""
  b, h, w = images.shape[0], images.shape[1], images.shape[2]
  checks.rank(masks, 5, "masks", "f32[B, S, K, H, W]")
  checks.shape(masks, (b, None, None, h, w), "masks", f"f32[{b}, S, K, {h}, {w}]")
  sweeps, k = masks.shape[1], masks.shape[2]
  perturbed = perturb.blend(images, references, masks.reshape(b, -1, h, w))
  logits = apply_fn(perturbed.reshape(b * sweeps * k, *images.shape[1:]))
  checks.rank(logits, 2, "apply_fn(images)", "f32[M, classes]")
  per_image = jnp.repeat(classes, sweeps * k, axis=0)
  scores = class_scores(logits, per_image, score)  # [B * S * K, C]
  return scores.reshape(b, sweeps, k, -1).transpose(0, 1, 3, 2)


def loss_fn(apply_fn: ApplyFn,
            images: Array,
            maps: Array,
            references: Array,
            classes: Array,
            *,
            key: Array | None,
            grid: int,
            tau: float | Array,
            config: ObjectiveConfig = ObjectiveConfig()) -> tuple[Array, dict[str, Array]]:
  """The paper's loss, averaged over images and classes: a scalar, and its parts.

  loss = deletion_weight * mean(AUC_del) + mean(1 - AUC_ins) + peak_weight * peak_penalty(maps)
  (deletion_weight 1 in the paper), the means over images and, weighted, over classes: the
  first class weighs 1, the others second_class_weight (1 in the paper: a plain mean).
  Returns (loss, aux) with aux holding 'deletion_auc' and 'insertion_auc' f32[B, C], and
  'peak_penalty'.
  """
  curves = soft_curves(apply_fn, images, maps, references, classes, key=key, grid=grid,
                       tau=tau, config=config)
  auc = trapezoid_auc(curves, config.fractions)  # [B, 2, C]
  deletion, insertion = auc[:, 0], auc[:, 1]
  peak = peak_penalty(maps, config.peak_window)
  loss = (config.deletion_weight * class_mean(deletion, config)
          + class_mean(1.0 - insertion, config) + config.peak_weight * peak)
  return loss, {"deletion_auc": deletion, "insertion_auc": insertion, "peak_penalty": peak}


def class_mean(values: Array, config: ObjectiveConfig = ObjectiveConfig()) -> Array:
  """The loss's mean of per-image, per-class values f32[B, C]: a plain mean over images and a
  weighted one over classes, the first (explained) class weighing 1 and the others
  config.second_class_weight (1 in the paper: a plain mean)."""
  checks.rank(values, 2, "values", "f32[B, C]")
  weights = jnp.full((values.shape[1],), config.second_class_weight, jnp.float32).at[0].set(1.0)
  return jnp.mean(jnp.sum(values * (weights / jnp.sum(weights)), axis=-1))
