"""ResNet targets: torchvision / timm ResNet-18 and -50 (ImageNet), the UvA CIFAR-10 ResNet.

Two architectures, each ported with the padding of the framework its weights were trained in
(shared/README.md: the wrong one drops the CIFAR ResNet's top-1 from 0.8255 to 0.7475):

- `ResNet`: torchvision's ResNet v1.5 (the stride sits on the 3x3 conv of the bottleneck), one
  module for BasicBlock and Bottleneck variants, with PyTorch's explicit symmetric padding: the 7x7
  stem pads 3, every 3x3 conv pads 1, the 3x3/2 max-pool pads 1 with -inf. Its submodules carry
  torchvision's names ('layer2.0.downsample.1' -> 'layer2_0/downsample_1'), so a `.safetensors`
  state dict from torchvision or timm maps onto it key by key.
- `CifarResNet`: the Flax ResNet of the UvA deep-learning tutorials, trained with Flax 'SAME'
  padding; its submodules carry the names in the checkpoint ('ResNetBlock_3/Conv_2').

BatchNorm runs in inference mode with the running statistics, eps 1e-5 (PyTorch's and Flax's
default). 'levels' are the outputs of the stages: strides 4, 8, 16, 32 for the ImageNet ResNets,
1, 2, 4 for the CIFAR one.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax.targets import base

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
BN_EPS = 1e-5

WEIGHTS_FIELD = "config.target.weights"
CIFAR_WEIGHTS_EXAMPLE = "../shared/weights/uva_cifar10_resnet.msgpack"


def _torch_pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's `padding=kernel // 2`: the same on both sides, whatever the stride (Flax 'SAME'
  would pad a stride-2 3x3 conv (0, 1) and shift every feature map by one pixel)."""
  p = kernel // 2
  return ((p, p), (p, p))


def _layers(dtype) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
  """Conv and inference BatchNorm factories computing in `dtype` with float32 parameters."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32)
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPS, dtype=dtype,
                           param_dtype=jnp.float32)
  return conv, norm


def _perturb_spatial(module: nn.Module, x):
  """x through `module.perturb('spatial', .)`: d logit / d spatial is then the gradient with
  respect to a 'perturbations' collection passed to `apply` (Grad-CAM, baselines.py). Not at
  init: the perturbation's shape is the batch's, and templates hold only the real variables."""
  return x if module.is_initializing() else module.perturb("spatial", x)


# ----------------------------------------------------------------------------- ImageNet ResNets


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs; f[B, H, W, C] -> f[B, H/s, W/s, filters]."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    conv, norm = _layers(self.dtype)
    y = conv(self.filters, (3, 3), self.strides, padding=_torch_pad(3), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), padding=_torch_pad(3), name="conv2")(y)
    y = norm(name="bn2")(y)
    return nn.relu(y + _shortcut(x, self.filters, self.strides, self.dtype))


class Bottleneck(nn.Module):
  """torchvision's Bottleneck v1.5 (stride on the 3x3 conv):
  f[B, H, W, C] -> f[B, H/s, W/s, 4 * filters]."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    conv, norm = _layers(self.dtype)
    y = conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), self.strides, padding=_torch_pad(3), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = norm(name="bn3")(y)
    return nn.relu(y + _shortcut(x, self.filters * 4, self.strides, self.dtype))


def _shortcut(x, filters: int, strides: int, dtype):
  """The identity, or torchvision's `downsample` (1x1 strided conv + BN) where the shape changes.

  Called inside the block's compact method, so its submodules belong to the block.
  """
  if strides == 1 and x.shape[-1] == filters:
    return x
  conv, norm = _layers(dtype)
  x = conv(filters, (1, 1), strides, padding="VALID", name="downsample_0")(x)
  return norm(name="downsample_1")(x)


