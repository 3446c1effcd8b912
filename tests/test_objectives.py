"""The differentiable objective: AUCs, peak penalty, class choice, one target pass, the hard
limit, gradients, and optimisation of a free score map to the known optimum."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from l2r_jax import metrics
from l2r_jax import objectives
from l2r_jax import perturb

SHAPE = (16, 16, 3)


def test_trapezoid_auc_matches_loop():
  curves = np.random.default_rng(0).uniform(size=(3, 2, 7))
  fractions = np.sort(np.random.default_rng(1).uniform(size=7))
  got = objectives.trapezoid_auc(jnp.asarray(curves, jnp.float32), fractions)
  want = np.vectorize(lambda i, j: reference.trapezoid(curves[i, j], fractions))(
      *np.indices((3, 2)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="curves must have shape \\[..., 7\\]"):
    objectives.trapezoid_auc(jnp.zeros((3, 6)), fractions)


def test_peak_penalty_matches_loop():
  h = np.random.default_rng(2).normal(size=(2, 20, 18))
  got = objectives.peak_penalty(jnp.asarray(h, jnp.float32), window=15)
  padded = np.pad(h, ((0, 0), (7, 7), (7, 7)))
  local = np.zeros_like(h)
  for y in range(20):
    for x in range(18):
      local[:, y, x] = padded[:, y:y + 15, x:x + 15].sum((1, 2)) / 225.0
  np.testing.assert_allclose(got, np.mean(np.maximum(h - local, 0) ** 2), rtol=1e-5)


def test_select_classes():
  logits = jnp.asarray([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 4.0], [0.0, 1.0, 2.0, 3.0]])
  np.testing.assert_array_equal(objectives.select_classes(logits), [[1, 2], [0, 3], [3, 2]])
  labels = jnp.asarray([1, 2, 0], jnp.int32)  # right, wrong, wrong
  np.testing.assert_array_equal(objectives.select_classes(logits, labels),
                                [[1, 2], [0, 2], [3, 0]])
  with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\]"):
    objectives.select_classes(logits, jnp.asarray([1, 2, 4], jnp.int32))
  with pytest.raises(ValueError, match="labels must be an integer array"):
    objectives.select_classes(logits, jnp.asarray([1.0, 2.0, 0.0]))


@pytest.fixture(scope="module")
def problem():
  clf = reference.make_linear_classifier(SHAPE, classes=4, seed=0, scale=0.2)
  images = jnp.asarray(reference.random_images(2, SHAPE, seed=1))
  maps = jax.random.normal(jax.random.key(2), (2, 16, 16))
  refs = perturb.reference_images(images, "mean")
  classes = objectives.select_classes(clf.jax_apply()(images))
  return clf, images, maps, refs, classes


def test_all_classes_are_read_from_one_target_pass(problem):
  clf, images, maps, refs, classes = problem
  calls = []
  apply = clf.jax_apply()

  def counted(x):
    calls.append(x.shape)
    return apply(x)

  kw = dict(key=jax.random.key(0), grid=8, tau=0.5)
  both = objectives.soft_curves(counted, images, maps, refs, classes, **kw)
  assert calls == [(2 * 2 * 16, 16, 16, 3)]  # one pass: B x (deletion, insertion) x K
  assert both.shape == (2, 2, 2, 16)
  for c in range(2):  # the same numbers as scoring each class on its own
    alone = objectives.soft_curves(apply, images, maps, refs, classes[:, c:c + 1], **kw)
    np.testing.assert_allclose(both[:, :, c:c + 1], alone, atol=1e-6)


def test_soft_curves_reach_the_hard_metric_at_low_temperature(problem):
  clf, images, _, refs, classes = problem
  grid, unit = 4, 4
  rng = np.random.default_rng(3)
  cells = jnp.asarray(np.stack([rng.permutation(16) / 15.0 for _ in range(2)]), jnp.float32)
  maps = perturb.upsample_cells(cells, grid, (16, 16))
  # Normalised scores: -h of a positive map lies outside the anchors' [0, 1], where Sinkhorn at
  # tau 3e-4 needs far more than 300 iterations to converge.
  config = objectives.ObjectiveConfig(num_fractions=17, smoothing_sigma=0.0, num_iters=300,
                                      normalize_scores=True)
  soft = objectives.soft_curves(clf.jax_apply(), images, maps, refs, classes, key=None,
                                grid=grid, tau=3e-4, config=config)
  for c in range(2):
    hard = metrics.hard_sweep(clf.jax_apply(), images, maps, (refs, refs),
                              metrics.class_scores_readout(classes[:, c]), config.fractions,
                              unit=unit)
    np.testing.assert_allclose(soft[:, :, c], hard, atol=1e-4)


def test_loss_parts_and_gradient(problem):
  clf, images, maps, refs, classes = problem
  config = objectives.ObjectiveConfig()

  def loss(m):
    return objectives.loss_fn(clf.jax_apply(), images, m, refs, classes,
                              key=jax.random.key(4), grid=8, tau=0.5, config=config)

  (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(maps)
  want = (aux["deletion_auc"].mean() + (1 - aux["insertion_auc"]).mean()
          + 0.0025 * objectives.peak_penalty(maps))
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert aux["deletion_auc"].shape == aux["insertion_auc"].shape == (2, 2)
  assert grad.shape == maps.shape and bool(jnp.isfinite(grad).all())
  assert float(jnp.abs(grad).max()) > 1e-6
  # deletion_weight scales the deletion term only.
  weighted = objectives.loss_fn(clf.jax_apply(), images, maps, refs, classes,
                                key=jax.random.key(4), grid=8, tau=0.5,
                                config=objectives.ObjectiveConfig(deletion_weight=3.0))[0]
  np.testing.assert_allclose(weighted, want + 2.0 * aux["deletion_auc"].mean(), rtol=1e-6)
  # second_class_weight w: per image (first + w * second) / (1 + w), from the same AUCs.
  dele, ins = np.asarray(aux["deletion_auc"], np.float64), np.asarray(aux["insertion_auc"],
                                                                      np.float64)
  peak = 0.0025 * float(objectives.peak_penalty(maps))
  got = {}
  for w in (0.0, 0.25):
    got[w] = objectives.loss_fn(clf.jax_apply(), images, maps, refs, classes,
                                key=jax.random.key(4), grid=8, tau=0.5,
                                config=objectives.ObjectiveConfig(second_class_weight=w))[0]
    mix = np.array([1.0, w]) / (1.0 + w)
    np.testing.assert_allclose(got[w], np.mean(dele @ mix) + np.mean((1 - ins) @ mix) + peak,
                               rtol=1e-6)
    np.testing.assert_allclose(
        objectives.class_mean(aux["deletion_auc"], objectives.ObjectiveConfig(
            second_class_weight=w)), np.mean(dele @ mix), rtol=1e-6)
  # At 0 it is the loss of the first class alone.
  alone = objectives.loss_fn(clf.jax_apply(), images, maps, refs, classes[:, :1],
                             key=jax.random.key(4), grid=8, tau=0.5, config=config)[0]
  np.testing.assert_allclose(got[0.0], alone, rtol=1e-6)


def test_hard_cell_masks_match_a_numpy_loop():
  rng = np.random.default_rng(9)
  cells = rng.normal(size=(3, 10)).astype(np.float32)
  cells[1, [2, 5, 7]] = cells[1, 0]  # ties: the lower index ranks first
  fractions = np.linspace(0, 1, 7)  # p * N = 0, 1.67, 3.33, ...: partial cells
  got = objectives.hard_cell_masks(jnp.asarray(cells), fractions)
  want = np.zeros((3, 7, 10))
  for b in range(3):
    order = sorted(range(10), key=lambda i: (-float(cells[b, i]), i))
    for k, p in enumerate(fractions):
      deleted = p * 10  # cells of mass: whole ones first, then a share of the next
      for rank, i in enumerate(order):
        want[b, k, i] = min(max(deleted - rank, 0.0), 1.0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), np.broadcast_to(fractions * 10, (3, 7)), atol=1e-5)


def test_straight_through_values_are_hard_and_gradients_soft():
  maps = jax.random.normal(jax.random.key(10), (2, 12, 12))
  soft_config = objectives.ObjectiveConfig(num_fractions=6, num_iters=10)
  st_config = dataclasses.replace(soft_config, straight_through=True)
  kw = dict(key=jax.random.key(11), grid=6, tau=0.3)
  st = objectives.soft_sweep_masks(maps, config=st_config, **kw)
  cells = perturb.pool_to_grid(maps, 6)
  for s, sign in enumerate((1.0, -1.0)):
    hard = perturb.upsample_cells(objectives.hard_cell_masks(sign * cells, st_config.fractions),
                                  6, (12, 12))
    np.testing.assert_allclose(st[:, s], perturb.smooth_masks(hard, 1.0), atol=1e-6)
  weights = jax.random.normal(jax.random.key(12), st.shape)
  grad = lambda c: jax.grad(
      lambda m: jnp.sum(weights * objectives.soft_sweep_masks(m, config=c, **kw)))(maps)
  soft_grad = grad(soft_config)
  assert float(jnp.abs(soft_grad).max()) > 1e-4
  np.testing.assert_allclose(grad(st_config), soft_grad, atol=1e-6)


def test_straight_through_loss_is_the_hard_metric(problem):
  # Each pixel its own cell and fractions on whole pixel counts (17 x 256 / 16): the forward
  # value is the evaluation's deletion / insertion AUC exactly, whatever the temperature.
  clf, images, maps, refs, classes = problem
  config = objectives.ObjectiveConfig(num_fractions=17, smoothing_sigma=0.0, num_iters=5,
                                      peak_weight=0.0, straight_through=True)
  _, aux = objectives.loss_fn(clf.jax_apply(), images, maps, refs, classes,
                              key=jax.random.key(13), grid=16, tau=1.0, config=config)
  for c in range(2):
    want = metrics.deletion_insertion(clf.jax_apply(), images, maps, classes=classes[:, c],
                                      protocol=metrics.Protocol(num_steps=17))
    np.testing.assert_allclose(aux["deletion_auc"][:, c], want["deletion"], atol=1e-5)
    np.testing.assert_allclose(aux["insertion_auc"][:, c], want["insertion"], atol=1e-5)


def test_free_map_descends_to_the_known_optimum():
  # 2 classes: the contribution ranking is the exact optimum of both hard curves (reference.py).
  clf = reference.make_linear_classifier(SHAPE, classes=2, seed=5, scale=0.2)
  apply = clf.jax_apply()
  images = jnp.asarray(reference.random_images(2, SHAPE, seed=6))
  refs = perturb.reference_images(images, "black")
  classes = jnp.argmax(apply(images), -1).astype(jnp.int32)
  protocol = metrics.Protocol(reference="black")
  hard = lambda m: metrics.deletion_insertion(apply, images, m, classes=classes,
                                              protocol=protocol)
  optimal = hard(jnp.asarray(np.stack([clf.contributions(np.asarray(x), 0.0, int(c))
                                       for x, c in zip(images, classes)]), jnp.float32))
  # No mask smoothing: on a 16 px image a 1 px Gaussian blurs the sweep enough to move the soft
  # optimum (with it the run ends ~0.015 above the hard optimum; without, within ~0.005).
  config = objectives.ObjectiveConfig(peak_weight=0.0, smoothing_sigma=0.0)
  opt = optax.adam(0.05)
  maps = jax.random.normal(jax.random.key(7), (2, 16, 16))
  start = hard(maps)

  @jax.jit
  def step(maps, state, key):
    grad = jax.grad(lambda m: objectives.loss_fn(apply, images, m, refs, classes[:, None],
                                                 key=key, grid=16, tau=0.1, config=config)[0])(
                                                     maps)
    updates, state = opt.update(grad, state)
    return optax.apply_updates(maps, updates), state

  state = opt.init(maps)
  for key in jax.random.split(jax.random.key(8), 300):
    maps, state = step(maps, state, key)
  end = hard(maps)
  print("deletion: start", start["deletion"], "end", end["deletion"], "opt", optimal["deletion"])
  print("insertion: start", start["insertion"], "end", end["insertion"], "opt",
        optimal["insertion"])
  assert bool((end["deletion"] < start["deletion"] - 0.05).all())
  assert bool((end["insertion"] > start["insertion"] + 0.05).all())
  np.testing.assert_allclose(end["deletion"], optimal["deletion"], atol=0.01)
  np.testing.assert_allclose(end["insertion"], optimal["insertion"], atol=0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(maps=jnp.zeros((2, 16, 15))), "maps must have shape f32\\[2, 16, 16\\]"),
    (dict(classes=jnp.zeros((2,), jnp.int32)), "classes must have shape i32\\[B, C\\]"),
    (dict(classes=jnp.zeros((3, 2), jnp.int32)), "classes must have shape i32\\[2, C\\]"),
    (dict(classes=jnp.zeros((2, 2))), "classes must be an integer array"),
    (dict(maps=jnp.full((2, 16, 16), jnp.inf)), "maps must be finite"),
    (dict(grid=17), "grid must be <="),
    (dict(tau=0.0), "tau must be a finite number > 0"),
])
def test_bad_input_raises_value_error(problem, kwargs, match):
  clf, images, maps, refs, classes = problem
  args = dict(images=images, maps=maps, references=refs, classes=classes, key=None, grid=8,
              tau=0.5) | kwargs
  with pytest.raises(ValueError, match=match):
    objectives.loss_fn(clf.jax_apply(), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_fractions=1), "num_fractions must be an integer >= 2"),
    (dict(score="softmax"), "score must be one of"),
    (dict(smoothing_sigma=-1.0), "smoothing_sigma must be a finite number >= 0"),
    (dict(smoothing_sigma=float("nan")), "smoothing_sigma must be a finite number >= 0"),
    (dict(peak_weight=-0.1), "peak_weight must be a finite number >= 0"),
    (dict(peak_weight=float("inf")), "peak_weight must be a finite number >= 0"),
    (dict(deletion_weight=float("nan")), "deletion_weight must be a finite number >= 0"),
    (dict(deletion_weight=float("inf")), "deletion_weight must be a finite number >= 0"),
    (dict(second_class_weight=-1.0), "second_class_weight must be a finite number >= 0"),
    (dict(second_class_weight=float("inf")), "second_class_weight must be a finite number >= 0"),
])
def test_bad_config_raises_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    objectives.ObjectiveConfig(**kwargs)
