"""Vision Transformers (ViT, Dosovitskiy et al. 2021) as targets, and their weight import.

The module is the classic ViT: a patch-embedding conv (stride = patch), a class token, learned
position embeddings over [class token, patches], pre-LN encoder blocks (LayerNorm eps 1e-6,
multi-head self-attention, MLP with GELU), a final LayerNorm and a Dense head on the class token.
The attention is written out (q, k, v DenseGenerals, softmax(q k^T / sqrt(d))) so that its
probabilities can be returned for attention rollout.

Weights come from a file, the format chosen by its extension (nothing is ever downloaded):
  .npz          the official JAX layouts: google-research/vision_transformer
                (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...`,
                `Transformer/posembed_input/pos_embedding`) and google-research/big_vision
                (keys under `params/`, per-type numbered `MultiHeadDotProductAttention_0`,
                `MlpBlock_0`, `LayerNorm_1`, a root `pos_embedding` without the class token, and
                optionally scanned blocks `Transformer/encoderblock/...` stacked over depth);
  .safetensors  timm's `vit_*_patch16_224` state dict (`blocks.{i}.attn.qkv.weight`, ...);
  .msgpack      Flax serialisation of this module's own variables (`{'params': ...}`), e.g. from
                the project's own training of the small variants.

Two facts the import respects:
- The JAX checkpoints were trained with Flax's `nn.gelu`, whose default is the tanh
  approximation; timm (PyTorch `nn.GELU`) uses the exact erf form. A loaded module computes with
  the GELU of the framework its file comes from (`gelu_approximate`), so logits are the trained
  model's, not a close cousin's. Random-init and .msgpack modules keep the field's value.
- Position embeddings are not resampled: a file trained at another resolution (e.g. a fine-tune
  at 384 px) is refused with a ValueError naming both grids, since a resampled model is no longer
  the model the checkpoint reports accuracies for.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2r_jax.targets import base

Array = jax.Array

# The official / augreg checkpoints map [0, 1] pixels to [-1, 1].
HALF = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- the module


class SelfAttention(nn.Module):
  """Multi-head self-attention that also returns its probabilities.

  x f[B, T, D] -> (y f[B, T, D], probs f32[B, heads, T, T]); softmax in float32 whatever the
  compute dtype, so the returned rows sum to 1 in bfloat16 runs too.
  """
  num_heads: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                              dtype=self.dtype, precision=self.precision)
    q, k, v = (dense(name=n)(x) for n in ("query", "key", "value"))  # [B, T, heads, head_dim]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    probs = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v, precision=self.precision)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, precision=self.precision,
                        name="out")(y)
    return y, probs


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(width): f[B, T, D] -> f[B, T, D]."""
  mlp_dim: int
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
    y = nn.gelu(dense(self.mlp_dim, name="fc1")(x), approximate=self.gelu_approximate)
    return dense(x.shape[-1], name="fc2")(y)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + attn(norm1(x)), then + mlp(norm2(.)).

  Returns (x, attention probs, norm1(x)): the last is what Grad-CAM reads in a ViT.

  Attributes:
    spatial_grid: (h, w) of the patch tokens in the block whose norm1 output is the target's
      'spatial' map (the last); there the patch tokens, as a grid f[B, h, w, D], pass through
      `self.perturb('spatial', .)`, so d logit / d spatial is the gradient with respect to a
      'perturbations' collection passed to `apply` (Grad-CAM, baselines.py). None elsewhere.
  """
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  spatial_grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    normed = norm(name="norm1")(x)
    # Not at init: the perturbation's shape is the batch's, and templates (weight import, random
    # init) must hold only the real variables.
    if self.spatial_grid is not None and not self.is_initializing():
      b, _, d = normed.shape
      h, w = self.spatial_grid
      grid = self.perturb("spatial", jnp.reshape(normed[:, 1:], (b, h, w, d)))
      normed = jnp.concatenate([normed[:, :1], jnp.reshape(grid, (b, h * w, d))], axis=1)
    y, probs = SelfAttention(self.num_heads, self.dtype, self.precision, name="attn")(normed)
    x = x + y
    y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, self.precision,
                 name="mlp")(norm(name="norm2")(x))
    return x + y, probs, normed


def default_level_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
  """`count` evenly spaced block indices ending with the last (12 -> 2, 5, 8, 11; 24 -> 5, 11,
  17, 23, as DPT taps ViTs); fewer when depth < count."""
  return tuple(sorted({max(0, (k + 1) * depth // count - 1) for k in range(count)}))


class ViT(nn.Module):
  """Vision Transformer classifier on normalised images f[B, *image_size, 3].

  Attributes:
    num_classes: classes of the head.
    image_size: (H, W) the position embeddings are laid out for; inputs must have this size.
    patch_size: side of the square patches (the embedding conv's kernel and stride).
    width, depth, num_heads, mlp_dim: transformer sizes.
    representation_size: if set, a Dense + tanh 'pre_logits' layer before the head (ImageNet-21k
      pretraining checkpoints of vision_transformer have one).
    gelu_approximate: tanh-approximate GELU (Flax's default, the JAX checkpoints') instead of
      the exact erf form (timm's).
    level_blocks: blocks whose outputs are the 'levels' of `features`; default 4 evenly spaced.
    dtype: computation dtype; parameters stay float32.
    precision: matmul precision (None: the backend default, which is TF32 for float32 on recent
      GPUs; jax.lax.Precision.HIGHEST for exact float32 there).
  """
  num_classes: int = 1000
  image_size: tuple[int, int] = (224, 224)
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  representation_size: int | None = None
  gelu_approximate: bool = False
  level_blocks: tuple[int, ...] | None = None
  dtype: Any = jnp.float32
  precision: Any = None

  @property
  def grid(self) -> tuple[int, int]:
    """(h, w): the patch grid."""
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @property
  def num_tokens(self) -> int:
    """T = 1 + h * w: the class token and the patches."""
    h, w = self.grid
    return 1 + h * w

  def setup(self):
    p = self.patch_size
    if self.image_size[0] % p or self.image_size[1] % p:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {p}")
    self.embedding = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                             dtype=self.dtype, precision=self.precision)
    self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02),
                                    (1, self.num_tokens, self.width))
    self.blocks = [EncoderBlock(self.num_heads, self.mlp_dim, self.gelu_approximate, self.dtype,
                                self.precision,
                                spatial_grid=self.grid if i == self.depth - 1 else None)
                   for i in range(self.depth)]
    self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    if self.representation_size:
      self.pre_logits = nn.Dense(self.representation_size, dtype=self.dtype,
                                 precision=self.precision)
    # Default (lecun) init, not the official zero init: random-init targets (tests, benchmarks)
    # then have class-dependent logits and non-zero gradients.
    self.head = nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision)

  def _encode(self, x: Array) -> tuple[Array, list[Array], list[Array], Array]:
    """x f[B, H, W, 3] -> (final normed tokens f[B, T, D], level grids, attention probs,
    the last block's norm1 output f[B, T, D])."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (*self.image_size, 3):
      raise ValueError(f"ViT input must be f[B, {self.image_size[0]}, {self.image_size[1]}, 3] "
                       f"(normalised images), got shape {x.shape}")
    x = self.embedding(x.astype(self.dtype))
    b, h, w, d = x.shape
    x = jnp.reshape(x, (b, h * w, d))
    cls = jnp.broadcast_to(self.cls.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding.astype(self.dtype)
    taps = set(default_level_blocks(self.depth) if self.level_blocks is None
               else self.level_blocks)
    levels, attentions = [], []
    for i, block in enumerate(self.blocks):
      x, probs, last_normed = block(x)
      attentions.append(probs)
      if i in taps:
        levels.append(jnp.reshape(x[:, 1:], (b, h, w, d)))
    return self.norm(x), levels, attentions, last_normed

  def _head(self, tokens: Array) -> Array:
    y = tokens[:, 0]
    if self.representation_size:
      y = jnp.tanh(self.pre_logits(y))
    return self.head(y).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Logits f32[B, num_classes] of normalised images x f[B, H, W, 3]."""
    return self._head(self._encode(x)[0])

  def features(self, x: Array) -> dict[str, Any]:
    """The target contract (base.py) for normalised images x f[B, H, W, 3]:
      'logits': f32[B, classes];
      'levels': outputs of `level_blocks` (before the final norm) as token grids f[B, h, w, D],
        class token dropped;
      'spatial': the last block's norm1 output as a token grid f[B, h, w, D], class token
        dropped: where Grad-CAM reads a ViT (pytorch-grad-cam's `blocks[-1].norm1`). The final
        normed grid would not do: the head reads only the class token, so the logits' gradient
        with respect to the final patch tokens is exactly zero;
      'attentions': per block, attention probabilities f32[B, heads, T, T], token 0 the class
        token, then the patches in row-major grid order.
    """
    tokens, levels, attentions, last_normed = self._encode(x)
    b, (h, w) = tokens.shape[0], self.grid
    return {"logits": self._head(tokens), "levels": levels,
            "spatial": jnp.reshape(last_normed[:, 1:], (b, h, w, self.width)),
            "attentions": attentions}


# Sizes of Table 1 of the ViT paper (Ti from DeiT), patch 16 at 224 px, ImageNet-1k heads.
ViT_Ti16 = functools.partial(ViT, width=192, depth=12, num_heads=3, mlp_dim=768)
ViT_S16 = functools.partial(ViT, width=384, depth=12, num_heads=6, mlp_dim=1536)
ViT_B16 = functools.partial(ViT, width=768, depth=12, num_heads=12, mlp_dim=3072)
ViT_L16 = functools.partial(ViT, width=1024, depth=24, num_heads=16, mlp_dim=4096)
# Small-image variants, trainable on CPUs: 4 px patches give 8 x 8 (CIFAR) or 7 x 7 (MNIST) grids.
ViT_Tiny4_32 = functools.partial(ViT, num_classes=10, image_size=(32, 32), patch_size=4,
                                 width=128, depth=6, num_heads=4, mlp_dim=256)
ViT_Tiny4_28 = functools.partial(ViT, num_classes=10, image_size=(28, 28), patch_size=4,
                                 width=64, depth=4, num_heads=4, mlp_dim=128)
# Test-only: a few thousand parameters and a non-square 4 x 6 grid (catches h/w mix-ups).
ViT_Test = functools.partial(ViT, num_classes=5, image_size=(16, 24), patch_size=4, width=32,
                             depth=3, num_heads=2, mlp_dim=64)


def variables_template(model: ViT) -> dict[str, Any]:
  """The module's variables as ShapeDtypeStructs (no computation, no memory)."""
  x = jax.ShapeDtypeStruct((1, *model.image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def init_variables(model: ViT, seed: int = 0) -> dict[str, Any]:
  """Random float32 variables {'params': ...} for tests and benchmarks (`base.random_variables`):
  q, k, v kernels [D, heads, head_dim] sum over their first axis only; position embeddings
  ~ N(0, 0.02^2); the class token 0."""

  def fan_in(path, shape):
    return shape[0] if path[-2] in ("query", "key", "value") else math.prod(shape[:-1])

  return base.random_variables(
      variables_template(model), seed, fan_in,
      {"pos_embedding": lambda rng, shape: 0.02 * rng.standard_normal(shape, np.float32)})


# ----------------------------------------------------------------------------- weight import

# (module path under 'params', file key, the file array's shape, file array -> module array)
Rule = tuple[str, str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _same(a):
  return a


def _dims(model: ViT) -> tuple[int, int, int, int, int, int]:
  """(width, heads, head_dim, mlp_dim, patch, tokens)."""
  d, h = model.width, model.num_heads
  return d, h, d // h, model.mlp_dim, model.patch_size, model.num_tokens


def _posemb_rule(model: ViT, path_in_file: str, raw: Mapping[str, np.ndarray]) -> Rule:
  """Position embeddings f[1, T, D]. big_vision's current layout stores only the patches'
  [1, T - 1, D] and adds them before prepending the class token: the same as a zero row for the
  class token in the official layout."""
  d, t = model.width, model.num_tokens
  shape = tuple(np.shape(raw[path_in_file])) if path_in_file in raw else (1, t, d)
  if shape == (1, t - 1, d):
    return ("pos_embedding", path_in_file, shape,
            lambda a: np.concatenate([np.zeros((1, 1, d), a.dtype), a], axis=1))
  return ("pos_embedding", path_in_file, (1, t, d), _same)


def flax_rules(model: ViT, raw: Mapping[str, np.ndarray]) -> list[Rule]:
  """Rules for the JAX layouts. vision_transformer names a block's submodules with pre-linen
  global counters (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3), linen
  (big_vision) with per-type counters (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0); the file says which."""
  d, h, hd, m, p, _ = _dims(model)
  linen = any("/MultiHeadDotProductAttention_0/" in k for k in raw)
  ln1, mha, ln2, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                         "MlpBlock_0") if linen else
                        ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                         "MlpBlock_3"))
  posemb = next((k for k in ("Transformer/posembed_input/pos_embedding",
                             "Transformer/pos_embedding", "pos_embedding") if k in raw),
                "pos_embedding" if linen else "Transformer/posembed_input/pos_embedding")
  rules: list[Rule] = [
      ("embedding/kernel", "embedding/kernel", (p, p, 3, d), _same),
      ("embedding/bias", "embedding/bias", (d,), _same),
      ("cls", "cls", (1, 1, d), _same),
      _posemb_rule(model, posemb, raw),
  ]
  for i in range(model.depth):
    f, b = f"Transformer/encoderblock_{i}/", f"blocks_{i}/"
    for ours, theirs in (("norm1", ln1), ("norm2", ln2)):
      rules += [(f"{b}{ours}/scale", f"{f}{theirs}/scale", (d,), _same),
                (f"{b}{ours}/bias", f"{f}{theirs}/bias", (d,), _same)]
    for ours, theirs, shape in (("fc1", "Dense_0", (d, m)), ("fc2", "Dense_1", (m, d))):
      rules += [(f"{b}mlp/{ours}/kernel", f"{f}{mlp}/{theirs}/kernel", shape, _same),
                (f"{b}mlp/{ours}/bias", f"{f}{mlp}/{theirs}/bias", shape[1:], _same)]
    for n in ("query", "key", "value"):
      rules += [(f"{b}attn/{n}/kernel", f"{f}{mha}/{n}/kernel", (d, h, hd), _same),
                (f"{b}attn/{n}/bias", f"{f}{mha}/{n}/bias", (h, hd), _same)]
    rules += [(f"{b}attn/out/kernel", f"{f}{mha}/out/kernel", (h, hd, d), _same),
              (f"{b}attn/out/bias", f"{f}{mha}/out/bias", (d,), _same)]
  rules += [("norm/scale", "Transformer/encoder_norm/scale", (d,), _same),
            ("norm/bias", "Transformer/encoder_norm/bias", (d,), _same)]
  head_in = d
  if model.representation_size:
    head_in = model.representation_size
    rules += [("pre_logits/kernel", "pre_logits/kernel", (d, head_in), _same),
              ("pre_logits/bias", "pre_logits/bias", (head_in,), _same)]
  rules += [("head/kernel", "head/kernel", (head_in, model.num_classes), _same),
            ("head/bias", "head/bias", (model.num_classes,), _same)]
  return rules


def timm_rules(model: ViT, raw: Mapping[str, np.ndarray]) -> list[Rule]:
  """Rules for timm's VisionTransformer state dict: PyTorch Linear weights are [out, in], the conv
  [out, in, kh, kw], and q, k, v are one Linear whose outputs are ordered (q|k|v, head, dim)."""
  d, h, hd, m, p, t = _dims(model)
  rules: list[Rule] = [
      ("embedding/kernel", "patch_embed.proj.weight", (d, 3, p, p),
       lambda a: a.transpose(2, 3, 1, 0)),
      ("embedding/bias", "patch_embed.proj.bias", (d,), _same),
      ("cls", "cls_token", (1, 1, d), _same),
      _posemb_rule(model, "pos_embed", raw),
  ]
  for i in range(model.depth):
    f, b = f"blocks.{i}.", f"blocks_{i}/"
    for j, n in enumerate(("query", "key", "value")):
      rules += [(f"{b}attn/{n}/kernel", f"{f}attn.qkv.weight", (3 * d, d),
                 lambda a, j=j: a[j * d:(j + 1) * d].reshape(h, hd, d).transpose(2, 0, 1)),
                (f"{b}attn/{n}/bias", f"{f}attn.qkv.bias", (3 * d,),
                 lambda a, j=j: a[j * d:(j + 1) * d].reshape(h, hd))]
    rules += [(f"{b}attn/out/kernel", f"{f}attn.proj.weight", (d, d),
               lambda a: a.T.reshape(h, hd, d)),
              (f"{b}attn/out/bias", f"{f}attn.proj.bias", (d,), _same),
              (f"{b}mlp/fc1/kernel", f"{f}mlp.fc1.weight", (m, d), np.transpose),
              (f"{b}mlp/fc1/bias", f"{f}mlp.fc1.bias", (m,), _same),
              (f"{b}mlp/fc2/kernel", f"{f}mlp.fc2.weight", (d, m), np.transpose),
              (f"{b}mlp/fc2/bias", f"{f}mlp.fc2.bias", (d,), _same)]
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      rules += [(f"{b}{ours}/scale", f"{f}{theirs}.weight", (d,), _same),
                (f"{b}{ours}/bias", f"{f}{theirs}.bias", (d,), _same)]
  rules += [("norm/scale", "norm.weight", (d,), _same),
            ("norm/bias", "norm.bias", (d,), _same),
            ("head/kernel", "head.weight", (model.num_classes, d), np.transpose),
            ("head/bias", "head.bias", (model.num_classes,), _same)]
  return rules


def apply_rules(rules: list[Rule], raw: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Converts a flat file dict with `rules`.

  Returns (flat params {module path: array}, {module path: file key} of every rule). A file
  array of an unexpected shape is passed through unconverted and file keys no rule uses are
  kept under their own names, so `base.match_variables` lists both; a missing file key leaves
  its module path missing.
  """
  params, sources, used = {}, {}, set()
  for path, key, shape, convert in rules:
    sources[path] = key
    if key not in raw:
      continue
    used.add(key)
    a = np.asarray(raw[key])
    params[path] = convert(a) if a.shape == shape else a
  params.update({k: v for k, v in raw.items() if k not in used})
  return params, sources


def _strip_prefix(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision saves {'params': ...} (keys 'params/...'), old vision_transformer checkpoints the
  optimizer ('opt/target/...'); the model's parameters are what is under the prefix."""
  for prefix in ("params/", "opt/target/"):
    if f"{prefix}embedding/kernel" in raw:
      return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
  return raw


def _unstack_scanned(raw: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """big_vision with scan=True stores the blocks stacked: 'Transformer/encoderblock/...' with a
  leading depth axis. Arrays whose leading axis is not `depth` stay, to be listed as unexpected."""
  out = {}
  for k, v in raw.items():
    if k.startswith("Transformer/encoderblock/") and np.ndim(v) >= 1 and len(v) == depth:
      rest = k[len("Transformer/encoderblock/"):]
      out.update({f"Transformer/encoderblock_{i}/{rest}": v[i] for i in range(depth)})
    else:
      out[k] = v
  return out


def _check_grid(model: ViT, rules: list[Rule], raw: Mapping[str, np.ndarray], source: str):
  """A clear error for position embeddings of another resolution (not resampled, see top)."""
  key = next(key for path, key, _, _ in rules if path == "pos_embedding")
  if key not in raw:
    return
  shape = np.shape(raw[key])
  t, d = model.num_tokens, model.width
  if len(shape) == 3 and shape[0] == 1 and shape[2] == d and shape[1] not in (t, t - 1):
    n = shape[1]
    side = next((math.isqrt(x) for x in (n - 1, n) if x > 0 and math.isqrt(x) ** 2 == x), None)
    trained = (f"a {side} x {side} grid, i.e. {side * model.patch_size} px at patch "
               f"{model.patch_size}" if side else "no square grid")
    raise ValueError(
        f"weights in {source}: position embeddings {key} {tuple(shape)} hold {n} positions "
        f"({trained}), but this ViT at {model.image_size[0]} x {model.image_size[1]} px has a "
        f"{model.grid[0]} x {model.grid[1]} grid ({t} positions with the class token). Position "
        f"embeddings are not resampled: use a checkpoint trained at this resolution.")


def read_file(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(layout, flat {key: array}) of a weights file; the format is chosen by its extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path) as f:
      return "jax", {k: f[k] for k in f.files}
  if ext == ".safetensors":
    from safetensors.numpy import load_file
    return "timm", dict(load_file(path))
  if ext == ".msgpack":
    from flax import serialization
    with open(path, "rb") as f:
      tree = serialization.msgpack_restore(f.read())
    return "flax", base._flatten(tree.get("params", tree))
  raise ValueError(f"unsupported ViT weights file {path!r}: expected .npz (vision_transformer / "
                   f"big_vision), .safetensors (timm) or .msgpack (Flax variables of this module)")


def convert(model: ViT, layout: str, raw: dict[str, np.ndarray], source: str = "<dict>"
            ) -> tuple[ViT, dict[str, np.ndarray], dict[str, str]]:
  """A flat file dict -> (model fitted to the file, flat params {module path: NumPy array},
  {module path: file key}). Unchecked; `load` ends in `base.match_variables`.

  For 'jax' files the model switches to the tanh GELU it was trained with and gains the file's
  pre_logits layer if it has one.
  """
  if layout == "flax":
    return model, dict(raw), {}
  if layout == "jax":
    raw = _unstack_scanned(_strip_prefix(raw), model.depth)
    model = model.clone(gelu_approximate=True)
    if "pre_logits/kernel" in raw and np.ndim(raw["pre_logits/kernel"]) == 2:
      model = model.clone(representation_size=int(np.shape(raw["pre_logits/kernel"])[1]))
    rules = flax_rules(model, raw)
  elif layout == "timm":
    model = model.clone(gelu_approximate=False)
    rules = timm_rules(model, raw)
  else:
    raise ValueError(f"unknown ViT weights layout {layout!r}")
  _check_grid(model, rules, raw, source)
  params, sources = apply_rules(rules, raw)
  return model, params, sources


def _name_file_keys(message: str, sources: Mapping[str, str]) -> str:
  """Adds the file key behind each missing or mis-shaped module path of a match error."""
  lines = []
  for line in message.splitlines():
    match = re.match(r"  (?:missing|shape): params/([^:]+)", line)
    if match and match.group(1) in sources:
      line += f"  (file key {sources[match.group(1)]!r})"
    lines.append(line)
  return "\n".join(lines)


def load(model: ViT, path: str) -> tuple[ViT, dict[str, Any]]:
  """Reads a weights file into (model fitted to the file, float32 variables {'params': ...}).

  Raises ValueError listing the first missing / unexpected / mis-shaped keys when the file does
  not fit the architecture (e.g. another size, or a head with another number of classes: pass
  num_classes to the factory), and for position embeddings of another resolution.
  """
  layout, raw = read_file(path)
  model, params, sources = convert(model, layout, raw, path)
  try:
    variables = base.match_variables(variables_template(model), {"params": params}, path)
  except ValueError as e:
    raise ValueError(f"{_name_file_keys(str(e), sources)}\n(read as the {layout} layout, for a "
                     f"{model.width}-wide, {model.depth}-deep ViT with patch {model.patch_size} "
                     f"at {model.image_size[0]} x {model.image_size[1]} px)") from None
  return model, variables


# ----------------------------------------------------------------------------- registry


def _target_factory(name: str, module: Callable[..., ViT], mean: tuple[float, float, float],
                    std: tuple[float, float, float]) -> Callable[..., base.Target]:

  def factory(weights: str | None = None, *, random_init: bool = False,
              num_classes: int | None = None) -> base.Target:
    model = module() if num_classes is None else module(num_classes=num_classes)
    if random_init:
      variables = init_variables(model)
    else:
      path = base.require_file(weights, "config.target.weights", f"target {name!r}")
      model, variables = load(model, path)
    return base.Target(
        name=name, model=model, variables=variables, input_size=model.image_size, mean=mean,
        std=std, head_path=("head",),
        # The official evaluation resizes to the input size, without cropping.
        preprocess=functools.partial(base.resize_and_crop, resize=model.image_size,
                                     resample="bilinear"))

  factory.__doc__ = (f"Target {name!r} from a weights file (.npz, .safetensors, .msgpack), or "
                     f"random parameters with random_init=True.")
  return factory


TARGETS = {
    "vit_ti16": ViT_Ti16, "vit_s16": ViT_S16, "vit_b16": ViT_B16, "vit_l16": ViT_L16,
    # Trained by the project itself; mean = std = 0.5 like the official ones.
    "vit_tiny_p4_32": ViT_Tiny4_32, "vit_tiny_p4_28": ViT_Tiny4_28,
}
for _name, _module in TARGETS.items():
  base.register(_name)(_target_factory(_name, _module, HALF, HALF))