class ResNet(nn.Module):
  """ResNet v1.5 in torchvision's layout; input NORMALISED images f[B, H, W, 3].

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: BasicBlock or Bottleneck.
    num_filters: width of the stem and of the first stage (64 in torchvision).
    num_classes: outputs of the fc head.
    dtype: the computation dtype; parameters stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  num_filters: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, x) -> dict[str, Any]:
    """x f[B, H, W, 3] -> {'logits': f32[B, classes], 'levels': the stage outputs (strides 4, 8,
    16, 32), 'spatial': the last stage output f[B, H/32, W/32, C]}."""
    conv, norm = _layers(self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = conv(self.num_filters, (7, 7), 2, padding=_torch_pad(7), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    # flax pads a max-pool with its -inf init value, as PyTorch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_torch_pad(3))
    levels = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, strides, self.dtype,
                           name=f"layer{i + 1}_{j}")(x)
      levels.append(x)
    x = _perturb_spatial(self, x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="fc")(pooled)
    return {"logits": logits.astype(jnp.float32), "levels": levels, "spatial": x}

  def __call__(self, x):
    """Logits f32[B, classes] of normalised images f[B, H, W, 3]."""
    return self.features(x)["logits"]


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# Test-only: one block per stage, narrow, so a NumPy reference forward takes milliseconds.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock,
                               num_filters=8, num_classes=10)
ResNetTinyBottleneck = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=Bottleneck,
                                         num_filters=8, num_classes=10)


# ----------------------------------------------------------------------------- torch weight import


def _torch_key_to_path(key: str) -> tuple[str, str]:
  """'layer2.0.downsample.1.running_var' -> ('batch_stats', 'layer2_0/downsample_1/var').

  A numeric part joins the name before it (how the modules are named); an unknown leaf keeps its
  name, so `match_variables` lists it as unexpected.
  """
  *parts, leaf = key.split(".")
  names: list[str] = []
  for p in parts:
    if p.isdigit() and names:
      names[-1] = f"{names[-1]}_{p}"
    else:
      names.append(p)
  collection, leaf = {"running_mean": ("batch_stats", "mean"),
                      "running_var": ("batch_stats", "var")}.get(leaf, ("params", leaf))
  return collection, "/".join(names + [leaf])


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A torchvision / timm ResNet state dict -> {'params', 'batch_stats'} for `ResNet`.

  Conv weights OIHW -> kernels HWIO, Linear weights [out, in] -> kernels [in, out], BN weight ->
  scale; `num_batches_tracked` (a training counter) is dropped. Shapes are not checked here.
  """
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    collection, path = _torch_key_to_path(key)
    value = np.asarray(value)
    head, _, leaf = path.rpartition("/")
    if leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    elif leaf == "weight" and value.ndim == 1:
      leaf = "scale"
    node = out.setdefault(collection, {})
    for name in head.split("/") if head else ():
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


def _template(model: nn.Module, size: tuple[int, int]) -> Any:
  """The model's variables as ShapeDtypeStructs (nothing computed)."""
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def load_torch_safetensors(model: nn.Module, path: str) -> dict[str, Any]:
  """Variables for the `ResNet` `model` from a torchvision / timm `.safetensors` state dict.

  Raises:
    ValueError when the file cannot be read, or listing the first missing keys, unexpected keys
    and shape mismatches against the architecture.
  """
  from safetensors.numpy import load_file
  try:
    state_dict = load_file(path)
  except Exception as e:  # safetensors raises its own error types for a non-safetensors file
    raise ValueError(f"cannot read {path!r} as a .safetensors state dict ({e}); a torch .pth "
                     f"file can be converted with safetensors.torch.save_file(torch.load(path), "
                     f"out)") from e
  variables = convert_torch_state_dict(state_dict)
  return dict(base.match_variables(_template(model, (64, 64)), variables, path))


def _check_source(name: str, weights: str | None, random_init: bool) -> None:
  if random_init and weights:
    raise ValueError(f"target {name!r}: pass either a weights file or random_init=True, not both")


def imagenet_target(name: str, model: ResNet, weights: str | None = None, *,
                    random_init: bool = False) -> base.Target:
  """A `Target` for the ImageNet `ResNet` `model`, filled from a torchvision / timm
  `.safetensors` file, or randomly with random_init=True."""
  _check_source(name, weights, random_init)
  if random_init:
    variables = base.random_variables(_template(model, (64, 64)))  # any size: same shapes
  else:
    path = base.require_file(weights, WEIGHTS_FIELD,
                             f"target {name!r} (a torchvision or timm .safetensors state dict)")
    variables = load_torch_safetensors(model, path)
  return base.Target(
      name=name, model=model, variables=variables, input_size=(224, 224), mean=IMAGENET_MEAN,
      std=IMAGENET_STD, head_path=("fc",),
      # torchvision's eval transform: Resize(256) (bilinear) then CenterCrop(224).
      preprocess=functools.partial(base.resize_and_crop, resize=256, crop=224,
                                   resample="bilinear"),
      class_names=None)


@base.register("resnet18")
def resnet18(weights: str | None = None, *, random_init: bool = False) -> base.Target:
  """torchvision / timm ResNet-18 from a `.safetensors` state dict."""
  return imagenet_target("resnet18", ResNet18(), weights, random_init=random_init)


@base.register("resnet50")
def resnet50(weights: str | None = None, *, random_init: bool = False) -> base.Target:
  """torchvision / timm ResNet-50 (v1.5) from a `.safetensors` state dict."""
  return imagenet_target("resnet50", ResNet50(), weights, random_init=random_init)


# ----------------------------------------------------------------------------- CIFAR-10 ResNet


