"""Attribution baselines: each method's definition against an independent float64 NumPy reference
on models whose answer is known (analytic gradients, exact integrated gradients of a quadratic,
Grad-CAM of a model linear in its spatial map, rollout of identity / uniform attention, RISE on a
one-quadrant model), plus shapes on real targets and the errors a user can meet."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r_jax import baselines as bl
from l2r_jax import targets
from l2r_jax.targets import base

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)
SMALL = bl.Options(ig_steps=4, smoothgrad_samples=4, rise_masks=16, batch_size=8)


# ----------------------------------------------------------------------------- analytic models


class Quadratic(nn.Module):
  """logits_c = sum(w_c * z) + sum(v_c * z^2) + b_c on normalised images z f[B, H, W, 3]; w and b
  are a Dense 'head' on the flattened image (kernel w reshaped to [H * W * 3, classes])."""
  num_classes: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, z):
    v = self.param("v", nn.initializers.zeros, (*z.shape[1:], self.num_classes))
    flat = jnp.reshape(z, (z.shape[0], -1))
    logits = (nn.Dense(self.num_classes, precision="highest", name="head")(flat)
              + jnp.einsum("bhwm,hwmc->bc", z * z, v, precision="highest"))
    return {"logits": logits, "levels": [z], "spatial": z}

  def __call__(self, z):
    return self.features(z)["logits"]


class LinearInSpatial(nn.Module):
  """A = tanh(4 x 4 mean-pool(z) @ p) f[B, h, w, K], passed through the Grad-CAM hook; logits =
  a Dense 'head' on the flattened A (kernel u reshaped to [h * w * K, classes]): linear in A."""
  num_classes: int = 3
  channels: int = 5
  pool_head: bool = False  # a CNN's head instead: the Dense on the mean of A over h, w
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, z):
    b, h, w, _ = z.shape
    pooled = jnp.mean(jnp.reshape(z, (b, h // 4, 4, w // 4, 4, 3)), axis=(2, 4))
    p = self.param("p", nn.initializers.zeros, (3, self.channels))
    a = jnp.tanh(jnp.einsum("bhwm,mk->bhwk", pooled, p, precision="highest"))
    if not self.is_initializing():
      a = self.perturb("spatial", a)
    logits = nn.Dense(self.num_classes, precision="highest", name="head")(
        jnp.mean(a, (1, 2)) if self.pool_head else jnp.reshape(a, (b, -1)))
    return {"logits": logits, "levels": [a], "spatial": a}

  def __call__(self, z):
    return self.features(z)["logits"]


class Quadrant(nn.Module):
  """Two classes: logits = [gain * (q - q0), 0], q the mean of the bottom-left quadrant (a Dense
  'head' with kernel [[gain, 0]] and bias [-gain * q0, 0] on q)."""
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, z):
    _, h, w, _ = z.shape
    q = jnp.mean(z[:, h // 2:, :w // 2], axis=(1, 2, 3))
    logits = nn.Dense(2, name="head")(q[:, None])
    return {"logits": logits, "levels": [z], "spatial": z}

  def __call__(self, z):
    return self.features(z)["logits"]


def make_target(model, params, size, mean=MEAN, std=STD):
  return base.Target(name=type(model).__name__, model=model,
                     variables={"params": jax.tree.map(jnp.asarray, params)}, input_size=size,
                     mean=mean, std=std, head_path=("head",), preprocess=None)


def f32(a):
  """a rounded to float32 and back to float64: the reference uses the model's exact weights."""
  return np.asarray(a, np.float32).astype(np.float64)


def quadratic(seed=0, size=(8, 12), linear=False):
  """(target, w f64[H, W, 3, 3], v f64[H, W, 3, 3]) of a random Quadratic on a non-square
  image."""
  rng = np.random.default_rng(seed)
  shape = (*size, 3, 3)
  w = f32(rng.standard_normal(shape) * 0.3)
  v = np.zeros(shape) if linear else f32(rng.standard_normal(shape) * 0.3)
  params = {"v": v.astype(np.float32),
            "head": {"kernel": w.reshape(-1, 3).astype(np.float32),
                     "bias": rng.standard_normal(3).astype(np.float32)}}
  return make_target(Quadratic(), params, size), w, v


