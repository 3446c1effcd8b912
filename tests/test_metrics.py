"""Hard-ranking evaluation metrics against brute-force NumPy loops on an analytic classifier."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from l2r_jax import metrics

SHAPE = (20, 20, 3)  # > 18 px: the paper's 37-tap blur needs it for reflect padding


@pytest.fixture(scope="module")
def setup():
  clf = reference.make_linear_classifier(SHAPE, classes=5, seed=1)
  images = reference.random_images(3, SHAPE, seed=2)
  maps = np.random.default_rng(3).normal(size=(3, 20, 20)).astype(np.float32)
  maps[0, :5, :5] = 0.25  # a block of ties: the stable tie-break must agree too
  labels = np.array([4, 0, 2], np.int32)
  return clf, images, maps, labels


def _brute_force(clf, images, maps, classes, protocol, fractions=None):
  fractions = protocol.fractions if fractions is None else fractions
  out = {"deletion": [], "insertion": []}
  for x, h, c in zip(images, maps, classes):
    ref_del = reference.reference_image(x, protocol.reference, protocol.mean_color)
    ref_ins = reference.reference_image(x, protocol.insertion_reference or protocol.reference,
                                        protocol.mean_color)

    def score(img, c=c):
      z = clf.logits(img)
      return reference.softmax(z)[c] if protocol.score == "prob" else z[c]

    for name, sal, ref in (("deletion", h, ref_del), ("insertion", -h, ref_ins)):
      curve = reference.deletion_curve(score, x, sal, ref, fractions, protocol.unit)
      out[name].append(reference.trapezoid(curve, fractions))
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("protocol", [
    metrics.Protocol(),  # the paper's
    metrics.Protocol(reference="black"),
    metrics.Protocol(reference="blur"),
    metrics.Protocol(unit=4),
    metrics.Protocol(unit=5, reference="blur", score="logit"),
    metrics.Protocol(class_source="label", num_steps=11, chunk_size=4),
    metrics.Protocol(reference="black", insertion_reference="blur", num_steps=9),  # RISE-like
], ids=lambda p: f"{p.reference}-{p.insertion_reference}-u{p.unit}-{p.score}-{p.class_source}")
def test_auc_matches_brute_force_numpy(setup, protocol):
  clf, images, maps, labels = setup
  got = metrics.deletion_insertion(clf.jax_apply(), jnp.asarray(images), jnp.asarray(maps),
                                   labels=jnp.asarray(labels), protocol=protocol)
  predicted = [int(np.argmax(clf.logits(x))) for x in images]
  np.testing.assert_array_equal(got["classes"],
                                labels if protocol.class_source == "label" else predicted)
  want = _brute_force(clf, images, maps, np.asarray(got["classes"]), protocol)
  np.testing.assert_allclose(got["deletion"], want["deletion"], atol=1e-5)
  np.testing.assert_allclose(got["insertion"], want["insertion"], atol=1e-5)
  assert got["deletion_curve"].shape == (3, protocol.num_steps)


def test_chunk_size_does_not_change_results(setup):
  clf, images, maps, _ = setup
  results = [metrics.deletion_insertion(clf.jax_apply(), jnp.asarray(images), jnp.asarray(maps),
                                        protocol=metrics.Protocol(chunk_size=c))
             for c in (1, 4, 21, 50)]
  for r in results[1:]:
    np.testing.assert_allclose(r["deletion_curve"], results[0]["deletion_curve"], atol=1e-6)
    np.testing.assert_allclose(r["insertion_curve"], results[0]["insertion_curve"], atol=1e-6)


def test_jit_gives_the_eager_result(setup):
  clf, images, maps, _ = setup
  f = jax.jit(lambda x, m: metrics.deletion_insertion(clf.jax_apply(), x, m))
  eager = metrics.deletion_insertion(clf.jax_apply(), jnp.asarray(images), jnp.asarray(maps))
  np.testing.assert_allclose(f(jnp.asarray(images), jnp.asarray(maps))["deletion"],
                             eager["deletion"], atol=1e-6)


def test_optimal_ranking_beats_random_and_reversed():
  # 2 classes: ranking by the exact log-odds contribution is optimal for both curves.
  clf = reference.make_linear_classifier(SHAPE, classes=2, seed=4)
  images = reference.random_images(4, SHAPE, seed=5)
  protocol = metrics.Protocol(reference="black")
  classes = np.array([int(np.argmax(clf.logits(x))) for x in images])
  optimal = np.stack([clf.contributions(x, 0.0, c) for x, c in zip(images, classes)])
  rand = np.random.default_rng(6).normal(size=optimal.shape)
  run = lambda m: metrics.deletion_insertion(clf.jax_apply(), jnp.asarray(images),
                                             jnp.asarray(m, jnp.float32), protocol=protocol)
  best, random, worst = run(optimal), run(rand), run(-optimal)
  assert bool((best["deletion"] < random["deletion"]).all())
  assert bool((best["insertion"] > random["insertion"]).all())
  assert bool((random["deletion"] < worst["deletion"]).all())
  # Optimal at every fraction: no other ranking's curve is ever below (deletion) or above.
  assert bool((best["deletion_curve"] <= random["deletion_curve"] + 1e-6).all())
  assert bool((best["insertion_curve"] >= random["insertion_curve"] - 1e-6).all())


def test_perturbation_test_matches_brute_force(setup):
  clf, images, maps, labels = setup
  fractions = metrics.PERTURBATION_FRACTIONS
  got = metrics.perturbation_test(clf.jax_apply(), jnp.asarray(images), jnp.asarray(maps),
                                  jnp.asarray(labels))
  for b, (x, h, y) in enumerate(zip(images, maps, labels)):
    ref = reference.reference_image(x, "mean")
    hit = lambda img, y=y: float(np.argmax(clf.logits(img)) == y)
    for name, sal in (("pos", h), ("neg", -h)):
      curve = reference.deletion_curve(hit, x, sal, ref, fractions)
      np.testing.assert_allclose(got[f"{name}_curve"][b], curve)
      np.testing.assert_allclose(got[name][b], 100 * reference.trapezoid(curve, fractions),
                                 atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(maps=jnp.zeros((3, 20, 19))), "maps must have shape f32\\[3, 20, 20\\]"),
    (dict(maps=jnp.zeros((20, 20))), "maps must have shape"),
    (dict(images=jnp.zeros((3, 20, 20))), "images must have shape f32\\[B, H, W, C\\]"),
    (dict(images=jnp.full((3, 20, 20, 3), 2.0)), "images must lie in \\[0.0, 1.0\\]"),
    (dict(maps=jnp.full((3, 20, 20), jnp.nan)), "maps must be finite"),
    (dict(protocol=metrics.Protocol(class_source="label")), "needs labels"),
    (dict(labels=jnp.zeros((2,), jnp.int32), protocol=metrics.Protocol(class_source="label")),
     "labels must have shape i32\\[3\\]"),
])
def test_bad_input_raises_value_error(setup, kwargs, match):
  clf, images, maps, _ = setup
  args = dict(images=jnp.asarray(images), maps=jnp.asarray(maps)) | kwargs
  with pytest.raises(ValueError, match=match):
    metrics.deletion_insertion(clf.jax_apply(), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reference="grey"), "reference must be one of"),
    (dict(num_steps=1), "num_steps must be an integer >= 2"),
    (dict(score="log_prob"), "score must be one of"),
    (dict(class_source="top5"), "class_source must be one of"),
    (dict(unit=0), "unit must be an integer >= 1"),
])
def test_bad_protocol_raises_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.Protocol(**kwargs)


def test_accumulator_means_and_standard_errors_skip_padding():
  rng = np.random.default_rng(0)
  values = rng.uniform(size=(3, 8))
  masks = np.ones((3, 8), bool)
  masks[2, 5:] = False  # the padded tail of the last batch
  acc = metrics.Accumulator()
  for v, m in zip(values, masks):
    acc.add("x", jnp.asarray(v), jnp.asarray(m))
    acc.add_curve("c", jnp.asarray(np.stack([v, 2 * v], axis=1)), jnp.asarray(m))
  kept = values[masks]
  stats = acc.stats("x")
  assert stats["n"] == 21
  np.testing.assert_allclose(stats["mean"], kept.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["se"], kept.std(ddof=1) / np.sqrt(21), rtol=1e-4)
  np.testing.assert_allclose(acc.curves["c"] / 21, [kept.mean(), 2 * kept.mean()], rtol=1e-5)
