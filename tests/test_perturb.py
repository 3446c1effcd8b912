"""Perturbations: sweep weights, soft and hard masks, resampling, smoothing, references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import reference
from l2r_jax import perturb
from l2r_jax import sorting


def test_fraction_weights_are_the_interpolated_cumulative_rows():
  # Definition: mask(p) = C[floor(pN)] + (pN - floor(pN)) * (C[ceil(pN)] - C[floor(pN)]),
  # C[m] = sum of the first m rows. Check on a random row-stochastic matrix.
  rng = np.random.default_rng(0)
  n = 7
  perm = rng.dirichlet(np.ones(n), size=n)  # [ranks, items]
  fractions = np.linspace(0, 1, 16)
  cum = np.concatenate([np.zeros((1, n)), np.cumsum(perm, axis=0)])
  want = []
  for p in fractions:
    k = p * n
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    want.append(cum[lo] + (k - lo) * (cum[hi] - cum[lo]))
  got = perturb.soft_deletion_masks(jnp.asarray(perm[None], jnp.float32), fractions)[0]
  np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)


def test_soft_masks_of_a_hard_permutation_are_hard_masks():
  s = jnp.asarray([[0.3, 0.9, 0.1, 0.5]])
  perm = jax.nn.one_hot(jnp.argsort(-s, axis=-1), 4)  # rows = ranks
  masks = perturb.soft_deletion_masks(perm, [0.0, 0.25, 0.5, 0.75, 1.0])[0]
  np.testing.assert_array_equal(masks, [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1], [1, 1, 0, 1],
                                        [1, 1, 1, 1]])


def test_soft_masks_converge_to_hard_masks_as_tau_falls():
  rng = np.random.default_rng(3)
  grid, unit = 4, 2
  cells = np.stack([rng.permutation(grid * grid) / 15.0 for _ in range(2)])
  maps = perturb.upsample_cells(jnp.asarray(cells, jnp.float32), grid, (8, 8))
  fractions = np.linspace(0, 1, 17)  # p * 16 cells is an integer: no interpolation
  hard = perturb.hard_deletion_masks(maps, fractions, unit=unit)
  errors = []
  for tau in (0.3, 0.03, 0.003, 0.0003):
    perm = sorting.soft_sort(perturb.pool_to_grid(maps, grid), tau=tau, num_iters=300)
    soft = perturb.upsample_cells(perturb.soft_deletion_masks(perm, fractions), grid, (8, 8))
    errors.append(float(jnp.abs(soft - hard).max()))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-4, errors


def _np_adaptive_pool(x, g):
  h, w = x.shape
  out = np.zeros((g, g))
  for i in range(g):
    for j in range(g):
      r0, r1 = (i * h) // g, -((-(i + 1) * h) // g)
      c0, c1 = (j * w) // g, -((-(j + 1) * w) // g)
      out[i, j] = x[r0:r1, c0:c1].mean()
  return out


@pytest.mark.parametrize("size, grid", [((8, 8), 4), ((10, 7), 3), ((224, 224), 9)])
def test_pool_to_grid_is_adaptive_average_pooling(size, grid):
  x = np.random.default_rng(0).normal(size=(2, *size)).astype(np.float32)
  got = perturb.pool_to_grid(jnp.asarray(x), grid)
  want = np.stack([_np_adaptive_pool(m, grid).reshape(-1) for m in x])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("grid, size", [(4, (8, 8)), (3, (10, 7)), (9, (224, 224))])
def test_upsample_cells_is_nearest(grid, size):
  cells = np.arange(2 * grid * grid, dtype=np.float32).reshape(2, grid * grid)
  got = np.asarray(perturb.upsample_cells(jnp.asarray(cells), grid, size))
  for y in range(size[0]):
    for x in range(size[1]):
      src = (y * grid // size[0]) * grid + x * grid // size[1]
      np.testing.assert_array_equal(got[:, y, x], cells[:, src])


@pytest.mark.parametrize("sigma, size", [(1.0, None), (37.0, 37), (2.0, 9)])
def test_gaussian_blur_matches_scipy_with_reflect_padding(sigma, size):
  x = np.random.default_rng(1).uniform(size=(2, 40, 33)).astype(np.float32)
  got = perturb.gaussian_blur(jnp.asarray(x), sigma, size)
  taps = perturb.gaussian_kernel(sigma, size or 2 * int(np.ceil(3 * sigma)) + 1)
  np.testing.assert_allclose(taps.sum(), 1.0, rtol=1e-6)
  want = x.astype(np.float64)
  for axis in (1, 2):  # scipy's 'mirror' is reflection without repeating the edge
    want = ndimage.correlate1d(want, taps.astype(np.float64), axis=axis, mode="mirror")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_references():
  images = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 40, 40, 3)), jnp.float32)
  np.testing.assert_array_equal(perturb.reference_images(images, "black"), 0.0)
  mean = perturb.reference_images(images, "mean")
  np.testing.assert_allclose(mean[1, 5, 7], perturb.IMAGENET_MEAN, rtol=1e-6)
  blur = perturb.reference_images(images, "blur")
  np.testing.assert_allclose(blur[1], reference.gaussian_blur(np.asarray(images[1]), 37, 37.0),
                             atol=1e-5)
  # 'noise': one fixed uniform field, the same for each image and any batch size.
  noise = np.asarray(perturb.reference_images(images, "noise"))
  np.testing.assert_array_equal(noise[0], noise[1])
  np.testing.assert_array_equal(perturb.reference_images(images[:1], "noise")[0], noise[0])
  assert 0 <= noise.min() and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.02
  assert abs(np.corrcoef(noise[0, :, :, 0].ravel(), noise[0, :, :, 1].ravel())[0, 1]) < 0.1
  user = perturb.reference_images(images, jnp.full((40, 40, 3), 0.25))
  np.testing.assert_array_equal(user, 0.25)
  with pytest.raises(ValueError, match="reference must be one of"):
    perturb.reference_images(images, "gray")
  with pytest.raises(ValueError, match="reference array must broadcast"):
    perturb.reference_images(images, jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match="mean_color must have shape"):
    perturb.reference_images(images, "mean", mean_color=(0.5, 0.5))
  with pytest.raises(ValueError, match="choose a smaller kernel size"):
    perturb.reference_images(images[:, :16, :16], "blur")


def test_blend_endpoints_and_shapes():
  images = jnp.full((2, 4, 4, 3), 0.8)
  refs = jnp.zeros((2, 4, 4, 3))
  masks = jnp.stack([jnp.zeros((2, 4, 4)), jnp.ones((2, 4, 4)), jnp.full((2, 4, 4), 0.25)], 1)
  out = perturb.blend(images, refs, masks)
  assert out.shape == (2, 3, 4, 4, 3)
  np.testing.assert_allclose(out[:, 0], 0.8)
  np.testing.assert_allclose(out[:, 1], 0.0)
  np.testing.assert_allclose(out[:, 2], 0.6, rtol=1e-6)
  with pytest.raises(ValueError, match="masks must have shape"):
    perturb.blend(images, refs, jnp.zeros((2, 3, 5, 4)))


def test_stable_tie_break_lower_index_first_in_both_orders():
  s = jnp.asarray([[0.5, 0.9, 0.5, 0.1, 0.5]])
  np.testing.assert_array_equal(perturb.descending_ranks(s), [[1, 0, 2, 4, 3]])
  np.testing.assert_array_equal(perturb.descending_ranks(-s), [[1, 4, 2, 0, 3]])


@pytest.mark.parametrize("unit", [1, 2, 4])
def test_hard_masks_delete_round_p_n_units(unit):
  maps = jax.random.normal(jax.random.key(0), (3, 8, 8))
  fractions = np.linspace(0, 1, 21)
  masks = perturb.hard_deletion_masks(maps, fractions, unit=unit)
  n = (8 // unit) ** 2
  np.testing.assert_array_equal(masks.sum((-2, -1)),
                                np.broadcast_to(np.round(fractions * n) * unit**2, (3, 21)))
  # Nested sweeps: a pixel once deleted stays deleted.
  assert bool((jnp.diff(masks, axis=1) >= 0).all())
  # The first unit deleted holds the largest mean score.
  pooled = perturb.unit_scores(maps, unit).reshape(3, -1)
  first = jnp.argmax(pooled, axis=-1)
  for b in range(3):
    i, j = divmod(int(first[b]), 8 // unit)
    assert float(masks[b, -1, i * unit, j * unit]) == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: perturb.soft_deletion_masks(jnp.ones((2, 3, 4)), [0, 1]), "must be square"),
    (lambda: perturb.soft_deletion_masks(jnp.ones((2, 3)), [0, 1]), "perm must have shape"),
    (lambda: perturb.soft_deletion_masks(jnp.ones((1, 3, 3)), [0, 1.5]), "fractions must lie"),
    (lambda: perturb.soft_deletion_masks(jnp.ones((1, 3, 3)), [-0.1, 1]), "fractions must lie"),
    (lambda: perturb.soft_deletion_masks(jnp.ones((1, 3, 3)), [0.5, 0.2]), "increasing"),
    (lambda: perturb.pool_to_grid(jnp.ones((1, 8, 8)), 9), "grid must be <="),
    (lambda: perturb.pool_to_grid(jnp.ones((8, 8)), 4), "maps must have shape"),
    (lambda: perturb.hard_deletion_masks(jnp.ones((1, 8, 8)), [0, 1], unit=3), "must divide"),
    (lambda: perturb.hard_deletion_masks(jnp.full((1, 4, 4), jnp.nan), [0, 1]), "finite"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
