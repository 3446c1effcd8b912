"""l2r-jax: Learn to Rank visual attribution (Schinagl et al., ECCV 2026) in JAX/Flax.

One idea per module: `sorting` (Gumbel-Sinkhorn), `perturb` (masks, references, blending),
`objectives` (the differentiable training loss), `metrics` (hard-ranking evaluation), `checks`
(input validation).
"""

__version__ = "0.1.0"
