"""Test-time refinement: off at 0 steps, lowers the objective and the hard deletion AUC on an
analytic target whose evidence is known, and checks its inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r_jax import metrics, objectives, refine

H = W = 16


def quadrant_target(images):
  """Class 0's logit grows with the brightness of the top-left 8 x 8 quadrant; class 1 is flat."""
  evidence = jnp.mean(images[:, :8, :8, :], axis=(1, 2, 3))
  return jnp.stack([12.0 * evidence - 4.0, jnp.zeros_like(evidence)], axis=-1)


def _setup():
  images = jax.random.uniform(jax.random.key(0), (2, H, W, 3), minval=0.6, maxval=1.0)
  maps = jax.random.normal(jax.random.key(1), (2, H, W))  # a bad start: random ranking
  classes = jnp.zeros((2,), jnp.int32)
  return images, maps, classes


CONFIG = refine.RefineConfig(steps=30, learning_rate=0.2, num_samples=2, grids=(4, 8),
                             references=("black",), blur_size=5, blur_sigma=2.0,
                             objective=objectives.ObjectiveConfig(num_fractions=8, num_iters=10,
                                                                  normalize_scores=True,
                                                                  peak_window=5))


def test_zero_steps_is_the_single_pass_map():
  images, maps, classes = _setup()
  out, losses = refine.refine(quadrant_target, images, maps, classes, jax.random.key(2),
                              refine.RefineConfig(steps=0))
  np.testing.assert_array_equal(out, maps)
  assert losses.shape == (0, 2)


