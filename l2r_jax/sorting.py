"""Gumbel-Sinkhorn relaxation of sorting: scores -> soft permutation matrix.

The paper ranks N cells by their attribution scores s. A hard sort is replaced by a doubly
stochastic matrix P f32[B, N, N] whose rows are ranks (row 0 = most important) and whose columns
are items. It is the Sinkhorn projection of exp((log_alpha + gumbel) / tau) with the anchor cost

    log_alpha[j, i] = -(s_i - a_j)^2,   a = linspace(1, 0, N),

so item i is pulled towards the rank whose anchor is closest to its score. As tau -> 0 (no noise)
P tends to the permutation matrix of the descending argsort of s.

Two facts shape the implementation:
- Expanding the square, -(s_i - a_j)^2 = 2 a_j s_i - s_i^2 - a_j^2. The item constant -s_i^2 is
  removed exactly by the first normalisation over ranks, and the rank constant -a_j^2 is the
  starting value of the rank potential. We iterate on the bilinear part 2 a_j s_i with that start:
  every iterate equals the paper's in exact arithmetic, but magnitudes stay at |s| instead of s^2,
  so scores of 1e3 at tau 0.01 keep full float32 precision.
- The iterations are written on the dual potentials (f over ranks, g over items), so the scan
  carries two f32[B, N] vectors, not an N x N matrix, and its body is rematerialised: the backward
  pass keeps one N x N working set plus 2 * B * N floats per iteration, instead of every N x N
  iterate. The gradient is the exact gradient of the unrolled iterations (what the authors'
  PyTorch code computes), at a cost of one extra forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from l2r_jax import checks

Array = jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs (bfloat16 keeps 8 mantissa bits, too few for a
  log-sum-exp over hundreds of cells); float64 stays float64, for reference computations."""
  return jnp.promote_types(dtype, jnp.float32)


def rank_anchors(n: int, dtype=jnp.float32) -> Array:
  """The rank anchors a = linspace(1, 0, n): f32[n], rank 0 (most important) first."""
  return jnp.linspace(1.0, 0.0, n, dtype=dtype)


def normalize_to_anchor_range(scores: Array, eps: float = 1e-6) -> Array:
  """Min-max maps each row of scores f32[B, N] onto [0, 1], the anchors' range.

  A constant row maps to all zeros. The authors do not normalise (METHOD.md); this is an option.
  """
  lo = jnp.min(scores, axis=-1, keepdims=True)
  hi = jnp.max(scores, axis=-1, keepdims=True)
  return (scores - lo) / (hi - lo + eps)


def anchor_log_alpha(scores: Array, normalize: bool = False) -> Array:
  """The paper's cost matrix log_alpha[b, j, i] = -(s_bi - a_j)^2: f32[B, N(ranks), N(items)].

  Kept for reference and tests; `soft_sort` iterates on an equivalent, better-conditioned form.
  """
  s = scores.astype(compute_dtype(scores.dtype))
  if normalize:
    s = normalize_to_anchor_range(s)
  a = rank_anchors(s.shape[-1], s.dtype)
  return -jnp.square(s[..., None, :] - a[:, None])


