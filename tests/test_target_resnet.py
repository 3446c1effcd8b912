"""ResNet targets: torch-layout import against an independent NumPy forward pass, the real CIFAR-10
ResNet against its accuracy on real test images, and the error messages a user can meet.

The synthetic state dicts carry torchvision's real key names and shapes, written here from
torchvision's definition (and pinned by its published parameter counts), not from the module.
"""
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import save_file

from l2r_jax.targets import base, resnet

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_WEIGHTS = SHARED / "weights" / "uva_cifar10_resnet.msgpack"
CIFAR_DATA = SHARED / "data" / "cifar10_test_8k.npz"
needs_shared = pytest.mark.skipif(
    not (CIFAR_WEIGHTS.is_file() and CIFAR_DATA.is_file()),
    reason=f"needs the real CIFAR-10 ResNet and test images under {SHARED} (absent here)")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- torchvision layout


def torchvision_shapes(stage_sizes, bottleneck, width=64, classes=1000):
  """{key: shape} of torchvision.models.ResNet(block, stage_sizes, classes) with base width
  `width`, written from torchvision's resnet.py (v1.5: stride on the 3x3 conv)."""
  shapes = {}

  def conv(name, out, inp, k):
    shapes[f"{name}.weight"] = (out, inp, k, k)

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  expansion = 4 if bottleneck else 1
  conv("conv1", width, 3, 7)
  bn("bn1", width)
  inplanes = width
  for i, n in enumerate(stage_sizes):
    planes = width * 2**i
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      p = f"layer{i + 1}.{j}"
      if bottleneck:
        conv(f"{p}.conv1", planes, inplanes, 1)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3)
        bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", planes * 4, planes, 1)
        bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1", planes, inplanes, 3)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3)
        bn(f"{p}.bn2", planes)
      if stride != 1 or inplanes != planes * expansion:
        conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  shapes["fc.weight"] = (classes, inplanes)
  shapes["fc.bias"] = (classes,)
  return shapes


