"""The explainer decoder: shapes on ViT and CNN backbones, frozen target, class conditioning,
the class evidence input against a float64 NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r_jax import explainer as ex
from l2r_jax import targets


@pytest.fixture(scope="module", params=[("vit_tiny_p4_28", False), ("cifar_resnet", False),
                                        ("vit_tiny_p4_28", True), ("cifar_resnet", True)],
                ids=["vit", "resnet", "vit-evidence", "resnet-evidence"])
def setup(request):
  name, evidence = request.param
  target = targets.create(name, random_init=True)
  h, w = target.input_size
  images = jax.random.uniform(jax.random.key(0), (2, h, w, 3))
  classes = jnp.asarray([1, 7], jnp.int32)
  model = ex.Explainer(width=16, class_evidence=evidence)
  params = ex.init(model, jax.random.key(1), target, target.variables, images, classes)
  return target, images, classes, model, params


def test_full_resolution_map(setup):
  target, images, classes, model, params = setup
  maps = ex.explain(model, params, target, target.variables, images, classes)
  assert maps.shape == images.shape[:3] and maps.dtype == jnp.float32
  assert bool(jnp.isfinite(maps).all()) and float(maps.std()) > 0


def test_gradients_reach_the_decoder_only(setup):
  target, images, classes, model, params = setup

  def loss(params, target_variables):
    return jnp.sum(ex.explain(model, params, target, target_variables, images, classes) ** 2)

  g_params, g_target = jax.grad(loss, argnums=(0, 1))(params, target.variables)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_params)) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_target))


def test_the_class_changes_the_map(setup):
  target, images, classes, model, params = setup
  a = ex.explain(model, params, target, target.variables, images, classes)
  b = ex.explain(model, params, target, target.variables, images, (classes + 1) % 10)
  assert float(jnp.abs(a - b).max()) > 1e-6


def test_embedding_conditioning_and_bfloat16():
  target = targets.create("vit_tiny_p4_28", random_init=True)
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 3))
  classes = jnp.asarray([0, 3], jnp.int32)
  model = ex.Explainer(width=8, conditioning="embedding", num_classes=10, dtype=jnp.bfloat16)
  params = ex.init(model, jax.random.key(1), target, target.variables, images, classes)
  assert "embedding" in params["params"]
  maps = ex.explain(model, params, target, target.variables, images, classes)
  assert maps.shape == (2, 28, 28) and maps.dtype == jnp.float32


def test_bad_input():
  model = ex.Explainer(width=8)
  levels = [jnp.zeros((2, 7, 7, 4))]
  with pytest.raises(ValueError, match="class_vectors must have shape f32\\[2, D\\]"):
    model.init(jax.random.key(0), levels, (28, 28), class_vectors=jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="needs class_vectors"):
    model.init(jax.random.key(0), levels, (28, 28))
  with pytest.raises(ValueError, match="levels\\[0\\] must have shape"):
    model.init(jax.random.key(0), [jnp.zeros((2, 7, 7))], (28, 28),
               class_vectors=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="conditioning must be one of"):
    ex.Explainer(conditioning="film").init(jax.random.key(0), levels, (28, 28),
                                           class_vectors=jnp.zeros((2, 5)))


def test_a_separate_backbone_feeds_the_decoder():
  # A 32 px CNN backbone explaining a 28 px ViT target: its features come from the images resized
  # to 32 px, the class vectors still from the target's head.
  target = targets.create("vit_tiny_p4_28", random_init=True)
  backbone = targets.create("cifar_resnet", random_init=True)
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 3))
  classes = jnp.asarray([1, 7], jnp.int32)
  model = ex.Explainer(width=8)
  params = ex.init(model, jax.random.key(1), target, target.variables, images, classes, backbone,
                   backbone.variables)
  # The decoder's stages match the backbone's three levels (16, 32, 64 channels), not the ViT's.
  assert params["params"]["stage0"]["features"]["kernel"].shape == (1, 1, 16, 8)
  assert params["params"]["stage2"]["features"]["kernel"].shape == (1, 1, 64, 8)
  maps = ex.explain(model, params, target, target.variables, images, classes, backbone,
                    backbone.variables)
  assert maps.shape == (2, 28, 28)

  def loss(params, backbone_variables):
    return jnp.sum(ex.explain(model, params, target, target.variables, images, classes, backbone,
                              backbone_variables) ** 2)

  g_params, g_backbone = jax.grad(loss, argnums=(0, 1))(params, backbone.variables)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_params)) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_backbone))


def _cam_reference(spatial, rows, classes):
  """float64 NumPy: spatial . row of the class, standardised over positions per image."""
  spatial = np.asarray(spatial, np.float64)
  rows = np.asarray(rows, np.float64)[np.asarray(classes)]
  cam = np.stack([spatial[i] @ rows[i] for i in range(len(rows))])
  cam -= cam.mean(axis=(1, 2), keepdims=True)
  return cam / cam.std(axis=(1, 2), keepdims=True)


def test_class_evidence_is_the_targets_standardised_cam():
  target = targets.create("cifar_resnet", random_init=True)
  images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  classes = jnp.asarray([0, 4, 9], jnp.int32)
  feats = target.features(target.variables, images)
  rows, bias = target.head(target.variables)
  # 'spatial' is what the head average-pools: its CAM's mean over positions is the class logit.
  spatial = np.asarray(feats["spatial"], np.float64)
  logits = spatial.mean(axis=(1, 2)) @ np.asarray(rows, np.float64).T + np.asarray(bias)
  np.testing.assert_allclose(logits, feats["logits"], rtol=1e-4, atol=1e-4)
  got = ex.class_evidence(feats["spatial"], jnp.take(rows, classes, axis=0))
  want = _cam_reference(feats["spatial"], rows, classes)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # With the decoder's own output zeroed and the map at the evidence's size, the explainer's map
  # is exactly evidence_scale (1 at init) x the evidence.
  model = ex.Explainer(width=8, class_evidence=True)
  levels = feats["levels"]
  vectors = jnp.take(rows, classes, axis=0)
  params = model.init(jax.random.key(1), levels, (8, 8), class_vectors=vectors, evidence=got)
  out = params["params"]["out"]
  params["params"]["out"] = jax.tree.map(jnp.zeros_like, out)
  assert float(params["params"]["evidence_scale"]) == 1.0
  maps = model.apply(params, levels, (8, 8), class_vectors=vectors, evidence=got)
  np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-4)
  # ... and explain() at the input size is that map upsampled: its pixel ranking follows the CAM.
  full = ex.explain(model, params, target, target.variables, images, classes)
  assert full.shape == (3, 32, 32)
  pooled = np.asarray(full).reshape(3, 8, 4, 8, 4).mean(axis=(2, 4))
  for i in range(3):
    assert np.corrcoef(pooled[i].ravel(), want[i].ravel())[0, 1] > 0.9


def test_class_evidence_bad_input():
  levels = [jnp.zeros((2, 7, 7, 4))]
  vectors = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="class_evidence=True needs evidence"):
    ex.Explainer(width=8, class_evidence=True).init(jax.random.key(0), levels, (28, 28),
                                                    class_vectors=vectors)
  with pytest.raises(ValueError, match="evidence must have shape f32\\[2, h, w\\]"):
    ex.Explainer(width=8, class_evidence=True).init(jax.random.key(0), levels, (28, 28),
                                                    class_vectors=vectors,
                                                    evidence=jnp.zeros((3, 7, 7)))
  with pytest.raises(ValueError, match="class_evidence=False"):
    ex.Explainer(width=8).init(jax.random.key(0), levels, (28, 28), class_vectors=vectors,
                               evidence=jnp.zeros((2, 7, 7)))
  with pytest.raises(ValueError, match="class_vectors must have shape f32\\[2, 4\\]"):
    ex.class_evidence(jnp.zeros((2, 7, 7, 4)), jnp.zeros((2, 5)))
  # A constant map has no evidence anywhere: zeros, not NaN.
  flat = ex.class_evidence(jnp.ones((1, 3, 3, 2)), jnp.ones((1, 2)))
  assert float(jnp.abs(flat).max()) == 0.0
