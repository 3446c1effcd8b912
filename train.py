"""Trains an explainer: python train.py --config configs/vit.py --workdir /tmp/l2r_vit

Thin CLI over `l2r_jax.train.train_and_evaluate`; rerunning the same command resumes from the
latest checkpoint in --workdir. Config fields can be overridden: --config.total_steps=100.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from l2r_jax import train

config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :variant",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the exported explainer go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
