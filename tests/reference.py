"""Independent float64 NumPy references for the tests: brute-force loops written from METHOD.md's
definitions, sharing no code with the library."""
from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


class LinearSoftmax:
  """An analytic classifier: logits = flatten(x) @ w + b, on images f[H, W, C].

  With 2 classes the log-odds of class c are linear in the pixels, so deleting the pixels with the
  largest contribution (w_c - w_other) . (x - ref) first is the exact optimum of deletion AUC at
  every fraction at once, and deleting the smallest first the optimum of insertion AUC.
  """

  def __init__(self, weights: np.ndarray, bias: np.ndarray):
    self.weights = np.asarray(weights, np.float64)  # [H * W * C, classes]
    self.bias = np.asarray(bias, np.float64)

  def logits(self, image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float64).reshape(-1) @ self.weights + self.bias

  def jax_apply(self):
    import jax
    import jax.numpy as jnp
    w = jnp.asarray(self.weights, jnp.float32)
    b = jnp.asarray(self.bias, jnp.float32)
    # HIGHEST: on GPUs a default f32 matmul runs in TF32, too coarse for 1e-5 comparisons.
    return lambda images: jnp.dot(images.reshape(images.shape[0], -1), w,
                                  precision=jax.lax.Precision.HIGHEST) + b

  def contributions(self, image: np.ndarray, ref: np.ndarray, cls: int) -> np.ndarray:
    """Per-pixel drop of the log-odds of cls (2 classes) when the pixel goes to ref: f64[H, W]."""
    h, w, c = image.shape
    dw = (self.weights[:, cls] - self.weights[:, 1 - cls]).reshape(h, w, c)
    return (dw * (np.asarray(image, np.float64) - ref)).sum(-1)


def gaussian_blur(image: np.ndarray, size: int, sigma: float) -> np.ndarray:
  """torchvision-style Gaussian blur of f[H, W, C] with reflect padding, by explicit loops."""
  r = size // 2
  x = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  out = np.asarray(image, np.float64)
  for axis in (0, 1):
    n = out.shape[axis]
    res = np.zeros_like(out)
    for pos in range(n):
      for t in range(-r, r + 1):
        src = pos + t
        src = -src if src < 0 else (2 * (n - 1) - src if src >= n else src)  # reflect
        res[(slice(None),) * axis + (pos,)] += k[t + r] * out[(slice(None),) * axis + (src,)]
    out = res
  return out


def reference_image(image: np.ndarray, reference: str, mean_color=(0.485, 0.456, 0.406),
                    blur_size: int = 37, blur_sigma: float = 37.0) -> np.ndarray:
  if reference == "black":
    return np.zeros_like(image, np.float64)
  if reference == "mean":
    return np.broadcast_to(np.asarray(mean_color, np.float64), image.shape).copy()
  if reference == "blur":
    return gaussian_blur(image, blur_size, blur_sigma)
  raise ValueError(reference)


def deletion_curve(score_fn, image: np.ndarray, saliency: np.ndarray, ref: np.ndarray,
                   fractions, unit: int = 1) -> np.ndarray:
  """Score of the perturbed image at each fraction, one image and one fraction at a time.

  The units (unit x unit patches, scored by their mean) are sorted by descending score with a
  stable sort, and the first round(p * n) of them are replaced by ref.
  """
  h, w = saliency.shape
  gh, gw = h // unit, w // unit
  unit_scores = np.zeros((gh, gw))
  for i in range(gh):
    for j in range(gw):
      unit_scores[i, j] = saliency[i * unit:(i + 1) * unit, j * unit:(j + 1) * unit].mean()
  order = np.argsort(-unit_scores.reshape(-1), kind="stable")
  curve = []
  for p in fractions:
    x = np.array(image, np.float64)
    for u in order[:int(round(p * gh * gw))]:
      i, j = divmod(int(u), gw)
      x[i * unit:(i + 1) * unit, j * unit:(j + 1) * unit] = ref[i * unit:(i + 1) * unit,
                                                                 j * unit:(j + 1) * unit]
    curve.append(score_fn(x))
  return np.asarray(curve)


def trapezoid(curve: np.ndarray, fractions) -> float:
  f = np.asarray(fractions, np.float64)
  total = 0.0
  for k in range(len(f) - 1):
    total += 0.5 * (curve[k] + curve[k + 1]) * (f[k + 1] - f[k])
  return total


def sinkhorn(log_alpha: np.ndarray, num_iters: int) -> np.ndarray:
  """Matrix-form log-domain Sinkhorn of METHOD.md: normalise over ranks (axis -2), then over items
  (axis -1), num_iters times; returns P."""
  x = np.asarray(log_alpha, np.float64)
  for _ in range(num_iters):
    m = x.max(axis=-2, keepdims=True)
    x = x - (m + np.log(np.exp(x - m).sum(axis=-2, keepdims=True)))
    m = x.max(axis=-1, keepdims=True)
    x = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
  return np.exp(x)


def make_linear_classifier(shape=(16, 16, 3), classes=2, seed=0, scale=0.12) -> LinearSoftmax:
  """A LinearSoftmax with unsaturated probabilities on uniform [0, 1] images of `shape`."""
  rng = np.random.default_rng(seed)
  d = int(np.prod(shape))
  w = rng.normal(scale=scale, size=(d, classes))
  w -= w.mean(axis=0, keepdims=True)  # no class gains from a uniform brightness change
  b = -0.5 * w.sum(axis=0)  # centres the logits for mid-grey images
  return LinearSoftmax(w, b)


def random_images(n, shape=(16, 16, 3), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)
