"""The target interface: a frozen classifier and what the pipeline needs from it.

Every family (ViT, ResNet, EfficientNet-Lite) provides a linen module with two methods on
NORMALISED images x f[B, H, W, 3]:

  __call__(x) -> logits f32[B, classes]
  features(x) -> dict with
      'logits':     f32[B, classes]
      'levels':     list of frozen multi-level features, each f[B, h, w, C], shallow to deep
                    (the explainer's default backbone)
      'spatial':    the last spatial feature map f[B, h, w, C] that the head pools (Grad-CAM);
                    for a ViT the final token grid without the class token
      'attentions': (ViTs only) list over layers of attention probabilities f32[B, heads, T, T]

and a `dtype` field (the computation dtype; parameters stay float32). `Target` wraps the module
with its variables, its input normalisation and preprocessing, so callers pass [0, 1] pixel-space
images and never see the normalisation (perturbation references live in pixel space, METHOD.md).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax import checks

Array = jax.Array
Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Target:
  """A frozen classifier.

  Attributes:
    name: registry name, e.g. 'vit_b16'.
    model: the linen module (see the module docstring for its two methods).
    variables: its variables, {'params': ...} plus e.g. {'batch_stats': ...}; float32.
    input_size: (H, W) the model was trained at.
    mean, std: per-channel normalisation of [0, 1] pixels: x = (images - mean) / std.
    head_path: path in variables['params'] of the classifier's Dense ({'kernel': f[D, classes],
      'bias': f[classes]}).
    preprocess: raw image (uint8 or [0, 1] float, H x W x 3 or H x W) -> f32[*input_size, 3] in
      [0, 1], as the model's training did it (resize / crop).
    class_names: names of the classes where known.
  """
  name: str
  model: nn.Module
  variables: Variables
  input_size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  head_path: tuple[str, ...]
  preprocess: Callable[[np.ndarray], np.ndarray]
  class_names: tuple[str, ...] | None = None

  @property
  def dtype(self):
    return self.model.dtype

  @property
  def num_classes(self) -> int:
    return int(self.head(self.variables)[1].shape[0])

  def with_dtype(self, dtype) -> Target:
    """The same target computing in `dtype` (e.g. jnp.bfloat16); parameters stay float32."""
    return dataclasses.replace(self, model=self.model.clone(dtype=dtype))

  def normalize(self, images: Array) -> Array:
    """[0, 1] pixel-space images f32[B, H, W, 3] -> the model's input, in the compute dtype."""
    checks.rank(images, 4, "images", "f32[B, H, W, 3]")
    checks.floating(images, "images")
    if images.shape[-1] != 3:
      raise ValueError(f"images must have 3 channels (f32[B, H, W, 3]), got {images.shape}")
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

  def apply(self, variables: Variables, images: Array) -> Array:
    """Logits f32[B, classes] of [0, 1] pixel-space images f32[B, H, W, 3]."""
    return self.model.apply(variables, self.normalize(images)).astype(jnp.float32)

  def features(self, variables: Variables, images: Array) -> dict[str, Any]:
    """The module's `features` dict (see the module docstring) for [0, 1] images."""
    return self.model.apply(variables, self.normalize(images), method="features")

  def apply_fn(self, variables: Variables | None = None) -> Callable[[Array], Array]:
    """images -> logits with variables bound (the loaded ones by default), for objectives and
    metrics, which take a pure `apply_fn(images) -> logits`."""
    variables = self.variables if variables is None else variables
    return lambda images: self.apply(variables, images)

  def head(self, variables: Variables) -> tuple[Array, Array]:
    """The classifier head: (rows f32[classes, D], bias f32[classes]); row c is class c's weight
    vector (class conditioning of the explainer)."""
    node = variables["params"]
    for key in self.head_path:
      node = node[key]
    return jnp.asarray(node["kernel"]).T, jnp.asarray(node["bias"])