class CifarBlock(nn.Module):
  """The UvA ResNetBlock: f[B, H, W, C] -> f[B, H/s, W/s, filters], s = 2 when subsampling."""
  filters: int
  subsample: bool = False
  padding: Any = "SAME"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv, norm = _layers(self.dtype)
    strides = 2 if self.subsample else 1
    z = conv(self.filters, (3, 3), strides, padding=self.padding, name="Conv_0")(x)
    z = nn.relu(norm(name="BatchNorm_0")(z))
    z = conv(self.filters, (3, 3), padding=self.padding, name="Conv_1")(z)
    z = norm(name="BatchNorm_1")(z)
    if self.subsample:
      x = conv(self.filters, (1, 1), strides, padding="VALID", use_bias=True, name="Conv_2")(x)
    return nn.relu(z + x)


class CifarResNet(nn.Module):
  """The UvA CIFAR-10 ResNet (shared/README.md); input NORMALISED images f[B, 32, 32, 3].

  Attributes:
    widths: channels of the stages.
    blocks_per_stage: blocks in each stage.
    num_classes: outputs of the head.
    padding: of the 3x3 convs; 'SAME' as in training. Symmetric ((1, 1), (1, 1)) is kept
      selectable only to measure the porting error it causes.
    dtype: the computation dtype; parameters stay float32.
  """
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  num_classes: int = 10
  padding: Any = "SAME"
  dtype: Any = jnp.float32

  @nn.compact
  def features(self, x) -> dict[str, Any]:
    """x f[B, H, W, 3] -> {'logits': f32[B, classes], 'levels': the stage outputs (strides 1, 2,
    4), 'spatial': the last stage output f[B, H/4, W/4, 64]}."""
    conv, norm = _layers(self.dtype)
    x = jnp.asarray(x, self.dtype)
    x = conv(self.widths[0], (3, 3), padding=self.padding, name="Conv_0")(x)
    x = nn.relu(norm(name="BatchNorm_0")(x))
    levels, index = [], 0
    for i, width in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        x = CifarBlock(width, subsample=i > 0 and j == 0, padding=self.padding, dtype=self.dtype,
                       name=f"ResNetBlock_{index}")(x)
        index += 1
      levels.append(x)
    x = _perturb_spatial(self, x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="Dense_0")(pooled)
    return {"logits": logits.astype(jnp.float32), "levels": levels, "spatial": x}

  def __call__(self, x):
    """Logits f32[B, classes] of normalised images f[B, H, W, 3]."""
    return self.features(x)["logits"]


def load_flax_msgpack(model: nn.Module, path: str, size: tuple[int, int]) -> dict[str, Any]:
  """Variables for `model` from a Flax msgpack of {'params', 'batch_stats'}, checked against the
  architecture (ValueError listing the first mismatches)."""
  from flax import serialization
  with open(path, "rb") as f:
    data = f.read()
  try:
    restored = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several error types for a file in another format
    raise ValueError(f"cannot read {path!r} as a Flax msgpack of {{'params', 'batch_stats'}} "
                     f"({e})") from e
  if not isinstance(restored, Mapping):
    raise ValueError(f"{path!r} holds a {type(restored).__name__}, not a Flax msgpack of "
                     f"{{'params', 'batch_stats'}}")
  return dict(base.match_variables(_template(model, size), restored, path))


def _cifar_preprocess(image: np.ndarray) -> np.ndarray:
  """Raw image -> f32[32, 32, 3] in [0, 1]: x / 255 as in training; other sizes are resized
  (bilinear) to exactly 32 x 32."""
  rgb = base.to_rgb_uint8(image)
  if rgb.shape[:2] == (32, 32):
    return rgb.astype(np.float32) / 255.0
  return base.resize_and_crop(rgb, resize=(32, 32), resample="bilinear")


@base.register("cifar_resnet")
def cifar_resnet(weights: str | None = None, *, random_init: bool = False) -> base.Target:
  """The UvA CIFAR-10 ResNet from its Flax msgpack (e.g. ../shared/weights/uva_cifar10_resnet
  .msgpack; ~0.82 top-1 on shared/data/cifar10_test_8k.npz)."""
  _check_source("cifar_resnet", weights, random_init)
  model = CifarResNet()
  if random_init:
    variables = base.random_variables(_template(model, (32, 32)))
  else:
    path = base.require_file(weights, WEIGHTS_FIELD,
                             f"target 'cifar_resnet' (a Flax msgpack, e.g. "
                             f"{CIFAR_WEIGHTS_EXAMPLE})")
    variables = load_flax_msgpack(model, path, (32, 32))
  return base.Target(
      name="cifar_resnet", model=model, variables=variables, input_size=(32, 32),
      mean=CIFAR10_MEAN, std=CIFAR10_STD, head_path=("Dense_0",), preprocess=_cifar_preprocess,
      class_names=CIFAR10_CLASSES)