def images_for(size, batch=2, seed=1):
  return jax.random.uniform(jax.random.key(seed), (batch, *size, 3), jnp.float32)


def quadratic_gradient(x, w, v, c):
  """d logit_c / d x in float64 for images x f64[H, W, 3] of the quadratic model."""
  mean, std = np.asarray(MEAN), np.asarray(STD)
  z = (x - mean) / std
  return (w[..., c] + 2.0 * v[..., c] * z) / std


def numpy_upsample(maps, size):
  """Bilinear resize f64[B, h, w] -> [B, H, W], half-pixel centres, edges clamped (cv2's)."""

  def weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - (src - lo)
    m[np.arange(n_out), hi] += src - lo
    return m

  rows, cols = weights(maps.shape[1], size[0]), weights(maps.shape[2], size[1])
  return np.einsum("Hh,bhw,Ww->bHW", rows, maps, cols)


# ----------------------------------------------------------------------------- gradients


def test_gradient_and_gradient_x_input_match_the_analytic_gradient():
  target, w, v = quadratic()
  x = images_for((8, 12))
  classes = jnp.asarray([2, 0], jnp.int32)
  sal = bl.attribute("gradient", target, target.variables, x, classes)
  gxi = bl.attribute("gradient_x_input", target, target.variables, x, classes)
  xs = np.asarray(x, np.float64)
  for i, c in enumerate(np.asarray(classes)):
    g = quadratic_gradient(xs[i], w, v, c)
    np.testing.assert_allclose(np.asarray(sal[i]), np.abs(g).max(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gxi[i]), np.abs((g * xs[i]).sum(-1)), rtol=1e-5,
                               atol=1e-6)
  assert sal.shape == (2, 8, 12) and sal.dtype == jnp.float32


def test_smoothgrad_of_a_linear_model_is_its_gradient():
  target, *_ = quadratic(linear=True)
  x = images_for((8, 12))
  classes = jnp.asarray([1, 2], jnp.int32)
  options = bl.Options(smoothgrad_samples=5, batch_size=3)
  smooth = bl.attribute("smoothgrad", target, target.variables, x, classes,
                        key=jax.random.key(0), options=options)
  plain = bl.attribute("gradient", target, target.variables, x, classes)
  np.testing.assert_allclose(np.asarray(smooth), np.asarray(plain), rtol=1e-5, atol=1e-7)


def test_smoothgrad_noise_follows_the_key_not_the_chunking():
  target, *_ = quadratic()
  x = images_for((8, 12))
  classes = jnp.asarray([1, 2], jnp.int32)

  def run(key, batch):
    return bl.attribute("smoothgrad", target, target.variables, x, classes,
                        key=jax.random.key(key),
                        options=bl.Options(smoothgrad_samples=7, batch_size=batch))

  a, b, c = run(0, 64), run(0, 3), run(1, 64)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(a - c).max()) > 1e-4
  plain = bl.attribute("gradient", target, target.variables, x, classes)
  assert float(jnp.abs(a - plain).max()) > 1e-4  # the noise matters for a quadratic


