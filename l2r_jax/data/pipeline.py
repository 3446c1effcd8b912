"""The input pipeline: a source -> this process's batches, for training and for evaluation.

Every process computes the same global order (one permutation per epoch from `seed`), cuts it
into global batches of `batch_size`, and takes its own contiguous slice of b = batch_size /
process_count examples from each. So the processes stay in lockstep (same number of batches),
and the union of their batches is the global batch.

- Training (drop_remainder=True): each epoch yields floor(N / batch_size) full batches; the tail
  of the permutation is left for a later epoch's shuffle.
- Evaluation (drop_remainder=False): ceil(N / batch_size) batches; the last global batch is
  padded to full size with copies of real examples whose `mask` is False (and id ''), so that a
  masked mean counts every example exactly once over all processes.

Decoding, preprocessing and augmentation run in grain's worker threads (Pillow releases the GIL
while decoding and resizing), with optional worker processes; only file names and indices are
held in memory, so a folder of any size streams. Per-example randomness is drawn from
(seed, epoch, index), so batches do not depend on thread timing, worker count or process count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from l2r_jax import checks
from l2r_jax.data import sources

Preprocess = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation: Inception-style random resized crop to `size`, then a random
  horizontal flip. Replaces the target's resize / crop (its output is already `size`)."""
  size: tuple[int, int]
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  resample: str = "bilinear"


