"""Forward throughput of every registered target at its native input size.

  python bench/bench_targets.py                          # CPU: small batches, float32
  python bench/bench_targets.py --batch 128 --bf16       # GPU: also bfloat16 compute

Throughput does not depend on the values of the weights, so targets that need a user's weights
file run with random parameters (`random_init=True`); the EfficientNet-Lite0 runs with its real
weights. Images/s is the median of --repeats timed calls after a warm-up, of a jitted
`target.apply` on uniform [0, 1] images.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from l2r_jax import targets


def images_per_second(target, batch, repeats):
  h, w = target.input_size
  x = jax.random.uniform(jax.random.key(0), (batch, h, w, 3))
  f = jax.jit(target.apply)
  jax.block_until_ready(f(target.variables, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(target.variables, x))
    times.append(time.perf_counter() - t)
  return batch / statistics.median(times)


def make(name):
  factory = targets.base._FACTORIES[name]
  if "random_init" in inspect.signature(factory).parameters and name != "efficientnet_lite0":
    return targets.create(name, random_init=True)
  return targets.create(name)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--names", nargs="+", default=None, help="default: every registered one")
  parser.add_argument("--batch", type=int, default=8, help="batch at 224 px; x16 below 64 px")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"### {datetime.date.today()} | {platform.node()} | {device.platform}: "
        f"{device.device_kind} | jax {jax.__version__}\n")
  print("| target | input | batch | f32 images/s |" + (" bf16 images/s |" if args.bf16 else ""))
  print("| --- | --- | --- | --- |" + (" --- |" if args.bf16 else ""), flush=True)
  for name in args.names or targets.names():
    target = make(name)
    batch = args.batch * (16 if max(target.input_size) < 64 else 1)
    row = f"| {name} | {target.input_size[0]} | {batch} | " \
          f"{images_per_second(target, batch, args.repeats):,.1f} |"
    if args.bf16:
      row += f" {images_per_second(target.with_dtype(jnp.bfloat16), batch, args.repeats):,.1f} |"
    print(row, flush=True)


if __name__ == "__main__":
  main()