# ----------------------------------------------------------------------------- weight import


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def match_variables(template: Mapping[str, Any], loaded: Mapping[str, Any], source: str,
                    max_listed: int = 10) -> dict[str, Any]:
  """Checks converted weights against the architecture's variables and returns them as float32.

  Args:
    template: the architecture's variables (e.g. from `model.init` or `jax.eval_shape`): nested
      dicts of arrays or ShapeDtypeStructs.
    loaded: converted weights in the same nested layout, NumPy or JAX arrays.
    source: the file they came from, named in the error.
  Raises:
    ValueError listing the first `max_listed` missing keys, unexpected keys and shape mismatches.
  """
  want, got = _flatten(template), _flatten(loaded)
  missing = [k for k in want if k not in got]
  unexpected = [k for k in got if k not in want]
  shapes = [f"{k}: expected {tuple(want[k].shape)}, file has {tuple(np.shape(got[k]))}"
            for k in want if k in got and tuple(want[k].shape) != tuple(np.shape(got[k]))]
  if missing or unexpected or shapes:
    lines = [f"weights in {source} do not match the architecture "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape "
             f"mismatches):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
      lines += [f"  {title}: {item}" for item in items[:max_listed]]
      if len(items) > max_listed:
        lines.append(f"  ... and {len(items) - max_listed} more {title}")
    raise ValueError("\n".join(lines))
  return _unflatten({k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in got.items()})


def random_variables(template: Mapping[str, Any], seed: int = 0,
                     fan_in: Callable[[tuple[str, ...], tuple[int, ...]], int] | None = None,
                     special: Mapping[str, Callable[[np.random.Generator, tuple[int, ...]],
                                                    np.ndarray]] | None = None
                     ) -> dict[str, Any]:
  """Random float32 variables over a template of shapes, for tests and benchmarks.

  Kernels ~ N(0, 1 / fan_in) (LeCun normal, Flax's default; fan_in = every axis but the last
  unless `fan_in(path, shape)` says otherwise), 'scale' and 'var' ones, everything else zeros,
  and leaves named in `special` drawn by their function. Drawn with NumPy from the shapes alone:
  `model.init` compiles or runs the whole network (seconds to tens of seconds on a CPU), and
  throughput does not depend on the values.
  """
  rng = np.random.default_rng(seed)
  special = special or {}

  def draw(path, leaf):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    shape = tuple(leaf.shape)
    if keys[-1] in special:
      value = special[keys[-1]](rng, shape)
    elif keys[-1] == "kernel":
      n = fan_in(keys, shape) if fan_in else int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape, np.float32) / np.sqrt(n)
    else:
      value = np.full(shape, 1.0 if keys[-1] in ("scale", "var") else 0.0)
    return jnp.asarray(value, jnp.float32)

  return dict(jax.tree_util.tree_map_with_path(draw, dict(template)))


def require_file(path: str | None, field: str, what: str) -> str:
  """Returns path after checking it names an existing weights file; else a ValueError naming the
  config field to set. Nothing is ever downloaded."""
  return str(checks.existing_path(path, field, what, "file", noun="weights file"))


# ----------------------------------------------------------------------------- preprocessing


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3] from a uint8 or [0, 1] float image, grayscale (H x W or H x W x 1) -> RGB,
  RGBA -> RGB (alpha dropped)."""
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                     f"got {a.shape}")
  if a.dtype != np.uint8:
    if not np.issubdtype(a.dtype, np.floating):
      raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {a.dtype}")
    checks.in_range(a, 0.0, 1.0, "image")
    a = np.round(a * 255.0).astype(np.uint8)
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  return a[..., :3]


def resize_and_crop(image: np.ndarray, *, resize: int | tuple[int, int],
                    crop: int | tuple[int, int] | None = None,
                    resample: str = "bilinear") -> np.ndarray:
  """f32[h, w, 3] in [0, 1]: resize (int: the shorter side; (H, W): exactly), then centre-crop.

  Uses Pillow's resampling ('bilinear', 'bicubic', 'nearest', 'lanczos').
  """
  from PIL import Image
  filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}
  checks.choice(resample, tuple(filters), "resample")
  img = Image.fromarray(to_rgb_uint8(image))
  if isinstance(resize, int):
    w, h = img.size
    scale = resize / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
  else:
    size = (resize[1], resize[0])
  img = img.resize(size, filters[resample])
  out = np.asarray(img, np.float32) / 255.0
  if crop is not None:
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = out.shape[:2]
    if ch > h or cw > w:
      raise ValueError(f"crop {ch} x {cw} is larger than the resized image {h} x {w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    out = out[top:top + ch, left:left + cw]
  return out


# ----------------------------------------------------------------------------- registry

_FACTORIES: dict[str, Callable[..., Target]] = {}


def register(name: str):
  """Decorator: registers `factory(weights: str | None, **kwargs) -> Target` under `name`."""

  def wrap(factory):
    if name in _FACTORIES:
      raise ValueError(f"target {name!r} is registered twice")
    _FACTORIES[name] = factory
    return factory

  return wrap


def names() -> list[str]:
  """The registered target names."""
  return sorted(_FACTORIES)


def create(name: str, weights: str | None = None, *, dtype: Any = jnp.float32,
           **kwargs) -> Target:
  """The target `name` filled with the weights file `weights` (format by family), computing in
  `dtype`. Extra keyword arguments go to the family's factory (e.g. `random_init=True` for tests).
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown target {name!r}; registered targets: {names()}")
  return _FACTORIES[name](weights, **kwargs).with_dtype(dtype)


def check_family_outputs(target: Target) -> None:
  """Asserts the module contract on a zero batch (a helper for family tests)."""
  h, w = target.input_size
  x = jnp.zeros((2, h, w, 3), jnp.float32)
  feats = target.features(target.variables, x)
  for key in ("logits", "levels", "spatial"):
    assert key in feats, f"{target.name}: features() lacks {key!r}"
  assert feats["logits"].shape == (2, target.num_classes)
  assert all(f.ndim == 4 and f.shape[0] == 2 for f in feats["levels"])
  assert feats["spatial"].ndim == 4
