"""TFDS datasets by builder name, read with random access (`tfds.data_source`, ArrayRecord files),
so grain shuffles, shards and decodes them like every other source. Reading needs no TensorFlow.

Nothing is downloaded: a dataset must already be prepared in `data_dir`, or be preparable from
files the user has (`manual_dir`, e.g. the ILSVRC-2012 tars for 'imagenet2012'). Preparing runs
TFDS's builder, which needs TensorFlow: `pip install 'l2r-jax[tfds-prepare]'` (an optional
extra). Prepared data must be in the ArrayRecord format (`file_format='array_record'`), the format
that supports random access; this module asks for it when it prepares.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DATA_DIR_FIELD = "config.data.data_dir"
MANUAL_DIR_FIELD = "config.data.manual_dir"


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """A TFDS split: `[i]` -> {'image': uint8[H, W, 3], 'label': int, 'id': str}. Labels are
  checked as they are read (a full pass up front would read the whole dataset)."""
  data: Any  # a tfds data source (random access)
  num_classes: int
  name: str
  class_names: tuple[str, ...] | None = None
  image_key: str = "image"
  label_key: str = "label"
  unlabeled_ok: bool = False

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    example = self.data[i]
    label = int(example[self.label_key])
    if not (0 <= label < self.num_classes):
      raise ValueError(f"{self.name}: example {i} has label {label} outside [0, "
                       f"{self.num_classes}); check label_key={self.label_key!r}")
    for key in ("file_name", "id"):
      if key in example:
        value = example[key]
        id_ = value.decode() if isinstance(value, bytes) else str(value)
        break
    else:
      id_ = f"{self.name}:{i}"
    return {"image": np.asarray(example[self.image_key]), "label": label, "id": id_}


def tfds(name: str, *, split: str = "train", data_dir: str | None = None,
         manual_dir: str | None = None, image_key: str = "image",
         label_key: str = "label") -> TfdsSource:
  """The TFDS dataset `name` (e.g. 'imagenet2012', 'cifar10', 'imagenette'), split `split`
  (TFDS split syntax: 'validation', 'train[:10%]').

  data_dir: where prepared TFDS data lives (default: TFDS's, ~/tensorflow_datasets).
  manual_dir: if given, and the dataset is not prepared yet, prepare it from the files there
    (needs TensorFlow, see the module docstring). Without it nothing is prepared or downloaded.
  """
  import tensorflow_datasets as tfds_lib

  if not name:
    raise ValueError("the tfds source needs a builder name: set config.data.builder (e.g. "
                     "'imagenet2012')")
  try:
    builder = tfds_lib.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises many types for unknown names and bad versions
    raise ValueError(f"tfds: cannot make builder {name!r} ({e}); check config.data.builder") from e
  prepare_kwargs = None
  if manual_dir:
    try:
      import tensorflow  # noqa: F401 (TFDS builders need it to prepare)
    except ImportError as e:
      raise ValueError("tfds: preparing a dataset needs TensorFlow: `pip install "
                       "'l2r-jax[tfds-prepare]'` (or prepare it elsewhere and set "
                       f"{DATA_DIR_FIELD})") from e
    prepare_kwargs = {"download_config": tfds_lib.download.DownloadConfig(manual_dir=manual_dir)}
  try:
    # download=True only with a manual_dir: then TFDS prepares from the user's files (for
    # imagenet2012 nothing is fetched); without one, an unprepared dataset is an error.
    data = tfds_lib.data_source(name, split=split, data_dir=data_dir,
                                download=bool(manual_dir),
                                builder_kwargs={"file_format": "array_record"},
                                download_and_prepare_kwargs=prepare_kwargs)
  except Exception as e:  # not prepared, wrong split, tfrecord-only data: many exception types
    raise ValueError(
        f"tfds: cannot read split {split!r} of {name!r} from {str(builder.data_dir)!r} ({e}). "
        f"Nothing is downloaded: the data must be prepared there as ArrayRecord "
        f"(file_format='array_record'); set {DATA_DIR_FIELD} to where it is, or "
        f"{MANUAL_DIR_FIELD} to the files TFDS prepares it from (e.g. the ILSVRC-2012 tars for "
        f"imagenet2012; needs `pip install 'l2r-jax[tfds-prepare]'`)") from e
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"tfds: {name!r} has features {list(features)}; set image_key / label_key "
                     f"to its image and class label")
  label = features[label_key]
  num_classes = getattr(label, "num_classes", None)
  if not num_classes:
    raise ValueError(f"tfds: feature {label_key!r} of {name!r} is not a ClassLabel")
  names = tuple(label.names) if getattr(label, "names", None) else None
  if name.split(":")[0] == "imagenet2012":
    from l2r_jax.data import sources
    names = sources.imagenet_class_names() or names
  return TfdsSource(data, num_classes=int(num_classes), name=f"{name}/{split}",
                    class_names=names, image_key=image_key, label_key=label_key)