def test_refinement_finds_the_evidence():
  images, maps, classes = _setup()
  out, losses = jax.jit(lambda i, m, c, k: refine.refine(quadrant_target, i, m, c, k, CONFIG))(
      images, maps, classes, jax.random.key(2))
  assert out.shape == (2, H, W) and losses.shape == (30, 2)
  assert bool(jnp.all(losses[-5:].mean(0) < losses[:5].mean(0) - 0.05))
  protocol = metrics.Protocol(reference="black")
  before = metrics.deletion_insertion(quadrant_target, images, maps, protocol=protocol,
                                      classes=classes)
  after = metrics.deletion_insertion(quadrant_target, images, out, protocol=protocol,
                                     classes=classes)
  assert bool(jnp.all(after["deletion"] < before["deletion"] - 0.1))
  assert bool(jnp.all(after["insertion"] > before["insertion"] + 0.1))
  # The top quarter of the refined ranking lies mostly in the evidence quadrant.
  top = np.asarray(out).reshape(2, -1).argsort(axis=1)[:, ::-1][:, :H * W // 4]
  in_quadrant = ((top // W) < 8) & ((top % W) < 8)
  assert in_quadrant.mean() > 0.8


def test_an_images_refinement_follows_its_own_key_only():
  """keys[B]: each image refines to what it refines to alone with its key (the batch does not
  matter); one key is keys = split(key, B) by position."""
  images, maps, classes = _setup()
  config = dataclasses.replace(CONFIG, steps=3)
  run = jax.jit(lambda i, m, c, k: refine.refine(quadrant_target, i, m, c, k, config)[0])
  keys = jax.random.split(jax.random.key(4), 2)
  both = run(images, maps, classes, keys)
  for b in range(2):
    alone = run(images[b:b + 1], maps[b:b + 1], classes[b:b + 1], keys[b:b + 1])
    np.testing.assert_allclose(np.asarray(both[b]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
  swapped = run(images, maps, classes, keys[::-1])
  assert float(jnp.abs(swapped[0] - both[0]).max()) > 1e-3  # the key drives the noise
  np.testing.assert_array_equal(np.asarray(run(images, maps, classes, jax.random.key(7))),
                                np.asarray(run(images, maps, classes,
                                               jax.random.split(jax.random.key(7), 2))))


def test_the_deletion_weight_scales_the_deletion_term_only():
  """objective(w) = w mean AUC_del + mean(1 - AUC_ins) + peak: linear in w, its slope the mean
  deletion AUC of the samples (in (0, 1)), the same draws whatever w is."""
  images, maps, classes = _setup()

  def loss(w):
    config = dataclasses.replace(CONFIG, objective=dataclasses.replace(CONFIG.objective,
                                                                       deletion_weight=w))
    return np.asarray(refine.objective(quadrant_target, images, maps, classes,
                                       jax.random.key(5), config), np.float64)

  zero, one, three = loss(0.0), loss(1.0), loss(3.0)
  slope = one - zero
  assert np.all((slope > 0.01) & (slope < 1.0)), slope
  np.testing.assert_allclose(three - one, 2.0 * slope, rtol=1e-4, atol=1e-6)
  # Insertion alone (w = 0) and deletion weighted refine to different maps.
  config = dataclasses.replace(CONFIG, steps=3)
  run = lambda w: refine.refine(quadrant_target, images, maps, classes, jax.random.key(2),
                                dataclasses.replace(config, objective=dataclasses.replace(
                                    config.objective, deletion_weight=w)))[0]
  assert float(jnp.abs(run(0.0) - run(1.0)).max()) > 1e-3


def test_the_loss_sees_the_scaled_standardised_map():
  """Each step's loss is `objective` of scale x the standardised map (the first step's, of the
  start), and the refined map comes back at that scale; without normalised scores the scale
  sharpens the sort, so it changes the refined map."""
  images, maps, classes = _setup()
  objective = dataclasses.replace(CONFIG.objective, normalize_scores=False)
  key = jax.random.key(6)
  first_step_keys = refine._split(refine._image_keys(key, 2), 1)[0]
  out = {}
  for scale in (1.0, 6.0):
    config = dataclasses.replace(CONFIG, steps=2, scale=scale, objective=objective)
    out[scale], losses = refine.refine(quadrant_target, images, maps, classes, key, config)
    expected = refine.objective(quadrant_target, images, scale * refine.standardize(maps),
                                classes, first_step_keys, config)
    np.testing.assert_allclose(np.asarray(losses[0]), np.asarray(expected), rtol=1e-5,
                               atol=1e-6)
    # Two Adam steps of at most ~learning_rate each on the standardised map.
    drift = np.abs(np.asarray(out[scale]) / scale - np.asarray(refine.standardize(maps)))
    assert drift.max() <= 2 * config.learning_rate * 1.01, drift.max()
  assert float(jnp.abs(out[6.0] / 6.0 - out[1.0]).max()) > 1e-3


def test_standardize_keeps_the_ranking():
  maps = jax.random.normal(jax.random.key(3), (3, 5, 5)) * 1e-3 + 7.0
  out = refine.standardize(maps)
  np.testing.assert_array_equal(np.argsort(np.asarray(out).reshape(3, -1), axis=1),
                                np.argsort(np.asarray(maps).reshape(3, -1), axis=1))
  np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(refine.standardize(jnp.ones((1, 4, 4))), 0.0)


def test_bad_inputs():
  images, maps, classes = _setup()
  with pytest.raises(ValueError, match="maps"):
    refine.refine(quadrant_target, images, maps[:, :8], classes, jax.random.key(0))
  with pytest.raises(ValueError, match="finite"):
    refine.refine(quadrant_target, images, maps.at[0, 0, 0].set(jnp.nan), classes,
                  jax.random.key(0))
  with pytest.raises(ValueError, match="steps"):
    refine.RefineConfig(steps=-1)
  with pytest.raises(ValueError, match="references"):
    refine.RefineConfig(references=("grey",))
  for field in ("scale", "tau", "learning_rate"):
    for bad in (0.0, -1.0, float("inf")):
      with pytest.raises(ValueError, match=f"refine {field} must be a finite number > 0"):
        refine.RefineConfig(**{field: bad})
