"""Training a small target classifier from scratch, and caching it (the embedded demo's target).

The explainer needs a frozen classifier whose decisions mean something. For the offline demo that
is `vit_tiny_p4_28` trained on the embedded MNIST digits (`data.create('mnist5k')`), a few minutes
on a laptop CPU:

  target = targets.create("vit_tiny_p4_28", random_init=True)
  target = load_or_train(target, "cache/vit_tiny_p4_28_mnist5k.msgpack",
                         source_train=data.create("mnist5k", split="train"),
                         source_test=data.create("mnist5k", split="test"))

With the defaults below (1,000 steps of 128 digits shifted by up to 1 px, AdamW at 2e-3 with
warm-up + cosine) it reaches 0.965 test accuracy on the 1,000 test digits in ~3.3 minutes on a
shared 2-core CPU (5.1 steps/s).

Pure functions in the style of `train.py`: `classification_loss`, `make_optimizer`,
`make_train_step` (jitted at the edge), `evaluate_accuracy`, then the loop `train_classifier` and
the cache `load_or_train`. The cache file is a Flax msgpack of the variables ({'params': ...}),
so it is also a weights file the ViT factory reads: `targets.create(name, weights=path)`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from l2r_jax import checks
from l2r_jax import data as data_lib
from l2r_jax.targets import base

Array = jax.Array

# Defaults for vit_tiny_p4_28 on mnist5k/train (4,000 digits): 32 epochs of batch 128, ~200 s on
# a shared 2-core CPU (5.1 steps/s, compute-bound; the pipeline takes ~10 ms a batch) for 0.965
# test accuracy. Measured alternatives: no shift, 1,500 steps at 1e-3: train loss 6e-4 but 0.898
# (it memorises the digits); 2 px shifts, 600 steps at 2e-3: 0.924 (underfit, 107 s).
STEPS = 1000
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
MAX_SHIFT = 1  # pixels, each axis
SEED = 0


def classification_loss(params: Any, other_variables: Mapping[str, Any], target: base.Target,
                        images: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Mean softmax cross-entropy and accuracy of a batch.

  Args:
    params: the target's 'params' collection (what is trained).
    other_variables: its other collections (none for a ViT), passed through unchanged.
    images: f32[B, H, W, 3] in [0, 1] (the target normalises them itself).
    labels: i32[B] in [0, classes).
  """
  logits = target.apply({**other_variables, "params": params}, images)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}


def make_optimizer(learning_rate: float, steps: int, weight_decay: float = WEIGHT_DECAY,
                   warmup_fraction: float = WARMUP_FRACTION, clip_norm: float = 1.0
                   ) -> optax.GradientTransformation:
  """Grad-norm clipping, then AdamW with linear warm-up to `learning_rate` and cosine decay to 0.

  Weight decay touches only matrices and kernels (ndim >= 2): decaying LayerNorm scales and
  biases towards 0 only hurts a model this small.
  """
  warmup = max(1, round(warmup_fraction * steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=0.0)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))


def random_shift(images: Array, key: Array, max_shift: int) -> Array:
  """Each image f32[B, H, W, C] translated by its own integer offset in [-max_shift, max_shift]
  on each axis, the uncovered border filled with 0 (black: MNIST's background).

  Translation is the augmentation digits allow (no flips, no crops that cut strokes), and a ViT,
  with no convolutional prior, needs it to generalise from a few thousand examples.
  """
  if max_shift == 0:
    return images
  b, h, w, _ = images.shape
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  s = max_shift
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  crop = lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, x.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


