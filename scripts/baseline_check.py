"""The baselines alone on a config's held-out images, beside issue 9's independent reference
numbers (captum 0.9.0 / pytorch-grad-cam 1.5.7 / a RISE implementation, measured on OTHER images
of the same target and class range): our mean +- standard error, theirs, and z = the gap over the
two standard errors combined. |z| of a few or less: the same method and metric.

  python scripts/baseline_check.py --config configs/efficientnet.py \
      --config.data.root=../shared/data/imagenet_samples --reference imagenet --num_examples 160
  python scripts/baseline_check.py --config configs/resnet.py:cifar10 \
      --config.target.weights=../shared/weights/uva_cifar10_resnet.msgpack \
      --config.data.root=../shared/data/cifar10_test_8k.npz --reference cifar10 --rise_grid 4

Protocols: the paper's (pixels, 21 points, softmax of the predicted class) with the config's mean
colour ('mean') and with black ('black'). Integrated gradients is computed once per image and
reduced both ways (abs summed over channels, signed sum; the signed row's seconds are only the
reduction). RISE runs on the first --rise_examples
images only (the reference's ImageNet RISE row has n = 50). Writes --out (JSON) and prints the
table.
"""
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :variant",
                                lock_config=True)
flags.DEFINE_enum("reference", None, ["imagenet", "cifar10"], "the reference table to compare")
flags.DEFINE_integer("num_examples", 160, "held-out images (a fixed sample of the eval split)")
flags.DEFINE_integer("batch_size", 8, "images per batch")
flags.DEFINE_integer("rise_examples", 50, "images RISE runs on (the first ones)")
flags.DEFINE_integer("rise_masks", 2000, "RISE masks (the reference's 2000)")
flags.DEFINE_integer("rise_grid", 7, "RISE grid (the reference's 7 for ImageNet, 4 for CIFAR)")
flags.DEFINE_list("methods", ["random", "gradient", "integrated_gradients",
                              "integrated_gradients_signed", "gradcam", "rise"], "methods")
flags.DEFINE_string("out", "", "JSON file for the results ('' : none)")
flags.mark_flags_as_required(["config", "reference"])
FLAGS = flags.FLAGS

