"""Data sources and pipeline: every source on tiny real inputs, exact coverage under sharding,
determinism, and the errors users meet."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import l2r_jax.data as data
from l2r_jax.data import embedded, folders, pipeline, sources

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOLDFISH, TABBY = "n01443537", "n02123045"  # ImageNet classes 1 and 281


def _write_jpeg(path: Path, seed: int, size=(20, 24), mode="RGB") -> None:
  rng = np.random.default_rng(seed)
  shape = (size[0], size[1], 3) if mode == "RGB" else size
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=90)


def _batches(source, **kwargs):
  kwargs.setdefault("preprocess", pipeline.resize_to(8))
  kwargs.setdefault("worker_threads", 2)
  return list(pipeline.make_batches(source, **kwargs))


def _tiny_array_source(n=10, num_classes=3):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
  return sources.ArraySource(images, np.arange(n) % num_classes, num_classes=num_classes,
                             name="tiny")


# ----------------------------------------------------------------------------- sources


def test_mnist5k_real_digits_and_fixed_split():
  train, test = embedded.mnist5k("train"), embedded.mnist5k("test")
  assert (len(train), len(test)) == (4000, 1000)
  assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10
  ids = {train[i]["id"] for i in range(len(train))} | {test[i]["id"] for i in range(len(test))}
  assert len(ids) == 5000  # disjoint and complete
  digit = test[0]["image"]
  assert digit.shape == (28, 28) and digit.dtype == np.uint8
  # Real digits: dark background with bright strokes, not noise.
  assert np.mean(digit[:3]) < 5 and digit.max() > 200
  assert np.array_equal(embedded.mnist_split_indices("test"),
                        embedded.mnist_split_indices("test"))
  with pytest.raises(ValueError, match="config.data.split"):
    embedded.mnist5k("val")


def test_photos_have_imagenet_classes():
  pytest.importorskip("skimage")
  src = embedded.photos()
  by_id = {src[i]["id"]: src[i]["label"] for i in range(len(src))}
  assert by_id["chelsea"] == 281 and by_id["coffee"] == 967
  assert src.num_classes == 1000
  everything = embedded.photos(labeled_only=False)
  assert len(everything) > len(src)
  batch, = _batches(everything, batch_size=len(everything))
  assert batch["image"].shape == (len(everything), 8, 8, 3) and batch["mask"].all()
  assert -1 in batch["label"]  # unlabelled photos pass through as -1


def test_image_folder_imagenet_and_sorted(tmp_path):
  for wnid, count in ((GOLDFISH, 2), (TABBY, 3)):
    (tmp_path / wnid).mkdir()
    for k in range(count):
      _write_jpeg(tmp_path / wnid / f"{k}.JPEG", seed=k)
  src = folders.image_folder(tmp_path)
  assert len(src) == 5 and src.num_classes == 1000
  assert sorted(src.labels.tolist()) == [1, 1, 281, 281, 281]
  assert src[0]["id"] == f"{GOLDFISH}/0.JPEG"
  src = folders.image_folder(tmp_path, class_index="sorted")
  assert src.labels.tolist() == [0, 0, 1, 1, 1] and src.class_names == (GOLDFISH, TABBY)
  batch, = _batches(src, batch_size=5)
  assert batch["image"].shape == (5, 8, 8, 3) and batch["image"].dtype == np.float32


def test_ilsvrc_val_official_labels(tmp_path):
  # The first two validation images are a sea snake (n01751748, class 65) and an alp (970).
  for number in (1, 2):
    _write_jpeg(tmp_path / f"ILSVRC2012_val_{number:08d}.JPEG", seed=number)
  src = folders.ilsvrc_val(tmp_path)
  assert src.labels.tolist() == [65, 970]
  (tmp_path / "ILSVRC2012_val_00050001.JPEG").write_bytes(b"")
  with pytest.raises(ValueError, match="ILSVRC2012_val_"):
    folders.ilsvrc_val(tmp_path)


def test_imagenet_samples_naming(tmp_path):
  _write_jpeg(tmp_path / f"{GOLDFISH}_goldfish.JPEG", seed=0)
  _write_jpeg(tmp_path / f"{TABBY}_tabby.JPEG", seed=1)
  src = folders.imagenet_samples(tmp_path)
  assert src.labels.tolist() == [1, 281] and src[1]["id"] == f"{TABBY}_tabby.JPEG"
  _write_jpeg(tmp_path / "goldfish.JPEG", seed=2)
  with pytest.raises(ValueError, match="<wnid>_<name>"):
    folders.imagenet_samples(tmp_path)


def test_npz_source(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "tiny.npz", images=images, labels=np.array([0, 1, 2, 1, 0]),
           class_names=np.array(["a", "b", "c"]))
  src = folders.npz(tmp_path / "tiny.npz")
  assert len(src) == 5 and src.num_classes == 3 and src.class_names == ("a", "b", "c")
  batch, = _batches(src, batch_size=5, preprocess=pipeline.resize_to(4))
  np.testing.assert_allclose(batch["image"], images / 255.0, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 1, 0])
  np.savez(tmp_path / "bad.npz", images=images, labels=np.array([0, 1, 2, 3, 0]),
           class_names=np.array(["a", "b", "c"]))
  with pytest.raises(ValueError, match="outside the class range"):
    folders.npz(tmp_path / "bad.npz")
  np.savez(tmp_path / "nolabels.npz", images=images)
  with pytest.raises(ValueError, match="lacks"):
    folders.npz(tmp_path / "nolabels.npz")


def test_tfds_source_through_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  from l2r_jax.data import tfds_source
  with tfds.testing.mock_data(num_examples=6):
    src = data.create("tfds", builder="cifar10", split="test")
    assert len(src) == 6 and src.num_classes == 10
    batches = _batches(src, batch_size=4)
  assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
  assert batches[0]["image"].shape == (4, 8, 8, 3)
  with pytest.raises(ValueError, match="config.data.data_dir"):
    tfds_source.tfds("cifar10", split="test", data_dir="/nonexistent/tfds")


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="config.data.root"):
    data.create("image_folder", root=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="config.data.root"):
    data.create("image_folder")
  with pytest.raises(ValueError, match="no class sub-folders"):
    folders.image_folder(tmp_path)
  (tmp_path / "cat").mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    folders.image_folder(tmp_path)
  (tmp_path / "cat" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="not images"):
    folders.image_folder(tmp_path)
  with pytest.raises(ValueError, match="config.data.source"):
    data.create("imagenet21k")


def test_unreadable_image_is_an_error_not_a_skip(tmp_path):
  (tmp_path / "a").mkdir()
  _write_jpeg(tmp_path / "a" / "good.jpg", seed=0)
  (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
  src = folders.image_folder(tmp_path)
  with pytest.raises(ValueError, match="broken.jpg"):
    _batches(src, batch_size=2)


def test_grayscale_becomes_rgb(tmp_path):
  (tmp_path / "a").mkdir()
  _write_jpeg(tmp_path / "a" / "gray.jpg", seed=0, mode="L")
  batch, = _batches(folders.image_folder(tmp_path), batch_size=1)
  image = batch["image"][0]
  assert image.shape == (8, 8, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharded_evaluation_covers_each_example_once(process_count, shuffle):
  src = _tiny_array_source(n=10)
  seen = collections.Counter()
  lengths = set()
  for p in range(process_count):
    batches = _batches(src, batch_size=4, shuffle=shuffle, seed=3, process_index=p,
                       process_count=process_count)
    lengths.add(len(batches))
    for b in batches:
      assert b["image"].shape == (4 // process_count, 8, 8, 3)
      seen.update(b["id"][b["mask"]].tolist())
      assert all(i == "" for i in b["id"][~b["mask"]])
  assert lengths == {3}  # every process runs the same number of steps: ceil(10 / 4)
  assert seen == collections.Counter(f"tiny:{i}" for i in range(10))


def test_mask_pads_to_global_batch_and_labels_follow_images():
  src = _tiny_array_source(n=10)
  batches = _batches(src, batch_size=8, process_index=1, process_count=2)
  assert [b["mask"].tolist() for b in batches] == [[True] * 4, [False] * 4]
  first = batches[0]
  np.testing.assert_array_equal(first["label"], [int(i.split(":")[1]) % 3 for i in first["id"]])


def test_determinism_and_epoch_reshuffle():
  src = _tiny_array_source(n=12)
  kwargs = dict(batch_size=4, shuffle=True, seed=7, num_epochs=2, drop_remainder=True,
                augment=pipeline.Augment(size=(5, 5)))
  a, b = _batches(src, **kwargs), _batches(src, worker_threads=1, **kwargs)
  assert len(a) == 6
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["id"], y["id"])
  epoch0 = np.concatenate([x["id"] for x in a[:3]])
  epoch1 = np.concatenate([x["id"] for x in a[3:]])
  assert sorted(epoch0) == sorted(epoch1) and list(epoch0) != list(epoch1)
  c = _batches(src, **{**kwargs, "seed": 8})
  assert list(np.concatenate([x["id"] for x in c[:3]])) != list(epoch0)


def test_training_drops_remainder_and_streams_forever():
  src = _tiny_array_source(n=10)
  batches = pipeline.make_batches(src, batch_size=4, preprocess=pipeline.resize_to(8),
                                  shuffle=True, num_epochs=None, drop_remainder=True,
                                  process_index=0, process_count=1, worker_threads=2)
  assert batches.batches_per_epoch == 2
  it = iter(batches)
  got = [next(it) for _ in range(7)]  # past several epochs
  assert all(b["mask"].all() and b["image"].shape == (4, 8, 8, 3) for b in got)


def test_augment_random_resized_crop_and_flip():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, :30] = 255  # left half white: a flip moves it
  aug = pipeline.Augment(size=(16, 16), scale=(1.0, 1.0), ratio=(1.5, 1.5))
  outs = [pipeline.random_resized_crop(image, aug, np.random.default_rng(s)) for s in range(20)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.float32 for o in outs)
  # Full-area crop at the image's own aspect: the result is the image, maybe mirrored.
  lefts = {round(float(o[:, :4].mean())) for o in outs}
  assert lefts == {0, 1}


def test_pipeline_argument_errors():
  src = _tiny_array_source(n=10)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_batches(src, batch_size=6, preprocess=pipeline.resize_to(8), process_index=0,
                          process_count=4)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_batches(src, batch_size=16, preprocess=pipeline.resize_to(8),
                          drop_remainder=True, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="preprocess"):
    pipeline.make_batches(src, batch_size=2, process_index=0, process_count=1)


def test_default_process_index_is_jax():
  src = _tiny_array_source(n=4)
  batches = pipeline.make_batches(src, batch_size=4, preprocess=pipeline.resize_to(8))
  assert batches.local_batch_size == 4 and len(batches) == 1  # single-process test session


# ----------------------------------------------------------------------------- shared data


@pytest.mark.skipif(not (SHARED / "imagenet_samples").is_dir(), reason="no ../shared data")
def test_shared_imagenet_samples():
  src = folders.imagenet_samples(SHARED / "imagenet_samples")
  assert len(src) == 800 and len(set(src.labels.tolist())) == 800
  by_id = {src[i]["id"]: int(src.labels[i]) for i in range(len(src))}
  assert by_id["n01443537_goldfish.JPEG"] == 1
  first = _batches(src, batch_size=8, num_epochs=1, preprocess=pipeline.resize_to(32))[0]
  assert first["image"].shape == (8, 32, 32, 3) and 0 <= first["image"].min() <= 1


@pytest.mark.skipif(not (SHARED / "cifar10_test_8k.npz").is_file(), reason="no ../shared data")
def test_shared_cifar10_npz():
  src = folders.npz(SHARED / "cifar10_test_8k.npz")
  assert len(src) == 8000 and src.num_classes == 10 and src.class_names[0] == "airplane"
  assert np.bincount(src.labels, minlength=10).min() > 0


def test_start_batch_resumes_the_stream_exactly():
  from l2r_jax import data
  images = (np.arange(30 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(30, 4, 4, 3)
  source = data.ArraySource(images, np.arange(30) % 3, num_classes=3, name="tiny")
  kw = dict(batch_size=4, preprocess=lambda im: im.astype(np.float32) / 255.0, seed=3,
            shuffle=True, num_epochs=None, drop_remainder=True, process_index=0,
            process_count=1)
  it = iter(data.make_batches(source, **kw))
  whole = [next(it) for _ in range(12)]  # crosses epochs: 7 batches per epoch
  it = iter(data.make_batches(source, start_batch=5, **kw))
  for want in whole[5:]:
    got = next(it)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


# ----------------------------------------------------------------------------- splits


def test_slice_splits_partition_one_fixed_shuffle():
  n = 1003
  train = sources.split_indices(n, "[:80%]", "x")
  held = sources.split_indices(n, "[80%:]", "x")
  assert len(train) == 802 and len(held) == 201
  assert np.intersect1d(train, held).size == 0
  np.testing.assert_array_equal(np.union1d(train, held), np.arange(n))
  # Not the first 80% in file order (a sorted folder would put whole classes in one part) ...
  assert held.max() > 900 and held.min() < 100
  # ... and the same cut on every call, whatever the run seed.
  np.testing.assert_array_equal(held, sources.split_indices(n, "[80%:]", "x"))
  np.testing.assert_array_equal(sources.split_indices(n, "[:100]", "x"),
                                np.sort(np.random.default_rng(0).permutation(n)[:100]))
  np.testing.assert_array_equal(sources.split_indices(n, "all", "x"), np.arange(n))


@pytest.mark.parametrize("split", ["train", "[80%]", "[:150%]", "[5:5]", "0:10"])
def test_bad_slice_splits(split):
  with pytest.raises(ValueError, match="split"):
    sources.split_indices(100, split, "x")


def test_create_cuts_splits_from_sources_without_their_own(tmp_path):
  images = np.arange(20 * 4 * 4 * 3, dtype=np.uint8).reshape(20, 4, 4, 3)
  np.savez(tmp_path / "a.npz", images=images, labels=np.arange(20) % 5)
  whole = data.create("npz", root=str(tmp_path / "a.npz"))
  train = data.create("npz", root=str(tmp_path / "a.npz"), split="[:75%]")
  held = data.create("npz", root=str(tmp_path / "a.npz"), split="[75%:]")
  assert (len(whole), len(train), len(held)) == (20, 15, 5)
  assert train.num_classes == 5 and held.name == "a[75%:]"
  ids = {train[i]["id"] for i in range(15)} | {held[i]["id"] for i in range(5)}
  assert ids == {whole[i]["id"] for i in range(20)}
  i = int(held.indices[0])
  np.testing.assert_array_equal(held[0]["image"], images[i])
  np.testing.assert_array_equal(held.labels, np.arange(20)[held.indices] % 5)


def test_subsample_is_fixed_and_spread_over_a_class_sorted_source():
  test = data.create("mnist5k", split="test")  # 100 digits of each class, sorted by class
  assert list(test.labels[:100]) == [0] * 100
  sample = sources.subsample(test, 50)
  assert len(sample) == 50 and len(set(sample.labels.tolist())) == 10
  assert np.all(np.diff(sample.indices) > 0)
  np.testing.assert_array_equal(sample.indices, sources.subsample(test, 50).indices)
  assert sources.subsample(test, 0) is test and sources.subsample(test, 5000) is test


def test_chunks_of_a_draw_partition_it_and_keep_each_images_position():
  """draw_chunk: consecutive chunks of the 50-digit draw hold its 50 digits once each, the first
  chunk of n is the draw of n (subsample's draws are nested), and each digit's position is its
  place in the whole draw; the same for a draw of all of the source."""
  test = data.create("mnist5k", split="test")
  for n in (50, 0):
    whole = sources.subsample(test, n)
    indices = np.asarray(getattr(whole, "indices", np.arange(len(test))))
    size = len(indices)
    cuts = (0, 7, 20, size)
    chunks = [sources.draw_chunk(test, n, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    got = np.concatenate([c.indices for c, _ in chunks])
    np.testing.assert_array_equal(np.sort(got), indices)
    for chunk, positions in chunks:
      assert np.all(np.diff(chunk.indices) > 0)
      np.testing.assert_array_equal(indices[positions], chunk.indices)
      np.testing.assert_array_equal(chunk.labels, test.labels[chunk.indices])
    np.testing.assert_array_equal(chunks[0][0].indices, sources.subsample(test, 7).indices)
  for start, stop in ((5, 5), (-1, 3), (0, 51)):
    with pytest.raises(ValueError, match=f"chunk {start}:{stop} must satisfy"):
      sources.draw_chunk(test, 50, start, stop)


# The configs' held-out splits on the real data: no evaluation image is in training (checked by
# content, not only by index), and on imagenet_samples no evaluation class either.
_CONFIG_DATA = (("configs/vit.py", None, ""),
                ("configs/resnet.py", "cifar10", "cifar10_test_8k.npz"),
                ("configs/efficientnet.py", None, "imagenet_samples"))


@pytest.mark.parametrize("path,arg,root", _CONFIG_DATA)
def test_config_splits_are_disjoint_by_content(path, arg, root):
  import hashlib
  import importlib.util

  from l2r_jax import train
  if root and not (SHARED / root).exists():
    pytest.skip("no ../shared data")
  spec = importlib.util.spec_from_file_location("cfg", Path(__file__).parents[1] / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if root:
    config.data.root = str(SHARED / root)

  def content(image):  # a file's bytes (folders hold paths) or the decoded array's
    if isinstance(image, (str, Path)):
      return Path(image).read_bytes()
    return np.ascontiguousarray(image).tobytes()

  def digests(split):
    src = train.source(config, split)
    return ([hashlib.sha1(content(src[i]["image"])).hexdigest() for i in range(len(src))],
            np.asarray(src.labels))

  train_hashes, train_labels = digests(config.data.train_split)
  eval_hashes, eval_labels = digests(config.data.eval_split)
  assert len(train_hashes) > 0 and len(eval_hashes) > 0
  assert not set(train_hashes) & set(eval_hashes)
  if root == "imagenet_samples":
    assert (len(train_hashes), len(eval_hashes)) == (640, 160)
    assert not set(train_labels.tolist()) & set(eval_labels.tolist())
  # Fixed: the same split on a second reading.
  assert digests(config.data.eval_split)[0] == eval_hashes