def test_per_image_keys_make_an_images_draw_independent_of_its_batch():
  """With keys[B], image b's random map and SmoothGrad map are what it gets alone with keys[b];
  one key is the same as the keys fold_in(key, b) by position. RISE takes one key only."""
  target, *_ = quadratic()
  x = images_for((8, 12), batch=3)
  classes = jnp.asarray([1, 2, 0], jnp.int32)
  keys = jax.random.split(jax.random.key(5), 3)
  options = bl.Options(smoothgrad_samples=5, batch_size=4)
  for method in ("random", "smoothgrad"):
    batch = bl.attribute(method, target, target.variables, x, classes, key=keys, options=options)
    for b in range(3):
      alone = bl.attribute(method, target, target.variables, x[b:b + 1], classes[b:b + 1],
                           key=keys[b:b + 1], options=options)
      np.testing.assert_allclose(np.asarray(batch[b]), np.asarray(alone[0]), rtol=1e-6,
                                 atol=1e-7, err_msg=f"{method} image {b}")
    assert float(jnp.abs(batch[0] - batch[1]).max()) > 1e-4, method  # different keys, draws
    key = jax.random.key(9)
    one = bl.attribute(method, target, target.variables, x, classes, key=key, options=options)
    folded = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(3))
    np.testing.assert_array_equal(
        np.asarray(one), np.asarray(bl.attribute(method, target, target.variables, x, classes,
                                                 key=folded, options=options)))
  u = bl.attribute("random", target, target.variables, x, classes, key=keys)
  np.testing.assert_array_equal(np.asarray(u[2]),
                                np.asarray(jax.random.uniform(keys[2], (8, 12), jnp.float32)))
  with pytest.raises(ValueError, match="'rise' shares one set of masks"):
    bl.attribute("rise", target, target.variables, x, classes, key=keys, options=SMALL)
  with pytest.raises(ValueError, match=r"one PRNG key or one per image \(keys\[3\]\)"):
    bl.attribute("random", target, target.variables, x, classes, key=keys[:2])
  with pytest.raises(ValueError, match="must be a PRNG key"):
    bl.attribute("random", target, target.variables, x, classes, key=jnp.zeros(3))
  raw = jax.random.PRNGKey(3)  # a raw uint32[2] key is one key, uint32[B, 2] one per image
  np.testing.assert_array_equal(
      np.asarray(bl.attribute("random", target, target.variables, x, classes,
                              key=jnp.stack([raw] * 3))[1]),
      np.asarray(jax.random.uniform(raw, (8, 12), jnp.float32)))


def test_smoothgrad_converges_to_its_expectation():
  # E over e ~ N(0, sigma^2) of max_m |d logit_c / d x_m (x + e)|, by float64 Monte Carlo.
  target, w, v = quadratic(seed=6)
  x = images_for((8, 12), batch=1, seed=7)
  c, sigma, n = 1, 0.15, 400
  got = bl.attribute("smoothgrad", target, target.variables, x, jnp.asarray([c], jnp.int32),
                     key=jax.random.key(0),
                     options=bl.Options(smoothgrad_samples=n, smoothgrad_sigma=sigma))[0]
  rng = np.random.default_rng(0)
  xs = np.asarray(x[0], np.float64)
  draws = np.stack([np.abs(quadratic_gradient(xs + sigma * rng.standard_normal(xs.shape), w, v,
                                              c)).max(-1) for _ in range(20000)])
  error = np.abs(np.asarray(got) - draws.mean(0))
  # n = 400 independent draws: a standard error of draws.std / 20 per pixel.
  assert error.mean() < 0.15 * draws.std(0).mean(), (error.mean(), draws.std(0).mean())


# ----------------------------------------------------------------------------- integrated gradients


