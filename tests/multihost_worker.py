"""One process of the multi-host test (tests/test_multihost.py); not a test itself.

  python tests/multihost_worker.py --workdir W --out OUT.npz [--total_steps 3 --batch_size 8
      --eval_examples 13] [--coordinator_address localhost:PORT --num_processes 2 --process_id I]

Runs `train.train_and_evaluate` on the smoke config (configs/vit.py:smoke) in W, with a
checkpoint after every step of which only the last is kept (so it holds the final params), then
writes what the test compares across processes and against a single-process run to OUT.npz:

  params: f64[P], the final explainer params (every leaf, raveled, tree order), read from the
    replicated train state, i.e. this process's own copy;
  target: f64[T], the frozen target's variables this process trained with (process 0 pretrains
    it and the others receive it, so they must agree bit for bit);
  info: a JSON string {'eval', 'loss' (of the last step), 'step', 'process_index',
    'process_count', 'device_count', 'local_device_count', 'param_paths'}.

Without --coordinator_address it is the single-process reference (no jax.distributed). The
device count comes from the caller's XLA_FLAGS (--xla_force_host_platform_device_count).
"""
import argparse
import json
import os
import sys

# The repository root, for `configs` (pytest has it on its path; a subprocess does not).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _flat(tree) -> tuple:
  """(f64[N] of every leaf of `tree` raveled in tree order, [path of each leaf])."""
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for _, x in leaves])
  return flat, [jax.tree_util.keystr(path) for path, _ in leaves]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--total_steps", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=8)  # global
  parser.add_argument("--eval_examples", type=int, default=13)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args()

  import jax
  if args.coordinator_address:
    # Before anything touches a backend: the CPU client is built with the distributed client
    # (cross-process collectives over gloo, jax's CPU default).
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)
  import numpy as np

  from configs import vit
  from l2r_jax import train

  config = vit.get_config("smoke")
  config.total_steps = args.total_steps
  config.batch_size = args.batch_size
  config.eval.num_examples = args.eval_examples
  config.checkpoint_every = 1
  config.keep_checkpoints = 1
  result = train.train_and_evaluate(config, args.workdir)
  params, paths = _flat(result["state"].params)
  target, _ = _flat(result["target"].variables)
  info = {"eval": result["eval"], "loss": result["loss"], "step": int(result["state"].step),
          "process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "param_paths": paths}
  np.savez(args.out, params=params, target=target, info=np.array(json.dumps(info)))
  if args.coordinator_address:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
