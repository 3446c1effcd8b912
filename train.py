"""Trains an explainer: python train.py --config configs/vit.py --workdir /tmp/l2r_vit

Thin CLI over `l2r_jax.train.train_and_evaluate`; rerunning the same command resumes from the
latest checkpoint in --workdir. Config fields can be overridden: --config.total_steps=100.

Several hosts (a TPU pod slice, a SLURM or Open MPI job): run the same command on every host
with --distributed (jax.distributed.initialize() finds the cluster), or give the coordinator
yourself: --coordinator_address=host0:1234 --num_processes=2 --process_id=<0 or 1>.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :variant",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, logs and the exported explainer go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (several hosts)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from l2r_jax import train
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except KeyboardInterrupt:
    sys.exit(130)  # the loop has saved the finished steps and said how to resume


if __name__ == "__main__":
  app.run(main)
