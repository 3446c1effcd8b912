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

Where the time goes, from XLA itself: each compiled function's cost analysis (GFLOP per call;
"flop ratio" = bound GFLOP / step GFLOP: below 1 the step computes more than the target passes,
e.g. the explainer and the sorter) and the step's temporary memory (memory analysis);
--trace DIR writes a profiler trace of one step per config (TensorBoard's profile plugin or
Perfetto read it).
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



def compiled_costs(fn, *args) -> tuple[float, float]:
  """(GFLOP per call, temporary MiB) of jitted `fn` on `args`, from XLA's compiled analyses."""
  compiled = jax.jit(fn).lower(*args).compile()
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # older jax: one dict per computation
    costs = costs[0] if costs else {}
  memory = compiled.memory_analysis()
  return (float((costs or {}).get("flops", float("nan"))) / 1e9,
          float(getattr(memory, "temp_size_in_bytes", float("nan"))) / 2**20)


def bound(target, variables, perturbed, clean):
  """The target passes a training step cannot avoid: grad w.r.t. the perturbed images of the
  explained classes' scores, and the clean forward pass that picks the classes."""
  apply_fn = target.apply_fn(variables)

  def passes(perturbed, clean):
    grads = jax.grad(lambda x: jnp.sum(jax.nn.softmax(apply_fn(x))[:, :2]))(perturbed)
    return grads, apply_fn(clean)

  fn = jax.jit(passes)
  call = lambda: fn(perturbed, clean)  # noqa: E731
  call.costs = lambda: compiled_costs(passes, perturbed, clean)
  return call


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


def measure(name: str, batch: int | None, repeats: int, trace: str | None = None) -> dict:
  module, _, variant = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant or None)
  batch = batch or config.batch_size
  dtype = train.DTYPES[config.target.dtype]
  target = targets.create(config.target.name, random_init=True).with_dtype(dtype)
  grids = sorted(config.grids)
  grid = grids[len(grids) // 2]
  mesh = train.data_mesh(jax.local_devices())
  model = train.build_explainer(config, target)
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
  step_gflop, step_mib = compiled_costs(step, state, target.variables, batch_dict, rng)
  if trace:
    with jax.profiler.trace(str(Path(trace) / name.replace(":", "_"))):
      jax.block_until_ready(step(state, target.variables, batch_dict, rng))
  f = config.objective.num_fractions
  perturbed = jnp.repeat(images, 2 * f, axis=0)
  bound_fn = bound(target, target.variables, perturbed, images)
  bound_s = median_seconds(bound_fn, repeats)
  bound_gflop, _ = bound_fn.costs()
  per_class_s = median_seconds(per_class_bound(target, target.variables, perturbed, images),
                               repeats)
  return {"per_class_ms": 1e3 * per_class_s, "config": name, "target": config.target.name, "dtype": config.target.dtype,
          "batch": batch, "grid": grid, "fractions": f, "step_ms": 1e3 * step_s,
          "images_per_s": batch / step_s, "bound_ms": 1e3 * bound_s, "ratio": bound_s / step_s,
          "step_gflop": step_gflop, "bound_gflop": bound_gflop, "step_temp_mib": step_mib}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="vit:mnist,resnet:cifar10,efficientnet:imagenet")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--trace", default=None, help="folder for a profiler trace of one step")
  args = parser.parse_args()
  print(f"{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} x "
        f"{jax.local_device_count()}, jax {jax.__version__}")
  print("| config | target | batch | grid | step ms | steps/s | images/s | target fwd+bwd ms | "
        "ratio | once per class ms | saving | step GFLOP | bound GFLOP | flop ratio | "
        "step temp MiB |")
  print("| --- " * 15 + "|")
  for name in args.configs.split(","):
    r = measure(name, args.batch, args.repeats, args.trace)
    print(f"| {r['config']} | {r['target']} ({r['dtype']}) | {r['batch']} | {r['grid']} | "
          f"{r['step_ms']:,.0f} | {1e3 / r['step_ms']:.2f} | {r['images_per_s']:.1f} | "
          f"{r['bound_ms']:,.0f} | {r['ratio']:.2f} | {r['per_class_ms']:,.0f} | "
          f"{r['per_class_ms'] / r['step_ms']:.2f}x | {r['step_gflop']:,.1f} | "
          f"{r['bound_gflop']:,.1f} | {r['bound_gflop'] / r['step_gflop']:.2f} | "
          f"{r['step_temp_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
