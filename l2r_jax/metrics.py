"""Evaluation metrics with hard rankings: deletion / insertion AUC and the positive / negative
perturbation test.

The paper's protocol (METHOD.md): rank all H * W pixels of the map (descending, stable: of equal
scores the lower row-major index ranks first), at 21 fractions p = 0, 0.05, ..., 1 replace the top
round(p * H * W) pixels by the reference (ImageNet mean colour), no smoothing, and read the
softmax probability of the predicted class. Deletion AUC (lower is better) is the trapezoid over
p; insertion AUC (higher is better) is the same computed for -h, i.e. deleting the least
important pixels first. Every choice is a `Protocol` field.

Perturbed images are evaluated `chunk_size` fractions at a time (B * 2 * chunk_size images per
target call), so memory stays bounded for any image size and number of steps.

With a `mesh`, the perturbed copies themselves (K fractions x 2 sweeps per image) are spread over
its devices: the images and maps are replicated, each device scores its slice of the
(sweep, fraction) pairs, and the curves are gathered. That is the parallelism for fewer images
than devices (one image on a pod slice, a small set); with at least as many images as devices,
splitting the batch (data parallelism) is the cheaper one. The results equal the single-device
ones.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from l2r_jax import checks
from l2r_jax import objectives
from l2r_jax import perturb

Array = jax.Array
ApplyFn = Callable[[Array], Array]
CLASS_SOURCES = ("predicted", "label")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A deletion / insertion protocol; the defaults are the paper's."""
  num_steps: int = 21  # fractions linspace(0, 1, num_steps); 21 = 5% steps
  unit: int = 1  # side of the square ranking unit in pixels; 1 = pixels, 16 = ViT-B/16 patches
  reference: str = "mean"  # 'mean', 'black', 'blur' or 'noise' (perturb.REFERENCES)
  insertion_reference: str | None = None  # None: as `reference`; RISE inserts from 'blur'
  mean_color: tuple[float, ...] = perturb.IMAGENET_MEAN
  blur_size: int = 37
  blur_sigma: float = 37.0
  score: str = "prob"  # 'prob' (softmax) or 'logit'
  class_source: str = "predicted"  # 'predicted' (top-1 on the clean image) or 'label'
  chunk_size: int = 7  # fractions per target call

  def __post_init__(self):
    checks.static_int(self.num_steps, "num_steps", minimum=2)
    checks.static_int(self.unit, "unit")
    checks.static_int(self.chunk_size, "chunk_size")
    checks.choice(self.reference, perturb.REFERENCES, "reference")
    if self.insertion_reference is not None:
      checks.choice(self.insertion_reference, perturb.REFERENCES, "insertion_reference")
    checks.choice(self.score, objectives.SCORES, "score")
    checks.choice(self.class_source, CLASS_SOURCES, "class_source")

  @property
  def fractions(self) -> np.ndarray:
    return np.linspace(0.0, 1.0, self.num_steps, dtype=np.float64)

  def references(self, images: Array) -> tuple[Array, Array]:
    """(deletion, insertion) reference images f32[B, H, W, C]."""
    kw = dict(mean_color=self.mean_color, blur_size=self.blur_size, blur_sigma=self.blur_sigma)
    deletion = perturb.reference_images(images, self.reference, **kw)
    if self.insertion_reference in (None, self.reference):
      return deletion, deletion
    return deletion, perturb.reference_images(images, self.insertion_reference, **kw)


def _check_inputs(images: Array, maps: Array) -> None:
  checks.rank(images, 4, "images", "f32[B, H, W, C]")
  checks.floating(images, "images")
  b, h, w, _ = images.shape
  checks.shape(maps, (b, h, w), "maps", f"f32[{b}, {h}, {w}] (one map per image)")
  checks.floating(maps, "maps")
  checks.finite(maps, "maps")


