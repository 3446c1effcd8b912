"""Two processes on localhost train and evaluate as one: the multi-host path of
`train.train_and_evaluate` against a single-process run of the same config.

Each process of `multihost_worker.py` has 2 CPU devices (4 global devices, cross-process
collectives over gloo), feeds its own half of every global batch, and writes its final params
and held-out results. What can go wrong only with several processes: each process reading the
same slice (or the wrong one) of a batch, the padded last evaluation batch counted twice or on one
process only, processes ending with different params or a different frozen target, and files
written by every process. So the test asserts: identical params, target and evaluation on both
processes; `n` equal to the examples asked for (an odd number, so the last batch is padded); the
checkpoint both saved together holding the final params; and per-step losses, params and
held-out numbers equal to those of one process with 4 devices, the reference (to rtol 1e-4:
summation orders differ, and the pretrained target in its last bits).
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TOTAL_STEPS = 3
BATCH_SIZE = 8  # global: 4 examples per process, 1 per device
EVAL_EXAMPLES = 13  # batches of 8 and of 5 + 3 padding (4 + 1 real examples per process)
TIMEOUT_S = 600  # a hang (e.g. a collective one process never joins) fails instead of blocking


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]


def _run_all(runs: dict[str, tuple[list[str], int, str]], logdir: str) -> None:
  """Starts every run {name: (worker arguments, CPU devices, more XLA_FLAGS)} at once and waits
  for all; fails with each one's stderr tail when one exits non-zero (the others are killed: they
  would wait for it in a collective) or when TIMEOUT_S passes."""
  procs = {}
  for name, (args, devices, xla_flags) in runs.items():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}")
    with open(os.path.join(logdir, f"{name}.out"), "w") as out, \
        open(os.path.join(logdir, f"{name}.err"), "w") as err:
      procs[name] = subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=out,
                                     stderr=err, cwd=os.path.dirname(WORKER))
  deadline = time.monotonic() + TIMEOUT_S
  failed = None
  try:
    while any(p.poll() is None for p in procs.values()):
      failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = {n: p.returncode for n, p in procs.items()}
  if failed or any(c != 0 for c in codes.values()):
    why = f"{failed} failed first" if failed else f"timed out after {TIMEOUT_S} s"
    tails = "\n".join(f"--- {n} (exit {codes[n]}) stderr:\n"
                      f"{_tail(os.path.join(logdir, n + '.err'))}" for n in procs)
    pytest.fail(f"worker processes did not all exit 0 ({why}): {codes}\n{tails}")


def _load(path: str) -> dict:
  with np.load(path) as f:
    return {"params": f["params"], "target": f["target"], **json.loads(str(f["info"]))}


STEP_METRICS = ("loss", "deletion_auc", "insertion_auc", "peak_penalty", "grad_norm", "tau")


def _step_metrics(workdir: str) -> np.ndarray:
  """f64[TOTAL_STEPS, len(STEP_METRICS)] from workdir/metrics.jsonl, checking each training step
  is logged exactly once (process 0 alone writes the file)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  steps = [r["step"] for r in rows]
  assert steps == list(range(1, TOTAL_STEPS + 1)), (
      f"{workdir}/metrics.jsonl has the train steps {steps}: expected 1..{TOTAL_STEPS} once each")
  return np.array([[r[k] for k in STEP_METRICS] for r in rows])


def _eval_numbers(e: dict) -> tuple[np.ndarray, np.ndarray]:
  """(f64[4] means, f64[4] standard errors) of deletion and insertion, explainer then random."""
  rows = [e[m] for m in ("explainer", "random")]
  return (np.array([r[k] for r in rows for k in ("deletion", "insertion")]),
          np.array([r[k] for r in rows for k in ("deletion_se", "insertion_se")]))