def make_train_step(target: base.Target, tx: optax.GradientTransformation,
                    max_shift: int = MAX_SHIFT
                    ) -> Callable[..., tuple[Any, Any, dict[str, Array]]]:
  """A jitted `(params, opt_state, other_variables, images, labels, key) -> (params, opt_state,
  metrics)` that trains on `random_shift`ed images; params and opt_state are donated (updated in
  place)."""
  max_shift = checks.static_int(max_shift, "max_shift", minimum=0)

  def step(params, opt_state, other_variables, images, labels, key):
    images = random_shift(images, key, max_shift)
    grads, metrics = jax.grad(classification_loss, has_aux=True)(
        params, other_variables, target, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def evaluate_accuracy(target: base.Target, variables: Mapping[str, Any], source,
                      batch_size: int = 500) -> float:
  """Top-1 accuracy of `variables` over every example of `source` (padding masked out)."""
  predict = jax.jit(lambda v, x: jnp.argmax(target.apply(v, x), axis=-1))
  correct = total = 0
  for batch in data_lib.make_batches(source, batch_size=batch_size,
                                     preprocess=target.preprocess, process_index=0,
                                     process_count=1):
    hits = np.asarray(predict(variables, batch["image"])) == batch["label"]
    correct += int(np.sum(hits & batch["mask"]))
    total += int(np.sum(batch["mask"]))
  return correct / total


def _trainable(target: base.Target) -> tuple[Any, dict[str, Any]]:
  # A copy (jnp.array, not asarray): the step donates params, which must not delete the caller's.
  variables = jax.tree.map(lambda a: jnp.array(a, jnp.float32), dict(target.variables))
  others = {k: v for k, v in variables.items() if k != "params"}
  if others:
    # e.g. a ResNet's batch_stats: they need a train-mode pass with mutable collections, which
    # the target contract (an inference-only `apply`) does not offer.
    raise ValueError(f"train_classifier trains only 'params'; target {target.name!r} also has "
                     f"the collections {sorted(others)}, which need a train-mode update "
                     f"(not supported)")
  return variables["params"], others


def train_classifier(target: base.Target, source, *, steps: int = STEPS,
                     batch_size: int = BATCH_SIZE, learning_rate: float = LEARNING_RATE,
                     seed: int = SEED, weight_decay: float = WEIGHT_DECAY,
                     max_shift: int = MAX_SHIFT, log_every: int = 100,
                     eval_source=None, log: Callable[[str], Any] = print
                     ) -> tuple[dict[str, Any], dict[str, float]]:
  """Trains the target's variables as a classifier of `source`'s labels, from its current values.

  Batches are shuffled each epoch (seed), preprocessed with `target.preprocess`, and shifted
  by up to `max_shift` pixels (`random_shift`, keys from seed and step). With the defaults,
  vit_tiny_p4_28 on mnist5k/train reaches 0.965 on mnist5k/test (the slow test asserts >= 0.95)
  in ~200 s on a 2-core CPU.

  Args:
    target: a registered target whose variables hold only 'params' (e.g. a ViT); its head must
      have as many classes as the source's labels need.
    source: a random-access source with integer labels (e.g. data.create('mnist5k')).
    steps, batch_size, learning_rate, seed, weight_decay, max_shift: the run (see
      `make_optimizer`, `random_shift`).
    log_every: log the running train loss every this many steps (0: never).
    eval_source: if given, the test accuracy on it is measured at the end.
    log: where progress lines go.
  Returns:
    (variables with the input's tree, shapes and float32 dtype, metrics) with metrics
    'train_loss' (mean over the last min(log_every, steps) steps, or the last 50 when
    log_every is 0), 'train_accuracy' (same window), 'steps_per_second' (after the compiling
    first step), 'seconds' (the whole run, evaluation excluded) and, with eval_source,
    'test_accuracy'.
  """
  steps = checks.static_int(steps, "steps")
  batch_size = checks.static_int(batch_size, "batch_size")
  log_every = checks.static_int(log_every, "log_every", minimum=0)
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  params, others = _trainable(target)
  tx = make_optimizer(learning_rate, steps, weight_decay)
  opt_state = tx.init(params)
  train_step = make_train_step(target, tx, max_shift)
  shift_key = jax.random.key(seed)
  # Single-process on purpose: the target is small, and one process needs every batch.
  batches = data_lib.make_batches(source, batch_size=batch_size, preprocess=target.preprocess,
                                  seed=seed, shuffle=True, num_epochs=None, drop_remainder=True,
                                  process_index=0, process_count=1, worker_threads=2)
  window = min(log_every or 50, steps)
  recent: list[dict[str, Array]] = []
  start = time.perf_counter()
  after_compile = None
  for i, batch in zip(range(steps), batches):
    params, opt_state, metrics = train_step(params, opt_state, others, batch["image"],
                                            batch["label"], jax.random.fold_in(shift_key, i))
    if i == 0:
      jax.block_until_ready(params)
      after_compile = time.perf_counter()
    recent = (recent + [metrics])[-window:]
    if log_every and (i + 1) % log_every == 0:
      loss = float(np.mean([float(m["loss"]) for m in recent]))
      log(f"  step {i + 1}/{steps}: train loss {loss:.4f}")
  jax.block_until_ready(params)
  end = time.perf_counter()
  out = {"train_loss": float(np.mean([float(m["loss"]) for m in recent])),
         "train_accuracy": float(np.mean([float(m["accuracy"]) for m in recent])),
         "steps_per_second": (steps - 1) / (end - after_compile) if steps > 1 else float("nan"),
         "seconds": end - start}
  variables = {**others, "params": params}
  if eval_source is not None:
    out["test_accuracy"] = evaluate_accuracy(target, variables, eval_source)
  return variables, out


def save_variables(variables: Mapping[str, Any], path: str) -> None:
  """Writes `variables` as a Flax msgpack, atomically: a reader never sees a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  payload = serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_variables(template: Mapping[str, Any], path: str) -> dict[str, Any]:
  """float32 variables from the msgpack at `path`, checked against `template`'s tree and shapes;
  a ValueError naming the file when it is unreadable or does not fit."""
  with open(path, "rb") as f:
    payload = f.read()
  try:
    restored = serialization.msgpack_restore(payload)
  except Exception as e:  # msgpack raises several types for a damaged file
    raise ValueError(f"cached target {path!r} is not a readable Flax msgpack ({e}); delete it "
                     f"to retrain") from None
  if not isinstance(restored, Mapping):
    raise ValueError(f"cached target {path!r} does not hold a dict of variables (got "
                     f"{type(restored).__name__}); delete it to retrain")
  try:
    return base.match_variables(template, restored, path)
  except ValueError as e:
    raise ValueError(f"{e}\ndelete {path!r} to retrain") from None


def load_or_train(target: base.Target, cache_path: str, *, source_train, source_test=None,
                  steps: int = STEPS, batch_size: int = BATCH_SIZE,
                  learning_rate: float = LEARNING_RATE, seed: int = SEED,
                  log: Callable[[str], Any] = print) -> base.Target:
  """`target` with trained variables: read from `cache_path` if it exists, else trained on
  `source_train` (`train_classifier`) and written there.

  The cache is not keyed by the settings: a file from other settings (same architecture) is
  loaded as it is; delete it to retrain. A file that does not fit the architecture is a
  ValueError naming it.
  """
  if os.path.exists(cache_path):
    variables = load_variables(target.variables, cache_path)
    log(f"loaded the cached target {target.name} from {cache_path}")
    return dataclasses.replace(target, variables=variables)
  log(f"training the target {target.name} on {getattr(source_train, 'name', 'the source')} "
      f"({steps} steps of {batch_size}, lr {learning_rate}; cached at {cache_path})")
  variables, metrics = train_classifier(target, source_train, steps=steps, batch_size=batch_size,
                                        learning_rate=learning_rate, seed=seed,
                                        eval_source=source_test, log=log)
  summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
  log(f"trained the target {target.name}: {summary}")
  save_variables(variables, cache_path)
  log(f"saved the trained target to {cache_path}")
  return dataclasses.replace(target, variables=variables)
