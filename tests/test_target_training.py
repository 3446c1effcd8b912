"""Tests of target_training: the classifier loop lowers the loss and keeps the variables' tree, the
cache round-trips and refuses damaged files, and (slow) the default run reaches its accuracy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r_jax import data, targets
from l2r_jax import target_training as tt


@pytest.fixture(scope="module")
def target():
  return targets.create("vit_tiny_p4_28", random_init=True)


@pytest.fixture(scope="module")
def tiny():
  src = data.create("mnist5k", split="train")
  return data.ArraySource(src.images[:64], src.labels[:64], num_classes=10, name="mnist5k/tiny")


def _same_tree(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype == jnp.float32


def test_random_shift_translates_with_black_border():
  x = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5, 1) + 1
  y = np.asarray(tt.random_shift(x, jax.random.key(0), 2))
  for i in range(2):
    # Some integer offset reproduces the image exactly, the rest of it being 0.
    found = False
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        ref = np.zeros((5, 5))
        src = np.asarray(x[i, ..., 0])
        for r in range(5):
          for c in range(5):
            if 0 <= r + dy < 5 and 0 <= c + dx < 5:
              ref[r, c] = src[r + dy, c + dx]
        found |= np.array_equal(ref, y[i, ..., 0])
    assert found
  assert np.array_equal(np.asarray(tt.random_shift(x, jax.random.key(0), 0)), np.asarray(x))


def test_few_steps_lower_the_loss_and_keep_the_tree(target, tiny):
  def loss_of(variables):
    batch = next(iter(data.make_batches(tiny, batch_size=64, preprocess=target.preprocess,
                                        process_index=0, process_count=1)))
    return float(tt.classification_loss(variables["params"], {}, target, batch["image"],
                                        batch["label"])[0])

  variables, metrics = tt.train_classifier(target, tiny, steps=30, batch_size=32,
                                           learning_rate=2e-3, seed=0, max_shift=0,
                                           log_every=0, eval_source=tiny, log=lambda s: None)
  _same_tree(variables, target.variables)
  before, after = loss_of(target.variables), loss_of(variables)
  assert after < 0.5 * before, (before, after)
  assert metrics["train_loss"] < before
  assert metrics["test_accuracy"] > 0.5 and metrics["steps_per_second"] > 0


def test_load_or_train_caches_then_loads(target, tiny, tmp_path, monkeypatch):
  path = str(tmp_path / "sub" / "target.msgpack")
  lines = []
  kw = dict(source_train=tiny, source_test=None, steps=3, batch_size=32, learning_rate=1e-3,
            seed=0, log=lines.append)
  first = tt.load_or_train(target, path, **kw)
  assert any("training the target" in s and path in s for s in lines)
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["target.msgpack"]  # no temp
  assert not np.allclose(first.variables["params"]["head"]["kernel"],
                         target.variables["params"]["head"]["kernel"])

  def no_training(*args, **kwargs):
    raise AssertionError("trained although the cache exists")

  monkeypatch.setattr(tt, "train_classifier", no_training)
  lines.clear()
  second = tt.load_or_train(target, path, **kw)
  assert any("loaded the cached target" in s and path in s for s in lines)
  _same_tree(second.variables, first.variables)
  for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(second.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The cache is also a weights file of the ViT factory.
  reloaded = targets.create("vit_tiny_p4_28", weights=path)
  for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(reloaded.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damaged_or_mismatched_cache_is_a_value_error(target, tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(tt, "train_classifier", lambda *a, **k: pytest.fail("trained"))
  kw = dict(source_train=tiny, steps=3, batch_size=32, learning_rate=1e-3, seed=0,
            log=lambda s: None)
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(b"\xc1 not msgpack at all")
  with pytest.raises(ValueError, match="corrupt.msgpack"):
    tt.load_or_train(target, str(corrupt), **kw)
  other = targets.create("vit_tiny_p4_32", random_init=True)  # another width and grid
  mismatched = str(tmp_path / "mismatched.msgpack")
  tt.save_variables(other.variables, mismatched)
  with pytest.raises(ValueError, match="mismatched.msgpack"):
    tt.load_or_train(target, mismatched, **kw)


@pytest.mark.slow
def test_default_run_reaches_its_test_accuracy(target):
  _, metrics = tt.train_classifier(target, data.create("mnist5k", split="train"),
                                   eval_source=data.create("mnist5k", split="test"))
  print(metrics)
  assert metrics["test_accuracy"] >= 0.95, metrics
