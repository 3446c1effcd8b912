"""The evaluation suite on a real (smoke) training run: outputs, numbers against the brute-force
reference, and the errors a user meets."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from configs import vit as vit_config
from l2r_jax import evaluate, explainer, train

METHODS = ("l2r", "l2r_refined", "random", "gradcam", "rollout")
PROTOCOLS = ("paper", "black", "noise", "patch", "chefer")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = vit_config.get_config("smoke")
  config.eval.num_examples = 12  # not a multiple of the batch: the padding must not count
  train.train_and_evaluate(config, workdir)
  results = evaluate.evaluate(workdir, methods=METHODS, protocol_names=PROTOCOLS, batch_size=8,
                              refine_steps=2, refine_samples=2)
  return workdir, results


def test_outputs(run):
  workdir, results = run
  for name in ("results.json", "results.md", "curves.png", "examples.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert set(on_disk["methods"]) == set(METHODS) and set(on_disk["protocols"]) == set(PROTOCOLS)
  for method, row in on_disk["methods"].items():
    assert row["seconds_per_image"] > 0
    for name in PROTOCOLS:
      for k, s in row[name].items():
        assert s["n"] == 12, (method, name, k)
        assert np.isfinite(s["mean"]) and s["se"] >= 0
  assert len(on_disk["curves"]["l2r"]["deletion"]) == 21
  # What l2r_refined ran with: the call's steps and samples, the run's learning rate.
  assert on_disk["refine"]["steps"] == 2 and on_disk["refine"]["num_samples"] == 2
  assert on_disk["refine"]["learning_rate"] == 0.3  # configs/vit.py's
  assert "l2r_refined: 2 steps of Adam at learning rate 0.3" in open(
      os.path.join(workdir, "results.md")).read()
  # The paired differences to l2r: their mean is the difference of the means; the s.e. of a
  # difference never exceeds the two s.e.s added (triangle inequality).
  for method in METHODS[1:]:
    for name, k in (("paper", "deletion"), ("noise", "insertion"), ("chefer", "pos")):
      d, a, b = (on_disk["methods"][method][name][f"{k}_minus_l2r"],
                 on_disk["methods"][method][name][k], on_disk["methods"]["l2r"][name][k])
      np.testing.assert_allclose(d["mean"], a["mean"] - b["mean"], atol=1e-6)
      assert d["n"] == 12 and 0 <= d["se"] <= a["se"] + b["se"] + 1e-9
  assert "minus_l2r" not in json.dumps(on_disk["methods"]["l2r"])
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| l2r_refined |" in table and "## chefer (n = 12)" in table
  assert "deletion: method - l2r" in table
  # per_image.npz: every score of the 12 images (no padding), whose means are results.json's.
  per_image = np.load(os.path.join(workdir, "per_image.npz"))
  assert per_image["_labels"].shape == per_image["_predicted"].shape == (12,)
  for method in METHODS:
    for name in PROTOCOLS:
      for k, s in on_disk["methods"][method][name].items():
        if "minus" not in k:
          assert per_image[f"{method}/{name}/{k}"].shape == (12,)
          np.testing.assert_allclose(per_image[f"{method}/{name}/{k}"].mean(), s["mean"],
                                     atol=1e-6)


def test_paper_protocol_matches_the_brute_force_reference(run):
  """The explainer's 'paper' deletion and insertion means, recomputed image by image, fraction by
  fraction in float64 NumPy from the exported explainer."""
  workdir, results = run
  config, target, model, params, _ = evaluate.load_run(workdir)
  from l2r_jax import data
  from l2r_jax.data import sources
  source = train.source(config, config.data.eval_split)
  source = sources.subsample(source, 12)
  batch = next(iter(data.make_batches(source, batch_size=12, preprocess=target.preprocess)))
  images = jnp.asarray(batch["image"])
  apply_fn = jax.jit(target.apply_fn())
  classes = jnp.argmax(apply_fn(images), -1).astype(jnp.int32)
  maps = np.asarray(explainer.explain(model, params, target, target.variables, images, classes))
  fractions = np.linspace(0, 1, 21)
  dels, inss = [], []
  for i in range(12):
    x = np.asarray(images[i], np.float64)
    ref = reference.reference_image(x, "mean", mean_color=tuple(config.mean_color))

    def score(image, c=int(classes[i])):
      logits = np.asarray(apply_fn(jnp.asarray(image[None], jnp.float32)), np.float64)
      return reference.softmax(logits)[0, c]

    dels.append(reference.trapezoid(reference.deletion_curve(score, x, maps[i], ref, fractions),
                                    fractions))
    inss.append(reference.trapezoid(reference.deletion_curve(score, x, -maps[i], ref, fractions),
                                    fractions))
  per_image = np.load(os.path.join(workdir, "per_image.npz"))
  np.testing.assert_array_equal(per_image["_predicted"], np.asarray(classes))
  np.testing.assert_array_equal(per_image["_labels"], batch["label"])
  np.testing.assert_allclose(per_image["l2r/paper/deletion"], dels, atol=5e-4)
  np.testing.assert_allclose(per_image["l2r/paper/insertion"], inss, atol=5e-4)
  got = results["methods"]["l2r"]["paper"]
  np.testing.assert_allclose(got["deletion"]["mean"], np.mean(dels), atol=2e-4)
  np.testing.assert_allclose(got["insertion"]["mean"], np.mean(inss), atol=2e-4)
  np.testing.assert_allclose(got["deletion"]["se"], np.std(dels, ddof=1) / np.sqrt(12), atol=2e-4)


def test_errors_name_what_is_missing(run, tmp_path):
  workdir, _ = run
  with pytest.raises(ValueError, match="no config.json"):
    evaluate.evaluate(str(tmp_path))
  with pytest.raises(ValueError, match="methods must be one of"):
    evaluate.evaluate(workdir, methods=("l2r", "lime"))
  with pytest.raises(ValueError, match="protocols must be one of"):
    evaluate.evaluate(workdir, methods=("l2r",), protocol_names=("paper", "imagenet_c"))
  with pytest.raises(ValueError, match="unknown config field 'eval.referense'"):
    evaluate.evaluate(workdir, methods=("l2r",), overrides={"eval.referense": "black"})
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  import shutil
  shutil.copy(os.path.join(workdir, "target.msgpack"), empty)
  with pytest.raises(ValueError, match="no checkpoint"):
    evaluate.evaluate(str(empty), methods=("l2r",))
  # Only the export (no checkpoints/): the same params as the checkpoint; a wrong one is refused.
  shutil.copy(os.path.join(workdir, "explainer.msgpack"), empty)
  from_export = evaluate.load_run(str(empty))[3]
  for a, b in zip(jax.tree.leaves(evaluate.load_run(workdir)[3]), jax.tree.leaves(from_export)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from flax import serialization
  (empty / "explainer.msgpack").write_bytes(serialization.to_bytes(
      {"params": {"out": {"kernel": np.zeros((3, 3, 4, 1), np.float32)}}}))
  with pytest.raises(ValueError, match="explainer.msgpack'.*does not fit this config's"):
    evaluate.load_run(str(empty))


def test_explain_image_files(run, tmp_path):
  from PIL import Image

  from l2r_jax import data
  from l2r_jax import explain
  workdir, _ = run
  digits = data.create("mnist5k", split="test")
  paths = []
  for i in range(2):
    path = str(tmp_path / f"digit{i}.png")
    Image.fromarray(digits[i]["image"]).save(path)
    paths.append(path)
  out = explain.explain_files(workdir, paths, str(tmp_path / "out"))
  config, target, model, params, _ = evaluate.load_run(workdir)
  images = jnp.stack([jnp.asarray(target.preprocess(digits[i]["image"])) for i in range(2)])
  classes = jnp.argmax(target.apply(target.variables, images), -1).astype(jnp.int32)
  expected = explainer.explain(model, params, target, target.variables, images, classes)
  for i, r in enumerate(out):
    assert r["class"] == int(classes[i]) and os.path.getsize(r["png"]) > 0
    np.testing.assert_allclose(np.load(r["npy"]), expected[i], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="IMAGE"):
    explain.explain_files(workdir, [str(tmp_path / "missing.jpg")], str(tmp_path / "out"))
  with pytest.raises(ValueError, match="class_index"):
    explain.explain_files(workdir, paths, str(tmp_path / "out"), class_index=10)


def test_a_run_trained_on_8_devices_loads_on_1(run, tmp_path):
  """The fixture's checkpoint was written by 8 devices; a 1-device process (a pod's run evaluated
  on one GPU or CPU) restores the same params."""
  import subprocess
  import sys
  workdir, _ = run
  out = str(tmp_path / "params.npz")
  code = ("import sys, jax, numpy as np; from l2r_jax import evaluate; "
          "assert jax.device_count() == 1; p = evaluate.load_run(sys.argv[1])[3]; "
          "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(p)])")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", code, workdir, out], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  params = evaluate.load_run(workdir)[3]
  loaded = np.load(out)
  leaves = jax.tree.leaves(params)
  assert len(loaded.files) == len(leaves)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(loaded[f"arr_{i}"], np.asarray(leaf))


def test_batches_smaller_than_the_mesh_spread_the_rollouts(run):
  """Batches of 4 on 8 devices: the images are replicated and each image's perturbed copies and
  refinement samples spread over the devices; the explainer's scores equal the data-parallel
  run's (batches of 8), every image counted once."""
  workdir, results = run
  small = evaluate.evaluate(workdir, methods=("l2r", "l2r_refined"), protocol_names=("paper",
                                                                                     "chefer"),
                            batch_size=4, refine_steps=1, refine_samples=2, write=False,
                            verbose=False)
  for protocol, keys in (("paper", ("deletion", "insertion")), ("chefer", ("pos", "neg"))):
    for k in keys:
      got, want = small["methods"]["l2r"][protocol][k], results["methods"]["l2r"][protocol][k]
      assert got["n"] == 12
      np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-5, atol=1e-6)
  refined = small["methods"]["l2r_refined"]["paper"]["deletion"]
  assert refined["n"] == 12 and 0.0 <= refined["mean"] <= 1.0


