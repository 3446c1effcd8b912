"""End to end: train_and_evaluate on the smoke config, its outputs, and exact resumption."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import vit as vit_config
from l2r_jax import train


def _tensorboard_scalars(folder):
  """{tag: [(step, value)]} read from the event files with a reader of our own: TFRecord framing
  (u64 length, u32 crc, payload, u32 crc) around tensorboard Event protos."""
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _config(total_steps=4):
  config = vit_config.get_config("smoke")
  config.total_steps = total_steps
  return config


@pytest.fixture(scope="module")
def smoke_target(tmp_path_factory):
  """The smoke config's pretrained target file, trained once for the tests of this module."""
  workdir = str(tmp_path_factory.mktemp("target"))
  train.build_target(_config(), workdir, log=lambda _: None)
  return os.path.join(workdir, "target.msgpack")


def _workdir(tmp_path, smoke_target, name="run"):
  workdir = tmp_path / name
  workdir.mkdir()
  shutil.copy(smoke_target, workdir)
  return str(workdir)


def test_smoke_run_writes_its_outputs_and_resumes_exactly(tmp_path, smoke_target):
  straight = _workdir(tmp_path, smoke_target, "straight")
  result = train.train_and_evaluate(_config(), straight)
  for name in ("config.json", "metrics.jsonl", "explainer.msgpack", "target.msgpack",
               "checkpoints", "eval.json", "tensorboard"):
    assert os.path.exists(os.path.join(straight, name)), name
  rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
  evaluation = json.load(open(os.path.join(straight, "eval.json")))
  assert evaluation == result["eval"] | {"protocol": evaluation["protocol"]}
  assert evaluation["n"] == 16
  for method in ("explainer", "random"):
    for k in ("deletion", "insertion"):
      assert 0.0 <= evaluation[method][k] <= 1.0
      assert 0.0 < evaluation[method][f"{k}_se"] < 0.5
  scalars = _tensorboard_scalars(os.path.join(straight, "tensorboard"))
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["loss"] for r in rows if r["split"] == "train"], rtol=1e-6)
  np.testing.assert_allclose(scalars["eval/explainer_deletion"][0][1],
                             evaluation["explainer"]["deletion"], rtol=1e-6)

  # Interrupted after step 2, then the same command again: the same params as the straight run.
  resumed = _workdir(tmp_path, smoke_target, "resumed")
  train.train_and_evaluate(_config(), resumed, stop_at=2)
  again = train.train_and_evaluate(_config(), resumed)
  for a, b in zip(jax.tree.leaves(result["state"].params), jax.tree.leaves(again["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(again["state"].step) == 4

  # Fine-tuning from the straight run (config.init_from): with a zero learning rate the steps
  # keep the loaded params exactly, so the run started from them, not from a fresh decoder.
  config = _config()
  config.init_from = straight
  config.learning_rate = 0.0
  tuned = train.train_and_evaluate(config, _workdir(tmp_path, smoke_target, "tuned"), stop_at=1)
  for a, b in zip(jax.tree.leaves(result["state"].params), jax.tree.leaves(tuned["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_checks_the_file_and_its_shapes(tmp_path):
  from flax import serialization

  template = {"params": {"out": {"kernel": np.zeros((3, 3, 4, 1), np.float32),
                                 "bias": np.zeros((1,), np.float32)}}}
  with pytest.raises(ValueError, match=r"--config.init_from"):
    train.load_explainer_params(str(tmp_path), template)  # a folder without explainer.msgpack
  saved = {"params": {"out": {"kernel": np.full((3, 3, 4, 1), 0.5, np.float32),
                              "bias": np.ones((1,), np.float32)}}}
  (tmp_path / "explainer.msgpack").write_bytes(serialization.to_bytes(saved))
  loaded = train.load_explainer_params(str(tmp_path), template)
  np.testing.assert_array_equal(loaded["params"]["out"]["kernel"], 0.5)
  wider = {"params": {"out": {"kernel": np.zeros((3, 3, 8, 1), np.float32),
                              "bias": np.zeros((1,), np.float32)}}}
  with pytest.raises(ValueError, match=r"does not fit this config's .*\(3, 3, 8, 1\)"):
    train.load_explainer_params(str(tmp_path / "explainer.msgpack"), wider)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                          smoke_target):
  import orbax.checkpoint as ocp

  workdir = _workdir(tmp_path, smoke_target)
  config = _config(total_steps=6)
  config.checkpoint_every = 1
  train.train_and_evaluate(config, workdir, stop_at=2)
  config.learning_rate = float("nan")  # every update from here on is NaN
  with pytest.raises(FloatingPointError, match=r"diverged at step 3 .*last good checkpoint "
                     r"\(step 2\)"):
    train.train_and_evaluate(config, workdir)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    assert manager.all_steps() == [1, 2]
    restored = manager.restore(2, args=ocp.args.StandardRestore())
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def _steps_with(monkeypatch, wrap):
  """make_train_step returning wrap(real_step, call_number) for every step function."""
  real = train.make_train_step
  calls = []

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def wrapped(*a, **k):
      calls.append(1)
      return wrap(step, len(calls), *a, **k)
    return wrapped
  monkeypatch.setattr(train, "make_train_step", make)


def test_ctrl_c_keeps_every_finished_step_and_the_rerun_resumes(tmp_path, smoke_target,
                                                                 monkeypatch, capsys):
  import signal

  import orbax.checkpoint as ocp

  workdir = _workdir(tmp_path, smoke_target)
  config = _config(total_steps=5)
  config.checkpoint_every = 100  # no periodic checkpoint before the interruption

  def interrupt_third(step, n, *args):
    out = step(*args)
    if n == 3:
      signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, during step 3
    return out
  _steps_with(monkeypatch, interrupt_third)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert "interrupted after step 2; the checkpoint of step 2" in capsys.readouterr().out
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    assert manager.latest_step() == 2
  monkeypatch.undo()
  again = train.train_and_evaluate(config, workdir)
  assert "resumed from the checkpoint of step 2" in capsys.readouterr().out
  assert int(again["state"].step) == 5 and again["eval"]["n"] == 16
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    assert manager.latest_step() == 5  # the last step is kept, off config.checkpoint_every


def test_out_of_memory_says_which_flag_to_lower_and_keeps_the_checkpoints(tmp_path, smoke_target,
                                                                          monkeypatch):
  import orbax.checkpoint as ocp

  workdir = _workdir(tmp_path, smoke_target)
  config = _config(total_steps=4)
  config.checkpoint_every = 1
  train.train_and_evaluate(config, workdir, stop_at=2)

  def out_of_memory(step, n, *args):
    # What XLA raises on an accelerator (the CPU has no such limit to hit in a test).
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.31GiB.\nBufferAssignment")
  _steps_with(monkeypatch, out_of_memory)
  with pytest.raises(MemoryError, match=r"allocate 25.31GiB.*--config.batch_size=4; it must stay "
                     r"a multiple of the 8 devices"):
    train.train_and_evaluate(config, workdir)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    assert manager.all_steps() == [1, 2]


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def _shared(*parts):

  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"no {path} (../shared is the developers' data)")
  return os.path.abspath(path)


@pytest.mark.parametrize("class_evidence", [False, True])
def test_cifar_resnet_smoke_run_with_real_weights(tmp_path, class_evidence):
  from configs import resnet
  from l2r_jax import evaluate
  config = resnet.get_config("cifar10_smoke")
  config.target.weights = _shared("weights", "uva_cifar10_resnet.msgpack")
  config.data.root = _shared("data", "cifar10_test_8k.npz")
  config.explainer.class_evidence = class_evidence
  result = train.train_and_evaluate(config, str(tmp_path))
  assert int(result["state"].step) == config.total_steps
  assert result["eval"]["n"] == 16
  assert not os.path.exists(os.path.join(tmp_path, "target.msgpack"))  # nothing trained
  # evaluate.py rebuilds the same explainer from the workdir's config.json and restores its params.
  _, _, model, params, _ = evaluate.load_run(str(tmp_path))
  assert model.class_evidence == class_evidence
  assert ("evidence_scale" in params["params"]) == class_evidence
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_efficientnet_needs_a_data_root(tmp_path):

  from configs import efficientnet
  with pytest.raises(ValueError, match="config.data.root"):
    train.train_and_evaluate(efficientnet.get_config("smoke"), str(tmp_path))


@pytest.mark.slow
def test_efficientnet_smoke_run_on_imagenet_samples(tmp_path):
  from configs import efficientnet
  config = efficientnet.get_config("smoke")
  config.data.root = _shared("data", "imagenet_samples")
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval"]["n"] == 16 and np.isfinite(result["loss"])
