"""Times one image's evaluation and refinement on one device against the same spread over all
local devices (`mesh=`: the perturbed copies of an image, or the refinement's samples, split over
the devices), for one image and small sets.

  python bench/bench_rollouts.py                                # CPU: 8 virtual devices, vit:mnist
  python bench/bench_rollouts.py --configs vit:mnist,vit:imagenet,efficientnet:imagenet  # GPUs

Per config and number of images: the paper-protocol deletion / insertion evaluation
(`metrics.deletion_insertion` with `train.heldout_protocol`: 21 fractions x 2 sweeps, pixel
ranking, predicted class) and --refine_steps steps of test-time refinement
(`refine.refine` with `evaluate.refine_settings`: 6 samples per step), each jitted, on the default
device (`mesh=None`, the library's default path) and on a mesh of every local device. The targets
have random weights (the time does not depend on their values; no weights file is needed) and the
maps are random. Medians of --repeats runs after a warm-up, one run of this script for both
columns; prints a Markdown table.

Without accelerators the script asks XLA for 8 virtual CPU devices (XLA_FLAGS, set before jax is
imported unless it already names a device count). They share the machine's cores, so on a 2-core
machine the CPU speed-up is bounded by about 2x (less where the one-device run already spreads
its large ops over both cores): the CPU table shows that the sharded path runs and costs little,
the real test is on several GPUs or TPU chips. With a single accelerator (one GPU) only the
one-device column is measured, and the table says so.
"""
from __future__ import annotations

import os

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
  os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_force_host_platform_device_count=8").strip()

import argparse
import datetime
import importlib
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from l2r_jax import checks
from l2r_jax import evaluate
from l2r_jax import metrics
from l2r_jax import refine
from l2r_jax import targets
from l2r_jax import train
from timing import median_seconds  # bench/timing.py (scripts run as bench/*.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the root


TASKS = ("evaluation", "refinement")



def measure(name: str, num_images: int, mesh, refine_steps: int, repeats: int,
            tasks: tuple[str, ...] = TASKS) -> list[dict]:
  """Rows {'config', 'target', 'images', 'task', 'one_ms', 'mesh_ms'} of one config and number of
  images; mesh_ms is None without a mesh."""
  module, _, variant = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant or None)
  target = targets.create(config.target.name, random_init=True).with_dtype(
      train.DTYPES[config.target.dtype])
  apply_fn = target.apply_fn()
  h, w = target.input_size
  images = jax.random.uniform(jax.random.key(0), (num_images, h, w, 3))
  maps = jax.random.normal(jax.random.key(1), (num_images, h, w))
  classes = jnp.argmax(apply_fn(images), axis=-1).astype(jnp.int32)
  key = jax.random.key(2)
  protocol = train.heldout_protocol(config)
  refine_config = evaluate.refine_settings(config, refine_steps)

  def evaluation(mesh):
    fn = jax.jit(lambda x, m, c: metrics.deletion_insertion(apply_fn, x, m, protocol=protocol,
                                                            classes=c, mesh=mesh)["deletion"])
    return lambda: fn(images, maps, classes)

  def refinement(mesh):
    fn = jax.jit(lambda x, m, c, k: refine.refine(apply_fn, x, m, c, k, refine_config,
                                                  mesh=mesh)[0])
    return lambda: fn(images, maps, classes, key)

  runs = {"evaluation": (f"evaluation ({protocol.num_steps} x 2 copies)", evaluation),
          "refinement": (f"refinement ({refine_steps} steps x "
                         f"{refine_config.num_samples} samples)", refinement)}
  rows = []
  for label, make in (runs[t] for t in tasks):
    one = median_seconds(make(None), repeats)
    sharded = None if mesh is None else median_seconds(make(mesh), repeats)
    rows.append({"config": name, "target": f"{config.target.name} ({config.target.dtype})",
                 "images": num_images, "task": label, "one_ms": 1e3 * one,
                 "mesh_ms": None if sharded is None else 1e3 * sharded})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="vit:mnist")
  parser.add_argument("--images", default="1,2,4", help="numbers of images, comma-separated")
  parser.add_argument("--tasks", default=",".join(TASKS), help="evaluation and/or refinement")
  parser.add_argument("--refine_steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  tasks = tuple(args.tasks.split(","))
  for task in tasks:
    checks.choice(task, TASKS, "--tasks")
  devices = jax.local_devices()
  mesh = train.data_mesh(devices) if len(devices) > 1 else None
  n = len(devices)
  cores = os.cpu_count()
  print(f"{datetime.date.today()}, {platform.node()}, {devices[0].device_kind} x {n}"
        f"{f' (virtual, on {cores} CPU cores)' if devices[0].platform == 'cpu' else ''}, "
        f"jax {jax.__version__}")
  if mesh is None:
    print(f"Only one device: the {n}-device column is not measured.")
  print(f"| config | target | images | task | 1 device ms | {n} devices ms | speed-up |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name in args.configs.split(","):
    for num_images in (int(b) for b in args.images.split(",")):
      for r in measure(name, num_images, mesh, args.refine_steps, args.repeats, tasks):
        sharded = "-" if r["mesh_ms"] is None else f"{r['mesh_ms']:,.1f}"
        ratio = "-" if r["mesh_ms"] is None else f"{r['one_ms'] / r['mesh_ms']:.2f}"
        print(f"| {r['config']} | {r['target']} | {r['images']} | {r['task']} | "
              f"{r['one_ms']:,.1f} | {sharded} | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
