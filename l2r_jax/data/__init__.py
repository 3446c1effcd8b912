"""Datasets: sources (random-access sequences of examples) and the pipeline that batches them.

`create(name, ...)` builds the source a config names; `make_batches(source, ...)` turns it into
this process's batches {'image' f32[b, H, W, 3] in [0, 1], 'label' i32[b], 'id', 'mask' bool[b]}.
grain and tensorflow_datasets are imported only by the functions that use them.
"""
from l2r_jax.data.pipeline import Augment, Batches, make_batches, resize_to
from l2r_jax.data import sources
from l2r_jax.data.sources import ArraySource, FileSource, decode_image

__all__ = ["Augment", "Batches", "make_batches", "resize_to", "ArraySource", "FileSource",
           "decode_image", "SOURCES", "create"]

SOURCES = ("mnist5k", "photos", "image_folder", "ilsvrc_val", "imagenet_samples", "npz", "tfds")


def create(name: str, *, root: str | None = None, split: str = "all", **kwargs):
  """The source a config names (config.data.source), with its location config.data.root.

  'mnist5k' (split 'train' / 'test' / 'all'), 'photos' (labeled_only), 'image_folder' (root;
  class_index), 'ilsvrc_val' (root), 'imagenet_samples' (root), 'npz' (root = the file;
  num_classes), 'tfds' (builder, split, data_dir, manual_dir, image_key, label_key).

  Splits: mnist5k has its own ('train', 'test', 'all'); tfds takes TFDS's split syntax; the other
  sources take 'all' or a slice of one fixed shuffle, '[:80%]' / '[80%:]' or '[:6000]' /
  '[6000:]' (`sources.split_indices`), so a train and a held-out part never overlap.
  """
  from l2r_jax.data import embedded, folders
  if name == "mnist5k":
    return embedded.mnist5k(split, **kwargs)
  if name == "tfds":
    from l2r_jax.data import tfds_source
    builder = kwargs.pop("builder", None)
    return tfds_source.tfds(builder, split=split, **kwargs)
  makers = {"photos": lambda: embedded.photos(**kwargs),
            "image_folder": lambda: folders.image_folder(root, **kwargs),
            "ilsvrc_val": lambda: folders.ilsvrc_val(root, **kwargs),
            "imagenet_samples": lambda: folders.imagenet_samples(root, **kwargs),
            "npz": lambda: folders.npz(root, **kwargs)}
  if name in makers:
    return sources.take_split(makers[name](), split)
  raise ValueError(f"unknown data source {name!r} (config.data.source); one of {list(SOURCES)}")