def _unit_ranks(maps: Array, unit: int) -> tuple[Array, Array]:
  """Descending ranks i32[B, h, w] of the units of maps and of -maps (the insertion order)."""
  s = perturb.unit_scores(maps.astype(jnp.float32), unit)
  b, gh, gw = s.shape
  flat = s.reshape(b, gh * gw)
  return (perturb.descending_ranks(flat).reshape(b, gh, gw),
          perturb.descending_ranks(-flat).reshape(b, gh, gw))


def hard_sweep(apply_fn: ApplyFn,
               images: Array,
               maps: Array,
               references: tuple[Array, Array],
               readout: Callable[[Array], Array],
               fractions: Sequence[float] | np.ndarray,
               *,
               unit: int = 1,
               chunk_size: int = 7,
               mesh: Mesh | None = None) -> Array:
  """`readout` of the target along both hard sweeps: f32[B, 2(deletion, insertion), K].

  Args:
    apply_fn: images f32[M, H, W, C] -> logits f32[M, classes].
    images: f32[B, H, W, C]; maps: f32[B, H, W].
    references: (deletion, insertion) references, each f32[B, H, W, C].
    readout: logits f32[B, classes] of one perturbed batch -> f32[B].
    fractions: K fractions in [0, 1], increasing.
    mesh: spread the 2 * K perturbed copies of each image over all of the mesh's devices
      (module docstring); None: the default device.
  """
  _check_inputs(images, maps)
  return _sweep(apply_fn, images, maps, references, readout, fractions, unit=unit,
                chunk_size=chunk_size, mesh=mesh)


