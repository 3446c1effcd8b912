"""The one timing rule of the bench scripts: the median of `repeats` runs after a warm-up run that
compiles, each waited for (`block_until_ready`), so asynchronous dispatch is not timed as done."""
import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
  """Median wall seconds of `fn()` over `repeats` runs after one untimed warm-up run."""
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)