@pytest.mark.parametrize("rule", bl.IG_RULES)
def test_integrated_gradients_are_exact_on_a_quadratic(rule):
  # Along the path a * x the gradient of a quadratic is linear in a: every rule integrates it
  # exactly, so IG_i = x_i / std_i * (w_i + 2 v_i (x_i / 2 - mean_i) / std_i) to rounding.
  target, w, v = quadratic(seed=3)
  x = images_for((8, 12), seed=4)
  classes = jnp.asarray([0, 2], jnp.int32)
  options = bl.Options(ig_steps=3, ig_rule=rule, batch_size=4)
  ig = bl.integrated_gradients(target, target.variables, x, classes, options)
  assert ig.shape == (2, 8, 12, 3) and ig.dtype == jnp.float32
  mean, std = np.asarray(MEAN), np.asarray(STD)
  xs = np.asarray(x, np.float64)
  # Completeness against the logits themselves.
  delta = np.asarray(jnp.take_along_axis(
      target.apply(target.variables, x) - target.apply(target.variables, jnp.zeros_like(x)),
      classes[:, None], axis=1)[:, 0])
  for i, c in enumerate(np.asarray(classes)):
    expected = xs[i] / std * (w[..., c] + 2 * v[..., c] * (xs[i] / 2 - mean) / std)
    np.testing.assert_allclose(np.asarray(ig[i]), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(ig[i].sum()), delta[i], rtol=1e-4, atol=1e-4)
  signed = bl.attribute("integrated_gradients_signed", target, target.variables, x, classes,
                        options=options)
  absolute = bl.attribute("integrated_gradients", target, target.variables, x, classes,
                          options=options)
  np.testing.assert_allclose(np.asarray(signed), np.asarray(ig.sum(-1)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(absolute), np.asarray(jnp.abs(ig).sum(-1)), rtol=1e-6,
                             atol=1e-7)


def test_ig_nodes():
  for rule in bl.IG_RULES:
    alphas, weights = bl.ig_nodes(5, rule)
    assert np.isclose(weights.sum(), 1.0) and alphas.min() >= 0 and alphas.max() <= 1
    # Each rule integrates a^2 over [0, 1] to 1/3 within its order.
    assert abs((weights * alphas**2).sum() - 1 / 3) < (0.02 if rule != "gausslegendre" else 1e-12)
  np.testing.assert_allclose(bl.ig_nodes(4)[0], [0.125, 0.375, 0.625, 0.875])


def test_ig_completeness_on_a_vit_converges_with_steps():
  target = targets.create("vit_tiny_p4_28", random_init=True)
  x = images_for((28, 28))
  classes = jnp.asarray([3, 8], jnp.int32)
  logits = target.apply(target.variables, x)
  base_logits = target.apply(target.variables, jnp.zeros_like(x))
  delta = np.asarray(jnp.take_along_axis(logits - base_logits, classes[:, None], 1)[:, 0])
  errors = []
  for steps in (2, 8, 32):
    ig = bl.integrated_gradients(target, target.variables, x, classes,
                                 bl.Options(ig_steps=steps, batch_size=16))
    errors.append(np.abs(np.asarray(ig.sum((1, 2, 3))) - delta).max())
  assert np.all(np.abs(delta) > 0.05), delta  # a real difference to explain
  assert errors[2] < errors[1] < errors[0], errors
  assert errors[2] < 0.01 * np.abs(delta).max(), (errors, delta)


def test_ig_does_not_depend_on_the_chunking():
  target = targets.create("vit_tiny_p4_28", random_init=True)
  x = images_for((28, 28), batch=3)
  classes = jnp.asarray([3, 8, 0], jnp.int32)
  a = bl.integrated_gradients(target, target.variables, x, classes,
                              bl.Options(ig_steps=5, batch_size=64))
  b = bl.integrated_gradients(target, target.variables, x, classes,
                              bl.Options(ig_steps=5, batch_size=4))  # 15 pairs in 4 chunks
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- Grad-CAM


def test_gradcam_is_the_channel_weighted_map_of_a_linear_head():
  rng = np.random.default_rng(5)
  size, k, classes_n = (16, 24), 5, 3  # a 4 x 6 spatial grid
  p, u = f32(rng.standard_normal((3, k))), f32(rng.standard_normal((4, 6, k, classes_n)))
  params = {"p": p.astype(np.float32),
            "head": {"kernel": u.reshape(-1, classes_n).astype(np.float32),
                     "bias": rng.standard_normal(classes_n).astype(np.float32)}}
  target = make_target(LinearInSpatial(), params, size)
  x = images_for(size)
  classes = jnp.asarray([2, 1], jnp.int32)
  cam = bl.attribute("gradcam", target, target.variables, x, classes)
  assert cam.shape == (2, 16, 24) and cam.dtype == jnp.float32

  z = (np.asarray(x, np.float64) - np.asarray(MEAN)) / np.asarray(STD)
  pooled = z.reshape(2, 4, 4, 6, 4, 3).mean(axis=(2, 4))
  a = np.tanh(pooled @ p)  # [B, 4, 6, K]
  expected = []
  for i, c in enumerate(np.asarray(classes)):
    weights = u[..., c].mean(axis=(0, 1))  # mean over h, w of d logit_c / d A_k
    expected.append(np.maximum((a[i] * weights).sum(-1), 0.0))
  expected = numpy_upsample(np.stack(expected), size)
  assert expected.max() > 0.1 and expected.min() == 0.0  # the relu bites somewhere
  np.testing.assert_allclose(np.asarray(cam), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vit_tiny_p4_28", "cifar_resnet", "resnet18",
                                  "efficientnet_lite0"])