def test_compare_runs_pairs_the_same_images(run, capsys):
  """scripts/compare_runs.py: a method of one evaluation against another's, paired per image;
  here random vs l2r of one run, whose paired gap results.json holds too."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
  import compare_runs

  workdir, results = run
  base, _, _ = compare_runs.load(workdir)
  rows = {r["score"]: r for r in compare_runs.compare(base, base, "l2r", "random")}
  assert set(rows) >= {"paper/deletion", "noise/insertion", "chefer/pos"}
  for score, row in rows.items():
    name, k = score.split("/")
    want = results["methods"]["random"][name][f"{k}_minus_l2r"]
    assert row["n"] == 12
    np.testing.assert_allclose(row["diff"], (want["mean"], want["se"]), atol=1e-5)
  compare_runs.main(["--base", workdir, "--new", f"{workdir}:random"])
  assert "| paper/deletion | 12 |" in capsys.readouterr().out
  shuffled = dict(base, _labels=base["_labels"][::-1].copy())
  if not np.array_equal(shuffled["_labels"], base["_labels"]):
    with pytest.raises(ValueError, match="did not score the same images"):
      compare_runs.compare(base, shuffled, "l2r", "l2r")
  with pytest.raises(ValueError, match="matches one of 'gradient' in the new one"):
    compare_runs.compare(base, base, "l2r", "gradient")
  # Indexed evaluations pair on the images both scored, matched by index, whatever the order.
  rows_b = np.array([7, 1, 3])
  part = {k: v[rows_b] for k, v in base.items()}
  got = {r["score"]: r for r in compare_runs.compare(base, part, "l2r", "random")}
  d = base["random/paper/deletion"][[1, 3, 7]] - base["l2r/paper/deletion"][[1, 3, 7]]
  assert got["paper/deletion"]["n"] == 3
  np.testing.assert_allclose(got["paper/deletion"]["diff"], compare_runs.mean_se(d), atol=1e-7)
  rest = {k: v[np.setdiff1d(np.arange(12), rows_b)] for k, v in base.items()}
  with pytest.raises(ValueError, match="no image in common"):
    compare_runs.compare(rest, part, "l2r", "l2r")
  # Only the images predicted as (or not as) given classes, against the same cut by hand.
  # (The smoke target predicts one class for all 12: three made-up classes stand in.)
  predicted = np.arange(12) % 3
  three = dict(base, _predicted=predicted)
  for kwargs, rows in ((dict(keep_classes=[1]), predicted == 1),
                       (dict(drop_classes=[1]), predicted != 1),
                       (dict(keep_classes=[0, 2]), predicted != 1)):
    got = {r["score"]: r for r in compare_runs.compare(three, three, "l2r", "random", **kwargs)}
    d = base["random/paper/deletion"][rows] - base["l2r/paper/deletion"][rows]
    assert got["paper/deletion"]["n"] == rows.sum()
    np.testing.assert_allclose(got["paper/deletion"]["diff"], compare_runs.mean_se(d), atol=1e-7)
  with pytest.raises(ValueError, match="0 image.s. left"):
    compare_runs.compare(three, three, "l2r", "random", keep_classes=[3])
  with pytest.raises(ValueError, match="not both"):
    compare_runs.compare(three, three, "l2r", "random", keep_classes=[1], drop_classes=[2])


CHUNK_METHODS, CHUNK_PROTOCOLS = ("l2r", "l2r_refined", "random"), ("paper", "chefer")


def evaluate_chunk(workdir, chunk, out):
  return evaluate.evaluate(workdir, methods=CHUNK_METHODS, protocol_names=CHUNK_PROTOCOLS,
                           batch_size=4, refine_steps=2, refine_samples=2, chunk=chunk,
                           output_dir=out, verbose=False)


@pytest.fixture(scope="module")
def chunk_part(run, tmp_path_factory):
  """The images 5..11 of the fixture's 12-image draw evaluated as a chunk, into their own
  output_dir: (that dir, the results, whether the workdir's results.json stayed untouched)."""
  workdir, _ = run
  before = open(os.path.join(workdir, "results.json")).read()
  out = str(tmp_path_factory.mktemp("part"))
  part = evaluate_chunk(workdir, (5, 12), out)
  return out, part, open(os.path.join(workdir, "results.json")).read() == before


def test_a_chunk_scores_its_images_as_the_whole_evaluation_does(run, chunk_part):
  """evaluate(chunk=...): the images 5..11 of the fixture's 12-image draw, written to their own
  output_dir, score as they did in the whole evaluation, the random and refined maps included
  (each image keeps its key); merged with the other chunk's scores, they give the whole table."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
  import merge_evaluations

  workdir, results = run
  whole = dict(np.load(os.path.join(workdir, "per_image.npz")))
  methods = CHUNK_METHODS
  out, part, untouched = chunk_part
  assert untouched  # the workdir's results.json
  assert part["examples"] == {"num_examples": 12, "chunk": [5, 12], "n": 7}
  assert "Images 5 to 11 of the draw of 12" in open(os.path.join(out, "results.md")).read()
  got = dict(np.load(os.path.join(out, "per_image.npz")))
  assert len(got["_index"]) == 7 and set(got["_index"]) < set(whole["_index"])
  rows = np.searchsorted(whole["_index"], got["_index"])
  np.testing.assert_array_equal(whole["_index"][rows], got["_index"])
  for key in ("_labels", "_predicted", *(f"{m}/paper/{k}" for m in methods
                                         for k in ("deletion", "insertion"))):
    np.testing.assert_allclose(got[key], whole[key][rows], rtol=1e-5, atol=1e-6, err_msg=key)
  # The rest of the draw, taken from the whole evaluation's scores, completes it.
  rest = np.setdiff1d(np.arange(12), rows)
  other = {k: v[rest] for k, v in whole.items()}
  merged, dropped = merge_evaluations.merge([other, got], ["rest", "part"])
  assert "gradcam/paper/deletion" in dropped and "l2r/paper/deletion" in merged
  for key in merged:  # in the whole evaluation's order
    np.testing.assert_allclose(merged[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
  table = merge_evaluations.markdown(merged)
  d = merged["random/paper/deletion"] - merged["l2r/paper/deletion"]
  want = results["methods"]["random"]["paper"]["deletion_minus_l2r"]
  np.testing.assert_allclose((d.mean(), d.std(ddof=1) / np.sqrt(12)), (want["mean"], want["se"]),
                             atol=1e-5)
  assert "{:+.4f} +- {:.4f}".format(*merge_evaluations.mean_se(d)) in table
  assert table.startswith("12 images")
  with pytest.raises(ValueError, match="is in both"):
    merge_evaluations.merge([whole, got], ["whole", "part"])
  unindexed = {k: v for k, v in other.items() if k != "_index"}
  with pytest.raises(ValueError, match="--assume_disjoint"):
    merge_evaluations.merge([unindexed, got], ["old", "part"])
  assert len(merge_evaluations.merge([unindexed, got], ["old", "part"],
                                     assume_disjoint=True)[0]["_labels"]) == 12
  with pytest.raises(ValueError, match="chunk 5:13 must satisfy"):
    evaluate.evaluate(workdir, methods=("l2r",), protocol_names=("paper",), chunk=(5, 13),
                      write=False, verbose=False)


def test_chunks_merge_into_the_whole_evaluations_results(run, chunk_part, tmp_path):
  """merge_evaluations.py --out_dir: two chunks of the fixture's draw, evaluated apart, merge into
  the results.json the whole evaluation wrote (means, standard errors, n, paired gaps, paper
  curves), seconds per image weighted by each part's images, and the first part's figure; parts
  of different refinements or a results.json that is not its per_image.npz's are refused."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
  import merge_evaluations
  import readme_assets

  workdir, whole = run
  methods, protocols = CHUNK_METHODS, CHUNK_PROTOCOLS
  parts = [str(tmp_path / "part0"), chunk_part[0]]
  evaluate_chunk(workdir, (0, 5), parts[0])
  out = str(tmp_path / "merged")
  merge_evaluations.main([parts[1], parts[0], "--out_dir", out])  # any order
  got = json.load(open(os.path.join(out, "results.json")))
  assert got["examples"] == {"num_examples": 12, "chunk": None, "n": 12,
                             "parts": [parts[1], parts[0]]}
  assert list(got["methods"]) == list(methods) and list(got["protocols"]) == list(protocols)
  assert got["refine"] == json.loads(json.dumps(whole["refine"]))  # tuples as JSON lists
  assert got["target"] == whole["target"]
  for m in methods:
    for p in protocols:
      assert set(got["methods"][m][p]) == set(whole["methods"][m][p]), (m, p)
      for k, want in whole["methods"][m][p].items():
        have = got["methods"][m][p][k]
        assert have["n"] == want["n"] == 12, (m, p, k)
        np.testing.assert_allclose([have["mean"], have["se"]], [want["mean"], want["se"]],
                                   rtol=1e-4, atol=2e-6, err_msg=f"{m} {p} {k}")
      for k in ("deletion", "insertion"):
        if p == "paper":
          np.testing.assert_allclose(got["curves"][m][k], whole["curves"][m][k], atol=2e-6)
  sizes = (5, 7)
  seconds = [json.load(open(os.path.join(d, "results.json")))["methods"]["l2r_refined"]
             ["seconds_per_image"] for d in parts]
  np.testing.assert_allclose(got["methods"]["l2r_refined"]["seconds_per_image"],
                             np.dot(seconds, sizes) / 12, rtol=1e-9)
  assert "The whole draw of 12, merged from 2 parts." in open(os.path.join(out,
                                                                          "results.md")).read()
  assert open(os.path.join(out, "examples.png"), "rb").read() == open(
      os.path.join(parts[0], "examples.png"), "rb").read()
  assert os.path.exists(os.path.join(out, "curves.png"))
  per_image = dict(np.load(os.path.join(out, "per_image.npz")))
  assert "| l2r_refined |" in readme_assets.table(got, per_image)
  # One part alone is a chunk of the draw, said so.
  merge_evaluations.main([parts[1], "--out_dir", str(tmp_path / "one")])
  one = json.load(open(str(tmp_path / "one" / "results.json")))
  assert one["examples"]["chunk"] == [[5, 12]] and one["examples"]["n"] == 7
  assert "Images 5 to 11 of the draw of 12, merged from 1 part." in open(
      str(tmp_path / "one" / "results.md")).read()
  # Refused: another refinement in one part; a results.json that counts other images.
  bad = json.load(open(os.path.join(parts[1], "results.json")))
  bad["refine"]["learning_rate"] = 9.0
  with pytest.raises(ValueError, match="must be one refinement"):
    merge_evaluations.merge_results([got, bad], per_image, ["a", "b"])
  with pytest.raises(ValueError, match="no method was evaluated in every part"):
    merge_evaluations.merge_results([got, dict(got, methods={})], per_image, ["a", "b"])
  with pytest.raises(ValueError, match="count 19 images"):
    merge_evaluations.merge_results([got, one], per_image, ["a", "b"])
  with pytest.raises(SystemExit, match="results.json"):
    merge_evaluations.main([os.path.join(parts[0], "per_image.npz"), "--out_dir",
                            str(tmp_path / "none"), "--assume_disjoint"])


def test_a_methods_random_draw_does_not_depend_on_the_other_methods_or_the_batch(run):
  """The stochastic methods score the same alone as beside the other methods (their keys follow
  the method's name, not its place in --methods), and in batches of 4 as of 8 (each image's key
  follows its index in the evaluated set; RISE's one mask set is shared by all images)."""
  from l2r_jax import baselines
  workdir, results = run
  stochastic = ("l2r_refined", "random", "smoothgrad", "rise")
  options = baselines.Options(smoothgrad_samples=4, rise_masks=16, rise_grid=2, batch_size=16)
  by_batch = {b: evaluate.evaluate(workdir, methods=stochastic, protocol_names=("paper",),
                                   batch_size=b, refine_steps=2, refine_samples=2,
                                   baseline_options=options, write=False, verbose=False)
              for b in (4, 8)}
  for method in stochastic:
    for k in ("deletion", "insertion"):
      np.testing.assert_allclose(by_batch[4]["methods"][method]["paper"][k]["mean"],
                                 by_batch[8]["methods"][method]["paper"][k]["mean"], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{method} {k}: batch 4 against 8")
      if method in results["methods"]:
        np.testing.assert_allclose(by_batch[8]["methods"][method]["paper"][k]["mean"],
                                   results["methods"][method]["paper"][k]["mean"], rtol=1e-5,
                                   atol=1e-6, err_msg=f"{method} {k}: alone against beside")


def test_refine_settings_take_the_runs_learning_rate():
  """The run's eval.refine_learning_rate unless one is given; a config.json written before the
  field existed gets RefineConfig's default, the rate such runs were evaluated with."""
  from configs import efficientnet as efficientnet_config
  c = efficientnet_config.get_config()
  assert evaluate.refine_settings(c, 10).learning_rate == 0.3
  assert evaluate.refine_settings(c, 10, learning_rate=0.05).learning_rate == 0.05
  assert evaluate.refine_settings(vit_config.get_config(), 10).learning_rate == 0.3
  from configs import resnet as resnet_config
  assert evaluate.refine_settings(resnet_config.get_config(), 10).learning_rate == 0.1
  old = vit_config.get_config()
  del old.eval["refine_learning_rate"]
  assert "refine_learning_rate" not in old.eval
  assert evaluate.refine_settings(old, 10).learning_rate == 0.1
  five = evaluate.refine_settings(c, 5)  # the finer half of (7, 14, 28)
  assert five.grids == (14, 28) and five.steps == 5 and five.references == tuple(c.references)
  c.eval.refine_learning_rate = 0.0
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    evaluate.refine_settings(c, 10)
  # The deletion weight likewise: the run's (1, the paper's loss), a given one, 1 for old runs.
  c = efficientnet_config.get_config()
  assert evaluate.refine_settings(c, 10).objective.deletion_weight == 1.0
  assert evaluate.refine_settings(c, 10, deletion_weight=0.5).objective.deletion_weight == 0.5
  del old.eval["refine_deletion_weight"]
  assert evaluate.refine_settings(old, 10).objective.deletion_weight == 1.0
  settings = evaluate.refine_settings(c, 10, deletion_weight=0.5).objective
  # The rest as the config has it (ImageNet: unnormalised scores at scale 12).
  assert not settings.normalize_scores and settings.num_fractions == 16
  with pytest.raises(ValueError, match="deletion_weight"):
    evaluate.refine_settings(c, 10, deletion_weight=-1.0)
  # Any RefineConfig field, the objective's as objective.X, set last; lists become tuples.
  set_ = evaluate.refine_settings(c, 10, overrides={"tau": 0.1, "grids": [7, 14],
                                                    "objective.num_iters": 50})
  assert set_.tau == 0.1 and set_.grids == (7, 14) and set_.objective.num_iters == 50
  assert set_.learning_rate == 0.3 and set_.scale == 12.0  # the rest kept
  assert not set_.objective.normalize_scores
  for bad in ("tua", "objective.tua", "objective.x.y"):
    with pytest.raises(ValueError, match=r"unknown refinement field .*the fields are steps"):
      evaluate.refine_settings(c, 10, overrides={bad: 1})
  with pytest.raises(ValueError, match="tau must be a finite number > 0"):
    evaluate.refine_settings(c, 10, overrides={"tau": 0.0})
  # How the sort sees the map: the run's eval.refine_normalize_scores and eval.refine_scale;
  # normalised scores at scale 1 for a run written before the fields existed.
  old = vit_config.get_config()
  del old.eval["refine_normalize_scores"], old.eval["refine_scale"]
  settings = evaluate.refine_settings(old, 10)
  assert settings.objective.normalize_scores and settings.scale == 1.0
  c = vit_config.get_config()
  c.eval.refine_normalize_scores, c.eval.refine_scale = False, 5.0
  settings = evaluate.refine_settings(c, 10)
  assert not settings.objective.normalize_scores and settings.scale == 5.0
  assert evaluate.refine_settings(c, 10, overrides={"scale": 2.0}).scale == 2.0
  c.eval.refine_scale = -1.0
  with pytest.raises(ValueError, match="scale must be a finite number > 0"):
    evaluate.refine_settings(c, 10)
