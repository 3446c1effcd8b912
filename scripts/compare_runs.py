"""Paired comparison of two evaluations on the same images: one method of run A against one method
of run B (e.g. an explainer before and after a change of its training), score by score.

  python scripts/compare_runs.py --base /tmp/l2r_cifar --new /tmp/l2r_cifar_ft32
  python scripts/compare_runs.py --base /tmp/l2r_cifar:l2r --new /tmp/l2r_cifar:rise

Each side is a workdir (or its per_image.npz, written by evaluate.py) with an optional ':method'
(default l2r). The two evaluations must have scored the same images in the same order (the same
split and --num_examples): their labels and predicted classes are checked. Where both recorded
each image's index in the split ('_index'), they are paired on the images both scored, whatever
the order: a chunk (evaluate.py --chunk) or merged chunks (scripts/merge_evaluations.py) against
an evaluation of the whole held-out set; the table gives n. Per score common to
both: each side's mean +- standard error and the paired per-image difference new - base (its
standard error is that of the differences, so a real gap shows even where the two means' error
bars overlap).

  python scripts/compare_runs.py --base /tmp/l2r_vit:integrated_gradients_signed \
      --new /tmp/l2r_vit:l2r_refined --drop_classes 1

`--keep_classes` / `--drop_classes` (comma-separated class indices) pair only the images whose
predicted class (the one explained and scored) is / is not among them: e.g. a class whose
reference image the target already assigns to it (the demo's ViT calls a blank image a 1), where
the deletion and insertion curves stay near 1 whatever the ranking.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np


def load(spec: str) -> tuple[dict[str, np.ndarray], str, str]:
  """(per-image scores, method, the file) of 'path[:method]'."""
  path, _, method = spec.partition(":")
  file = os.path.join(path, "per_image.npz") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise SystemExit(f"{spec!r}: no {file}; run evaluate.py on that workdir first (it writes "
                     f"per_image.npz)")
  with np.load(file) as data:
    return dict(data), method or "l2r", file


def mean_se(x: np.ndarray) -> tuple[float, float]:
  return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def common_images(base: dict[str, np.ndarray],
                  new: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Both evaluations cut to the images both scored (matched on '_index', each image's index in
  the held-out split), in the base's order: e.g. a chunk (evaluate.py --chunk) against the
  whole held-out set."""
  for side, data in (("base", base), ("new", new)):
    if len(np.unique(data["_index"])) != len(data["_index"]):
      raise ValueError(f"the {side} evaluation scored an image twice (its '_index' repeats)")
  shared, rows_a, rows_b = np.intersect1d(base["_index"], new["_index"], return_indices=True)
  if not len(shared):
    raise ValueError("the two evaluations have no image in common (their '_index' are disjoint)")
  keep = np.argsort(rows_a)
  rows_a, rows_b = rows_a[keep], rows_b[keep]
  return ({k: v[rows_a] for k, v in base.items()}, {k: v[rows_b] for k, v in new.items()})


def class_filter(predicted: np.ndarray, keep: Sequence[int] | None,
                 drop: Sequence[int] | None) -> np.ndarray:
  """bool[n]: the images whose predicted class is in `keep`, or else not in `drop`."""
  if keep is not None and drop is not None:
    raise ValueError("give the classes to keep or those to drop, not both")
  return np.isin(predicted, keep) if keep is not None else ~np.isin(predicted, drop)


def compare(base: dict[str, np.ndarray], new: dict[str, np.ndarray], base_method: str,
            new_method: str, keep_classes: Sequence[int] | None = None,
            drop_classes: Sequence[int] | None = None) -> list[dict]:
  """One row per 'protocol/score' both sides have for their method: {'score', 'n', 'base',
  'new', 'diff'} with (mean, se) pairs; diff = new - base paired per image. keep_classes /
  drop_classes: only the images predicted as / not as one of those classes."""
  if "_index" in base and "_index" in new:
    base, new = common_images(base, new)
  for key in ("_labels", "_predicted"):
    if key not in base or key not in new or not np.array_equal(base[key], new[key]):
      raise ValueError(f"the two evaluations did not score the same images ({key[1:]} differ): "
                       f"evaluate both with the same split and --num_examples")
  if keep_classes is not None or drop_classes is not None:
    rows = class_filter(base["_predicted"], keep_classes, drop_classes)
    if rows.sum() < 2:
      raise ValueError(f"{int(rows.sum())} image(s) left after keeping classes {keep_classes} / "
                       f"dropping {drop_classes}: a paired standard error needs at least 2 "
                       f"(predicted classes present: {sorted(set(base['_predicted'].tolist()))})")
    base = {k: v[rows] for k, v in base.items()}
    new = {k: v[rows] for k, v in new.items()}
  prefix_a, prefix_b = f"{base_method}/", f"{new_method}/"
  scores_a = {k[len(prefix_a):] for k in base if k.startswith(prefix_a)}
  scores_b = {k[len(prefix_b):] for k in new if k.startswith(prefix_b)}
  common = sorted(scores_a & scores_b)
  if not common:
    raise ValueError(f"no score of method {base_method!r} in the base evaluation matches one of "
                     f"{new_method!r} in the new one (base has {sorted(scores_a)}, new "
                     f"{sorted(scores_b)})")
  out = []
  for score in common:
    a, b = base[prefix_a + score], new[prefix_b + score]
    out.append({"score": score, "n": len(a), "base": mean_se(a), "new": mean_se(b),
                "diff": mean_se(b - a)})
  return out


def markdown(rows: list[dict], base: str, new: str) -> str:
  lines = [f"| score | n | base: {base} | new: {new} | new - base (paired) |",
           "| --- | --- | --- | --- | --- |"]
  for r in rows:
    (da, sa), (db, sb), (dd, sd) = r["base"], r["new"], r["diff"]
    z = f" (z {dd / sd:+.1f})" if sd > 0 else ""
    lines.append(f"| {r['score']} | {r['n']} | {da:.4f} +- {sa:.4f} | {db:.4f} +- {sb:.4f} | "
                 f"{dd:+.4f} +- {sd:.4f}{z} |")
  return "\n".join(lines)


def class_list(text: str) -> list[int]:
  """'1,7' -> [1, 7]; an argparse type, so a bad list is a usage error naming the flag."""
  try:
    classes = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated class indices, e.g. '1' or "
                                     f"'1,7', got {text!r}") from None
  if not classes or min(classes) < 0:
    raise argparse.ArgumentTypeError(f"expected class indices >= 0, got {text!r}")
  return classes


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True, help="workdir or per_image.npz, optional :method")
  parser.add_argument("--new", required=True, help="workdir or per_image.npz, optional :method")
  parser.add_argument("--keep_classes", type=class_list, default=None,
                      help="comma-separated predicted classes: pair only those images")
  parser.add_argument("--drop_classes", type=class_list, default=None,
                      help="comma-separated predicted classes: pair all images but those")
  args = parser.parse_args(argv)
  base, base_method, base_file = load(args.base)
  new, new_method, new_file = load(args.new)
  try:
    rows = compare(base, new, base_method, new_method, args.keep_classes, args.drop_classes)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  print(markdown(rows, f"{base_method} of {base_file}", f"{new_method} of {new_file}"))


if __name__ == "__main__":
  main(sys.argv[1:])