def random_state_dict(shapes, seed=0):
  """Random values of moderate scale, so logits stay O(1..10) through the whole network."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in shapes.items():
    leaf = key.rsplit(".", 1)[1]
    if leaf == "num_batches_tracked":
      v = np.array(rng.integers(0, 1000), np.int64)
    elif leaf == "running_var":
      v = rng.uniform(0.5, 2.0, shape)
    elif leaf == "running_mean":
      v = rng.normal(0.0, 0.2, shape)
    elif leaf == "weight" and len(shape) == 1:
      v = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias":
      v = rng.normal(0.0, 0.1, shape)
    else:
      v = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
    sd[key] = np.asarray(v, np.int64 if leaf == "num_batches_tracked" else np.float32)
  return sd


def num_params(shapes):
  return sum(int(np.prod(s)) for k, s in shapes.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_synthetic_layouts_match_torchvision_parameter_counts():
  # torchvision's published counts: a wrong shape in the generator would change them.
  assert num_params(torchvision_shapes((2, 2, 2, 2), False)) == 11_689_512
  assert num_params(torchvision_shapes((3, 4, 6, 3), True)) == 25_557_032


# ----------------------------------------------------------------------------- NumPy reference


def np_conv(x, w, stride, pad):
  """x f64[B, H, W, C], w [O, I, kh, kw] (PyTorch), symmetric zero padding `pad`."""
  _, _, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[0]))
  for dy in range(kh):
    for dx in range(kw):
      patch = x[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
      out += np.einsum("bhwi,oi->bhwo", patch, w[:, :, dy, dx])
  return out


def np_maxpool_3x3_s2_p1(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, dy:dy + 2 * (oh - 1) + 1:2, dx:dx + 2 * (ow - 1) + 1:2]
                 for dy in range(3) for dx in range(3)], axis=0)


def np_resnet_forward(sd, x):
  """torchvision ResNet forward from the raw state dict, float64: returns (logits, stage outputs).
  """
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def bn(name, y):
    return ((y - sd[f"{name}.running_mean"]) / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
            * sd[f"{name}.weight"] + sd[f"{name}.bias"])

  relu = lambda y: np.maximum(y, 0.0)  # noqa: E731
  y = relu(bn("bn1", np_conv(np.asarray(x, np.float64), sd["conv1.weight"], 2, 3)))
  y = np_maxpool_3x3_s2_p1(y)
  stages = []
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      p = f"layer{i}.{j}"
      s = 2 if i > 1 and j == 0 else 1
      if f"{p}.conv3.weight" in sd:
        z = relu(bn(f"{p}.bn1", np_conv(y, sd[f"{p}.conv1.weight"], 1, 0)))
        z = relu(bn(f"{p}.bn2", np_conv(z, sd[f"{p}.conv2.weight"], s, 1)))
        z = bn(f"{p}.bn3", np_conv(z, sd[f"{p}.conv3.weight"], 1, 0))
      else:
        z = relu(bn(f"{p}.bn1", np_conv(y, sd[f"{p}.conv1.weight"], s, 1)))
        z = bn(f"{p}.bn2", np_conv(z, sd[f"{p}.conv2.weight"], 1, 1))
      if f"{p}.downsample.0.weight" in sd:
        y = bn(f"{p}.downsample.1", np_conv(y, sd[f"{p}.downsample.0.weight"], s, 0))
      y = relu(z + y)
      j += 1
    stages.append(y)
  logits = y.mean(axis=(1, 2)) @ sd["fc.weight"].T + sd["fc.bias"]
  return logits, stages


def _images(shape, seed):
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _assert_close(got, want, what):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  scale = max(1.0, float(np.max(np.abs(want))))
  assert err <= 1e-4 * scale, f"{what}: max |error| {err:.3g} against NumPy (scale {scale:.3g})"
  return err


# ----------------------------------------------------------------------------- torch import


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  sd = random_state_dict(torchvision_shapes((2, 2, 2, 2), False), seed=1)
  path = tmp_path_factory.mktemp("resnet18") / "model.safetensors"
  save_file(sd, str(path))
  return sd, str(path)


def test_resnet18_import_matches_numpy_forward(resnet18_file):
  sd, path = resnet18_file
  target = base.create("resnet18", path)
  images = _images((2, 64, 64, 3), seed=2)
  want, stages = np_resnet_forward(sd, (images - IMAGENET_MEAN) / IMAGENET_STD)
  feats = target.features(target.variables, jnp.asarray(images))
  err = _assert_close(feats["logits"], want, "resnet18 logits")
  print(f"\nresnet18 synthetic import: max |logit error| vs NumPy {err:.2e} "
        f"(logits up to {np.abs(want).max():.2f})")
  _assert_close(target.apply(target.variables, jnp.asarray(images)), want, "resnet18 apply")
  for k, (got, ref) in enumerate(zip(feats["levels"], stages)):
    assert got.shape == ref.shape, f"level {k}: expected {ref.shape}, got {got.shape}"
    _assert_close(got, ref, f"resnet18 level {k}")
  assert feats["spatial"].shape == (2, 2, 2, 512)
  rows, bias = target.head(target.variables)
  np.testing.assert_array_equal(rows, sd["fc.weight"])
  np.testing.assert_array_equal(bias, sd["fc.bias"])


@pytest.mark.parametrize("variant,bottleneck", [(resnet.ResNetTiny, False),
                                                (resnet.ResNetTinyBottleneck, True)])
def test_tiny_variants_match_numpy_forward(tmp_path, variant, bottleneck):
  sd = random_state_dict(torchvision_shapes((1, 1, 1, 1), bottleneck, width=8, classes=10), 3)
  path = tmp_path / "tiny.safetensors"
  save_file(sd, str(path))
  # 37 x 45: odd sizes, where PyTorch and 'SAME' padding of the strided layers differ most.
  target = resnet.imagenet_target("tiny", variant(), str(path))
  images = _images((2, 37, 45, 3), seed=4)
  want, stages = np_resnet_forward(sd, (images - IMAGENET_MEAN) / IMAGENET_STD)
  feats = target.features(target.variables, jnp.asarray(images))
  _assert_close(feats["logits"], want, "tiny logits")
  assert [f.shape for f in feats["levels"]] == [s.shape for s in stages]


def test_resnet50_converter_gives_exactly_the_module_variables():
  sd = {k: np.zeros(s, np.int64 if k.endswith("num_batches_tracked") else np.float32)
        for k, s in torchvision_shapes((3, 4, 6, 3), True).items()}
  converted = resnet.convert_torch_state_dict(sd)
  model = resnet.ResNet50()
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  flat = lambda t: {jax.tree_util.keystr(p): tuple(np.shape(v))  # noqa: E731
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  assert flat(converted) == flat(template)
  assert flat(converted)["['params']['layer4_0']['conv2']['kernel']"] == (3, 3, 512, 512)


def test_wrong_shape_is_listed(resnet18_file, tmp_path):
  sd, _ = resnet18_file
  sd = dict(sd, **{"fc.weight": np.zeros((10, 512), np.float32),
                   "fc.bias": np.zeros((10,), np.float32)})
  path = tmp_path / "wrong.safetensors"
  save_file(sd, str(path))
  with pytest.raises(ValueError, match=r"fc/kernel: expected \(512, 1000\), file has \(512, 10\)"):
    base.create("resnet18", str(path))


def test_missing_and_unexpected_keys_are_listed(resnet18_file, tmp_path):
  sd, _ = resnet18_file
  sd = {k: v for k, v in sd.items() if k != "layer2.0.downsample.1.running_var"}
  sd["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  path = tmp_path / "missing.safetensors"
  save_file(sd, str(path))
  with pytest.raises(ValueError) as info:
    base.create("resnet18", str(path))
  msg = str(info.value)
  assert "missing: batch_stats/layer2_0/downsample_1/var" in msg, msg
  assert "unexpected: params/layer5_0/conv1/kernel" in msg, msg
  assert str(path) in msg, msg


def test_weights_file_errors(tmp_path):
  for name in ("resnet18", "resnet50", "cifar_resnet"):
    with pytest.raises(ValueError, match="config.target.weights"):
      base.create(name)
    with pytest.raises(ValueError, match="config.target.weights"):
      base.create(name, str(tmp_path / "absent.file"))
  with pytest.raises(ValueError, match="uva_cifar10_resnet.msgpack"):
    base.create("cifar_resnet")
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"\x00not a weights file at all")
  for name in ("resnet18", "cifar_resnet"):
    with pytest.raises(ValueError, match="cannot read"):
      base.create(name, str(junk))
  with pytest.raises(ValueError, match="not both"):
    base.create("resnet18", str(junk), random_init=True)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name,size,strides", [("resnet18", 224, (4, 8, 16, 32)),
                                               ("resnet50", 224, (4, 8, 16, 32)),
                                               ("cifar_resnet", 32, (1, 2, 4))])
def test_family_outputs_and_level_strides(name, size, strides):
  target = base.create(name, random_init=True)
  assert target.input_size == (size, size)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(target.variables))
  base.check_family_outputs(target)
  # Shapes and dtypes only: eval_shape runs nothing (a 224 x 224 forward costs seconds on a CPU).
  for dtype in (jnp.float32, jnp.bfloat16):
    low = target.with_dtype(dtype)
    feats = jax.eval_shape(low.features, low.variables, jnp.zeros((2, size, size, 3)))
    got = [size // f.shape[1] for f in feats["levels"]]
    assert got == list(strides), f"{name}: level strides {got}, expected {list(strides)}"
    assert feats["spatial"].shape == feats["levels"][-1].shape
    assert feats["spatial"].dtype == dtype, f"{name}: features in {feats['spatial'].dtype}"
    assert feats["logits"].dtype == jnp.float32


def test_preprocessing():
  rng = np.random.default_rng(5)
  imagenet = base.create("resnet18", random_init=True)
  out = imagenet.preprocess(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  cifar = base.create("cifar_resnet", random_init=True)
  raw = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(cifar.preprocess(raw), raw.astype(np.float32) / 255.0)
  assert cifar.preprocess(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).shape == (32, 32, 3)
  assert cifar.class_names[:3] == ("airplane", "automobile", "bird") and cifar.num_classes == 10


# ----------------------------------------------------------------------------- real CIFAR weights


def _correct(target, images, labels, batch=1000):
  """bool[N]: whether the jitted target's top-1 class is the label, batch by batch."""
  fn = jax.jit(target.apply)
  preds = [np.argmax(np.asarray(fn(target.variables, jnp.asarray(images[i:i + batch]))), -1)
           for i in range(0, len(images), batch)]
  return np.concatenate(preds) == labels


