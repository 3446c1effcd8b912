"""The core functions under shard_map over 8 CPU devices give the single-device results.

conftest.py gives this process 8 virtual CPU devices; the batch axis is split across them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import reference
from l2r_jax import metrics
from l2r_jax import objectives
from l2r_jax import perturb
from l2r_jax import sorting

SHAPE = (20, 20, 3)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                f"has {jax.device_count()}")
  return Mesh(np.asarray(jax.devices()[:8]), ("data",))


def _sharded(mesh, f, in_specs, out_specs):
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def test_soft_sort(mesh):
  s = jax.random.normal(jax.random.key(0), (16, 49))
  f = lambda x: sorting.soft_sort(x, tau=0.4)
  np.testing.assert_allclose(_sharded(mesh, f, P("data"), P("data"))(s), f(s), atol=1e-6)


def test_objective_values_and_gradient(mesh):
  clf = reference.make_linear_classifier(SHAPE, classes=4, seed=0)
  images = jnp.asarray(reference.random_images(8, SHAPE, seed=1))
  maps = jax.random.normal(jax.random.key(2), (8, 20, 20))
  classes = objectives.select_classes(clf.jax_apply()(images))
  # Noise drawn per image from a key per image, so that it does not depend on the split.
  keys = jax.random.split(jax.random.key(3), 8)

  def per_image_loss(images, maps, classes, keys):
    def loss(x, m, c, k):
      x = x[None]
      refs = perturb.reference_images(x, "blur")
      return objectives.loss_fn(clf.jax_apply(), x, m[None], refs, c[None], key=k, grid=5,
                                tau=0.5)[0]

    return jax.vmap(jax.value_and_grad(loss, argnums=1))(images, maps, classes, keys)

  single = per_image_loss(images, maps, classes, keys)
  sharded = _sharded(mesh, per_image_loss, (P("data"),) * 4, (P("data"), P("data")))(
      images, maps, classes, keys)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
  np.testing.assert_allclose(sharded[1], single[1], rtol=1e-4, atol=1e-7)


def test_batch_mean_loss_with_pmean(mesh):
  clf = reference.make_linear_classifier(SHAPE, classes=4, seed=0)
  images = jnp.asarray(reference.random_images(8, SHAPE, seed=1))
  maps = jax.random.normal(jax.random.key(2), (8, 20, 20))
  classes = objectives.select_classes(clf.jax_apply()(images))
  refs = perturb.reference_images(images, "mean")
  config = objectives.ObjectiveConfig(peak_weight=0.0)  # the penalty's mean is over pixels too

  def loss(images, maps, refs, classes):
    return objectives.loss_fn(clf.jax_apply(), images, maps, refs, classes, key=None, grid=5,
                              tau=0.5, config=config)[0]

  def sharded_loss(images, maps, refs, classes):
    return jax.lax.pmean(loss(images, maps, refs, classes), "data")

  want = loss(images, maps, refs, classes)
  got = _sharded(mesh, sharded_loss, (P("data"),) * 4, P())(images, maps, refs, classes)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_metrics(mesh):
  clf = reference.make_linear_classifier(SHAPE, classes=5, seed=1)
  images = jnp.asarray(reference.random_images(16, SHAPE, seed=2))
  maps = jax.random.normal(jax.random.key(3), (16, 20, 20))
  labels = jnp.arange(16, dtype=jnp.int32) % 5

  def evaluate(images, maps, labels):
    r = metrics.deletion_insertion(clf.jax_apply(), images, maps,
                                   protocol=metrics.Protocol(reference="blur"))
    p = metrics.perturbation_test(clf.jax_apply(), images, maps, labels)
    return r["deletion"], r["insertion"], p["pos"], p["neg"]

  single = evaluate(images, maps, labels)
  sharded = _sharded(mesh, evaluate, (P("data"),) * 3, (P("data"),) * 4)(images, maps, labels)
  for got, want in zip(sharded, single):
    np.testing.assert_allclose(got, want, atol=1e-6)
