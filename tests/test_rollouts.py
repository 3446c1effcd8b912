"""Perturbation rollouts of a few images spread over a mesh (`mesh=` of the metrics and of
refinement) give the single-device results.

The reference is the default single-device path, run on the same inputs. conftest.py gives this
process 8 virtual CPU devices; every mesh here leaves padding slots (42 copies over 8 or 5 devices,
3 samples over 8 or 2), which must be neither counted nor misplaced.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import reference
from l2r_jax import metrics
from l2r_jax import objectives
from l2r_jax import refine

SHAPE = (16, 16, 3)


def _mesh(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                f"has {jax.device_count()}")
  return Mesh(np.asarray(jax.devices()[:n]), ("data",))


def _inputs(b, seed=0):
  images = jnp.asarray(reference.random_images(b, SHAPE, seed=seed))
  maps = jax.random.normal(jax.random.key(seed + 1), (b, *SHAPE[:2]))
  maps = maps.at[0, :4, :4].set(0.5)  # a block of ties: the tie-break must not depend on devices
  return images, maps


@pytest.mark.parametrize("rollout_layout", [
    ((42, 1, 14), (42, 14)),  # the paper's 21 x 2 on one device: 3 calls of 7 x 2
    ((42, 8, 14), (6, 6)),  # 8 devices: 6 copies each, the last 6 slots padding
    ((22, 1, 8), (24, 8)),  # 11 fractions, chunk_size 4: 3 calls, 2 padding copies
    ((42, 5, 2), (10, 2)),
    ((3, 8, 14), (1, 1)),
])
def test_rollout_layout(rollout_layout):
  (items, devices, chunk_size), want = rollout_layout
  assert metrics.rollout_layout(items, devices, chunk_size) == want


@pytest.mark.parametrize("items, devices, chunk_size",
                         [(n, d, c) for n in (2, 17, 42, 226) for d in (1, 3, 8)
                          for c in (1, 6, 14)])
def test_rollout_layout_covers_the_items_in_the_fewest_calls(items, devices, chunk_size):
  per_device, chunk = metrics.rollout_layout(items, devices, chunk_size)
  assert chunk <= chunk_size and per_device % chunk == 0
  assert devices * per_device >= items > devices * (per_device - chunk)
  assert per_device // chunk == math.ceil(math.ceil(items / devices) / chunk_size)


PROTOCOLS = [
    metrics.Protocol(),  # the paper's: pixels, 21 steps, mean reference, probability
    metrics.Protocol(unit=4, reference="black", score="logit", chunk_size=1),  # patches
    metrics.Protocol(reference="black", insertion_reference="blur", blur_size=5, blur_sigma=2.0,
                     num_steps=17, class_source="label"),  # RISE-like: two references
]


@pytest.mark.parametrize("protocol, b, devices", [
    (PROTOCOLS[0], 1, 8),  # 6 copies per device, the last 6 slots padding
    (PROTOCOLS[1], 3, 5),  # 5 devices: 10 copies each, the last 8 slots padding
    (PROTOCOLS[2], 3, 8),
], ids=("pixel-1", "patch-3-uneven", "two_references-3"))
def test_deletion_insertion_on_a_mesh_equals_one_device(protocol, b, devices):
  mesh = _mesh(devices)
  clf = reference.make_linear_classifier(SHAPE, classes=5, seed=1)
  images, maps = _inputs(b)
  labels = jnp.arange(b, dtype=jnp.int32) % 5

  def run(mesh):
    return jax.jit(lambda x, m, y: metrics.deletion_insertion(
        clf.jax_apply(), x, m, labels=y, protocol=protocol, mesh=mesh))(images, maps, labels)

  single, sharded = run(None), run(mesh)
  k = protocol.num_steps
  for key in ("deletion_curve", "insertion_curve"):
    assert sharded[key].shape == (b, k), f"{key}: want f32[{b}, {k}], got {sharded[key].shape}"
  for key in ("deletion", "insertion", "deletion_curve", "insertion_curve"):
    np.testing.assert_allclose(sharded[key], single[key], rtol=1e-6, atol=1e-7, err_msg=key)
  np.testing.assert_array_equal(sharded["classes"], single["classes"])
  # Not vacuous: the curves fall and rise along the sweeps, so a misplaced fraction shows.
  assert float(jnp.max(jnp.abs(jnp.diff(single["deletion_curve"], axis=-1)))) > 1e-3


def test_perturbation_test_on_8_devices_equals_one_device():
  # Eager (no outer jit), as a notebook would call it.
  mesh = _mesh(8)
  clf = reference.make_linear_classifier(SHAPE, classes=3, seed=4)
  images, maps = _inputs(3, seed=5)
  labels = jnp.argmax(clf.jax_apply()(images), axis=-1).astype(jnp.int32)
  single = metrics.perturbation_test(clf.jax_apply(), images, maps, labels)
  sharded = metrics.perturbation_test(clf.jax_apply(), images, maps, labels, mesh=mesh)
  for key in ("pos", "neg", "pos_curve", "neg_curve"):
    np.testing.assert_allclose(sharded[key], single[key], rtol=1e-6, err_msg=key)
  assert sharded["pos_curve"].shape == (3, len(metrics.PERTURBATION_FRACTIONS))


def test_sample_layout():
  np.testing.assert_array_equal(refine.sample_layout(3, 4), [[0], [1], [2], [-1]])
  np.testing.assert_array_equal(refine.sample_layout(10, 3),
                                [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]])
  np.testing.assert_array_equal(refine.sample_layout(6, 1), [[0, 1, 2, 3, 4, 5]])


def quadrant_target(images):
  """Class 0's logit grows with the brightness of the top-left quadrant; class 1 is flat."""
  evidence = jnp.mean(images[:, :8, :8, :], axis=(1, 2, 3))
  return jnp.stack([12.0 * evidence - 4.0, jnp.zeros_like(evidence)], axis=-1)


