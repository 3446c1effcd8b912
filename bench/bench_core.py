"""Times the ranking core: the Gumbel-Sinkhorn sorter and the training objective.

  python bench/bench_core.py                      # CPU-sized defaults
  python bench/bench_core.py --objective-batch 32 # the paper's batch (GPU)

1. Sorter forward+backward at batch 32, 30 iterations, N in {49, 196, 784, 3136}: median wall
   time, and the compiled temporary memory of the backward pass for 10 and 30 iterations, beside
   the textbook scan over the N x N iterate (compiled only, never run: it would not fit).
2. The objective (16 fractions x deletion and insertion, 224 x 224, grids 7 / 14 / 28)
   forward+backward w.r.t. the map, with a deliberately cheap target (7 x 7 average pool + linear)
   so the time is the objective's own; and the paper's hard metric (21 steps) on the same target.
Prints a Markdown table; medians of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import jax
import jax.numpy as jnp

from l2r_jax import metrics
from l2r_jax import objectives
from l2r_jax import perturb
from l2r_jax import sorting
from timing import median_seconds  # bench/timing.py (scripts run as bench/*.py)



def naive_soft_sort(scores, num_iters, tau=0.3):
  log_alpha = sorting.anchor_log_alpha(scores) / tau

  def step(x, _):
    x = x - jax.nn.logsumexp(x, axis=-2, keepdims=True)
    return x - jax.nn.logsumexp(x, axis=-1, keepdims=True), None

  return jnp.exp(jax.lax.scan(step, log_alpha, None, length=num_iters)[0])


def sorter_grad(sort_fn, n, num_iters):
  weights = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)

  def loss(s, key):
    return jnp.sum(sort_fn(s, key, num_iters) * weights)

  return jax.jit(jax.grad(loss))


def ours(s, key, num_iters):
  return sorting.soft_sort(s, key=key, tau=0.3, num_iters=num_iters)


def naive(s, key, num_iters):
  del key
  return naive_soft_sort(s, num_iters)


def temp_mib(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def bench_sorter(batch, sizes, repeats):
  rows = []
  key = jax.random.key(0)
  for n in sizes:
    s = jax.random.normal(key, (batch, n))
    row = {"N": n}
    for it in (10, 30):
      row[f"ours_mib_{it}"] = temp_mib(sorter_grad(ours, n, it), s, key)
      row[f"naive_mib_{it}"] = temp_mib(sorter_grad(naive, n, it), s, key)
    timed = sorter_grad(ours, n, 30)
    row["ms"] = 1e3 * median_seconds(lambda: timed(s, key), repeats)
    rows.append(row)
    print(row, flush=True)
  return rows


def cheap_target(num_classes=10, seed=0):
  w = jax.random.normal(jax.random.key(seed), (7 * 7 * 3, num_classes)) * 0.3

  def apply(x):
    b, h, w_, c = x.shape
    pooled = x.reshape(b, 7, h // 7, 7, w_ // 7, c).mean(axis=(2, 4))
    return pooled.reshape(b, -1) @ w

  return apply


def bench_objective(batch, grids, repeats):
  apply = cheap_target()
  images = jax.random.uniform(jax.random.key(1), (batch, 224, 224, 3))
  maps = jax.random.normal(jax.random.key(2), (batch, 224, 224))
  refs = perturb.reference_images(images, "blur")
  classes = objectives.select_classes(apply(images))
  rows = []
  for g in grids:
    def loss(m, key, g=g):
      return objectives.loss_fn(apply, images, m, refs, classes, key=key, grid=g, tau=0.5)[0]

    f = jax.jit(jax.value_and_grad(loss))
    ms = 1e3 * median_seconds(lambda: f(maps, jax.random.key(3)), repeats)
    rows.append({"grid": g, "ms": ms, "images_per_s": batch / ms * 1e3})
    print(rows[-1], flush=True)
  evaluate = jax.jit(lambda x, m: metrics.deletion_insertion(apply, x, m)["deletion"])
  ms = 1e3 * median_seconds(lambda: evaluate(images, maps), repeats)
  rows.append({"grid": "hard metric, 21 steps", "ms": ms, "images_per_s": batch / ms * 1e3})
  print(rows[-1], flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sorter-batch", type=int, default=32)
  parser.add_argument("--sizes", type=int, nargs="+", default=[49, 196, 784, 3136])
  parser.add_argument("--objective-batch", type=int, default=8)
  parser.add_argument("--grids", type=int, nargs="+", default=[7, 14, 28])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()

  device = jax.devices()[0]
  header = (f"{datetime.date.today()} | {platform.node()} | {device.platform}: "
            f"{device.device_kind} x {jax.device_count()} | jax {jax.__version__}")
  print(header, flush=True)
  sorter_rows = bench_sorter(args.sorter_batch, args.sizes, args.repeats)
  objective_rows = bench_objective(args.objective_batch, args.grids, args.repeats)

  print(f"\n### {header}\n")
  print(f"Sorter forward+backward, batch {args.sorter_batch}, tau 0.3, Gumbel noise, "
        f"median of {args.repeats}; backward temporaries (compiled) for 10 / 30 iterations")
  print("\n| N | ms (30 it) | ours MiB 10 it | ours MiB 30 it | naive scan MiB 10 it | "
        "naive scan MiB 30 it |\n| --- | --- | --- | --- | --- | --- |")
  for r in sorter_rows:
    print(f"| {r['N']} | {r['ms']:.1f} | {r['ours_mib_10']:.0f} | {r['ours_mib_30']:.0f} | "
          f"{r['naive_mib_10']:.0f} | {r['naive_mib_30']:.0f} |")
  print(f"\nObjective forward+backward w.r.t. the map, batch {args.objective_batch}, 224 x 224, "
        f"16 fractions x (deletion, insertion), 2 classes, cheap target; median of "
        f"{args.repeats}\n\n| grid | ms | images/s |\n| --- | --- | --- |")
  for r in objective_rows:
    print(f"| {r['grid']} | {r['ms']:.1f} | {r['images_per_s']:.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "sorter": sorter_rows, "objective": objective_rows}, f,
                indent=1)


if __name__ == "__main__":
  main()
