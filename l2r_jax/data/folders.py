"""Sources read from the user's disk: image folders in three layouts, and `.npz` arrays.

Folder sources list file names only (decoding happens in the pipeline's workers), so they scale
to ImageNet's 1.28 million training files. The ImageNet layouts map wnids to the official
ILSVRC-2012 class indices (the position of the wnid in the sorted list of the 1000 wnids, shipped
in the tensorflow-datasets wheel), so a folder holding a subset of the classes still carries the
labels an ImageNet classifier predicts.
"""
from __future__ import annotations

import os
import re

import numpy as np

from l2r_jax import checks
from l2r_jax.data import sources

ROOT_FIELD = "config.data.root"
_WNID = re.compile(r"^n\d{8}$")
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
_SAMPLE_NAME = re.compile(r"^(n\d{8})_.+$")


def image_folder(root: str | os.PathLike | None, *, class_index: str = "auto",
                 name: str = "image_folder") -> sources.FileSource:
  """An ImageFolder tree `<root>/<class>/<image>`: one sub-folder per class.

  class_index:
    'imagenet': sub-folders are ILSVRC-2012 wnids, labels are ImageNet-1k indices (1000
      classes), whatever subset of wnids is present (Imagenette, a few classes of train/).
    'sorted': label = position of the sub-folder in the sorted list of sub-folders
      (torchvision's ImageFolder).
    'auto' (default): 'imagenet' if every sub-folder name is an ILSVRC-2012 wnid, else 'sorted'.
  An empty class folder is an error (a class without images is almost always a copy gone wrong).
  """
  path = sources.require_dir(root, ROOT_FIELD, "image_folder")
  classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
  if not classes:
    raise ValueError(f"image_folder: {str(path)!r} has no class sub-folders; the layout is "
                     f"<root>/<class>/<image> (set {ROOT_FIELD})")
  if class_index == "auto":
    wnids = sources.imagenet_class_index()
    class_index = "imagenet" if all(c in wnids for c in classes) else "sorted"
  if class_index == "imagenet":
    lookup = sources.imagenet_class_index()
    unknown = [c for c in classes if c not in lookup]
    if unknown:
      raise ValueError(f"image_folder: sub-folders {unknown[:5]} are not ILSVRC-2012 wnids; use "
                       f"class_index='sorted' for a non-ImageNet dataset")
    index = [lookup[c] for c in classes]
    num_classes, class_names = 1000, sources.imagenet_class_names()
  elif class_index == "sorted":
    index = list(range(len(classes)))
    num_classes, class_names = len(classes), tuple(classes)
  else:
    raise ValueError(f"class_index must be 'auto', 'imagenet' or 'sorted', got {class_index!r}")
  paths, labels = [], []
  for cls, label in zip(classes, index):
    files = sources.list_images(path / cls, f"image_folder class {cls!r}")
    if not files:
      raise ValueError(f"image_folder: class folder {str(path / cls)!r} holds no images")
    paths += [str(f) for f in files]
    labels += [label] * len(files)
  return sources.FileSource(paths, np.array(labels), num_classes=num_classes, name=name,
                            class_names=class_names, root=str(path))


def ilsvrc_val(root: str | os.PathLike | None) -> sources.FileSource:
  """The flat ILSVRC-2012 validation folder: `<root>/ILSVRC2012_val_00000001.JPEG` ... 50,000
  files, labelled with the official ground truth shipped in the tensorflow-datasets wheel.

  A subset of the files (e.g. the first 10,000) is fine: each file is labelled by its number.
  Any other file in the folder is an error.
  """
  path = sources.require_dir(root, ROOT_FIELD, "ilsvrc_val")
  truth = sources.package_file("tensorflow_datasets", "datasets", "imagenet2012",
                               "validation_labels.txt", install="tensorflow-datasets")
  wnids = truth.read_text().split()
  if len(wnids) != 50000:
    raise ValueError(f"{truth} should hold 50,000 validation labels, has {len(wnids)}")
  lookup = sources.imagenet_class_index()
  files = sources.list_images(path, "ilsvrc_val")
  if not files:
    raise ValueError(f"ilsvrc_val: {str(path)!r} holds no images (set {ROOT_FIELD} to the folder "
                     f"of ILSVRC2012_val_*.JPEG)")
  labels = []
  for f in files:
    m = _VAL_NAME.match(f.name)
    number = int(m.group(1)) if m else 0
    if not 1 <= number <= 50000:
      raise ValueError(f"ilsvrc_val: {str(f)!r} is not named ILSVRC2012_val_<00000001..00050000>"
                       f".JPEG; for a folder per class use source 'image_folder'")
    labels.append(lookup[wnids[number - 1]])
  return sources.FileSource([str(f) for f in files], np.array(labels), num_classes=1000,
                            name="ilsvrc_val", class_names=sources.imagenet_class_names(),
                            root=str(path))


def imagenet_samples(root: str | os.PathLike | None) -> sources.FileSource:
  """A flat folder of `<wnid>_<anything>.<ext>` files (the layout of shared/data/
  imagenet_samples): the class is the ImageNet-1k index of the wnid in the file name."""
  path = sources.require_dir(root, ROOT_FIELD, "imagenet_samples")
  lookup = sources.imagenet_class_index()
  files = sources.list_images(path, "imagenet_samples")
  if not files:
    raise ValueError(f"imagenet_samples: {str(path)!r} holds no images (set {ROOT_FIELD})")
  labels = []
  for f in files:
    m = _SAMPLE_NAME.match(f.stem)
    if not m or m.group(1) not in lookup:
      raise ValueError(f"imagenet_samples: {str(f)!r} is not named <wnid>_<name>.<ext> with an "
                       f"ILSVRC-2012 wnid (e.g. n01443537_goldfish.JPEG)")
    labels.append(lookup[m.group(1)])
  return sources.FileSource([str(f) for f in files], np.array(labels), num_classes=1000,
                            name="imagenet_samples", class_names=sources.imagenet_class_names(),
                            root=str(path))


def npz(path: str | os.PathLike | None, *, num_classes: int | None = None) -> sources.ArraySource:
  """Arrays from a `.npz` file: `images` uint8[N, H, W, 3] (or [N, H, W]), `labels` int[N], and
  optionally `class_names` str[C]. The number of classes is `num_classes`, else
  len(class_names), else max(label) + 1."""
  path = checks.existing_path(path, ROOT_FIELD, "the npz source", "file",
                              noun=".npz file (with 'images' and 'labels')")
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in ("images", "labels") if k not in f.files]
    if missing:
      raise ValueError(f"npz: {str(path)!r} lacks {missing} (has {f.files}); it needs 'images' "
                       f"uint8[N, H, W, 3] and 'labels' int[N]")
    images, labels = f["images"], f["labels"]
    class_names = tuple(str(c) for c in f["class_names"]) if "class_names" in f.files else None
  if num_classes is None:
    num_classes = len(class_names) if class_names else int(np.max(labels, initial=-1)) + 1
  return sources.ArraySource(images, labels, num_classes=num_classes, name=path.stem,
                             class_names=class_names, ids=None)