# Cheap to compile: few fractions and Sinkhorn iterations, no mask smoothing.
REFINE = refine.RefineConfig(steps=3, learning_rate=0.2, num_samples=3, grids=(2, 4),
                             references=("black", "mean"),
                             objective=objectives.ObjectiveConfig(
                                 num_fractions=4, num_iters=3, smoothing_sigma=0.0,
                                 normalize_scores=True, peak_window=5))


@pytest.fixture(scope="module")
def refine_inputs():
  """Two images, their starting maps and classes, and the single-device refinement (computed
  once: the tests compare several meshes against it)."""
  images = jax.random.uniform(jax.random.key(0), (2, *SHAPE), minval=0.6, maxval=1.0)
  maps = jax.random.normal(jax.random.key(1), (2, *SHAPE[:2]))
  classes = jnp.zeros((2,), jnp.int32)
  # An 'rbg' key: its Gumbel noise compiles in a fraction of threefry's time on CPUs; the noise
  # still differs between samples, so a sample given another's key shows.
  inputs = (images, maps, classes, jax.random.key(2, impl="rbg"))
  return inputs, _refine(None, inputs)


def _refine(mesh, inputs):
  return jax.jit(lambda x, m, c, k: refine.refine(quadrant_target, x, m, c, k, REFINE,
                                                  mesh=mesh))(*inputs)


@pytest.mark.parametrize("devices", [
    8,  # fewer samples than devices: 5 devices idle
    2,  # 2 slots per device, the second device's last one padding
])
def test_refine_on_a_mesh_equals_one_device(refine_inputs, devices):
  mesh = _mesh(devices)
  inputs, (single, single_losses) = refine_inputs
  sharded, sharded_losses = _refine(mesh, inputs)
  assert sharded.shape == (2, *SHAPE[:2]) and sharded_losses.shape == (REFINE.steps, 2)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  # Not vacuous: the maps moved, by more than the tolerance.
  assert float(jnp.max(jnp.abs(single - refine.standardize(inputs[1])))) > 1e-2