def test_spatial_hook_sits_where_spatial_is_taken(name):
  target = targets.create(name, random_init=True)
  assert "perturbations" not in target.variables  # templates hold only the real variables
  h, w = (28, 28) if name == "vit_tiny_p4_28" else (32, 32)
  x = target.normalize(images_for((h, w), batch=1))

  def apply(v):
    return target.model.apply(v, x, method="features", mutable="perturbations")

  feats, state = jax.eval_shape(apply, target.variables)
  leaves = jax.tree_util.tree_leaves_with_path(state["perturbations"])
  assert [p[-1].key for p, _ in leaves] == ["spatial"]
  assert leaves[0][1].shape == feats["spatial"].shape
  if name in ("vit_tiny_p4_28", "cifar_resnet"):  # cheap enough to run: spatial + P comes out
    noise = jax.random.normal(jax.random.key(0), feats["spatial"].shape)
    perturbations = jax.tree.map(lambda _: noise, state["perturbations"])
    clean = target.model.apply(target.variables, x, method="features")
    moved = target.model.apply({**target.variables, "perturbations": perturbations}, x,
                               method="features")
    np.testing.assert_allclose(np.asarray(moved["spatial"]),
                               np.asarray(clean["spatial"] + noise), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(moved["logits"] - clean["logits"]).max()) > 1e-4


# ----------------------------------------------------------------------------- rollout


def numpy_rollout(attentions, discard=0.0):
  """Float64 rollout: prod_l normrows(0.5 I + 0.5 mean_heads(A_l)), class row over patches."""
  attentions = [np.asarray(a, np.float64) for a in attentions]
  b, _, t, _ = attentions[0].shape
  r = np.broadcast_to(np.eye(t), (b, t, t))
  for a in attentions:
    fused = a.mean(1)
    if discard:
      for i in range(b):
        flat = fused[i].reshape(-1)
        drop = np.argsort(flat, kind="stable")[:int(t * t * discard)]
        flat[drop[drop != 0]] = 0.0
        fused[i] = flat.reshape(t, t)
    m = 0.5 * np.eye(t) + 0.5 * fused
    m = m / m.sum(-1, keepdims=True)
    r = m @ r
  return r[:, 0, 1:]


def test_rollout_of_identity_and_uniform_attention():
  b, heads, (h, w), layers = 2, 3, (2, 3), 4
  t = 1 + h * w
  identity = [jnp.broadcast_to(jnp.eye(t), (b, heads, t, t))] * layers
  np.testing.assert_array_equal(np.asarray(bl.attention_rollout(identity, (h, w))),
                                np.zeros((b, h, w)))
  uniform = [jnp.full((b, heads, t, t), 1.0 / t)] * layers
  # 0.5 I + 0.5 U with U = 11^T / T idempotent: its L-th power is 0.5^L I + (1 - 0.5^L) U.
  np.testing.assert_allclose(np.asarray(bl.attention_rollout(uniform, (h, w))),
                             np.full((b, h, w), (1 - 0.5**layers) / t), rtol=1e-6)


@pytest.mark.parametrize("discard", [0.0, 0.3])
def test_rollout_matches_numpy(discard):
  b, heads, (h, w), layers = 2, 3, (2, 3), 3
  t = 1 + h * w
  logits = jax.random.normal(jax.random.key(0), (layers, b, heads, t, t)) * 2
  attentions = list(jax.nn.softmax(logits, axis=-1))
  got = bl.attention_rollout(attentions, (h, w), discard)
  expected = numpy_rollout(attentions, discard).reshape(b, h, w)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
  if discard:
    assert np.abs(expected - numpy_rollout(attentions).reshape(b, h, w)).max() > 1e-3


def test_rollout_on_a_vit_upsamples_the_attention_rollout_and_refuses_cnns():
  target = targets.create("vit_tiny_p4_28", random_init=True)
  x = images_for((28, 28))
  classes = jnp.asarray([0, 1], jnp.int32)
  maps = bl.attribute("rollout", target, target.variables, x, classes)
  attentions = target.features(target.variables, x)["attentions"]
  expected = numpy_upsample(numpy_rollout(attentions).reshape(2, 7, 7), (28, 28))
  np.testing.assert_allclose(np.asarray(maps), expected, rtol=1e-4, atol=1e-7)
  cnn = targets.create("cifar_resnet", random_init=True)
  with pytest.raises(ValueError, match="rollout is for ViTs only"):
    bl.attribute("rollout", cnn, cnn.variables, images_for((32, 32)), classes)


