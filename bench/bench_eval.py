"""Times the paper's evaluation protocol against its bound, and every attribution method's cost.

  python bench/bench_eval.py                                  # CPU: the demo ViT and 224 px targets
  python bench/bench_eval.py --targets vit_b16 --batch 32     # GPU sizes

1. Evaluation throughput: `metrics.deletion_insertion` with the paper's protocol (pixel ranking,
   21 points x deletion and insertion, mean reference, softmax of the predicted class) on a batch,
   beside its bound: the (21 x 2) plain forward passes per image of the same target on already
   perturbed images, in the same batch sizes (what any implementation must run).
   ratio = bound / evaluation (1.0 = the protocol costs no more than the passes it needs).
2. Attribution cost per image of every method of the evaluation suite on the same target and
   images, in one run: the L2R explainer's single pass, L2R + 10 refinement steps, Grad-CAM,
   gradient, IG-50, SmoothGrad-50, RISE (--rise_masks), and the ratios of IG-50 and RISE to L2R.

Targets have random weights (`targets.create(name, random_init=True)`) and the explainer random
params: times do not depend on the values and no weights file is needed. Medians of --repeats
runs after a warm-up; prints Markdown tables with the machine, device and date.
"""
from __future__ import annotations

import argparse
import datetime
import platform

import jax
import jax.numpy as jnp

from l2r_jax import baselines
from l2r_jax import explainer as explainer_lib
from l2r_jax import metrics
from l2r_jax import refine as refine_lib
from l2r_jax import targets
from timing import median_seconds  # bench/timing.py (scripts run as bench/*.py)

METHODS = ("l2r", "l2r_refined", "gradcam", "gradient", "integrated_gradients", "smoothgrad",
           "rise")



def evaluation(target, images, maps, repeats):
  """(seconds of the paper protocol, seconds of its bound) for the batch."""
  apply_fn = target.apply_fn()
  protocol = metrics.Protocol()
  evaluate = jax.jit(lambda images, maps: metrics.deletion_insertion(apply_fn, images, maps,
                                                                     protocol=protocol))
  b = images.shape[0]
  steps, chunk = protocol.num_steps, protocol.chunk_size
  chunks = -(-steps // chunk)
  # The same number of forward passes in the same batch sizes as the protocol's chunks:
  # chunks x (2 sweeps x chunk fractions x B images), on images perturbed beforehand.
  deletion_ref, _ = protocol.references(images)
  perturbed = jnp.broadcast_to(
      0.5 * (images + deletion_ref), (chunks, 2 * chunk, *images.shape)).reshape(
          chunks, 2 * chunk * b, *images.shape[1:])
  passes = jax.jit(lambda x: jax.lax.map(lambda p: jax.nn.softmax(apply_fn(p)), x))
  return (median_seconds(lambda: evaluate(images, maps), repeats),
          median_seconds(lambda: passes(perturbed), repeats))


def attribution(target, images, method, options, repeats, refine_steps):
  """Seconds for the batch's maps by `method`."""
  classes = jnp.zeros((images.shape[0],), jnp.int32)
  key = jax.random.key(3)
  if method in ("l2r", "l2r_refined"):
    model = explainer_lib.Explainer(width=64, num_classes=target.num_classes)
    params = explainer_lib.init(model, jax.random.key(1), target, target.variables, images[:1],
                                classes[:1])
    single = jax.jit(lambda images: explainer_lib.explain(model, params, target,
                                                          target.variables, images, classes))
    if method == "l2r":
      return median_seconds(lambda: single(images), repeats)
    config = refine_lib.RefineConfig(steps=refine_steps)
    refined = jax.jit(lambda images: refine_lib.refine(target.apply_fn(), images, single(images),
                                                       classes, key, config)[0])
    return median_seconds(lambda: refined(images), repeats)
  return median_seconds(lambda: baselines.attribute(method, target, target.variables, images,
                                                    classes, key=key, options=options), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="vit_tiny_p4_28,efficientnet_lite0")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--rise_masks", type=int, default=4000)
  parser.add_argument("--refine_steps", type=int, default=10)
  args = parser.parse_args()
  print(f"{datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} x "
        f"{jax.local_device_count()} (one used), jax {jax.__version__}, batch {args.batch}")
  options = baselines.Options(rise_masks=args.rise_masks)
  rows = []
  for name in args.targets.split(","):
    target = targets.create(name, random_init=True)
    h, w = target.input_size
    images = jax.random.uniform(jax.random.key(0), (args.batch, h, w, 3))
    maps = jax.random.normal(jax.random.key(2), (args.batch, h, w))
    eval_s, bound_s = evaluation(target, images, maps, args.repeats)
    costs = {}
    for method in args.methods.split(","):
      if method == "rollout" and getattr(target.model, "patch_size", None) is None:
        continue
      costs[method] = attribution(target, images, method, options, args.repeats,
                                  args.refine_steps) / args.batch
    rows.append((name, eval_s, bound_s, costs))
    print(f"\n{name} ({h} x {w}): paper protocol {1e3 * eval_s:,.1f} ms per batch "
          f"({args.batch / eval_s:,.1f} images/s), bound {1e3 * bound_s:,.1f} ms, ratio "
          f"{bound_s / eval_s:.2f}", flush=True)
    for method, s in costs.items():
      print(f"  {method}: {1e3 * s:,.2f} ms / image", flush=True)

  print("\n| target | evaluation images/s | bound images/s | ratio |")
  print("| --- | --- | --- | --- |")
  for name, eval_s, bound_s, _ in rows:
    print(f"| {name} | {args.batch / eval_s:,.1f} | {args.batch / bound_s:,.1f} | "
          f"{bound_s / eval_s:.2f} |")
  methods = [m for m in args.methods.split(",") if any(m in r[3] for r in rows)]
  print("\n| target | " + " | ".join(f"{m} ms" for m in methods)
        + " | IG-50 / L2R | RISE / L2R |")
  print("| --- |" + " --- |" * (len(methods) + 2))
  for name, _, _, costs in rows:
    cells = [f"{1e3 * costs[m]:,.2f}" if m in costs else "-" for m in methods]
    l2r = costs.get("l2r")
    ratio = lambda m: f"{costs[m] / l2r:,.0f}x" if l2r and m in costs else "-"  # noqa: E731
    print(f"| {name} | " + " | ".join(cells) + f" | {ratio('integrated_gradients')} | "
          f"{ratio('rise')} |")


if __name__ == "__main__":
  main()