def rollout_layout(num_items: int, num_devices: int, chunk_size: int) -> tuple[int, int]:
  """(items per device, items per target call) that spread `num_items` perturbed copies over
  `num_devices` in the fewest target calls of at most `chunk_size` copies each, the calls as even
  as possible; items per device is a multiple of items per call, and devices x items per device
  >= num_items (the rest is padding)."""
  per_device = -(-num_items // num_devices)
  calls = -(-per_device // chunk_size)
  chunk = -(-per_device // calls)
  return calls * chunk, chunk


def _sweep(apply_fn, images, maps, references, readout, fractions, *, unit, chunk_size,
           mesh=None):
  """`hard_sweep` on inputs already checked (the public entry points check them once)."""
  b = images.shape[0]
  ranks = _unit_ranks(maps, unit)
  n = ranks[0].shape[1] * ranks[0].shape[2]
  counts = perturb.deletion_counts(fractions, n)
  k = len(counts)
  # Items: (sweep, count) pairs, deletion's K first; a target call holds 2 * chunk_size of them
  # per image, as many as chunk_size fractions of both sweeps.
  sweeps = np.repeat(np.arange(2, dtype=np.int32), k)
  items = np.concatenate([counts, counts])
  devices = 1 if mesh is None else mesh.size
  per_device, chunk = rollout_layout(2 * k, devices,
                                     2 * checks.static_int(chunk_size, "chunk_size"))
  pad = devices * per_device - 2 * k  # padding items: full deletion, read and dropped
  sweeps = jnp.asarray(np.concatenate([sweeps, np.zeros(pad, np.int32)]))
  items = jnp.asarray(np.concatenate([items, np.full(pad, counts[-1], np.int32)]))
  rollouts = functools.partial(_rollouts, apply_fn, readout, unit=unit, chunk=chunk)
  if mesh is not None:
    axes = tuple(mesh.axis_names)  # spread over every axis of the mesh
    rollouts = jax.shard_map(rollouts, mesh=mesh,
                             in_specs=(P(), P(), P(), P(axes), P(axes)), out_specs=P(None, axes))
  out = rollouts(images, ranks, references, sweeps, items)  # [B, devices * per_device]
  return out[:, :2 * k].reshape(b, 2, k)


def _rollouts(apply_fn, readout, images, ranks, references, sweeps, counts, *, unit, chunk):
  """`readout` of the target on perturbed copies of the images: copy i deletes the counts[i]
  top-ranked units of sweep sweeps[i] (0: deletion ranks and reference, 1: insertion), `chunk`
  copies of every image per target call: f32[B, M] for i32[M] sweeps and counts, M a multiple of
  `chunk`."""
  b, h, w, c = images.shape
  ranks = jnp.stack(ranks)  # [2, B, h, w]
  references = jnp.stack(references)  # [2, B, H, W, C]

  def one_chunk(chunk_items):  # (i32[chunk], i32[chunk]) -> f32[chunk, B]
    chunk_sweeps, chunk_counts = chunk_items
    masks = jax.vmap(lambda s, n_del: perturb.hard_mask_from_ranks(ranks[s], n_del, unit))(
        chunk_sweeps, chunk_counts)  # [chunk, B, H, W]
    x = images[None] + masks[..., None] * (references[chunk_sweeps] - images[None])
    logits = apply_fn(x.reshape(chunk * b, h, w, c))
    checks.rank(logits, 2, "apply_fn(images)", "f32[M, classes]")
    return jax.vmap(readout)(logits.reshape(chunk, b, -1))

  out = jax.lax.map(one_chunk, (sweeps.reshape(-1, chunk), counts.reshape(-1, chunk)))
  return out.reshape(-1, b).T


def class_scores_readout(classes: Array, score: str = "prob") -> Callable[[Array], Array]:
  """Readout: the score ('prob' or 'logit') of classes i32[B], for `hard_sweep`."""
  return lambda logits: objectives.class_scores(logits, classes[:, None], score)[:, 0]


def top1_hit_readout(classes: Array) -> Callable[[Array], Array]:
  """Readout: 1.0 where the top-1 prediction equals classes i32[B], else 0.0."""
  return lambda logits: (jnp.argmax(logits, axis=-1) == classes).astype(jnp.float32)


def evaluation_classes(apply_fn: ApplyFn, images: Array, labels: Array | None,
                       class_source: str = "predicted") -> Array:
  """The class each image is explained for: i32[B], top-1 on the clean image or the label."""
  checks.choice(class_source, CLASS_SOURCES, "class_source")
  if class_source == "predicted":
    return jnp.argmax(apply_fn(images), axis=-1).astype(jnp.int32)
  if labels is None:
    raise ValueError("class_source='label' needs labels i32[B]; pass labels or use "
                     "class_source='predicted'")
  checks.shape(labels, (images.shape[0],), "labels", f"i32[{images.shape[0]}]")
  checks.integer(labels, "labels")
  return jnp.asarray(labels, jnp.int32)


def deletion_insertion(apply_fn: ApplyFn,
                       images: Array,
                       maps: Array,
                       labels: Array | None = None,
                       protocol: Protocol = Protocol(),
                       classes: Array | None = None,
                       mesh: Mesh | None = None) -> dict[str, Array]:
  """Deletion and insertion AUC of attribution maps under a protocol.

  Args:
    apply_fn: the target, images f32[M, H, W, C] in [0, 1] -> logits f32[M, classes].
    images: f32[B, H, W, C] in [0, 1].
    maps: f32[B, H, W] attribution maps, finite.
    labels: i32[B] ground-truth labels; needed when protocol.class_source == 'label'.
    protocol: the protocol (default: the paper's).
    classes: i32[B] to override the protocol's class choice.
    mesh: spread the perturbed copies of each image over all of the mesh's devices (module
      docstring; for fewer images than devices); None: the default device.
  Returns:
    'deletion', 'insertion': f32[B] AUCs; 'deletion_curve', 'insertion_curve': f32[B, K];
    'classes': i32[B].
  """
  _check_inputs(images, maps)
  checks.in_range(images, 0.0, 1.0, "images")
  if classes is None:
    classes = evaluation_classes(apply_fn, images, labels, protocol.class_source)
  checks.shape(classes, (images.shape[0],), "classes", f"i32[{images.shape[0]}]")
  curves = _sweep(apply_fn, images, maps, protocol.references(images),
                  class_scores_readout(classes, protocol.score), protocol.fractions,
                  unit=protocol.unit, chunk_size=protocol.chunk_size, mesh=mesh)
  auc = objectives.trapezoid_auc(curves, protocol.fractions)
  return {"deletion": auc[:, 0], "insertion": auc[:, 1], "deletion_curve": curves[:, 0],
          "insertion_curve": curves[:, 1], "classes": classes}


# Chefer et al. 2021: remove 0%, 10%, ..., 90% of the pixels.
PERTURBATION_FRACTIONS = tuple(np.round(np.arange(10) / 10, 2).tolist())


def perturbation_test(apply_fn: ApplyFn,
                      images: Array,
                      maps: Array,
                      labels: Array,
                      *,
                      fractions: Sequence[float] = PERTURBATION_FRACTIONS,
                      reference: str = "mean",
                      mean_color: Sequence[float] = perturb.IMAGENET_MEAN,
                      unit: int = 1,
                      chunk_size: int = 5,
                      mesh: Mesh | None = None) -> dict[str, Array]:
  """Positive / negative perturbation test (Chefer et al. 2021), AUC of top-1 accuracy x 100.

  POS removes the most relevant pixels first (lower is better), NEG the least relevant first
  (higher is better). Removal replaces pixels by the reference (the mean colour: zero in the
  target's normalised space for an ImageNet-normalised target). Accuracy is top-1 agreement with
  `labels` (ground truth, or the clean predictions for the "original prediction" variant). The
  AUC is the trapezoid over the fractions, so the mean over images is the AUC of the mean curve.
  `mesh` spreads the perturbed copies over its devices, as in `deletion_insertion`.

  Returns 'pos', 'neg': f32[B] per-image AUC x 100; 'pos_curve', 'neg_curve': f32[B, K] hits.
  """
  _check_inputs(images, maps)
  checks.shape(labels, (images.shape[0],), "labels", f"i32[{images.shape[0]}]")
  checks.integer(labels, "labels")
  ref = perturb.reference_images(images, reference, mean_color=mean_color)
  curves = _sweep(apply_fn, images, maps, (ref, ref), top1_hit_readout(labels), fractions,
                  unit=unit, chunk_size=chunk_size, mesh=mesh)
  auc = 100.0 * objectives.trapezoid_auc(curves, fractions)
  return {"pos": auc[:, 0], "neg": auc[:, 1], "pos_curve": curves[:, 0],
          "neg_curve": curves[:, 1]}


@dataclasses.dataclass
class Accumulator:
  """Masked sums of per-example scores over batches (and devices, and processes: the sums of
  global arrays), for means, standard errors and mean curves; padding (mask False) never counts."""
  total: dict[str, float] = dataclasses.field(default_factory=dict)
  curves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def add(self, key: str, values: Array, mask: Array) -> None:
    w = mask.astype(jnp.float32)
    for suffix, v in (("", jnp.sum(w * values)), ("_sq", jnp.sum(w * values**2)),
                      ("_n", jnp.sum(w))):
      self.total[key + suffix] = self.total.get(key + suffix, 0.0) + float(v)

  def add_curve(self, key: str, curves: Array, mask: Array) -> None:
    s = np.asarray(jnp.sum(mask.astype(jnp.float32)[:, None] * curves, axis=0))
    self.curves[key] = self.curves.get(key, 0.0) + s

  def stats(self, key: str) -> dict[str, float]:
    """{'mean', 'se' (standard error, n - 1 in the variance), 'n'} of `key`."""
    n = self.total[key + "_n"]
    mean = self.total[key] / n
    var = max(self.total[key + "_sq"] / n - mean**2, 0.0) * n / max(n - 1, 1)
    return {"mean": mean, "se": float(np.sqrt(var / n)), "n": int(n)}