# Issue 9's tables: (mean, s.e.) of deletion / insertion AUC, mean reference then black.
REFERENCE = {
    "imagenet": {
        "random": ((0.201, 0.012), (0.203, 0.012), (0.101, 0.008), (0.100, 0.008)),
        "gradient": ((0.170, 0.011), (0.275, 0.015), (0.120, 0.010), (0.181, 0.012)),
        "integrated_gradients": ((0.205, 0.013), (0.330, 0.016), (0.094, 0.009),
                                 (0.308, 0.016)),
        "integrated_gradients_signed": ((0.181, 0.011), (0.167, 0.011), (0.057, 0.005),
                                        (0.109, 0.009)),
        "gradcam": ((0.157, 0.009), (0.503, 0.017), (0.122, 0.008), (0.464, 0.016)),
        "rise": ((0.140, 0.020), (0.489, 0.037), (0.103, 0.015), (0.449, 0.035)),
    },
    "cifar10": {
        "random": ((0.280, 0.010), (0.283, 0.010), (0.199, 0.009), (0.202, 0.010)),
        "gradient": ((0.307, 0.010), (0.382, 0.009), (0.230, 0.009), (0.238, 0.009)),
        "integrated_gradients": ((0.341, 0.010), (0.396, 0.011), (0.212, 0.008),
                                 (0.311, 0.010)),
        "integrated_gradients_signed": ((0.273, 0.011), (0.249, 0.011), (0.189, 0.010),
                                        (0.215, 0.011)),
        "gradcam": ((0.275, 0.009), (0.593, 0.012), (0.231, 0.009), (0.539, 0.012)),
        "rise": ((0.271, 0.010), (0.633, 0.010), (0.208, 0.009), (0.596, 0.010)),
    },
}
COLUMNS = (("mean", "deletion"), ("mean", "insertion"), ("black", "deletion"),
           ("black", "insertion"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import dataclasses
  import tempfile

  import jax
  import jax.numpy as jnp

  from l2r_jax import baselines, data, evaluate, metrics, train
  from l2r_jax.data import sources

  config = FLAGS.config
  for m in FLAGS.methods:
    if m not in REFERENCE[FLAGS.reference]:
      raise app.UsageError(f"--methods: no reference row for {m!r}; one of "
                           f"{', '.join(REFERENCE[FLAGS.reference])}")
  target = train.build_target(config, tempfile.mkdtemp())
  apply_fn = jax.jit(target.apply_fn())
  paper = train.heldout_protocol(config)
  protocols = {"mean": dataclasses.replace(paper, reference="mean"),
               "black": dataclasses.replace(paper, reference="black")}
  options = baselines.Options(rise_masks=FLAGS.rise_masks, rise_grid=FLAGS.rise_grid,
                              batch_size=64)
  source = sources.subsample(train.source(config, config.data.eval_split), FLAGS.num_examples)
  batches = data.make_batches(source, batch_size=FLAGS.batch_size,
                              preprocess=train.preprocessing(config, target), num_epochs=1,
                              drop_remainder=False)
  scorers = {name: jax.jit(lambda images, maps, classes, p=p: metrics.deletion_insertion(
      apply_fn, images, maps, protocol=p, classes=classes)) for name, p in protocols.items()}
  predict = jax.jit(lambda images: jnp.argmax(apply_fn(images), -1).astype(jnp.int32))
  ig = jax.jit(lambda images, classes: baselines.integrated_gradients(
      target, target.variables, images, classes, options))
  scores = metrics.Accumulator()
  seconds = dict.fromkeys(FLAGS.methods, 0.0)
  seen = 0
  key = jax.random.key(config.seed + 3)
  for i, batch in enumerate(batches):
    images, mask = jnp.asarray(batch["image"]), jnp.asarray(batch["mask"])
    classes = predict(images)
    rise_mask = mask & (seen + jnp.arange(mask.shape[0]) < FLAGS.rise_examples)
    seen += mask.shape[0]
    per_channel = None
    for method in FLAGS.methods:
      if method == "rise" and not bool(jnp.any(rise_mask)):
        continue
      t = time.perf_counter()
      if method.startswith("integrated_gradients"):
        if per_channel is None:
          per_channel = ig(images, classes)
        maps = jnp.sum(jnp.abs(per_channel) if method == "integrated_gradients" else per_channel,
                       axis=-1)
      else:
        maps = baselines.attribute(method, target, target.variables, images, classes,
                                   key=evaluate.method_key(key, method,
                                                           jnp.asarray(batch["index"])),
                                   options=options)
      maps = jax.block_until_ready(maps)
      seconds[method] += time.perf_counter() - t
      for name, scorer in scorers.items():
        out = scorer(images, maps, classes)
        for k in ("deletion", "insertion"):
          scores.add(f"{method}/{name}/{k}", out[k], rise_mask if method == "rise" else mask)
    print(f"batch {i + 1}/{len(batches)}", flush=True)

  rows, lines = {}, [
      f"{config.target.name} on {config.data.source} split {config.data.eval_split!r}: ours "
      f"(n) vs issue 9's reference, z = gap / combined s.e.", "",
      "| method | " + " | ".join(f"{k}, {r} ref: ours / theirs (z)" for r, k in COLUMNS) + " |",
      "| --- |" + " --- |" * len(COLUMNS)]
  for method in FLAGS.methods:
    cells, rows[method] = [], {}
    for (ref, k), (their_mean, their_se) in zip(COLUMNS, REFERENCE[FLAGS.reference][method]):
      s = scores.stats(f"{method}/{ref}/{k}")
      z = (s["mean"] - their_mean) / math.hypot(s["se"], their_se)
      rows[method][f"{ref}/{k}"] = dict(s, reference=[their_mean, their_se], z=z)
      cells.append(f"{s['mean']:.3f} +- {s['se']:.3f} (n {s['n']}) / {their_mean:.3f} +- "
                   f"{their_se:.3f} ({z:+.1f})")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("seconds per image (first batch's compilation included): " + ", ".join(
      f"{m} {seconds[m] / max(min(seen, FLAGS.rise_examples) if m == 'rise' else seen, 1):.3f}"
      for m in FLAGS.methods))
  print("\n".join(lines))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"config": config.to_dict(), "reference": FLAGS.reference, "rows": rows,
                 "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                 "jax": jax.__version__}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
