"""Checks of what a user passes in, raised where it enters with a message saying what was expected.

Value checks (finite, range) need concrete values: they run when a function is called eagerly or
on NumPy inputs, and are skipped for tracers inside `jit`, where values are unknown. Shape, rank
and dtype checks always run, as they are known at trace time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def rank(x: Any, expected_rank: int, name: str, expected: str) -> None:
  """Raises ValueError unless x has `expected_rank` dimensions; `expected` spells the shape."""
  ndim = np.ndim(x)
  if ndim != expected_rank:
    raise ValueError(f"{name} must have shape {expected} ({expected_rank} dims), "
                     f"got shape {tuple(np.shape(x))}")


def shape(x: Any, expected_shape: Sequence[int | None], name: str, expected: str) -> None:
  """Raises ValueError unless x's shape matches `expected_shape` (None matches any size)."""
  got = tuple(np.shape(x))
  ok = len(got) == len(expected_shape) and all(
      e is None or e == g for e, g in zip(expected_shape, got))
  if not ok:
    raise ValueError(f"{name} must have shape {expected}, got shape {got}")


def floating(x: Any, name: str) -> None:
  """Raises ValueError unless x has a floating dtype (float32, bfloat16, float16, float64)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def integer(x: Any, name: str) -> None:
  """Raises ValueError unless x has an integer dtype."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")


def finite(x: Any, name: str) -> None:
  """Raises ValueError if a concrete x holds NaN or inf."""
  if _is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x, np.float32)))):
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, np.float32))))
    raise ValueError(f"{name} must be finite, got {bad} NaN or inf value(s)")


def positive(x: Any, name: str) -> None:
  """Raises ValueError unless a concrete scalar x is finite and > 0."""
  if np.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {tuple(np.shape(x))}")
  if _is_concrete(x) and not (np.isfinite(float(x)) and float(x) > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {float(x)}")


def non_negative(value: Any, name: str) -> None:
  """Raises ValueError unless a static number (a config field) is finite and >= 0."""
  if not (np.isfinite(float(value)) and float(value) >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def in_range(x: Any, lo: float, hi: float, name: str) -> None:
  """Raises ValueError unless every value of a concrete x lies in [lo, hi]."""
  if _is_concrete(x):
    v = np.asarray(x, np.float64)
    if v.size and not (np.all(np.isfinite(v)) and v.min() >= lo and v.max() <= hi):
      raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                       f"[{np.nanmin(v)}, {np.nanmax(v)}]")


def fractions(x: Any, name: str = "fractions") -> np.ndarray:
  """Returns fractions as f64[K] NumPy, after checking: 1-D, >= 2 points, in [0, 1], increasing.

  Fractions are protocol constants, so they must be concrete (not traced). They stay float64 on
  the host so that counts like round(0.1 * 25) are computed the same way everywhere.
  """
  if not _is_concrete(x):
    raise ValueError(f"{name} must be concrete (a list or NumPy array), not a traced value")
  v = np.asarray(x, np.float64)
  rank(v, 1, name, "f32[K]")
  if v.size < 2:
    raise ValueError(f"{name} needs at least 2 points for an area under the curve, got {v.size}")
  in_range(v, 0.0, 1.0, name)
  if np.any(np.diff(v) <= 0):
    raise ValueError(f"{name} must be strictly increasing, got {v.tolist()}")
  return v


def choice(value: Any, options: Sequence[Any], name: str) -> None:
  """Raises ValueError unless value is one of options."""
  if value not in options:
    raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def static_int(value: Any, name: str, minimum: int = 1) -> int:
  """Returns value as int after checking it is a Python/NumPy integer >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def per_image_key(key: Any, batch: int, name: str = "key") -> bool:
  """False for one PRNG key, True for one per image (keys[batch]); raises for anything else.

  Both a typed key (jax.random.key) and a raw uint32[2] one (jax.random.PRNGKey) are accepted.
  """
  shape, dtype = tuple(np.shape(key)), getattr(key, "dtype", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if not typed and (not shape or shape[-1] != 2 or dtype is None
                    or not jnp.issubdtype(dtype, jnp.unsignedinteger)):
    raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)) or one per image, got "
                     f"{dtype or type(key).__name__} of shape {shape}")
  batch_shape = shape if typed else shape[:-1]
  if batch_shape not in ((), (batch,)):
    raise ValueError(f"{name} must be one PRNG key or one per image (keys[{batch}]), got keys "
                     f"of shape {batch_shape}")
  return batch_shape == (batch,)


def existing_path(path: Any, field: str, what: str, kind: str = "file",
                  noun: str | None = None) -> Path:
  """Path(path) after checking it names an existing file (kind 'file') or folder ('folder');
  else a ValueError naming the config field to set. Nothing is ever downloaded.

  Args:
    field: the config field or flag that sets the path, e.g. 'config.target.weights'.
    what: who needs it, e.g. "target 'vit_b16'".
    noun: what to call it in the message (default: `kind`), e.g. 'weights file'.
  """
  choice(kind, ("file", "folder"), "kind")
  noun = noun or kind
  # A config field is set on the train.py command line as --config.<field>=...
  flag = f" (train.py --{field}=PATH)" if field.startswith("config.") else ""
  if not path:
    raise ValueError(f"{what} needs a {noun}: set {field}{flag} to its path (nothing is "
                     f"downloaded)")
  p = Path(path).expanduser()
  if not (p.is_file() if kind == "file" else p.is_dir()):
    raise ValueError(f"{what}: {noun} {str(p)!r} does not exist; set {field}{flag} to the path "
                     f"of an existing {noun} (nothing is downloaded)")
  return p


@contextlib.contextmanager
def explain_out_of_memory(advice: str) -> Iterator[None]:
  """Turns an accelerator's out-of-memory error (XLA's RESOURCE_EXHAUSTED) raised in the block
  into a MemoryError that says what to change (`advice`), chained to the original."""
  try:
    yield
  except RuntimeError as e:  # jax.errors.JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = str(e).strip().splitlines()[0][:300]
    raise MemoryError(f"out of accelerator memory ({first}); {advice}") from e