def _checkpoint_params(workdir: str, step: int) -> np.ndarray:
  """f64[P]: the params of the checkpoint of `step` (the only one kept), restored onto this
  process's first device (the saved 4-device sharding is not this process's topology)."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    assert manager.all_steps() == [step], f"{workdir}: checkpoints {manager.all_steps()}"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            manager.item_metadata(step))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  assert int(restored["step"]) == step
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree.leaves(restored["params"])])


@pytest.mark.slow  # ~160 CPU seconds: three runs of the smoke config, each compiling its steps
def test_two_processes_train_and_evaluate_like_one(tmp_path):
  import jax
  from flax import serialization

  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  assert EVAL_EXAMPLES % BATCH_SIZE, "the evaluation must end with a padded batch"
  common = ["--total_steps", str(TOTAL_STEPS), "--batch_size", str(BATCH_SIZE),
            "--eval_examples", str(EVAL_EXAMPLES)]
  coordinator = f"localhost:{_free_port()}"
  # One shared workdir for both processes, as orbax needs for multi-host checkpoints.
  # Process 1 stands for a host whose XLA rounds differently (single-threaded Eigen: the target's
  # pretraining then ends ~3e-4 away): a target trained on each process would differ, and
  # device_put of the replicated target fails.
  runs = {f"process{i}": (["--workdir", multi, "--out", str(tmp_path / f"process{i}.npz"),
                           "--coordinator_address", coordinator, "--num_processes", "2",
                           "--process_id", str(i), *common], 2,
                          "--xla_cpu_multi_thread_eigen=false" if i else "") for i in range(2)}
  runs["single"] = (["--workdir", single, "--out", str(tmp_path / "single.npz"), *common], 4, "")
  _run_all(runs, str(tmp_path))
  p0, p1, ref = (_load(str(tmp_path / f"{n}.npz")) for n in ("process0", "process1", "single"))

  for i, p in enumerate((p0, p1)):
    assert (p["process_index"], p["process_count"], p["device_count"],
            p["local_device_count"]) == (i, 2, 4, 2), p
    assert p["step"] == TOTAL_STEPS
  assert (ref["process_count"], ref["device_count"]) == (1, 4)

  # The same frozen target (process 0's, broadcast), params and evaluation on both processes.
  np.testing.assert_array_equal(p0["target"], p1["target"])
  assert p0["param_paths"] == p1["param_paths"] == ref["param_paths"]
  np.testing.assert_allclose(p1["params"], p0["params"], rtol=1e-6, atol=1e-7)
  assert p0["eval"] == p1["eval"]
  assert p0["loss"] == p1["loss"]

  # Every held-out example counted once over both processes, padding never.
  assert p0["eval"]["n"] == ref["eval"]["n"] == EVAL_EXAMPLES

  # The single files: written once, by process 0, with the values both processes hold.
  with open(os.path.join(multi, "explainer.msgpack"), "rb") as f:
    exported = serialization.msgpack_restore(f.read())
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(exported)]),
      p0["params"])
  with open(os.path.join(multi, "eval.json")) as f:
    assert json.load(f) == p0["eval"]
  # The checkpoint both processes saved together (orbax, one shared workdir) restores to them.
  np.testing.assert_array_equal(_checkpoint_params(multi, TOTAL_STEPS), p0["params"])

  # Against one process with the same 4 devices: each process must have fed its own half of
  # every global batch (another split changes the step losses at once), and the per-process
  # masks must add up to the same held-out sums. The targets agree to ~4e-4 only: XLA's CPU
  # results depend on the process's device count, so the pretraining differs in the last bits.
  np.testing.assert_allclose(p0["target"], ref["target"], atol=2e-3)
  np.testing.assert_allclose(_step_metrics(multi), _step_metrics(single), rtol=1e-4,
                             err_msg=f"{STEP_METRICS} of each step, 2 processes vs 1")
  np.testing.assert_allclose(p0["loss"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(p0["params"], ref["params"], rtol=1e-4, atol=1e-6,
                             err_msg="final params, 2 processes vs 1")
  (means, ses), (ref_means, ref_ses) = _eval_numbers(p0["eval"]), _eval_numbers(ref["eval"])
  np.testing.assert_allclose(means, ref_means, rtol=1e-5, err_msg="held-out means, 2 vs 1")
  # The standard errors come from float32 sums of squares (E[x^2] - mean^2 cancels ~3 digits).
  np.testing.assert_allclose(ses, ref_ses, rtol=1e-3, err_msg="held-out standard errors, 2 vs 1")
