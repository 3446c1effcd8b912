"""ViT targets: weight import from the official, big_vision and timm file layouts, checked against
independent float64 NumPy forward passes written from each framework's own conventions.

The synthetic checkpoints carry the real key names and shapes (vision_transformer models_vit.py,
big_vision models/vit.py, timm vision_transformer.py) filled with random values.
"""
import dataclasses
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from l2r_jax.targets import base, vit

HIGHEST = jax.lax.Precision.HIGHEST
LOGIT_ATOL = 1e-4

# ----------------------------------------------------------------------------- file layouts


def dims(model):
  gh, gw = model.image_size[0] // model.patch_size, model.image_size[1] // model.patch_size
  return dict(d=model.width, depth=model.depth, heads=model.num_heads, m=model.mlp_dim,
              p=model.patch_size, n=gh * gw, c=model.num_classes)


def jax_layout(model, style, rep=None):
  """{key: shape} of a JAX checkpoint. style: 'official' (vision_transformer: pre-linen block
  names, posemb over [cls, patches] in the encoder), 'big_vision' (linen names, root posemb over
  the patches only, keys under 'params/'), 'big_vision_scan' (blocks stacked over depth)."""
  k = dims(model)
  d, m, h = k["d"], k["m"], k["heads"]
  hd = d // h
  bv = style.startswith("big_vision")
  ln1, mha, ln2, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                         "MlpBlock_0") if bv else
                        ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                         "MlpBlock_3"))
  keys = {"embedding/kernel": (k["p"], k["p"], 3, d), "embedding/bias": (d,), "cls": (1, 1, d)}
  if bv:
    keys["pos_embedding"] = (1, k["n"], d)
  else:
    keys["Transformer/posembed_input/pos_embedding"] = (1, k["n"] + 1, d)
  block = {f"{ln1}/scale": (d,), f"{ln1}/bias": (d,), f"{ln2}/scale": (d,), f"{ln2}/bias": (d,),
           f"{mha}/out/kernel": (h, hd, d), f"{mha}/out/bias": (d,),
           f"{mlp}/Dense_0/kernel": (d, m), f"{mlp}/Dense_0/bias": (m,),
           f"{mlp}/Dense_1/kernel": (m, d), f"{mlp}/Dense_1/bias": (d,)}
  for n in ("query", "key", "value"):
    block.update({f"{mha}/{n}/kernel": (d, h, hd), f"{mha}/{n}/bias": (h, hd)})
  for i in range(k["depth"]):
    keys.update({f"Transformer/encoderblock_{i}/{b}": s for b, s in block.items()})
  keys.update({"Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,)})
  if rep:
    keys.update({"pre_logits/kernel": (d, rep), "pre_logits/bias": (rep,)})
  keys.update({"head/kernel": (rep or d, k["c"]), "head/bias": (k["c"],)})
  return keys


def timm_layout(model):
  """{key: shape} of timm's VisionTransformer state dict."""
  k = dims(model)
  d, m, p = k["d"], k["m"], k["p"]
  keys = {"cls_token": (1, 1, d), "pos_embed": (1, k["n"] + 1, d),
          "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
  for i in range(k["depth"]):
    keys.update({f"blocks.{i}.{b}": s for b, s in {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}.items()})
  keys.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (k["c"], d),
               "head.bias": (k["c"],)})
  return keys


def random_checkpoint(layout, seed, width):
  """Random values giving O(1) activations: norm scales near 1, small biases, kernels ~
  1/sqrt(width)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in layout.items():
    z = rng.normal(size=shape)
    if key.endswith(("scale", "norm1.weight", "norm2.weight", "norm.weight")):
      z = 1.0 + 0.2 * z
    elif key.endswith("bias"):
      z = 0.2 * z
    elif key in ("cls", "cls_token") or "pos_emb" in key:
      z = 0.5 * z
    else:
      z = z / math.sqrt(width)
    out[key] = z.astype(np.float32)
  return out


def write(tmp_path, style, raw):
  """Writes a checkpoint as its framework does; returns the path."""
  if style == "timm":
    path = tmp_path / "model.safetensors"
    save_file(raw, str(path))
    return str(path)
  if style == "big_vision_scan":
    depth = 1 + max(int(k.split("/")[1].split("_")[1]) for k in raw if "encoderblock_" in k)
    stacked = {k: v for k, v in raw.items() if "encoderblock_" not in k}
    for k in raw:
      if k.startswith("Transformer/encoderblock_0/"):
        rest = k[len("Transformer/encoderblock_0/"):]
        stacked[f"Transformer/encoderblock/{rest}"] = np.stack(
            [raw[f"Transformer/encoderblock_{i}/{rest}"] for i in range(depth)])
    raw = stacked
  if style.startswith("big_vision"):
    raw = {f"params/{k}": v for k, v in raw.items()}
  path = tmp_path / f"{style}.npz"
  np.savez(path, **raw)
  return str(path)


def make_checkpoint(model, style, seed=0):
  if style == "timm":
    layout = timm_layout(model)
  elif style == "official_pre_logits":  # ImageNet-21k pretraining checkpoints have one
    layout = jax_layout(model, "official", rep=24)
  else:
    layout = jax_layout(model, style)
  return random_checkpoint(layout, seed, model.width)


# ----------------------------------------------------------------------------- NumPy references

_erf = np.vectorize(math.erf)


def gelu_tanh(x):  # flax.linen.gelu's default, which the JAX checkpoints were trained with
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x):  # torch.nn.GELU's default (timm)
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def jax_reference(raw, x, heads, patch, style):
  """Flax ViT semantics (NHWC conv, DenseGeneral q/k/v/out, tanh GELU) on the file's own dict
  (per-block keys, no 'params/' prefix). x: normalised f[B, H, W, 3].
  Returns (logits, attentions per block, token states per block, final normed tokens)."""
  w = {k: np.asarray(v, np.float64) for k, v in raw.items()}
  bv = style.startswith("big_vision")
  ln1, mha, ln2, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                         "MlpBlock_0") if bv else
                        ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                         "MlpBlock_3"))
  x = np.asarray(x, np.float64)
  b, hh, ww, _ = x.shape
  gh, gw = hh // patch, ww // patch
  kernel = w["embedding/kernel"]  # [kh, kw, in, out]
  d = kernel.shape[-1]
  patches = x.reshape(b, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, gh * gw, -1) @ kernel.reshape(-1, d) + w["embedding/bias"]
  cls = np.broadcast_to(w["cls"], (b, 1, d))
  if bv:  # big_vision adds posemb to the patches, then prepends the class token
    tokens = np.concatenate([cls, tokens + w["pos_embedding"]], axis=1)
  else:
    tokens = np.concatenate([cls, tokens], axis=1) + w["Transformer/posembed_input/pos_embedding"]
  depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
  attentions, states = [], []
  for i in range(depth):
    f = f"Transformer/encoderblock_{i}/"
    y = layer_norm(tokens, w[f + ln1 + "/scale"], w[f + ln1 + "/bias"])
    q, k, v = (np.einsum("btd,dhk->bthk", y, w[f"{f}{mha}/{n}/kernel"]) + w[f"{f}{mha}/{n}/bias"]
               for n in ("query", "key", "value"))
    a = softmax(np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1]))
    o = np.einsum("bhqs,bshk->bqhk", a, v)
    tokens = tokens + np.einsum("bqhk,hkd->bqd", o, w[f + mha + "/out/kernel"]) \
        + w[f + mha + "/out/bias"]
    y = layer_norm(tokens, w[f + ln2 + "/scale"], w[f + ln2 + "/bias"])
    y = gelu_tanh(y @ w[f + mlp + "/Dense_0/kernel"] + w[f + mlp + "/Dense_0/bias"])
    tokens = tokens + y @ w[f + mlp + "/Dense_1/kernel"] + w[f + mlp + "/Dense_1/bias"]
    attentions.append(a)
    states.append(tokens)
  final = layer_norm(tokens, w["Transformer/encoder_norm/scale"],
                     w["Transformer/encoder_norm/bias"])
  pooled = final[:, 0]
  if "pre_logits/kernel" in w:
    pooled = np.tanh(pooled @ w["pre_logits/kernel"] + w["pre_logits/bias"])
  return pooled @ w["head/kernel"] + w["head/bias"], attentions, states, final


def timm_reference(raw, x, heads, patch):
  """timm semantics (NCHW conv, Linear y = x W^T + b, fused qkv, erf GELU) on its state dict."""
  w = {k: np.asarray(v, np.float64) for k, v in raw.items()}
  x = np.asarray(x, np.float64).transpose(0, 3, 1, 2)  # NCHW
  b, c, hh, ww = x.shape
  gh, gw = hh // patch, ww // patch
  conv = w["patch_embed.proj.weight"]  # [out, in, kh, kw]
  d = conv.shape[0]
  x = x.reshape(b, c, gh, patch, gw, patch)
  emb = np.einsum("bcipjq,ocpq->boij", x, conv) + w["patch_embed.proj.bias"][None, :, None, None]
  tokens = emb.reshape(b, d, gh * gw).transpose(0, 2, 1)
  tokens = np.concatenate([np.broadcast_to(w["cls_token"], (b, 1, d)), tokens], 1) + w["pos_embed"]
  t, hd = tokens.shape[1], d // heads
  depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
  attentions, states = [], []
  for i in range(depth):
    f = f"blocks.{i}."
    y = layer_norm(tokens, w[f + "norm1.weight"], w[f + "norm1.bias"])
    qkv = (y @ w[f + "attn.qkv.weight"].T + w[f + "attn.qkv.bias"])
    q, k, v = qkv.reshape(b, t, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    a = softmax((q * hd ** -0.5) @ k.transpose(0, 1, 3, 2))
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    tokens = tokens + o @ w[f + "attn.proj.weight"].T + w[f + "attn.proj.bias"]
    y = layer_norm(tokens, w[f + "norm2.weight"], w[f + "norm2.bias"])
    y = gelu_erf(y @ w[f + "mlp.fc1.weight"].T + w[f + "mlp.fc1.bias"])
    tokens = tokens + y @ w[f + "mlp.fc2.weight"].T + w[f + "mlp.fc2.bias"]
    attentions.append(a)
    states.append(tokens)
  final = layer_norm(tokens, w["norm.weight"], w["norm.bias"])
  return final[:, 0] @ w["head.weight"].T + w["head.bias"], attentions, states, final


def reference(raw, style, x, model):
  if style == "timm":
    return timm_reference(raw, x, model.num_heads, model.patch_size)
  return jax_reference(raw, x, model.num_heads, model.patch_size, style)


def pixels(model, batch=2, seed=1):
  return np.random.default_rng(seed).uniform(size=(batch, *model.image_size, 3)).astype(np.float32)


def exact(target):
  """The target at full float32 matmul precision (GPUs would otherwise use TF32)."""
  return dataclasses.replace(target, model=target.model.clone(precision=HIGHEST))


# ----------------------------------------------------------------------------- tests

STYLES = ["official", "official_pre_logits", "big_vision", "big_vision_scan", "timm"]


@pytest.mark.parametrize("style", STYLES)
def test_import_matches_numpy_forward_on_a_non_square_grid(tmp_path, style):
  model = vit.ViT_Test(precision=HIGHEST)
  raw = make_checkpoint(model, style)
  model, variables = vit.load(model, write(tmp_path, style, raw))
  x = (pixels(model) - 0.5) / 0.5
  feats = model.apply(variables, jnp.asarray(x), method="features")
  logits, attentions, states, final = reference(raw, style, x, model)
  err = float(np.max(np.abs(np.asarray(feats["logits"]) - logits)))
  print(f"\n{style}: max |logit error| vs NumPy f64 = {err:.2e} (logits up to "
        f"{np.max(np.abs(logits)):.2f})")
  assert err < LOGIT_ATOL
  b, (gh, gw) = x.shape[0], (4, 6)
  assert len(feats["attentions"]) == model.depth
  for got, want in zip(feats["attentions"], attentions):
    assert got.shape == (b, model.num_heads, 1 + gh * gw, 1 + gh * gw) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
  taps = vit.default_level_blocks(model.depth)
  assert len(feats["levels"]) == len(taps)
  for got, i in zip(feats["levels"], taps):
    np.testing.assert_allclose(got, states[i][:, 1:].reshape(b, gh, gw, -1), atol=1e-4)
  # 'spatial' (Grad-CAM's map): the last block's norm1 of its input, the previous block's output.
  norm1 = variables["params"][f"blocks_{model.depth - 1}"]["norm1"]
  want = layer_norm(states[-2], np.asarray(norm1["scale"]), np.asarray(norm1["bias"]))
  np.testing.assert_allclose(feats["spatial"], want[:, 1:].reshape(b, gh, gw, -1), atol=1e-4)


@pytest.mark.parametrize("style", ["official", "big_vision", "timm"])
def test_registered_factory_imports_each_layout(tmp_path, style):
  model = vit.ViT_Tiny4_28()
  raw = make_checkpoint(model, style, seed=3)
  target = exact(base.create("vit_tiny_p4_28", write(tmp_path, style, raw)))
  images = pixels(model, batch=3, seed=4)
  want = reference(raw, style, (images - 0.5) / 0.5, model)[0]  # mean = std = 0.5
  err = float(np.max(np.abs(np.asarray(target.apply(target.variables, jnp.asarray(images)))
                            - want)))
  print(f"\nvit_tiny_p4_28 {style}: max |logit error| vs NumPy f64 = {err:.2e}")
  assert err < LOGIT_ATOL
  assert target.model.gelu_approximate == (style != "timm")
  rows, bias = target.head(target.variables)
  assert rows.shape == (10, 64) and bias.shape == (10,)


@pytest.mark.parametrize("size,style,rep", [
    ("B", "official", None), ("B", "big_vision", None), ("B", "big_vision_scan", None),
    ("B", "timm", None), ("B", "official", 768),  # ImageNet-21k pretraining: pre_logits
    ("L", "official", None), ("L", "timm", None)])
def test_real_key_sets_convert_to_the_module_tree(size, style, rep):
  # Zero-stride arrays: the real shapes without hundreds of MB of memory or a 224 px forward.
  classes = 21843 if rep else 1000
  model = {"B": vit.ViT_B16, "L": vit.ViT_L16}[size](num_classes=classes)
  layout = timm_layout(model) if style == "timm" else jax_layout(model, style, rep)
  raw = {k: np.broadcast_to(np.float32(0), s) for k, s in layout.items()}
  if style == "big_vision_scan":
    blocks = [k for k in raw if k.startswith("Transformer/encoderblock_")]
    raw = {k: v for k, v in raw.items() if k not in blocks}
    for k in {b.split("/", 2)[2] for b in blocks}:
      raw[f"Transformer/encoderblock/{k}"] = np.broadcast_to(
          np.float32(0), (model.depth, *layout[f"Transformer/encoderblock_0/{k}"]))
  if style.startswith("big_vision"):
    raw = {f"params/{k}": v for k, v in raw.items()}
  layout_name = "timm" if style == "timm" else "jax"
  fitted, params, _ = vit.convert(model, layout_name, raw)
  want = {k: tuple(v.shape) for k, v in
          base._flatten(vit.variables_template(fitted)["params"]).items()}
  assert {k: tuple(np.shape(v)) for k, v in params.items()} == want
  assert fitted.representation_size == rep


def test_variant_sizes_have_the_published_parameter_counts():
  # timm's model cards: vit_{tiny,small,base,large}_patch16_224.
  counts = {vit.ViT_Ti16: 5_717_416, vit.ViT_S16: 22_050_664, vit.ViT_B16: 86_567_656,
            vit.ViT_L16: 304_326_632}
  for module, count in counts.items():
    tree = vit.variables_template(module())
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(tree)) == count


def test_level_blocks_are_evenly_spaced_and_end_with_the_last():
  assert vit.default_level_blocks(12) == (2, 5, 8, 11)
  assert vit.default_level_blocks(24) == (5, 11, 17, 23)
  assert vit.default_level_blocks(6) == (0, 2, 3, 5)
  assert vit.default_level_blocks(2) == (0, 1)


def test_registered_names_and_imagenet_target_contract():
  assert {"vit_ti16", "vit_s16", "vit_b16", "vit_l16", "vit_tiny_p4_32",
          "vit_tiny_p4_28"} <= set(base.names())
  target = base.create("vit_ti16", random_init=True)
  assert target.input_size == (224, 224) and target.num_classes == 1000
  assert target.mean == target.std == (0.5, 0.5, 0.5)
  image = np.random.default_rng(0).integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
  out = target.preprocess(image)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  base.check_family_outputs(target)
  small = base.create("vit_tiny_p4_32", random_init=True, num_classes=7)
  assert small.input_size == (32, 32) and small.num_classes == 7


def test_features_contract_attention_rows_sum_to_one():
  target = base.create("vit_tiny_p4_28", random_init=True)
  feats = target.features(target.variables, jnp.asarray(pixels(target.model, batch=2)))
  model = target.model
  assert len(feats["attentions"]) == model.depth
  for a in feats["attentions"]:
    assert a.shape == (2, model.num_heads, 50, 50) and a.dtype == jnp.float32
    np.testing.assert_allclose(np.sum(a, axis=-1), 1.0, atol=1e-5)
  assert [f.shape for f in feats["levels"]] == [(2, 7, 7, 64)] * 4
  assert feats["spatial"].shape == (2, 7, 7, 64)
  np.testing.assert_allclose(feats["logits"], target.apply(target.variables,
                                                           jnp.asarray(pixels(model))), atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
  model = vit.ViT_Tiny4_28()
  path = write(tmp_path, "official", make_checkpoint(model, "official", seed=5))
  target = base.create("vit_tiny_p4_28", path)
  images = jnp.asarray(pixels(model, batch=8, seed=6))
  f32 = np.asarray(exact(target).apply(target.variables, images))
  bf16_target = target.with_dtype(jnp.bfloat16)
  bf16 = np.asarray(bf16_target.apply(target.variables, images))
  diff = float(np.max(np.abs(bf16 - f32)))
  print(f"\nbf16 vs f32: max |logit difference| = {diff:.3f} (logits up to "
        f"{np.max(np.abs(f32)):.2f})")
  assert bf16.dtype == np.float32
  assert diff < 0.05 * np.max(np.abs(f32)) + 0.05
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.75
  feats = bf16_target.features(target.variables, images)
  assert feats["levels"][0].dtype == jnp.bfloat16 and feats["attentions"][0].dtype == jnp.float32
  np.testing.assert_allclose(np.sum(feats["attentions"][0], -1), 1.0, atol=1e-5)


def test_msgpack_round_trip(tmp_path):
  model = vit.ViT_Test()
  variables = vit.init_variables(model, seed=2)
  path = tmp_path / "vit.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  loaded_model, loaded = vit.load(model, str(path))
  x = jnp.asarray(pixels(model))
  np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(variables, x))


# ----------------------------------------------------------------------------- errors


def _official_file(tmp_path, edit):
  raw = make_checkpoint(vit.ViT_Test(), "official")
  edit(raw)
  return write(tmp_path, "official", raw)


def test_missing_key_is_listed_with_its_file_name(tmp_path):
  key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"
  path = _official_file(tmp_path, lambda raw: raw.pop(key))
  with pytest.raises(ValueError, match="1 missing") as e:
    vit.load(vit.ViT_Test(), path)
  assert "blocks_1/mlp/fc2/kernel" in str(e.value) and key in str(e.value)


def test_unexpected_key_is_listed(tmp_path):
  path = _official_file(tmp_path, lambda raw: raw.update(
      {"Transformer/encoderblock_3/LayerNorm_0/scale": np.ones(32, np.float32)}))
  with pytest.raises(ValueError, match="1 unexpected") as e:
    vit.load(vit.ViT_Test(), path)
  assert "Transformer/encoderblock_3/LayerNorm_0/scale" in str(e.value)


def test_wrong_shape_is_listed(tmp_path):
  path = _official_file(tmp_path, lambda raw: raw.update(
      {"head/kernel": np.zeros((32, 7), np.float32), "head/bias": np.zeros(7, np.float32)}))
  with pytest.raises(ValueError, match="2 shape mismatches") as e:
    vit.load(vit.ViT_Test(), path)
  assert "head/kernel: expected (32, 5), file has (32, 7)" in str(e.value)


def test_wrong_timm_qkv_shape_names_the_file_key(tmp_path):
  model = vit.ViT_Test()
  raw = make_checkpoint(model, "timm")
  raw["blocks.0.attn.qkv.weight"] = np.zeros((90, 32), np.float32)
  with pytest.raises(ValueError, match="shape mismatch") as e:
    vit.load(model, write(tmp_path, "timm", raw))
  assert "blocks.0.attn.qkv.weight" in str(e.value)


def test_wrong_size_checkpoint_is_refused_for_every_layer(tmp_path):
  # A ViT_Test-shaped file loaded into a wider model: every listed mismatch, not a crash.
  path = write(tmp_path, "timm", make_checkpoint(vit.ViT_Test(), "timm"))
  with pytest.raises(ValueError, match="shape mismatches"):
    vit.load(vit.ViT_Test(width=48, num_heads=3), path)


@pytest.mark.parametrize("style", ["official", "big_vision", "timm"])
def test_position_embeddings_of_another_resolution_are_refused(tmp_path, style):
  trained = vit.ViT_Test(image_size=(32, 32))  # an 8 x 8 grid
  path = write(tmp_path, style, make_checkpoint(trained, style))
  with pytest.raises(ValueError, match=r"8 x 8 grid, i\.e\. 32 px .* not resampled"):
    vit.load(vit.ViT_Test(), path)


def test_missing_weights_name_the_config_field(tmp_path):
  with pytest.raises(ValueError, match="config.target.weights"):
    base.create("vit_b16")
  with pytest.raises(ValueError, match="config.target.weights"):
    base.create("vit_b16", str(tmp_path / "absent.npz"))
  bad = tmp_path / "model.pth"
  bad.write_bytes(b"")
  with pytest.raises(ValueError, match="unsupported ViT weights file"):
    base.create("vit_tiny_p4_28", str(bad))


def test_wrong_input_size_is_refused():
  target = base.create("vit_tiny_p4_28", random_init=True)
  with pytest.raises(ValueError, match=r"f\[B, 28, 28, 3\]"):
    target.apply(target.variables, jnp.zeros((1, 32, 32, 3)))
