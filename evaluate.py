"""Evaluates a trained explainer beside the baselines: python evaluate.py --workdir /tmp/l2r_vit

Thin CLI over `l2r_jax.evaluate.evaluate`: reads the run's config.json and latest checkpoint
from --workdir, writes results.json, results.md, curves.png and examples.png there, and prints
the tables. Choose what runs with --methods and --protocols; the run's protocol fields (mean
colour, blur, reference) can be overridden with --set, e.g. --set eval.reference=black. A long
evaluation runs in parts: --chunk 0:40, --chunk 40:80, ... of one --num_examples draw, each with
its own --output_dir, then scripts/merge_evaluations.py gives the whole table.
"""
import ast

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("workdir", None, "a training workdir (train.py --workdir)")
flags.DEFINE_list("methods", None, "methods to compare (default: all that apply)")
flags.DEFINE_list("protocols", None, "protocols (default: paper, paper_label, black, blur, "
                  "noise, chefer; also patch, rise)")
flags.DEFINE_integer("num_examples", None, "held-out images (default: config.eval.num_examples)")
flags.DEFINE_string("chunk", None, "START:STOP: only the images START..STOP-1 of the "
                    "--num_examples draw (an evaluation in parts; merge the parts' per_image.npz "
                    "with scripts/merge_evaluations.py)")
flags.DEFINE_string("output_dir", None, "where the results go (default: --workdir)")
flags.DEFINE_integer("batch_size", None, "global batch (default: the run's)")
flags.DEFINE_integer("refine_steps", 10, "test-time refinement steps of 'l2r_refined'")
flags.DEFINE_float("refine_learning_rate", None, "its Adam learning rate (default: the run's "
                   "config.eval.refine_learning_rate)")
flags.DEFINE_float("refine_deletion_weight", None, "the weight of the deletion AUC in its loss, "
                   "insertion's being 1 (default: the run's config.eval.refine_deletion_weight, "
                   "1 as in the paper's loss)")
flags.DEFINE_multi_string("refine_set", [], "set a refinement setting of 'l2r_refined': "
                          "--refine_set field=value, a field of refine.RefineConfig (tau=0.1, "
                          "grids=(7,14), objective.num_iters=50, ...)")
flags.DEFINE_integer("ig_steps", 50, "Integrated Gradients steps")
flags.DEFINE_integer("rise_masks", 4000, "RISE masks")
flags.DEFINE_integer("rise_grid", 7, "RISE grid side (7 at 224 px; 4 for CIFAR's 32 px)")
flags.DEFINE_multi_string("set", [], "override a config field of the run: --set key=value")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _assignments(items, flag):
  """{key: value} of --flag key=value items, values read as Python literals where they are."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--{flag} takes key=value, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from l2r_jax import baselines
  from l2r_jax import evaluate
  overrides, refine_overrides = _assignments(FLAGS.set, "set"), _assignments(FLAGS.refine_set,
                                                                            "refine_set")
  chunk = None
  if FLAGS.chunk is not None:
    start, sep, stop = FLAGS.chunk.partition(":")
    try:
      chunk = (int(start), int(stop))
    except ValueError:
      sep = ""
    if not sep:
      raise app.UsageError(f"--chunk takes START:STOP (two integers), got {FLAGS.chunk!r}")
  evaluate.evaluate(
      FLAGS.workdir, methods=FLAGS.methods or evaluate.DEFAULT_METHODS,
      protocol_names=FLAGS.protocols or evaluate.DEFAULT_PROTOCOLS,
      num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
      refine_steps=FLAGS.refine_steps, refine_learning_rate=FLAGS.refine_learning_rate,
      refine_deletion_weight=FLAGS.refine_deletion_weight, refine_overrides=refine_overrides,
      baseline_options=baselines.Options(ig_steps=FLAGS.ig_steps, rise_masks=FLAGS.rise_masks,
                                         rise_grid=FLAGS.rise_grid),
      chunk=chunk, output_dir=FLAGS.output_dir, overrides=overrides)


if __name__ == "__main__":
  app.run(main)