def resize_to(size: int | tuple[int, int], resample: str = "bilinear") -> Preprocess:
  """The paper's ImageNet preprocessing: a plain resize to size x size (aspect not kept, no
  crop): uint8 image -> f32[size, size, 3] in [0, 1]."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  from l2r_jax.targets import base
  return functools.partial(base.resize_and_crop, resize=hw, resample=resample)


def random_resized_crop(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
  """f32[*aug.size, 3] in [0, 1]: a crop of area scale * H * W and aspect ratio in aug.ratio
  (log-uniform), resized to aug.size, flipped with probability 1/2. Falls back to the centre
  square-ish crop after 10 tries, as torchvision and tf.image do."""
  from l2r_jax.targets import base
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target_area = area * rng.uniform(*aug.scale)
    aspect = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:
    ch = cw = min(h, w)
    top, left = (h - ch) // 2, (w - cw) // 2
  out = base.resize_and_crop(image[top:top + ch, left:left + cw], resize=tuple(aug.size),
                             resample=aug.resample)
  if aug.flip and rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out, np.float32)


class _Plan(Sequence):
  """This process's stream of (epoch, source index, is_real), batch after batch.

  Position i of the stream is example k of this process's slice of global batch `batch` of
  epoch `epoch`; its global position in the epoch's order is batch * B + process_index * b + k.
  Positions past N (evaluation padding) repeat a real example with is_real False.
  """

  def __init__(self, n: int, batch_size: int, process_index: int, process_count: int,
               shuffle: bool, seed: int, num_epochs: int | None, drop_remainder: bool):
    self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.batches_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    self.per_epoch = self.batches_per_epoch * self.local
    self.num_epochs = num_epochs
    # An infinite stream still needs a length for grain's random access: big enough never to end.
    self.length = self.per_epoch * num_epochs if num_epochs is not None else sys.maxsize // 2

  def __len__(self) -> int:
    return self.length

  @functools.lru_cache(maxsize=2)  # noqa: B019 (the plan lives as long as its pipeline)
  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.n)
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __getitem__(self, i: int) -> tuple[int, int, bool]:
    if not 0 <= i < self.length:
      raise IndexError(i)
    epoch, j = divmod(int(i), self.per_epoch)
    batch, k = divmod(j, self.local)
    pos = batch * self.batch_size + self.offset + k
    if pos >= self.n:
      return epoch, int(self.order(epoch)[pos % self.n]), False
    return epoch, int(self.order(epoch)[pos]), True


def _load(plan_item: tuple[int, int, bool], *, source, preprocess: Preprocess,
          augment: Augment | None, seed: int) -> dict[str, Any]:
  epoch, index, real = plan_item
  item = source[index]
  image = sources.decode_image(item["image"])
  if augment is not None:
    rng = np.random.default_rng([seed, epoch, index, 1])
    pixels = random_resized_crop(image, augment, rng)
  else:
    pixels = preprocess(image)
  pixels = np.asarray(pixels)
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or not np.issubdtype(pixels.dtype, np.floating):
    raise ValueError(f"preprocess must return f32[H, W, 3] in [0, 1], got {pixels.dtype} "
                     f"{pixels.shape} for {item['id']!r}")
  return {"image": pixels.astype(np.float32, copy=False), "label": np.int32(item["label"]),
          "id": item["id"] if real else "", "index": np.int32(index), "mask": np.bool_(real)}


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  shapes = {e["image"].shape for e in examples}
  if len(shapes) > 1:
    raise ValueError(f"preprocessed images differ in size {sorted(shapes)}: preprocess must give "
                     f"one size (e.g. the target's preprocess, or pipeline.resize_to(224))")
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.array([e["label"] for e in examples], np.int32),
          "id": np.array([e["id"] for e in examples], dtype=object),
          "index": np.array([e["index"] for e in examples], np.int32),
          "mask": np.array([e["mask"] for e in examples], bool)}


@dataclasses.dataclass
class Batches:
  """An iterable over this process's batches; `len()` is the number of batches when finite.

  Each batch: image f32[b, H, W, 3] in [0, 1], label i32[b], id object[b] (str; '' for padding),
  index i32[b] (the example's index in the source, whatever the batch size, shuffle or process;
  padding repeats a real example's), mask bool[b] (False for padding), b = batch_size //
  process_count.
  """
  dataset: Any  # a grain IterDataset
  batches_per_epoch: int
  num_epochs: int | None
  local_batch_size: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.dataset)

  def __len__(self) -> int:
    if self.num_epochs is None:
      raise TypeError("an infinite stream (num_epochs=None) has no length")
    return self.batches_per_epoch * self.num_epochs


def make_batches(source, *, batch_size: int, preprocess: Preprocess | None = None,
                 seed: int = 0, shuffle: bool = False, num_epochs: int | None = 1,
                 augment: Augment | None = None, drop_remainder: bool = False,
                 process_index: int | None = None, process_count: int | None = None,
                 worker_threads: int = 8, worker_processes: int = 0,
                 prefetch: int = 64, start_batch: int = 0) -> Batches:
  """This process's batches of `source` (see the module docstring for order and padding).

  Args:
    source: a random-access source (len, [i] -> {'image', 'label', 'id'}).
    batch_size: the GLOBAL batch size; must be divisible by process_count.
    preprocess: raw uint8[H, W, 3] -> f32[h, w, 3] in [0, 1] of one fixed size, e.g.
      `target.preprocess` or `resize_to(224)` (the paper's). Not used when `augment` is given.
    seed: fixes the shuffle and the augmentation.
    shuffle: a fresh permutation each epoch (training); False keeps the source's order.
    num_epochs: passes over the data; None streams forever (training by steps).
    augment: training augmentation; None for evaluation.
    drop_remainder: True drops the incomplete last batch of each epoch (training); False pads it
      with mask False (evaluation, every example once).
    process_index, process_count: default to jax.process_index() / jax.process_count().
    worker_threads: threads decoding and preprocessing (grain ReadOptions.num_threads).
    worker_processes: > 0 adds grain worker processes (for Python-heavy preprocessing); the
      source and preprocess must then be picklable.
    prefetch: examples decoded ahead per thread pool.
    start_batch: skip this many batches first (resuming a run: batch k is a pure function of
      seed and k, so a resumed stream continues exactly where the interrupted one stopped).
  """
  import grain

  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  batch_size = checks.static_int(batch_size, "batch_size")
  process_count = checks.static_int(process_count, "process_count")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if batch_size % process_count:
    raise ValueError(f"batch_size (global) {batch_size} must be divisible by the number of "
                     f"processes {process_count}; set config.batch_size to a multiple of it")
  if num_epochs is not None:
    num_epochs = checks.static_int(num_epochs, "num_epochs")
  if preprocess is None and augment is None:
    raise ValueError("make_batches needs preprocess (e.g. target.preprocess or "
                     "pipeline.resize_to(224)) or augment")
  n = len(source)
  if n == 0:
    raise ValueError(f"source {getattr(source, 'name', source)!r} is empty")
  plan = _Plan(n, batch_size, process_index, process_count, shuffle, seed, num_epochs,
               drop_remainder)
  if plan.batches_per_epoch == 0:
    raise ValueError(f"source {getattr(source, 'name', '')!r} has {n} examples, fewer than one "
                     f"batch of {batch_size} with drop_remainder=True; lower config.batch_size")
  load = functools.partial(_load, source=source, preprocess=preprocess, augment=augment,
                           seed=seed)
  ds = (grain.MapDataset.source(plan).map(load)
        .batch(plan.local, drop_remainder=True, batch_fn=_stack))
  if start_batch:
    ds = ds[checks.static_int(start_batch, "start_batch", minimum=0):]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=worker_threads,
                                            prefetch_buffer_size=prefetch))
  if worker_processes:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags in the workers; a library caller (notebook, pytest) has not
      # parsed any, and the defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes))
  return Batches(it, plan.batches_per_epoch, num_epochs, plan.local)
