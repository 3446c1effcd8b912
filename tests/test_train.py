"""The training step: schedules, frozen target, and 1-device vs 8-device equality."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2r_jax import explainer as ex
from l2r_jax import objectives
from l2r_jax import targets
from l2r_jax import train


def test_learning_rate_schedule_is_the_papers():
  lr = train.learning_rate_fn(3e-4, total_steps=1000)
  np.testing.assert_allclose(lr(0), 3e-4 / 25, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 3e-4, rtol=1e-6)  # 6% warm-up
  np.testing.assert_allclose(lr(1000), 3e-4 / 25 / 1e4, rtol=1e-4)
  assert lr(30) < lr(60) and lr(500) < lr(60)


def test_temperature_anneals_linearly():
  config = train.StepConfig(total_steps=11)
  np.testing.assert_allclose([train.temperature(s, config) for s in (0, 5, 10, 20)],
                             [1.0, 0.65, 0.3, 0.3], rtol=1e-6)


def _setup(batch=8, tx=None):
  target = targets.create("vit_tiny_p4_28", random_init=True)
  images = jax.random.uniform(jax.random.key(0), (batch, 28, 28, 3))
  labels = jnp.arange(batch, dtype=jnp.int32) % 10
  model = ex.Explainer(width=8)
  config = train.StepConfig(objective=objectives.ObjectiveConfig(num_fractions=6, num_iters=10),
                            references=("black", "mean"), total_steps=10)
  tx = tx or train.make_optimizer(train.learning_rate_fn(1e-3, 10))
  state = train.create_train_state(model, jax.random.key(1), target, target.variables, images[:2],
                                   labels[:2], tx)
  return target, {"image": images, "label": labels}, model, config, tx, state


def _run(mesh, steps=2, tx=None):
  target, batch, model, config, tx, state = _setup(tx=tx)
  step = train.make_train_step(mesh, grid=4, model=model, target=target, tx=tx, config=config)
  for _ in range(steps):
    state, metrics = step(state, target.variables, batch, jax.random.key(2))
  return target, state, metrics


# SGD is sensitive to the gradient's scale (a device-count factor shows at once), AdamW is the
# paper's optimizer.
# SGD runs by default (it catches a device-count factor); AdamW is in the slow set for time.
@pytest.mark.parametrize("tx", [pytest.param(None, id="adamw", marks=pytest.mark.slow),
                                pytest.param(optax.sgd(0.5), id="sgd")])
def test_one_and_eight_devices_give_the_same_params(tx):
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices, has {jax.device_count()}")
  _, one, m1 = _run(train.data_mesh(jax.devices()[:1]), tx=tx)
  _, eight, m8 = _run(train.data_mesh(jax.devices()[:8]), tx=tx)
  assert int(one.step) == int(eight.step) == 2
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_steps_change_the_decoder_and_never_the_target():
  target, state, metrics = _run(train.data_mesh(jax.devices()[:1]))
  _, _, _, _, _, initial = _setup()
  before = targets.create("vit_tiny_p4_28", random_init=True).variables
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(target.variables)):
    np.testing.assert_array_equal(a, b)
  changed = [float(jnp.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(state.params))]
  assert max(changed) > 0
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert 0.0 <= float(metrics["deletion_auc"]) <= 1.0


def test_logged_aucs_are_the_ones_the_loss_weighs():
  """loss = deletion_weight * deletion + (1 - insertion) + peak_weight * peak, in the logs too,
  when the second class weighs nothing (a plain mean over both classes would not add up)."""
  target, batch, model, _, tx, state = _setup()
  objective = objectives.ObjectiveConfig(num_fractions=6, num_iters=10, deletion_weight=2.0,
                                         second_class_weight=0.0)
  config = train.StepConfig(objective=objective, references=("black", "mean"), total_steps=10)
  step = train.make_train_step(train.data_mesh(jax.devices()[:1]), grid=4, model=model,
                               target=target, tx=tx, config=config)
  _, m = step(state, target.variables, batch, jax.random.key(2))
  want = 2.0 * m["deletion_auc"] + 1.0 - m["insertion_auc"] + 0.0025 * m["peak_penalty"]
  np.testing.assert_allclose(m["loss"], want, rtol=1e-6)


def test_bad_config():
  with pytest.raises(ValueError, match="references must be one of"):
    train.StepConfig(references=("grey",))


def test_loss_decreases_on_mnist():
  """A short run on real digits, fixed seed: the objective on held-out digits goes down, and so
  does the hard (pixel-level, paper protocol) deletion AUC, compared under fixed noise and tau."""
  from l2r_jax import data, metrics, target_training
  target = targets.create("vit_tiny_p4_28", random_init=True)
  variables, _ = target_training.train_classifier(
      target, data.create("mnist5k", split="train"), steps=100, batch_size=64, log=lambda _: None)
  target = dataclasses.replace(target, variables=variables)
  held = next(iter(data.make_batches(data.create("mnist5k", split="test"), batch_size=32,
                                     preprocess=target.preprocess)))
  held = {"image": jnp.asarray(held["image"]), "label": jnp.asarray(held["label"])}
  model = ex.Explainer(width=16)
  config = train.StepConfig(objective=objectives.ObjectiveConfig(num_fractions=8, num_iters=10),
                            references=("mean",), mean_color=(0.13,) * 3, tau_start=0.5,
                            tau_end=0.5, total_steps=30)
  tx = train.make_optimizer(2e-3)
  state = train.create_train_state(model, jax.random.key(0), target, target.variables,
                                   held["image"][:2], held["label"][:2], tx)
  keys = jax.random.split(jax.random.key(5), 32)
  evaluate = jax.jit(lambda params: train.loss_and_metrics(
      params, target.variables, held, keys, jnp.int32(0), jnp.float32(0.5), grid=4, model=model,
      target=target, config=config)[0])
  protocol = metrics.Protocol(mean_color=(0.13,) * 3)

  def hard_deletion(params):
    apply_fn = target.apply_fn()
    classes = jnp.argmax(apply_fn(held["image"]), -1).astype(jnp.int32)
    maps = ex.explain(model, params, target, target.variables, held["image"], classes)
    return float(metrics.deletion_insertion(apply_fn, held["image"], maps, protocol=protocol,
                                            classes=classes)["deletion"].mean())

  before, hard_before = float(evaluate(state.params)), hard_deletion(state.params)
  step = train.make_train_step(train.data_mesh(jax.devices()[:1]), grid=4, model=model,
                               target=target, tx=tx, config=config)
  batches = iter(data.make_batches(data.create("mnist5k", split="train"), batch_size=16,
                                   preprocess=target.preprocess, shuffle=True, num_epochs=None,
                                   drop_remainder=True))
  for _ in range(30):
    b = next(batches)
    state, _ = step(state, target.variables, {"image": b["image"], "label": b["label"]},
                    jax.random.key(3))
  after, hard_after = float(evaluate(state.params)), hard_deletion(state.params)
  print(f"loss {before:.4f} -> {after:.4f}, hard deletion {hard_before:.4f} -> {hard_after:.4f}")
  assert after < before - 0.05
  assert hard_after < hard_before - 0.02
