"""Times the training step of each config against its bound: the target's own forward+backward.

  python bench/bench_train.py                                   # CPU: every config, small batches
  python bench/bench_train.py --configs vit:imagenet --batch 32 # GPU: the paper's step

For each config, one jitted data-parallel step (`train.make_train_step`, all local devices) at
the config's batch (or --batch) and its middle grid size, beside the bound: the same target's
forward+backward w.r.t. its input on the step's perturbed images (batch x fractions x 2 sweeps)
plus the forward pass of the clean batch, i.e. what any implementation of the objective must
compute. ratio = bound / step (1.0 = the step costs no more than the target passes it needs).
"once per class" is that bound as the authors' code runs it, the target once per explained class
(top-1, top-2) on identical images; saving = that time / our whole step.
The targets have random weights: the time does not depend on their values, and no weights file
is needed. Medians of --repeats runs after a warm-up; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from l2r_jax import targets
from l2r_jax import train
from timing import median_seconds  # bench/timing.py (scripts run as bench/*.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the root



def bound(target, variables, perturbed, clean):
  """The target passes a training step cannot avoid: grad w.r.t. the perturbed images of the
  explained classes' scores, and the clean forward pass that picks the classes."""
  apply_fn = target.apply_fn(variables)

  def passes(perturbed, clean):
    grads = jax.grad(lambda x: jnp.sum(jax.nn.softmax(apply_fn(x))[:, :2]))(perturbed)
    return grads, apply_fn(clean)

  fn = jax.jit(passes)
  return lambda: fn(perturbed, clean)


def per_class_bound(target, variables, perturbed, clean):
  """The same passes as the authors' code runs them: the target once per explained class (top-1
  and top-2) on identical perturbed images, instead of reading both classes from one pass."""
  apply_fn = target.apply_fn(variables)

  def passes(perturbed, clean):
    grads = [jax.grad(lambda x, c=c: jnp.sum(jax.nn.softmax(apply_fn(x))[:, c]))(perturbed)
             for c in range(2)]
    return grads, apply_fn(clean)

  fn = jax.jit(passes)
  return lambda: fn(perturbed, clean)


def measure(name: str, batch: int | None, repeats: int) -> dict:
  module, _, variant = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant or None)
  batch = batch or config.batch_size
  dtype = train.DTYPES[config.target.dtype]
  target = targets.create(config.target.name, random_init=True).with_dtype(dtype)
  grids = sorted(config.grids)
  grid = grids[len(grids) // 2]
  mesh = train.data_mesh(jax.local_devices())
  model = train.explainer_lib.Explainer(width=config.explainer.width,
                                        conditioning=config.explainer.conditioning,
                                        num_classes=target.num_classes)
  tx = train.make_optimizer(train.learning_rate_fn(config.learning_rate, config.total_steps))
  h, w = target.input_size
  images = jax.random.uniform(jax.random.key(0), (batch, h, w, 3))
  labels = jnp.arange(batch, dtype=jnp.int32) % target.num_classes
  state = train.create_train_state(model, jax.random.key(1), target, target.variables,
                                   images[:1], labels[:1], tx)
  step = train.make_train_step(mesh, grid=grid, model=model, target=target, tx=tx,
                               config=train.step_config(config))
  batch_dict = {"image": images, "label": labels}
  rng = jax.random.key(2)
  step_s = median_seconds(lambda: step(state, target.variables, batch_dict, rng), repeats)
  f = config.objective.num_fractions
  perturbed = jnp.repeat(images, 2 * f, axis=0)
  bound_s = median_seconds(bound(target, target.variables, perturbed, images), repeats)
  per_class_s = median_seconds(per_class_bound(target, target.variables, perturbed, images),
                               repeats)
  return {"per_class_ms": 1e3 * per_class_s, "config": name, "target": config.target.name, "dtype": config.target.dtype,
          "batch": batch, "grid": grid, "fractions": f, "step_ms": 1e3 * step_s,
          "images_per_s": batch / step_s, "bound_ms": 1e3 * bound_s, "ratio": bound_s / step_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="vit:mnist,resnet:cifar10,efficientnet:imagenet")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} x "
        f"{jax.local_device_count()}, jax {jax.__version__}")
  print("| config | target | batch | grid | step ms | steps/s | images/s | target fwd+bwd ms | "
        "ratio | once per class ms | saving |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in args.configs.split(","):
    r = measure(name, args.batch, args.repeats)
    print(f"| {r['config']} | {r['target']} ({r['dtype']}) | {r['batch']} | {r['grid']} | "
          f"{r['step_ms']:,.0f} | {1e3 / r['step_ms']:.2f} | {r['images_per_s']:.1f} | "
          f"{r['bound_ms']:,.0f} | {r['ratio']:.2f} | {r['per_class_ms']:,.0f} | "
          f"{r['per_class_ms'] / r['step_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