# ----------------------------------------------------------------------------- RISE


def test_rise_masks():
  masks = jax.vmap(lambda k: bl.rise_mask(k, (28, 20), grid=7, p=0.3))(
      jax.random.split(jax.random.key(0), 400))
  assert masks.shape == (400, 28, 20)
  assert float(masks.min()) >= 0 and float(masks.max()) <= 1
  assert abs(float(masks.mean()) - 0.3) < 0.02
  assert float(jnp.abs(masks[0] - masks[1]).max()) > 0.5  # random, not all alike
  # Bilinear between cells: neighbouring pixels differ by at most 1 / (cell size 4).
  assert float(jnp.abs(jnp.diff(masks, axis=1)).max()) <= 0.25 + 1e-6
  # The random shift: unshifted, pixel (0, 0) would sit on a cell's clamped edge and be 0 or 1.
  corner = np.asarray(masks[:, 0, 0])
  assert np.mean((corner > 0.01) & (corner < 0.99)) > 0.3


def test_rise_is_larger_in_the_quadrant_the_score_reads():
  size = (16, 24)
  # q0 = 0.27 ~ q under a p = 0.5 mask: the softmax works in its steep range, not saturated.
  params = {"head": {"kernel": np.asarray([[20.0, 0.0]], np.float32),
                     "bias": np.asarray([-20.0 * 0.27, 0.0], np.float32)}}
  target = make_target(Quadrant(), params, size, mean=(0.0,) * 3, std=(1.0,) * 3)
  x = 0.5 + 0.1 * images_for(size, batch=1)
  options = bl.Options(rise_masks=1000, rise_grid=4, batch_size=256)
  maps = bl.attribute("rise", target, target.variables, x, jnp.asarray([0], jnp.int32),
                      key=jax.random.key(0), options=options)
  assert maps.shape == (1, 16, 24) and maps.dtype == jnp.float32
  m = np.asarray(maps[0])
  inside = m[8:, :12]
  outside = np.concatenate([m[:8].ravel(), m[8:, 12:].ravel()])
  # Margins measured over 6 keys: >= 0.12 and >= 0.06.
  assert inside.mean() > outside.mean() + 0.05, (inside.mean(), outside.mean())
  assert m[10:, :8].min() > m[:4, 16:].max(), "the quadrant's core must beat the far corner"
  row, col = np.unravel_index(m.argmax(), m.shape)
  assert row >= 8 and col < 12, (row, col)


def test_cam_is_the_head_rows_map_and_gradcam_its_relu_for_a_pooling_head():
  rng = np.random.default_rng(6)
  size, k, classes_n = (16, 24), 5, 3  # a 4 x 6 spatial grid
  p, u = f32(rng.standard_normal((3, k))), f32(rng.standard_normal((k, classes_n)))
  bias = f32(rng.standard_normal(classes_n))
  params = {"p": p.astype(np.float32),
            "head": {"kernel": u.astype(np.float32), "bias": bias.astype(np.float32)}}
  target = make_target(LinearInSpatial(pool_head=True), params, size)
  x = images_for(size)
  classes = jnp.asarray([2, 0], jnp.int32)
  cam = bl.attribute("cam", target, target.variables, x, classes)
  gradcam = bl.attribute("gradcam", target, target.variables, x, classes)
  assert cam.shape == (2, 16, 24) and cam.dtype == jnp.float32

  z = (np.asarray(x, np.float64) - np.asarray(MEAN)) / np.asarray(STD)
  a = np.tanh(z.reshape(2, 4, 4, 6, 4, 3).mean(axis=(2, 4)) @ p)  # [B, 4, 6, K]
  low = np.stack([a[i] @ u[:, c] for i, c in enumerate(np.asarray(classes))])  # [B, 4, 6]
  # Its mean over positions is the class logit minus the bias.
  logits = np.asarray(target.apply(target.variables, x), np.float64)
  np.testing.assert_allclose(low.mean(axis=(1, 2)) + bias[np.asarray(classes)],
                             logits[[0, 1], np.asarray(classes)], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cam), numpy_upsample(low, size), rtol=1e-5, atol=1e-5)
  assert low.min() < 0 < low.max()  # so Grad-CAM's relu bites
  np.testing.assert_allclose(np.asarray(gradcam), numpy_upsample(np.maximum(low, 0), size) / 24,
                             rtol=1e-5, atol=1e-6)


