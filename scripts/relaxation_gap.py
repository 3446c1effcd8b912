"""How far the training objective's soft sweeps are from the hard ranking they relax, for a run.

  python scripts/relaxation_gap.py --workdir /tmp/l2r_vit --num_examples 32

For held-out images and the run's explainer (maps of the predicted class), for each training grid,
temperature and reference: the Gumbel-Sinkhorn masks of training (with and without the Gumbel
noise, mask smoothing off) against the hard masks of the same cells' ranking
(`objectives.hard_cell_masks`, what the evaluation deletes, at cell level), as the mean absolute
difference of the masks, and the target's deletion / insertion AUC of the predicted class under
each, with their correlation over the images. A map's scale sets how sharp its soft sort is (the
anchors are 1 / N apart, the noise is Gumbel(0, 1)), so the median per-image standard deviation of
the maps is printed first. One markdown table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2r_jax import data  # noqa: E402
from l2r_jax import evaluate  # noqa: E402
from l2r_jax import explainer as explainer_lib  # noqa: E402
from l2r_jax import objectives  # noqa: E402
from l2r_jax import perturb  # noqa: E402
from l2r_jax import train  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training workdir (train.py --workdir)")
  parser.add_argument("--num_examples", type=int, default=32, help="held-out images (one batch)")
  parser.add_argument("--taus", default="1.0,0.3", help="temperatures (the schedule's ends)")
  parser.add_argument("--references", default="black,mean", help="perturb.REFERENCES")
  parser.add_argument("--seed", type=int, default=0, help="the Gumbel noise")
  args = parser.parse_args(argv)
  if args.num_examples < 2:
    parser.error(f"--num_examples must be >= 2 (a correlation over images), "
                 f"got {args.num_examples}")
  taus = [float(t) for t in args.taus.split(",")]
  if not all(t > 0 for t in taus):
    parser.error(f"--taus must be positive temperatures, got {args.taus!r}")
  unknown = sorted(set(args.references.split(",")) - set(perturb.REFERENCES))
  if unknown:
    parser.error(f"--references: unknown {unknown}; one of {', '.join(perturb.REFERENCES)}")

  config, target, model, params, _ = evaluate.load_run(args.workdir)
  if config.explainer.get("backbone", ""):
    raise SystemExit("a run with a separate backbone is not supported by this script")
  source = train.source(config, config.data.eval_split)
  batch = next(iter(data.make_batches(source, batch_size=args.num_examples,
                                      preprocess=train.preprocessing(config, target))))
  keep = np.asarray(batch["mask"])
  images = jnp.asarray(batch["image"])[keep]
  apply_fn = target.apply_fn(target.variables)
  classes = jnp.argmax(apply_fn(images), -1).astype(jnp.int32)
  maps = explainer_lib.explain(model, params, target, target.variables, images, classes)
  b, h, w = maps.shape
  step = train.step_config(config)
  # No mask smoothing: it blurs soft and hard masks alike; the comparison is of the rankings.
  objective = dataclasses.replace(step.objective, smoothing_sigma=0.0, straight_through=False)
  fractions = objective.fractions

  @jax.jit
  def auc(masks, references):  # masks f32[B, K, H, W] -> AUC f32[B] of the predicted class
    curves = objectives.masked_curves(apply_fn, images, masks[:, None], references,
                                      classes[:, None], objective.score)
    return objectives.trapezoid_auc(curves[:, 0, 0], fractions)

  print(f"{args.workdir}: {b} held-out images, map std per image (median) "
        f"{float(jnp.median(jnp.std(maps, axis=(1, 2)))):.3f}\n")
  print("| reference | grid | tau | noise | sweep | mean abs(soft - hard) mask | AUC soft | "
        "AUC hard | correlation |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  kw = dict(mean_color=step.mean_color, blur_size=step.blur_size, blur_sigma=step.blur_sigma)
  for name in args.references.split(","):
    references = perturb.reference_images(images, name, **kw)
    for grid in config.grids:
      cells = perturb.pool_to_grid(maps, grid)
      # The hard masks and their AUCs depend on neither the temperature nor the noise.
      hards = [perturb.upsample_cells(objectives.hard_cell_masks(sign * cells, fractions), grid,
                                      (h, w)) for sign in (1.0, -1.0)]
      hard_aucs = [np.asarray(auc(hard, references)) for hard in hards]
      for tau in taus:
        for noisy in (True, False):
          key = jax.random.key(args.seed) if noisy else None
          soft = objectives.soft_sweep_masks(maps, key=key, grid=grid, tau=tau, config=objective)
          for s, sweep in enumerate(("deletion", "insertion")):
            hard, a_hard = hards[s], hard_aucs[s]
            a_soft = np.asarray(auc(soft[:, s], references))
            r = np.corrcoef(a_soft, a_hard)[0, 1] if b > 1 else float("nan")
            print(f"| {name} | {grid} | {tau:g} | {'yes' if noisy else 'no'} | {sweep} | "
                  f"{float(jnp.mean(jnp.abs(soft[:, s] - hard))):.3f} | {a_soft.mean():.3f} | "
                  f"{a_hard.mean():.3f} | {r:.2f} |")


if __name__ == "__main__":
  main()