def sinkhorn(log_alpha: Array, num_iters: int, rank_offset: Array | None = None) -> Array:
  """Log-domain Sinkhorn: log P f32[..., N, N] whose rows and columns sum to ~1.

  Each iteration normalises over ranks (axis -2: every item's column sums to 1), then over items
  (axis -1: every rank's row sums to 1), the order of METHOD.md. After the last iteration the rank
  rows sum to 1 exactly, so each row of a deletion sweep removes exactly one cell of mass.

  Args:
    log_alpha: f32[..., N(ranks), N(items)], any finite values.
    num_iters: number of (ranks, items) normalisation pairs, >= 1.
    rank_offset: optional f32[..., N] added to row j of log_alpha. Equivalent to, and cheaper
      than, adding it to the matrix: it only sets the starting rank potential.
  Returns:
    log P, f32[..., N, N] (f64 for f64 input).
  """
  num_iters = checks.static_int(num_iters, "num_iters")
  log_alpha = log_alpha.astype(compute_dtype(log_alpha.dtype))

  # log P = log_alpha + u[rank] + v[item]. Only u is carried: v follows from it. The body is
  # rematerialised, so the backward pass saves one f32[..., N] per iteration, not an N x N iterate.
  def item_potential(u):
    return -jax.nn.logsumexp(log_alpha + u[..., :, None], axis=-2)

  def rank_potential(v):
    return -jax.nn.logsumexp(log_alpha + v[..., None, :], axis=-1)

  @jax.checkpoint
  def one_iteration(u, _):
    return rank_potential(item_potential(u)), None

  # zeros_like, not zeros: the carry must have log_alpha's device-variance under shard_map.
  u0 = jnp.zeros_like(log_alpha[..., 0])
  if rank_offset is not None:
    u0 = u0 + rank_offset.astype(log_alpha.dtype)
  u_before_last, _ = jax.lax.scan(one_iteration, u0, None, length=num_iters - 1)
  v = item_potential(u_before_last)
  u = rank_potential(v)
  return log_alpha + u[..., :, None] + v[..., None, :]


def gumbel_noise(key: Array, shape: tuple[int, ...], dtype) -> Array:
  """Gumbel(0, 1) noise of `shape` from one key, or from keys[shape[0]] row by row."""
  if jnp.ndim(key) == 0:
    return jax.random.gumbel(key, shape, dtype)
  if jnp.shape(key) != shape[:1]:
    raise ValueError(f"key must be one PRNG key or one per row, keys[{shape[0]}], got shape "
                     f"{jnp.shape(key)}")
  return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], dtype))(key)


def soft_sort(scores: Array,
              *,
              key: Array | None = None,
              tau: float | Array = 1.0,
              num_iters: int = 30,
              normalize: bool = False) -> Array:
  """Gumbel-Sinkhorn soft permutation for descending order: f32[B, N(ranks), N(items)].

  P[b, j, i] is the soft probability that item i holds rank j (rank 0 = highest score). Rows and
  columns sum to ~1 (rows exactly). Computed and returned in float32 for float32, bfloat16 and
  float16 inputs (`compute_dtype`); gradients flow back in the input's dtype.

  Args:
    scores: f32 or bf16[B, N], finite. Larger means more important.
    key: PRNG key for the Gumbel(0, 1) noise added to log_alpha, or keys[B] (one per row: the
      noise of a row then does not depend on how the batch is split over devices); None turns
      the noise off.
    tau: temperature > 0 (a scalar; may be traced, e.g. an annealing schedule under jit).
    num_iters: Sinkhorn iterations (METHOD.md: 30).
    normalize: min-max each row of scores onto the anchor range [0, 1] first (off in the paper).
  """
  checks.rank(scores, 2, "scores", "f32[B, N]")
  checks.floating(scores, "scores")
  checks.finite(scores, "scores")
  checks.positive(tau, "tau")
  s = scores.astype(compute_dtype(scores.dtype))
  if normalize:
    s = normalize_to_anchor_range(s)
  a = rank_anchors(s.shape[-1], s.dtype)
  # -(s_i - a_j)^2 = 2 a_j s_i - a_j^2 - s_i^2: the bilinear part as the matrix, -a_j^2 as the
  # rank offset, and -s_i^2 dropped (the first normalisation over ranks removes it exactly).
  log_alpha = 2.0 * a[:, None] * s[:, None, :]
  if key is not None:
    log_alpha = log_alpha + gumbel_noise(key, log_alpha.shape, log_alpha.dtype)
  return jnp.exp(sinkhorn(log_alpha / tau, num_iters, rank_offset=-jnp.square(a) / tau))