def test_cam_needs_a_head_on_the_spatial_channels():
  rng = np.random.default_rng(5)
  params = {"p": rng.standard_normal((3, 5)).astype(np.float32),
            "head": {"kernel": rng.standard_normal((120, 3)).astype(np.float32),
                     "bias": np.zeros(3, np.float32)}}
  target = make_target(LinearInSpatial(), params, (16, 24))  # its head reads 4 x 6 x 5 values
  with pytest.raises(ValueError, match="head rows have width 120, its 'spatial' map 5 channels"):
    bl.attribute("cam", target, target.variables, images_for((16, 24)),
                 jnp.asarray([0, 1], jnp.int32))


# ----------------------------------------------------------------------------- real targets


@pytest.fixture(scope="module", params=["vit_tiny_p4_28", "cifar_resnet"])
def real(request):
  target = targets.create(request.param, random_init=True)
  return target, images_for(target.input_size), jnp.asarray([1, 7], jnp.int32)


@pytest.mark.parametrize("method", bl.METHODS)
def test_every_method_gives_finite_maps(real, method):
  target, x, classes = real
  if method == "rollout" and not target.name.startswith("vit"):
    pytest.skip("rollout is for ViTs (the CNN error is tested above)")
  maps = bl.attribute(method, target, target.variables, x, classes, key=jax.random.key(2),
                      options=SMALL)
  h, w = target.input_size
  assert maps.shape == (2, h, w), f"{method}: expected f32[2, {h}, {w}], got {maps.shape}"
  assert maps.dtype == jnp.float32
  assert bool(jnp.isfinite(maps).all()) and float(maps.std()) > 0
  if method in bl.STOCHASTIC:  # reproducible from the key
    again = bl.attribute(method, target, target.variables, x, classes, key=jax.random.key(2),
                         options=SMALL)
    np.testing.assert_array_equal(np.asarray(maps), np.asarray(again))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs():
  target, *_ = quadratic()
  x = images_for((8, 12))
  classes = jnp.asarray([0, 1], jnp.int32)
  v = target.variables
  with pytest.raises(ValueError, match="method must be one of .*'gradcam'.*got 'saliency'"):
    bl.attribute("saliency", target, v, x, classes)
  with pytest.raises(ValueError, match=r"images must have shape f32\[B, H, W, 3\]"):
    bl.attribute("gradient", target, v, x[0], classes)
  with pytest.raises(ValueError, match="3 channels"):
    bl.attribute("gradient", target, v, x[..., :1], classes)
  with pytest.raises(ValueError, match=r"images \(pixel space\) must lie in \[0.0, 1.0\]"):
    bl.attribute("gradient", target, v, x * 255, classes)
  with pytest.raises(ValueError, match=r"classes must have shape i32\[2\]"):
    bl.attribute("gradient", target, v, x, classes[:1])
  with pytest.raises(ValueError, match="classes must be an integer array"):
    bl.attribute("gradient", target, v, x, classes.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"has 3 classes\) must lie in \[0, 2\]"):
    bl.attribute("gradient", target, v, x, jnp.asarray([0, 3], jnp.int32))
  with pytest.raises(ValueError, match="pass key="):
    bl.attribute("rise", target, v, x, classes)
  with pytest.raises(ValueError, match="ig_steps must be an integer >= 1"):
    bl.Options(ig_steps=0)
  with pytest.raises(ValueError, match="ig_rule must be one of"):
    bl.Options(ig_rule="simpson")
  with pytest.raises(ValueError, match="rise_p must lie in"):
    bl.Options(rise_p=0.0)
  for sigma in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="smoothgrad_sigma must be a finite number >= 0"):
      bl.Options(smoothgrad_sigma=sigma)


def test_gradcam_needs_the_hook():
  target, *_ = quadratic()  # Quadratic has no self.perturb('spatial', .)
  with pytest.raises(ValueError, match="self.perturb\\('spatial'"):
    bl.attribute("gradcam", target, target.variables, images_for((8, 12)),
                 jnp.asarray([0, 1], jnp.int32))
