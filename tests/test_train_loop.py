"""End to end: train_and_evaluate on the smoke config, its outputs, and exact resumption."""
import json
import os
import shutil

import jax
import numpy as np

from configs import vit as vit_config
from l2r_jax import train


def _config(total_steps=4):
  config = vit_config.get_config("smoke")
  config.total_steps = total_steps
  return config


def test_smoke_run_writes_its_outputs_and_resumes_exactly(tmp_path):
  straight = str(tmp_path / "straight")
  result = train.train_and_evaluate(_config(), straight)
  for name in ("config.json", "metrics.jsonl", "explainer.msgpack", "target.msgpack",
               "checkpoints"):
    assert os.path.exists(os.path.join(straight, name)), name
  rows = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)

  # Interrupted after step 2, then the same command again: the same params as the straight run.
  resumed = str(tmp_path / "resumed")
  os.makedirs(resumed)
  shutil.copy(os.path.join(straight, "target.msgpack"), resumed)  # the same frozen target
  train.train_and_evaluate(_config(), resumed, stop_at=2)
  again = train.train_and_evaluate(_config(), resumed)
  for a, b in zip(jax.tree.leaves(result["state"].params), jax.tree.leaves(again["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(again["state"].step) == 4