@pytest.fixture(scope="module")
def cifar():
  data = np.load(CIFAR_DATA)
  images = data["images"].astype(np.float32) / 255.0
  target = base.create("cifar_resnet", str(CIFAR_WEIGHTS))
  start = time.perf_counter()
  correct = _correct(target, images, data["labels"])
  seconds = time.perf_counter() - start
  return target, images, data["labels"], correct, seconds


@needs_shared
def test_cifar_resnet_accuracy(cifar):
  target, images, labels, correct, seconds = cifar
  accuracy = correct.mean()
  print(f"\ncifar_resnet f32: top-1 {accuracy:.4f} on {len(images)} images in {seconds:.1f} s")
  assert accuracy >= 0.80, f"top-1 {accuracy:.4f} < 0.80: the port is wrong"
  assert tuple(np.load(CIFAR_DATA)["class_names"]) == target.class_names


@needs_shared
def test_cifar_resnet_symmetric_padding_scores_lower(cifar):
  # The porting trap of shared/README.md: PyTorch-style padding shifts every strided map.
  target, images, labels, correct, _ = cifar
  n = 2000
  same = correct[:n].mean()
  symmetric = dataclasses.replace(target, model=target.model.clone(padding=((1, 1), (1, 1))))
  sym = _correct(symmetric, images[:n], labels[:n]).mean()
  print(f"\ncifar_resnet on {n} images: 'SAME' {same:.4f}, symmetric {sym:.4f}")
  assert sym < same - 0.03


@needs_shared
def test_cifar_resnet_bfloat16(cifar):
  target, images, labels, correct, _ = cifar
  low = _correct(target.with_dtype(jnp.bfloat16), images, labels)
  agree = np.mean(low == correct)
  print(f"\ncifar_resnet bf16: top-1 {low.mean():.4f} (f32 {correct.mean():.4f}; "
        f"{agree:.4f} of the images judged alike)")
  assert abs(low.mean() - correct.mean()) <= 0.01


@needs_shared
def test_cifar_msgpack_mismatch_is_listed(tmp_path):
  variables = serialization.msgpack_restore(CIFAR_WEIGHTS.read_bytes())
  del variables["params"]["Dense_0"]["bias"]
  variables["params"]["ResNetBlock_3"]["Conv_2"]["kernel"] = np.zeros((1, 1, 16, 16), np.float32)
  path = tmp_path / "broken.msgpack"
  path.write_bytes(serialization.msgpack_serialize(variables))
  with pytest.raises(ValueError) as info:
    base.create("cifar_resnet", str(path))
  msg = str(info.value)
  assert "missing: params/Dense_0/bias" in msg, msg
  assert "ResNetBlock_3/Conv_2/kernel: expected (1, 1, 16, 32), file has (1, 1, 16, 16)" in msg
